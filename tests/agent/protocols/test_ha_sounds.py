"""Home Assistant discovery of the sound tagger's label groups: an `event` entity per group
and a `binary_sensor` per sustained one, fed by `<prefix>/+/sound`. The templates are rendered
with jinja2, as Home Assistant renders them, on sound events as docs/events.md shows them, and
the results are read as Home Assistant's MQTT `event` and `binary_sensor` platforms read them
(an empty result is skipped)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.protocols.homeassistant import (
    DEFAULT_SOUND_EVENT_TYPES,
    discovery_message,
    sound_group_components,
)

UID = "salmonn-live-kitchen"


def components(**kw: Any) -> dict[str, dict[str, Any]]:
    _, payload = discovery_message(
        prefix="salmonn", discovery_prefix="homeassistant", device_id=UID, **kw
    )
    cmps: dict[str, dict[str, Any]] = json.loads(payload)["cmps"]
    return cmps


def render(template: str, payload: dict[str, Any]) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(autoescape=False)
    return str(env.from_string(template).render(value_json=payload, value=json.dumps(payload)))


def sound_event(group: str, state: str, **kw: Any) -> dict[str, Any]:
    """A sound event as agent/events.py publishes it (docs/events.md)."""
    return {
        "schema": 1,
        "id": "kitchen:sound:3",
        "seq": 41,
        "stream": "kitchen",
        "kind": "sound",
        "state": state,
        "group": group,
        "score": 0.93,
        "labels": [{"name": "Smoke detector, smoke alarm", "score": 0.93}],
        "sustained": True,
        "start": 12.48,
        "end": 14.4,
        "segment": "background",
        "model": "yamnet",
        "timing": {"captured": 1764012345.1, "emitted": 1764012345.2},
        **kw,
    }


def ha_event(cmp: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """What Home Assistant's MQTT event entity makes of a message: None when it skips it."""
    rendered = render(cmp["value_template"], payload)
    if not rendered:
        return None  # "Ignoring empty payload after rendering"
    attributes: dict[str, Any] = json.loads(rendered)
    assert attributes["event_type"] in cmp["event_types"]  # else HA logs "Invalid event type"
    return attributes


def ha_sensor(cmp: dict[str, Any], payload: dict[str, Any]) -> bool | None:
    """What the MQTT binary sensor makes of a message: on, off, or None (skipped)."""
    rendered = render(cmp["value_template"], payload)
    if not rendered.strip():
        return None
    assert rendered in (cmp["payload_on"], cmp["payload_off"])
    return rendered == cmp["payload_on"]


def test_without_groups_the_device_is_unchanged() -> None:
    assert len(components()) == 5
    assert all("+/sound" not in c.get("state_topic", "") for c in components().values())


def test_an_event_entity_per_group_and_a_binary_sensor_per_sustained_group() -> None:
    cmps = components(
        sound_groups=["smoke_alarm", "dog", "doorbell"], sustained_groups={"smoke_alarm"}
    )
    assert len(cmps) == 5 + 3 + 1
    events = {k: c for k, c in cmps.items() if c["state_topic"] == "salmonn/+/sound"}
    assert set(events) == {
        f"{UID}_sound_smoke_alarm",
        f"{UID}_sound_dog",
        f"{UID}_sound_doorbell",
        f"{UID}_heard_smoke_alarm",
    }
    alarm, dog = cmps[f"{UID}_sound_smoke_alarm"], cmps[f"{UID}_sound_dog"]
    assert alarm["p"] == dog["p"] == "event"
    assert alarm["event_types"] == ["start", "update", "end"]
    assert dog["event_types"] == ["start", "end"]
    assert alarm["name"] == "Smoke alarm" and dog["name"] == "Dog"
    assert cmps[f"{UID}_sound_doorbell"]["device_class"] == "doorbell"
    sensor = cmps[f"{UID}_heard_smoke_alarm"]
    assert sensor["p"] == "binary_sensor" and sensor["device_class"] == "sound"
    assert sensor["name"] == "Smoke alarm heard"
    assert f"{UID}_heard_dog" not in cmps
    for key, cmp in cmps.items():
        assert cmp["unique_id"] == key


def test_the_group_event_template_keeps_its_own_group() -> None:
    cmps = components(sound_groups=["smoke_alarm", "dog"], sustained_groups={"smoke_alarm"})
    alarm, dog = cmps[f"{UID}_sound_smoke_alarm"], cmps[f"{UID}_sound_dog"]
    for state in ("start", "update", "end"):
        out = ha_event(alarm, sound_event("smoke_alarm", state))
        assert out is not None and out["event_type"] == state
        assert out["id"] == "kitchen:sound:3" and out["stream"] == "kitchen"
        assert out["score"] == 0.93 and out["labels"][0]["name"] == "Smoke detector, smoke alarm"
        assert (out["start"], out["end"], out["segment"]) == (12.48, 14.4, "background")
        assert ha_event(dog, sound_event("smoke_alarm", state)) is None
    bark = sound_event("dog", "start", sustained=False, labels=[{"name": "Bark", "score": 0.8}])
    assert ha_event(dog, bark) == {
        "event_type": "start",
        "id": "kitchen:sound:3",
        "stream": "kitchen",
        "score": 0.93,
        "labels": [{"name": "Bark", "score": 0.8}],
        "segment": "background",
        "start": 12.48,
        "end": 14.4,
    }
    # Other events on a sound topic (none are published there, but a stray message) are
    # skipped, not errors.
    assert ha_event(dog, {"kind": "caption", "text": "a dog barks"}) is None


def test_the_binary_sensor_is_on_from_start_to_end() -> None:
    cmps = components(sound_groups=["music", "dog"], sustained_groups={"music"})
    sensor = cmps[f"{UID}_heard_music"]
    assert ha_sensor(sensor, sound_event("music", "start")) is True
    assert ha_sensor(sensor, sound_event("music", "update")) is True
    assert ha_sensor(sensor, sound_event("dog", "start")) is None
    assert ha_sensor(sensor, sound_event("dog", "end")) is None
    assert ha_sensor(sensor, sound_event("music", "end")) is False


def test_group_names_are_checked() -> None:
    with pytest.raises(ValueError, match="sound group 'Smoke alarm'"):
        sound_group_components(UID, "salmonn", ["Smoke alarm"], ())
    # A group listed twice is one entity.
    assert len(sound_group_components(UID, "p", ["dog", "dog"], ())) == 1


def test_caption_keywords_use_the_tagger_group_names() -> None:
    from model.sound_tagger import LABEL_GROUPS

    assert set(DEFAULT_SOUND_EVENT_TYPES) <= set(LABEL_GROUPS)
    cmp = components()[f"{UID}_sound"]
    assert cmp["state_topic"] == "salmonn/+/caption"  # the old entity, kept
    for caption, event_type in [
        ("A smoke alarm is beeping", "smoke_alarm"),
        ("A siren wails.", "siren"),
        ("An alarm clock rings", "alarm"),
        ("glass shatters on the floor", "glass"),
        ("a baby cries", "baby"),
        ("A dog barks twice", "dog"),
        ("Someone knocks on the door", "knock"),
        ("Wind blowing", "sound"),
    ]:
        out = ha_event(cmp, {"stream": "mic", "text": caption, "id": "x"})
        assert out is not None and out["event_type"] == event_type, caption
