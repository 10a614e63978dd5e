"""Pure policy: which destination proxies run, given notifications and child exits.

The :class:`Supervisor` does no I/O and reads no clock: the daemon feeds it events (a new
notification, a child's exit with its exit code and uptime, a restart timer that fired,
shutdown) and carries out the :data:`Action` list each call returns, in order.

One notification, one tunnel, one child proxy. The rules:

- an exact duplicate of a recent notification (all four fields equal: QoS 1 redelivery) is
  ignored; a tunnel resumed after a restart (:meth:`Supervisor.resumed`) counts as notified,
  so that the broker's redelivery of its notification to the persistent session is a
  duplicate too;
- every other notification is a tunnel of its own, even when it names the same services as a
  running one: a notification carries no tunnel id, so two operators' tunnels to the same
  services cannot be told from a token rotation, and a running tunnel is never stopped because
  of another notification. A rotation ends the old proxy from the service's side: the service
  closes the old token's connection (code 1000) and the old proxy exits 0;
- at most ``max_tunnels`` tunnels run at once; a notification beyond that is refused (a
  rotation's notification too, when it arrives before the old proxy has exited);
- a child that exits 0 (the service closed the tunnel), 3 (the handshake was refused: bad,
  used or expired token) or 2 (configuration error) is not restarted: that tunnel is over;
- any other exit (1, 4, a signal) is a crash: the child is started again after a jittered
  exponential backoff, with the same access and client tokens, up to ``max_restarts`` times
  in a row. A child that ran for ``stable_after`` seconds resets the count.

Per tunnel (a notification only ever adds a tunnel: it moves no other one)::

    RUNNING --crash--> WAITING --restart due--> RUNNING
    RUNNING --exit 0/2/3, or too many crashes--> (gone)
    RUNNING --shutdown--> STOPPING --exit--> (gone)
    WAITING --shutdown--> (gone)
"""

from __future__ import annotations

import enum
import logging
import random
import secrets
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from iotunnel.exits import ExitCode
from iotunnel.notify import Notification
from iotunnel.secret import Secret

__all__ = [
    "Action",
    "CancelRestart",
    "Log",
    "ScheduleRestart",
    "StartProxy",
    "State",
    "StopProxy",
    "Supervisor",
    "describe_exit",
]

#: The proxy's exits after which a restart cannot help, and what they mean for the tunnel.
_FINAL_EXITS: dict[int, tuple[int, str]] = {
    ExitCode.CLOSED: (logging.INFO, "the tunnel was closed by the service"),
    ExitCode.REFUSED: (logging.WARNING, "the tunnel service refused the token"),
    ExitCode.CONFIG: (logging.ERROR, "the proxy cannot serve this tunnel with the local mappings"),
}


class State(enum.Enum):
    """Where one tunnel's proxy is."""

    RUNNING = "running"  #: a child process runs (or is being started)
    WAITING = "waiting"  #: the child crashed; a restart is scheduled
    STOPPING = "stopping"  #: the child was asked to stop; waiting for its exit


@dataclass(frozen=True, slots=True)
class StartProxy:
    """Start a destination proxy for ``notification`` with these tokens; tag its output."""

    tag: str
    notification: Notification
    client_token: Secret
    attempt: int  #: 0 for the first start, then the restart number


@dataclass(frozen=True, slots=True)
class StopProxy:
    """Ask the tunnel's child to stop (SIGTERM); its exit is reported as usual."""

    tag: str


@dataclass(frozen=True, slots=True)
class ScheduleRestart:
    """Report :meth:`Supervisor.restart_due` for ``tag`` after ``delay`` seconds."""

    tag: str
    delay: float


@dataclass(frozen=True, slots=True)
class CancelRestart:
    """Forget the restart timer of ``tag``."""

    tag: str


@dataclass(frozen=True, slots=True)
class Log:
    """Log ``message`` at ``level``, tagged with the tunnel's tag when there is one."""

    level: int
    message: str
    tag: str | None = None


Action = StartProxy | StopProxy | ScheduleRestart | CancelRestart | Log


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``signal SIGKILL`` (asyncio reports a signal as a negative code)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass(slots=True)
class _Tunnel:
    tag: str
    notification: Notification
    client_token: Secret
    state: State = State.RUNNING
    crashes: int = 0  #: in a row


