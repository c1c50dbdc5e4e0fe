"""The inference worker: one thread owns the model and answers batches of windows.

Two layers:

* `BatchRunner` is synchronous and knows nothing of asyncio: given windows (each with its
  requests: transcript, command, caption, questions) it runs Whisper's requests first
  (commands' decodes before transcripts'), then encodes the LLM windows' audio and answers
  their requests grouped by LoRA scale, each group one batched `generate_from_tokens` call.
  It reports `Partial` and `Final` outputs through a callback while tokens come. A row's
  final is reported as soon as that row has stopped (it is absent from a decoding step), not
  when the whole batch ends. Between its stages and its tokens it lets the fast lane run
  (`between_tokens`): a command said meanwhile waits for no one's caption.
* `InferenceWorker` runs the runner on a dedicated single thread (`ThreadPoolExecutor` with one
  worker), so torch never blocks the event loop, and hands outputs back with
  `call_soon_threadsafe`, in order, before the batch's await returns.

On a GPU (``model.device``): the model is where `Salmonn.from_config` put it, and everything
here follows it. A batch's windows, from every stream, go through the encoders together and
each LoRA group is one `generate_from_tokens` call on the device (its KV cache is the LLM's,
on the device); Whisper's fast path decodes there too. The command recogniser is loaded on the
model's device in its dtype (`model_placement`). Only the audio arrives from the host (log-mel
features are computed there in float32, as the official code), and tokens go back to it one
step at a time for streaming. CPU weight packing (`model.packing`) is skipped off the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from model.prompts import with_transcript

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Request:
    """One thing asked of a window.

    Attributes:
        key: The answer's event id, ``<window>/<task>`` (questions: ``<window>/q<i>``).
        task: ``transcript``, ``command``, ``caption`` or ``answer``.
        instruction: The prompt text.
        lora_scale: LoRA scale (None: alpha / r).
        engine: ``llm``, or ``whisper`` for Whisper's own decoder (transcripts; commands get
            the transcript as their text, read by `agent.intents.intent_from_transcript`).
        recogniser: For ``whisper`` requests: ``model`` (the model's own Whisper) or
            ``command`` (the worker's command recogniser, ``model.command_whisper``, when one
            is loaded).
        question: For answers, the standing question.
        language: For ``whisper`` requests: the stream's spoken language, a Whisper code,
            ``auto`` (detected per window on the same encoder pass) or comma-separated codes
            (detected among those, `agent.config.detection_candidates`).
        whisper_task: For ``whisper`` requests: ``transcribe`` or ``translate`` (English).
        with_transcript: For ``llm`` requests: asked with Whisper's transcript of the window in
            front (`model.prompts.with_transcript`); the text of the window's own Whisper
            transcript (or command) request when it has one, else the model's Whisper hears it
            for this.
    """

    key: str
    task: str
    instruction: str
    lora_scale: float | None = None
    engine: Literal["llm", "whisper"] = "llm"
    question: str | None = None
    recogniser: Literal["model", "command"] = "model"
    language: str = "en"
    whisper_task: Literal["transcribe", "translate"] = "transcribe"
    with_transcript: bool = False

    @property
    def english_whisper(self) -> bool:
        """Whisper transcribing English: the path any recogniser (tiny.en too) can take."""
        return self.language == "en" and self.whisper_task == "transcribe"


@dataclass(frozen=True)
class Window:
    """An audio window waiting for the model.

    Attributes:
        id: ``<stream>:<n>``.
        stream: Stream id.
        kind: ``speech``, ``sound``, ``mixed`` or ``ambient``.
        audio: 16 kHz mono float32.
        start_s: Start on the stream clock, seconds.
        end_s: End on the stream clock, seconds.
        captured: ``time.monotonic()`` when its last sample was captured.
        segment_end: ``time.monotonic()`` when the segmenter closed it.
        requests: What to ask.
        early: A speculative command window about a segment still open (see
            ``model.early_command_ms``); ``segment_end`` is then when it was taken.
    """

    id: str
    stream: str
    kind: str
    audio: FloatArray = field(repr=False, compare=False)
    start_s: float
    end_s: float
    captured: float
    segment_end: float
    requests: tuple[Request, ...]
    early: bool = False


@dataclass(frozen=True)
class Partial:
    """Text so far for one request (from the worker thread)."""

    window: Window
    request: Request
    text: str
    model_start: float
    first_token: float


@dataclass(frozen=True)
class Final:
    """The finished text for one request.

    Attributes:
        first_token: None when the text was not streamed (Whisper) or no token came.
        tokens: Generated tokens (0 for Whisper).
        language: Whisper's language of the window (fixed or detected); None for the LLM.
        language_probability: Whisper's probability of it, when it was detected.
        english: For a Whisper command whose language is not English: the English translation
            of the same audio (the intent grammar reads it); None otherwise.
    """

    window: Window
    request: Request
    text: str
    model_start: float
    first_token: float | None
    tokens: int
    language: str | None = None
    language_probability: float | None = None
    english: str | None = None


Output = Partial | Final


@dataclass(frozen=True)
class PatchTags:
    """What the sound tagger heard in one 0.96 s patch of a clip.

    Attributes:
        start_s: Where the patch starts, seconds from the clip's start.
        end_s: Where it ends (the clip's end for the last, padded patch of a short clip).
        groups: Label group -> its score (the best of its classes), 0..1.
        labels: The patch's best AudioSet classes, (display name, score), best first.
        instruments: Its best musical instruments (`SoundTagger.instruments`), best first.
    """

    start_s: float
    end_s: float
    groups: dict[str, float]
    labels: tuple[tuple[str, float], ...]
    instruments: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TagResult:
    """The tagger's answer for one `InferenceWorker.submit_tags` call.

    Attributes:
        clips: Per clip, its patches in order (at least one each; empty on error).
        model_start: ``time.monotonic()`` when the tagger call began.
        error: The exception's text when tagging failed.
    """

    clips: tuple[tuple[PatchTags, ...], ...]
    model_start: float
    error: str | None = None


#: AudioSet classes listed per tagged patch (a group's events keep only their own classes).
TAG_LABELS = 10
# One `InferenceWorker.submit_tags` call waiting: its clips and where its result goes.
_TagItem = tuple[Sequence[FloatArray], Callable[[TagResult], None]]


@dataclass
class BatchReport:
    """What happened to one batch.

    Attributes:
        finished: Keys of the requests that got their `Final`.
        error: The exception's text when the batch failed (the rest is unfinished).
        cancelled: True when `cancel` stopped it midway.
        model_start: ``time.monotonic()`` when the batch started.
        timings_ms: Encoder, Whisper and generation time, in ms.
    """

    finished: set[str] = field(default_factory=set)
    error: str | None = None
    cancelled: bool = False
    model_start: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)


class BatchCancelled(AgentError):
    """Raised inside token callbacks to stop generation when the worker is cancelled."""


class _RowStreams:
    """Per-row token bookkeeping for one `generate_from_tokens` call (worker thread)."""

    def __init__(
        self,
        items: Sequence[tuple[Window, Request]],
        tokenizer: Any,
        emit: Callable[[Output], None],
        model_start: float,
        partials: bool,
        cancel: threading.Event,
        report: BatchReport,
    ) -> None:
        self.items = items
        self.tokenizer = tokenizer
        self.emit = emit
        self.model_start = model_start
        self.partials = partials
        self.cancel = cancel
        self.report = report
        self.ids: list[list[int]] = [[] for _ in items]
        self.first_token: list[float | None] = [None] * len(items)
        self.last_text = [""] * len(items)
        self.step_rows: set[int] = set()
        self.last_row = -1

    def _decode(self, row: int) -> str:
        text: str = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        return text.strip()

    def on_token(self, row: int, token: int) -> None:
        if self.cancel.is_set():
            raise BatchCancelled("inference cancelled (agent shutting down)")
        if row <= self.last_row:  # a new decoding step: rows silent in the last one are done
            self._finish_silent_rows()
            self.step_rows = set()
        self.last_row = row
        self.step_rows.add(row)
        now = time.monotonic()
        if self.first_token[row] is None:
            self.first_token[row] = now
        self.ids[row].append(token)
        window, request = self.items[row]
        if not self.partials or request.task == "command":
            return
        text = self._decode(row)
        if text and text != self.last_text[row] and not text.endswith("\ufffd"):
            self.last_text[row] = text
            self.emit(
                Partial(window, request, text, self.model_start, self.first_token[row] or now)
            )

    def _finish_silent_rows(self) -> None:
        for row, (_window, request) in enumerate(self.items):
            if row not in self.step_rows and request.key not in self.report.finished:
                self._final(row, self._decode(row))

    def _final(self, row: int, text: str) -> None:
        window, request = self.items[row]
        self.report.finished.add(request.key)
        self.emit(
            Final(
                window, request, text, self.model_start, self.first_token[row], len(self.ids[row])
            )
        )

    def finish(self, texts: Sequence[str]) -> None:
        """The call returned: report every row not reported yet, with the model's own text."""
        for row, text in enumerate(texts):
            if self.items[row][1].key not in self.report.finished:
                self._final(row, text)


class BatchRunner:
    """Answers batches of windows with a loaded `model.salmonn.Salmonn` (synchronous).

    Args:
        model: The loaded model (``encode_audio``, ``generate_from_tokens``,
            ``transcribe_with_whisper``, ``tokenizer``).
        max_new_tokens: Most tokens per answer.
        partials: Report `Partial` outputs while tokens come.
        hear_commands: Transcribes the windows of ``recogniser="command"`` requests (None:
            the model's own Whisper does).
    """

    def __init__(
        self,
        model: Any,
        max_new_tokens: int,
        partials: bool = True,
        hear_commands: Callable[[list[FloatArray]], list[str]] | None = None,
    ) -> None:
        self.model = model
        self.hear_commands = hear_commands
        self.max_new_tokens = max_new_tokens
        self.partials = partials
        #: Called on the worker thread after every generated token, and between the stages of
        #: an LLM batch (after its Whisper requests, after each window's encoding), so short
        #: work that came in meanwhile (`InferenceWorker.submit_fast`) need not wait for the
        #: whole batch.
        self.between_tokens: Callable[[], None] | None = None
        #: Encode an LLM batch's windows one at a time, with `between_tokens` after each: on a
        #: CPU a batch of N windows costs N single ones anyway (BENCHMARKS.md, "Load"); on a
        #: GPU (False) the batch is one call.
        self.encode_one_by_one = False

    def run(
        self, windows: Sequence[Window], emit: Callable[[Output], None], cancel: threading.Event
    ) -> BatchReport:
        """Answer every request of every window, reporting outputs through ``emit``.

        Never raises for model failures: they are returned in `BatchReport.error`, and the
        requests without a `Final` are the unfinished ones.
        """
        report = BatchReport(model_start=time.monotonic())
        try:
            self._run(windows, emit, cancel, report)
        except BatchCancelled:
            report.cancelled = True
        except Exception as exc:  # a model failure must not kill the worker
            logger.error("inference failed on windows %s", [w.id for w in windows], exc_info=True)
            report.error = f"{type(exc).__name__}: {exc}"
        return report

    def _whisper(
        self,
        items: Sequence[tuple[Window, Request]],
        emit: Callable[[Output], None],
        start: float,
        report: BatchReport,
    ) -> dict[str, str]:
        """Answer the ``whisper`` requests: each window heard once per way of hearing it
        (a recogniser for English transcription; the model's own multilingual Whisper per
        language and task otherwise, with the English translation of foreign commands
        decoded from the same encoder output). Returns what Whisper heard in each window, by
        window id: its ``transcript`` request's text, else its ``command``'s."""
        from agent.config import detection_candidates

        own: Callable[[list[FloatArray]], list[str]] = self.model.transcribe_with_whisper

        def hearing(request: Request) -> tuple[Any, ...]:
            if not request.english_whisper:  # tiny.en and its like know English only
                return ("model", request.language, request.whisper_task)
            if request.recogniser == "command" and self.hear_commands is not None:
                return ("english", self.hear_commands)
            return ("english", own)

        groups: dict[tuple[Any, ...], dict[str, Window]] = {}
        commands: set[tuple[Any, ...]] = set()
        transcripts: dict[str, str] = {}
        for window, request in items:
            groups.setdefault(hearing(request), {})[window.id] = window
            if request.task == "command":
                commands.add(hearing(request))
        # The ways of hearing that answer a command decode first, and each way's answers go
        # out as soon as it is done: a command waits for no other stream's transcript.
        for how in sorted(groups, key=lambda h: h not in commands):
            group = groups[how]
            audio = [w.audio for w in group.values()]
            heard: dict[str, tuple[str, str, float | None, str | None]]
            if how[0] == "english":
                said = how[1](audio)
                heard = {i: (t.strip(), "en", None, None) for i, t in zip(group, said, strict=True)}
            else:
                _, language, task = how
                among = detection_candidates(language)
                found = self.model.whisper_transcripts(
                    audio,
                    language=None if among is not None else language,
                    task=task,
                    translate_other=how in commands and task == "transcribe",
                    among=among or (),
                )
                detected = among is not None
                heard = {
                    i: (
                        t.text.strip(),
                        t.language,
                        t.language_probability if detected else None,
                        t.english,
                    )
                    for i, t in zip(group, found, strict=True)
                }
            for window, request in items:
                if hearing(request) != how:
                    continue
                text, language, probability, english = heard[window.id]
                if request.task == "transcript":
                    transcripts[window.id] = text
                elif request.task == "command":  # heard the same words; a transcript wins
                    transcripts.setdefault(window.id, text)
                report.finished.add(request.key)
                emit(
                    Final(
                        window,
                        request,
                        text,
                        start,
                        None,
                        0,
                        language=language,
                        language_probability=probability,
                        english=english if request.task == "command" else None,
                    )
                )
        return transcripts

    def _run(
        self,
        windows: Sequence[Window],
        emit: Callable[[Output], None],
        cancel: threading.Event,
        report: BatchReport,
    ) -> None:
        start = report.model_start
        if cancel.is_set():  # cancelled before it began (shutdown): answer nothing
            report.cancelled = True
            return
        llm_windows = [w for w in windows if any(r.engine == "llm" for r in w.requests)]
        whisper_items = [(w, r) for w in windows for r in w.requests if r.engine == "whisper"]
        transcripts: dict[str, str] = {}
        if whisper_items:
            t0 = time.perf_counter()
            transcripts = self._whisper(whisper_items, emit, start, report)
            report.timings_ms["whisper_decode_ms"] = (time.perf_counter() - t0) * 1000
        if not llm_windows or cancel.is_set():
            if cancel.is_set():
                report.cancelled = True
            return
        # (A fast-lane batch is Whisper-only: it never gets here, so the hooks never nest.)
        between = self.between_tokens or (lambda: None)
        between()
        t0 = time.perf_counter()
        if self.encode_one_by_one:
            rows = {}
            for window in llm_windows:
                rows[window.id] = self.model.encode_audio([window.audio]).row(0)
                between()
        else:
            tokens = self.model.encode_audio([w.audio for w in llm_windows])
            rows = {w.id: tokens.row(i) for i, w in enumerate(llm_windows)}
        report.timings_ms["encode_ms"] = (time.perf_counter() - t0) * 1000
        groups: dict[float | None, list[tuple[Window, Request]]] = {}
        for window in llm_windows:
            for request in window.requests:
                if request.engine == "llm":
                    groups.setdefault(request.lora_scale, []).append((window, request))
        heard = self._heard(llm_windows, transcripts)
        t0 = time.perf_counter()
        for scale, items in groups.items():
            streams = _RowStreams(
                items, self.model.tokenizer, emit, start, self.partials, cancel, report
            )
            results = self.model.generate_from_tokens(
                [rows[w.id] for w, _ in items],
                [
                    with_transcript(r.instruction, heard[w.id])
                    if r.with_transcript
                    else r.instruction
                    for w, r in items
                ],
                lora_scale=scale,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                on_token=_then(streams.on_token, self.between_tokens),
            )
            streams.finish([g.text for g in results])
        report.timings_ms["generate_ms"] = (time.perf_counter() - t0) * 1000

    def _heard(self, windows: Sequence[Window], transcripts: dict[str, str]) -> dict[str, str]:
        """What Whisper heard in each window with a ``with_transcript`` request: its own
        Whisper requests' text, or else the model's Whisper now (a model without a Whisper
        tokenizer hears nothing: the questions go as they are)."""
        wanted = [w for w in windows if any(r.with_transcript for r in w.requests)]
        missing = [w for w in wanted if w.id not in transcripts]
        heard = {w.id: transcripts[w.id] for w in wanted if w.id in transcripts}
        if missing and getattr(self.model, "whisper_tokenizer", None) is None:
            return {**heard, **{w.id: "" for w in missing}}
        if missing:
            texts = self.model.transcribe_with_whisper([w.audio for w in missing])
            heard.update((w.id, t.strip()) for w, t in zip(missing, texts, strict=True))
        return heard


def model_placement(model: Any) -> tuple[torch.device, torch.dtype]:
    """Where a loaded model runs and its compute dtype (`Salmonn.placement`); the CPU in
    float32 for a model that does not say (test doubles, remote pools)."""
    import torch

    placement = getattr(model, "placement", None)
    if callable(placement):
        device, dtype = placement()
        return torch.device(device), dtype
    return torch.device("cpu"), torch.float32


class CommandRecogniser:
    """A second Whisper (e.g. the smaller tiny.en) that transcribes command windows.

    Loaded on the model's device in the model's dtype, so its windows never cross to another
    device; its log-mel features stay float32 up to its first layer (`model.whisper.encode`).

    Args:
        source: any `model.whisper.load_whisper` source.
        device: where the model runs.
        dtype: the model's compute dtype.
        pack: pack its decoder for CPU token steps (`model.packing`); skipped off the CPU.
    """

    def __init__(
        self, source: str, *, device: torch.device, dtype: torch.dtype, pack: bool
    ) -> None:
        from model.device import dtype_name
        from model.packing import pack_linears
        from model.whisper import load_whisper

        self.whisper, self.tokenizer = load_whisper(source, dtype=dtype, device=device)
        if pack and device.type == "cpu":
            pack_linears(self.whisper, skip=("model.encoder.",))  # decoder steps, as the model's
        elif pack:
            logger.info("command recogniser: weight packing skipped on %s (CPU-only)", device)
        logger.info(
            "command recogniser: Whisper from %s on %s in %s", source, device, dtype_name(dtype)
        )

    def __call__(self, audio: list[FloatArray]) -> list[str]:
        from model.whisper import transcribe

        return transcribe(self.whisper, self.tokenizer, audio, short_context=True)


def _then(
    on_token: Callable[[int, int], None], hook: Callable[[], None] | None
) -> Callable[[int, int], None]:
    """``on_token`` followed by ``hook()`` (if any) on every token."""
    if hook is None:
        return on_token

    def both(row: int, token: int) -> None:
        on_token(row, token)
        hook()

    return both


def check_whisper_text(model: Any, settings: Any) -> None:
    """Before the first window: a model asked for Whisper transcripts can make them.

    Args:
        model: The loaded model.
        settings: Its `agent.config.ModelSettings`.

    Raises:
        ConfigError: ``model.transcript`` or ``model.command`` is ``whisper`` and the
            model's Whisper has no tokenizer (the tiny-random preset's has none).
    """
    from agent.errors import ConfigError

    wants = [name for name in ("transcript", "command") if getattr(settings, name) == "whisper"]
    if wants and getattr(model, "whisper_tokenizer", True) is None:
        raise ConfigError(
            f"model {settings.name!r}: its Whisper has no tokenizer, so it cannot write the "
            f'transcripts that model.{" and model.".join(wants)} = "whisper" needs; use '
            '--transcript llm --command llm (TOML: transcript = "llm", command = "llm")'
        )


def limit_blas_threads(threads: int) -> bool:
    """Limit numpy's OpenBLAS to ``threads`` on the calling thread only (OpenBLAS >= 0.3.27,
    ``openblas_set_num_threads_local``), so the tagger's front end does not wake a pool of
    BLAS threads that spin against torch's on the worker thread (BENCHMARKS.md "Sound
    tagger"). Returns False, changing nothing, where numpy's OpenBLAS has no such call."""
    import ctypes
    import glob
    import os

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*.so*"))):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter.restype = ctypes.c_int
        setter(threads)
        return True
    return False


def tag_clips(tagger: Any, clips: Sequence[FloatArray]) -> list[tuple[PatchTags, ...]]:
    """Tag clips with a `model.sound_tagger.SoundTagger` in one batched call: per clip its
    patches (at YAMNet's 0.48 s hop; a clip shorter than a patch is padded to one), each with
    its group scores (a generic parent that yields to a specific class of another group does
    not count for its own: ``generic_yields``) and best labels."""
    config = tagger.config
    rate = float(config.sample_rate_hz)
    patch_s = config.patch_samples / rate
    hop_s = config.patch_hop_samples / rate
    out = []
    for clip, scores in zip(clips, tagger.scores_batch(clips), strict=True):
        length_s = clip.shape[0] / rate
        patches = []
        for i, row in enumerate(scores):
            start_s = min(i * hop_s, length_s)
            patches.append(
                PatchTags(
                    start_s=start_s,
                    end_s=max(start_s, min(start_s + patch_s, length_s)),
                    groups=tagger.group_scores(row, generic_yields=True),
                    labels=tuple(tagger.top_labels(row, TAG_LABELS)),
                    instruments=tuple(tagger.instruments(row)),
                )
            )
        out.append(tuple(patches))
    return out


#: A fast-lane item: windows, where their outputs go, and who hears of their report.
_FastItem = tuple[Sequence[Window], Callable[[Output], None], Callable[[BatchReport], None]]


def _asks_command(windows: Sequence[Window]) -> bool:
    """Any of the windows has a command request (fast-lane priority)."""
    return any(request.task == "command" for window in windows for request in window.requests)


class InferenceWorker:
    """Owns the model on one dedicated thread, and the sound tagger (when loaded) on a second
    one; an async context manager.

    Args:
        load_model: Called once on the worker thread to load (or hand over) the model.
        max_new_tokens: Most tokens per answer.
        partials: Report partial outputs.
        threads: Torch intra-op threads (0: torch's default).
        warm_up: Run one tiny request at start, so the first real window is not slowed by
            lazy initialisation.
        command_whisper: Whisper weights (any `model.whisper.load_whisper` source) loaded
            beside the model to read ``recogniser="command"`` requests.
        pack_weights: Pack the decoders' weights for CPU token steps (`model.packing`);
            skipped, with a log line, when the model is on a GPU.
        load_tagger: Loads the sound tagger (`model.sound_tagger.load_sound_tagger`); called
            once, after the model (`[sounds]` on), on the tagger's own thread, which then
            limits numpy's BLAS to one thread there (`limit_blas_threads`). None: no tagger
            and no tagger thread.

    Attributes:
        device: Where the loaded model runs (`model_placement`); None until loaded.
        dtype: Its compute dtype; None until loaded.
        sound_tagger: The loaded `model.sound_tagger.SoundTagger`, or None.
    """

    def __init__(
        self,
        load_model: Callable[[], Any],
        *,
        max_new_tokens: int,
        partials: bool = True,
        threads: int = 0,
        warm_up: bool = True,
        command_whisper: str | None = None,
        pack_weights: bool = True,
        load_tagger: Callable[[], Any] | None = None,
    ) -> None:
        self._load_model = load_model
        self._load_tagger = load_tagger
        self.sound_tagger: Any = None
        # Tagging asked for (clips, done) and not yet run. It runs on a thread of its own
        # (onnxruntime releases the GIL), so tags never wait behind the audio encoder, Whisper
        # or an LLM batch on the model's thread.
        self._tags: queue.SimpleQueue[_TagItem] = queue.SimpleQueue()
        self._tag_executor: ThreadPoolExecutor | None = None
        self.tag_calls = 0
        self.tagged_patches = 0
        self.pack_weights = pack_weights
        self.command_whisper = command_whisper
        self._hear_commands: Callable[[list[FloatArray]], list[str]] | None = None
        self.max_new_tokens = max_new_tokens
        self.partials = partials
        self.threads = threads
        self.warm_up = warm_up
        self.model: Any = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.runner: BatchRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._cancel = threading.Event()
        # Fast-lane work handed over while a batch runs: (windows, emit, done) items.
        self._fast: queue.SimpleQueue[_FastItem] = queue.SimpleQueue()
        self.fast_windows = 0
        self._closed = asyncio.Event()
        self.batches = 0
        self.windows = 0
        self.busy_s = 0.0

    @property
    def model_name(self) -> str:
        """The loaded model's name (``config.name``), or ``unknown``."""
        config = getattr(self.model, "config", None)
        return str(getattr(config, "name", "unknown"))

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="salmonn-infer")
        if self._load_tagger is not None:
            self._tag_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="salmonn-tags"
            )
        loop = asyncio.get_running_loop()
        try:
            self.model = await loop.run_in_executor(self._executor, self._load)
            if self._tag_executor is not None:
                self.sound_tagger = await loop.run_in_executor(
                    self._tag_executor, self._load_sound_tagger
                )
        except BaseException:
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._tag_executor is not None:
                self._tag_executor.shutdown(wait=False, cancel_futures=True)
            raise
        self.runner = BatchRunner(
            self.model, self.max_new_tokens, self.partials, hear_commands=self._hear_commands
        )
        self.runner.between_tokens = self._run_fast
        self.runner.encode_one_by_one = self.device is not None and self.device.type == "cpu"
        return self

    def _load(self) -> Any:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        model = self._load_model()
        device, dtype = model_placement(model)
        self.device, self.dtype = device, dtype
        pack = getattr(model, "pack_for_inference", None)
        if pack is not None and self.pack_weights:  # faster token steps, same answers
            if device.type == "cpu":
                pack()
            else:
                logger.info(
                    "weight packing skipped: the model runs on %s, and packing is for CPU "
                    "decoding (model.pack_weights has no effect there)",
                    device,
                )
        if self.command_whisper:
            self._hear_commands = CommandRecogniser(
                self.command_whisper, device=device, dtype=dtype, pack=self.pack_weights
            )
            if self.warm_up:
                self._hear_commands([np.zeros(16000, np.float32)])
        # YAMNet's log-mel front end is one small numpy product per patch, on which a threaded
        # OpenBLAS spins (BENCHMARKS.md, "Sound tagger"): one thread here when the model's
        # audio encoder is YAMNet (the tagger's thread limits its own, `_load_sound_tagger`).
        if getattr(model, "yamnet", None) is not None and not limit_blas_threads(1):
            logger.info("YAMNet: numpy's OpenBLAS threads could not be limited")
        if self.warm_up:
            started = time.perf_counter()
            silence = np.zeros(16000, np.float32)
            tokens = model.encode_audio([silence])
            model.generate_from_tokens([tokens.row(0)], ["Describe the audio."], max_new_tokens=2)
            logger.info(
                "model warmed up on %s in %.0f ms", device, (time.perf_counter() - started) * 1000
            )
        return model

    def _load_sound_tagger(self) -> Any:
        """On the tagger's thread: numpy's BLAS to one thread (the limit is per thread), then
        the tagger, warmed up on one patch of silence."""
        assert self._load_tagger is not None
        if not limit_blas_threads(1):
            logger.info("YAMNet: numpy's OpenBLAS threads could not be limited")
        tagger = self._load_tagger()
        if self.warm_up:
            tagger.scores(np.zeros(16000, np.float32))
        return tagger

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(
        self, windows: Sequence[Window], on_output: Callable[[Output], None]
    ) -> BatchReport:
        """Answer a batch on the worker thread; ``on_output`` is called on the loop, in order,
        and all calls have happened when this returns.

        Raises:
            AgentError: the worker is closed.
        """
        if self._executor is None or self.runner is None or self._closed.is_set():
            raise AgentError("the inference worker is closed")
        loop = asyncio.get_running_loop()
        runner = self.runner

        def emit(output: Output) -> None:
            # RuntimeError: the loop closed while an abandoned batch was still running.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_output, output)

        started = time.monotonic()
        report = await asyncio.shield(
            loop.run_in_executor(self._executor, runner.run, windows, emit, self._cancel)
        )
        # Fast-lane work submitted after the batch's last token still runs before we
        # return: the caller submits only while a batch is in flight.
        while not self._fast.empty() and self._executor:
            await asyncio.shield(loop.run_in_executor(self._executor, self._run_fast))
        self.busy_s += time.monotonic() - started
        self.batches += 1
        self.windows += len(windows)
        return report

    def submit_fast(
        self,
        windows: Sequence[Window],
        on_output: Callable[[Output], None],
        on_done: Callable[[BatchReport], None],
    ) -> None:
        """Answer short windows (Whisper requests only) while a batch is running, between
        two of its tokens, instead of after it; call only while `run` is in progress.

        ``on_output`` and then ``on_done(report)`` are called on the loop, before `run`
        returns.
        """
        loop = asyncio.get_running_loop()

        def emit(output: Output) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_output, output)

        def done(report: BatchReport) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_done, report)

        self._fast.put((windows, emit, done))

    def _run_fast(self) -> None:
        """On the worker thread: answer every fast-lane item waiting, commands first: those
        with a command request as one batch (commands said at once on several streams share
        Whisper's decoder steps), then the rest (transcripts) as another."""
        while True:
            items = []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._fast.get_nowait())
            if not items:
                return
            urgent = [item for item in items if _asks_command(item[0])]
            for group in (urgent, [item for item in items if not _asks_command(item[0])]):
                if group:
                    self._answer_fast(group)

    def _answer_fast(self, items: Sequence[_FastItem]) -> None:
        """Answer fast-lane items as one batch, each reported to its own callbacks."""
        assert self.runner is not None
        windows = [w for item_windows, _, _ in items for w in item_windows]
        emits = {w.id: emit for item_windows, emit, _ in items for w in item_windows}

        def route(output: Output) -> None:
            emits[output.window.id](output)

        report = self.runner.run(windows, route, self._cancel)
        self.fast_windows += len(windows)
        for item_windows, _, done in items:
            keys = {r.key for w in item_windows for r in w.requests}
            done(
                BatchReport(
                    finished=report.finished & keys,
                    error=report.error,
                    cancelled=report.cancelled,
                    model_start=report.model_start,
                    timings_ms=dict(report.timings_ms),
                )
            )

    def submit_tags(
        self, clips: Sequence[FloatArray], on_done: Callable[[TagResult], None]
    ) -> None:
        """Tag clips with the sound tagger on its own thread, batched with the tagging of
        every other stream that waits (all clips waiting go in one tagger call): never behind
        the model's work. ``on_done`` is called on the loop, calls in the order of submission;
        on shutdown it may never be called.

        Raises:
            AgentError: no tagger is loaded, or the worker is closed.
        """
        executor = self._tag_executor
        if self.sound_tagger is None or executor is None or self._closed.is_set():
            raise AgentError("the sound tagger is not loaded or the worker is closed")
        loop = asyncio.get_running_loop()

        def done(result: TagResult) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(on_done, result)

        self._tags.put((clips, done))
        # One run per submission: a run finding the queue emptied by the one before it (which
        # took this item along) returns at once.
        executor.submit(self._run_tags)

    def _run_tags(self) -> None:
        """On the tagger's thread: tag every clip waiting, all streams in one tagger call."""
        items: list[_TagItem] = []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._tags.get_nowait())
        if not items:
            return
        clips = [clip for item_clips, _ in items for clip in item_clips]
        started = time.monotonic()
        try:
            tagged = tag_clips(self.sound_tagger, clips)
        except Exception as exc:  # a tagger failure must not kill the worker
            logger.error("sound tagger failed on %d clip(s)", len(clips), exc_info=True)
            for _, done in items:
                done(TagResult((), started, f"{type(exc).__name__}: {exc}"))
            return
        self.tag_calls += 1
        self.tagged_patches += sum(len(p) for p in tagged)
        at = 0
        for item_clips, done in items:
            done(TagResult(tuple(tagged[at : at + len(item_clips)]), started))
            at += len(item_clips)

    def cancel(self) -> None:
        """Stop the running batch at its next token (its unfinished requests are reported
        by the caller); later batches are cancelled at once."""
        self._cancel.set()

    async def close(self) -> None:
        """Wait for the running batch and tagger call (if any) and stop both threads
        (idempotent); tagging not yet started is dropped, its ``on_done`` never called."""
        if self._closed.is_set():
            return
        self._closed.set()
        executor, self._executor = self._executor, None
        tag_executor, self._tag_executor = self._tag_executor, None
        for pool in (tag_executor, executor):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def wait_closed(self) -> None:
        """Wait until `close` has run."""
        await self._closed.wait()

    def stats(self) -> dict[str, float | int]:
        """Counters for status events."""
        return {
            "batches": self.batches,
            "windows": self.windows,
            "mean_batch": round(self.windows / self.batches, 2) if self.batches else 0.0,
            "fast_windows": self.fast_windows,
            "busy_s": round(self.busy_s, 3),
            **(
                {"tag_calls": self.tag_calls, "tagged_patches": self.tagged_patches}
                if self.sound_tagger is not None
                else {}
            ),
        }
