"""`agent.protocols.homeassistant`: the device discovery message has what Home Assistant
requires, and its templates (rendered here with jinja2, as Home Assistant does) produce valid
states."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.intents import INTENTS
from agent.protocols.homeassistant import (
    DEFAULT_COMMAND_EVENT_TYPES,
    HA_MAX_STATE_CHARS,
    device_id_for,
    discovery_message,
    removal_message,
)

TOPIC_ID = r"^[a-zA-Z0-9_-]+$"


def message(**kw: Any) -> tuple[str, dict[str, Any]]:
    topic, payload = discovery_message(
        prefix="salmonn", discovery_prefix="homeassistant", device_id="salmonn-live-kitchen", **kw
    )
    return topic, json.loads(payload)


def render(template: str, payload: dict[str, Any]) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(autoescape=False)
    return str(env.from_string(template).render(value_json=payload, value=json.dumps(payload)))


def test_device_based_discovery_required_fields() -> None:
    topic, msg = message()
    assert topic == "homeassistant/device/salmonn-live-kitchen/config"
    # Root: device with identifiers and a name, origin with a name, shared availability.
    assert msg["dev"]["ids"] == ["salmonn-live-kitchen"] and msg["dev"]["name"]
    assert msg["o"]["name"] == "salmonn-live"
    assert msg["availability"] == [
        {
            "topic": "salmonn/status",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    cmps = msg["cmps"]
    assert len(cmps) == 5
    uids = [c["unique_id"] for c in cmps.values()]
    assert len(set(uids)) == len(uids)
    for key, cmp in cmps.items():
        assert cmp["p"] in {"event", "sensor", "switch"}, key
        assert cmp["unique_id"] == key and cmp["name"]
    by_p: dict[str, list[dict[str, Any]]] = {}
    for cmp in cmps.values():
        by_p.setdefault(cmp["p"], []).append(cmp)
    # event: state_topic and event_types are required.
    assert {c["state_topic"] for c in by_p["event"]} == {"salmonn/+/command", "salmonn/+/caption"}
    assert all(c["event_types"] for c in by_p["event"])
    # sensor: state_topic required.
    assert {c["state_topic"] for c in by_p["sensor"]} == {
        "salmonn/+/transcript",
        "salmonn/+/caption",
    }
    # switch: command_topic required; payload_on/off are strings (our JSON control payloads).
    [switch] = by_p["switch"]
    assert switch["command_topic"] == "salmonn/*/set"
    assert json.loads(switch["payload_on"]) == {"mute": True}
    assert json.loads(switch["payload_off"]) == {"mute": False}
    assert switch["state_topic"] == "salmonn/*/state"


def test_command_event_template_maps_intents_to_event_types() -> None:
    _, msg = message()
    cmp = msg["cmps"]["salmonn-live-kitchen_command"]
    assert set(cmp["event_types"]) == {"command", *INTENTS}
    assert cmp["event_types"] == list(dict.fromkeys(DEFAULT_COMMAND_EVENT_TYPES))
    event = {
        "id": "e1",
        "stream": "mic",
        "kind": "command",
        "text": "turn left",
        "intent": {"intent": "turn", "direction": "left", "angle": 90},
    }
    out = json.loads(render(cmp["value_template"], event))
    assert out["event_type"] == "turn" and out["intent"]["direction"] == "left"
    odd = json.loads(render(cmp["value_template"], {**event, "intent": {"intent": "juggle"}}))
    assert odd["event_type"] == "command"
    bare = json.loads(render(cmp["value_template"], {"stream": "mic", "text": "x"}))
    assert bare["event_type"] == "command"


@pytest.mark.parametrize(
    ("caption", "event_type"),
    [
        ("A smoke alarm is beeping", "smoke_alarm"),
        ("glass shatters on the floor", "glass"),
        ("a baby cries", "baby"),
        ("Wind blowing", "sound"),
    ],
)
def test_sound_event_template(caption: str, event_type: str) -> None:
    _, msg = message()
    cmp = msg["cmps"]["salmonn-live-kitchen_sound"]
    out = json.loads(render(cmp["value_template"], {"stream": "mic", "text": caption, "id": "x"}))
    assert out["event_type"] == event_type and event_type in cmp["event_types"]
    assert out["text"] == caption


def test_sensor_state_is_cut_to_home_assistants_limit() -> None:
    _, msg = message()
    cmp = msg["cmps"]["salmonn-live-kitchen_transcript"]
    text = "word " * 100
    state = render(cmp["value_template"], {"stream": "mic", "text": text})
    assert state == text[:HA_MAX_STATE_CHARS]
    attrs = json.loads(render(cmp["json_attributes_template"], {"stream": "mic", "text": text}))
    assert attrs["text"] == text and attrs["stream"] == "mic"


def test_switch_state_template() -> None:
    _, msg = message()
    cmp = msg["cmps"]["salmonn-live-kitchen_mute"]
    assert render(cmp["value_template"], {"mute": True}) == cmp["state_on"] == "ON"
    assert render(cmp["value_template"], {"mute": False}) == cmp["state_off"] == "OFF"


def test_custom_event_types_and_names() -> None:
    _, msg = message(
        device_name="Robot ears",
        command_event_types=["stop"],
        sound_event_types={"door": ["door"]},
    )
    assert msg["dev"]["name"] == "Robot ears"
    assert msg["cmps"]["salmonn-live-kitchen_command"]["event_types"] == ["command", "stop"]
    assert msg["cmps"]["salmonn-live-kitchen_sound"]["event_types"] == ["door", "sound"]


def test_ids() -> None:
    assert device_id_for("salmonn-live/kitchen one") == "salmonn-live_kitchen_one"
    with pytest.raises(ValueError, match="device_id"):
        discovery_message(prefix="p", discovery_prefix="homeassistant", device_id="a/b")
    assert removal_message(discovery_prefix="homeassistant", device_id="x") == (
        "homeassistant/device/x/config",
        "",
    )
