"""Load clients for the benchmarks, run as their own processes so that a bulk transfer does not
share an interpreter (and its GIL) with the client measuring latency.

Each subcommand prints one JSON object on stdout:

``python -m bench.load download --port P --bytes N [--conns K] [--rate B_PER_S] [--server-paced]``
    K connections to a ``blob`` server each fetch N/K bytes (optionally read at a paced rate, or
    with ``--server-paced`` sent at that rate by the server: nothing piles up in the proxies).
``python -m bench.load upload ...``
    the same, sending to the ``blob`` server.
``python -m bench.load rtt --port P --count N [--size 64] [--interval S] [--samples]``
    round trips of ``size``-byte messages on one connection to an echo server (``--samples``:
    every round trip in ms too, for the charts).
``python -m bench.load setup --port P --count N [--delay S]``
    N fresh connections: connect, wait ``delay``, send one byte, read it back.
``python -m bench.load many --port P --count N``
    N simultaneous connections, each echoing 4 bytes.
``python -m bench.load churn --port P --count N [--wave W]``
    N connections in waves of W simultaneous ones (``many``, again and again).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

BLOCK = 1 << 20


def summary(values_ms: list[float]) -> dict[str, float]:
    """Median, p99 and max of a list of milliseconds."""
    ordered = sorted(values_ms)
    if not ordered:
        return {"median_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "count": 0}
    p99 = ordered[min(len(ordered) - 1, max(0, int(len(ordered) * 0.99) - 1))]
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(ordered[-1], 3),
        "count": len(ordered),
    }


def _connect(port: int, timeout: float = 60.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _download_one(port: int, count: int, rate: float | None, server_paced: bool = False) -> int:
    with _connect(port) as sock:
        if server_paced and rate:
            sock.sendall(b"P" + count.to_bytes(8, "big") + int(rate).to_bytes(8, "big"))
            rate = None
        else:
            sock.sendall(b"D" + count.to_bytes(8, "big"))
        received = 0
        start = time.perf_counter()
        buf = bytearray(BLOCK)
        while received < count:
            n = sock.recv_into(buf)
            if not n:
                break
            received += n
            if rate:
                ahead = received / rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
        return received


def _upload_one(port: int, count: int, rate: float | None) -> int:
    data = bytes(range(256)) * (65536 // 256)
    with _connect(port) as sock:
        sock.sendall(b"U" + count.to_bytes(8, "big"))
        sent = 0
        start = time.perf_counter()
        while sent < count:
            chunk = data[: min(len(data), count - sent)]
            sock.sendall(chunk)
            sent += len(chunk)
            if rate:
                ahead = sent / rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
        if sock.recv(1) != b"K":
            return 0
        return sent


def _parallel(fn: Callable[[], int], conns: int) -> tuple[int, float]:
    results: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        n = fn()
        with lock:
            results.append(n)

    threads = [threading.Thread(target=work) for _ in range(conns)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results), time.perf_counter() - start


def transfer(
    direction: str,
    port: int,
    total: int,
    conns: int,
    rate: float | None,
    server_paced: bool = False,
) -> dict[str, Any]:
    per = total // conns
    each = rate / conns if rate else None
    if direction == "download":
        done, seconds = _parallel(lambda: _download_one(port, per, each, server_paced), conns)
    else:
        done, seconds = _parallel(lambda: _upload_one(port, per, each), conns)
    return {
        "bytes": done,
        "expected": per * conns,
        "seconds": round(seconds, 3),
        "mb_per_s": round(done / seconds / 1e6, 2),
    }


def rtt(port: int, count: int, size: int, interval: float, samples: bool = False) -> dict[str, Any]:
    message = b"x" * size
    times = []
    with _connect(port) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise ConnectionError("echo connection closed")
                got += len(chunk)
            times.append((time.perf_counter() - start) * 1000)
            if interval:
                time.sleep(interval)
    result: dict[str, Any] = summary(times)
    if samples:
        result["samples_ms"] = [round(t, 4) for t in times]
    return result


def setup(port: int, count: int, delay: float) -> dict[str, Any]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(port) as sock:
            if delay:
                time.sleep(delay)
            sock.sendall(b"!")
            if sock.recv(1) != b"!":
                raise ConnectionError("no echo")
            times.append((time.perf_counter() - start - delay) * 1000)
    return summary(times)


def many(port: int, count: int) -> dict[str, Any]:
    start = time.perf_counter()
    socks = []
    try:
        for _ in range(count):
            socks.append(_connect(port))
        opened = time.perf_counter() - start
        for i, sock in enumerate(socks):
            sock.sendall(i.to_bytes(4, "big"))
        ok = 0
        for i, sock in enumerate(socks):
            got = b""
            while len(got) < 4:
                chunk = sock.recv(4 - len(got))
                if not chunk:
                    break
                got += chunk
            ok += got == i.to_bytes(4, "big")
        total = time.perf_counter() - start
    finally:
        for sock in socks:
            sock.close()
    return {"count": count, "ok": ok, "open_s": round(opened, 3), "total_s": round(total, 3)}


def churn(port: int, count: int, wave: int) -> dict[str, Any]:
    start = time.perf_counter()
    ok = 0
    for done in range(0, count, wave):
        ok += many(port, min(wave, count - done))["ok"]
    seconds = time.perf_counter() - start
    return {"count": count, "wave": wave, "ok": ok, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("kind", choices=["download", "upload", "rtt", "setup", "many", "churn"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=64 * BLOCK)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None, help="bytes per second in all")
    parser.add_argument("--server-paced", action="store_true", help="download: the server paces")
    parser.add_argument("--samples", action="store_true", help="rtt: every round trip too")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--wave", type=int, default=100)
    args = parser.parse_args(argv)
    if args.kind in ("download", "upload"):
        result = transfer(
            args.kind, args.port, args.bytes, args.conns, args.rate, args.server_paced
        )
    elif args.kind == "rtt":
        result = rtt(args.port, args.count, args.size, args.interval, args.samples)
    elif args.kind == "setup":
        result = setup(args.port, args.count, args.delay)
    elif args.kind == "churn":
        result = churn(args.port, args.count, args.wave)
    else:
        result = many(args.port, args.count)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
