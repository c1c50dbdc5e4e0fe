"""The real-time pipeline: streams -> segmenters -> batched inference -> typed events -> sinks.

Data flow, all on the event loop except the model:

1. A source (microphone, file, `/audio` client) pushes blocks into its `StreamHandle`, which
   runs the stream's own segmenter and turns each finished segment (or ambient window) into a
   `Window` carrying the stream's requests (per-kind tasks and standing questions).
2. Windows wait in a bounded per-stream queue. When it is full the stream's overload policy
   applies: ``drop_oldest`` (ambient windows first, never an early command read; counted,
   each dropped window named in a ``window_dropped`` status event, summed up in at most one
   ``overload`` event a second) or ``backpressure`` (the file source waits for room).
3. One scheduler task hands the waiting windows of *all* streams, oldest first, to the
   `InferenceWorker` in batches of up to ``worker.max_batch``; when the worker is idle it
   waits up to ``worker.max_wait_ms`` for more windows to batch with the first.
4. Worker outputs become `ModelEvent`s (partials, then a final per request) and status
   changes become `StatusEvent`s; both are numbered (``seq``), stamped and published as
   dicts on the `EventBus`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.config import AgentConfig, QuestionConfig, StreamConfig, questions_from_list
from agent.errors import AgentError, ConfigError, ControlError
from agent.events import (
    AGENT_STREAM,
    EventKind,
    ModelEvent,
    StatusEvent,
    Timing,
    WallClock,
)
from agent.intents import intent_from_transcript, parse_intent
from agent.runtime.fanout import EventBus
from agent.runtime.worker import BatchReport, Final, InferenceWorker, Output, Request, Window
from streaming.events import SegmentEnded, SegmentKind
from streaming.pcm import SAMPLE_RATE_HZ as MODEL_RATE_HZ  # the model's input rate too

logger = logging.getLogger(__name__)

MAX_WINDOW_S = 30.0  # the model hears at most 30 s at once (model.salmonn.MAX_AUDIO_S)
_TASK_KIND = {
    "transcript": EventKind.TRANSCRIPT,
    "command": EventKind.COMMAND,
    "caption": EventKind.CAPTION,
    "answer": EventKind.ANSWER,
}
_OVERLOAD_REPORT_EVERY_S = 1.0
#: At shutdown, after the drain timeout: how long the cancelled batch may take to stop (it
#: stops at its next token; a long encoder call cannot be interrupted), seconds.
_CANCEL_GRACE_S = 5.0
#: After a client stops speaking, windows this close to its speech are still ignored (echo).
SPEAKING_TAIL_S = 0.25
_SPEAKING_SPANS = 64
#: Capture times are kept for this much of the latest audio: a segment's end is looked up
#: there, and it is never further back than the segmenter's end-of-speech hangover.
_CAPTURE_HISTORY_S = 10.0
#: Intents that never end an utterance early: the speaker may still be talking.
_NOT_A_COMMAND = ("none", "question")
#: Shortest audio an early command is read from, seconds.
_MIN_EARLY_S = 0.2


class _Speculation:
    """An early command window about the open segment: running, or answered (``result``).
    An answer that is a command waits for the whole pause (``is_command``); one that is not
    is held: it becomes the segment's command if nothing more is said."""

    def __init__(self, window: Window, start_sample: int, end_sample: int) -> None:
        self.window = window
        self.start_sample = start_sample
        self.end_sample = end_sample
        self.result: Final | None = None
        self.is_command = False


def _dbfs(samples: npt.NDArray[np.float32]) -> float | None:
    """RMS level in dB relative to full scale (None for no samples), rounded to 0.1 dB."""
    if not samples.size:
        return None
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return round(20.0 * np.log10(max(rms, 1e-10)), 1)


