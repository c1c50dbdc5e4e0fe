"""Segmentation: turn a 16 kHz stream into speech and sound segments with exact offsets.

:class:`Segmenter` is the pure core: ``push(chunk) -> list[Event]``, ``flush()``, ``reset()``.
Per frame it combines

- a speech detector (webrtcvad, or Silero with ``vad="silero"``), gated by the noise floor so
  loud steady noise cannot hold a segment open;
- a :class:`~streaming.detectors.SoundActivityDetector` (adaptive noise floor, band energy,
  spectral flux) for alarms, knocks and other non-speech sound;
- :class:`~streaming.features.FrameAnalyzer`'s voice features (harmonicity, tonal peak share,
  low-band share) to tell voiced speech from tones and noise,

into one hysteresis state machine:

1. *Idle*: a segment opens when at least ``start_active_ms`` of the last ``start_window_ms``
   are active. It starts ``pre_roll_ms`` before its first active frame.
2. *Pending*: once ``min_active_ms`` of active frames are seen, :class:`SegmentStarted` is
   emitted (shorter blips are dropped silently).
3. *Active*: the segment ends when at most ``end_active_ratio`` of the last
   ``end_silence_ms`` is active; it ends ``post_roll_ms`` after its last active frame.
   A segment reaching ``max_segment_ms`` is cut at its quietest frame within the last
   ``split_search_ms`` and a continuation segment (a new :class:`SegmentStarted`) carries on
   from there; when at least ``min_active_ms`` of activity would not follow the cut (the sound
   is just ending), the segment ends normally instead.

A frame is *speech-like* when it is harmonic with much energy low and either no single spectral
line dominates it, or one does but its pitch glides (it has been harmonic for 3 frames and its
pitch moved by 0.2-5 % since the last frame, per 20 ms: a sung-out vowel of a high voice can be
as pure as a tone, but a tone's pitch does not move). A finished segment's kind is ``speech``
when at least ``speech_ratio`` of its active frames are speech-like and fewer than
``nonspeech_ratio`` are clearly non-speech (one line dominating, not speech-like), ``mixed``
when both are substantial or the speech-like share lies between ``mixed_ratio`` and
``speech_ratio``, else ``sound``. Two segment-level vetoes: a segment tonal (+-110 Hz peak share
above 0.6) on at least ``tone_ratio`` of its active frames is a tone (alarm, siren, bell, ring),
its speech-like share counted as none; one whose pitch holds steady (under 0.3 % per 20 ms) on
at least ``steady_pitch_ratio`` of its consecutive harmonic frame pairs is a held note, at most
``mixed``. A voice's pitch never holds that still for long.

``mode="sound"`` opens segments on the sound detector alone and labels them all ``sound``.
``mode="speech"`` opens them on the VAD alone (the sound detector only supplies the noise floor
that gates it) but still classifies the kind: webrtcvad fires on most alarms, sirens and ring
tones, which then come out ``sound`` or ``mixed``, never as ``speech`` just because of the mode.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from streaming.detectors import (
    WEBRTC_FRAME_MS,
    WEBRTC_RATES_HZ,
    SoundActivityDetector,
    SpeechDetector,
    WebrtcVadDetector,
)
from streaming.errors import SegmenterConfigError, UnsupportedRateError
from streaming.events import AmbientWindow, Event, SegmentEnded, SegmentKind, SegmentStarted
from streaming.features import FrameAnalyzer
from streaming.pcm import SAMPLE_RATE_HZ
from streaming.reframer import Reframer

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Frame length the Silero backend imposes (512 samples at 16 kHz).
SILERO_FRAME_MS = 32
#: Pitch changes are measured in natural-log units per second of frames (0.15/s is 0.3 %
#: per 20 ms frame). Below ``_STEADY_PER_S``: a steady pitch; within the glide range: a voice's
#: pitch moving (measured on klettres, Piper and espeak voices against instruments and tones).
_STEADY_PER_S = 0.15
_GLIDE_PER_S = (0.1, 2.5)
#: Consecutive harmonic frames (this one included) before a dominant line may count as gliding
#: speech: a knock's damped resonance rings for two frames.
_GLIDE_RUN = 3
#: Fewer consecutive harmonic pairs than this and the steady-pitch veto does not apply.
_MIN_PITCH_PAIRS = 5

#: One frame's decisions: active, speech-like, speech-like only by its gliding pitch, clearly
#: non-speech, tonal, harmonic pair (this and the previous frame harmonic), steady pitch within
#: that pair, VAD speech, energy (dB).
_Row = tuple[bool, bool, bool, bool, bool, bool, bool, bool, float]


def frames_in(duration_ms: float, frame_ms: float) -> int:
    """Whole frames (at least one) closest to ``duration_ms``."""
    return max(1, round(duration_ms / frame_ms))


@dataclass(frozen=True)
class SegmenterConfig:
    """All segmentation settings, in named units.

    Attributes:
        mode: ``"both"`` (speech and sound), ``"speech"`` (segments opened by the VAD only;
            kinds still classified) or ``"sound"`` (sound-activity only, kind ``sound``).
        vad: ``"webrtc"`` or ``"silero"``.
        sample_rate_hz: Stream rate; webrtc takes 8/16/32/48 kHz, silero 16 kHz only.
        aggressiveness: webrtcvad aggressiveness, 0-3.
        frame_ms: webrtcvad frame, 10/20/30 ms (Silero always uses 32 ms).
        silero_threshold: Silero speech probability threshold (0..1).
        start_window_ms: Window in which activity must accumulate to open a segment.
        start_active_ms: Active time within ``start_window_ms`` that opens a segment.
        min_active_ms: Active time before a segment is confirmed (shorter ones are dropped).
        end_silence_ms: Trailing window that must be (nearly) inactive to close a segment.
        end_active_ratio: Largest active share of that window that still closes (0..1).
        pre_roll_ms: Audio kept before the first active frame.
        post_roll_ms: Audio kept after the last active frame.
        max_segment_ms: Longest segment; longer ones are split at their quietest frame.
            It must exceed ``end_silence_ms + pre_roll_ms`` (else no segment could end on
            silence).
        split_search_ms: How far back from the maximum length to look for that frame (at least
            one frame).
        sound_on_db: Band-energy excess over the noise floor that makes a frame sound-active.
        sound_flux_db: Spectral-flux onset strength that counts at half that excess.
        speech_min_excess_db: A VAD speech frame also needs this excess over the noise floor.
        speech_ratio: Share of speech-like active frames for kind ``speech``.
        mixed_ratio: Share of speech-like active frames below which the kind is ``sound``.
        nonspeech_ratio: Share of clearly non-speech frames that turns ``speech`` into
            ``mixed``.
        tone_ratio: Share of tonal active frames at which a segment is a tone, never speech
            (a voice is tonal on about half its frames at most, a siren on all).
        steady_pitch_ratio: Share of consecutive harmonic frame pairs with a steady pitch at
            which a segment is a held note, at most ``mixed``.
        ambient_every_s: Emit an :class:`AmbientWindow` of this length back to back (0: off).
    """

    mode: Literal["both", "speech", "sound"] = "both"
    vad: Literal["webrtc", "silero"] = "webrtc"
    sample_rate_hz: int = SAMPLE_RATE_HZ
    aggressiveness: int = 2
    frame_ms: int = 20
    silero_threshold: float = 0.5
    start_window_ms: int = 100
    start_active_ms: int = 40
    min_active_ms: int = 100
    end_silence_ms: int = 500
    end_active_ratio: float = 0.1
    pre_roll_ms: int = 60
    post_roll_ms: int = 30
    max_segment_ms: int = 20000
    split_search_ms: int = 5000
    sound_on_db: float = 9.0
    sound_flux_db: float = 4.0
    speech_min_excess_db: float = 3.0
    speech_ratio: float = 0.25
    mixed_ratio: float = 0.12
    nonspeech_ratio: float = 0.5
    tone_ratio: float = 0.9
    steady_pitch_ratio: float = 0.3
    ambient_every_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("both", "speech", "sound"):
            raise SegmenterConfigError(f"mode must be both, speech or sound, got {self.mode!r}")
        if self.vad == "webrtc":
            if self.sample_rate_hz not in WEBRTC_RATES_HZ:
                raise UnsupportedRateError(
                    f"the webrtc VAD takes {WEBRTC_RATES_HZ} Hz, got {self.sample_rate_hz} Hz;"
                    " resample first"
                )
            if self.frame_ms not in WEBRTC_FRAME_MS:
                raise SegmenterConfigError(
                    f"webrtc frame_ms must be 10, 20 or 30, got {self.frame_ms}"
                )
            if self.aggressiveness not in (0, 1, 2, 3):
                raise SegmenterConfigError(f"aggressiveness must be 0-3, got {self.aggressiveness}")
        elif self.vad == "silero":
            if self.sample_rate_hz != SAMPLE_RATE_HZ:
                raise UnsupportedRateError(
                    f"the silero VAD takes {SAMPLE_RATE_HZ} Hz only, got {self.sample_rate_hz} Hz;"
                    " resample first"
                )
        else:
            raise SegmenterConfigError(f"vad must be webrtc or silero, got {self.vad!r}")
        for name in (
            "start_window_ms",
            "start_active_ms",
            "min_active_ms",
            "end_silence_ms",
            "max_segment_ms",
        ):
            if getattr(self, name) <= 0:
                raise SegmenterConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("pre_roll_ms", "post_roll_ms", "split_search_ms", "ambient_every_s"):
            if getattr(self, name) < 0:
                raise SegmenterConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.start_active_ms > self.start_window_ms:
            raise SegmenterConfigError(
                f"start_active_ms ({self.start_active_ms}) exceeds start_window_ms"
                f" ({self.start_window_ms})"
            )
        # A segment can end on silence only once it holds end_silence_ms (in whole frames)
        # after its pre-roll; a shorter maximum would split it forever instead.
        frame_ms = self.effective_frame_ms
        shortest_end_ms = frames_in(self.end_silence_ms, frame_ms) * frame_ms + self.pre_roll_ms
        if self.max_segment_ms <= shortest_end_ms:
            raise SegmenterConfigError(
                f"max_segment_ms ({self.max_segment_ms}) must exceed end_silence_ms +"
                f" pre_roll_ms ({shortest_end_ms:g} ms), or no segment could end on silence"
            )
        if self.split_search_ms < frame_ms:
            raise SegmenterConfigError(
                f"split_search_ms ({self.split_search_ms}) must be at least one frame"
                f" ({frame_ms:g} ms)"
            )
        if self.max_segment_ms <= self.split_search_ms:
            raise SegmenterConfigError(
                f"max_segment_ms ({self.max_segment_ms}) must exceed split_search_ms"
                f" ({self.split_search_ms})"
            )
        if not 0.0 <= self.end_active_ratio < 1.0:
            raise SegmenterConfigError(
                f"end_active_ratio must be in [0, 1), got {self.end_active_ratio}"
            )

    @property
    def effective_frame_ms(self) -> float:
        """The frame length actually used (32 ms for Silero)."""
        return SILERO_FRAME_MS if self.vad == "silero" else self.frame_ms

    def as_dict(self) -> dict[str, object]:
        """The settings as a plain dict (for logging and JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class OpenSegment:
    """A snapshot of the segment being heard (see `Segmenter.open_segment`).

    Attributes:
        start_sample: Its start on the stream clock (pre-roll included).
        end_sample: Where it would end if it ended now: its last active frame plus the
            post-roll, on the stream clock.
        silence_samples: Samples processed since its last active frame.
        kind: Its kind judged on the frames so far.
    """

    start_sample: int
    end_sample: int
    silence_samples: int
    kind: SegmentKind


class _AudioBuffer:
    """The recent stream audio as a list of chunks, sliceable by absolute sample offset."""

    def __init__(self) -> None:
        self._chunks: deque[FloatArray] = deque()
        self.start = 0  # absolute offset of the first retained sample
        self.end = 0  # absolute offset one past the last sample

    def append(self, samples: FloatArray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self.end += samples.size

    def discard_before(self, offset: int) -> None:
        """Drop whole chunks that end at or before ``offset``."""
        while self._chunks and self.start + self._chunks[0].size <= offset:
            self.start += self._chunks.popleft().size

    def slice(self, begin: int, end: int) -> FloatArray:
        """Copy of samples ``[begin, end)``; parts no longer retained read as zeros."""
        out = np.zeros(max(0, end - begin), np.float32)
        position = self.start
        for chunk in self._chunks:
            lo, hi = max(begin, position), min(end, position + chunk.size)
            if lo < hi:
                out[lo - begin : hi - begin] = chunk[lo - position : hi - position]
            position += chunk.size
            if position >= end:
                break
        return out


def _make_speech_detector(config: SegmenterConfig) -> SpeechDetector:
    if config.vad == "silero":
        from streaming.silero import SileroVadDetector  # imports torch

        return SileroVadDetector(config.silero_threshold, sample_rate_hz=config.sample_rate_hz)
    return WebrtcVadDetector(config.aggressiveness, config.frame_ms, config.sample_rate_hz)


class Segmenter:
    """Speech and sound segmenter over a mono float32 stream (see the module docstring).

    Args:
        config: Settings; defaults to :class:`SegmenterConfig` ().
        speech_detector: Optional ready detector (for tests or sharing a loaded Silero model);
            it must match ``config``'s frame length.

    Raises:
        SegmenterConfigError: Inconsistent settings.
        UnsupportedRateError: A rate the chosen backend cannot take.
    """

    def __init__(
        self,
        config: SegmenterConfig | None = None,
        speech_detector: SpeechDetector | None = None,
    ) -> None:
        self.config = cfg = config or SegmenterConfig()
        rate = cfg.sample_rate_hz
        self._vad: SpeechDetector | None = None
        if cfg.mode != "sound":
            self._vad = speech_detector or _make_speech_detector(cfg)
        frame_samples = (
            self._vad.frame_samples
            if self._vad is not None
            else round(rate * cfg.effective_frame_ms / 1000)
        )
        expected = round(rate * cfg.effective_frame_ms / 1000)
        if frame_samples != expected:
            raise SegmenterConfigError(
                f"speech detector frames are {frame_samples} samples, config implies {expected}"
            )
        self.frame_samples = frame_samples
        frame_ms = 1000.0 * frame_samples / rate

        def frames(ms: float) -> int:
            return frames_in(ms, frame_ms)

        def samples(ms: float) -> int:
            return round(ms * rate / 1000)

        self._start_window = frames(cfg.start_window_ms)
        self._start_active = frames(cfg.start_active_ms)
        self._min_active = frames(cfg.min_active_ms)
        self._end_window = frames(cfg.end_silence_ms)
        self._end_max_active = int(cfg.end_active_ratio * self._end_window)
        self._pre_roll = samples(cfg.pre_roll_ms)
        self._post_roll = samples(cfg.post_roll_ms)
        self._max_segment = samples(cfg.max_segment_ms)
        self._split_search = samples(cfg.split_search_ms)
        self._ambient = samples(cfg.ambient_every_s * 1000)
        self._reframer = Reframer(frame_samples)
        self._analyzer = FrameAnalyzer(frame_samples, rate)
        frame_s = frame_samples / rate
        self._steady_step = _STEADY_PER_S * frame_s
        self._glide_step = (_GLIDE_PER_S[0] * frame_s, _GLIDE_PER_S[1] * frame_s)
        self._sound = SoundActivityDetector(
            frame_ms, cfg.sound_on_db, cfg.sound_flux_db, band_bins=self._analyzer.band_bins
        )
        logger.debug("segmenter config: %s", cfg.as_dict())
        self.reset()

    # -- public interface ---------------------------------------------------------------------

    @property
    def sample_rate_hz(self) -> int:
        """The stream clock's rate."""
        return self.config.sample_rate_hz

    @property
    def samples_pushed(self) -> int:
        """Samples pushed since the last reset (the stream clock's 'now')."""
        return self._audio.end

    def open_segment(self) -> OpenSegment | None:
        """The confirmed segment still being heard, or None between segments.

        For decisions that cannot wait for ``end_silence_ms`` (the agent's early command
        endpointing): where the segment's sound stopped so far and how long it has been quiet.
        """
        if not self._in_segment or not self._confirmed:
            return None
        sound_end = (self._last_active + 1) * self.frame_samples
        kind, _ = self._kind(0, len(self._seg_active))
        return OpenSegment(
            start_sample=self._seg_start,
            end_sample=min(sound_end + self._post_roll, self._audio.end),
            silence_samples=self._frame * self.frame_samples - sound_end,
            kind=kind,
        )

    def audio(self, begin: int, end: int) -> FloatArray:
        """A copy of the stream's samples ``[begin, end)`` (sample offsets on the stream
        clock), for an open segment; samples no longer kept read as zeros."""
        return self._audio.slice(begin, end)

    def reset(self) -> None:
        """Forget everything; the stream clock restarts at sample 0."""
        self._reframer.reset()
        self._analyzer.reset()
        self._sound.reset()
        if self._vad is not None:
            self._vad.reset()
        self._audio = _AudioBuffer()
        self._ambient_start = 0
        self._frame = 0  # index of the next frame to process
        self._last_end = 0  # end sample of the previous segment (pre-roll never crosses it)
        self._recent: deque[_Row] = deque(maxlen=self._start_window)
        self._harmonic_run = 0  # consecutive harmonic frames up to the last one processed
        self._log_pitch = 0.0  # the last frame's log pitch
        self._in_segment = False
        self._flushed = False
        self._clear_segment()

    def push(self, chunk: npt.ArrayLike) -> list[Event]:
        """Feed samples; return the events they complete, in stream order.

        Args:
            chunk: Mono float32 samples at ``sample_rate_hz``, any length.

        Returns:
            Zero or more :class:`SegmentStarted`, :class:`SegmentEnded` and
            :class:`AmbientWindow` events.

        Raises:
            SegmenterConfigError: After :meth:`flush` without :meth:`reset`.
        """
        if self._flushed:
            raise SegmenterConfigError("push() after flush(); call reset() to start a new stream")
        samples = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        self._audio.append(samples)
        events: list[Event] = []
        frames = self._reframer.push(samples)
        if frames.shape[0]:
            self._process(frames, events)
        self._emit_ambient(events, final=False)
        return events

    def flush(self) -> list[Event]:
        """End the stream: process the partial last frame and close any open segment.

        Returns:
            The remaining events.
        """
        if self._flushed:
            return []
        self._flushed = True
        events: list[Event] = []
        frames = self._reframer.flush(pad=True)
        if frames.shape[0]:
            self._process(frames, events)
        if self._in_segment:
            self._end_segment(events, detected=self._audio.end)
        self._emit_ambient(events, final=True)
        return events

    # -- internals ----------------------------------------------------------------------------

    def _clear_segment(self) -> None:
        self._seg_start = 0
        self._seg_first_frame = 0
        self._confirmed = False
        self._active_count = 0
        self._last_active = -1
        self._trailing: deque[bool] = deque(maxlen=self._end_window)
        self._trailing_active = 0
        self._seg_active: list[bool] = []
        self._seg_speech_like: list[bool] = []
        self._seg_glide: list[bool] = []
        self._seg_nonspeech: list[bool] = []
        self._seg_tonal: list[bool] = []
        self._seg_pair: list[bool] = []
        self._seg_steady: list[bool] = []
        self._seg_vad: list[bool] = []
        self._seg_energy: list[float] = []

    def _frame_decisions(self, frames: FloatArray) -> list[_Row]:
        """Per frame: the decisions of :data:`_Row`."""
        cfg = self.config
        bands = self._analyzer.bands(frames)
        n = frames.shape[0]
        if cfg.mode == "speech":
            sound_active = np.zeros(n, np.bool_)
            _, excess = self._sound.update(bands.band_db)
        else:
            sound_active, excess = self._sound.update(bands.band_db)
        if self._vad is not None:
            vad = self._vad.classify(frames) & (excess >= cfg.speech_min_excess_db)
        else:
            vad = np.zeros(n, np.bool_)
        active = vad | sound_active
        plain = np.zeros(n, np.bool_)  # speech-like without a dominant line
        harmonic = np.zeros(n, np.bool_)
        line = np.zeros(n, np.bool_)
        tonal = np.zeros(n, np.bool_)
        log_pitch = np.zeros(n, np.float64)
        index = np.flatnonzero(active)
        if index.size and cfg.mode != "sound":
            voice = self._analyzer.voice(bands.windows[index])
            plain[index] = voice.speech_like()
            harmonic[index] = voice.harmonic()
            line[index] = voice.line()
            tonal[index] = voice.tonal()
            log_pitch[index] = np.log(voice.pitch_hz)
        # Runs of harmonic frames and pitch changes carry on from the previous call.
        run = np.empty(n, np.int64)
        count = self._harmonic_run
        for i in range(n):
            count = count + 1 if harmonic[i] else 0
            run[i] = count
        change = np.abs(np.diff(log_pitch, prepend=self._log_pitch))
        self._harmonic_run = count
        if n:
            self._log_pitch = float(log_pitch[-1])
        pair = run >= 2
        steady = pair & (change < self._steady_step)
        glide = (
            (run >= _GLIDE_RUN)
            & line
            & (change > self._glide_step[0])
            & (change < self._glide_step[1])
        )
        glide &= ~plain
        speech_like = plain | glide
        nonspeech = line & ~speech_like
        return list(
            zip(
                active.tolist(),
                speech_like.tolist(),
                glide.tolist(),
                nonspeech.tolist(),
                tonal.tolist(),
                pair.tolist(),
                steady.tolist(),
                vad.tolist(),
                bands.energy_db.tolist(),
                strict=True,
            )
        )

    def _process(self, frames: FloatArray, events: list[Event]) -> None:
        for row in self._frame_decisions(frames):
            f = self._frame
            self._frame += 1
            if not self._in_segment:
                self._recent.append(row)
                if not row[0] or sum(r[0] for r in self._recent) < self._start_active:
                    continue
                # Open a segment at the window's first active frame and replay the window.
                window = list(self._recent)
                first = next(j for j, r in enumerate(window) if r[0])
                self._recent.clear()
                self._clear_segment()
                self._in_segment = True
                self._seg_first_frame = f - (len(window) - 1) + first
                self._seg_start = self._seg_start_sample()
                for j in range(first, len(window) - 1):
                    self._add_frame(self._seg_first_frame + j - first, window[j], events)
            self._add_frame(f, row, events)
        self._discard_old_audio()

    def _add_frame(self, f: int, row: _Row, events: list[Event]) -> None:
        is_active, speech_like, glide, nonspeech, tonal, pair, steady, vad, energy = row
        self._seg_active.append(is_active)
        self._seg_speech_like.append(speech_like)
        self._seg_glide.append(glide)
        self._seg_nonspeech.append(nonspeech)
        self._seg_tonal.append(tonal)
        self._seg_pair.append(pair)
        self._seg_steady.append(steady)
        self._seg_vad.append(vad)
        self._seg_energy.append(energy)
        self._push_trailing(is_active)
        if is_active:
            self._active_count += 1
            self._last_active = f
        now = (f + 1) * self.frame_samples
        if not self._confirmed and self._active_count >= self._min_active:
            self._confirmed = True
            events.append(
                SegmentStarted(self._seg_start, now, self._start_kind(), self.sample_rate_hz)
            )
        if (
            len(self._seg_active) >= self._end_window
            and self._trailing_active <= self._end_max_active
        ):
            self._end_segment(events, detected=now)
        elif self._confirmed and now - self._seg_start >= self._max_segment:
            self._split_segment(events, now)

    def _discard_old_audio(self) -> None:
        if self._in_segment:
            keep = self._seg_start
        else:
            # Enough for the pre-roll of a segment opening on the next frames.
            keep = (self._frame - self._start_window - 1) * self.frame_samples - self._pre_roll
        if self._ambient > 0:
            keep = min(keep, self._ambient_start)
        self._audio.discard_before(keep)

    def _push_trailing(self, flag: bool) -> None:
        if len(self._trailing) == self._trailing.maxlen and self._trailing[0]:
            self._trailing_active -= 1
        self._trailing.append(flag)
        if flag:
            self._trailing_active += 1

    def _start_kind(self) -> SegmentKind:
        if self.config.mode == "sound":
            return SegmentKind.SOUND
        _, voice, _ = self._shares(0, len(self._seg_active))
        return SegmentKind.SPEECH if voice >= self.config.speech_ratio else SegmentKind.SOUND

    def _shares(self, first: int, last: int) -> tuple[float, float, bool]:
        """Of the segment frames ``[first, last)``: the speech-like share of the active frames;
        that share after the vetoes (0 for a tone; for a held note, its frames speech-like only
        by a gliding pitch are not counted: a steady tone's decay or vibrato moves its pitch
        estimate); whether the pitch holds steady."""
        active = sum(self._seg_active[first:last])
        if active == 0:
            return 0.0, 0.0, False
        speech_share = sum(self._seg_speech_like[first:last]) / active
        cfg = self.config
        if sum(self._seg_tonal[first:last]) >= cfg.tone_ratio * active:
            return speech_share, 0.0, False
        pairs = sum(self._seg_pair[first:last])
        steady = pairs >= _MIN_PITCH_PAIRS and (
            sum(self._seg_steady[first:last]) >= cfg.steady_pitch_ratio * pairs
        )
        if steady:
            plain = speech_share - sum(self._seg_glide[first:last]) / active
            return speech_share, plain, True
        return speech_share, speech_share, False

    def _kind(self, first: int, last: int) -> tuple[SegmentKind, float]:
        """Kind and speech-like share of the segment frames ``[first, last)`` (list indices)."""
        speech_share, voice, steady = self._shares(first, last)
        cfg = self.config
        if cfg.mode == "sound":
            return SegmentKind.SOUND, speech_share
        active = max(1, sum(self._seg_active[first:last]))
        nonspeech_share = sum(self._seg_nonspeech[first:last]) / active
        if voice >= cfg.speech_ratio and not steady:
            kind = (
                SegmentKind.MIXED if nonspeech_share >= cfg.nonspeech_ratio else SegmentKind.SPEECH
            )
        elif voice >= cfg.mixed_ratio:
            kind = SegmentKind.MIXED
        else:
            kind = SegmentKind.SOUND
        return kind, speech_share

    def _seg_start_sample(self) -> int:
        start = self._seg_first_frame * self.frame_samples - self._pre_roll
        return max(start, self._last_end, 0)

    def _end_segment(self, events: list[Event], detected: int) -> None:
        if self._confirmed:
            end = min(
                (self._last_active + 1) * self.frame_samples + self._post_roll,
                detected,
                self._audio.end,
            )
            # Never longer than the maximum, never before the start (empty at worst).
            end = max(min(end, self._seg_start + self._max_segment), self._seg_start)
            kind, share = self._kind(0, len(self._seg_active))
            events.append(
                SegmentEnded(
                    start_sample=self._seg_start,
                    end_sample=end,
                    detected_sample=detected,
                    kind=kind,
                    audio=self._audio.slice(self._seg_start, end),
                    sample_rate_hz=self.sample_rate_hz,
                    speech_ratio=round(share, 3),
                )
            )
            self._last_end = end
        self._in_segment = False
        self._clear_segment()

    def _split_segment(self, events: list[Event], now: int) -> None:
        """At the maximum length: cut at the quietest frame of the last ``split_search_ms``
        before the maximum.

        The frames after the cut continue as a new segment. When the sound has stopped (the
        latest frame is inactive) and less than ``min_active_ms`` of activity follows the cut,
        the segment ends normally instead, after its last activity: a cut there would leave a
        continuation with next to nothing in it (before this rule, one ending before its start).
        """
        F = self.frame_samples
        first_frame = self._seg_first_frame
        n = len(self._seg_energy)
        limit = self._seg_start + self._max_segment  # the first segment ends by here
        hi = min(n - 1, limit // F - first_frame)  # segment-relative frame indices
        lo = max(1, (limit - self._split_search) // F - first_frame)
        energy = np.asarray(self._seg_energy[lo : hi + 1], np.float64)
        smooth = np.convolve(energy, np.ones(3) / 3, mode="same") if energy.size >= 3 else energy
        cut = lo + int(np.argmin(smooth))  # segment-relative frame index of the split
        if not self._seg_active[-1] and sum(self._seg_active[cut:]) < self._min_active:
            self._end_segment(events, detected=now)
            return
        split_sample = (first_frame + cut) * F
        kind, share = self._kind(0, cut)
        events.append(
            SegmentEnded(
                start_sample=self._seg_start,
                end_sample=split_sample,
                detected_sample=now,
                kind=kind,
                audio=self._audio.slice(self._seg_start, split_sample),
                sample_rate_hz=self.sample_rate_hz,
                split=True,
                speech_ratio=round(share, 3),
            )
        )
        # The continuation keeps the frames after the cut.
        self._seg_start = split_sample
        self._last_end = split_sample
        self._seg_first_frame = first_frame + cut
        for name in (
            "_seg_active",
            "_seg_speech_like",
            "_seg_glide",
            "_seg_nonspeech",
            "_seg_tonal",
            "_seg_pair",
            "_seg_steady",
            "_seg_vad",
            "_seg_energy",
        ):
            setattr(self, name, getattr(self, name)[cut:])
        self._active_count = sum(self._seg_active)
        events.append(SegmentStarted(split_sample, now, self._start_kind(), self.sample_rate_hz))

    def _emit_ambient(self, events: list[Event], final: bool) -> None:
        if self._ambient <= 0:
            return
        while self._audio.end - self._ambient_start >= self._ambient or (
            final and self._audio.end > self._ambient_start
        ):
            end = min(self._ambient_start + self._ambient, self._audio.end)
            events.append(
                AmbientWindow(
                    self._ambient_start,
                    end,
                    self._audio.slice(self._ambient_start, end),
                    self.sample_rate_hz,
                )
            )
            self._ambient_start = end
