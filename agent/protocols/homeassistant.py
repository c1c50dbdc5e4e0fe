"""Home Assistant MQTT discovery: salmonn-live appears as one device with its entities.

One retained device-based discovery message on `<discovery_prefix>/device/<device_id>/config`
(Home Assistant 2024.11+) declares five entities, plus two per sound label group when the
sound tagger is on:

- `event` "Voice command": fed by `<prefix>/+/command`; `event_type` is the command's
  `intent.intent` (`turn`, `lights_off`, ... see `agent.intents`) when it is one of
  `command_event_types`, else `command`; the intent's slots are attributes.
- `event` "Sound event": fed by `<prefix>/+/caption`; `event_type` is the first of
  `sound_event_types` whose keywords occur in the caption, else `sound`. The keyword table's
  types are named as the tagger's label groups (`smoke_alarm`, `glass`, `baby`, ...), so a
  caption and a tagged sound give the same name.
- per label group (`sound_groups`), fed by the sound events on `<prefix>/+/sound` (one
  subscription shared by all; each entity's template keeps its own group's events and
  renders nothing for the others, which Home Assistant skips):
  - `event` "<Group>": `event_type` is the event's `state`, `start` / `end` (and `update`
    for a sustained group), with the occurrence id, stream, score, labels, segment and stream
    times as attributes;
  - `binary_sensor` "<Group> heard" (sustained groups only, device class `sound`): on at
    `start` and `update`, off at `end`. It follows the last event of the group from any
    stream.
- `sensor` "Last transcript" / "Last caption": the text of the last final transcript or
  caption of any stream (first 255 characters, Home Assistant's limit), with the stream,
  event id and full text as attributes.
- `switch` "Mute": commands `{"mute": true}` / `{"mute": false}` on `<prefix>/*/set` (the
  control topic of the agent's pseudo-stream `*`, meaning every open stream); state from the
  retained `<prefix>/*/state`, which the publisher (with discovery on) sets to
  `INITIAL_CONTROL_STATE` (unmuted) whenever it connects, so a state retained by an earlier
  run never outlives it, and updates after each control command that succeeds.

All entities share the availability topic `<prefix>/status` (`online` / `offline`, the
publisher's retained birth message and last will). The templates are Home Assistant Jinja;
the tests render them with jinja2 to check that they produce what Home Assistant expects.
"""

from __future__ import annotations

import json
import logging
import re
import types
from collections.abc import Collection, Mapping, Sequence
from importlib import metadata
from typing import Any

from agent.intents import INTENTS

logger = logging.getLogger(__name__)

ORIGIN_NAME = "salmonn-live"
# Home Assistant rejects sensor states longer than this.
HA_MAX_STATE_CHARS = 255
# The agent's own pseudo-stream (`agent.events.AGENT_STREAM`): control on it means every stream.
ALL_STREAMS = "*"
#: The control state of `ALL_STREAMS` when the agent starts: its streams start unmuted.
INITIAL_CONTROL_STATE: Mapping[str, Any] = types.MappingProxyType({"mute": False})

#: The intents of `agent.intents`, plus `command` for an intent outside the list.
DEFAULT_COMMAND_EVENT_TYPES: tuple[str, ...] = ("command", *INTENTS)
#: Caption keywords of the "Sound event" entity, tried in order; the event types are the
#: sound tagger's label group names (`model.sound_tagger.LABEL_GROUPS`).
DEFAULT_SOUND_EVENT_TYPES: Mapping[str, Sequence[str]] = {
    "smoke_alarm": ("smoke alarm", "smoke detector", "fire alarm"),
    "siren": ("siren",),
    "alarm": ("alarm", "beeping"),
    "glass": ("glass",),
    "baby": ("baby", "infant"),
    "dog": ("dog", "bark"),
    "doorbell": ("doorbell", "door bell", "ding dong"),
    "knock": ("knock",),
    "speech": ("speech", "speaking", "talking", "voice"),
    "music": ("music", "singing", "guitar", "piano"),
}
#: The `state`s of a sound event (`agent.events.SoundEvent`), as its entity's event types.
SOUND_STATES: tuple[str, ...] = ("start", "update", "end")
#: Icons of some label groups' entities (others: `mdi:waveform`).
SOUND_GROUP_ICONS: Mapping[str, str] = {
    "smoke_alarm": "mdi:smoke-detector-variant-alert",
    "alarm": "mdi:alarm-light",
    "siren": "mdi:alarm-light",
    "baby": "mdi:baby-face-outline",
    "dog": "mdi:dog",
    "cat": "mdi:cat",
    "music": "mdi:music",
    "doorbell": "mdi:doorbell",
    "knock": "mdi:door-closed",
    "glass": "mdi:glass-fragile",
    "water": "mdi:water",
    "appliance": "mdi:washing-machine",
}
# Group names appear in ids and templates: keep them to what `SoundsConfig` allows.
_GROUP_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ID_RE = re.compile(r"[^a-zA-Z0-9_-]+")


