"""Fair sending across connections.

Every local connection queues what it has to send in its own FIFO (its STREAM_START or
CONNECTION_START, its data, its reset), so that its own order is kept. The WebSocket writer
takes control frames first, then one frame per connection in round-robin order.

Data is queued raw and cut into DATA frames only when it is sent, at a size that follows the
link: about ``target_delay`` seconds of the measured send rate, between ``min_quantum`` and 63
KiB. On a fast link frames stay large (cheap per byte); on a slow one (the AWS per-tunnel cap
is hundreds of KB/s) they shrink, so that a keystroke on one connection never waits long
behind a frame of a bulk transfer on another. A connection whose queue holds ``high_water``
bytes or more stops reading its socket until the writer brought it under ``low_water``.

Frames are joined into one WebSocket message while it stays within the same time budget (at
most the protocol's 131076 bytes): every message costs a WebSocket frame, a TLS write and an
event-loop turn at each hop, so on a fast link two full frames per message save CPU, and on a
slow one messages stay as short as frames.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.protocol.framing import MAX_WS_MESSAGE
from proxy.protocol.messages import MAX_PAYLOAD


class Flow(Protocol):
    """What the scheduler needs from a connection: pause and resume its reading."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


#: Turns a payload into the DATA frame for a connection, as pieces to join, or None if the
#: tunnel dropped the connection.
Encoder = Callable[[Flow, bytes], Sequence[bytes] | None]


class _Queue:
    __slots__ = ("entries", "flow", "paused", "size")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        #: (True, encoded frame) or (False, payload not yet framed)
        self.entries: deque[tuple[bool, bytes | memoryview]] = deque()
        self.size = 0
        self.paused = False


