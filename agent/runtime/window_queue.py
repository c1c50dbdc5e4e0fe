"""`WindowQueue`: the windows waiting for the local model, with their drop policy (Sans-I/O).

The queue holds, per stream, the windows waiting for the worker (at most ``bound`` each) and
counts those the worker is answering. It never waits, never calls out and knows no clock: the
caller (`agent.runtime.window_sink.LocalWindows`) offers windows, takes batches and reports
finished ones; every method returns what happened (an `Offer`, a batch, a count) and the
caller does the I/O (wakes the scheduler, emits ``window_dropped``, opens a source's room).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from agent.runtime.worker import Window

#: `WindowQueue._victim`'s answer when the offered window is the one to shed.
_OFFERED = -1


def shed_rank(window: Window) -> int:
    """How much a window is worth keeping under overload: 2 with a command request (or an
    early command read), 1 with a transcript request, 0 for captions and answers only."""
    tasks = {request.task for request in window.requests}
    if window.early or "command" in tasks:
        return 2
    return 1 if "transcript" in tasks else 0


#: The kinds a shed window is counted under (`shed_kind`), most worth keeping first.
SHED_KINDS = ("command", "transcript", "caption", "answer")


def shed_kind(window: Window) -> str:
    """What a window dropped under overload is counted as: its best task, in the order of
    `SHED_KINDS` (a window with a command and a transcript counts as a command; one with a
    caption and standing questions as a caption). A window without requests counts as an
    ``answer``: it is worth the least."""
    tasks = {request.task for request in window.requests}
    return next((kind for kind in SHED_KINDS if kind in tasks), "answer")


def no_drops() -> dict[str, int]:
    """A count of 0 per kind of `SHED_KINDS` (every kind present, so readers find each key)."""
    return dict.fromkeys(SHED_KINDS, 0)


@dataclass(frozen=True)
class Drop:
    """A waiting window pushed out of a full queue to make room.

    Attributes:
        window: The window dropped (never answered).
        waiting: The stream's windows still waiting once it left, before the offered window
            joined (the ``pending`` of the ``window_dropped`` status event).
    """

    window: Window
    waiting: int

    @property
    def kind(self) -> str:
        """What the dropped window counts as (`shed_kind`)."""
        return shed_kind(self.window)


@dataclass(frozen=True)
class Offer:
    """What `WindowQueue.offer` did with a window (it always joins its stream's queue).

    Attributes:
        dropped: The window dropped to make room for it; None when nothing was.
        batch_ready: A whole batch (``max_batch`` windows, all streams together) now waits.
    """

    dropped: Drop | None
    batch_ready: bool


@dataclass
class _Lane:
    """One stream's place in the queue."""

    overload: str
    pending: collections.deque[tuple[int, Window]] = field(default_factory=collections.deque)
    in_flight: int = 0


class WindowQueue:
    """Per-stream bounded queues of windows, taken oldest first across streams.

    Policy (``offer``): a stream holds at most ``bound`` waiting windows. When a window comes
    to a full queue, a ``drop_oldest`` stream sheds one window by priority, never by arrival
    alone (`shed_rank`): first a window that asks only for a caption or answers (ambient
    windows before others), then one whose best request is a transcript, and a window with a
    command request only when every window waiting holds one too; within a rank, the oldest.
    The offered window itself is the one shed when it ranks below every waiting one (a caption
    arriving at a queue full of commands). An early command read is never shed (the segment
    it belongs to may already have left its command to it; a stream has at most one waiting,
    so its queue then holds one window more than ``bound``). A ``backpressure`` stream sheds
    nothing: its source waits for `has_room`.

    Args:
        bound: Most windows waiting per stream (``worker.max_pending_windows``).
        max_batch: Windows per batch (``worker.max_batch``).
    """

    def __init__(self, bound: int, max_batch: int) -> None:
        self.bound = bound
        self.max_batch = max_batch
        self._lanes: dict[str, _Lane] = {}
        self._order = itertools.count()

    # -- streams -------------------------------------------------------------------------------

    def open(self, stream: str, overload: str) -> None:
        """Start a stream's queue with its overload policy (``drop_oldest``, ``backpressure``).

        Raises:
            ValueError: the stream is open here already.
        """
        if stream in self._lanes:
            raise ValueError(f"stream {stream!r} already has a queue")
        self._lanes[stream] = _Lane(overload)

    def close(self, stream: str) -> None:
        """Forget a stream's queue (once nothing of it waits or runs)."""
        self._lanes.pop(stream, None)

    # -- windows -------------------------------------------------------------------------------

    def offer(self, window: Window) -> Offer:
        """Queue a window of an open stream, shedding one first if the policy says so (the
        offered window itself, when it ranks lowest: it then never joins the queue)."""
        lane = self._lanes[window.stream]
        dropped = None
        if len(lane.pending) >= self.bound and lane.overload == "drop_oldest":
            index = self._victim(lane, window)
            if index == _OFFERED:
                return Offer(Drop(window, len(lane.pending)), self.pending_total >= self.max_batch)
            if index is not None:
                _, victim = lane.pending[index]
                del lane.pending[index]
                dropped = Drop(victim, len(lane.pending))
        lane.pending.append((next(self._order), window))
        return Offer(dropped, self.pending_total >= self.max_batch)

    def _victim(self, lane: _Lane, offered: Window) -> int | None:
        """Which window of a full ``drop_oldest`` lane is shed for ``offered``: its index in
        ``lane.pending``, `_OFFERED` for the offered one, or None for none. The one place of
        the drop policy."""
        droppable = [i for i, (_, w) in enumerate(lane.pending) if not w.early]
        if not droppable:
            return None
        # Lowest rank first; ambient before other windows of that rank; then the oldest.
        index = min(
            droppable,
            key=lambda i: (shed_rank(lane.pending[i][1]), lane.pending[i][1].kind != "ambient", i),
        )
        if not offered.early and shed_rank(offered) < shed_rank(lane.pending[index][1]):
            return _OFFERED
        return index

    def take_batch(self) -> list[Window]:
        """Up to ``max_batch`` waiting windows, oldest first across all streams; they count as
        in flight until `finished`."""
        batch: list[Window] = []
        while len(batch) < self.max_batch:
            heads = [lane for lane in self._lanes.values() if lane.pending]
            if not heads:
                break
            lane = min(heads, key=lambda h: h.pending[0][0])
            _, window = lane.pending.popleft()
            lane.in_flight += 1
            batch.append(window)
        return batch

    def started(self, window: Window) -> None:
        """A window of an open stream that skipped the queue (the fast lane) is in flight."""
        self._lanes[window.stream].in_flight += 1

    def finished(self, window: Window) -> None:
        """A window taken (or started) is answered or failed: no longer in flight."""
        lane = self._lanes.get(window.stream)
        if lane is not None:
            lane.in_flight -= 1

    def clear(self) -> None:
        """Forget every waiting window (at shutdown, once the worker has stopped)."""
        for lane in self._lanes.values():
            lane.pending.clear()

    # -- counts --------------------------------------------------------------------------------

    @property
    def pending_total(self) -> int:
        """Windows waiting, all streams together."""
        return sum(len(lane.pending) for lane in self._lanes.values())

    def waiting(self, stream: str | None = None) -> tuple[Window, ...]:
        """The windows waiting, oldest first: one stream's, or every stream's (in the order
        the streams were opened)."""
        lanes = self._lanes.values() if stream is None else [self._lanes.get(stream)]
        return tuple(w for lane in lanes if lane is not None for _, w in lane.pending)

    def in_flight(self, stream: str) -> int:
        """A stream's windows taken or started and not yet finished."""
        lane = self._lanes.get(stream)
        return lane.in_flight if lane is not None else 0

    def has_room(self, stream: str) -> bool:
        """Fewer than ``bound`` windows of the stream wait (a ``backpressure`` source may push)."""
        lane = self._lanes.get(stream)
        return lane is None or len(lane.pending) < self.bound
