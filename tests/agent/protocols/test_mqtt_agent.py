"""MQTT wired into the running agent: a file source through the pipeline to an independent
subscriber on a real mosquitto, and MQTT control of the agent's streams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt

from agent.events import ModelEvent
from agent.runtime.app import Agent
from tests.agent.conftest import make_config
from tests.agent.events_fixtures import model_event
from tests.agent.mqtt_fixtures import Mosquitto, collector, mosquitto  # noqa: F401

MODEL_KINDS = ("transcript", "caption", "answer", "command")


async def test_file_source_events_reach_an_independent_subscriber(
    tiny_model: Any,
    clip_path: Path,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = make_config(
        ws={"listen": "off"},
        agent={"exit_at_end": True, "status_interval_s": 0, "print": "none"},
        streams=[{"id": "demo", "source": f"file:{clip_path}"}],
        mqtt={
            "enabled": True,
            "url": mosquitto.url,
            "outbox_dir": str(tmp_path / "outbox"),
            "client_id": "agent-under-test",
        },
        rules=[
            {
                "name": "any-caption",
                "kind": ["caption"],
                "topic": "home/heard/{stream}",
                "payload": "{text}",
            }
        ],
    )
    agent = Agent(config, lambda: tiny_model)
    local: list[dict[str, Any]] = []
    async with collector(mosquitto.port, "salmonn/#", "home/#", client_id="e2e") as c:
        async with agent:
            assert agent.mqtt is not None
            agent.add_sink("local", lambda item: local.append(item.data), maxsize=100_000)
            assert await agent.run() == "end of input"
        # The agent is closed: its `stopped` status went out before `offline`.
        got = await c.wait_for(lambda ms: any(m.payload == b"offline" for m in ms))
    finals = [e for e in local if e["kind"] in MODEL_KINDS and not e["partial"]]
    assert finals, "the clip produced no model event"
    published = [
        (m.topic, json.loads(m.payload))
        for m in got
        if m.topic.startswith("salmonn/demo/") and m.topic.rsplit("/", 1)[1] in MODEL_KINDS
    ]
    assert published == [(f"salmonn/demo/{e['kind']}", e) for e in finals]
    statuses = [json.loads(m.payload)["status"] for m in got if m.topic == "salmonn/*/status"]
    assert statuses[0] == "started" and statuses[-1] == "stopped"
    assert "mqtt_connected" in statuses  # the first connection too, once the pipeline is up
    # Rule firings are events of the schema, each right after the event that fired it (one
    # `seq` later), seen by every sink; MQTT also publishes the rule's own message.
    captions = [e for e in finals if e["kind"] == "caption"]
    triggers = [e for e in local if e["kind"] == "trigger"]
    assert captions and len(triggers) == len(captions)
    for trigger in triggers:
        source = local[local.index(trigger) - 1]
        assert source["kind"] == "caption" and trigger == {
            "schema": 1,
            "id": f"trigger:{source['seq'] + 1}",
            "seq": source["seq"] + 1,
            "stream": "demo",
            "kind": "trigger",
            "rule": "any-caption",
            "topic": "home/heard/demo",
            "payload": source["text"],
            "qos": 1,
            "retain": False,
            "source_id": source["id"],
            "source_kind": "caption",
            "text": source["text"],
            "timing": {**source["timing"], "emitted": trigger["timing"]["emitted"]},
        }
        assert trigger["timing"]["emitted"] >= source["timing"]["emitted"]
    rule_and_trigger = [
        (m.topic, m.payload if m.topic.startswith("home/") else json.loads(m.payload))
        for m in got
        if m.topic in ("home/heard/demo", "salmonn/demo/trigger")
    ]
    assert rule_and_trigger == [
        pair
        for t in triggers
        for pair in (("home/heard/demo", t["payload"].encode()), ("salmonn/demo/trigger", t))
    ]
    assert agent.rules is not None and agent.rules.stats()["any-caption"]["fired"] == len(triggers)
    assert [m.payload for m in got if m.topic == "salmonn/status"] == [b"online", b"offline"]


def _broker_config(mosquitto: Mosquitto, tmp_path: Path, **sections: Any) -> Any:  # noqa: F811
    """No WebSocket; MQTT to the test's mosquitto, without Home Assistant discovery."""
    return make_config(
        ws={"listen": "off"},
        mqtt={
            "enabled": True,
            "url": mosquitto.url,
            "outbox_dir": str(tmp_path / "outbox"),
            "discovery": False,
        },
        **sections,
    )


