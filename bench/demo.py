"""``make demo``: the multiplexing walk-through, on this machine, end to end.

One tunnel with two services, as in the AWS guide: HTTP1 reaches a web server on the device and
SSH1 an interactive service, both at the same time through one tunnel. Everything runs on
loopback: iotunnel's own tunnel service (TLS, with a throw-away CA), a destination-mode proxy
(the device side), a source-mode proxy (the operator's laptop), and real servers and clients.
Logs stay in ``.demo/`` for a look afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.clients import http_get
from bench.harness import HarnessError, Stack, Tunnel
from bench.pki import PKI

MiB = 1 << 20


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interactive(port: int, count: int) -> list[float]:
    """Keystroke-sized round trips on one connection; returns each one's time in ms."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            message = f"echo {i:06d}\n".encode()
            start = time.perf_counter()
            sock.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("echo connection closed")
                got += chunk
            times.append((time.perf_counter() - start) * 1000)
            assert got == message
            time.sleep(0.005)
    return times


def run(workdir: Path) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    www = workdir / "www"
    www.mkdir(parents=True)
    (www / "index.html").write_text("<h1>device settings</h1>\n")
    big = (hashlib.sha256(b"demo").digest() * (16 * MiB // 32))[: 16 * MiB]
    (www / "firmware.bin").write_bytes(big)
    pki = PKI.create(workdir / "pki")
    tunnel = Tunnel("demo-tunnel", ("HTTP1", "SSH1"))

    print("iotunnel demo: one tunnel, two services (HTTP1 and SSH1), traffic on both at once\n")
    with Stack(workdir / "logs") as stack:
        _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
        print(f"  tunnel service   wss://127.0.0.1:{port}/tunnel (TLS, demo CA)")
        _, http_port = stack.http_server(www)
        _, echo_port = stack.echo_server()
        stack.destination(
            tunnel.destination_token, port, f"HTTP1={http_port},SSH1={echo_port}", ca=pki.ca.cert
        )
        print(
            f"  destination      HTTP1 -> 127.0.0.1:{http_port} (web server), "
            f"SSH1 -> 127.0.0.1:{echo_port} (interactive echo)"
        )
        wanted = {"HTTP1": 5555, "SSH1": 3333}
        mapping = ",".join(f"{s}={p if _port_free(p) else 0}" for s, p in wanted.items())
        source = stack.source(tunnel.source_token, port, mapping, list(wanted), ca=pki.ca.cert)
        http1, ssh1 = source.ports["HTTP1"], source.ports["SSH1"]
        print(f"  source           HTTP1 on 127.0.0.1:{http1}, SSH1 on 127.0.0.1:{ssh1}\n")

        results: dict[str, object] = {}

        def browse() -> None:
            start = time.perf_counter()
            status, body = http_get(http1, "/firmware.bin", timeout=60)
            elapsed = time.perf_counter() - start
            ok = status == 200 and body == big
            results["download"] = (ok, len(body) / MiB / elapsed)
            pages = [http_get(http1, "/index.html") for _ in range(20)]
            results["pages"] = sum(1 for s, _ in pages if s == 200)

        browser = threading.Thread(target=browse)
        browser.start()
        times = _interactive(ssh1, 200)
        browser.join(120)

    download = results.get("download", (False, 0.0))
    assert isinstance(download, tuple)
    ok_download, rate = download
    pages = results.get("pages", 0)
    p99 = sorted(times)[int(len(times) * 0.99) - 1]
    print("  traffic, at the same time through the one tunnel:")
    print(
        f"    HTTP1  GET /firmware.bin 16 MiB: "
        f"{'sha256 ok' if ok_download else 'FAILED'}, {rate:.0f} MiB/s"
    )
    print(f"    HTTP1  GET /index.html x 20: {pages} x 200 OK")
    print(
        f"    SSH1   200 interactive round trips: median {statistics.median(times):.2f} ms, "
        f"p99 {p99:.2f} ms"
    )
    good = bool(ok_download) and pages == 20 and len(times) == 200
    print(f"\nresult: {'OK' if good else 'FAILED'} (logs in {workdir}/logs)")
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    try:
        return run(args.workdir.resolve())
    except HarnessError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
