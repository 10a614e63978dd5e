"""A minimal HTTP CONNECT proxy with Basic authentication, run as a subprocess by the tests:
``python connect_proxy.py USER:PASSWORD`` prints ``port N`` and relays authorised tunnels,
printing ``CONNECT host:port`` for each one it opened."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _handle(
    credentials: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    expected = "Basic " + base64.b64encode(credentials.encode()).decode()
    if method != "CONNECT":
        writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
    elif headers.get("Proxy-Authorization") != expected:
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    else:
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        print(f"CONNECT {target}", flush=True)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        return
    await writer.drain()
    writer.close()


async def main(credentials: str) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(credentials, r, w), "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1]))
