"""Test helpers: published events as the agent's bus hands them to its sinks."""

from __future__ import annotations

import json
from typing import Any

from agent.events import EventKind, ModelEvent, Published, Timing, TriggerEvent, WallClock

CLOCK = WallClock()


def model_event(i: int, kind: str = "transcript", stream: str = "mic", **fields: Any) -> Published:
    """Final model event ``e<i>`` (text ``event <i>``); ``fields`` override any field."""
    values: dict[str, Any] = {
        "id": f"e{i}",
        "seq": i,
        "stream": stream,
        "kind": EventKind(kind),
        "window": f"{stream}:{i}",
        "text": f"event {i}",
        "partial": False,
        "start_s": float(i),
        "end_s": i + 1.0,
        "segment": "speech",
        "model": "test",
        "timing": Timing(emitted=float(i)),
    }
    values.update(fields)
    return Published(ModelEvent(**values), CLOCK)


def trigger_event(seq: int, source: Published, **fields: Any) -> Published:
    """A `trigger` event fired by rule ``alarm`` on ``source``; ``fields`` override any field."""
    event = source.event
    assert isinstance(event, ModelEvent)
    values: dict[str, Any] = {
        "id": f"trigger:{seq}",
        "seq": seq,
        "stream": event.stream,
        "rule": "alarm",
        "topic": "home/alarm/trigger",
        "payload": json.dumps({"heard": event.text}),
        "qos": 1,
        "retain": False,
        "source_id": event.id,
        "source_kind": str(event.kind),
        "text": event.text,
        "emitted": float(seq),
    }
    values.update(fields)
    return Published(TriggerEvent(**values), CLOCK)
