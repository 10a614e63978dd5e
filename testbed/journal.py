"""A stand-in for journald's native socket: collects the records sent to it, parsed.

It reads records as journald does, independently of :mod:`iotunnel.journal`: ``KEY=value``
lines, the binary form (``KEY``, newline, 64-bit little-endian length, value, newline) and a
memfd passed as the datagram's only content.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["FakeJournal", "parse_record"]


def parse_record(data: bytes) -> dict[str, str]:
    """The fields of one native record."""
    fields: dict[str, str] = {}
    while data:
        end = data.index(b"\n")
        head = data[:end]
        if b"=" in head:
            name, _, value = head.partition(b"=")
            data = data[end + 1 :]
        else:
            name = head
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            if data[end + 9 + size : end + 10 + size] != b"\n":
                raise ValueError("a binary field without its newline")
            data = data[end + 10 + size :]
        fields[name.decode()] = value.decode()
    return fields


class FakeJournal:
    """Binds ``path`` and collects every record sent there, in a thread, until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.records: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    (fd,) = struct.unpack("i", payload[:4])
                    try:
                        data = os.pread(fd, 64 << 20, 0)
                    finally:
                        os.close(fd)
            record = parse_record(data)
            with self._lock:
                self.records.append(record)

    def seen(self) -> list[dict[str, str]]:
        """The records so far."""
        with self._lock:
            return list(self.records)

    def wait_for(
        self,
        predicate: Callable[[list[dict[str, str]]], bool],
        what: str,
        timeout: float = 30.0,
    ) -> list[dict[str, str]]:
        """Wait until ``predicate(records)``; returns the records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.seen()
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                messages = [r.get("MESSAGE") for r in records[-30:]]
                raise AssertionError(f"no {what} in the journal within {timeout} s: {messages}")
            time.sleep(0.05)

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()
