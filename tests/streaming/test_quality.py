"""Quality on fixed generated scenes: the issue's acceptance figures, as assertions.

Scenes: espeak-ng speech in several voices and speeds, synthesized sound events, background
noise at 10-30 dB SNR (see training/scenes.py). Full figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import functools

import pytest

from streaming.events import SegmentEnded
from streaming.segmenter import Segmenter, SegmenterConfig
from training.evaluate import Score, SegmentSpan, score_scene
from training.scenes import BACKGROUND_NAMES, Scene, make_noise_only, make_scene

from .conftest import requires_espeak

pytestmark = [requires_espeak, pytest.mark.numerics]  # float results: two kernel sets


@functools.cache
def _scenes() -> tuple[Scene, ...]:
    return tuple(
        make_scene(seed, 40.0, n_speech=4, n_sounds=6, background_name=bg, noise_level_dbfs=level)
        for seed, bg, level in ((11, "dishwasher", -38.0), (12, "hum", -45.0), (13, "pink", -50.0))
    )


def _score(config: SegmenterConfig, scenes: tuple[Scene, ...]) -> Score:
    score = Score()
    segmenter = Segmenter(config)
    for scene in scenes:
        segmenter.reset()
        events = []
        for i in range(0, scene.audio.size, 8000):
            events += segmenter.push(scene.audio[i : i + 8000])
        events += segmenter.flush()
        spans = [SegmentSpan.from_event(e) for e in events if isinstance(e, SegmentEnded)]
        score_scene(scene.events, spans, scene.audio.size, score=score)
    return score


def test_webrtc_meets_the_quality_targets() -> None:
    score = _score(SegmenterConfig(), _scenes())
    assert score.speech_events == 12 and score.sound_events == 18
    assert score.speech_recall == 1.0, score.misses
    assert score.median_start_error_s <= 0.120
    assert score.median_end_error_s <= 0.120
    assert score.sound_recall >= 0.9, score.misses
    assert score.false_per_minute <= 1.0


def test_noise_only_gives_at_most_one_false_segment_per_minute() -> None:
    noise = tuple(make_noise_only(50 + i, 30.0, bg, -35.0) for i, bg in enumerate(BACKGROUND_NAMES))
    score = _score(SegmenterConfig(), noise)
    assert score.noise_only_s >= 119
    assert score.false_per_minute <= 1.0


@pytest.mark.slow
def test_silero_meets_the_speech_targets() -> None:
    # Sound recall is not asserted for Silero: with 32 ms frames it misses some sparse impulse
    # trains on these scenes (15/18 here, 45/48 in BENCHMARKS.md); a known gap.
    score = _score(SegmenterConfig(vad="silero"), _scenes())
    assert score.speech_recall == 1.0, score.misses
    assert score.median_start_error_s <= 0.120
    assert score.median_end_error_s <= 0.120
    assert score.false_per_minute <= 1.0
