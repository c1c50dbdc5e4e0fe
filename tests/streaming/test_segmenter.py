"""Tests for streaming/segmenter.py on synthetic audio: state machine, kinds, chunking, errors."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.errors import SegmenterConfigError, UnsupportedRateError
from streaming.events import AmbientWindow, SegmentEnded, SegmentKind, SegmentStarted
from streaming.scenes import SR, alarm_beeping, knocking, speak
from streaming.segmenter import Segmenter, SegmenterConfig

from .conftest import requires_espeak


def _run(audio: np.ndarray, config: SegmenterConfig | None = None, chunk: int = 1600) -> list:
    seg = Segmenter(config)
    events = []
    for i in range(0, audio.size, chunk):
        events += seg.push(audio[i : i + chunk])
    return events + seg.flush()


def _ended(events: list) -> list[SegmentEnded]:
    return [e for e in events if isinstance(e, SegmentEnded)]


def _noise(seconds: float, level: float = 0.002, seed: int = 0) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(
        np.float32
    )


def _place(background: np.ndarray, clip: np.ndarray, at_s: float, gain: float) -> tuple[int, int]:
    start = int(at_s * SR)
    background[start : start + clip.size] += (gain * clip).astype(np.float32)
    return start, start + clip.size


def test_silence_and_steady_noise_give_no_events() -> None:
    assert _run(np.zeros(5 * SR, np.float32)) == []
    assert _run(_noise(10, 0.05)) == []


def test_steady_hum_gives_no_segment() -> None:
    t = np.arange(10 * SR) / SR
    hum = (0.1 * np.sin(2 * np.pi * 50 * t) + 0.05 * np.sin(2 * np.pi * 100 * t)).astype(np.float32)
    assert _ended(_run(hum + _noise(10))) == []


def test_alarm_in_quiet_room_is_one_sound_segment() -> None:
    audio = _noise(6, 0.0005)
    clip = alarm_beeping(np.random.default_rng(3))
    start, end = _place(audio, clip, 2.0, 0.3)
    events = _run(audio)
    ended = _ended(events)
    assert len(ended) == 1
    segment = ended[0]
    assert segment.kind == SegmentKind.SOUND
    assert abs(segment.start_sample - start) < 0.12 * SR
    assert abs(segment.end_sample - end) < 0.12 * SR
    # Started comes first, with the same start and a detection time after it.
    started = [e for e in events if isinstance(e, SegmentStarted)]
    assert len(started) == 1 and started[0].start_sample == segment.start_sample
    assert started[0].detected_sample > started[0].start_sample
    assert events.index(started[0]) < events.index(segment)


def test_knock_over_dishwasher_noise_is_caught() -> None:
    rng = np.random.default_rng(5)
    n = 8 * SR
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(freqs < 200) | (freqs > 4000)] = 0
    dishwasher = np.fft.irfft(spectrum, n)
    audio = (0.03 * dishwasher / dishwasher.std()).astype(np.float32)
    clip = knocking(rng)
    clip_rms = np.sqrt(np.mean(clip**2))
    start, end = _place(audio, clip, 4.0, 0.03 * 10 ** (12 / 20) / clip_rms)  # 12 dB SNR
    ended = _ended(_run(audio))
    assert len(ended) == 1
    assert ended[0].kind in (SegmentKind.SOUND, SegmentKind.MIXED)
    assert ended[0].start_sample < end and ended[0].end_sample > start


@requires_espeak
def test_utterance_is_speech_with_accurate_bounds() -> None:
    audio = _noise(5)
    clip = speak("turn left and stop", "en-us", 160)
    start, end = _place(audio, clip, 1.5, 0.5)
    ended = _ended(_run(audio))
    assert len(ended) == 1
    assert ended[0].kind == SegmentKind.SPEECH
    assert abs(ended[0].start_sample - start) <= 0.12 * SR
    assert abs(ended[0].end_sample - end) <= 0.12 * SR
    np.testing.assert_array_equal(
        ended[0].audio, audio[ended[0].start_sample : ended[0].end_sample]
    )


@requires_espeak
@pytest.mark.parametrize("chunk", [1, 160, 333, 16000, 10**7])
def test_events_do_not_depend_on_chunk_size(chunk: int) -> None:
    audio = _noise(4)
    _place(audio, speak("hello robot, come here please", "en-gb+f3", 190), 1.0, 0.5)
    if chunk == 1:
        audio = audio[: int(2.5 * SR)]  # keep the per-sample case fast
    reference = [(e.start_sample, e.end_sample, e.kind) for e in _ended(_run(audio, chunk=4000))]
    got = [(e.start_sample, e.end_sample, e.kind) for e in _ended(_run(audio, chunk=chunk))]
    assert got == reference and got


def test_short_blip_is_dropped() -> None:
    audio = _noise(3, 0.0005)
    t = np.arange(int(0.04 * SR)) / SR
    _place(audio, np.sin(2 * np.pi * 1000 * t).astype(np.float32), 1.5, 0.3)
    assert _run(audio, SegmenterConfig(min_active_ms=150)) == []


def test_long_sound_is_split_at_its_quietest_point() -> None:
    rng = np.random.default_rng(1)
    audio = _noise(14, 0.0005)
    loud = (0.1 * rng.standard_normal(12 * SR)).astype(np.float32)
    dip = slice(int(5.0 * SR), int(5.2 * SR))
    loud[dip] *= 0.15  # quieter stretch, but still active
    audio[SR : 13 * SR] += loud
    config = SegmenterConfig(max_segment_ms=8000, split_search_ms=6000, end_silence_ms=300)
    events = _run(audio, config)
    ended = _ended(events)
    assert len(ended) == 2
    assert ended[0].split and not ended[1].split
    cut_s = ended[0].end_sample / SR
    assert 5.9 <= cut_s <= 6.3, cut_s  # the dip is at 1 + 5.0 .. 1 + 5.2 s
    assert ended[1].start_sample == ended[0].end_sample
    assert sum(isinstance(e, SegmentStarted) for e in events) == 2


def test_speech_mode_ignores_pure_sound_and_sound_mode_labels_sound() -> None:
    audio = _noise(5, 0.0005)
    _place(audio, knocking(np.random.default_rng(2)), 2.0, 0.5)
    assert all(
        e.kind == SegmentKind.SOUND for e in _ended(_run(audio, SegmenterConfig(mode="sound")))
    )
    assert len(_ended(_run(audio, SegmenterConfig(mode="sound")))) == 1


def test_ambient_windows_tile_the_stream() -> None:
    audio = _noise(7.3)
    windows = [
        e for e in _run(audio, SegmenterConfig(ambient_every_s=2.0)) if isinstance(e, AmbientWindow)
    ]
    assert [(w.start_sample, w.end_sample) for w in windows] == [
        (0, 2 * SR),
        (2 * SR, 4 * SR),
        (4 * SR, 6 * SR),
        (6 * SR, audio.size),
    ]
    np.testing.assert_array_equal(windows[1].audio, audio[2 * SR : 4 * SR])


def test_reset_gives_identical_results() -> None:
    audio = _noise(6, 0.0005)
    _place(audio, alarm_beeping(np.random.default_rng(4)), 2.0, 0.3)
    seg = Segmenter()
    first = [(e.start_sample, e.end_sample) for e in _ended(seg.push(audio) + seg.flush())]
    seg.reset()
    second = [(e.start_sample, e.end_sample) for e in _ended(seg.push(audio) + seg.flush())]
    assert first == second and first


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"frame_ms": 15}, SegmenterConfigError),
        ({"aggressiveness": 4}, SegmenterConfigError),
        ({"sample_rate_hz": 44100}, UnsupportedRateError),
        ({"vad": "silero", "sample_rate_hz": 8000}, UnsupportedRateError),
        ({"vad": "nope"}, SegmenterConfigError),
        ({"end_silence_ms": 0}, SegmenterConfigError),
        ({"start_active_ms": 200, "start_window_ms": 100}, SegmenterConfigError),
        ({"max_segment_ms": 1000, "split_search_ms": 2000}, SegmenterConfigError),
    ],
)
def test_bad_config_raises(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        SegmenterConfig(**kwargs)


def test_push_after_flush_raises() -> None:
    seg = Segmenter()
    seg.flush()
    with pytest.raises(SegmenterConfigError):
        seg.push(np.zeros(10, np.float32))
