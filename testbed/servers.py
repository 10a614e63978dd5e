"""Small real servers for the demo, the benchmarks and the end-to-end tests.

``python -m testbed.servers echo [--port N]`` runs a TCP echo server;
``python -m testbed.servers http --directory DIR [--port N]`` a threaded HTTP/1.1 file server;
``python -m testbed.servers blob [--port N]`` a bulk-transfer server: a client sends ``D`` or ``U``
and an 8-byte big-endian count N; on ``D`` the server sends N bytes and closes, on ``U`` it reads
N bytes and answers ``K``.
Each prints ``port N`` on stdout once it listens, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import signal
import socket
import sys
import threading
from typing import cast


class _Echo(asyncio.Protocol):
    """Echo with backpressure: stop reading while the peer does not read what we send."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


_BLOCK = bytes(range(256)) * 4096  # 1 MiB


async def _paced(writer: asyncio.StreamWriter, count: int, rate: int) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(_BLOCK)[:65536]
    start, sent = loop.time(), 0
    while sent < count:
        n = min(count - sent, len(view))
        writer.write(view[:n])
        sent += n
        await writer.drain()
        ahead = sent / rate - (loop.time() - start)
        if ahead > 0:
            await asyncio.sleep(ahead)
        elif ahead < -0.005:
            # Behind (the machine is busy): forgive the debt rather than catch up in a burst
            # that a peer without bounds (the reference's source) would have to hold.
            start += -ahead - 0.005


async def _blob(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        head = await reader.readexactly(9)
        count = int.from_bytes(head[1:], "big")
        if head[:1] == b"P":
            # Paced download: 8 more bytes give the rate in bytes/s; the server sends 64 KiB
            # at a time and never gets ahead of the rate (a peer that buffers whatever it is
            # sent, as the reference's source does, then holds only a little).
            rate = int.from_bytes(await reader.readexactly(8), "big")
            await _paced(writer, count, rate)
        elif head[:1] == b"D":
            view = memoryview(_BLOCK)
            while count > 0:
                n = min(count, len(_BLOCK))
                writer.write(view[:n])
                count -= n
                await writer.drain()
        else:
            while count > 0:
                chunk = await reader.read(min(count, 1 << 20))
                if not chunk:
                    return
                count -= len(chunk)
            writer.write(b"K")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve_echo(host: str, port: int, kind: str = "echo") -> None:
    loop = asyncio.get_running_loop()
    if kind == "blob":
        server = await asyncio.start_server(_blob, host, port, backlog=1024)
    else:
        server = await loop.create_server(_Echo, host, port, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    # The stdlib default backlog of 5 drops SYNs under a burst of connections; real servers
    # (nginx: 511) do not.
    request_queue_size = 512


def serve_http(host: str, port: int, directory: str) -> None:
    handler = functools.partial(_Handler, directory=directory)
    server = _Server((host, port), handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    stopper = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopper.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with contextlib.suppress(KeyboardInterrupt):
        stopper.wait()
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.servers")
    parser.add_argument("kind", choices=["echo", "http", "blob"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--directory", default=".")
    args = parser.parse_args(argv)
    if args.kind in ("echo", "blob"):
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_echo(args.host, args.port, args.kind))
    else:
        serve_http(args.host, args.port, args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
