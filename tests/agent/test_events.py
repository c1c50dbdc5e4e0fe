"""Typed events on the bus: serialised once for every sink, and remote events parsed back."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from agent.events import (
    EventKind,
    ModelEvent,
    Published,
    SoundEvent,
    StatusEvent,
    Timing,
    WallClock,
)
from agent.runtime.fanout import EventBus
from tests.agent.events_fixtures import model_event


class _Counting(StatusEvent):
    """A status event that counts how often it is turned into a dict."""

    calls: list[int] = []  # noqa: RUF012 - shared on purpose: the dataclass is frozen

    def to_dict(self, clock: WallClock) -> dict[str, Any]:
        self.calls.append(1)
        return super().to_dict(clock)


def test_every_sink_gets_the_same_object_serialised_once() -> None:
    bus = EventBus(WallClock())
    subs = [bus.subscribe(f"sink{i}", 10) for i in range(5)]
    seen: list[Published] = []
    bus.add_listener(seen.append)
    event = _Counting(id="status:1", seq=1, stream="*", status="x", message="m", emitted=1.0)
    bus.publish(event)
    items = [sub.get_nowait() for sub in subs]
    assert all(item is seen[0] for item in items) and seen[0].event is event
    texts = {item.json for item in items}
    dicts = [item.data for item in items]
    assert len(texts) == 1 and all(d is dicts[0] for d in dicts)
    assert _Counting.calls == [1]
    assert json.loads(texts.pop()) == dicts[0]


def test_filters_read_the_typed_event() -> None:
    bus = EventBus(WallClock())
    captions = bus.subscribe("captions", 10, lambda item: item.event.kind == EventKind.CAPTION)
    bus.publish(model_event(1, "transcript").event)
    bus.publish(model_event(2, "caption").event)
    got = captions.get_nowait()
    assert got is not None and got.event.id == "e2" and captions.get_nowait() is None


def test_a_remote_model_event_round_trips_through_its_dict() -> None:
    worker_clock, edge_clock = WallClock(), WallClock()
    timing = Timing(captured=10.0, segment_end=10.5, model_start=10.6, emitted=11.0)
    event = dataclasses.replace(
        model_event(3, "command", intent={"action": "stop"}, early=True).event,
        timing=timing,
        lora_scale=2.0,
        question=None,
    )
    data = event.to_dict(worker_clock)
    back = ModelEvent.from_dict(json.loads(json.dumps(data)), edge_clock)
    assert back.to_dict(edge_clock) == data  # the same Unix times on another agent's clock
    assert dataclasses.replace(back, timing=event.timing) == event


@pytest.mark.parametrize(
    "change",
    [
        {"schema": 2},
        {"kind": "status"},
        {"kind": "nonsense"},
        {"start": "soon"},
        {"text": None, "window": None, "id": None, "seq": "x"},
    ],
)
def test_a_malformed_remote_event_is_refused(change: dict[str, Any]) -> None:
    clock = WallClock()
    data = {**model_event(1).event.to_dict(clock), **change}
    if change.get("seq") == "x":
        del data["id"]
    with pytest.raises(ValueError, match="not a model event"):
        ModelEvent.from_dict(data, clock)


def test_a_sound_event_follows_the_documented_schema() -> None:
    clock = WallClock()
    event = SoundEvent(
        id="mic:sound:0",
        seq=4,
        stream="mic",
        state="start",
        group="smoke_alarm",
        score=0.93456,
        labels=(("Smoke detector, smoke alarm", 0.93456),),
        sustained=True,
        start_s=1.23456,
        end_s=2.0,
        segment="sound",
        model="yamnet",
        timing=Timing(emitted=5.0),
    )
    data = Published(event, clock).data
    assert data["kind"] == "sound" and data["state"] == "start" and data["group"] == "smoke_alarm"
    assert data["labels"] == [{"name": "Smoke detector, smoke alarm", "score": 0.9346}]
    assert (data["start"], data["end"], data["sustained"]) == (1.235, 2.0, True)
    assert not event.partial and event.kind == EventKind.SOUND