def device_id_for(client_id: str) -> str:
    """A discovery object id (`[a-zA-Z0-9_-]+`, as Home Assistant requires) for a client id."""
    return _ID_RE.sub("_", client_id).strip("_") or "salmonn_live"


def _version() -> str:
    try:
        return metadata.version("salmonn-live")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _command_template(types: Sequence[str]) -> str:
    return (
        "{% set i = value_json.intent if value_json.intent is mapping else {} %}"
        "{% set a = (i.intent | default('command') | string | lower) %}"
        "{{ {'event_type': a if a in " + json.dumps(list(types)) + " else 'command', "
        "'text': value_json.text | default(''), 'stream': value_json.stream | default(''), "
        "'id': value_json.id | default(''), 'intent': i} | tojson }}"
    )


def _sound_template(types: Mapping[str, Sequence[str]]) -> str:
    table = json.dumps([[k, [w.lower() for w in v]] for k, v in types.items()])
    return (
        "{% set t = value_json.text | default('') | lower %}"
        "{% set ns = namespace(e='sound') %}"
        "{% for et, kws in " + table + " %}{% if ns.e == 'sound' %}"
        "{% for k in kws %}{% if k in t %}{% set ns.e = et %}{% endif %}{% endfor %}"
        "{% endif %}{% endfor %}"
        "{{ {'event_type': ns.e, 'text': value_json.text | default(''), "
        "'stream': value_json.stream | default(''), 'id': value_json.id | default('')} | tojson }}"
    )


def _group_event_template(group: str) -> str:
    """The group's sound events as event entity payloads; nothing for other groups."""
    return (
        "{% if value_json.group is defined and value_json.group == " + json.dumps(group) + " %}"
        "{{ {'event_type': value_json.state, 'id': value_json.id | default(''), "
        "'stream': value_json.stream | default(''), 'score': value_json.score | default(0), "
        "'labels': value_json.labels | default([]), 'segment': value_json.segment | default(''), "
        "'start': value_json.start | default(0), 'end': value_json.end | default(0)} | tojson }}"
        "{% endif %}"
    )


def _group_sensor_template(group: str) -> str:
    """``ON`` at the group's start and updates, ``OFF`` at its end; nothing for other groups."""
    return (
        "{% if value_json.group is defined and value_json.group == " + json.dumps(group) + " %}"
        "{{ 'OFF' if value_json.state == 'end' else 'ON' }}"
        "{% endif %}"
    )


def _group_title(group: str) -> str:
    """``smoke_alarm`` -> ``Smoke alarm``."""
    return group.replace("_", " ").capitalize()


def sound_group_components(
    uid: str, prefix: str, sound_groups: Sequence[str], sustained_groups: Collection[str]
) -> dict[str, dict[str, Any]]:
    """The entities of the label groups: an `event` each, a `binary_sensor` per sustained one.

    Args:
        uid: The device id (entity unique ids start with it).
        prefix: The event topic prefix.
        sound_groups: The label groups, in the order Home Assistant lists them.
        sustained_groups: Those that get start / update / end (and a binary sensor).

    Raises:
        ValueError: a group name that is not `[a-z][a-z0-9_]*` (up to 32 characters).
    """
    components: dict[str, dict[str, Any]] = {}
    topic = f"{prefix}/+/sound"
    for group in dict.fromkeys(sound_groups):
        if not _GROUP_RE.fullmatch(group):
            raise ValueError(
                f"sound group {group!r}: expected lower-case letters, digits and '_' "
                "(starting with a letter, up to 32)"
            )
        sustained = group in sustained_groups
        key = f"{uid}_sound_{group}"
        event: dict[str, Any] = {
            "p": "event",
            "unique_id": key,
            "name": _group_title(group),
            "icon": SOUND_GROUP_ICONS.get(group, "mdi:waveform"),
            "state_topic": topic,
            "event_types": list(SOUND_STATES if sustained else ("start", "end")),
            "value_template": _group_event_template(group),
        }
        if group == "doorbell":
            event["device_class"] = "doorbell"
        components[key] = event
        if sustained:
            components[f"{uid}_heard_{group}"] = {
                "p": "binary_sensor",
                "unique_id": f"{uid}_heard_{group}",
                "name": f"{_group_title(group)} heard",
                "icon": SOUND_GROUP_ICONS.get(group, "mdi:waveform"),
                "device_class": "sound",
                "state_topic": topic,
                "value_template": _group_sensor_template(group),
                "payload_on": "ON",
                "payload_off": "OFF",
            }
    return components


