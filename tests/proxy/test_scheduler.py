"""The fair scheduler: control first, round-robin across connections, bounded queues."""

from __future__ import annotations

import asyncio

from proxy.io.scheduler import FairScheduler


class Flow:
    def __init__(self, name: str) -> None:
        self.name = name
        self.paused = False
        self.events: list[str] = []

    def pause_reading(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.events.append("resume")


def drain(s: FairScheduler) -> list[bytes]:
    out = []
    while (m := s.pop()) is not None:
        out.append(m)
    return out


def test_a_short_message_overtakes_queued_bulk_data() -> None:
    s = FairScheduler(high_water=10**9, batch=0)
    bulk, ssh = Flow("bulk"), Flow("ssh")
    for i in range(5):
        s.push(bulk, b"B%d" % i + b"." * 60000)
    s.push(ssh, b"keystroke")
    sent = [m[:2] for m in drain(s)]
    assert sent[:2] == [b"B0", b"ke"]  # at most one bulk frame ahead of the keystroke
    assert sent[2:] == [b"B1", b"B2", b"B3", b"B4"]


def test_control_frames_go_first_and_order_per_connection_is_kept() -> None:
    s = FairScheduler(batch=0)
    a, b = Flow("a"), Flow("b")
    s.push(a, b"a1")
    s.push(b, b"b1")
    s.push(a, b"a2")
    s.push_control(b"ctl")
    assert drain(s) == [b"ctl", b"a1", b"b1", b"a2"]


def test_small_frames_are_batched_large_ones_sent_alone() -> None:
    s = FairScheduler(batch=100)
    a = Flow("a")
    s.push_control(b"c" * 10)
    s.push(a, b"x" * 20)
    s.push(a, b"y" * 200)
    s.push(a, b"z" * 5)
    assert drain(s) == [b"c" * 10 + b"x" * 20, b"y" * 200, b"z" * 5]


def test_reading_pauses_at_high_water_and_resumes_under_low_water() -> None:
    s = FairScheduler(high_water=300, low_water=150, batch=0)
    a = Flow("a")
    s.push(a, b"1" * 100)
    s.push(a, b"2" * 100)
    assert not a.paused
    s.push(a, b"3" * 100)
    assert a.paused
    s.pop()
    assert a.paused  # 200 queued: not under the low-water mark yet
    s.pop()
    assert not a.paused
    assert a.events == ["pause", "resume"]
    assert s.queued_bytes == 100


def test_discard_and_clear_forget_frames() -> None:
    s = FairScheduler(batch=0)
    a, b = Flow("a"), Flow("b")
    s.push(a, b"a1")
    s.push(b, b"b1")
    s.discard(a)
    s.discard(Flow("never queued"))
    assert drain(s) == [b"b1"]
    s.push(a, b"a2")
    s.push_control(b"c")
    s.clear()
    assert s.pop() is None
    assert s.queued_bytes == 0


def test_get_waits_for_a_frame() -> None:
    async def scenario() -> bytes:
        s = FairScheduler()
        waiter = asyncio.create_task(s.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        s.push(Flow("a"), b"hello")
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(scenario()) == b"hello"