class Supervisor:
    """The policy; see the module docstring.

    Args:
        max_tunnels: Tunnels that may run at once.
        max_restarts: Restarts in a row before a crashing proxy is given up.
        backoff_base: The first restart delay in seconds, doubled after each crash in a row.
        backoff_cap: The longest restart delay in seconds.
        stable_after: Seconds of uptime after which a crash counts as the first in a row.
        remember: How many notification fingerprints are kept to detect duplicates.
        rand: ``rand(a, b)`` -> a number in ``[a, b]``: the jitter.
        new_client_token: Makes the client token of a new tunnel (``[a-zA-Z0-9-]{32,128}``).
    """

    def __init__(
        self,
        max_tunnels: int,
        *,
        max_restarts: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        stable_after: float = 60.0,
        remember: int = 64,
        rand: Callable[[float, float], float] = random.uniform,
        new_client_token: Callable[[], str] = lambda: secrets.token_hex(32),
    ) -> None:
        self.max_tunnels = max_tunnels
        self.max_restarts = max_restarts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after
        self._remember = remember
        self._rand = rand
        self._new_client_token = new_client_token
        self._tunnels: dict[str, _Tunnel] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._counter = 0
        self.shutting_down = False

    # ------------------------------------------------------------------ queries

    def state(self, tag: str) -> State | None:
        """The state of a tunnel, or ``None`` when it is gone."""
        tunnel = self._tunnels.get(tag)
        return None if tunnel is None else tunnel.state

    @property
    def active(self) -> int:
        """Tunnels that count against the limit (running or waiting for a restart)."""
        return sum(1 for t in self._tunnels.values() if t.state is not State.STOPPING)

    @property
    def idle(self) -> bool:
        """No tunnel is left, not even one whose child is stopping."""
        return not self._tunnels

    # ------------------------------------------------------------------ events

    def notified(self, notification: Notification) -> list[Action]:
        """A valid notification arrived."""
        if not self._first_time(notification):
            return [Log(logging.INFO, f"duplicate notification for {notification.describe()}")]
        refused = self._refused(notification)
        if refused:
            return refused
        self._counter += 1
        tunnel = _Tunnel(f"t{self._counter}", notification, Secret(self._new_client_token()))
        self._tunnels[tunnel.tag] = tunnel
        return [
            Log(logging.INFO, f"new tunnel for {notification.describe()}", tunnel.tag),
            StartProxy(tunnel.tag, notification, tunnel.client_token, 0),
        ]

    def resumed(self, tag: str, notification: Notification, client_token: Secret) -> list[Action]:
        """A tunnel that ran before the agent restarted: it keeps its tag (``t<N>``) and client
        token, and later tunnels are numbered after it. The rules of :meth:`notified` apply."""
        if not self._first_time(notification):
            return [Log(logging.INFO, f"duplicate of {notification.describe()}; not resumed", tag)]
        if tag in self._tunnels:
            return [Log(logging.WARNING, "a tunnel with this tag runs already; not resumed", tag)]
        if self.shutting_down or self.active >= self.max_tunnels:
            return [
                Log(
                    logging.WARNING,
                    f"the tunnel for {notification.describe()} is not resumed: {self.active} "
                    f"tunnels already run (max_tunnels = {self.max_tunnels})",
                    tag,
                )
            ]
        self._counter = max(self._counter, int(tag.removeprefix("t")))
        self._tunnels[tag] = _Tunnel(tag, notification, client_token)
        return [
            Log(logging.INFO, f"resuming the tunnel for {notification.describe()}", tag),
            StartProxy(tag, notification, client_token, 0),
        ]

    def _first_time(self, notification: Notification) -> bool:
        """Remember the notification; False when it is a duplicate of a recent one."""
        fingerprint = notification.fingerprint()
        if fingerprint in self._seen:
            self._seen.move_to_end(fingerprint)
            return False
        self._seen[fingerprint] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return True

    def _refused(self, notification: Notification) -> list[Action]:
        """Why a new tunnel cannot start now, or nothing."""
        if self.shutting_down:
            return [Log(logging.WARNING, "shutting down: notification ignored")]
        if self.active >= self.max_tunnels:
            return [
                Log(
                    logging.WARNING,
                    f"notification for {notification.describe()} refused: "
                    f"{self.active} tunnels already run (max_tunnels = {self.max_tunnels})",
                )
            ]
        return []

    def child_exited(self, tag: str, code: int, uptime: float) -> list[Action]:
        """The tunnel's child exited with ``code`` after running ``uptime`` seconds."""
        tunnel = self._tunnels.get(tag)
        if tunnel is None or tunnel.state is State.WAITING:
            return []
        how = describe_exit(code)
        if tunnel.state is State.STOPPING or self.shutting_down:
            del self._tunnels[tag]
            return [Log(logging.INFO, f"proxy stopped ({how})", tag)]
        if code in _FINAL_EXITS:
            del self._tunnels[tag]
            level, why = _FINAL_EXITS[code]
            return [Log(level, f"{why} (proxy {how}); not restarting", tag)]
        if uptime >= self.stable_after:
            tunnel.crashes = 0
        tunnel.crashes += 1
        if tunnel.crashes > self.max_restarts:
            del self._tunnels[tag]
            return [
                Log(
                    logging.ERROR,
                    f"proxy failed ({how}) {tunnel.crashes} times in a row; giving up on this "
                    "tunnel",
                    tag,
                )
            ]
        tunnel.state = State.WAITING
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** (tunnel.crashes - 1))
        delay = ceiling / 2 + self._rand(0.0, ceiling / 2)
        return [
            Log(
                logging.WARNING,
                f"proxy failed ({how}); restart {tunnel.crashes} of {self.max_restarts} "
                f"in {delay:.1f} s",
                tag,
            ),
            ScheduleRestart(tag, delay),
        ]

    def restart_due(self, tag: str) -> list[Action]:
        """The restart timer of ``tag`` fired."""
        tunnel = self._tunnels.get(tag)
        if tunnel is None or tunnel.state is not State.WAITING:
            return []
        tunnel.state = State.RUNNING
        return [StartProxy(tag, tunnel.notification, tunnel.client_token, tunnel.crashes)]

    def shutdown(self) -> list[Action]:
        """Stop every child; no new tunnel is started from now on."""
        self.shutting_down = True
        actions: list[Action] = []
        for tunnel in list(self._tunnels.values()):
            if tunnel.state is not State.STOPPING:
                actions.extend(self._stop(tunnel))
        return actions

    def _stop(self, tunnel: _Tunnel) -> list[Action]:
        if tunnel.state is State.WAITING:
            del self._tunnels[tunnel.tag]
            return [CancelRestart(tunnel.tag)]
        tunnel.state = State.STOPPING
        return [StopProxy(tunnel.tag)]
