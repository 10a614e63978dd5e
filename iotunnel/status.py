"""The status channel: what a proxy reports about itself to the process that started it.

A supervisor (the device agent) learns a child proxy's state here, never from its log lines:
it creates a pipe, passes the write end to the child (``pass_fds``) and names its number in
the child's environment, ``IOTUNNEL_STATUS_FD``. The child writes one JSON object per line;
a proxy started without that variable writes nothing. The schema, defined here once and
imported by both sides::

    {"event": "connected", "protocol": 3, "channel_id": "..."}     # null without one
    {"event": "services", "service_ids": ["SSH1", "HTTP1"]}
    {"event": "opened", "service_id": "SSH1", "connection": "SSH1/2/1"}
    {"event": "closed", "service_id": "SSH1", "connection": "SSH1/2/1",
     "bytes_in": 1200, "bytes_out": 5300, "duration": 4.25, "how": "local",
     "local": "127.0.0.1:22"}
    {"event": "reconnecting", "reason": "...", "delay": 1.5}
    {"event": "exit", "code": 0, "reason": "..."}

``bytes_in`` went from the tunnel to the local peer, ``bytes_out`` the other way; ``how`` is
``local`` (the local end closed), ``peer`` (the tunnel peer closed) or ``reset`` (the
tunnel's session ended); ``local`` is the local end: the address a destination connected to, or
the one a source listened on (``127.0.0.1:22``, ``[::1]:22``, a Unix socket's path), or null
when unknown. A ``connected``, a ``reconnecting`` and an ``exit`` mean that no
connection of before is open any more. Any line may carry ``"dropped": N``: the events the
writer dropped so far because the pipe was full.

A line is at most :data:`MAX_LINE` bytes, no more than ``PIPE_BUF``: a write of one line is
atomic, so a reader never sees half a line even when the writer drops events. A reader
ignores events it does not know (a newer child may report more) and fields it does not know.

The module is pure but for :class:`StatusWriter`, which owns the file descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iotunnel.boundedjson import JSONInputError, loads

__all__ = [
    "ENV_STATUS_FD",
    "MAX_LINE",
    "Closed",
    "Connected",
    "Event",
    "Exited",
    "LineSplitter",
    "Opened",
    "Reconnecting",
    "Services",
    "StatusError",
    "StatusWriter",
    "decode",
    "encode",
]

#: The environment variable that names the status pipe's file descriptor.
ENV_STATUS_FD = "IOTUNNEL_STATUS_FD"
#: The longest line, newline included (Linux's PIPE_BUF: a write this size is atomic).
MAX_LINE = 4096
#: (characters a string keeps, items a list keeps), tried in turn until the line fits.
_CUTS = ((512, 16), (64, 16), (16, 8))


@dataclass(frozen=True, slots=True)
class Connected:
    """The WebSocket to the tunnel service is up."""

    protocol: int  #: the negotiated protocol version (1, 2 or 3)
    channel_id: str | None = None


@dataclass(frozen=True, slots=True)
class Services:
    """The tunnel announced its service IDs (after every connect, V2 and later)."""

    service_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Opened:
    """A local connection is carried by the tunnel."""

    service_id: str
    connection: str  #: ``service/stream/connection``, unique while it is open


@dataclass(frozen=True, slots=True)
class Closed:
    """A local connection ended."""

    service_id: str
    connection: str
    bytes_in: int  #: tunnel -> local peer
    bytes_out: int  #: local peer -> tunnel
    duration: float  #: seconds it was open
    how: str  #: ``local``, ``peer`` or ``reset``
    local: str | None = None  #: the local endpoint (``127.0.0.1:22``), when known


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection to the tunnel service was lost or refused; the next try is in ``delay`` s."""

    reason: str
    delay: float


@dataclass(frozen=True, slots=True)
class Exited:
    """The proxy is about to exit with ``code``."""

    code: int
    reason: str


Event = Connected | Services | Opened | Closed | Reconnecting | Exited

_NAMES: dict[type[Any], str] = {
    Connected: "connected",
    Services: "services",
    Opened: "opened",
    Closed: "closed",
    Reconnecting: "reconnecting",
    Exited: "exit",
}


class StatusError(ValueError):
    """A line that is not a status event; the text never quotes the line."""


def encode(event: Event, *, dropped: int = 0) -> bytes:
    """One line of JSON, newline included, at most :data:`MAX_LINE` bytes (long texts are cut)."""
    for chars, items in _CUTS:
        line = _encode(event, dropped, chars, items)
        if len(line) <= MAX_LINE:
            return line
    raise AssertionError("the last cut keeps every event under PIPE_BUF")  # pragma: no cover


