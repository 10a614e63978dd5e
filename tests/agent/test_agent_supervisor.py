"""agent.supervisor: the pure policy, driven event by event (no processes, no clock)."""

from __future__ import annotations

import itertools
import logging

import pytest

from agent.supervisor import (
    CancelRestart,
    Log,
    ScheduleRestart,
    StartProxy,
    State,
    StopProxy,
    Supervisor,
    describe_exit,
)
from iotunnel.notify import Notification
from iotunnel.secret import Secret


def note(token: str = "tok-1", services: tuple[str, ...] = ("HTTP1", "SSH1")) -> Notification:  # noqa: S107
    return Notification(Secret(token), "us-east-1", services)


def make(max_tunnels: int = 2, **options: object) -> Supervisor:
    counter = itertools.count(1)
    return Supervisor(
        max_tunnels,
        rand=lambda low, high: high,  # the longest delay: deterministic
        new_client_token=lambda: f"client-{next(counter):032d}",
        **options,  # type: ignore[arg-type]
    )


def without_logs(actions: list[object]) -> list[object]:
    return [a for a in actions if not isinstance(a, Log)]


def logs(actions: list[object]) -> list[Log]:
    return [a for a in actions if isinstance(a, Log)]


def started(sup: Supervisor, notification: Notification) -> StartProxy:
    actions = without_logs(sup.notified(notification))
    assert len(actions) == 1
    start = actions[0]
    assert isinstance(start, StartProxy)
    return start


def test_a_notification_starts_a_tagged_proxy() -> None:
    sup = make()
    actions = sup.notified(note())
    assert logs(actions) == [
        Log(logging.INFO, "new tunnel for HTTP1, SSH1 (region us-east-1)", "t1")
    ]
    start = without_logs(actions)[0]
    assert isinstance(start, StartProxy)
    assert (start.tag, start.attempt) == ("t1", 0)
    assert start.client_token.reveal() == f"client-{1:032d}"
    assert sup.state("t1") is State.RUNNING
    assert sup.active == 1
    assert "tok-1" not in repr(actions)


def test_an_exact_duplicate_is_ignored() -> None:
    sup = make()
    started(sup, note())
    actions = sup.notified(note())
    assert actions == [
        Log(logging.INFO, "duplicate notification for HTTP1, SSH1 (region us-east-1)")
    ]
    assert sup.active == 1


def test_a_duplicate_of_a_closed_tunnel_is_still_a_duplicate() -> None:
    sup = make()
    start = started(sup, note())
    sup.child_exited(start.tag, 0, 5.0)
    assert without_logs(sup.notified(note())) == []


def test_a_new_token_for_the_same_services_is_another_tunnel() -> None:
    # Issue 10 #3: two operators' tunnels to the same services; a notification carries no
    # tunnel id, so "same services" is no evidence of a rotation. Nothing is stopped.
    sup = make(max_tunnels=2)
    first = started(sup, note("tok-1"))
    actions = sup.notified(note("tok-2", ("SSH1", "HTTP1")))
    assert not any(isinstance(a, StopProxy) for a in actions)
    [second] = without_logs(actions)
    assert isinstance(second, StartProxy)
    assert second.tag == "t2"
    assert second.notification.token == Secret("tok-2")
    assert second.client_token != first.client_token
    assert logs(actions) == [
        Log(logging.INFO, "new tunnel for SSH1, HTTP1 (region us-east-1)", "t2")
    ]
    assert (sup.state("t1"), sup.state("t2")) == (State.RUNNING, State.RUNNING)
    assert sup.active == 2
    # A rotation: the service closes the old token's connection, the old proxy exits 0.
    closed = sup.child_exited("t1", 0, 30.0)
    assert without_logs(closed) == []
    assert "closed by the service" in logs(closed)[0].message
    assert (sup.state("t1"), sup.state("t2")) == (None, State.RUNNING)


def test_same_services_at_the_limit_are_refused_and_nothing_is_stopped() -> None:
    sup = make(max_tunnels=1)
    started(sup, note("a", ("HTTP1",)))
    actions = sup.notified(note("b", ("HTTP1",)))
    assert without_logs(actions) == []
    assert "refused: 1 tunnels already run (max_tunnels = 1)" in logs(actions)[0].message
    assert sup.state("t1") is State.RUNNING