class StreamHandle:
    """One live stream: its segmenter, its waiting windows and its counters.

    Created by `Pipeline.open_stream`; the source calls `push` for every block and `end` when
    it stops. Not thread-safe: call from the event loop.

    Attributes:
        id: Stream id.
        overload: ``drop_oldest`` or ``backpressure``.
        muted: While True, pushed audio is discarded.
        speaking: While True, a client says it is speaking (see `Pipeline.control`); windows
            overlapping its speech (plus `SPEAKING_TAIL_S`) are ignored.
        counters: windows, answered, dropped, failed, muted_blocks, ignored_speaking.
    """

    def __init__(
        self, pipeline: Pipeline, settings: StreamConfig, overload: str, origin: str
    ) -> None:
        from streaming.segmenter import Segmenter

        self.id = settings.id
        self.settings = settings
        self.origin = origin
        self.overload = overload
        self.muted = settings.muted
        self.lora_scale = settings.lora_scale
        self.questions: tuple[QuestionConfig, ...] = settings.questions
        self.counters = {
            "windows": 0,
            "answered": 0,
            "dropped": 0,
            "failed": 0,
            "muted_blocks": 0,
            "ignored_speaking": 0,
            "early_windows": 0,
            "early_commands": 0,
        }
        # Early command endpointing (model.early_command_ms): the speculation about the open
        # segment, what to do with the answers of those whose segment ended while they ran
        # (window id -> emit it as the segment's command), where the next command's audio
        # starts (after a command emitted early) and how far the open segment was asked about.
        model = pipeline.config.model
        asks_commands = "command" in settings.prompts.tasks_for("speech")
        self._early_samples = (
            int(model.early_ms * MODEL_RATE_HZ / 1000) if asks_commands else 0
        )
        # Whisper is asked halfway through the pause, so its answer is ready when the pause
        # is long enough; speech resuming before then makes the answer stale.
        self._ask_samples = self._early_samples // 2
        self._early: _Speculation | None = None
        self._committed: _Speculation | None = None  # the open segment's latest early command
        self._early_fate: dict[str, bool] = {}
        self._command_from = 0
        self._early_asked_end = -1
        # [start, end or None while speaking) on the stream clock (samples), newest last.
        self._speaking_spans: collections.deque[list[int | None]] = collections.deque(
            maxlen=_SPEAKING_SPANS
        )
        self._block_dbfs: float | None = None
        self.pending: collections.deque[tuple[int, Window]] = collections.deque()
        self.in_flight = 0
        self.ended = False
        self._pipeline = pipeline
        self._segmenter = Segmenter(settings.vad)
        self._captures: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._window_numbers = itertools.count()
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        self._last_overload_report = 0.0

    # -- source side ---------------------------------------------------------------------------

    def push(self, samples: npt.NDArray[np.float32], captured_at: float | None = None) -> None:
        """Feed 16 kHz mono float32 samples captured at ``captured_at`` (``time.monotonic()``,
        None: now). Ignored after `end`, while muted, and once the pipeline stops intake."""
        if self.ended or not self._pipeline.accepting:
            return
        if self.muted:
            self.counters["muted_blocks"] += 1
            return
        captured = time.monotonic() if captured_at is None else captured_at
        self._block_dbfs = _dbfs(samples)
        events = self._segmenter.push(samples)
        self._captures.append((self._segmenter.samples_pushed, captured))
        oldest = self._segmenter.samples_pushed - int(_CAPTURE_HISTORY_S * MODEL_RATE_HZ)
        while len(self._captures) > 1 and self._captures[1][0] <= oldest:
            self._captures.popleft()
        self._handle(events)
        if self._early_samples:
            self._speculate()

    def end(self) -> None:
        """The source has stopped: close any open segment and answer what is waiting
        (idempotent). The stream closes once its windows are answered."""
        if self.ended:
            return
        self.ended = True
        if not self.muted:
            self._handle(self._segmenter.flush())
        self._pipeline._stream_ended(self)

    async def wait_room(self) -> None:
        """For ``backpressure`` sources: wait until fewer than the bound of windows wait."""
        await self._room.wait()

    async def wait_done(self) -> None:
        """Wait until the stream has ended and all its windows are answered or dropped."""
        await self._done.wait()

    @property
    def done(self) -> bool:
        """True once ended and nothing of it waits or runs."""
        return self._done.is_set()

    @property
    def speaking(self) -> bool:
        """True between ``{"speaking": true}`` and ``{"speaking": false}`` controls."""
        return bool(self._speaking_spans) and self._speaking_spans[-1][1] is None

    @speaking.setter
    def speaking(self, value: bool) -> None:
        position = self._segmenter.samples_pushed
        if value and not self.speaking:
            self._speaking_spans.append([position, None])
        elif not value and self.speaking:
            self._speaking_spans[-1][1] = position + int(SPEAKING_TAIL_S * MODEL_RATE_HZ)

    def _overlaps_speaking(self, start_sample: int, end_sample: int) -> bool:
        return any(
            start_sample < (end if end is not None else end_sample + 1) and begin < end_sample
            for begin, end in self._speaking_spans
            if begin is not None
        )

    # -- internals -----------------------------------------------------------------------------

    def _captured_at(self, end_sample: int) -> float:
        for end, captured in self._captures:
            if end >= end_sample:
                return captured
        return self._captures[-1][1] if self._captures else time.monotonic()

    def _handle(self, events: list[Any]) -> None:
        from streaming.events import AmbientWindow, SegmentStarted

        now = time.monotonic()
        for event in events:
            if isinstance(event, SegmentStarted):
                self._segment_status("segment_started", event, self._block_dbfs)
                continue
            if isinstance(event, SegmentEnded):
                kind = str(event.kind)
                self._segment_status("segment_ended", event, _dbfs(event.audio))
            elif isinstance(event, AmbientWindow):
                kind = "ambient"
            else:
                continue
            if self._overlaps_speaking(event.start_sample, event.end_sample):
                self.counters["ignored_speaking"] += 1
                self._pipeline.emit_status(
                    {
                        "status": "window_ignored",
                        "stream": self.id,
                        "message": f"{kind} {event.start_s:.2f}-{event.end_s:.2f} s ignored: "
                        "captured while a client was speaking",
                        "detail": {
                            "reason": "speaking",
                            "segment": kind,
                            "start": round(event.start_s, 3),
                            "end": round(event.end_s, 3),
                        },
                    }
                )
                continue
            command_from: int | None = None
            heard: Final | None = None
            if isinstance(event, SegmentEnded):
                command_from, heard = self._settle_speculation(event, kind)
            settings = self._pipeline.config.model
            # A read by the (smaller) command recogniser is not the transcript.
            reuse = (
                heard is not None
                and settings.transcript == "whisper"
                and not settings.command_recogniser
            )
            window = self._window(kind, event, now, command_from, skip_transcript=reuse)
            if window is not None:
                self._pipeline._enqueue(self, window)
            if (
                reuse
                and heard is not None
                and "transcript" in self.settings.prompts.tasks_for(kind)
            ):
                # An early read heard the whole segment: it is the transcript too.
                self._pipeline._emit_output(
                    dataclasses.replace(
                        heard,
                        request=Request(
                            key=f"{heard.window.id}/transcript",
                            task="transcript",
                            instruction=self.settings.prompts.instruction("transcript"),
                            engine="whisper",
                        ),
                    )
                )
            if command_from is not None and command_from > event.start_sample:
                # Speech went on after a command emitted early: the rest is the next command.
                rest = self._command_window(command_from, event.end_sample, now)
                if rest is not None:
                    self._pipeline._enqueue(self, rest)

    def _segment_status(self, status: str, event: Any, level_dbfs: float | None) -> None:
        """``segment_started`` / ``segment_ended``: for "listening" indicators and level meters."""
        detail: dict[str, Any] = {
            "segment": str(event.kind),
            "start": round(event.start_s, 3),
            "level_dbfs": level_dbfs,
            "speaking": self.speaking,
        }
        if status == "segment_ended":
            detail["end"] = round(event.end_s, 3)
        where = f"{event.end_s:.2f}" if status == "segment_ended" else f"{event.start_s:.2f}"
        self._pipeline.emit_status(
            {
                "status": status,
                "stream": self.id,
                "message": f"{event.kind} {status.split('_')[1]} at {where} s",
                "detail": detail,
            }
        )

    def _window(
        self,
        kind: str,
        event: Any,
        now: float,
        command_from: int | None = None,
        *,
        skip_transcript: bool = False,
    ) -> Window | None:
        """The window of a finished segment or ambient window. ``command_from``: for a
        segment, where its command's audio starts; None leaves the command out (it was
        answered early), a later start leaves it to `_command_window`. ``skip_transcript``:
        an early read already transcribed the whole segment."""
        rate = event.sample_rate_hz
        window_id = f"{self.id}:{next(self._window_numbers)}"
        model = self._pipeline.config.model
        default_scale = self.lora_scale if self.lora_scale is not None else model.lora_scale
        requests = []
        for task in self.settings.prompts.tasks_for(kind):
            if task == "transcript" and skip_transcript:
                continue
            if (
                task == "command"
                and isinstance(event, SegmentEnded)
                and (command_from is None or command_from > event.start_sample)
            ):
                continue
            whisper = (task == "transcript" and model.transcript == "whisper") or (
                task == "command" and model.command == "whisper"
            )
            engine = "whisper" if whisper else "llm"
            requests.append(
                Request(
                    key=f"{window_id}/{task}",
                    task=task,
                    instruction=self.settings.prompts.instruction(task),
                    lora_scale=default_scale if engine == "llm" else None,
                    engine=engine,
                )
            )
        for i, question in enumerate(self.questions):
            if kind in question.kinds:
                scale = question.lora_scale if question.lora_scale is not None else default_scale
                requests.append(
                    Request(
                        key=f"{window_id}/q{i}",
                        task="answer",
                        instruction=question.text,
                        lora_scale=scale,
                        question=question.text,
                    )
                )
        if not requests:
            return None
        audio = event.audio[-int(MAX_WINDOW_S * rate) :]
        return Window(
            id=window_id,
            stream=self.id,
            kind=kind,
            audio=audio,
            start_s=event.end_sample / rate - audio.size / rate,
            end_s=event.end_sample / rate,
            captured=min(self._captured_at(event.end_sample), now),
            segment_end=now,
            requests=tuple(requests),
        )

    # -- early command endpointing -------------------------------------------------------------

    def _speculate(self) -> None:
        """Emit a command heard in an open speech segment once it has been quiet for
        ``model.early_command_ms``, instead of waiting for its ``vad.end_silence_ms``: a robot
        told "stop" should not wait half a second of silence to be sure. Whisper is asked
        after half that pause, so its answer is usually ready by then."""
        early = self._early
        if early is not None and early.result is None:
            return  # one at a time: its answer decides where the next one starts
        segment = self._segmenter.open_segment()
        if early is not None and early.is_command:
            if segment is not None and segment.end_sample == early.end_sample:
                if segment.silence_samples >= self._early_samples:
                    self._commit(early)
                return
            self._early = None  # speech went on: the segment's own window reads it all
        if (
            segment is None
            or segment.kind != SegmentKind.SPEECH
            or segment.silence_samples < self._ask_samples
            or segment.end_sample > self._segmenter.samples_pushed  # post-roll not heard yet
            or segment.end_sample <= self._early_asked_end  # nothing new since the last ask
        ):
            return
        if self._pipeline._pending_total() or self._pipeline._in_flight:
            return  # only an idle worker reads early (asked again at the next block)
        self._early_asked_end = segment.end_sample
        start = max(segment.start_sample, self._command_from)
        if segment.end_sample - start < _MIN_EARLY_S * MODEL_RATE_HZ:
            return
        if self._overlaps_speaking(start, segment.end_sample):
            return
        window = self._command_window(start, segment.end_sample, time.monotonic(), early=True)
        if window is not None:
            self._early = _Speculation(window, start, segment.end_sample)
            self._pipeline._enqueue(self, window)

    def _command_window(
        self, start: int, end: int, now: float, *, early: bool = False
    ) -> Window | None:
        """A window asking only for the command of ``[start, end)`` of the stream."""
        start = max(start, end - int(MAX_WINDOW_S * MODEL_RATE_HZ))
        audio = self._segmenter.audio(start, end)
        if not audio.size:
            return None
        window_id = f"{self.id}:{next(self._window_numbers)}"
        # Only with model.command = "whisper" (early commands need the grammar).
        request = Request(
            key=f"{window_id}/command",
            task="command",
            instruction=self.settings.prompts.instruction("command"),
            engine="whisper",
            recogniser="command",
        )
        return Window(
            id=window_id,
            stream=self.id,
            kind="speech",
            audio=audio,
            start_s=start / MODEL_RATE_HZ,
            end_s=end / MODEL_RATE_HZ,
            captured=min(self._captured_at(end), now),
            segment_end=now,
            requests=(request,),
            early=early,
        )

    def _early_answer(self, output: Final) -> str | None:
        """What to do with the answer of an early window: ``"early"`` (a command, emitted
        now), ``"segment"`` (the command of a segment that has since ended with nothing
        more said), or None (not emitted)."""
        window = output.window
        if window.id in self._early_fate:
            return "segment" if self._early_fate.pop(window.id) else None
        early = self._early
        if early is None or early.window is not window:
            return None
        early.result = output
        early.is_command = intent_from_transcript(output.text).get("intent") not in _NOT_A_COMMAND
        if early.is_command:
            segment = self._segmenter.open_segment()
            if (
                segment is not None
                and segment.end_sample == early.end_sample
                and segment.silence_samples >= self._early_samples
            ):
                self._commit(early, emit=False)
                return "early"
            # Not quiet long enough yet: `_speculate` emits it when it is, unless speech
            # resumes first. Nor is an answer that is no command emitted yet: the speaker
            # may go on; it becomes the segment's command if nothing more is said.
        return None

    def _commit(self, early: _Speculation, *, emit: bool = True) -> None:
        """Emit an early command: the segment's speech after it is the next command."""
        self._command_from = early.end_sample
        self._early = None
        self._committed = early
        self.counters["early_commands"] += 1
        if emit and early.result is not None:
            self._pipeline._emit_output(early.result, early=True)

    def _settle_speculation(self, event: Any, kind: str) -> tuple[int | None, Final | None]:
        """At a segment's end, settle the speculation about it.

        Returns:
            Where the segment's command audio starts (None: it was, or is being, answered
            early), and an early read of exactly the whole segment, if there is one (its
            text is the segment's transcript).
        """
        early, self._early = self._early, None
        committed, self._committed = self._committed, None
        command_from = max(event.start_sample, self._command_from)
        committed_all = self._command_from >= event.end_sample
        self._command_from = 0
        nothing_new = early is not None and event.end_sample <= early.end_sample
        if "command" not in self.settings.prompts.tasks_for(kind):
            # The segment turned out not to be speech: no command, no transcript from a read.
            if early is not None and early.result is None:
                self._early_fate[early.window.id] = False
            return command_from, None
        if early is not None and early.result is None:  # still running: decide its fate
            self._early_fate[early.window.id] = nothing_new
            return (None if nothing_new else command_from), None
        if early is not None and early.result is not None and nothing_new:
            self._pipeline._emit_output(early.result)  # its answer is the segment's command
            whole = early.start_sample <= event.start_sample
            return None, early.result if whole else None
        if committed_all:
            whole = committed is not None and committed.start_sample <= event.start_sample
            return None, committed.result if whole and committed is not None else None
        return command_from, None

    def _early_failed(self, window: Window) -> None:
        self._early_fate.pop(window.id, None)
        if self._early is not None and self._early.window is window:
            self._early = None

    def _update_room(self, bound: int) -> None:
        if len(self.pending) < bound:
            self._room.set()
        else:
            self._room.clear()
        if self.ended and not self.pending and not self.in_flight:
            self._done.set()

    def stats(self) -> dict[str, Any]:
        """Counters for status events."""
        return {
            **self.counters,
            "pending": len(self.pending),
            "in_flight": self.in_flight,
            "muted": self.muted,
            "speaking": self.speaking,
            "overload": self.overload,
            "origin": self.origin,
        }


