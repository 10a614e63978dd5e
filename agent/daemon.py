"""The agent's event loop: MQTT events in, supervisor decisions carried out, systemd told.

Long-lived tasks run in one :class:`asyncio.TaskGroup`: the MQTT event reader, the watchdog
pinger, the status updater and one task per proxy child. CRT callbacks reach the loop only as
queued events (:mod:`agent.mqtt`). The :class:`~agent.supervisor.Supervisor` decides; this
module carries out its actions in order, without awaiting in between. Handling one MQTT message
is a boundary: whatever it raises is one error line (the exception's type, never its text) and the
message is dropped; the agent and its tunnels go on.

SIGTERM and SIGINT: STOPPING=1, stop every child (SIGTERM, then SIGKILL after a grace period),
disconnect from the broker, exit 0. The running tunnels stay in the state directory
(:mod:`agent.state`): at its next start, before it connects to the broker, the agent resumes
them with their tokens. A tunnel's file is written before its first proxy starts and removed
when the tunnel ends (exit 0, 2 or 3, or given up); a stop or a crash of the agent keeps it.

What the proxies report on their status channel becomes one audit line per closed connection,
the STATUS= line and ``status.json`` in the state directory (:mod:`agent.report`), which
``iotunnel-agent status`` reads; the file is removed when the agent stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from agent.config import AgentSettings
from agent.diagnosis import explain
from agent.launcher import Launcher, Preforked
from agent.logs import AUDIT, Output, Redactor, child_log_env, tagged
from agent.mqtt import Connected, ConnectFailed, Disconnected, Message, MqttLink
from agent.proxy_runner import ProxyChild, child_argv, child_environment
from agent.report import (
    Snapshot,
    TunnelReport,
    audit_record,
    process_start,
    remove_snapshot,
    status_line,
    write_snapshot,
)
from agent.state import StateStore
from agent.supervisor import (
    Action,
    CancelRestart,
    Log,
    ScheduleRestart,
    StartProxy,
    State,
    StopProxy,
    Supervisor,
)
from agent.systemd import Notifier, watchdog_pings
from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode
from iotunnel.mode import Mode
from iotunnel.notify import Notification, Rejection, parse
from iotunnel.status import Closed, Event, Exited, Reconnecting
from iotunnel.status import Connected as TunnelConnected
from proxy.config import read_mapping_dir

__all__ = ["Agent", "run"]

log = logging.getLogger("agent")
audit = logging.getLogger(AUDIT)

#: Seconds between SIGTERM and SIGKILL when a child is stopped.
STOP_GRACE = 10.0
#: Seconds between subscription attempts the broker refused.
RESUBSCRIBE_DELAY = 30.0
#: Seconds that status changes are gathered into one STATUS= message.
STATUS_COALESCE = 0.2
#: The least number of seconds between two writes of the status file.
SNAPSHOT_INTERVAL = 1.0
#: Exits of a proxy that are no error (closed by the service, stopped by the agent).
_NOT_ERRORS = (ExitCode.CLOSED, ExitCode.INTERRUPTED, ExitCode.TERMINATED)


@dataclass(slots=True)
class _Traffic:
    """What the agent remembers of a tunnel across its proxy's restarts, for the status."""

    services: tuple[str, ...]
    since: float
    closed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_error: str | None = None


