"""Fair sending across connections.

Every local connection queues its frames (STREAM_START/CONNECTION_START, DATA, its reset) in its
own FIFO, so that its own order is kept. The WebSocket writer takes control frames first, then
one frame per connection in round-robin order. A frame carries at most 63 KiB, so a keystroke on
one connection waits behind at most one frame of each other busy connection, never behind
megabytes of a bulk transfer. A connection whose queue holds ``high_water`` bytes or more stops
reading its socket until the writer brought it under ``low_water``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol


class Flow(Protocol):
    """What the scheduler needs from a connection: pause and resume its reading."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Queue:
    __slots__ = ("flow", "frames", "paused", "size")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.frames: deque[bytes] = deque()
        self.size = 0
        self.paused = False


class FairScheduler:
    """Round-robin over connections with frames to send; control frames go first.

    Args:
        high_water: queued bytes per connection at which its reading pauses.
        low_water: queued bytes under which a paused connection resumes.
        batch: frames are joined into one WebSocket message while the message stays under this
            many bytes (small frames only; a large frame is sent alone, uncopied).
    """

    def __init__(
        self, *, high_water: int = 2 * 64 * 1024, low_water: int = 64 * 1024, batch: int = 16384
    ) -> None:
        self._high = high_water
        self._low = low_water
        self._batch = batch
        self._control: deque[bytes] = deque()
        self._queues: dict[Flow, _Queue] = {}
        self._ready: deque[_Queue] = deque()
        self._wakeup = asyncio.Event()

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in all queues."""
        return sum(len(f) for f in self._control) + sum(q.size for q in self._queues.values())

    def push_control(self, frame: bytes) -> None:
        """Queue a frame that belongs to no connection (sent before any data)."""
        self._control.append(frame)
        self._wakeup.set()

    def push(self, flow: Flow, frame: bytes) -> None:
        """Queue one of ``flow``'s frames; pauses its reading when its queue is full."""
        queue = self._queues.get(flow)
        if queue is None:
            queue = self._queues[flow] = _Queue(flow)
        if not queue.frames:
            self._ready.append(queue)
        queue.frames.append(frame)
        queue.size += len(frame)
        if queue.size >= self._high and not queue.paused:
            queue.paused = True
            flow.pause_reading()
        self._wakeup.set()

    def discard(self, flow: Flow) -> None:
        """Forget ``flow``'s queued frames (its connection is gone and they are stale)."""
        queue = self._queues.pop(flow, None)
        if queue is not None and queue.frames:
            self._ready.remove(queue)

    def clear(self) -> None:
        """Forget everything (the WebSocket was replaced: queued frames are stale)."""
        self._control.clear()
        self._queues.clear()
        self._ready.clear()
        self._wakeup.clear()

    def pop(self) -> bytes | None:
        """The next WebSocket message to send, or None if nothing is queued."""
        frames: list[bytes] = []
        size = 0
        while self._control and (not frames or size + len(self._control[0]) <= self._batch):
            frame = self._control.popleft()
            frames.append(frame)
            size += len(frame)
        while self._ready and (not frames or size + len(self._ready[0].frames[0]) <= self._batch):
            queue = self._ready.popleft()
            frame = queue.frames.popleft()
            queue.size -= len(frame)
            if queue.frames:
                self._ready.append(queue)
            elif self._queues.get(queue.flow) is queue:
                del self._queues[queue.flow]
            if queue.paused and queue.size < self._low:
                queue.paused = False
                queue.flow.resume_reading()
            frames.append(frame)
            size += len(frame)
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else b"".join(frames)

    async def get(self) -> bytes:
        """Wait for and return the next WebSocket message to send."""
        while True:
            message = self.pop()
            if message is not None:
                return message
            self._wakeup.clear()
            await self._wakeup.wait()