class Pipeline:
    """Streams, scheduler and event emission; an async context manager.

    Args:
        config: The validated agent configuration.
        worker: A started `InferenceWorker`.
        bus: Where events go.
        clock: Converts stamps to wall-clock time (one per agent).
    """

    def __init__(
        self,
        config: AgentConfig,
        worker: InferenceWorker,
        bus: EventBus,
        clock: WallClock | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.bus = bus
        self.clock = clock or WallClock()
        self.accepting = False
        self._streams: dict[str, StreamHandle] = {}
        self._order = itertools.count()
        self._seq = itertools.count()
        self._work: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._in_flight: list[Window] = []
        self._unfinished: list[str] = []  # windows cut by the shutdown (ids)
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self.failure: BaseException | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._work = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True
        self._scheduler = self._spawn(self._schedule(), "scheduler")
        if self.config.agent.status_interval_s > 0:
            self._spawn(self._report_stats(), "stats")
        self.emit_status(
            {
                "status": "started",
                "message": f"pipeline started with model {self.worker.model_name}",
                "detail": {"model": self.worker.model_name, "worker": self._worker_settings()},
            }
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro, name=f"pipeline-{name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            logger.error("pipeline task %s crashed", task.get_name(), exc_info=task.exception())
            self._closed.set()  # wakes `wait_failed`

    async def wait_failed(self) -> BaseException | None:
        """Wait until the pipeline stops: returns the exception of a crashed task, or None
        after a normal `close`."""
        await self._closed.wait()
        return self.failure

    async def close(self) -> None:
        """Shut down (idempotent): stop intake, end every stream (open segments become
        windows), answer what waits within ``worker.drain_timeout_s``, report the rest as
        unfinished, then stop the tasks."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.accepting = False
        for handle in list(self._streams.values()):
            handle.end()
        waiting = self._pending_total() + len(self._in_flight)
        if waiting:
            logger.info("shutting down: answering %d waiting window(s)", waiting)
        if self._work is not None:
            self._work.set()
        if self._scheduler is not None and not await self._drain(
            self.config.worker.drain_timeout_s
        ):
            left = len(self._in_flight) + self._pending_total()
            logger.warning("drain timeout: cancelling %d unanswered window(s)", left)
            # The running batch stops at its next token; the waiting windows then go through
            # the scheduler at once, cancelled: each gets its `window_unfinished` event.
            self.worker.cancel()
            if not await self._drain(_CANCEL_GRACE_S):
                logger.warning("the model did not stop within %.0f s of cancel", _CANCEL_GRACE_S)
                self._unfinished += [w.id for w in self._in_flight] + [
                    w.id for h in self._streams.values() for _, w in h.pending
                ]
        unfinished = list(dict.fromkeys(self._unfinished))
        for task in list(self._tasks):
            task.cancel("pipeline closing")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._streams.values():
            handle.pending.clear()
        self.emit_status(
            {
                "status": "stopped",
                "message": "pipeline stopped"
                + (f"; {len(unfinished)} window(s) unanswered" if unfinished else ""),
                "detail": {"unfinished_windows": unfinished, "streams": self._stream_stats()},
            }
        )
        self._closed.set()

    async def _drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the scheduler to run out of windows; False on timeout."""
        assert self._scheduler is not None
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._scheduler)
        except TimeoutError:
            return False
        except Exception:  # the scheduler crashed; its failure is recorded
            logger.debug("scheduler ended with an error", exc_info=True)
        return True

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""
        await self._closed.wait()

    async def wait_idle(self) -> None:
        """Wait until no window waits or runs."""
        assert self._idle is not None, "Pipeline used outside 'async with'"
        await self._idle.wait()

    # -- streams -------------------------------------------------------------------------------

    def open_stream(
        self, settings: StreamConfig, *, origin: str, overload: str | None = None
    ) -> StreamHandle:
        """Start a stream with its own segmenter.

        Args:
            settings: The stream's settings (`AgentConfig.stream_settings`).
            origin: Who feeds it (``mic``, ``file``, ``ws:HOST:PORT``), for status events.
            overload: Policy when ``settings.overload`` is None (default ``drop_oldest``).

        Raises:
            AgentError: the pipeline is not accepting streams.
            ConfigError: a stream with this id is open.
        """
        if not self.accepting:
            raise AgentError("the pipeline is shutting down: no new streams")
        if settings.id in self._streams:
            raise ConfigError(
                f"stream {settings.id!r} is already open ({self._streams[settings.id].origin})"
            )
        overload = settings.overload or overload or "drop_oldest"
        handle = StreamHandle(self, settings, overload, origin)
        self._streams[settings.id] = handle
        self.emit_status(
            {
                "status": "stream_opened",
                "stream": settings.id,
                "message": f"stream {settings.id} opened ({origin}, {overload})",
                "detail": {"origin": origin, "overload": overload, "muted": handle.muted},
            }
        )
        return handle

    @property
    def streams(self) -> dict[str, StreamHandle]:
        """Open streams by id."""
        return dict(self._streams)

    def _stream_ended(self, handle: StreamHandle) -> None:
        handle._update_room(self.config.worker.max_pending_windows)
        self._maybe_forget(handle)

    def _maybe_forget(self, handle: StreamHandle) -> None:
        if handle.done and self._streams.get(handle.id) is handle and not self._closing:
            del self._streams[handle.id]
            self.emit_status(
                {
                    "status": "stream_closed",
                    "stream": handle.id,
                    "message": f"stream {handle.id} closed",
                    "detail": handle.stats(),
                }
            )

    def _pending_total(self) -> int:
        return sum(len(h.pending) for h in self._streams.values())

    def _enqueue(self, handle: StreamHandle, window: Window) -> None:
        assert self._work is not None and self._full is not None and self._idle is not None
        bound = self.config.worker.max_pending_windows
        handle.counters["early_windows" if window.early else "windows"] += 1
        if (
            self._in_flight
            and window.requests
            and all(r.engine == "whisper" for r in window.requests)
        ):
            # Whisper-only work (fast-path commands and transcripts) takes a fraction of a
            # second: answer it between two tokens of the running batch, not after it. It
            # takes no place in the queue, so it never pushes a waiting window out.
            handle.in_flight += 1
            handle._update_room(bound)
            self.worker.submit_fast(
                [window], self._on_output, lambda report: self._after_batch([window], report)
            )
            return
        if len(handle.pending) >= bound and handle.overload == "drop_oldest":
            self._drop_oldest(handle)
        handle.pending.append((next(self._order), window))
        handle._update_room(bound)
        self._idle.clear()
        self._work.set()
        if self._pending_total() >= self.config.worker.max_batch:
            self._full.set()

    def _drop_oldest(self, handle: StreamHandle) -> None:
        """Make room in a full queue: drop the oldest waiting window, ambient ones first, and
        tell the subscribers which one (``window_dropped``, one per window)."""
        # Never an early command read: the segment it belongs to may already have left its
        # command to it (`_settle_speculation`), so dropping it would lose that command. A
        # stream has at most one waiting (they are taken only on an idle worker), so the
        # queue then holds one window more than its bound.
        droppable = [i for i, (_, w) in enumerate(handle.pending) if not w.early]
        if not droppable:
            return
        index = next((i for i in droppable if handle.pending[i][1].kind == "ambient"), droppable[0])
        _, victim = handle.pending[index]
        del handle.pending[index]
        handle.counters["dropped"] += 1
        logger.warning(
            "stream %s overloaded: dropped window %s (%d dropped so far)",
            handle.id,
            victim.id,
            handle.counters["dropped"],
        )
        detail = {
            "policy": "drop_oldest",
            "dropped_window": victim.id,
            "dropped_total": handle.counters["dropped"],
            "pending": len(handle.pending),
        }
        self.emit_status(
            {
                "status": "window_dropped",
                "stream": handle.id,
                "message": f"window {victim.id} ({victim.kind} {victim.start_s:.2f}-"
                f"{victim.end_s:.2f} s) dropped: the model is behind",
                "detail": {
                    "window": victim.id,
                    "reason": "overload",
                    "segment": victim.kind,
                    "start": round(victim.start_s, 3),
                    "end": round(victim.end_s, 3),
                    "requests": [r.key for r in victim.requests],
                    **detail,
                },
            }
        )
        now = time.monotonic()
        if now - handle._last_overload_report >= _OVERLOAD_REPORT_EVERY_S:
            handle._last_overload_report = now
            self.emit_status(
                {
                    "status": "overload",
                    "stream": handle.id,
                    "message": f"{handle.id}: model behind, dropped the oldest waiting window",
                    "detail": detail,
                }
            )

    def _take_batch(self) -> list[Window]:
        batch: list[Window] = []
        while len(batch) < self.config.worker.max_batch:
            heads = [h for h in self._streams.values() if h.pending]
            if not heads:
                break
            handle = min(heads, key=lambda h: h.pending[0][0])
            _, window = handle.pending.popleft()
            handle.in_flight += 1
            handle._update_room(self.config.worker.max_pending_windows)
            batch.append(window)
        return batch

    # -- scheduling ----------------------------------------------------------------------------

    async def _schedule(self) -> None:
        assert self._work is not None and self._full is not None and self._idle is not None
        max_wait_s = self.config.worker.max_wait_ms / 1000
        while True:
            if not self._pending_total():
                self._idle.set()
                if self._closing:
                    return
                self._work.clear()
                await self._work.wait()
                continue
            if (
                max_wait_s > 0
                and not self._closing
                and self._pending_total() < self.config.worker.max_batch
            ):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max_wait_s):
                        await self._full.wait()
            self._full.clear()
            batch = self._take_batch()
            self._in_flight = batch
            try:
                report = await self.worker.run(batch, self._on_output)
            finally:
                self._in_flight = []
            self._after_batch(batch, report)

    def _after_batch(self, batch: list[Window], report: BatchReport) -> None:
        for window in batch:
            handle = self._streams.get(window.stream)
            unfinished = [r.key for r in window.requests if r.key not in report.finished]
            if handle is not None:
                handle.in_flight -= 1
                if not window.early:
                    handle.counters["failed" if unfinished else "answered"] += 1
                elif unfinished:
                    handle._early_failed(window)
            if unfinished:
                status = "window_failed" if report.error else "window_unfinished"
                reason = report.error or (
                    "cancelled at shutdown" if report.cancelled else "no answer"
                )
                if not report.error:
                    self._unfinished.append(window.id)
                self.emit_status(
                    {
                        "status": status,
                        "stream": window.stream,
                        "message": f"window {window.id} ({window.end_s:.2f} s): {reason}",
                        "detail": {"window": window.id, "requests": unfinished, "error": reason},
                    }
                )
            if handle is not None:
                handle._update_room(self.config.worker.max_pending_windows)
                self._maybe_forget(handle)

    def _on_output(self, output: Output) -> None:
        if output.window.early:
            handle = self._streams.get(output.window.stream)
            if handle is None or not isinstance(output, Final):
                return
            verdict = handle._early_answer(output)
            if verdict is not None:
                self._emit_output(output, early=verdict == "early")
            return
        self._emit_output(output)

    def _emit_output(self, output: Output, *, early: bool = False) -> None:
        window, request = output.window, output.request
        final = isinstance(output, Final)
        intent = None
        if final and request.task == "command":
            # A Whisper command's text is the transcript, read by the grammar.
            read = intent_from_transcript if request.engine == "whisper" else parse_intent
            intent = read(output.text)
        now = time.monotonic()
        timing = Timing(
            captured=window.captured,
            segment_end=window.segment_end,
            model_start=output.model_start,
            first_token=output.first_token,
            emitted=now,
        )
        event = ModelEvent(
            id=request.key,
            seq=next(self._seq),
            stream=window.stream,
            kind=_TASK_KIND[request.task],
            window=window.id,
            text=output.text,
            partial=not final,
            start_s=window.start_s,
            end_s=window.end_s,
            segment=window.kind,
            model=self.worker.model_name,
            timing=timing,
            question=request.question,
            lora_scale=request.lora_scale,
            intent=intent,
            source=request.engine,
            early=early,
        )
        if final:
            self._latencies.append(now - window.segment_end)
        self.bus.publish(event.to_dict(self.clock))

    # -- control and status --------------------------------------------------------------------

    def control(self, stream_id: str, command: Mapping[str, Any]) -> None:
        """Apply a control command to an open stream; all or nothing.

        Args:
            stream_id: The stream.
            command: Any of ``{"mute": bool}``, ``{"questions": [{"text": str,
                "lora_scale": float|null, "kinds": [...]}]}`` (replaces the standing
                questions), ``{"lora_scale": float|null}`` (the stream's scale),
                ``{"speaking": bool}`` (a client, e.g. a speaker, is talking: windows that
                overlap its speech are ignored, see `StreamHandle.speaking`).

        Raises:
            ControlError: (a ``ValueError``) unknown stream, not an object, unknown key or
                invalid value; nothing is changed.
        """
        handle = self._streams.get(stream_id)
        if handle is None:
            raise ControlError(
                f"unknown stream {stream_id!r}; open streams: {sorted(self._streams)}"
            )
        if not isinstance(command, Mapping) or not command:
            raise ControlError(
                f"control command: expected a non-empty JSON object, got {command!r}"
            )
        known = ("mute", "questions", "lora_scale", "speaking")
        unknown = sorted(set(command) - set(known))
        if unknown:
            raise ControlError(
                f"control command: unknown key(s) {unknown}; known keys: {list(known)}"
            )
        changes: dict[str, Any] = {}
        if "mute" in command:
            if not isinstance(command["mute"], bool):
                raise ControlError(
                    f"control command: 'mute' expects true or false, got {command['mute']!r}"
                )
            changes["muted"] = command["mute"]
        if "speaking" in command:
            if not isinstance(command["speaking"], bool):
                raise ControlError(
                    "control command: 'speaking' expects true or false, "
                    f"got {command['speaking']!r}"
                )
            changes["speaking"] = command["speaking"]
        if "questions" in command:
            items = command["questions"]
            if not isinstance(items, list):
                raise ControlError(
                    f"control command: 'questions' expects a list of objects, got {items!r}"
                )
            try:
                changes["questions"] = questions_from_list(items, "questions")
            except ConfigError as exc:
                raise ControlError(f"control command: {exc}") from exc
        if "lora_scale" in command:
            scale = command["lora_scale"]
            if scale is not None and (
                isinstance(scale, bool)
                or not isinstance(scale, int | float)
                or not 0.0 <= scale <= 100.0
            ):
                raise ControlError(
                    "control command: 'lora_scale' expects a number in 0..100 or null, "
                    f"got {scale!r}"
                )
            changes["lora_scale"] = None if scale is None else float(scale)
        for name, value in changes.items():
            setattr(handle, name, value)
        detail = {k: ([q.text for q in v] if k == "questions" else v) for k, v in changes.items()}
        self.emit_status(
            {
                "status": "control",
                "stream": stream_id,
                "message": f"stream {stream_id}: "
                + ", ".join(f"{k} = {v}" for k, v in detail.items()),
                "detail": detail,
            }
        )

    def next_seq(self) -> int:
        """Take the next number of the agent-wide event order (for events made outside the
        pipeline, such as rule triggers)."""
        return next(self._seq)

    def emit_status(self, status: Mapping[str, Any]) -> None:
        """Publish a status event (also for other components: MQTT connection state, ...).

        Args:
            status: ``{"status": word, "message": str, "stream"?: id or "*",
                "detail"?: JSON-ready dict}``.

        Raises:
            ValueError: missing or mistyped fields.
        """
        allowed = {"status", "message", "stream", "detail"}
        if not isinstance(status, Mapping) or set(status) - allowed:
            raise ValueError(f"status: expected keys among {sorted(allowed)}, got {status!r}")
        word, message = status.get("status"), status.get("message", "")
        stream = status.get("stream", AGENT_STREAM)
        detail = status.get("detail", {})
        if (
            not isinstance(word, str)
            or not word
            or not isinstance(message, str)
            or not isinstance(stream, str)
            or not isinstance(detail, Mapping)
        ):
            raise ValueError(
                f"status: expected status, message, stream: str and detail: dict; got {status!r}"
            )
        seq = next(self._seq)
        event = StatusEvent(
            id=f"status:{seq}",
            seq=seq,
            stream=stream,
            status=word,
            message=message,
            emitted=time.monotonic(),
            detail=dict(detail),
        )
        # DEBUG: the console printer and the sinks already show every status event.
        logger.debug("status %s [%s]: %s", word, stream, message)
        self.bus.publish(event.to_dict(self.clock))

    def _worker_settings(self) -> dict[str, Any]:
        w = self.config.worker
        return {
            "max_batch": w.max_batch,
            "max_wait_ms": w.max_wait_ms,
            "max_pending_windows": w.max_pending_windows,
        }

    def _stream_stats(self) -> dict[str, Any]:
        return {sid: h.stats() for sid, h in self._streams.items()}

    def stats(self) -> dict[str, Any]:
        """Counters: streams, worker, sinks, and final-event latency after the segment end."""
        latencies = sorted(self._latencies)
        latency = {}
        if latencies:
            latency = {
                "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                "p95_ms": round(
                    1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1
                ),
                "count": len(latencies),
            }
        return {
            "streams": self._stream_stats(),
            "worker": self.worker.stats(),
            "sinks": {s.name: s.stats() for s in self.bus.subscriptions},
            "latency_after_segment_end": latency,
        }

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.agent.status_interval_s)
            self.emit_status(
                {"status": "stats", "message": "periodic counters", "detail": self.stats()}
            )