async def test_mqtt_control_mutes_every_stream_and_rejects_bad_commands(
    tiny_model: Any,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = _broker_config(mosquitto, tmp_path)
    agent = Agent(config, lambda: tiny_model)
    async with (
        collector(mosquitto.port, "salmonn/+/error", "salmonn/+/state", client_id="ctl") as c,
        agent,
    ):
        assert agent.pipeline is not None
        a = agent.pipeline.open_stream(config.stream_settings("a"), origin="test")
        b = agent.pipeline.open_stream(config.stream_settings("b"), origin="test")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="remote") as remote:
            await remote.publish("salmonn/*/set", b'{"mute": true}', qos=1)
            await remote.publish("salmonn/a/set", b'{"mute": "yes"}', qos=1)
            await remote.publish("salmonn/nope/set", b'{"mute": false}', qos=1)
            await remote.publish("salmonn/b/set", b'{"lora_scale": 0.5}', qos=1)
        got = await c.wait_for(lambda ms: any(m.topic == "salmonn/b/state" for m in ms))
        assert a.muted and b.muted and b.lora_scale == 0.5
    errors = {m.topic: json.loads(m.payload) for m in got if m.topic.endswith("/error")}
    assert set(errors) == {"salmonn/a/error", "salmonn/nope/error"}
    assert "mute" in errors["salmonn/a/error"]["error"]
    assert "unknown stream 'nope'" in errors["salmonn/nope/error"]["error"]
    assert json.loads(next(m.payload for m in got if m.topic == "salmonn/*/state")) == {
        "mute": True
    }


async def test_rules_fire_on_matches_respect_cooldown_and_never_on_others(
    tiny_model: Any,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Events as the pipeline emits them (on the agent's bus): each firing is a `trigger`
    event for every sink and, over MQTT, the rule's message then the trigger."""
    config = _broker_config(
        mosquitto,
        tmp_path,
        rules=[
            {
                "name": "alarm",
                "kind": ["caption"],
                "keywords": ["glass breaking", "smoke alarm"],
                "topic": "home/alarm/trigger",
                "payload": {"source": "{stream}", "heard": "{text}"},
                "cooldown_s": 60,
            },
            {
                "name": "kitchen-lights",
                "kind": ["transcript", "command"],
                "regex": r"turn off the kitchen lights?",
                "topic": "home/kitchen/lights/set",
                "payload": "OFF",
            },
        ],
    )
    agent = Agent(config, lambda: tiny_model)
    local: list[dict[str, Any]] = []

    def event(i: int, kind: str, text: str, partial: bool = False) -> ModelEvent:
        made = model_event(i, kind, "mic", id=f"mic:{i}/{kind}", text=text, partial=partial)
        assert isinstance(made.event, ModelEvent)
        return made.event

    async with (
        collector(mosquitto.port, "home/#", "salmonn/mic/#", client_id="rules") as c,
        agent,
    ):
        agent.add_sink("local", lambda item: local.append(item.data), maxsize=1000)
        for e in (
            event(1, "caption", "a dog barking"),
            event(2, "transcript", "turn on the kitchen lights"),
            event(3, "transcript", "smoke alarm"),  # wrong kind
            event(4, "caption", "smoke alarm", partial=True),  # partials never fire
            event(5, "caption", "Glass breaking in the hall"),
            event(6, "caption", "smoke alarm beeping"),  # the alarm rule's cooldown
            event(7, "command", "please turn off the kitchen light"),
            event(8, "answer", ""),
        ):
            agent.bus.publish(e)
        # Delivery is in order: once the last answer is here, every rule message is too.
        got = await c.wait_for(lambda ms: any(m.topic.endswith("/answer") for m in ms))
    triggers = [e for e in local if e["kind"] == "trigger"]
    assert [(t["rule"], t["source_id"]) for t in triggers] == [
        ("alarm", "mic:5/caption"),
        ("kitchen-lights", "mic:7/command"),
    ]
    rule_msgs = [(m.topic, m.payload) for m in got if m.topic.startswith("home/")]
    assert rule_msgs == [
        (
            "home/alarm/trigger",
            json.dumps({"source": "mic", "heard": "Glass breaking in the hall"}).encode(),
        ),
        ("home/kitchen/lights/set", b"OFF"),
    ]
    assert [json.loads(m.payload) for m in got if m.topic == "salmonn/mic/trigger"] == triggers
    assert agent.rules is not None
    assert agent.rules.stats()["alarm"] == {
        "matched": 2,
        "fired": 1,
        "cooldown_skipped": 1,
        "template_errors": 0,
    }
    assert agent.rules.stats()["kitchen-lights"]["fired"] == 1
