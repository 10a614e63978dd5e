"""journald's native protocol: structured records with fields, for the agent and its proxies.

Lines on stderr reach journald as text only; fields such as ``TUNNEL=t3`` (so that
``journalctl -u iotunnel-agent TUNNEL=t3`` works) need the native protocol, which systemd
documents ("Native Journal Protocol"): one ``AF_UNIX`` datagram per record to
``/run/systemd/journal/socket``, holding ``KEY=value`` lines; a value with a newline in it is
``KEY``, a newline, its length as a 64-bit little-endian integer, the value and a newline. A
record too large for one datagram goes in a sealed memfd whose descriptor is the datagram's only
content. Field names are upper-case letters, digits and underscores, not starting with ``_``.

It is used only when stderr *is* the journal: systemd then sets ``JOURNAL_STREAM`` to the device
and inode of the stream it connected to stderr (:func:`stream_is_journal`). Without journald the
project writes lines on stderr as before.

Pure but for :class:`JournalSocket`; blocking like a write to stderr; no asyncio.

Why not ``systemd-python`` (Debian's ``python3-systemd``): PyPI has no wheel of it, only a
source archive that builds a C extension against libsystemd's headers, and the .deb vendors
hash-pinned wheels only (packaging/lock.py); what the project needs of it, sending one record,
is the protocol below.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_SOCKET",
    "ENV_SOCKET",
    "JournalSocket",
    "encode",
    "stream_is_journal",
    "valid_field_name",
]

#: Where journald listens for native records.
DEFAULT_SOCKET = "/run/systemd/journal/socket"
#: Another socket (tests); passed on to the proxies the agent starts.
ENV_SOCKET = "IOTUNNEL_JOURNAL_SOCKET"
_FIELD_RE = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def valid_field_name(name: str) -> bool:
    """A field name journald takes from a client (no leading ``_``: those are trusted fields)."""
    return _FIELD_RE.fullmatch(name) is not None


def stream_is_journal(environ: Mapping[str, str], fd: int) -> bool:
    """Whether ``fd`` is the journal stream systemd named in ``JOURNAL_STREAM`` (``dev:inode``),
    as systemd.exec(5) says to check: a redirected stderr is not the journal any more."""
    text = environ.get("JOURNAL_STREAM", "")
    device, _, inode = text.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """One native record of ``(name, value)`` pairs.

    Raises:
        ValueError: a field name journald would reject.
    """
    out = bytearray()
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(f"not a journal field name: {name[:70]!r}")
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSocket:
    """A client of journald's native socket.

    Args:
        path: The socket; :data:`DEFAULT_SOCKET` when ``None``.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or DEFAULT_SOCKET
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Iterable[tuple[str, str]]) -> None:
        """Send one record (in a memfd when it is too large for a datagram).

        Raises:
            OSError: journald is not there or did not take it.
            ValueError: a bad field name.
        """
        record = encode(fields)
        try:
            self._sock.sendto(record, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(record)

    def _send_memfd(self, record: bytes) -> None:
        fd = os.memfd_create("iotunnel-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
