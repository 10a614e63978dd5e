"""A TLS endpoint that reports the ALPN protocol a client offered, with that client started beside
it in this network namespace (run under ``unshare --net``, where port 443 is free to bind):

``python alpn_endpoint.py PORT CERT KEY CA CLIENT_LOG -- CLIENT_ARGV...``

brings up loopback, listens on ``127.0.0.1:PORT``, starts the client (output to CLIENT_LOG),
completes one TLS handshake that requires a client certificate signed by CA, and prints
``alpn <protocol>`` (``alpn none`` when the client offered no protocol this endpoint knows) and
``first byte 0x..`` of what the client sent. Then it stops the client and exits.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys

#: The protocols this endpoint accepts, as AWS IoT Core's port 443 does (and HTTP).
PROTOCOLS = ["x-amzn-mqtt-ca", "http/1.1"]


def main(argv: list[str]) -> int:
    split = argv.index("--")
    port, cert, key, ca, client_log = argv[:split]
    client_argv = argv[split + 1 :]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(PROTOCOLS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with socket.create_server(("127.0.0.1", int(port))) as server:
        print(f"listening on {port}", flush=True)
        with open(client_log, "wb") as log:
            client = subprocess.Popen(
                client_argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            server.settimeout(120)
            conn, _ = server.accept()
            conn.settimeout(60)
            with context.wrap_socket(conn, server_side=True) as tls:
                print(f"alpn {tls.selected_alpn_protocol() or 'none'}", flush=True)
                print(f"first byte 0x{tls.recv(1).hex()}", flush=True)
        finally:
            client.terminate()
            try:
                client.wait(20)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
