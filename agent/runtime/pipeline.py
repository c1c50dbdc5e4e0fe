"""The real-time pipeline: streams -> segmenters -> batched inference -> typed events -> sinks.

Data flow, all on the event loop except the model:

1. A source (microphone, file, `/audio` client) pushes blocks into its `StreamHandle`, which
   runs the stream's own segmenter and turns each finished segment (or ambient window) into a
   `Window` carrying the stream's requests (per-kind tasks and standing questions).
   While a speech segment is still open, the stream's `Endpointer` decides when its command
   is read and emitted early (``model.early_command_ms``).
2. The pipeline hands each window to its `WindowSink`: `LocalWindows` (the process's own
   `InferenceWorker`) or the cluster's `RemoteWindows`. Locally, windows wait in a bounded
   per-stream `WindowQueue`. When it is full the stream's overload policy applies:
   ``drop_oldest`` (ambient windows first, never an early command read; counted, each dropped
   window named in a ``window_dropped`` status event, summed up in at most one ``overload``
   event a second) or ``backpressure`` (the file source waits for room). One scheduler task
   hands the waiting windows of *all* streams, oldest first, to the worker in batches of up to
   ``worker.max_batch``; when the worker is idle it waits up to ``worker.max_wait_ms`` for
   more windows to batch with the first.
3. The sink reports back to the pipeline (`WindowListener`): worker outputs become
   `ModelEvent`s (partials, then a final per request) and status changes become
   `StatusEvent`s; both are numbered (``seq``), stamped and published as dicts on the
   `EventBus`.

`StreamHandle` and `Pipeline` use only each other's public members; the endpointer and the
queue are Sans-I/O classes that return decisions and never call out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import numpy as np
import numpy.typing as npt

from agent.config import (
    AgentConfig,
    QuestionConfig,
    SoundsConfig,
    StreamConfig,
    WhisperTask,
    validate_control,
)
from agent.errors import AgentError, ConfigError, ControlError
from agent.events import (
    AGENT_STREAM,
    EventKind,
    ModelEvent,
    SoundEvent,
    StatusEvent,
    Timing,
    WallClock,
)
from agent.intents import intent_from_transcript, parse_intent
from agent.runtime.endpointer import Ask, Emit, Endpointer, Verdict
from agent.runtime.fanout import EventBus
from agent.runtime.sound_events import SoundDecision, SoundTracker, SoundTrackerConfig
from agent.runtime.window_queue import Drop, no_drops, shed_kind
from agent.runtime.window_sink import WindowDone, WindowSink
from agent.runtime.worker import Final, Output, PatchTags, Request, TagResult, Window
from model.prompts import with_instruments, with_sounds
from streaming.events import SegmentEnded
from streaming.pcm import SAMPLE_RATE_HZ as MODEL_RATE_HZ  # the model's input rate too

if TYPE_CHECKING:
    from streaming.segmenter import OpenSegment

logger = logging.getLogger(__name__)

MAX_WINDOW_S = 30.0  # the model hears at most 30 s at once (model.salmonn.MAX_AUDIO_S)
_TASK_KIND = {
    "transcript": EventKind.TRANSCRIPT,
    "command": EventKind.COMMAND,
    "caption": EventKind.CAPTION,
    "answer": EventKind.ANSWER,
}
_OVERLOAD_REPORT_EVERY_S = 1.0
# The window kinds whose caption `sounds.caption` decides (the tagger names their sound).
_TAGGED_KINDS = frozenset({"sound", "mixed"})
#: After a client stops speaking, windows this close to its speech are still ignored (echo).
SPEAKING_TAIL_S = 0.25
_SPEAKING_SPANS = 64
#: Capture times are kept for this much of the latest audio: a segment's end is looked up
#: there, and it is never further back than the segmenter's end-of-speech hangover.
_CAPTURE_HISTORY_S = 10.0


def _dbfs(samples: npt.NDArray[np.float32]) -> float | None:
    """RMS level in dB relative to full scale (None for no samples), rounded to 0.1 dB."""
    if not samples.size:
        return None
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    # float(): numpy's own rounding of its float64, as before, as a plain float.
    return float(round(20.0 * np.log10(max(rms, 1e-10)), 1))


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
        counters: windows, answered, dropped, failed, muted_blocks, ignored_speaking,
            early_windows, early_commands.
        endpointer: The stream's early command state (`Endpointer`).
        language: Whisper's language for its windows: a code, ``auto`` or codes
            comma-separated (the stream's ``language``, else ``agent.language``; a control
            command changes it).
        task: Whisper's task for them: ``transcribe`` or ``translate`` (likewise).
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
        defaults = pipeline.config.agent
        self.language: str = settings.language or defaults.language
        self.task: WhisperTask = settings.task or defaults.task
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
        # Windows shed under overload by their best task (`shed_kind`): a robot's "stop"
        # must be visibly never among them.
        self.dropped_by_kind = no_drops()
        # Early command endpointing (model.early_command_ms), for streams asked for commands.
        model = pipeline.config.model
        asks_commands = "command" in settings.prompts.tasks_for("speech")
        self.endpointer = Endpointer(
            int(model.early_ms * MODEL_RATE_HZ / 1000) if asks_commands else 0
        )
        # [start, end or None while speaking) on the stream clock (samples), newest last.
        self._speaking_spans: collections.deque[list[int | None]] = collections.deque(
            maxlen=_SPEAKING_SPANS
        )
        self._block_dbfs: float | None = None
        self.ended = False
        self._pipeline = pipeline
        self._segmenter = Segmenter(settings.vad)
        self._captures: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._window_numbers = itertools.count()
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        #: Its sound events (`StreamSounds`) when the pipeline has a tagger; else None.
        self.sounds: StreamSounds | None = None
        if pipeline.tagging is not None and pipeline.sound_tracker is not None:
            self.sounds = StreamSounds(
                pipeline,
                self.id,
                pipeline.tagging,
                pipeline.config.sounds,
                pipeline.sound_tracker,
                background=not settings.vad.ambient_every_s,
                on_idle=lambda: pipeline.stream_ended(self),
            )
        #: When the last ``overload`` status event of this stream went out (`time.monotonic()`).
        self.overload_reported_at = 0.0

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
        if self.sounds is not None:
            segmenter = self._segmenter
            self.sounds.block(samples, segmenter.samples_pushed, segmenter.open_segment(), captured)
        if self.endpointer.enabled:
            self._speculate()

    def end(self) -> None:
        """The source has stopped: close any open segment and answer what is waiting
        (idempotent). The stream closes once its windows are answered."""
        if self.ended:
            return
        self.ended = True
        if not self.muted:
            self._handle(self._segmenter.flush())
        if self.sounds is not None:
            self.sounds.end()  # its open sound events end once the tagger has answered
        self._pipeline.stream_ended(self)

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
    def pending(self) -> tuple[Window, ...]:
        """Its windows waiting for the model, oldest first."""
        return tuple(self._pipeline.sink.waiting(self.id))

    @property
    def in_flight(self) -> int:
        """Its windows being answered."""
        return self._pipeline.sink.in_flight(self.id)

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
                    "window_ignored",
                    f"{kind} {event.start_s:.2f}-{event.end_s:.2f} s ignored: "
                    "captured while a client was speaking",
                    stream=self.id,
                    detail={
                        "reason": "speaking",
                        "segment": kind,
                        "start": round(event.start_s, 3),
                        "end": round(event.end_s, 3),
                    },
                )
                continue
            if self.sounds is not None:
                # Speech segments too: the segmenter's detector takes a bark or a cry for
                # speech at times, and the tracker ignores the speech group itself.
                captured = min(self._captured_at(event.end_sample), now)
                self.sounds.window(kind, event.start_sample, event.audio, captured)
            command_from: int | None = None
            heard: Final | None = None
            if isinstance(event, SegmentEnded):
                settled = self.endpointer.segment_ended(
                    event.start_sample,
                    event.end_sample,
                    asks_command="command" in self.settings.prompts.tasks_for(kind),
                )
                if settled.emit is not None:  # an early answer is the segment's command
                    self._pipeline.emit_output(settled.emit)
                command_from, heard = settled.command_from, settled.heard
            settings = self._pipeline.config.model
            # A read by the (smaller) command recogniser is not the transcript.
            reuse = (
                heard is not None
                and settings.transcript == "whisper"
                and not settings.command_recogniser
            )
            self._enqueue_window(kind, event, now, command_from, skip_transcript=reuse)
            if (
                reuse
                and heard is not None
                and "transcript" in self.settings.prompts.tasks_for(kind)
            ):
                # An early read heard the whole segment: it is the transcript too.
                self._pipeline.emit_output(
                    dataclasses.replace(
                        heard,
                        request=Request(
                            key=f"{heard.window.id}/transcript",
                            task="transcript",
                            instruction=self.settings.prompts.instruction("transcript"),
                            engine="whisper",
                            language=heard.request.language,
                            whisper_task=heard.request.whisper_task,
                        ),
                        english=None,  # a command's reading aid, not the transcript's
                    )
                )
            if command_from is not None and command_from > event.start_sample:
                # Speech went on after a command emitted early: the rest is the next command.
                rest = self._command_window(command_from, event.end_sample, now)
                if rest is not None:
                    self._pipeline.enqueue(self, rest)

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
            status,
            f"{event.kind} {status.split('_')[1]} at {where} s",
            stream=self.id,
            detail=detail,
        )

    def _enqueue_window(
        self, kind: str, event: Any, now: float, command_from: int | None, *, skip_transcript: bool
    ) -> None:
        """Build a finished segment's or ambient window's window (`_window`) and queue it.
        Under ``sounds.caption = "unnamed"`` a sound or mixed window that asks for a caption
        waits for the tagger's answers to the audio handed to it so far (its own thread,
        milliseconds): whether the tagger named the sound decides the caption."""

        def build() -> None:
            window = self._window(kind, event, now, command_from, skip_transcript=skip_transcript)
            if window is not None:
                self._pipeline.enqueue(self, window)

        if (
            self.sounds is not None
            and self._pipeline.config.sounds.caption == "unnamed"
            and kind in _TAGGED_KINDS
            and "caption" in self.settings.prompts.tasks_for(kind)
        ):
            self.sounds.after_answers(build)
        else:
            build()

    def _captions(self, kind: str, event: Any) -> bool:
        """Whether a window of this kind gets its LLM caption (``sounds.caption``): sound and
        mixed windows under "unnamed" only when the tagger named no group in them."""
        mode = self._pipeline.config.sounds.caption
        if self.sounds is None or kind not in _TAGGED_KINDS or mode == "always":
            return True
        if mode == "never":
            return False
        rate = event.sample_rate_hz
        return not self.sounds.named(event.start_sample / rate, event.end_sample / rate)

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
            if task == "caption" and not self._captions(kind, event):
                continue  # the tagger's sound event names it (sounds.caption)
            if (
                task == "command"
                and isinstance(event, SegmentEnded)
                and (command_from is None or command_from > event.start_sample)
            ):
                continue
            whisper = (task == "transcript" and model.transcript == "whisper") or (
                task == "command" and model.command == "whisper"
            )
            engine: Literal["llm", "whisper"] = "whisper" if whisper else "llm"
            requests.append(
                Request(
                    key=f"{window_id}/{task}",
                    task=task,
                    instruction=self._instruction(task, event),
                    lora_scale=default_scale if engine == "llm" else None,
                    engine=engine,
                    language=self.language,
                    whisper_task=self.task,
                )
            )
        instruments = self._instruments(event) if self.questions else []
        # A speech or mixed window's questions get its transcript in front (in the worker);
        # the others the tagger's groups: with both, nano-dual answered speech worse
        # (BENCHMARKS.md, "Sounds heard on questions").
        spoken = kind in ("speech", "mixed")
        sounds = self._heard(event) if self.questions and not spoken else []
        for i, question in enumerate(self.questions):
            if kind in question.kinds:
                scale = question.lora_scale if question.lora_scale is not None else default_scale
                requests.append(
                    Request(
                        key=f"{window_id}/q{i}",
                        task="answer",
                        instruction=(
                            with_sounds(with_instruments(question.text, instruments), sounds)
                            if question.heard
                            else question.text
                        ),
                        lora_scale=scale,
                        question=question.text,
                        with_transcript=question.heard and spoken,
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

    def _instruction(self, task: str, event: Any) -> str:
        """A task's instruction; a caption's names the groups the tagger has heard in the
        window so far when ``sounds.caption_labels`` is on (`SoundsConfig.caption_prompt`)."""
        instruction = self.settings.prompts.instruction(task)
        sounds = self._pipeline.config.sounds
        if task != "caption" or not sounds.caption_labels:
            return instruction
        return sounds.caption_prompt(instruction, self._heard(event))

    def _heard(self, event: Any) -> list[tuple[str, float]]:
        """The groups the tagger heard in the window so far, which captions (with
        ``sounds.caption_labels``) and ``heard`` questions name in front; none without
        ``[sounds]``."""
        if self.sounds is None:
            return []
        rate = event.sample_rate_hz
        sounds = self._pipeline.config.sounds
        return self.sounds.heard(
            event.start_sample / rate, event.end_sample / rate, sounds.threshold * sounds.off_ratio
        )

    def _instruments(self, event: Any) -> list[tuple[str, float]]:
        """The instruments the tagger heard in the window where it heard music, which
        ``heard`` questions name in front (the transcript goes in front of that in the worker,
        `Request.with_transcript`); none without ``[sounds]``."""
        if self.sounds is None:
            return []
        rate = event.sample_rate_hz
        sounds = self._pipeline.config.sounds
        return self.sounds.instruments(
            event.start_sample / rate, event.end_sample / rate, sounds.threshold * sounds.off_ratio
        )

    # -- early command endpointing -------------------------------------------------------------

    def _speculate(self) -> None:
        """After a block: let the endpointer decide about the open segment (see
        `agent.runtime.endpointer`), and do what it says."""
        step = self.endpointer.block(
            self._segmenter.open_segment(),
            self._segmenter.samples_pushed,
            busy=self._pipeline.backlogged,
        )
        if isinstance(step, Emit):
            self.counters["early_commands"] += 1
            self._pipeline.emit_output(step.answer, early=True)
        elif isinstance(step, Ask) and not self._overlaps_speaking(
            step.start_sample, step.end_sample
        ):
            window = self._command_window(
                step.start_sample, step.end_sample, time.monotonic(), early=True
            )
            if window is not None:
                self.endpointer.asked(window, step.start_sample, step.end_sample)
                self._pipeline.enqueue(self, window)

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
            language=self.language,
            whisper_task=self.task,
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

    # -- the pipeline's side -------------------------------------------------------------------

    def early_answer(self, output: Final) -> Verdict:
        """What to do with the answer of an early window: ``"early"`` (a command, to emit now
        as early), ``"segment"`` (the command of a segment that has since ended with nothing
        more said), or None (not to emit)."""
        verdict = self.endpointer.answer(output, self._segmenter.open_segment())
        if verdict == "early":
            self.counters["early_commands"] += 1
        return verdict

    def early_failed(self, window: Window) -> None:
        """An early window of this stream got no answer."""
        self.endpointer.failed(window)

    def refresh(self, *, room: bool, idle: bool) -> None:
        """Set by the pipeline whenever its sink's hold on the stream changes: ``room``, a
        ``backpressure`` source may push; ``idle``, nothing of the stream waits or runs
        (once ended, the stream is done)."""
        if room:
            self._room.set()
        else:
            self._room.clear()
        if self.ended and idle and (self.sounds is None or self.sounds.closed):
            self._done.set()

    def stats(self) -> dict[str, Any]:
        """Counters for status events."""
        return {
            **self.counters,
            "dropped_by_kind": dict(self.dropped_by_kind),
            "pending": len(self.pending),
            "in_flight": self.in_flight,
            "muted": self.muted,
            "speaking": self.speaking,
            "overload": self.overload,
            "origin": self.origin,
            **(self.sounds.counters if self.sounds is not None else {}),
        }


class Pipeline:
    """Streams, their windows' way to a `WindowSink` and event emission; an async context
    manager. It is the sink's `WindowListener` (`window_output`, `window_event`,
    `window_done`, `room_changed`).

    Args:
        config: The validated agent configuration.
        sink: Where windows go to be answered (`LocalWindows` over this process's model, or
            the cluster's `RemoteWindows`).
        bus: Where events go.
        clock: Converts stamps to wall-clock time (one per agent).
        tagging: The sound tagger (`InferenceWorker` with one loaded), used when
            ``[sounds]`` is on: every stream then gets its `StreamSounds`. None: no sound
            events.
    """

    def __init__(
        self,
        config: AgentConfig,
        sink: WindowSink,
        bus: EventBus,
        clock: WallClock | None = None,
        tagging: SoundTagging | None = None,
    ) -> None:
        self.config = config
        self.tagging = tagging if config.sounds.enabled else None
        self.sound_tracker: SoundTrackerConfig | None = None
        if self.tagging is not None:
            from agent.runtime.sound_events import tracker_config

            tagger = self.tagging.sound_tagger
            groups = {
                g: tuple(tagger.class_names[i] for i in ix) for g, ix in tagger.groups.items()
            }
            self.sound_tracker = tracker_config(config.sounds, groups)
        self.sink = sink
        self.sink.attach(self)
        self.bus = bus
        self.clock = clock or WallClock()
        self.accepting = False
        self._streams: dict[str, StreamHandle] = {}
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()
        self.failure: BaseException | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        # From the capture of a tagged clip's last sample to its sound event's start.
        self._sound_latencies: collections.deque[float] = collections.deque(maxlen=1000)
        # Windows dropped by kind, all streams together (closed ones too): the stats event's
        # ``dropped_by_kind``.
        self._dropped_by_kind = no_drops()

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.accepting = True
        self._spawn(self.sink.serve(), "scheduler")
        if self.config.agent.status_interval_s > 0:
            self._spawn(self._report_stats(), "stats")
        model = self.sink.model_name
        self.emit_status(
            "started",
            f"pipeline started with model {model}",
            detail={"model": model, "worker": self._worker_settings()},
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
        windows), let the sink answer what waits within ``worker.drain_timeout_s`` and report
        the rest as unfinished (`WindowSink.shutdown`), then stop the tasks."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.accepting = False
        for handle in list(self._streams.values()):
            handle.end()
        unfinished = await self.sink.shutdown(self.config.worker.drain_timeout_s)
        await self._finish_sounds(self.config.worker.drain_timeout_s)
        for task in list(self._tasks):
            task.cancel("pipeline closing")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.emit_status(
            "stopped",
            "pipeline stopped"
            + (f"; {len(unfinished)} window(s) unanswered" if unfinished else ""),
            detail={"unfinished_windows": unfinished, "streams": self._stream_stats()},
        )
        self._closed.set()

    async def _finish_sounds(self, timeout_s: float) -> None:
        """At shutdown: let the tagger answer what is out (within ``timeout_s``), then end
        every stream's open sound events."""
        sounds = [h.sounds for h in self._streams.values() if h.sounds is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(s.wait_idle() for s in sounds))
        for stream_sounds in sounds:
            stream_sounds.abandon()

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""
        await self._closed.wait()

    async def wait_idle(self) -> None:
        """Wait until no window waits or runs."""
        await self.sink.wait_idle()

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
            ConfigError: a stream with this id is open, or the sink refuses the id.
        """
        self.sink.check_stream(settings.id)
        if not self.accepting:
            raise AgentError("the pipeline is shutting down: no new streams")
        if settings.id in self._streams:
            raise ConfigError(
                f"stream {settings.id!r} is already open ({self._streams[settings.id].origin})"
            )
        overload = settings.overload or overload or "drop_oldest"
        handle = StreamHandle(self, settings, overload, origin)
        self.sink.open_stream(settings.id, overload)
        self._streams[settings.id] = handle
        self.emit_status(
            "stream_opened",
            f"stream {settings.id} opened ({origin}, {overload})",
            stream=settings.id,
            detail={"origin": origin, "overload": overload, "muted": handle.muted},
        )
        return handle

    @property
    def streams(self) -> dict[str, StreamHandle]:
        """Open streams by id."""
        return dict(self._streams)

    @property
    def busy(self) -> bool:
        """Windows wait for or run on the model (`WindowSink.busy`)."""
        return self.sink.busy

    @property
    def backlogged(self) -> bool:
        """Windows wait for the model that it is not answering yet (`WindowSink.backlogged`)."""
        return self.sink.backlogged

    def stream_ended(self, handle: StreamHandle) -> None:
        """Called by `StreamHandle.end` once its last windows are made."""
        self._refresh()
        self._maybe_forget(handle)

    def _refresh(self) -> None:
        """Tell every stream whether its source may push and whether anything of it is left
        (a ``backpressure`` stream's room may depend on the others': the cluster's bound is
        shared)."""
        sink = self.sink
        for handle in self._streams.values():
            sid = handle.id
            handle.refresh(
                room=sink.has_room(sid), idle=not sink.waiting(sid) and not sink.in_flight(sid)
            )

    def _maybe_forget(self, handle: StreamHandle) -> None:
        if handle.done and self._streams.get(handle.id) is handle and not self._closing:
            del self._streams[handle.id]
            self.sink.close_stream(handle.id)
            self.emit_status(
                "stream_closed",
                f"stream {handle.id} closed",
                stream=handle.id,
                detail=handle.stats(),
            )

    def enqueue(self, handle: StreamHandle, window: Window) -> None:
        """Hand a window of an open stream to the sink (the stream's windows come this way)."""
        handle.counters["early_windows" if window.early else "windows"] += 1
        drop = self.sink.put(window)
        if drop is not None:
            self._report_drop(handle, drop)
        self._refresh()

    def _report_drop(self, handle: StreamHandle, drop: Drop) -> None:
        """Count a window dropped to make room and tell the subscribers which one
        (``window_dropped``, one per window; ``overload`` at most once a second)."""
        victim = drop.window
        kind = self._count_drop(handle, victim)
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
            "pending": drop.waiting,
            "kind": kind,
            "dropped_by_kind": dict(handle.dropped_by_kind),
        }
        self.emit_status(
            "window_dropped",
            f"window {victim.id} ({victim.kind} {victim.start_s:.2f}-"
            f"{victim.end_s:.2f} s) dropped: the model is behind",
            stream=handle.id,
            detail={
                "window": victim.id,
                "reason": "overload",
                "segment": victim.kind,
                "start": round(victim.start_s, 3),
                "end": round(victim.end_s, 3),
                "requests": [r.key for r in victim.requests],
                **detail,
            },
        )
        now = time.monotonic()
        if now - handle.overload_reported_at >= _OVERLOAD_REPORT_EVERY_S:
            handle.overload_reported_at = now
            self.emit_status(
                "overload",
                f"{handle.id}: model behind, dropped the oldest waiting window",
                stream=handle.id,
                detail=detail,
            )

    def _count_drop(self, handle: StreamHandle, window: Window) -> str:
        """Count a dropped window in its stream and per kind; returns the kind (`shed_kind`)."""
        kind = shed_kind(window)
        handle.counters["dropped"] += 1
        handle.dropped_by_kind[kind] += 1
        self._dropped_by_kind[kind] += 1
        return kind

    # -- what the sink reports (WindowListener) ------------------------------------------------

    def room_changed(self) -> None:
        """Windows left the sink's queue for the model: sources may push again."""
        self._refresh()

    def window_done(self, window: Window, done: WindowDone) -> None:
        """The sink is done with a window: count it, report it if unanswered."""
        handle = self._streams.get(window.stream)
        answered = done.status == "answered"
        if handle is not None:
            if not window.early and done.status == "dropped":
                self._count_drop(handle, window)
            elif not window.early:
                handle.counters["answered" if answered else "failed"] += 1
            elif not answered:
                handle.early_failed(window)
        if not answered:
            self.emit_status(
                "window_unfinished" if done.status == "dropped" else done.status,
                f"window {window.id} ({window.end_s:.2f} s): {done.error}",
                stream=window.stream,
                detail={
                    "window": window.id,
                    "requests": list(done.unfinished),
                    "error": done.error,
                },
            )
        if handle is not None:
            self._refresh()
            self._maybe_forget(handle)

    def window_output(self, output: Output) -> None:
        """An answer of the local model: an event, unless it is an early read the stream's
        endpointer holds back."""
        if output.window.early:
            handle = self._streams.get(output.window.stream)
            if handle is None or not isinstance(output, Final):
                return
            verdict = handle.early_answer(output)
            if verdict is not None:
                self.emit_output(output, early=verdict == "early")
            return
        self.emit_output(output)

    def window_event(self, event: Mapping[str, Any], window: Window, worker: str) -> None:
        """A model event made by a remote worker (its schema dict): passed on with this
        agent's ``seq``, its ``timing.emitted`` and a ``worker`` field naming who answered.
        One that is not a model event of this schema is logged and dropped."""
        now = time.monotonic()
        try:
            remote = ModelEvent.from_dict(event, self.clock)
        except ValueError as exc:
            logger.warning("window %s: event from worker %s dropped: %s", window.id, worker, exc)
            return
        relayed = dataclasses.replace(
            remote,
            seq=self.next_seq(),
            timing=dataclasses.replace(remote.timing, emitted=now),
            worker=worker,
        )
        if not relayed.partial:
            self._latencies.append(now - window.segment_end)
        self.bus.publish(relayed)

    def emit_output(self, output: Output, *, early: bool = False) -> None:
        """Publish an answer as a `ModelEvent` (``early``: a command emitted before its
        segment ended)."""
        window, request = output.window, output.request
        final = isinstance(output, Final)
        intent = None
        language = probability = english = None
        translated = False
        if isinstance(output, Final):
            language, probability = output.language, output.language_probability
            # Whisper's English from speech in another language: its translate task, or the
            # translation of a command decoded beside its transcript.
            translated = language not in (None, "en") and (
                request.whisper_task == "translate" or output.english is not None
            )
        if isinstance(output, Final) and request.task == "command":
            if request.engine == "whisper":
                # A Whisper command's text is the transcript, read by the English grammar:
                # the English translation of the same audio when it is in another language.
                if translated:
                    english = output.english if output.english is not None else output.text
                intent = intent_from_transcript(output.text if english is None else english)
            else:
                intent = parse_intent(output.text)
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
            model=self.sink.model_name,
            timing=timing,
            question=request.question,
            lora_scale=request.lora_scale,
            intent=intent,
            source=request.engine,
            early=early,
            language=language,
            language_probability=probability,
            translated=translated,
            english=english,
        )
        if final:
            self._latencies.append(now - window.segment_end)
        self.bus.publish(event)

    def emit_sound(self, decision: SoundDecision, segment: str, timing: Timing) -> None:
        """Publish a sound tracker's decision as a `SoundEvent` (``timing.emitted``: now)."""
        now = time.monotonic()
        event = SoundEvent(
            id=decision.occurrence_id,
            seq=next(self._seq),
            stream=decision.occurrence_id.rsplit(":sound:", 1)[0],
            state=decision.state,
            group=decision.group,
            score=decision.score,
            labels=decision.labels,
            sustained=decision.sustained,
            start_s=decision.start_s,
            end_s=decision.end_s,
            segment=segment,
            model=SOUND_MODEL,
            timing=dataclasses.replace(timing, emitted=now),
        )
        if decision.state == "start" and timing.captured is not None:
            self._sound_latencies.append(now - timing.captured)
        self.bus.publish(event)

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
        changes = validate_control(command)  # ControlError with the reason; nothing changed
        for name, value in changes.items():
            setattr(handle, name, value)
        detail = {k: ([q.text for q in v] if k == "questions" else v) for k, v in changes.items()}
        self.emit_status(
            "control",
            f"stream {stream_id}: " + ", ".join(f"{k} = {v}" for k, v in detail.items()),
            stream=stream_id,
            detail=detail,
        )

    def next_seq(self) -> int:
        """Take the next number of the agent-wide event order (for events made outside the
        pipeline, such as rule triggers)."""
        return next(self._seq)

    def emit_status(
        self,
        status: str,
        message: str,
        *,
        stream: str = AGENT_STREAM,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish a status event (also for other components: MQTT connection state, ...).

        Args:
            status: A short machine-readable word (``docs/events.md`` lists them).
            message: One human-readable line.
            stream: The stream it concerns, or ``"*"`` (the whole agent).
            detail: JSON-ready details (counters, window ids, ...).
        """
        seq = next(self._seq)
        event = StatusEvent(
            id=f"status:{seq}",
            seq=seq,
            stream=stream,
            status=status,
            message=message,
            emitted=time.monotonic(),
            detail=dict(detail or {}),
        )
        # DEBUG: the console printer and the sinks already show every status event.
        logger.debug("status %s [%s]: %s", status, stream, message)
        self.bus.publish(event)

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
        latency = _percentiles_ms(self._latencies)
        return {
            "streams": self._stream_stats(),
            "worker": self.sink.stats(),
            "sinks": {s.name: s.stats() for s in self.bus.subscriptions},
            "latency_after_segment_end": latency,
            "dropped_by_kind": dict(self._dropped_by_kind),
            **({"sounds": self.sound_stats()} if self.tagging is not None else {}),
        }

    def sound_stats(self) -> dict[str, Any]:
        """Sound events: counters summed over the open streams, and the latency from the
        capture of a tagged clip's last sample to the ``start`` it made (p50/p95 ms)."""
        totals: collections.Counter[str] = collections.Counter()
        for handle in self._streams.values():
            if handle.sounds is not None:
                totals.update(handle.sounds.counters)
        latency = _percentiles_ms(self._sound_latencies)
        return {**totals, "start_after_capture": latency}

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.agent.status_interval_s)
            self.emit_status("stats", "periodic counters", detail=self.stats())


