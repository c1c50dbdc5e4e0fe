"""agent/runtime/sound_events.py: the start / update / end lifecycle of label groups, fed
YAMNet-like patches (0.96 s every 0.48 s) with made-up scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from agent.runtime.sound_events import (
    DEFAULT_IGNORED_GROUPS,
    DEFAULT_SUSTAINED_GROUPS,
    SoundDecision,
    SoundTracker,
    SoundTrackerConfig,
    tracker_config,
)

HOP_S = 0.48
PATCH_S = 0.96


def feed(
    tracker: SoundTracker,
    scores: Sequence[Mapping[str, float]],
    *,
    first: int = 0,
    labels: Sequence[tuple[str, float]] = (),
) -> list[tuple[int, SoundDecision]]:
    """Patch ``first + i`` gets ``scores[i]``; returns (patch number, decision) in order."""
    out = []
    for i, patch in enumerate(scores, start=first):
        start = round(i * HOP_S, 6)
        out += [(i, d) for d in tracker.observe(start, start + PATCH_S, patch, labels)]
    return out


def states(decisions: Sequence[tuple[int, SoundDecision]]) -> list[tuple[int, str, str]]:
    return [(i, d.state, d.group) for i, d in decisions]


def test_a_short_sound_gets_a_start_and_an_end_with_one_id() -> None:
    tracker = SoundTracker("kitchen", SoundTrackerConfig(end_after_s=1.0))
    out = feed(tracker, [{"dog": 0.1}, {"dog": 0.9}, {"dog": 0.7}] + [{"dog": 0.05}] * 5)
    # Heard on patches 1-2 (up to 0.96 + 0.96 = 1.92 s); unheard for 1 s once a patch that
    # misses it ends at 2.92 s or later: patch 5 (2.40-3.36 s).
    assert states(out) == [(1, "start", "dog"), (5, "end", "dog")]
    start, end = out[0][1], out[1][1]
    assert start.occurrence_id == end.occurrence_id == "kitchen:sound:0"
    assert not start.sustained and not end.sustained
    assert (start.start_s, start.end_s, start.score) == (HOP_S, HOP_S + PATCH_S, 0.9)
    assert (end.start_s, end.end_s, end.score) == (HOP_S, 2 * HOP_S + PATCH_S, 0.9)


def test_a_sustained_group_gets_updates_at_most_every_update_every_s() -> None:
    config = SoundTrackerConfig(end_after_s=1.0, update_every_s=2.0)
    tracker = SoundTracker("hall", config)
    assert "smoke_alarm" in DEFAULT_SUSTAINED_GROUPS
    out = feed(tracker, [{"smoke_alarm": 0.95}] * 12 + [{}] * 4)
    kinds = [d.state for _, d in out]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"update"}
    assert len({d.occurrence_id for _, d in out}) == 1
    # Patch ends every 0.48 s from 0.96 s: the first at least 2 s after the last decision.
    decision_ends = [d.end_s for _, d in out if d.state != "end"]
    assert decision_ends == pytest.approx([0.96, 3.36, 5.76])
    assert all(d.sustained for _, d in out)


def test_hysteresis_a_score_hovering_at_the_threshold_does_not_flap() -> None:
    config = SoundTrackerConfig(threshold=0.5, off_ratio=0.6, end_after_s=0.0)
    assert config.off_threshold("music") == pytest.approx(0.3)
    tracker = SoundTracker("s", config)
    hovering = [0.55, 0.45, 0.52, 0.35, 0.49, 0.31, 0.5]
    out = feed(tracker, [{"music": s} for s in hovering])
    assert states(out) == [(0, "start", "music")]  # never below 0.3: never ends
    out = feed(tracker, [{"music": 0.29}, {"music": 0.45}, {"music": 0.5}], first=7)
    # Below the off-threshold ends it (end_after_s = 0); 0.45 does not restart it, 0.5 does.
    assert states(out) == [(7, "end", "music"), (9, "start", "music")]
    assert out[0][1].occurrence_id == "s:sound:0" and out[1][1].occurrence_id == "s:sound:1"


def test_thresholds_per_group_and_min_patches() -> None:
    config = SoundTrackerConfig(
        threshold=0.8, thresholds={"baby": 0.3}, min_patches=2, end_after_s=0.0
    )
    tracker = SoundTracker("nursery", config)
    out = feed(tracker, [{"baby": 0.35, "dog": 0.7}, {"baby": 0.4, "dog": 0.79}])
    assert states(out) == [(1, "start", "baby")]  # the dog never reaches 0.8
    assert out[0][1].start_s == 0.0  # the start is where the first loud patch began
    # One loud patch, then one below the off-threshold: the candidate is dropped.
    tracker = SoundTracker("nursery", config)
    assert feed(tracker, [{"dog": 0.9}, {"dog": 0.1}, {"dog": 0.9}]) == []
    # A patch between the thresholds keeps a candidate without counting.
    tracker = SoundTracker("nursery", config)
    out = feed(tracker, [{"dog": 0.9}, {"dog": 0.6}, {"dog": 0.9}])
    assert states(out) == [(2, "start", "dog")] and out[0][1].start_s == 0.0


def test_min_duration_s() -> None:
    tracker = SoundTracker("s", SoundTrackerConfig(min_duration_s=1.9, end_after_s=0.0))
    # Patches 0-2 span 0..1.92 s.
    out = feed(tracker, [{"knock": 0.9}] * 3)
    assert states(out) == [(2, "start", "knock")]


def test_one_id_per_occurrence_and_groups_independent() -> None:
    tracker = SoundTracker("k", SoundTrackerConfig(end_after_s=0.5))
    out = feed(
        tracker,
        [
            {"dog": 0.9},
            {"dog": 0.9, "doorbell": 0.8},
            {"doorbell": 0.8},
            {},
            {},
            {"dog": 0.9},
            {},
            {},
        ],
    )
    ids: dict[str, set[str]] = {}
    for _, d in out:
        ids.setdefault(d.occurrence_id, set()).add(d.state)
    assert all(s == {"start", "end"} for s in ids.values())
    assert sorted(ids) == ["k:sound:0", "k:sound:1", "k:sound:2"]
    # Every id starts before it ends, and ends before the next occurrence of its group starts.
    order = [(d.group, d.state, d.occurrence_id) for _, d in out]
    assert order == [
        ("dog", "start", "k:sound:0"),
        ("doorbell", "start", "k:sound:1"),
        ("dog", "end", "k:sound:0"),
        ("doorbell", "end", "k:sound:1"),
        ("dog", "start", "k:sound:2"),
        ("dog", "end", "k:sound:2"),
    ]


def test_ends_from_the_clock_come_before_the_new_patch() -> None:
    tracker = SoundTracker("s", SoundTrackerConfig(end_after_s=2.0))
    assert [d.state for d in tracker.observe(0.0, 0.96, {"dog": 0.9})] == ["start"]
    # Nothing tagged for 10 s, then the dog again: the old occurrence ends, a new one starts.
    out = tracker.observe(10.0, 10.96, {"dog": 0.9, "cat": 0.9})
    assert [(d.state, d.group, d.occurrence_id) for d in out] == [
        ("end", "dog", "s:sound:0"),
        ("start", "dog", "s:sound:1"),
        ("start", "cat", "s:sound:2"),
    ]
    assert out[0].end_s == 0.96  # when it was last heard, not when the end was decided


def test_advance_ends_what_went_unheard() -> None:
    tracker = SoundTracker("s", SoundTrackerConfig(end_after_s=3.0))
    tracker.observe(0.0, 0.96, {"music": 0.9, "dog": 0.9})
    assert tracker.advance(3.5) == []  # 3.5 - 0.96 < 3
    out = tracker.advance(3.96)
    assert [(d.state, d.group) for d in out] == [("end", "dog"), ("end", "music")]
    assert tracker.open_occurrences == {} and tracker.clock_s == 3.96


def test_close_ends_everything_open_and_drops_candidates() -> None:
    tracker = SoundTracker("s", SoundTrackerConfig(min_patches=3, end_after_s=60.0))
    feed(tracker, [{"music": 0.9, "knock": 0.9}] * 3 + [{"music": 0.9, "glass": 0.9}])
    assert set(tracker.open_occurrences) == {"music", "knock"}
    out = tracker.close()
    assert sorted((d.state, d.group) for d in out) == [("end", "knock"), ("end", "music")]
    assert {d.occurrence_id for d in out} == {"s:sound:0", "s:sound:1"}
    assert tracker.close() == []
    # The glass candidate is gone: two more loud patches do not start it, three do.
    assert feed(tracker, [{"glass": 0.9}] * 2, first=4) == []
    [(_, start)] = feed(tracker, [{"glass": 0.9}], first=6)
    assert start.state == "start" and start.occurrence_id == "s:sound:2"


def test_labels_are_the_best_classes_so_far() -> None:
    tracker = SoundTracker("s", SoundTrackerConfig(max_labels=2, end_after_s=0.0))
    tracker.observe(0.0, 0.96, {"dog": 0.9}, [("Dog", 0.9), ("Animal", 0.95), ("Bark", 0.6)])
    tracker.observe(0.48, 1.44, {"dog": 0.5}, [("Bark", 0.97), ("Dog", 0.2)])
    # A patch where the group is not heard adds no labels to it.
    [end] = tracker.observe(0.96, 1.92, {"dog": 0.1}, [("Speech", 0.99)])
    assert end.state == "end" and end.labels == (("Bark", 0.97), ("Animal", 0.95))
    # With the groups' classes known, a group lists only its own.
    config = SoundTrackerConfig(end_after_s=0.0, group_classes={"dog": {"Dog", "Bark"}})
    tracker = SoundTracker("s", config)
    [start] = tracker.observe(0.0, 0.96, {"dog": 0.9}, [("Animal", 0.95), ("Dog", 0.9)])
    assert start.labels == (("Dog", 0.9),)


def test_ignored_groups_make_no_events() -> None:
    assert {"speech", "silence"} <= DEFAULT_IGNORED_GROUPS
    tracker = SoundTracker("s")
    assert tracker.observe(0.0, 0.96, {"speech": 0.99, "silence": 1.0}) == []
    tracker = SoundTracker("s", SoundTrackerConfig(ignore=()))
    assert [d.group for d in tracker.observe(0.0, 0.96, {"speech": 0.99})] == ["speech"]


def test_numpy_scores_are_accepted() -> None:
    tracker = SoundTracker("s")
    [start] = tracker.observe(
        np.float64(0.0),
        np.float32(0.96),  # type: ignore[arg-type]
        {"dog": np.float32(0.75)},  # type: ignore[dict-item]
    )
    assert start.score == pytest.approx(0.75) and isinstance(start.score, float)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.observe(6.0, 6.96, {"dog": math.nan}), r"score of 'dog'.*nan"),
        (lambda t: t.observe(6.0, 6.96, {"dog": 1.5}), r"expected a number in 0\.\.1"),
        (lambda t: t.observe(6.0, 6.96, {"dog": -0.1}), r"0\.\.1"),
        (lambda t: t.observe(6.0, 6.96, {"dog": True}), r"0\.\.1"),
        (lambda t: t.observe(6.0, 6.96, {}, [("Dog", math.nan)]), r"label 'Dog'"),
        (lambda t: t.observe(math.nan, 0.96, {}), r"start_s: expected a finite number"),
        (lambda t: t.observe(0.0, math.inf, {}), r"end_s: expected a finite number"),
        (lambda t: t.observe(1.0, 0.5, {}), r"end_s 0.5 is before start_s 1.0"),
        (lambda t: t.observe(4.0, 4.96, {}), r"start_s 4.0 is before the tracker's clock 5.0"),
        (lambda t: t.advance(4.0), r"now_s 4.0 is before the tracker's clock 5.0"),
        (lambda t: t.advance(math.nan), r"now_s: expected a finite number"),
    ],
)
def test_bad_input_is_a_value_error(call: object, message: str) -> None:
    tracker = SoundTracker("s")
    tracker.observe(5.0, 5.96, {"dog": 0.9})
    with pytest.raises(ValueError, match=message):
        call(tracker)  # type: ignore[operator]
    # Nothing was changed by the refused call.
    assert tracker.clock_s == 5.0 and tracker.open_occurrences == {"dog": "s:sound:0"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, r"threshold of 'threshold'"),
        ({"thresholds": {"dog": 1.2}}, r"threshold of 'dog'"),
        ({"off_ratio": 0.0}, r"off_ratio"),
        ({"min_patches": 0}, r"min_patches"),
        ({"end_after_s": math.nan}, r"end_after_s"),
        ({"update_every_s": -1.0}, r"update_every_s"),
    ],
)
def test_bad_config_is_a_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SoundTrackerConfig(**kwargs)  # type: ignore[arg-type]


def test_reset_forgets_everything() -> None:
    tracker = SoundTracker("s")
    tracker.observe(5.0, 5.96, {"dog": 0.9})
    tracker.reset()
    assert tracker.open_occurrences == {} and tracker.clock_s == -math.inf
    [start] = tracker.observe(0.0, 0.96, {"dog": 0.9})
    assert start.occurrence_id == "s:sound:0"


def test_default_groups_are_tagger_groups_and_the_config_agrees() -> None:
    from agent.config import SoundsConfig
    from model.sound_tagger import LABEL_GROUPS

    assert set(LABEL_GROUPS) >= DEFAULT_SUSTAINED_GROUPS
    assert set(LABEL_GROUPS) >= DEFAULT_IGNORED_GROUPS
    assert set(SoundsConfig().ignore) == DEFAULT_IGNORED_GROUPS
    assert tracker_config(SoundsConfig()).sustained == DEFAULT_SUSTAINED_GROUPS
