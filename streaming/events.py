"""The typed event stream that every segmenter emits.

All offsets are in samples on the *stream clock*: sample 0 is the first sample pushed into
the segmenter (after resampling to ``sample_rate_hz``). Times in seconds are derived
properties, never stored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class SegmentKind(enum.StrEnum):
    """What a segment holds."""

    SPEECH = "speech"
    SOUND = "sound"
    MIXED = "mixed"


@dataclass(frozen=True)
class SegmentStarted:
    """A segment has been confirmed (use for "listening..." feedback).

    Attributes:
        start_sample: First sample of the segment, including pre-roll.
        detected_sample: Stream position (samples) when the start was confirmed; always
            ``>= start_sample``. ``detected_sample - start_sample`` is the start latency.
        kind: What triggered the start (``SPEECH`` or ``SOUND``); the final kind comes in
            :class:`SegmentEnded`.
        sample_rate_hz: Rate of the stream clock.
    """

    start_sample: int
    detected_sample: int
    kind: SegmentKind
    sample_rate_hz: int

    @property
    def start_s(self) -> float:
        """Start time in seconds from the start of the stream."""
        return self.start_sample / self.sample_rate_hz


@dataclass(frozen=True)
class SegmentEnded:
    """A segment is complete.

    Attributes:
        start_sample: First sample (inclusive), the same as the matching
            :class:`SegmentStarted`.
        end_sample: One past the last sample (exclusive).
        detected_sample: Stream position (samples) when the end was decided (``>= end_sample``
            except for a split or :meth:`flush`).
        kind: ``SPEECH``, ``SOUND`` or ``MIXED``.
        audio: The segment's samples, float32, shape ``(end_sample - start_sample,)``.
        sample_rate_hz: Rate of the stream clock and of ``audio``.
        split: True when the segment was cut at its maximum length (a continuation segment
            follows, starting at this ``end_sample``). A segment that reaches the maximum
            length as its sound ends is ended normally instead (False).
        speech_ratio: Fraction (0..1) of the segment's active frames judged speech.
    """

    start_sample: int
    end_sample: int
    detected_sample: int
    kind: SegmentKind
    audio: FloatArray = field(repr=False, compare=False)
    sample_rate_hz: int
    split: bool = False
    speech_ratio: float = 0.0

    @property
    def start_s(self) -> float:
        """Start time in seconds."""
        return self.start_sample / self.sample_rate_hz

    @property
    def end_s(self) -> float:
        """End time in seconds."""
        return self.end_sample / self.sample_rate_hz

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return (self.end_sample - self.start_sample) / self.sample_rate_hz


@dataclass(frozen=True)
class AmbientWindow:
    """A fixed window of background audio, emitted every N seconds for ambient captioning.

    Attributes:
        start_sample: First sample (inclusive).
        end_sample: One past the last sample.
        audio: The window's samples, float32.
        sample_rate_hz: Rate of the stream clock and of ``audio``.
    """

    start_sample: int
    end_sample: int
    audio: FloatArray = field(repr=False, compare=False)
    sample_rate_hz: int

    @property
    def start_s(self) -> float:
        """Start time in seconds."""
        return self.start_sample / self.sample_rate_hz

    @property
    def end_s(self) -> float:
        """End time in seconds."""
        return self.end_sample / self.sample_rate_hz


Event = SegmentStarted | SegmentEnded | AmbientWindow


def empty_audio() -> FloatArray:
    """A zero-length float32 array."""
    return np.zeros(0, np.float32)