def _encode(event: Event, dropped: int, chars: int, items: int) -> bytes:
    def _text(value: str) -> str:
        return value if len(value) <= chars else value[: chars - 3] + "..."

    body: dict[str, Any] = {"event": _NAMES[type(event)]}
    match event:
        case Connected(protocol=protocol, channel_id=channel):
            body["protocol"] = protocol
            body["channel_id"] = None if channel is None else _text(channel)
        case Services(service_ids=ids):
            body["service_ids"] = [_text(i) for i in ids[:items]]
        case Opened(service_id=service, connection=conn):
            body |= {"service_id": _text(service), "connection": _text(conn)}
        case Closed():
            body |= {
                "service_id": _text(event.service_id),
                "connection": _text(event.connection),
                "bytes_in": event.bytes_in,
                "bytes_out": event.bytes_out,
                "duration": round(event.duration, 3),
                "how": event.how,
                "local": None if event.local is None else _text(event.local),
            }
        case Reconnecting(reason=reason, delay=delay):
            body |= {"reason": _text(reason), "delay": round(delay, 3)}
        case Exited(code=code, reason=reason):
            body |= {"code": code, "reason": _text(reason)}
    if dropped:
        body["dropped"] = dropped
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def _field(body: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    value = body.get(name)
    # bool is an int to isinstance, and not a count; a float field takes an int too.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise StatusError(f"field {name!r} is not a {kind.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise StatusError(f"field {name!r} is not finite")
    return value


def _optional_text(body: Mapping[str, Any], name: str) -> str | None:
    return None if body.get(name) is None else str(_field(body, name, str))


def decode(line: bytes) -> tuple[Event | None, int]:
    """``(event, dropped)`` of one line (newline optional); ``event`` is ``None`` for an event
    type this version does not know.

    Raises:
        StatusError: not JSON, not an object, a known event with a missing or mistyped field.
    """
    try:
        body = loads(line, max_bytes=MAX_LINE, max_depth=2)
    except JSONInputError as exc:
        raise StatusError(str(exc)) from None
    if not isinstance(body, dict):
        raise StatusError("not a JSON object")
    name = _field(body, "event", str)
    dropped = _field(body, "dropped", int) if "dropped" in body else 0
    event: Event
    if name == "connected":
        event = Connected(_field(body, "protocol", int), _optional_text(body, "channel_id"))
    elif name == "services":
        ids = _field(body, "service_ids", list)
        if not all(isinstance(i, str) for i in ids):
            raise StatusError("field 'service_ids' is not a list of strings")
        event = Services(tuple(ids))
    elif name == "opened":
        event = Opened(_field(body, "service_id", str), _field(body, "connection", str))
    elif name == "closed":
        event = Closed(
            _field(body, "service_id", str),
            _field(body, "connection", str),
            _field(body, "bytes_in", int),
            _field(body, "bytes_out", int),
            _field(body, "duration", float),
            _field(body, "how", str),
            _optional_text(body, "local"),
        )
    elif name == "reconnecting":
        event = Reconnecting(_field(body, "reason", str), _field(body, "delay", float))
    elif name == "exit":
        event = Exited(_field(body, "code", int), _field(body, "reason", str))
    else:
        return None, dropped
    return event, dropped


class LineSplitter:
    """Cuts a byte stream into lines of at most :data:`MAX_LINE` bytes.

    A longer line is skipped up to its newline, counted in :attr:`oversized` and stands as
    ``None`` among the lines; memory stays bounded whatever the stream holds.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._skipping = False
        self.oversized = 0

    def feed(self, data: bytes) -> list[bytes | None]:
        """The complete lines in ``data`` and what came before it, without their newlines."""
        lines: list[bytes | None] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) >= self._limit:
                    if not self._skipping:
                        self.oversized += 1
                        lines.append(None)
                    self._skipping = True
                    self._buffer.clear()
                return lines
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) >= self._limit:
                self.oversized += 1
                lines.append(None)
            else:
                lines.append(line)


class StatusWriter:
    """Writes events to the status pipe without ever blocking.

    The descriptor is made non-blocking: an event that does not fit in the pipe now is dropped
    and counted (:attr:`dropped`), and the next one that goes out carries the count. A reader
    that went away ends the reports. A writer without a descriptor does nothing.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self.dropped = 0
        if fd is not None:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> tuple[StatusWriter, str | None]:
        """The writer ``IOTUNNEL_STATUS_FD`` names, and a problem to log when it names none
        usable (the proxy then runs without reporting)."""
        text = environ.get(ENV_STATUS_FD)
        if text is None:
            return cls(None), None
        problem = f"{ENV_STATUS_FD}={text[:20]!r} is not an open pipe; no status reports"
        if not text.isdigit() or int(text) <= 2:
            return cls(None), problem
        try:
            if not stat.S_ISFIFO(os.fstat(int(text)).st_mode):
                return cls(None), problem
        except OSError:
            return cls(None), problem
        return cls(int(text)), None

    @property
    def enabled(self) -> bool:
        """Whether events go anywhere."""
        return self._fd is not None

    def emit(self, event: Event) -> bool:
        """Write one event now or drop it; True when it was written."""
        if self._fd is None:
            return False
        line = encode(event, dropped=self.dropped)
        try:
            os.write(self._fd, line)  # at most PIPE_BUF bytes: all or nothing
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError as exc:  # EPIPE: nobody reads any more
            if exc.errno != errno.EPIPE:
                self.dropped += 1
                return False
            self.close()
            return False
        return True

    def close(self) -> None:
        """Close the descriptor; later events are ignored."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
