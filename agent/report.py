"""What the agent reports about its tunnels: audit lines, the status file, the STATUS= line.

- **The audit line**: one record per local connection when it closes, from the proxy's
  ``closed`` status event (:func:`audit_record`), e.g. ``SSH1 connection 2/1 to
  127.0.0.1:22 closed (peer): 5.2 KiB in, 310 KiB out, 00:12:31``, with the journal fields
  ``IOTUNNEL_EVENT=connection-closed``, ``SERVICE_ID``, ``CONNECTION``, ``LOCAL_ENDPOINT``,
  ``BYTES_IN`` (tunnel -> local service), ``BYTES_OUT``, ``DURATION_S``, ``CLOSED_BY`` (and
  ``TUNNEL``, as every record of a tunnel).
- **The status file**: ``status.json`` in ``state_dir``, a :class:`Snapshot` of the running
  agent (its pid, MQTT, each tunnel's services, start, open connections, bytes, last error;
  never a token), written atomically (a temporary file renamed over it) when something changed,
  at most about once a second, and removed when the agent stops. ``iotunnel-agent status``
  reads it (:func:`status_command`). Why a file and not a socket: the agent serves nothing (no
  listener to secure, no request that could stall its loop), the reader needs only read access
  to the state directory, and a hung agent still leaves its last state to read. It is not
  ``fsync``-ed: after a power cut a stale or missing file only says less; the pid in it (and
  that process's start time) tells a live agent from a stale file. The resume files
  (``tunnel-*.json``, :mod:`agent.state`) are other files; their loader ignores this one.
- **The STATUS= line** of ``systemctl status`` is :func:`status_line` of the same snapshot,
  and the first line of ``iotunnel-agent status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from iotunnel.boundedjson import JSONInputError, loads
from iotunnel.status import Closed

__all__ = [
    "EXIT_NOT_RUNNING",
    "EXIT_UNKNOWN",
    "STATUS_FILE",
    "Snapshot",
    "TunnelReport",
    "audit_record",
    "human_bytes",
    "human_duration",
    "process_start",
    "read_snapshot",
    "remove_snapshot",
    "render_table",
    "status_command",
    "status_line",
    "write_snapshot",
]

#: The status file's name in ``state_dir``.
STATUS_FILE = "status.json"
_TEMP = ".status.json.tmp"
_VERSION = 1
_MAX_FILE = 256 * 1024
#: ``iotunnel-agent status`` exits: as ``systemctl status`` (LSB: 3 not running, 4 unknown).
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4


def human_bytes(count: int) -> str:
    """``310 B``, ``5.2 KiB``, ``310 KiB``, ``1.5 MiB``."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def human_duration(seconds: float) -> str:
    """``00:12:31`` (hours grow past 99 if they must)."""
    whole = max(0, int(seconds))
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def audit_record(closed: Closed) -> tuple[str, dict[str, str]]:
    """The audit line of a closed connection and its journal fields (the tag is added by the
    record's ``tunnel`` attribute)."""
    number = closed.connection.removeprefix(f"{closed.service_id}/")
    local = closed.local or "an unknown endpoint"
    message = (
        f"{closed.service_id} connection {number} to {local} closed ({closed.how}): "
        f"{human_bytes(closed.bytes_in)} in, {human_bytes(closed.bytes_out)} out, "
        f"{human_duration(closed.duration)}"
    )
    fields = {
        "IOTUNNEL_EVENT": "connection-closed",
        "SERVICE_ID": closed.service_id,
        "CONNECTION": closed.connection,
        "LOCAL_ENDPOINT": closed.local or "",
        "BYTES_IN": str(closed.bytes_in),
        "BYTES_OUT": str(closed.bytes_out),
        "DURATION_S": f"{closed.duration:.3f}",
        "CLOSED_BY": closed.how,
    }
    return message, fields