class FairScheduler:
    """Round-robin over connections with something to send; control frames go first.

    Args:
        encode: frames a payload for a connection, as pieces to join, or None if the tunnel
            dropped it (the tunnel uses the connection's ``DataFramer.pieces``).
        high_water: queued bytes per connection at which its reading pauses.
        low_water: queued bytes under which a paused connection resumes.
        batch: frames are joined into one WebSocket message while it stays under this many
            bytes until the link's rate is known (then :attr:`budget` follows it).
        min_quantum: the smallest DATA payload cut from a larger queued chunk.
        max_message: the largest WebSocket message.
        target_delay: seconds of the measured send rate one DATA frame (and one WebSocket
            message) should take.
    """

    def __init__(
        self,
        encode: Encoder,
        *,
        high_water: int = 2 * 64 * 1024,
        low_water: int = 64 * 1024,
        batch: int = 16384,
        min_quantum: int = 4096,
        max_quantum: int = MAX_PAYLOAD,
        max_message: int = MAX_WS_MESSAGE,
        target_delay: float = 0.01,
    ) -> None:
        self._encode = encode
        self._high = high_water
        self._low = low_water
        self._min_quantum = min(min_quantum, max_quantum)
        self._max_quantum = max_quantum
        self._max_message = max_message
        self._target_delay = target_delay
        self._control: deque[bytes] = deque()
        self._queues: dict[Flow, _Queue] = {}
        self._ready: deque[_Queue] = deque()
        self._wakeup = asyncio.Event()
        #: The largest payload a DATA frame gets now (follows :meth:`observe_rate`).
        self.quantum = max_quantum
        #: Frames are joined into one WebSocket message up to this size (a larger one goes alone).
        self.budget = min(batch, max_message)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in all queues."""
        return sum(len(f) for f in self._control) + sum(q.size for q in self._queues.values())

    @property
    def empty(self) -> bool:
        """True when nothing at all is queued."""
        return not self._control and not self._ready

    def observe_rate(self, bytes_per_second: float) -> None:
        """The writer measured how fast the link drains while it was busy: resize frames."""
        wanted = int(bytes_per_second * self._target_delay)
        self.quantum = max(self._min_quantum, min(self._max_quantum, wanted))
        self.budget = max(self.quantum, min(self._max_message, wanted))

    def push_control(self, frame: bytes) -> None:
        """Queue a frame that belongs to no connection (sent before any data)."""
        self._control.append(frame)
        self._wakeup.set()

    def push_frame(self, flow: Flow, frame: bytes) -> None:
        """Queue an encoded frame of ``flow`` (its start or reset), after what it queued."""
        self._push(flow, True, frame)

    def push_data(self, flow: Flow, data: bytes) -> None:
        """Queue a payload of ``flow``; pauses its reading when its queue is full."""
        self._push(flow, False, data)

    def _push(self, flow: Flow, framed: bool, data: bytes | memoryview) -> None:
        queue = self._queues.get(flow)
        if queue is None:
            queue = self._queues[flow] = _Queue(flow)
        if not queue.entries:
            self._ready.append(queue)
        queue.entries.append((framed, data))
        queue.size += len(data)
        if queue.size >= self._high and not queue.paused:
            queue.paused = True
            flow.pause_reading()
        self._wakeup.set()

    def discard(self, flow: Flow) -> None:
        """Forget what ``flow`` queued (its connection is gone and the data is stale)."""
        queue = self._queues.pop(flow, None)
        if queue is not None and queue.entries:
            self._ready.remove(queue)

    def clear(self) -> None:
        """Forget everything (the WebSocket was replaced: what is queued is stale)."""
        self._control.clear()
        self._queues.clear()
        self._ready.clear()
        self._wakeup.clear()

    def pop(self) -> bytes | None:
        """The next WebSocket message to send, or None if nothing is queued."""
        pieces: list[bytes] = []
        size = 0
        while self._control and (not pieces or size + len(self._control[0]) <= self.budget):
            frame = self._control.popleft()
            pieces.append(frame)
            size += len(frame)
        while self._ready and (not pieces or size + self._next_size() <= self.budget):
            queue = self._ready.popleft()
            taken = self._take(queue)
            if taken is None:
                continue
            length = sum(map(len, taken))
            if pieces and size + length > self._max_message:
                # The budget counts payloads; this frame's header would take the message over
                # the protocol's limit: the frame opens the next message instead.
                self._hold(queue, b"".join(taken))
                break
            pieces.extend(taken)
            size += length
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _next_size(self) -> int:
        framed, data = self._ready[0].entries[0]
        return len(data) if framed else min(len(data), self.quantum)

    def _hold(self, queue: _Queue, frame: bytes) -> None:
        """Put ``frame``, just taken from ``queue``, back at its head, and the queue first."""
        queue.entries.appendleft((True, frame))
        queue.size += len(frame)
        if self._queues.get(queue.flow) is not queue:  # it was emptied by taking the frame
            self._queues[queue.flow] = queue
        else:
            self._ready.remove(queue)
        self._ready.appendleft(queue)

    def _take(self, queue: _Queue) -> Sequence[bytes] | None:
        """One frame (as pieces) from the head of ``queue``; requeues it if it has more."""
        framed, data = queue.entries[0]
        if framed or len(data) <= self.quantum:
            queue.entries.popleft()
            piece = bytes(data) if isinstance(data, memoryview) else data
        else:  # cut without copying the rest
            view = data if isinstance(data, memoryview) else memoryview(data)
            piece, queue.entries[0] = bytes(view[: self.quantum]), (False, view[self.quantum :])
        queue.size -= len(piece)
        if queue.entries:
            self._ready.append(queue)
        elif self._queues.get(queue.flow) is queue:
            del self._queues[queue.flow]
        if queue.paused and queue.size < self._low:
            queue.paused = False
            queue.flow.resume_reading()
        if framed:
            return (piece,)
        frame = self._encode(queue.flow, piece)
        if frame is None:  # the tunnel dropped the connection: what it queued is stale
            self.discard(queue.flow)
        return frame

    async def get(self) -> bytes:
        """Wait for and return the next WebSocket message to send."""
        while True:
            message = self.pop()
            if message is not None:
                return message
            self._wakeup.clear()
            await self._wakeup.wait()
