"""MQTT wired into the running agent: a file source through the pipeline to an independent
subscriber on a real mosquitto, and MQTT control of the agent's streams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt

from agent.app import Agent
from agent.mqtt import with_mqtt
from tests.agent.conftest import make_config
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
        rules=[{"name": "any-caption", "kind": ["caption"], "topic": "home/heard/{stream}"}],
    )
    agent = Agent(config, lambda: tiny_model)
    local: list[dict[str, Any]] = []
    async with collector(mosquitto.port, "salmonn/#", "home/#", client_id="e2e") as c:
        async with with_mqtt(agent) as mqtt:
            assert mqtt is not None
            agent.add_sink("local", local.append, maxsize=100_000)
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
    captions = [e for e in finals if e["kind"] == "caption"]
    assert len([m for m in got if m.topic == "home/heard/demo"]) == len(captions)
    assert [m.payload for m in got if m.topic == "salmonn/status"] == [b"online", b"offline"]


async def test_mqtt_control_mutes_every_stream_and_rejects_bad_commands(
    tiny_model: Any,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = make_config(
        ws={"listen": "off"},
        mqtt={
            "enabled": True,
            "url": mosquitto.url,
            "outbox_dir": str(tmp_path / "outbox"),
            "discovery": False,
        },
    )
    agent = Agent(config, lambda: tiny_model)
    async with (
        collector(mosquitto.port, "salmonn/+/error", "salmonn/+/state", client_id="ctl") as c,
        with_mqtt(agent),
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
