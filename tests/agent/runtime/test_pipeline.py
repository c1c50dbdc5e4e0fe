"""agent/runtime/pipeline.py and agent/runtime/app.py: a file through the whole agent; control;
shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ControlError
from agent.runtime.app import Agent, run_agent
from agent.runtime.fanout import Subscription
from tests.agent.conftest import TIMING, make_config

STAMPS = ("captured", "segment_end", "model_start", "first_token", "emitted")


async def collect(sub: Subscription, until: Any, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Events from a subscription until ``until(event)`` is true (inclusive)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s * TIMING):
        async for item in sub:
            events.append(item.data)
            if until(item.data):
                return events
    return events


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] != "status" and not e["partial"]]


async def test_file_source_gives_ordered_events_with_consistent_ids_and_stamps(
    tiny_model: Any, clip_path: Path
) -> None:
    """Transcripts, commands and captions, in stream order, one final per request, partials
    before their final, monotonic stamps, and no task left after shutdown."""
    config = make_config(
        streams=[{"id": "demo", "source": f"file:{clip_path}"}], agent={"exit_at_end": True}
    )
    before = asyncio.all_tasks()
    agent = Agent(config, lambda: tiny_model)
    sub = agent.bus.subscribe("test", 100_000)  # before entering: sees "started" too
    async with agent:
        assert await agent.run() == "end of input"
    events = await collect(sub, lambda e: e.get("status") == "stopped")
    assert asyncio.all_tasks() <= before  # nothing left running

    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["schema"] == 1 for e in events)
    done = finals(events)
    kinds = [(e["segment"], e["kind"]) for e in done]
    assert ("speech", "transcript") in kinds and ("speech", "command") in kinds
    assert ("sound", "caption") in kinds
    # Windows come in stream order; each request has exactly one final, after its partials.
    windows = list(dict.fromkeys(e["window"] for e in done))
    assert windows == sorted(windows, key=lambda w: int(w.split(":")[1]))
    starts = [next(e["start"] for e in done if e["window"] == w) for w in windows]
    assert starts == sorted(starts)
    ids = [e["id"] for e in done]
    assert len(ids) == len(set(ids))
    for event in done:
        assert event["id"].startswith(event["window"] + "/") and event["window"].startswith("demo:")
        partial_seqs = [p["seq"] for p in events if p.get("id") == event["id"] and p["partial"]]
        assert all(s < event["seq"] for s in partial_seqs)
        timing = event["timing"]
        stamps = [timing[k] for k in STAMPS if timing[k] is not None]
        assert stamps == sorted(stamps), timing
        assert timing["captured"] and timing["emitted"] and timing["model_start"]
        assert event["end"] > event["start"] >= 0
        if event["kind"] == "command":
            assert isinstance(event["intent"], dict) and "intent" in event["intent"]
    statuses = [e["status"] for e in events if e["kind"] == "status"]
    assert statuses[0] == "started" and "stream_opened" in statuses and statuses[-1] == "stopped"


async def test_control_commands_apply_all_or_nothing(tiny_model: Any) -> None:
    config = make_config(ws={"listen": "off"})
    async with run_agent(config, lambda: tiny_model) as agent:
        assert agent.pipeline is not None
        handle = agent.pipeline.open_stream(config.stream_settings("r1"), origin="test")
        pipeline = agent.pipeline
        pipeline.control(
            "r1", {"mute": True, "lora_scale": 2, "questions": [{"text": "Is it loud?"}]}
        )
        assert (
            handle.muted
            and handle.lora_scale == 2.0
            and [q.text for q in handle.questions] == ["Is it loud?"]
        )
        for bad, message in [
            ({"mute": "yes"}, "'mute' expects true or false"),
            ({"mute": False, "volume": 3}, r"unknown key\(s\) \['volume'\]"),
            ({"mute": False, "lora_scale": -1}, "'lora_scale' expects a number"),
            ({"mute": False, "questions": [{"txt": "x"}]}, "unknown key"),
            ({}, "non-empty JSON object"),
        ]:
            with pytest.raises(ControlError, match=message):
                pipeline.control("r1", bad)
        assert handle.muted and handle.lora_scale == 2.0  # nothing changed
        with pytest.raises(ValueError, match="unknown stream 'nope'"):
            pipeline.control("nope", {"mute": True})


async def test_overload_drops_the_oldest_window_and_reports_it(
    tiny_model: Any, clip_path: Path
) -> None:
    """A realtime stream that produces windows faster than they are answered: bounded queue,
    oldest dropped, counted, reported in an overload status event."""
    import soundfile

    audio, _ = soundfile.read(clip_path, dtype="float32")
    config = make_config(ws={"listen": "off"}, worker={"max_pending_windows": 2, "max_batch": 1})
    async with run_agent(config, lambda: tiny_model) as agent:
        assert agent.pipeline is not None
        sub = agent.bus.subscribe("test", 100_000)
        handle = agent.pipeline.open_stream(config.stream_settings("busy"), origin="test")
        for _ in range(3):  # 12 windows at once, far faster than real time
            handle.push(audio)
        handle.end()
        events = await collect(sub, lambda e: e.get("status") == "stream_closed")
    overload = [e for e in events if e.get("status") == "overload"]
    assert overload and overload[0]["detail"]["policy"] == "drop_oldest"
    closed = events[-1]["detail"]
    assert closed["dropped"] >= 1 and closed["answered"] + closed["dropped"] == closed["windows"]
