"""bench/load.py for soaks: the memory verdict (warm-up found from the curve, a leak when it
never levels off) and the per-interval rows on synthetic data, then a few seconds of the real
benchmark on the tiny model for the report's structure."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench import load


def curve(minutes: float, mib_at: object) -> list[tuple[float, float]]:
    """One RSS sample a second for ``minutes``: ``mib_at(t)``."""
    return [(float(t), float(mib_at(t))) for t in range(int(minutes * 60) + 1)]  # type: ignore[operator]


def test_the_warm_up_ends_where_the_curve_levels_off_not_at_a_fixed_time() -> None:
    # 100 MiB climbed over the first 3 minutes, then flat: the warm-up is about 3 minutes,
    # far longer than a fixed 30 s would assume, and the slope after it is ~0.
    warm = curve(10, lambda t: 400 + 100 * min(t, 180) / 180)
    verdict = load.memory_verdict(warm, max_slope_mib_min=1.0, window_s=60)
    assert verdict["judged"] and verdict["levelled"] and not verdict["leak"]
    assert 170 <= verdict["warmup_s"] <= 185
    assert abs(verdict["slope_mib_per_min"]) < 0.1
    # Flat from the start: no warm-up at all.
    flat = load.memory_verdict(curve(5, lambda t: 400.0), 1.0, 60)
    assert flat["warmup_s"] == 0 and flat["levelled"]


def test_a_curve_that_never_levels_off_is_a_leak() -> None:
    # 2 MiB/min all the way: never under 1 MiB/min over any window.
    leak = load.memory_verdict(curve(10, lambda t: 400 + 2 * t / 60), 1.0, 60)
    assert leak["judged"] and leak["leak"] and not leak["levelled"]
    assert leak["warmup_s"] is None and leak["slope_mib_per_min"] == pytest.approx(2.0)
    # Levels off, then climbs again at the end: still a leak (the last window judges).
    late = load.memory_verdict(
        curve(10, lambda t: 400 + (0 if t < 420 else 3 * (t - 420) / 60)), 1.0, 60
    )
    assert late["leak"] and late["warmup_s"] is None
    # Slowly growing, under the threshold everywhere: level, with its slope reported.
    slow = load.memory_verdict(curve(10, lambda t: 400 + 0.5 * t / 60), 1.0, 60)
    assert slow["levelled"] and slow["slope_mib_per_min"] == pytest.approx(0.5)
    # Shrinking is not a leak.
    assert not load.memory_verdict(curve(5, lambda t: 500 - t / 10), 1.0, 60)["leak"]


def test_allocator_steps_are_not_a_leak_but_a_slow_climb_under_them_is() -> None:
    # Ten minutes flat at 2330 MiB with the allocator stepping ±7 MiB each minute (what the
    # nano soak showed), ending on a step up: the last 200 s fit a slope of several MiB/min.
    steps = [0, 7, -5, 6, -7, 4, 0, -7, -6, 0, 7]
    noisy = curve(10, lambda t: 2330 + steps[int(t // 60)])
    assert load.memory_verdict(noisy, 1.0, 200)["leak"]  # without a noise margin: false alarm
    verdict = load.memory_verdict(noisy, 1.0, 200, noise_mib=10)
    assert verdict["levelled"] and not verdict["leak"]
    # A fast start, 60 MiB in the first 25 s (the nano agent's), is the warm-up even though
    # it is shorter than a quarter window.
    fast = load.memory_verdict(
        curve(10, lambda t: 2270 + 60 * min(t, 25) / 25 + steps[int(t // 60)]), 1.0, 200, 10
    )
    assert fast["levelled"] and 15 <= fast["warmup_s"] <= 25
    # The same steps on a 1.5 MiB/min leak over an hour: it rises 30 MiB in every
    # 20-minute window, far past the margin, so it is still a leak.
    hour = curve(60, lambda t: 2330 + 1.5 * t / 60 + steps[int(t // 60) % len(steps)])
    leak = load.memory_verdict(hour, 1.0, 1200, noise_mib=10)
    assert leak["judged"] and leak["leak"]


def test_a_run_too_short_for_one_window_is_not_judged() -> None:
    short = load.memory_verdict(curve(0.05, lambda t: 400 + t), 1.0, 60)  # 4 s
    assert not short["judged"] and not short["leak"] and short["warmup_s"] is None


def test_interval_rows_count_windows_by_best_task_and_their_latency() -> None:
    finals = [
        (1.0, "a:0", "transcript", 0.4),
        (1.1, "a:0", "command", 0.5),  # one window: counted once, as a command
        (2.0, "a:1", "caption", 2.0),
        (61.0, "a:2", "command", 0.9),
        (62.0, "a:3", "transcript", 1.5),
    ]
    drops = [(5.0, "a:9", "caption"), (70.0, "a:8", "transcript")]
    rss = [(0.0, 400.0), (59.0, 401.0), (65.0, 402.0)]
    rows = load.interval_rows(finals, drops, rss, 60.0)
    assert [r["end_s"] for r in rows] == [60.0, 120.0]
    first, second = rows
    assert first["windows"] == {"command": 1, "transcript": 0, "caption": 2, "answer": 0}
    assert first["dropped"] == {"command": 0, "transcript": 0, "caption": 1, "answer": 0}
    assert second["windows"] == {"command": 1, "transcript": 2, "caption": 0, "answer": 0}
    assert second["dropped"]["transcript"] == 1
    assert first["command_p50_s"] == 0.5 and second["command_p95_s"] == 0.9
    assert first["all_p95_s"] == pytest.approx(1.85)  # of 0.4, 0.5, 2.0
    assert (first["rss_mib"], second["rss_mib"]) == (401.0, 402.0)


def test_capacity_is_the_largest_count_sustained_before_the_first_that_is_not() -> None:
    assert load.sustained(1000, {"command": 0, "transcript": 5, "caption": 4, "answer": 0})
    assert not load.sustained(1000, {"command": 1, "transcript": 0, "caption": 0, "answer": 0})
    assert not load.sustained(100, {"command": 0, "transcript": 0, "caption": 1, "answer": 0})
    steps = [
        {"streams": 2, "sustained": True},
        {"streams": 4, "sustained": True},
        {"streams": 6, "sustained": False},
    ]
    assert load.capacity(steps) == 4
    assert load.capacity(steps[2:]) is None


def test_a_few_seconds_of_the_soak_on_the_tiny_model_give_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args(
        [
            "--seconds", "6", "--streams", "2", "--subscribers", "3", "--slow", "1",
            "--slow-read-s", "0.01", "--interval-s", "2", "--max-new-tokens", "4",
            "--plot", str(tmp_path / "load.png"), "--json",
        ]
    )  # fmt: skip
    code = load.run(args)
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["streams"] == 2 and report["fast_lost_total"] == 0
    assert set(report["dropped_by_kind"]) == set(load.KINDS) and report["sustained"]
    rows = report["intervals"]
    assert rows and all(set(r["windows"]) == set(load.KINDS) for r in rows)
    assert [r["end_s"] for r in rows] == [2.0 * (i + 1) for i in range(len(rows))]
    # Every window the agent counted is in some row (the recorder saw every event).
    counted = sum(sum(r["windows"].values()) for r in rows)
    assert counted == report["windows"]["windows"] > 0
    assert any(r["command_p95_s"] is not None for r in rows)
    rss = report["rss_mib"]
    assert {"warmup_s", "levelled", "leak", "judged", "slope_mib_per_min"} <= set(rss)
    assert not rss["leak"]
    if report["plot"] is not None:  # matplotlib installed (the `bench` extra)
        assert Path(report["plot"]).stat().st_size > 0
    assert not math.isnan(report["loop_lag_ms"]["p99"])


def test_find_capacity_steps_the_streams_until_one_is_not_sustained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stepping and the Markdown section, with each run replaced by a synthetic report
    (from 6 streams on, captions are dropped: 2 % of the windows)."""
    ran: list[int] = []

    async def fake_drive(
        args: argparse.Namespace, workdir: Path, streams: int
    ) -> dict[str, object]:
        ran.append(streams)
        dropped = dict.fromkeys(load.KINDS, 0)
        dropped["caption"] = 2 if streams >= 6 else 0
        row = {
            "end_s": 60.0,
            "windows": {"command": 50, "transcript": 0, "caption": 50, "answer": 0},
            "dropped": dropped,
            "command_p50_s": 0.5,
            "command_p95_s": 0.8,
            "all_p95_s": 1.2,
            "rss_mib": 400.0,
        }
        return {
            "streams": streams, "model": "tiny-random", "subscribers": 50, "slow": 5,
            "streamed_s": 60.0, "windows": {"windows": 100, "answered": 100 - sum(dropped.values()),
            "dropped": sum(dropped.values()), "failed": 0}, "dropped_by_kind": dropped,
            "sustained": load.sustained(100, dropped), "intervals": [row],
            "events_published": 10, "events_per_s": 1.0, "messages_to_clients": 500,
            "fast_delivered_min": 10, "fast_out_of_order": 0, "fast_lost_total": 0,
            "fast_close_codes": {"1001": 45}, "ws_counters": {"events_too_slow": 5},
            "too_slow_reasons": {}, "slow_close": {"4429 too slow": 5},
            "loop_lag_ms": dict.fromkeys(("p50", "p99", "max", "ticks", "p99_without_cpu_wait",
            "max_without_cpu_wait", "loop_thread_cpu_wait_s", "run_s"), 1),
            "rss_mib": {"peak": 1, "start": 1, "end": 1, "slope_mib_per_min": 0.1,
            "warmup_s": 40.0, "levelled": True, "leak": False, "judged": True,
            "slope_window_s": 20.0, "flat": True, "every_s": [400.0]},
            "machine_load_1min": {"mean": 1, "max": 1}, "agent_exit_code": 0,
            "agent_log_tracebacks": 0,
        }  # fmt: skip

    monkeypatch.setattr(load, "_drive", fake_drive)
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args(["--minutes", "1", "--find-capacity", "--plot", ""])
    assert load.run(args) == 0
    assert ran == [2, 4, 6]  # stopped at the first count not sustained
    out = capsys.readouterr().out
    assert out.startswith(
        "## Load over time (`salmonn-live bench load --minutes 1 --find-capacity`)"
    )
    assert "**Capacity: 4 streams**" in out and "| 6 | 100 | 0 / 0 / 2 / 0 | 2.0 |" in out
    assert "The run at 4 streams" in out and "| 60 s | 50 / 0 / 50 / 0 |" in out
