"""Home Assistant MQTT discovery: salmonn-live appears as one device with five entities.

One retained device-based discovery message on `<discovery_prefix>/device/<device_id>/config`
(Home Assistant 2024.11+) declares:

- `event` "Voice command": fed by `<prefix>/+/command`; `event_type` is the command's
  `intent.intent` (`turn`, `lights_off`, ... see `agent.intents`) when it is one of
  `command_event_types`, else `command`; the intent's slots are attributes.
- `event` "Sound event": fed by `<prefix>/+/caption`; `event_type` is the first of
  `sound_event_types` whose keywords occur in the caption, else `sound`.
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
from collections.abc import Mapping, Sequence
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
DEFAULT_SOUND_EVENT_TYPES: Mapping[str, Sequence[str]] = {
    "alarm": ("smoke alarm", "fire alarm", "alarm", "siren", "beeping"),
    "glass_breaking": ("glass",),
    "baby_crying": ("baby", "infant"),
    "dog_barking": ("dog", "bark"),
    "doorbell": ("doorbell", "door bell", "ding dong"),
    "knocking": ("knock",),
    "speech": ("speech", "speaking", "talking", "voice"),
    "music": ("music", "singing", "guitar", "piano"),
}
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


def discovery_message(
    *,
    prefix: str,
    discovery_prefix: str,
    device_id: str,
    device_name: str = "salmonn-live",
    command_event_types: Sequence[str] = DEFAULT_COMMAND_EVENT_TYPES,
    sound_event_types: Mapping[str, Sequence[str]] = DEFAULT_SOUND_EVENT_TYPES,
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

    Returns:
        `(topic, payload)`, the payload a JSON object string.

    Raises:
        ValueError: if `device_id` has characters Home Assistant rejects.
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