class Agent:
    """The running agent.

    Args:
        settings: The validated settings.
        notifier: The systemd notifier (a no-op one off systemd).
        base_env: The environment children start from (systemd's variables already removed).
        redactor: The log filter that must learn every token.
        log_output: How the agent logs, and so how its proxies must.
        zygote: The launcher forked at start (:func:`agent.launcher.fork_zygote`), if any.
    """

    def __init__(
        self,
        settings: AgentSettings,
        notifier: Notifier,
        base_env: Mapping[str, str],
        redactor: Redactor,
        log_output: Output = Output.JOURNAL,
        zygote: Preforked | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier
        self.base_env = dict(base_env)
        self.redactor = redactor
        self.log_output = log_output
        self.supervisor = Supervisor(settings.max_tunnels)
        self.children: dict[str, ProxyChild] = {}
        self.connection = "connecting"
        self.ready = False
        self._tg: asyncio.TaskGroup | None = None
        self._child_tasks: set[asyncio.Task[None]] = set()
        self._subscriber: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._secrets: dict[str, tuple[str, str]] = {}
        self._status_changed = asyncio.Event()
        self._all_stopped = asyncio.Event()
        self.store: StateStore | None = StateStore(settings.state_dir)
        self._kept: set[str] = set()  #: tags whose file is in the state directory
        self._traffic: dict[str, _Traffic] = {}
        self._since: dict[str, float] = {}  #: start times of resumed tunnels
        #: When the notification of a starting tunnel arrived (monotonic), until it connects.
        self._arrived: dict[str, float] = {}
        self._snapshot_changed = asyncio.Event()
        self._started = time.time()
        self._pid_start = process_start(os.getpid())
        #: The zygote that forks the proxies (``launcher = fork``), or None to spawn them.
        self.launcher = (
            Launcher(self.base_env, settings.tunnel_ca, zygote)
            if settings.launcher == "fork"
            else None
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit code (0)."""
        if self.launcher is not None:  # first: it imports the proxy while MQTT connects
            self.launcher.start()
        link = MqttLink(self.settings, asyncio.get_running_loop())
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._resume_safely()
                background = [
                    tg.create_task(self._mqtt_events(link), name="agent.mqtt_events"),
                    tg.create_task(watchdog_pings(self.notifier), name="agent.watchdog"),
                    tg.create_task(self._status_updates(), name="agent.status"),
                    tg.create_task(self._snapshot_updates(), name="agent.snapshot"),
                ]
                self._changed()
                link.start()
                await stop.wait()
                self.notifier.stopping()
                log.info("stopping: %d tunnel(s) to close", self.supervisor.active)
                self._carry_out(self.supervisor.shutdown())
                await link.stop()
                await self._wait_for_children()
                for task in [*background, *self._child_tasks]:
                    task.cancel()
                if self._subscriber is not None:
                    self._subscriber.cancel()
        finally:
            for timer in self._timers.values():
                timer.cancel()
            if self.launcher is not None:
                self.launcher.close()
            if self.store is not None:
                try:
                    remove_snapshot(self.settings.state_dir)
                except OSError as exc:
                    log.warning("cannot remove the status file: %s", exc.strerror or exc)
        log.info("stopped")
        return 0

    async def _wait_for_children(self) -> None:
        """Until every child has exited; the ones still there after the grace are cancelled
        by the caller (a cancelled child task kills its process)."""
        if self.supervisor.idle:
            return
        try:
            async with asyncio.timeout(STOP_GRACE + 5):
                await self._all_stopped.wait()
        except TimeoutError:
            log.error("proxies still running after %.0f s; killing them", STOP_GRACE + 5)

    # ------------------------------------------------------------------ state directory

    def _resume_safely(self) -> None:
        """The boundary: whatever a kept tunnel holds, the agent starts (a crash here would
        repeat at every restart until systemd gives up)."""
        try:
            self._resume()
        except Exception as exc:
            log.error("cannot resume the kept tunnels: internal error (%s)", type(exc).__name__)

    def _resume(self) -> None:
        """Start the tunnels kept in the state directory, before any notification is read: a
        redelivered notification of one of them is then a duplicate."""
        assert self.store is not None
        directory = self.settings.state_dir
        try:
            self.store.prepare()
        except OSError as exc:
            log.warning(
                "state_dir: %s: %s; tunnels will not survive a restart",
                directory,
                exc.strerror or exc,
            )
            self.store = None
            return
        try:
            mappings = read_mapping_dir(self.settings.mapping_dir, mode=Mode.DESTINATION)
        except ConfigError as exc:
            log.error("cannot resume tunnels: cannot read the service mappings: %s", exc)
            return
        mapped = {m.service_id for m in mappings}
        loaded = self.store.load(mapped, mapping_dir=str(self.settings.mapping_dir))
        for problem in loaded.problems:
            log.warning("%s", problem)
        for saved in loaded.tunnels:
            self._kept.add(saved.tag)
            self._since[saved.tag] = saved.since
            self._carry_out(
                self.supervisor.resumed(saved.tag, saved.notification, saved.client_token)
            )
            if self.supervisor.state(saved.tag) is None:
                self._drop_state(saved.tag)
        if loaded.tunnels:
            log.info(
                "resumed %d of %d tunnel(s) kept in %s",
                len(self._kept),
                len(loaded.tunnels),
                directory,
            )

    def _keep_state(self, action: StartProxy) -> None:
        """Write the tunnel's file, once; a failure costs only its survival of a restart."""
        if self.store is None or action.tag in self._kept:
            return
        try:
            self.store.save(action.tag, action.notification, action.client_token, time.time())
        except OSError as exc:
            log.warning(
                "cannot keep the tunnel in %s: %s; it will not survive a restart",
                self.settings.state_dir,
                exc.strerror or exc,
                extra=tagged(action.tag),
            )
            return
        self._kept.add(action.tag)

    def _drop_state(self, tag: str) -> None:
        """The tunnel is over: remove its file."""
        if self.store is None or tag not in self._kept:
            return
        self._kept.discard(tag)
        try:
            self.store.remove(tag)
        except OSError as exc:
            log.error(
                "cannot remove the tunnel's file from %s: %s",
                self.settings.state_dir,
                exc.strerror or exc,
                extra=tagged(tag),
            )

    # ------------------------------------------------------------------ MQTT

    async def _mqtt_events(self, link: MqttLink) -> None:
        while True:
            event = await link.events.get()
            match event:
                case Connected(rejoined=rejoined):
                    log.info(
                        "connected to the MQTT broker%s",
                        " (session rejoined)" if rejoined else "",
                    )
                    self._set_connection("connected, subscribing")
                    self._restart_subscriber(link)
                case ConnectFailed(reason=reason):
                    log.warning(
                        "cannot connect to the MQTT broker: %s; retrying",
                        explain(reason, self.settings),
                    )
                    self._set_connection(f"cannot connect ({reason})")
                case Disconnected() if self.supervisor.shutting_down:
                    log.info("disconnected from the MQTT broker")
                case Disconnected(reason=reason):
                    log.warning("lost the MQTT connection: %s; reconnecting", reason)
                    if self._subscriber is not None:
                        self._subscriber.cancel()
                    self._set_connection(f"disconnected ({reason})")
                case Message(topic=topic, payload=payload):
                    self._handle_message(topic, payload)
                case _:  # pragma: no cover - MqttLink makes nothing else
                    raise AssertionError(f"unexpected MQTT event {event!r}")

    def _restart_subscriber(self, link: MqttLink) -> None:
        """Subscribe on this connection (a broker that lost the session lost the subscription)."""
        assert self._tg is not None
        if self._subscriber is not None:
            self._subscriber.cancel()
        self._subscriber = self._tg.create_task(self._subscribe(link), name="agent.subscribe")

    async def _subscribe(self, link: MqttLink) -> None:
        topic = self.settings.topic
        while (problem := await link.subscribe(topic)) is not None:
            log.error(
                "cannot subscribe to %s: %s; retrying in %.0f s", topic, problem, RESUBSCRIBE_DELAY
            )
            await asyncio.sleep(RESUBSCRIBE_DELAY)
        log.info("subscribed to %s", topic)
        self._set_connection("connected")
        if not self.ready:
            self.ready = True
            self.notifier.ready(self.summary())
            log.info("ready: waiting for tunnel notifications")

    def _handle_message(self, topic: str, payload: bytes) -> None:
        """The boundary: whatever goes wrong with one message, the agent and its tunnels go on.

        One line, naming the exception's type only: its text could quote the payload's token.
        """
        try:
            self._on_message(topic, payload)
        except Exception as exc:
            log.error(
                "cannot handle an MQTT message on %s: internal error (%s); dropped",
                topic,
                type(exc).__name__,
            )

    def _on_message(self, topic: str, payload: bytes) -> None:
        arrived = time.monotonic()
        if topic != self.settings.topic:
            log.debug("ignoring a message on %s", topic)
            return
        directory = str(self.settings.mapping_dir)
        try:
            mappings = read_mapping_dir(self.settings.mapping_dir, mode=Mode.DESTINATION)
        except ConfigError as exc:
            log.error("notification rejected: cannot read the service mappings: %s", exc)
            return
        result = parse(payload, {m.service_id for m in mappings}, mapping_dir=directory)
        if isinstance(result, Rejection):
            log.warning("notification rejected: %s", result.reason)
            return
        self._notified(result, arrived)

    def _notified(self, notification: Notification, arrived: float | None = None) -> None:
        actions = self.supervisor.notified(notification)
        if arrived is not None:
            for action in actions:
                if isinstance(action, StartProxy):
                    self._arrived[action.tag] = arrived
        self._carry_out(actions)

    # ------------------------------------------------------------------ actions

    def _carry_out(self, actions: list[Action]) -> None:
        """Do what the supervisor decided, in order; never awaits."""
        for action in actions:
            match action:
                case Log(level=level, message=message, tag=tag):
                    log.log(level, "%s", message, extra=tagged(tag))
                    if tag in self._traffic and level >= logging.WARNING:
                        self._traffic[tag].last_error = message
                case StartProxy():
                    self._start(action)
                case StopProxy(tag=tag):
                    child = self.children.get(tag)
                    if child is not None:
                        child.stop()
                case ScheduleRestart(tag=tag, delay=delay):
                    loop = asyncio.get_running_loop()
                    self._timers[tag] = loop.call_later(delay, self._restart_due, tag)
                case CancelRestart(tag=tag):
                    timer = self._timers.pop(tag, None)
                    if timer is not None:
                        timer.cancel()
                    self._forget(tag)
                case _:  # pragma: no cover - the supervisor makes nothing else
                    raise AssertionError(f"unexpected action {action!r}")
        self._changed()

    def _start(self, action: StartProxy) -> None:
        assert self._tg is not None
        token, client = action.notification.token, action.client_token
        if action.tag not in self._secrets:
            self._secrets[action.tag] = (token.reveal(), client.reveal())
            self.redactor.add(token.reveal())
            self.redactor.add(client.reveal())
        self._keep_state(action)
        if action.tag not in self._traffic:
            since = self._since.pop(action.tag, None) or time.time()
            self._traffic[action.tag] = _Traffic(action.notification.services, since)
        tag = action.tag
        child = ProxyChild(
            tag,
            child_argv(self.settings, action.notification),
            child_environment(
                self.base_env,
                token,
                client,
                None if self.settings.https_proxy is None else self.settings.https_proxy.url,
                child_log_env(self.log_output, tag, self.base_env),
            ),
            on_streams=self._changed,
            on_event=lambda event: self._child_event(tag, event),
            stop_grace=STOP_GRACE,
            launcher=self.launcher,
        )
        self.children[action.tag] = child
        task = self._tg.create_task(self._run_child(child), name=f"agent[{action.tag}].proxy")
        self._child_tasks.add(task)
        task.add_done_callback(self._child_tasks.discard)

    async def _run_child(self, child: ProxyChild) -> None:
        code, uptime = await child.run()
        if self.children.get(child.tag) is child:
            del self.children[child.tag]
        self._carry_out(self.supervisor.child_exited(child.tag, code, uptime))
        if self.supervisor.state(child.tag) is None:
            self._forget(child.tag)
            if not self.supervisor.shutting_down:  # a stopping agent keeps it for its next start
                self._drop_state(child.tag)
        if self.supervisor.shutting_down and self.supervisor.idle:
            self._all_stopped.set()

    def _restart_due(self, tag: str) -> None:
        self._timers.pop(tag, None)
        self._carry_out(self.supervisor.restart_due(tag))

    def _forget(self, tag: str) -> None:
        """The tunnel is over: its tokens need no redaction any more."""
        self._arrived.pop(tag, None)
        for secret in self._secrets.pop(tag, ()):
            self.redactor.discard(secret)
        self._traffic.pop(tag, None)
        self._changed()

    def _child_event(self, tag: str, event: Event) -> None:
        """An event of a proxy's status channel: the audit line, the status."""
        traffic = self._traffic.get(tag)
        match event:
            case TunnelConnected():
                arrived = self._arrived.pop(tag, None)
                if arrived is not None:  # the time to tunnel: the benchmark reads it
                    log.info(
                        "tunnel up %.0f ms after its notification",
                        (time.monotonic() - arrived) * 1000,
                        extra=tagged(tag),
                    )
            case Closed():
                message, fields = audit_record(event)
                audit.info("%s", message, extra=tagged(tag, fields))
                if traffic is not None:
                    traffic.closed += 1
                    traffic.bytes_in += event.bytes_in
                    traffic.bytes_out += event.bytes_out
            case Reconnecting(reason=reason) if traffic is not None:
                traffic.last_error = reason
            case Exited(code=code, reason=reason) if traffic is not None:
                if code not in _NOT_ERRORS:
                    traffic.last_error = reason
            case _:
                pass
        self._changed()

    # ------------------------------------------------------------------ status

    def summary(self) -> str:
        """The one-line status: connection, tunnels, streams."""
        return status_line(self.snapshot())

    def snapshot(self) -> Snapshot:
        """The agent and its tunnels now: what the status file and the STATUS= line show."""
        tunnels = []
        for tag in sorted(self._traffic, key=lambda t: int(t.removeprefix("t"))):
            state = self.supervisor.state(tag)
            if state is None:
                continue
            traffic = self._traffic[tag]
            child = self.children.get(tag)
            status = None if child is None else child.status
            if state is State.WAITING:
                shown = "restarting"
            elif state is State.STOPPING:
                shown = "stopping"
            elif status is not None and status.connected:
                shown = "connected"
            elif status is not None and status.reconnect_reason is not None:
                shown = "reconnecting"
            else:
                shown = "connecting"
            tunnels.append(
                TunnelReport(
                    tag=tag,
                    services=traffic.services,
                    since=traffic.since,
                    state=shown,
                    open=0 if status is None else status.streams,
                    closed=traffic.closed,
                    bytes_in=traffic.bytes_in,
                    bytes_out=traffic.bytes_out,
                    last_error=traffic.last_error,
                )
            )
        return Snapshot(
            pid=os.getpid(),
            pid_start=self._pid_start,
            started=self._started,
            updated=time.time(),
            mqtt=self.connection,
            tunnels=tuple(tunnels),
        )

    def _set_connection(self, text: str) -> None:
        self.connection = text
        self._changed()

    def _changed(self) -> None:
        self._status_changed.set()
        self._snapshot_changed.set()

    async def _status_updates(self) -> None:
        last = ""
        while True:
            await self._status_changed.wait()
            await asyncio.sleep(STATUS_COALESCE)
            self._status_changed.clear()
            text = self.summary()
            if text != last:
                self.notifier.status(text)
                log.debug("status: %s", text)
                last = text

    async def _snapshot_updates(self) -> None:
        """Write the status file when something changed, at most every SNAPSHOT_INTERVAL s."""
        loop = asyncio.get_running_loop()
        last_write = -math.inf
        complained = False
        while True:
            await self._snapshot_changed.wait()
            wait = SNAPSHOT_INTERVAL - (loop.time() - last_write)
            if wait > 0:
                await asyncio.sleep(wait)
            self._snapshot_changed.clear()
            if self.store is None:  # no usable state directory
                continue
            last_write = loop.time()
            try:
                write_snapshot(self.settings.state_dir, self.snapshot())
            except OSError as exc:
                if not complained:
                    log.warning(
                        "cannot write the status file in %s: %s",
                        self.settings.state_dir,
                        exc.strerror or exc,
                    )
                complained = True


def run(
    settings: AgentSettings,
    notifier: Notifier,
    base_env: Mapping[str, str],
    redactor: Redactor,
    log_output: Output = Output.JOURNAL,
    zygote: Preforked | None = None,
) -> int:
    """Run the agent until SIGTERM or SIGINT; returns the exit code. ``zygote``: the launcher
    forked at start (:func:`agent.launcher.fork_zygote`), if there is one."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            if not stop.is_set():
                log.info("received %s", sig.name)
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.info(
                "SIGHUP: settings are read at start (restart to apply); "
                "mapping files are read for every notification"
            ),
        )
        agent = Agent(settings, notifier, base_env, redactor, log_output, zygote)
        return await agent.run(stop)

    try:
        return asyncio.run(main())
    finally:
        notifier.close()
