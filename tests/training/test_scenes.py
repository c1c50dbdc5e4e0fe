"""The sound-event synthesizers of `training.scenes`: the contract the corpus and the scenes rely
on (deterministic for a generator, float64 at 16 kHz, active from the first to the last sample,
a length that fits the generated scenes), and the variety between seeds."""

from __future__ import annotations

import numpy as np
import pytest

from training.scenes import SOUND_EVENT_NAMES, SOUND_EVENTS, SR, active_extent


@pytest.mark.parametrize("name", SOUND_EVENT_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sound_is_deterministic_active_and_short(name: str, seed: int) -> None:
    clip = SOUND_EVENTS[name](np.random.default_rng(seed))
    again = SOUND_EVENTS[name](np.random.default_rng(seed))
    np.testing.assert_array_equal(clip, again)
    assert clip.dtype == np.float64 and clip.ndim == 1
    assert np.isfinite(clip).all()
    assert 0.3 * SR <= clip.size <= 4.5 * SR, clip.size / SR
    # Active from the first sample to (almost) the last: the scenes' ground truth and the
    # corpus's padding assume no silence inside the clip's ends.
    start, end = active_extent((clip / np.abs(clip).max()).astype(np.float32))
    assert start <= 0.01 * SR and clip.size - end <= 0.1 * SR, (start / SR, (clip.size - end) / SR)


@pytest.mark.parametrize("name", SOUND_EVENT_NAMES)
def test_seeds_give_different_sounds(name: str) -> None:
    clips = [SOUND_EVENTS[name](np.random.default_rng(seed)) for seed in range(3)]
    sizes = {clip.size for clip in clips}
    assert len(sizes) > 1 or not np.allclose(clips[0], clips[1])