# ---------------------------------------------------------------------------------------------
# Sound events: the tagger's side of a stream


class SoundTagging(Protocol):
    """What tags audio for the pipeline (`InferenceWorker.submit_tags`)."""

    @property
    def sound_tagger(self) -> Any:
        """The loaded `model.sound_tagger.SoundTagger` (its ``config`` gives the patch size)."""
        ...

    def submit_tags(
        self, clips: Sequence[npt.NDArray[np.float32]], on_done: Callable[[TagResult], None]
    ) -> None:
        """Tag ``clips``; ``on_done`` on the loop, in the order of submission."""


#: The tagger's name in sound events.
SOUND_MODEL = "yamnet"


class StreamSounds:
    """One stream's sound events: what it hands the tagger and its `SoundTracker`.

    The stream's audio is tagged in stream order, in 0.96 s patches at YAMNet's 0.48 s hop
    while something is heard, and sparsely while nothing is (`StreamHandle` calls `block`
    after each block and `window` for each segment and ambient window):

    - while a segment is open, one patch of its latest audio every 0.48 s of it (so a
      sustained sound starts its event while it goes on, not when its segment ends);
    - at a segment's end (speech too: the segmenter's detector takes a bark or a cry for
      speech at times, and the tracker ignores the speech group itself) or an ambient
      window, the part not tagged yet, from one patch before it (a window shorter than a
      patch is padded by the tagger);
    - between segments, one patch of the latest audio every `SoundsConfig.background_every_s`
      (audio the segmenter folds into the background: music, an appliance, a long alarm),
      unless the stream makes ambient windows (they cover that audio).

    The tagger's answers come back in submission order; each patch goes to the tracker on the
    stream clock (a patch that starts before the tracker's clock is taken from the clock
    on), and each decision is published as a `SoundEvent` (`Pipeline.emit_sound`). After
    `end`, once every answer is in, the tracker is closed: what is open ends.

    Args:
        pipeline: Where events go.
        stream: The stream id.
        tagging: The tagger (`SoundTagging`).
        sounds: The ``[sounds]`` slice.
        tracker: The tracker settings (`agent.runtime.sound_events.tracker_config`).
        background: Take background patches (the stream makes no ambient windows).
        on_idle: Called when the stream has ended and its last answer is in.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        stream: str,
        tagging: SoundTagging,
        sounds: SoundsConfig,
        tracker: SoundTrackerConfig,
        *,
        background: bool,
        on_idle: Callable[[], None],
    ) -> None:
        config = tagging.sound_tagger.config
        self._pipeline = pipeline
        self._tagging = tagging
        self._on_idle = on_idle
        self.tracker = SoundTracker(stream, tracker)
        self.patch_samples = int(config.patch_samples)
        self.hop_samples = int(config.patch_hop_samples)
        every = int(sounds.background_every_s * MODEL_RATE_HZ) if background else 0
        self._every = every
        self._next_background = max(every, self.patch_samples)
        self._next_live = 0  # the stream position of the open segment's next patch
        self._tagged_until = 0  # the end of the latest audio handed to the tagger (samples)
        # The latest blocks (newest last), enough for one patch.
        self._recent: collections.deque[npt.NDArray[np.float32]] = collections.deque()
        self._recent_samples = 0
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.ended = False
        self.closed = False
        self._last_segment = "background"  # what the last answer tagged (for closing ends)
        # The latest answered patches, (start_s, end_s, patch), for caption and question prompts.
        self._heard: collections.deque[tuple[float, float, PatchTags]] = collections.deque()
        # Clips handed to the tagger and answered (answers come in the order of submission),
        # and what waits for the answers up to a count (`after_answers`).
        self._submitted = 0
        self._answered = 0
        self._waiting: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self.counters = {
            "tagged_windows": 0,
            "live_patches": 0,
            "background_patches": 0,
            "sound_events": 0,
        }

    @property
    def idle(self) -> bool:
        """Nothing handed to the tagger is still out."""
        return self.pending == 0

    async def wait_idle(self) -> None:
        """Wait until `idle`."""
        await self._idle.wait()

    def window(
        self, kind: str, start_sample: int, audio: npt.NDArray[np.float32], captured: float
    ) -> None:
        """Tag what is not tagged yet of a segment or ambient window starting at
        ``start_sample`` (stream clock), from one patch before it."""
        end_sample = start_sample + audio.size
        if self.ended or self._tagged_until >= end_sample:
            return
        begin = max(start_sample, self._tagged_until - (self.patch_samples - self.hop_samples))
        begin = min(begin, max(start_sample, end_sample - self.patch_samples))
        self._tagged_until = end_sample
        self.counters["tagged_windows"] += 1
        self._submit(kind, begin / MODEL_RATE_HZ, audio[begin - start_sample :], captured)

    def block(
        self,
        samples: npt.NDArray[np.float32],
        pushed: int,
        segment: OpenSegment | None,
        captured: float,
    ) -> None:
        """After a block (``pushed``: the stream's samples so far; ``segment``: the one
        open, if any): tag the latest patch when one is due."""
        if self.ended:
            return
        self._recent.append(samples)
        self._recent_samples += samples.size
        while self._recent and self._recent_samples - self._recent[0].size >= self.patch_samples:
            self._recent_samples -= self._recent.popleft().size
        if segment is not None:
            if pushed - segment.start_sample >= self.patch_samples and pushed >= self._next_live:
                self._next_live = pushed + self.hop_samples
                self.counters["live_patches"] += 1
                self._tag_latest(str(segment.kind), pushed, captured)
            return
        if not self._every or pushed < self._next_background:
            return
        self._next_background = pushed + self._every
        self.counters["background_patches"] += 1
        self._tag_latest("background", pushed, captured)

    def _tag_latest(self, segment: str, pushed: int, captured: float) -> None:
        if self._recent_samples < self.patch_samples:
            return
        patch = np.concatenate(self._recent)[-self.patch_samples :]
        self._tagged_until = pushed
        self._submit(segment, (pushed - patch.size) / MODEL_RATE_HZ, patch, captured)

    def end(self) -> None:
        """The stream ended: close the tracker once the answers still out are in."""
        self.ended = True
        self._recent.clear()
        if self.idle:
            self._close()

    def abandon(self) -> None:
        """The pipeline is closing and answers still out may never come: close now (windows
        waiting for them, `after_answers`, are dropped)."""
        self.ended = True
        self._waiting.clear()
        self._close()

    def _submit(
        self, segment: str, start_s: float, audio: npt.NDArray[np.float32], captured: float
    ) -> None:
        made = time.monotonic()

        def done(result: TagResult) -> None:
            self._answer(result, segment, start_s, captured, made)

        try:
            self._tagging.submit_tags([audio], done)
        except AgentError:  # the worker is closing: nothing more will be tagged
            return
        self._submitted += 1
        self.pending += 1
        self._idle.clear()

    def after_answers(self, then: Callable[[], None]) -> None:
        """Call ``then`` once the tagger has answered every clip handed to it so far (at
        once when it has); never if the stream is abandoned first."""
        if self._answered >= self._submitted or self.closed:
            then()
        else:
            self._waiting.append((self._submitted, then))

    def _answer(
        self, result: TagResult, segment: str, start_s: float, captured: float, made: float
    ) -> None:
        self.pending -= 1
        self._answered += 1
        if not self.pending:
            self._idle.set()
        if self.closed:
            return
        try:
            self._apply(result, segment, start_s, captured, made)
        finally:
            # Windows waiting for these answers go before the tracker closes (`end`), so a
            # stream's last window is queued before the stream counts as done.
            while self._waiting and self._waiting[0][0] <= self._answered:
                self._waiting.popleft()[1]()
        if self.ended and self.idle:
            self._close()

    def _apply(
        self, result: TagResult, segment: str, start_s: float, captured: float, made: float
    ) -> None:
        if result.error is not None:
            self._pipeline.emit_status(
                "sound_tagger_failed",
                f"sound tagger failed on a {segment} clip at {start_s:.2f} s: {result.error}",
                stream=self.tracker.stream,
                detail={"segment": segment, "start": round(start_s, 3), "error": result.error},
            )
        timing = Timing(captured=captured, segment_end=made, model_start=result.model_start)
        self._last_segment = segment
        tracker = self.tracker
        for patches in result.clips:
            for patch in patches:
                self._remember(start_s + patch.start_s, start_s + patch.end_s, patch)
                begin = max(start_s + patch.start_s, tracker.clock_s)
                end = max(begin, start_s + patch.end_s)
                for decision in tracker.observe(begin, end, patch.groups, patch.labels):
                    self._publish(decision, segment, timing)

    def _remember(self, start_s: float, end_s: float, patch: PatchTags) -> None:
        self._heard.append((start_s, end_s, patch))
        # A window is at most MAX_WINDOW_S long: older patches can name nothing in it.
        while self._heard and self._heard[0][1] < end_s - MAX_WINDOW_S - 1.0:
            self._heard.popleft()

    def heard(
        self, start_s: float, end_s: float, min_score: float, k: int = 3
    ) -> list[tuple[str, float]]:
        """The ``k`` groups heard best in ``[start_s, end_s]`` of the stream so far: each
        group's highest score over the answered patches that overlap it, at least
        ``min_score``, without the tracker's ignored groups (speech, the room), best first.
        Patches still out with the tagger are not counted (a caption is never held back)."""
        ignored = self.tracker.config.ignore
        best: dict[str, float] = {}
        for patch_start, patch_end, patch in self._heard:
            if patch_end <= start_s or patch_start >= end_s:
                continue
            for group, score in patch.groups.items():
                if group not in ignored and score >= min_score and score > best.get(group, 0.0):
                    best[group] = score
        return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]

    def instruments(
        self, start_s: float, end_s: float, min_music: float, k: int = 2
    ) -> list[tuple[str, float]]:
        """The ``k`` instruments heard best in ``[start_s, end_s]`` (each one's highest score
        over the answered patches that overlap it), when the ``music`` group scored at least
        ``min_music`` there; else none."""
        best: dict[str, float] = {}
        music = 0.0
        for patch_start, patch_end, patch in self._heard:
            if patch_end <= start_s or patch_start >= end_s:
                continue
            music = max(music, patch.groups.get("music", 0.0))
            for name, score in patch.instruments:
                best[name] = max(score, best.get(name, 0.0))
        if music < min_music:
            return []
        return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]

    def named(self, start_s: float, end_s: float) -> bool:
        """Whether the answered patches overlapping ``[start_s, end_s]`` scored a group the
        tracker does not ignore at or above that group's start threshold on as many patches
        as a sound event needs to start (`SoundTrackerConfig.min_patches`): a sound named
        on fewer gets no event, so it keeps its caption."""
        config = self.tracker.config
        counts: collections.Counter[str] = collections.Counter()
        for patch_start, patch_end, patch in self._heard:
            if patch_end <= start_s or patch_start >= end_s:
                continue
            for group, score in patch.groups.items():
                if group not in config.ignore and score >= config.on_threshold(group):
                    counts[group] += 1
        return any(n >= config.min_patches for n in counts.values())

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        timing = Timing(captured=None, segment_end=time.monotonic())
        for decision in self.tracker.close():
            self._publish(decision, self._last_segment, timing)
        self._on_idle()

    def _publish(self, decision: SoundDecision, segment: str, timing: Timing) -> None:
        self.counters["sound_events"] += 1
        self._pipeline.emit_sound(decision, segment, timing)


def _percentiles_ms(seconds: Iterable[float]) -> dict[str, float | int]:
    """``{"p50_ms", "p95_ms", "count"}`` of latencies in seconds; empty when there are none."""
    ordered = sorted(seconds)
    if not ordered:
        return {}
    return {
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "count": len(ordered),
    }
