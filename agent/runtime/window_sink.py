"""Where the pipeline's windows go: the `WindowSink` protocol and the local model's sink.

The `Pipeline` makes windows and turns answers into events; a `WindowSink` gets the windows
answered. Two implement it:

* `LocalWindows` (here): a `WindowQueue` and the scheduler that hands its batches to the
  process's own `InferenceWorker`;
* `agent.cluster.edge.RemoteWindows`: the worker pool over MQTT.

A sink reports back to the `WindowListener` it is attached to (the pipeline): each answer as
it comes (`window_output` for the local model's outputs, `window_event` for events already
made by a remote worker), each window once when it leaves (`window_done`) and any change of
what waits (`room_changed`, so ``backpressure`` sources may go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import WorkerConfig
from agent.runtime.window_queue import Drop, WindowQueue
from agent.runtime.worker import BatchReport, InferenceWorker, Output, Window

logger = logging.getLogger(__name__)

#: At shutdown, after the drain timeout: how long the cancelled batch may take to stop (it
#: stops at its next token; a long encoder call cannot be interrupted), seconds.
CANCEL_GRACE_S = 5.0


@dataclass(frozen=True)
class WindowDone:
    """How a window left its sink.

    Attributes:
        status: ``answered``; ``window_failed`` (the model raised, or no worker answered);
            ``window_unfinished`` (cut at shutdown, or no answer came); ``dropped`` (given
            up to make room).
        unfinished: The keys of its requests left without a final.
        error: Why, when not answered.
    """

    status: str = "answered"
    unfinished: tuple[str, ...] = ()
    error: str | None = None


class WindowListener(Protocol):
    """What a sink reports to (the `Pipeline`); called on the event loop."""

    def window_output(self, output: Output) -> None:
        """A partial or final answer of the local model."""

    def window_event(self, event: Mapping[str, Any], window: Window, worker: str) -> None:
        """A model event made by ``worker`` elsewhere for ``window``, to pass on."""

    def window_done(self, window: Window, done: WindowDone) -> None:
        """The sink is done with ``window`` (once per window put, unless dropped by `put`)."""

    def room_changed(self) -> None:
        """Windows left the queue without finishing (taken for a batch)."""


class WindowSink(Protocol):
    """Where windows go to be answered (see the module docstring)."""

    @property
    def model_name(self) -> str:
        """Who answers, for the ``started`` status event."""
        ...

    @property
    def busy(self) -> bool:
        """Windows wait or run."""
        ...

    @property
    def backlogged(self) -> bool:
        """Windows wait that no one is answering yet (early command reads then wait too: one
        would only queue behind them)."""
        ...

    def attach(self, listener: WindowListener) -> None:
        """Report to ``listener`` from now on (once, before any window)."""

    def check_stream(self, stream: str) -> None:
        """Raise `agent.errors.ConfigError` if a stream of this id cannot go here."""

    def open_stream(self, stream: str, overload: str) -> None:
        """A stream starts, with its overload policy (``drop_oldest``, ``backpressure``)."""

    def close_stream(self, stream: str) -> None:
        """A stream is gone (nothing of it waits or runs)."""

    def put(self, window: Window) -> Drop | None:
        """Take a window of an open stream; returns the waiting window dropped to make room
        for it, for the caller to report (None: none was)."""

    def waiting(self, stream: str) -> Sequence[Window]:
        """A stream's windows waiting here, oldest first."""

    def in_flight(self, stream: str) -> int:
        """A stream's windows being answered."""

    def has_room(self, stream: str) -> bool:
        """A ``backpressure`` source of the stream may push more."""

    def serve(self) -> Coroutine[Any, Any, None]:
        """The sink's own loop, run by the pipeline as a task (its crash fails the pipeline)."""

    async def wait_idle(self) -> None:
        """Wait until no window waits or runs."""

    async def shutdown(self, timeout_s: float) -> list[str]:
        """Answer what waits within ``timeout_s``, give up the rest (each reported done) and
        stop taking windows; returns the window ids to list unfinished in ``stopped``."""

    def stats(self) -> dict[str, Any]:
        """Counters for status events."""