def test_other_services_make_another_tunnel_up_to_the_limit() -> None:
    sup = make(max_tunnels=2)
    started(sup, note("a", ("HTTP1",)))
    started(sup, note("b", ("SSH1",)))
    actions = sup.notified(note("c", ("VNC1",)))
    assert without_logs(actions) == []
    assert "refused: 2 tunnels already run (max_tunnels = 2)" in logs(actions)[0].message
    assert logs(actions)[0].level == logging.WARNING


@pytest.mark.parametrize(
    ("code", "level", "text"),
    [
        (0, logging.INFO, "the tunnel was closed by the service (proxy exit code 0)"),
        (3, logging.WARNING, "the tunnel service refused the token (proxy exit code 3)"),
        (2, logging.ERROR, "cannot serve this tunnel with the local mappings (proxy exit code 2)"),
    ],
)
def test_final_exits_are_not_restarted(code: int, level: int, text: str) -> None:
    sup = make()
    start = started(sup, note())
    actions = sup.child_exited(start.tag, code, 1.0)
    assert without_logs(actions) == []
    assert logs(actions)[0].level == level
    assert text in logs(actions)[0].message
    assert "not restarting" in logs(actions)[0].message
    assert sup.state(start.tag) is None
    assert sup.idle


@pytest.mark.parametrize("code", [1, 4, -9, 143])
def test_a_crash_is_restarted_with_the_same_tokens(code: int) -> None:
    sup = make()
    start = started(sup, note())
    actions = sup.child_exited(start.tag, code, 1.0)
    assert without_logs(actions) == [ScheduleRestart("t1", 1.0)]
    assert "restart 1 of 5 in 1.0 s" in logs(actions)[0].message
    assert sup.state("t1") is State.WAITING
    assert sup.active == 1
    again = sup.restart_due("t1")
    assert again == [StartProxy("t1", start.notification, start.client_token, 1)]
    assert sup.state("t1") is State.RUNNING


def test_backoff_doubles_and_is_capped_then_gives_up() -> None:
    sup = make(max_restarts=6, backoff_base=1.0, backoff_cap=8.0)
    started(sup, note())
    delays = []
    for _ in range(6):
        actions = without_logs(sup.child_exited("t1", 1, 0.5))
        assert isinstance(actions[0], ScheduleRestart)
        delays.append(actions[0].delay)
        sup.restart_due("t1")
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    actions = sup.child_exited("t1", 1, 0.5)
    assert without_logs(actions) == []
    assert "7 times in a row; giving up" in logs(actions)[0].message
    assert sup.state("t1") is None


def test_jitter_keeps_at_least_half_the_delay() -> None:
    sup = Supervisor(1, rand=lambda low, high: low)
    sup.notified(note())
    actions = without_logs(sup.child_exited("t1", 1, 0.0))
    assert actions == [ScheduleRestart("t1", 0.5)]


def test_a_long_run_resets_the_crash_count() -> None:
    sup = make(max_restarts=1, stable_after=60.0)
    started(sup, note())
    sup.child_exited("t1", 1, 1.0)
    sup.restart_due("t1")
    actions = without_logs(sup.child_exited("t1", 1, 120.0))  # ran two minutes: first in a row
    assert actions == [ScheduleRestart("t1", 1.0)]


def test_shutdown_stops_running_and_cancels_waiting() -> None:
    sup = make()
    started(sup, note("a", ("HTTP1",)))
    started(sup, note("b", ("SSH1",)))
    sup.child_exited("t2", 1, 1.0)
    assert sup.shutdown() == [StopProxy("t1"), CancelRestart("t2")]
    assert sup.state("t2") is None
    assert not sup.idle
    assert "shutting down" in logs(sup.notified(note("c", ("VNC1",))))[0].message
    sup.child_exited("t1", 143, 1.0)
    assert sup.idle


def test_late_or_unknown_events_are_ignored() -> None:
    sup = make()
    assert sup.child_exited("t9", 1, 1.0) == []
    assert sup.restart_due("t9") == []
    started(sup, note())
    assert sup.restart_due("t1") == []  # running, not waiting


def test_duplicates_are_remembered_boundedly() -> None:
    sup = make(max_tunnels=64, remember=2)
    for token in ("a", "b", "c"):
        started(sup, note(token, (token.upper(),)))
    # "a" was forgotten: it counts as new again.
    [again] = without_logs(sup.notified(note("a", ("A",))))
    assert isinstance(again, StartProxy)


def test_describe_exit() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(-200) == "signal 200"
