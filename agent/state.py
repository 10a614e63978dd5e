"""Running tunnels kept on disk, so that a restarted (or upgraded, or crashed) agent resumes them.

One file per tunnel in the state directory (``state_dir``, ``/var/lib/iotunnel``, the unit's
``StateDirectory=``, mode 0700): ``tunnel-<tag>.json``, mode 0600, holding what the
notification said (access token, region, services), the client token the agent made for the
tunnel, and when the tunnel started. A restarted agent starts a destination proxy with the same
access token and client token: the tunnel service admits a reconnect with the client token the
access token is bound to, so the operator's source proxy reconnects its local users without a
new tunnel. These files are the only place the agent writes a token to disk.

A file is written atomically: a temporary file created with ``O_EXCL`` and mode 0600 from the
start (never readable by anyone else, not even for a moment), written, ``fsync``-ed, renamed
over the final name, and the directory ``fsync``-ed. It is removed when the tunnel ends (the
service closed it, refused its token, or its proxy was given up).

Reading is the boundary: every file is read through :func:`iotunnel.boundedjson.loads` and the
notification's own checks (:func:`iotunnel.notify.parse`, against today's mapping directory). A
file that cannot be read is skipped (and kept); one that is not a valid tunnel is removed. Each
problem is one line that names the file, never its content.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from iotunnel.boundedjson import JSONInputError, loads
from iotunnel.notify import MAX_DEPTH, MAX_PAYLOAD, Notification, Rejection, parse
from iotunnel.secret import Secret

__all__ = ["FORMAT_VERSION", "TAG_RE", "Loaded", "SavedTunnel", "StateStore"]

#: The version of the file format; a file of another version is not resumed.
FORMAT_VERSION = 1
#: A tunnel's tag, as the supervisor makes them.
TAG_RE = re.compile(r"t[1-9][0-9]{0,8}")
_FILE_RE = re.compile(r"tunnel-(t[1-9][0-9]{0,8})\.json")
_TEMP_RE = re.compile(r"\.tunnel-t[1-9][0-9]{0,8}\.json\.[0-9a-f]{16}\.tmp")
#: The client token format the tunnel service accepts.
_CLIENT_TOKEN_RE = re.compile(r"[a-zA-Z0-9-]{32,128}")
#: A file holds a notification (at most :data:`~iotunnel.notify.MAX_PAYLOAD` bytes) and a little
#: more; larger ones are not read.
_MAX_FILE = MAX_PAYLOAD + 1024
_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True, slots=True)
class SavedTunnel:
    """A tunnel read back from its file."""

    tag: str
    notification: Notification
    client_token: Secret
    since: float  #: when the tunnel started (seconds since the epoch)


@dataclass(slots=True)
class Loaded:
    """What :meth:`StateStore.load` found."""

    #: the valid tunnels, oldest first
    tunnels: list[SavedTunnel] = field(default_factory=list)
    #: one line per file that was skipped or removed (no token in it)
    problems: list[str] = field(default_factory=list)


class StateStore:
    """The tunnel files of one state directory.

    Args:
        directory: The state directory (``state_dir``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, tag: str) -> Path:
        """The file of the tunnel ``tag``."""
        if not TAG_RE.fullmatch(tag):
            raise ValueError(f"not a tunnel tag: {tag!r}")
        return self.directory / f"tunnel-{tag}.json"

    def prepare(self) -> None:
        """Create the directory (mode 0700) when it does not exist.

        Raises:
            OSError: It cannot be created, or it is not a writable directory.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")

    def save(
        self, tag: str, notification: Notification, client_token: Secret, since: float
    ) -> None:
        """Write the tunnel's file atomically (see the module docstring).

        Raises:
            OSError: It could not be written; no temporary file is left behind.
        """
        document = {
            "version": FORMAT_VERSION,
            "clientAccessToken": notification.token.reveal(),
            "clientMode": "destination",
            "region": notification.region,
            "services": list(notification.services),
            "clientToken": client_token.reveal(),
            "since": since,
        }
        data = json.dumps(document).encode()
        final = self.path(tag)
        temp = self.directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        self._sync_directory()

    def remove(self, tag: str) -> None:
        """Remove the tunnel's file, if it is there.

        Raises:
            OSError: It is there and could not be removed.
        """
        with contextlib.suppress(FileNotFoundError):
            self.path(tag).unlink()

    def load(self, mapped: Collection[str], *, mapping_dir: str = "") -> Loaded:
        """Read every tunnel file; remove the invalid ones and the leftovers of interrupted
        writes.

        Args:
            mapped: The service IDs the mapping directory maps today.
            mapping_dir: Its name, for the messages.
        """
        loaded = Loaded()
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return loaded
        except OSError as exc:
            loaded.problems.append(
                f"cannot list the state directory {self.directory}: {exc.strerror or exc}"
            )
            return loaded
        for name in names:
            if _TEMP_RE.fullmatch(name):  # an interrupted write: never renamed into place
                with contextlib.suppress(OSError):
                    (self.directory / name).unlink()
                continue
            match = _FILE_RE.fullmatch(name)
            if match is None:
                continue
            result = self._read(match[1], mapped, mapping_dir)
            if isinstance(result, SavedTunnel):
                loaded.tunnels.append(result)
            else:
                loaded.problems.append(f"state file {self.directory / name}: {result}")
        loaded.tunnels.sort(key=lambda t: (t.since, int(t.tag[1:])))
        return loaded

    # ------------------------------------------------------------------ internals

    def _read(self, tag: str, mapped: Collection[str], mapping_dir: str) -> SavedTunnel | str:
        """The tunnel of one file, or the problem (the file was skipped or removed)."""
        path = self.path(tag)
        try:
            # Non-blocking: a FIFO in its place must not hang the start.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}; skipped"
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            data = os.read(fd, _MAX_FILE + 1) if regular else b""
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}; skipped"
        finally:
            os.close(fd)
        result = self._check(tag, data, mapped, mapping_dir) if regular else "not a regular file"
        if isinstance(result, SavedTunnel):
            return result
        try:
            path.unlink()
        except OSError as exc:
            return f"{result}; cannot remove it: {exc.strerror or exc}"
        return f"{result}; removed"

    @staticmethod
    def _check(
        tag: str, data: bytes, mapped: Collection[str], mapping_dir: str
    ) -> SavedTunnel | str:
        try:
            document = loads(data, max_bytes=_MAX_FILE, max_depth=MAX_DEPTH)
        except JSONInputError as exc:  # its text never quotes the input
            return f"malformed JSON: {exc}"
        except ValueError:  # json.loads: an integer of more than 4300 digits
            return "malformed JSON: a number too long"
        if not isinstance(document, dict):
            return "not a JSON object"
        if document.get("version") != FORMAT_VERSION:
            return f"not a version {FORMAT_VERSION} tunnel file"
        client_token = document.get("clientToken")
        if not isinstance(client_token, str) or not _CLIENT_TOKEN_RE.fullmatch(client_token):
            return f"no clientToken matching {_CLIENT_TOKEN_RE.pattern}"
        since = document.get("since")
        if isinstance(since, bool) or not isinstance(since, int | float) or since < 0:
            return "no since (a time in seconds)"
        notification = parse(data, mapped, mapping_dir=mapping_dir)
        if isinstance(notification, Rejection):
            return notification.reason
        return SavedTunnel(tag, notification, Secret(client_token), float(since))

    def _sync_directory(self) -> None:
        """Make the rename durable (a crash right after must not lose the file)."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
