"""Tests for streaming/segmenter.py on synthetic audio: state machine, kinds, chunking, errors."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.errors import SegmenterConfigError, UnsupportedRateError
from streaming.events import AmbientWindow, SegmentEnded, SegmentKind, SegmentStarted
from streaming.segmenter import Segmenter, SegmenterConfig
from training.scenes import SR, alarm_beeping, knocking, speak

from .conftest import requires_espeak

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)


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


def _voice(seconds: float, f0_hz: float = 130.0) -> np.ndarray:
    """A synthetic voiced sound: 20 harmonics of a wavering pitch, in 4 syllables per second
    (harmonic, not tonal, much energy below 1 kHz: speech-like frames)."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0_hz * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SR
    x = sum(np.sin(k * phase) / np.sqrt(k) for k in range(1, 21))
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    return (x * syllables / np.abs(x).max()).astype(np.float32)


def _tone(seconds: float, freq_hz: float = 2000.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq_hz * np.arange(int(seconds * SR)) / SR).astype(np.float32)


def _burst(seconds: float, seed: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32) / 4


def _kind_scene(name: str) -> np.ndarray:
    """6 s of quiet room with one event at 1 s."""
    audio = _noise(6, 0.0005)
    if name in ("voice", "voice+tone", "voice+noise"):
        _place(audio, _voice(2.0 if name != "voice+noise" else 0.4), 1.0, 0.2)
    if name == "tone":
        _place(audio, _tone(2.0), 1.0, 0.2)
    if name == "voice+tone":
        _place(audio, _tone(1.2), 1.8, 0.2)  # over the voice's last 60 %
    if name == "voice+noise":
        _place(audio, _burst(1.6), 1.4, 0.2)  # noise right after a short voice
    if name == "knock":
        _place(audio, knocking(np.random.default_rng(2)), 1.0, 0.5)
    return audio


@pytest.mark.parametrize(
    ("scene", "mode", "kind"),
    [
        ("voice", "both", SegmentKind.SPEECH),
        ("tone", "both", SegmentKind.SOUND),
        # >= 50 % of the active frames tonal and not speech-like, with speech-like ones too.
        ("voice+tone", "both", SegmentKind.MIXED),
        # Speech-like frames between mixed_ratio (12 %) and speech_ratio (25 %).
        ("voice+noise", "both", SegmentKind.MIXED),
        ("knock", "both", SegmentKind.SOUND),
        ("voice", "sound", SegmentKind.SOUND),
        ("tone", "sound", SegmentKind.SOUND),
        ("knock", "sound", SegmentKind.SOUND),
        # Speech mode opens segments on the VAD alone, which fires on a 2 kHz tone too; the kind
        # is still classified, so the tone is not passed off as speech.
        ("voice", "speech", SegmentKind.SPEECH),
        ("tone", "speech", SegmentKind.SOUND),
        ("voice+tone", "speech", SegmentKind.MIXED),
    ],
)
def test_kind_by_scene_and_mode(scene: str, mode: str, kind: SegmentKind) -> None:
    events = _run(_kind_scene(scene), SegmenterConfig(mode=mode))  # type: ignore[arg-type]
    ended = _ended(events)
    assert [e.kind for e in ended] == [kind], [(e.kind, e.speech_ratio) for e in ended]
    assert abs(ended[0].start_s - 1.0) < 0.12
    started = [e for e in events if isinstance(e, SegmentStarted)]
    assert [e.start_sample for e in started] == [ended[0].start_sample]


