"""`bench pipeline --sounds`: the latency from the end of a scene sound to its sound event,
on hand-made events (no model, no timing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from bench.pipeline import _sound_latencies


@dataclass
class Truth:
    start_sample: int
    end_sample: int
    kind: str


@dataclass
class FakeScene:
    events: tuple[Truth, ...]
    sample_rate_hz: int = 16_000


def start(stream: str, start_s: float, end_s: float, emitted: float) -> dict[str, Any]:
    return {"kind": "sound", "state": "start", "stream": stream, "start": start_s,
            "end": end_s, "timing": {"emitted": emitted}}  # fmt: skip


def test_each_sound_is_timed_to_the_first_start_overlapping_it() -> None:
    rate = 16_000
    scenes = [
        FakeScene((Truth(2 * rate, 3 * rate, "sound"), Truth(5 * rate, 6 * rate, "speech"))),
        FakeScene((Truth(10 * rate, 11 * rate, "sound"), Truth(15 * rate, 16 * rate, "sound"))),
    ]
    wall = 1000.0  # stream second 0 on the wall clock
    events = [
        start("s0", 2.0, 2.96, wall + 3.4),  # 0.4 s after the sound's end
        start("s0", 2.5, 3.0, wall + 3.9),  # a second group of the same sound: not the first
        {**start("s0", 2.0, 3.0, wall + 9.0), "state": "end"},  # ends are not timed
        start("s1", 9.5, 10.6, wall + 10.8),  # started while it went on: -0.2 s
        start("s1", 30.0, 31.0, wall + 31.2),  # overlaps no sound: another start
        {"kind": "command", "stream": "s0", "timing": {"emitted": wall}},
    ]
    got = _sound_latencies(events, scenes, wall)
    assert got["sounds"] == 3 and got["sounds_heard"] == 2  # the one at 15 s got no event
    assert got["sound_starts"] == 4 and got["other_starts"] == 2
    assert got["sound_p50"] == pytest.approx(0.1)
    assert got["sound_p95"] == pytest.approx(-0.2 + 0.95 * 0.6)


def test_no_sound_heard_gives_nan_percentiles() -> None:
    got = _sound_latencies([], [FakeScene((Truth(0, 16_000, "sound"),))], 0.0)
    assert got["sounds"] == 1 and got["sounds_heard"] == 0 and got["other_starts"] == 0
    assert got["sound_p95"] != got["sound_p95"]  # NaN
