"""Real clients for the end-to-end tests: HTTP over http.client, raw TCP byte streams."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time


def http_get(
    port: int, path: str, *, timeout: float = 20.0, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on its own connection; returns status and body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def echo_roundtrips(
    port: int, count: int, *, size: int = 64, timeout: float = 20.0, host: str = "127.0.0.1"
) -> int:
    """Interactive use of an echo service: ``count`` request/response pairs on one connection."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            message = (f"{i:08d}".encode() * (size // 8 + 1))[:size]
            sock.sendall(message)
            received = recv_exactly(sock, size)
            assert received == message, f"round trip {i}: got {received[:32]!r}"
    return count


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {remaining} of {size} bytes missing")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def pattern_block(index: int, size: int = 1 << 20) -> bytes:
    """Deterministic, non-repeating-looking test data."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def echo_transfer(port: int, total: int, *, timeout: float = 120.0) -> tuple[str, str]:
    """Send ``total`` bytes through an echo service while reading them back concurrently.

    Returns the SHA-256 of what was sent and of what came back.
    """
    sent_hash = hashlib.sha256()
    received_hash = hashlib.sha256()
    block = 1 << 20
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                for i in range(total // block):
                    data = pattern_block(i, block)
                    sent_hash.update(data)
                    sock.sendall(data)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        received = 0
        expected = (total // block) * block
        while received < expected:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received_hash.update(chunk)
            received += len(chunk)
        thread.join(timeout)
        if failure:
            raise failure[0]
        assert received == expected, f"received {received} of {expected} bytes"
    return sent_hash.hexdigest(), received_hash.hexdigest()


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the peer closes; returns what arrived."""
    sock.settimeout(timeout)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)