@requires_espeak
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_every_aggressiveness_and_frame_finds_the_utterance(
    aggressiveness: int, frame_ms: int
) -> None:
    audio = _noise(5)
    clip = speak("turn left and stop", "en-us", 160)
    start, end = _place(audio, clip, 1.5, 0.5)
    config = SegmenterConfig(aggressiveness=aggressiveness, frame_ms=frame_ms)
    segmenter = Segmenter(config)
    assert segmenter.frame_samples == SR * frame_ms // 1000
    ended = _ended(_run(audio, config))
    assert [e.kind for e in ended] == [SegmentKind.SPEECH]
    assert abs(ended[0].start_sample - start) <= 0.12 * SR
    assert abs(ended[0].end_sample - end) <= 0.12 * SR


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_higher_aggressiveness_flags_fewer_noise_frames(frame_ms: int) -> None:
    from streaming.detectors import WebrtcVadDetector

    noise = _noise(4, 0.05, seed=0)
    counts = []
    for aggressiveness in range(4):
        vad = WebrtcVadDetector(aggressiveness, frame_ms)
        n = vad.frame_samples
        counts.append(int(vad.classify(noise[: noise.size // n * n].reshape(-1, n)).sum()))
    assert counts == sorted(counts, reverse=True) and counts[3] < counts[0], counts


@pytest.mark.parametrize("pre_roll_ms", [0, 20, 60, 200])
def test_pre_roll_moves_the_start_back_exactly(pre_roll_ms: int) -> None:
    audio = _noise(6, 0.0005)
    _place(audio, alarm_beeping(np.random.default_rng(3)), 2.0, 0.3)
    reference = _ended(_run(audio, SegmenterConfig(pre_roll_ms=0)))
    ended = _ended(_run(audio, SegmenterConfig(pre_roll_ms=pre_roll_ms)))
    assert len(ended) == len(reference) == 1
    assert ended[0].start_sample == reference[0].start_sample - pre_roll_ms * SR // 1000
    assert ended[0].end_sample == reference[0].end_sample


@pytest.mark.parametrize(
    ("gap_ms", "end_silence_ms", "segments"),
    [
        (300, 500, 1),  # a gap shorter than the end silence is bridged
        (400, 500, 1),
        (400, 300, 2),  # a longer one splits the bursts
        (800, 500, 2),
        (800, 1000, 1),
    ],
)
def test_end_silence_merges_or_splits_two_bursts(
    gap_ms: int, end_silence_ms: int, segments: int
) -> None:
    audio = _noise(6, 0.0005)
    first = _place(audio, _burst(0.6), 1.0, 0.2)
    second = _place(audio, _burst(0.6, seed=10), 1.6 + gap_ms / 1000, 0.2)
    ended = _ended(_run(audio, SegmenterConfig(end_silence_ms=end_silence_ms)))
    assert len(ended) == segments
    assert abs(ended[0].start_sample - first[0]) < 0.1 * SR
    assert abs(ended[-1].end_sample - second[1]) < 0.1 * SR


def _check_consistent(events: list, config: SegmenterConfig, stream_samples: int) -> None:
    """Invariants of any event stream: Started/Ended pairs in order, end >= start, audio of the
    stated length, no overlap, splits continue where the previous segment ended."""
    open_start = None
    previous_end = 0
    previous_split = False
    max_samples = config.max_segment_ms * SR // 1000
    for event in events:
        if isinstance(event, SegmentStarted):
            assert open_start is None
            open_start = event.start_sample
            assert event.detected_sample >= event.start_sample
        elif isinstance(event, SegmentEnded):
            assert open_start == event.start_sample
            open_start = None
            assert previous_end <= event.start_sample < event.end_sample <= stream_samples
            assert event.audio.size == event.end_sample - event.start_sample
            assert event.end_sample - event.start_sample <= max_samples
            if previous_split:
                assert event.start_sample == previous_end
            previous_end, previous_split = event.end_sample, event.split
    assert open_start is None and not previous_split


@pytest.mark.parametrize(
    ("sound_s", "segments"),
    [
        *[(sound_s, 1) for sound_s in (19.3, 19.5, 19.6, 19.7, 19.8, 19.9)],
        # Cut in the last 5 s of the first 20; the continuation ends on silence.
        *[(sound_s, 2) for sound_s in (20.3, 20.8, 28.0)],
    ],
)
def test_max_length_reached_as_the_sound_ends_gives_no_empty_continuation(
    sound_s: float, segments: int
) -> None:
    # Default settings: the segment starts at 0.94 s and reaches 20 s at 20.94 s. A sound
    # ending within the end silence before that used to be cut after its last active frame,
    # leaving a continuation that ended before it started.
    rng = np.random.default_rng(0)
    audio = _noise(sound_s + 3, 0.0005)
    audio[SR : SR + int(sound_s * SR)] += (0.1 * rng.standard_normal(int(sound_s * SR))).astype(
        np.float32
    )
    config = SegmenterConfig()
    events = _run(audio, config)
    _check_consistent(events, config, audio.size)
    ended = _ended(events)
    assert ended[0].start_sample == int(0.94 * SR)
    assert abs(ended[-1].end_sample - (SR + sound_s * SR)) < 0.1 * SR
    assert len(ended) == segments
    assert [e.split for e in ended] == [True] * (segments - 1) + [False]


@pytest.mark.parametrize(
    ("kwargs", "sound_s"),
    [
        ({"max_segment_ms": 561, "split_search_ms": 280}, 3.0),  # just above 500 + 60
        ({"max_segment_ms": 1000, "split_search_ms": 500}, 3.0),
        ({"max_segment_ms": 200, "split_search_ms": 100, "end_silence_ms": 100}, 2.0),
        ({"max_segment_ms": 90, "split_search_ms": 20, "end_silence_ms": 40, "pre_roll_ms": 0}, 1),
    ],
)
def test_short_maximum_lengths_split_the_sound_and_then_end_on_silence(
    kwargs: dict, sound_s: float
) -> None:
    rng = np.random.default_rng(4)
    audio = _noise(sound_s + 3, 0.0005)
    audio[SR : SR + int(sound_s * SR)] += (0.1 * rng.standard_normal(int(sound_s * SR))).astype(
        np.float32
    )
    config = SegmenterConfig(**kwargs)
    seg = Segmenter(config)
    events = seg.push(audio)
    _check_consistent(events, config, audio.size)  # all ended before the stream did
    ended = _ended(events)
    assert len(ended) >= 2 and ended[0].split and not ended[-1].split
    assert abs(ended[-1].end_sample - (1 + sound_s) * SR) < 0.1 * SR
    assert seg.flush() == []


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
        ({"max_segment_ms": 1}, SegmenterConfigError),
        ({"max_segment_ms": 200}, SegmenterConfigError),
        ({"max_segment_ms": 560, "split_search_ms": 100}, SegmenterConfigError),  # = 500 + 60
        # 500 ms of 30 ms frames is 17 frames (510 ms), + 60.
        ({"max_segment_ms": 570, "split_search_ms": 99, "frame_ms": 30}, SegmenterConfigError),
        ({"split_search_ms": 0}, SegmenterConfigError),
        ({"split_search_ms": 19}, SegmenterConfigError),
        ({"vad": "silero", "split_search_ms": 31}, SegmenterConfigError),
    ],
)
def test_bad_config_raises(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        SegmenterConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_segment_ms": 561, "split_search_ms": 280},
        {"max_segment_ms": 100, "split_search_ms": 20, "end_silence_ms": 20, "pre_roll_ms": 0},
        {"split_search_ms": 20},
        {"vad": "silero", "split_search_ms": 32},
    ],
)
def test_edge_configs_are_accepted(kwargs: dict) -> None:
    SegmenterConfig(**kwargs)


def test_push_after_flush_raises() -> None:
    seg = Segmenter()
    seg.flush()
    with pytest.raises(SegmenterConfigError):
        seg.push(np.zeros(10, np.float32))