class LocalWindows:
    """The process's own model as a `WindowSink`.

    Windows wait in a `WindowQueue`; one scheduler (`serve`) hands the waiting windows of all
    streams, oldest first, to the `InferenceWorker` in batches of up to ``max_batch``; when
    the worker is idle it waits up to ``max_wait_ms`` for more windows to batch with the
    first. A window of Whisper requests only that comes while a batch runs goes to the fast
    lane (`InferenceWorker.submit_fast`) instead: answered between two tokens of that batch,
    it takes no place in the queue and pushes nothing out.

    Args:
        settings: ``[worker]``: ``max_batch``, ``max_wait_ms``, ``max_pending_windows``.
        worker: A started `InferenceWorker`.
    """

    def __init__(self, settings: WorkerConfig, worker: InferenceWorker) -> None:
        self.settings = settings
        self.worker = worker
        self.queue = WindowQueue(settings.max_pending_windows, settings.max_batch)
        self._listener: WindowListener | None = None
        self._work = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()  # the scheduler has returned or crashed
        self._serving = False
        self._closing = False
        self._running: list[Window] = []
        self._unfinished: list[str] = []  # windows left without an answer (ids)

    @property
    def model_name(self) -> str:
        """The loaded model's name."""
        return self.worker.model_name

    @property
    def busy(self) -> bool:
        """Windows wait, or a batch runs."""
        return bool(self.queue.pending_total or self._running)

    @property
    def backlogged(self) -> bool:
        """Windows wait in the queue. A running batch alone is no backlog: a Whisper-only
        window (an early command read) is answered between two of its tokens (`put`)."""
        return bool(self.queue.pending_total)

    @property
    def listener(self) -> WindowListener:
        """Where reports go (`attach`)."""
        assert self._listener is not None, "LocalWindows used before attach()"
        return self._listener

    def attach(self, listener: WindowListener) -> None:
        """Report to ``listener``."""
        self._listener = listener

    def check_stream(self, stream: str) -> None:
        """Any stream id goes."""

    def open_stream(self, stream: str, overload: str) -> None:
        """Give the stream its queue."""
        self.queue.open(stream, overload)

    def close_stream(self, stream: str) -> None:
        """Forget the stream's queue."""
        self.queue.close(stream)

    def put(self, window: Window) -> Drop | None:
        """Queue a window (or answer it in the fast lane); returns what was dropped for it."""
        whisper_only = window.requests and all(r.engine == "whisper" for r in window.requests)
        if self._running and whisper_only:
            # Whisper-only work (fast-path commands and transcripts) takes a fraction of a
            # second: answer it between two tokens of the running batch, not after it.
            self.queue.started(window)
            self.worker.submit_fast(
                [window], self.listener.window_output, lambda report: self._done([window], report)
            )
            return None
        offer = self.queue.offer(window)
        self._idle.clear()
        self._work.set()
        if offer.batch_ready:
            self._full.set()
        return offer.dropped

    def waiting(self, stream: str) -> Sequence[Window]:
        """The stream's queue."""
        return self.queue.waiting(stream)

    def in_flight(self, stream: str) -> int:
        """The stream's windows in a batch or the fast lane."""
        return self.queue.in_flight(stream)

    def has_room(self, stream: str) -> bool:
        """Fewer than ``max_pending_windows`` windows of the stream wait."""
        return self.queue.has_room(stream)

    def serve(self) -> Coroutine[Any, Any, None]:
        """The scheduler (returns once shut down and nothing waits)."""
        self._serving = True
        return self._schedule()

    async def _schedule(self) -> None:
        max_wait_s = self.settings.max_wait_ms / 1000
        max_batch = self.settings.max_batch
        try:
            while True:
                if not self.queue.pending_total:
                    self._idle.set()
                    if self._closing:
                        return
                    self._work.clear()
                    await self._work.wait()
                    continue
                if max_wait_s > 0 and not self._closing and self.queue.pending_total < max_batch:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max_wait_s):
                            await self._full.wait()
                self._full.clear()
                batch = self.queue.take_batch()
                self.listener.room_changed()
                self._running = batch
                try:
                    report = await self.worker.run(batch, self.listener.window_output)
                finally:
                    self._running = []
                self._done(batch, report)
        finally:
            self._stopped.set()

    def _done(self, batch: list[Window], report: BatchReport) -> None:
        for window in batch:
            self.queue.finished(window)
            unfinished = tuple(r.key for r in window.requests if r.key not in report.finished)
            if not unfinished:
                self.listener.window_done(window, WindowDone())
                continue
            reason = report.error or ("cancelled at shutdown" if report.cancelled else "no answer")
            if not report.error:
                self._unfinished.append(window.id)
            status = "window_failed" if report.error else "window_unfinished"
            self.listener.window_done(window, WindowDone(status, unfinished, reason))

    async def wait_idle(self) -> None:
        """Wait until the scheduler finds nothing waiting."""
        await self._idle.wait()

    async def shutdown(self, timeout_s: float) -> list[str]:
        """Answer what waits within ``timeout_s``; then cancel the running batch (at its next
        token) and the waiting windows (at once, each reported unfinished)."""
        waiting = self.queue.pending_total + len(self._running)
        if waiting:
            logger.info("shutting down: answering %d waiting window(s)", waiting)
        self._closing = True
        self._work.set()
        if self._serving and not await self._drain(timeout_s):
            left = len(self._running) + self.queue.pending_total
            logger.warning("drain timeout: cancelling %d unanswered window(s)", left)
            # The running batch stops at its next token; the waiting windows then go through
            # the scheduler at once, cancelled: each gets its `window_unfinished` event.
            self.worker.cancel()
            if not await self._drain(CANCEL_GRACE_S):
                logger.warning("the model did not stop within %.0f s of cancel", CANCEL_GRACE_S)
                self._unfinished += [w.id for w in self._running] + [
                    w.id for w in self.queue.waiting()
                ]
        self.queue.clear()
        return list(dict.fromkeys(self._unfinished))

    async def _drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the scheduler to run out of windows; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._stopped.wait()
        except TimeoutError:
            return False
        return True

    def stats(self) -> dict[str, Any]:
        """The worker's counters."""
        return dict(self.worker.stats())
