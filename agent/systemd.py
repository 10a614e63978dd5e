"""A dependency-free ``sd_notify`` client: READY, STATUS, WATCHDOG and STOPPING.

systemd passes ``NOTIFY_SOCKET`` (an ``AF_UNIX`` datagram socket; a leading ``@`` means the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.
:meth:`Notifier.from_environ` takes these variables *out* of the environment it is given, so
that no child process inherits them and speaks for the agent. Without ``NOTIFY_SOCKET`` every
method is a no-op. Sending never blocks the event loop: a datagram that cannot go at once is
dropped.

Why not the ``sdnotify`` package (0.3.2, its latest release): PyPI has no wheel of it, only a
source archive whose ``setup.py`` imports ``distutils``, and the .deb vendors hash-pinned wheels
only (packaging/lock.py), so it could not ship without building it at package time with an
unpinned build backend. Its socket is blocking, so a notification queue that systemd does not
drain would stall the event loop that the watchdog pings are meant to vouch for; when
``NOTIFY_SOCKET`` is unset it leaves an unclosed socket behind (a ``ResourceWarning``); and it
swallows every exception with a bare ``except:``. What it does, one ``sendto`` on an
``AF_UNIX`` datagram socket with ``@`` read as the abstract namespace, is the few lines below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

__all__ = ["ENV_VARIABLES", "Notifier", "watchdog_pings"]

log = logging.getLogger("agent")

#: The variables systemd gives a ``Type=notify`` service; none of them reaches a child.
ENV_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Talks to systemd's notification socket, or does nothing when there is none.

    Args:
        address: The ``NOTIFY_SOCKET`` value, or ``None``.
        watchdog_usec: The watchdog timeout in microseconds, or ``None`` when not watched.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._socket: socket.socket | None = None
        self._address = ""
        self.watchdog_usec = watchdog_usec
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], pid: int | None = None) -> Notifier:
        """Take systemd's variables out of ``environ`` and make a notifier of them.

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is absent or is ``pid`` (this
        process), as sd_watchdog_enabled(3) says.
        """
        address = environ.pop("NOTIFY_SOCKET", None)
        usec_text = environ.pop("WATCHDOG_USEC", None)
        pid_text = environ.pop("WATCHDOG_PID", None)
        own = os.getpid() if pid is None else pid
        usec: int | None = None
        ours = pid_text is None or (pid_text.isdigit() and int(pid_text) == own)
        if ours and usec_text and usec_text.isdigit() and int(usec_text) > 0:
            usec = int(usec_text)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to talk to."""
        return self._socket is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the timeout), or ``None`` when not watched."""
        if self._socket is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it went out."""
        if self._socket is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            log.debug("cannot notify systemd: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """The service is up: ``READY=1`` with a status line."""
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A one-line summary that ``systemctl status`` shows."""
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """The service is shutting down."""
        return self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def watchdog_pings(notifier: Notifier) -> None:
    """Send ``WATCHDOG=1`` every half watchdog period, from the event loop, forever.

    The pings come from a task on the loop and from nothing else, so they stop as soon as the
    loop stops running callbacks on time (a blocking call, a busy loop): systemd then kills and
    restarts the agent. They do not depend on the network: losing the broker is not a reason
    to be restarted. Returns at once when there is no watchdog.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