@dataclass(frozen=True, slots=True)
class TunnelReport:
    """One tunnel in the snapshot."""

    tag: str
    services: tuple[str, ...]
    since: float  #: when the tunnel started (seconds since the epoch)
    state: str  #: ``connecting``, ``connected``, ``reconnecting``, ``restarting``, ``stopping``
    open: int  #: open local connections
    closed: int  #: local connections that ended
    bytes_in: int  #: tunnel -> local services, of the connections that ended
    bytes_out: int  #: local services -> tunnel, of the connections that ended
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The running agent, as ``status.json`` holds it."""

    pid: int
    pid_start: int | None  #: the process's start time (/proc), to tell a reused pid
    started: float  #: when the agent started (seconds since the epoch)
    updated: float
    mqtt: str
    tunnels: tuple[TunnelReport, ...]

    @property
    def active(self) -> int:
        """Tunnels that count against ``max_tunnels`` (not stopping)."""
        return sum(1 for t in self.tunnels if t.state != "stopping")

    @property
    def streams(self) -> int:
        """Open local connections, all tunnels."""
        return sum(t.open for t in self.tunnels)


def status_line(snapshot: Snapshot) -> str:
    """The one-line summary: systemd's ``STATUS=`` and the status command's first line."""
    tunnels, streams = snapshot.active, snapshot.streams
    return (
        f"MQTT {snapshot.mqtt}; {tunnels} tunnel{'' if tunnels == 1 else 's'}, "
        f"{streams} stream{'' if streams == 1 else 's'}"
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def render_table(snapshot: Snapshot) -> str:
    """What ``iotunnel-agent status`` prints for a running agent."""
    lines = [
        f"iotunnel-agent running (pid {snapshot.pid}, since {_when(snapshot.started)}): "
        f"{status_line(snapshot)}"
    ]
    if not snapshot.tunnels:
        return "\n".join(lines) + "\n"
    header = ("TUNNEL", "SERVICES", "SINCE", "STATE", "OPEN", "CLOSED", "IN", "OUT", "LAST ERROR")
    rows = [header] + [
        (
            t.tag,
            ",".join(t.services),
            _when(t.since),
            t.state,
            str(t.open),
            str(t.closed),
            human_bytes(t.bytes_in),
            human_bytes(t.bytes_out),
            t.last_error or "-",
        )
        for t in snapshot.tunnels
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def to_document(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as JSON-ready data."""
    document = asdict(snapshot)
    document["version"] = _VERSION
    return document


def _snapshot(document: object) -> Snapshot:
    """The snapshot of a parsed status file; ValueError (never quoting it) when it is not one."""
    if not isinstance(document, dict) or document.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} status file")
    try:
        tunnels = tuple(
            TunnelReport(
                tag=str(t["tag"]),
                services=tuple(str(s) for s in t["services"]),
                since=float(t["since"]),
                state=str(t["state"]),
                open=int(t["open"]),
                closed=int(t["closed"]),
                bytes_in=int(t["bytes_in"]),
                bytes_out=int(t["bytes_out"]),
                last_error=None if t["last_error"] is None else str(t["last_error"]),
            )
            for t in document["tunnels"]
        )
        pid_start = document["pid_start"]
        return Snapshot(
            pid=int(document["pid"]),
            pid_start=None if pid_start is None else int(pid_start),
            started=float(document["started"]),
            updated=float(document["updated"]),
            mqtt=str(document["mqtt"]),
            tunnels=tunnels,
        )
    except (KeyError, TypeError, ValueError):
        raise ValueError("a field is missing or of the wrong type") from None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot, /proc), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(snapshot: Snapshot) -> bool:
    """Whether the process that wrote ``snapshot`` still runs (not a reused pid)."""
    try:
        os.kill(snapshot.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    if snapshot.pid_start is not None:
        start = process_start(snapshot.pid)
        return start is None or start == snapshot.pid_start
    return True


def write_snapshot(directory: Path, snapshot: Snapshot) -> None:
    """Write ``status.json`` atomically, mode 0600.

    Raises:
        OSError: it could not be written.
    """
    temp, final = directory / _TEMP, directory / STATUS_FILE
    data = json.dumps(to_document(snapshot), separators=(",", ":")).encode() + b"\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(temp, final)


def remove_snapshot(directory: Path) -> None:
    """Remove ``status.json`` (the agent stopped); a missing one is fine."""
    for name in (STATUS_FILE, _TEMP):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def read_snapshot(directory: Path) -> Snapshot | None:
    """The snapshot in ``directory``, or ``None`` when there is none.

    Raises:
        OSError: it cannot be read.
        ValueError: it is not a status file (the message never quotes it).
    """
    path = directory / STATUS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    try:
        document = loads(data, max_bytes=_MAX_FILE, max_depth=4)
    except JSONInputError as exc:
        raise ValueError(str(exc)) from None
    return _snapshot(document)


def status_command(directory: Path, *, as_json: bool, out: TextIO) -> int:
    """``iotunnel-agent status``: the table (or JSON) of the agent whose state is in
    ``directory``; exit 0 when it runs, 3 when it does not, 4 when that cannot be told."""
    path = directory / STATUS_FILE
    try:
        snapshot = read_snapshot(directory)
    except OSError as exc:
        out.write(f"iotunnel-agent: cannot read {path}: {exc.strerror or exc}\n")
        return EXIT_UNKNOWN
    except ValueError as exc:
        out.write(f"iotunnel-agent: {path}: {exc}\n")
        return EXIT_UNKNOWN
    if snapshot is None or not alive(snapshot):
        why = (
            f"no {path}"
            if snapshot is None
            else f"{path} is left from pid {snapshot.pid}, which has exited"
        )
        if as_json:
            out.write(json.dumps({"running": False, "reason": why}) + "\n")
        else:
            out.write(f"iotunnel-agent is not running ({why})\n")
        return EXIT_NOT_RUNNING
    if as_json:
        document: Mapping[str, Any] = {"running": True, **to_document(snapshot)}
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        out.write(render_table(snapshot))
    return 0
