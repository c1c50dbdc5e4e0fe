"""Score segments against scene ground truth (recall, boundary errors, kinds, false alarms).

Pure functions over plain offsets, used by the quality tests and ``salmonn-live bench
segment``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from streaming.events import SegmentEnded, SegmentKind
from streaming.pcm import SAMPLE_RATE_HZ
from training.scenes import TruthEvent


@dataclass(frozen=True)
class SegmentSpan:
    """A segment reduced to what scoring needs: offsets in samples and kind."""

    start_sample: int
    end_sample: int
    kind: str

    @classmethod
    def from_event(cls, event: SegmentEnded) -> SegmentSpan:
        """Take the span of a :class:`SegmentEnded`."""
        return cls(event.start_sample, event.end_sample, str(event.kind))


@dataclass
class Score:
    """Accumulated figures over one or more scenes (times in seconds).

    Attributes:
        speech_events: Number of ground-truth utterances.
        speech_found: Utterances overlapped by a ``speech`` or ``mixed`` segment.
        speech_as_speech: Utterances whose best segment has kind ``speech``.
        start_errors_s: Absolute start error of each found utterance.
        end_errors_s: Absolute end error of each found utterance.
        sound_events: Number of ground-truth sound events.
        sound_found: Sound events overlapped by a ``sound`` or ``mixed`` segment.
        sound_as_sound: Sound events overlapped by a ``sound`` segment.
        sound_by_label: label -> [events, found].
        false_segments: Segments overlapping no ground-truth event.
        audio_s: Total scored audio.
        noise_only_s: Audio more than 1 s from any event (for the false-alarm rate).
    """

    speech_events: int = 0
    speech_found: int = 0
    speech_as_speech: int = 0
    start_errors_s: list[float] = field(default_factory=list)
    end_errors_s: list[float] = field(default_factory=list)
    sound_events: int = 0
    sound_found: int = 0
    sound_as_sound: int = 0
    sound_by_label: dict[str, list[int]] = field(default_factory=dict)
    false_segments: int = 0
    audio_s: float = 0.0
    noise_only_s: float = 0.0
    misses: list[str] = field(default_factory=list)

    @property
    def speech_recall(self) -> float:
        """Share of utterances found (1.0 when there are none)."""
        return self.speech_found / self.speech_events if self.speech_events else 1.0

    @property
    def sound_recall(self) -> float:
        """Share of sound events found as sound or mixed (1.0 when there are none)."""
        return self.sound_found / self.sound_events if self.sound_events else 1.0

    @property
    def median_start_error_s(self) -> float:
        """Median absolute start error of found utterances (0 when none)."""
        return float(np.median(self.start_errors_s)) if self.start_errors_s else 0.0

    @property
    def median_end_error_s(self) -> float:
        """Median absolute end error of found utterances (0 when none)."""
        return float(np.median(self.end_errors_s)) if self.end_errors_s else 0.0

    @property
    def false_per_minute(self) -> float:
        """False segments per minute of noise-only audio."""
        return self.false_segments / (self.noise_only_s / 60.0) if self.noise_only_s else 0.0


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def score_scene(
    truth: Sequence[TruthEvent],
    segments: Iterable[SegmentSpan],
    duration_samples: int,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    score: Score | None = None,
) -> Score:
    """Score one scene's segments, adding to ``score``.

    Args:
        truth: Ground-truth events.
        segments: Detected segments.
        duration_samples: Scene length in samples.
        sample_rate_hz: Clock rate for converting errors to seconds.
        score: Accumulator to add to (a new one if None).

    Returns:
        The accumulator.
    """
    out = score or Score()
    spans = list(segments)
    sr = sample_rate_hz
    for event in truth:
        overlapping = [
            s
            for s in spans
            if _overlap(s.start_sample, s.end_sample, event.start_sample, event.end_sample) > 0
        ]
        if event.kind == "speech":
            out.speech_events += 1
            usable = [s for s in overlapping if s.kind in (SegmentKind.SPEECH, SegmentKind.MIXED)]
            if not usable:
                out.misses.append(f"speech {event.label!r} at {event.start_s:.2f}s")
                continue
            best = max(
                usable,
                key=lambda s: _overlap(
                    s.start_sample, s.end_sample, event.start_sample, event.end_sample
                ),
            )
            out.speech_found += 1
            out.speech_as_speech += best.kind == SegmentKind.SPEECH
            out.start_errors_s.append(abs(best.start_sample - event.start_sample) / sr)
            out.end_errors_s.append(abs(best.end_sample - event.end_sample) / sr)
        else:
            out.sound_events += 1
            counts = out.sound_by_label.setdefault(event.label, [0, 0])
            counts[0] += 1
            kinds = {s.kind for s in overlapping}
            if kinds & {SegmentKind.SOUND, SegmentKind.MIXED}:
                out.sound_found += 1
                counts[1] += 1
                out.sound_as_sound += SegmentKind.SOUND in kinds
            else:
                out.misses.append(f"sound {event.label} at {event.start_s:.2f}s as {sorted(kinds)}")
    for s in spans:
        if not any(
            _overlap(s.start_sample, s.end_sample, e.start_sample, e.end_sample) for e in truth
        ):
            out.false_segments += 1
    # Noise-only time: outside events widened by 1 s on both sides.
    busy = np.zeros(duration_samples, np.bool_)
    for e in truth:
        busy[max(0, e.start_sample - sr) : e.end_sample + sr] = True
    out.noise_only_s += float((~busy).sum()) / sr
    out.audio_s += duration_samples / sr
    return out