def discovery_message(
    *,
    prefix: str,
    discovery_prefix: str,
    device_id: str,
    device_name: str = "salmonn-live",
    command_event_types: Sequence[str] = DEFAULT_COMMAND_EVENT_TYPES,
    sound_event_types: Mapping[str, Sequence[str]] = DEFAULT_SOUND_EVENT_TYPES,
    sound_groups: Sequence[str] = (),
    sustained_groups: Collection[str] = (),
) -> tuple[str, str]:
    """Build the retained device-based discovery message.

    Args:
        prefix: the event topic prefix (`MqttConfig.prefix`).
        discovery_prefix: Home Assistant's discovery prefix (`homeassistant`).
        device_id: the device's unique id, `[a-zA-Z0-9_-]+` (see `device_id_for`).
        device_name: the device name shown in Home Assistant.
        command_event_types: `event_type`s of the voice command entity; `command` is added
            if missing (it is the fallback).
        sound_event_types: `event_type` -> keywords (lower-case substrings of the caption)
            of the sound event entity, tried in order; `sound` is the fallback.
        sound_groups: The tagger's label groups that make sound events (none: the tagger is
            off, and only the five entities above are declared); see
            `sound_group_components`.
        sustained_groups: Those of `sound_groups` with a start / update / end lifecycle.

    Returns:
        `(topic, payload)`, the payload a JSON object string.

    Raises:
        ValueError: if `device_id` or a group name has characters Home Assistant rejects.
    """
    if not device_id or _ID_RE.search(device_id):
        raise ValueError(
            f"device_id: expected only letters, digits, '_' and '-', got {device_id!r}"
        )
    cmd_types = list(dict.fromkeys(["command", *command_event_types]))
    sound_types = list(dict.fromkeys([*sound_event_types, "sound"]))
    version = _version()
    text_attrs = (
        "{{ {'stream': value_json.stream | default(''), 'id': value_json.id | default(''), "
        "'text': value_json.text | default('')} | tojson }}"
    )
    text_state = "{{ (value_json.text | default(''))[:" + str(HA_MAX_STATE_CHARS) + "] }}"
    uid = device_id
    components: dict[str, dict[str, Any]] = {
        f"{uid}_command": {
            "p": "event",
            "unique_id": f"{uid}_command",
            "name": "Voice command",
            "icon": "mdi:account-voice",
            "state_topic": f"{prefix}/+/command",
            "event_types": cmd_types,
            "value_template": _command_template(cmd_types),
        },
        f"{uid}_sound": {
            "p": "event",
            "unique_id": f"{uid}_sound",
            "name": "Sound event",
            "icon": "mdi:waveform",
            "state_topic": f"{prefix}/+/caption",
            "event_types": sound_types,
            "value_template": _sound_template(sound_event_types),
        },
        f"{uid}_transcript": {
            "p": "sensor",
            "unique_id": f"{uid}_transcript",
            "name": "Last transcript",
            "icon": "mdi:text-to-speech",
            "state_topic": f"{prefix}/+/transcript",
            "value_template": text_state,
            "json_attributes_topic": f"{prefix}/+/transcript",
            "json_attributes_template": text_attrs,
        },
        f"{uid}_caption": {
            "p": "sensor",
            "unique_id": f"{uid}_caption",
            "name": "Last caption",
            "icon": "mdi:ear-hearing",
            "state_topic": f"{prefix}/+/caption",
            "value_template": text_state,
            "json_attributes_topic": f"{prefix}/+/caption",
            "json_attributes_template": text_attrs,
        },
        f"{uid}_mute": {
            "p": "switch",
            "unique_id": f"{uid}_mute",
            "name": "Mute",
            "icon": "mdi:microphone-off",
            "command_topic": f"{prefix}/{ALL_STREAMS}/set",
            "payload_on": json.dumps({"mute": True}),
            "payload_off": json.dumps({"mute": False}),
            "state_topic": f"{prefix}/{ALL_STREAMS}/state",
            "value_template": "{{ 'ON' if value_json.mute else 'OFF' }}",
            "state_on": "ON",
            "state_off": "OFF",
        },
        **sound_group_components(uid, prefix, sound_groups, sustained_groups),
    }
    payload = {
        "dev": {
            "ids": [device_id],
            "name": device_name,
            "mf": "salmonn-live",
            "mdl": "SALMONN hearing agent",
            "sw": version,
        },
        "o": {"name": ORIGIN_NAME, "sw": version},
        "availability": [
            {
                "topic": f"{prefix}/status",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "qos": 1,
        "cmps": components,
    }
    topic = f"{discovery_prefix}/device/{device_id}/config"
    return topic, json.dumps(payload, ensure_ascii=False)


def removal_message(*, discovery_prefix: str, device_id: str) -> tuple[str, str]:
    """The retained empty message that removes the device from Home Assistant."""
    return f"{discovery_prefix}/device/{device_id}/config", ""
