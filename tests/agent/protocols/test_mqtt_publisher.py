"""`agent.protocols.mqtt.MqttPublisher` against a real mosquitto on loopback (and the embedded
broker).

Every wait is on a message or an event, with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config import MqttConfig, parse_url
from agent.events import Published
from agent.protocols.mqtt import MqttConnectError, MqttPublisher
from tests.agent.events_fixtures import model_event, trigger_event
from tests.agent.mqtt_fixtures import (
    Mosquitto,
    collector,
    free_port,
    mosquitto,  # noqa: F401 - fixture
    mosquitto_auth,  # noqa: F401 - fixture
)


def config(url: str | None, tmp_path: Path, **kw: Any) -> MqttConfig:
    base: dict[str, Any] = {
        "url": url,
        "outbox_dir": str(tmp_path / "outbox"),
        "client_id": "test-agent",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "discovery": False,
    }
    base.update(kw)
    return MqttConfig(**base)


def ev(i: int, kind: str = "transcript", stream: str = "mic", **kw: Any) -> Published:
    return model_event(i, kind, stream, **kw)


def events_on(messages: list[Any], suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic.endswith(suffix)]


async def test_every_event_arrives_with_topic_and_payload(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Each final event lands on <prefix>/<stream>/<kind> with the event as JSON; partials don't."""
    sent = [
        ev(i, kind=("transcript", "caption", "command")[i % 3], stream=("mic", "robot1")[i % 2])
        for i in range(60)
    ]
    async with (
        collector(mosquitto.port, "salmonn/#") as c,
        MqttPublisher(config(mosquitto.url, tmp_path)) as pub,
    ):
        pub.submit(ev(999, partial=True))
        for e in sent:
            pub.submit(e)
        got = await c.wait_for(lambda ms: sum(m.topic != "salmonn/status" for m in ms) >= 60)
        data = [m for m in got if m.topic != "salmonn/status"]
        assert [m.topic for m in data] == [f"salmonn/{e.event.stream}/{e.event.kind}" for e in sent]
        assert [json.loads(m.payload) for m in data] == [e.data for e in sent]
        assert [m.payload for m in c.on("salmonn/status")] == [b"online"]
        await asyncio.wait_for(pub.drain(), 5)
        stats = pub.stats()
        assert stats["skipped_partial"] == 1 and stats["outbox"]["acked"] == 60


async def test_broker_restart_mid_stream_delivers_everything_in_order(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The broker stops mid-stream and comes back: every event arrives afterwards, in order."""
    n = 150
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()

    def on_status(info: dict[str, Any]) -> None:
        if info["mqtt"] == "disconnected":
            disconnected.set()
        elif info["mqtt"] == "connected" and disconnected.is_set():
            reconnected.set()

    async with (
        collector(mosquitto.port, "salmonn/+/transcript", client_id="restart-sub") as c,
        MqttPublisher(config(mosquitto.url, tmp_path), on_status=on_status) as pub,
    ):
        made_during_outage = asyncio.Event()

        async def produce() -> None:
            for i in range(n):
                if i == 50:
                    await disconnected.wait()  # the rest is made while the broker is away
                if i == 80:
                    made_during_outage.set()
                pub.submit(ev(i))
                await asyncio.sleep(0.004)  # a live source: events keep coming during the outage

        producer = asyncio.create_task(produce())
        await c.wait_for(lambda ms: len(ms) >= 30)
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.wait_for(disconnected.wait(), 10)
        await asyncio.wait_for(made_during_outage.wait(), 10)
        during_outage = pub.stats()["outbox"]["queued"]
        await asyncio.to_thread(mosquitto.start)
        await asyncio.wait_for(reconnected.wait(), 10)
        await producer
        got = await c.wait_for(lambda ms: len({m.payload for m in ms}) >= n, within_s=20)

        await asyncio.wait_for(pub.drain(), 5)
        ids = [json.loads(m.payload)["id"] for m in got]
        first_seen = list(dict.fromkeys(ids))
        assert first_seen == [f"e{i}" for i in range(n)]  # all, in order
        outbox = pub.stats()["outbox"]
        # The outbox's own accounting: each event put once, acked once, nothing left or lost.
        assert outbox == {
            "queued": 0,
            "put": n,
            "acked": n,
            "dropped": 0,
            "disk_errors": 0,
            "recovered": 0,
        }
        assert during_outage >= 30  # events 50..79 at least waited in the outbox
        # QoS 1 is at-least-once: a message in flight when the broker died may come twice.
        assert len(ids) - n <= 32


async def test_wrong_credentials_fail_fast_with_a_clear_error(
    mosquitto_auth: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"mqtt://robot:wrong@127.0.0.1:{mosquitto_auth.port}"
    with pytest.raises(MqttConnectError, match=r"login refused.*check user:pass in the --mqtt URL"):
        async with MqttPublisher(config(url, tmp_path)):
            pass
    with pytest.raises(MqttConnectError, match=r"login refused"):
        async with MqttPublisher(config(f"mqtt://127.0.0.1:{mosquitto_auth.port}", tmp_path)):
            pass
    ok = f"mqtt://robot:s3cret@127.0.0.1:{mosquitto_auth.port}"
    async with MqttPublisher(config(ok, tmp_path)) as pub:
        assert pub.connected
        assert "s3cret" not in (pub.url or "")


async def test_clean_close_publishes_offline(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with collector(mosquitto.port, "salmonn/status") as c:
        pub = MqttPublisher(config(mosquitto.url, tmp_path))
        async with pub:
            await c.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        pub.close()  # idempotent
        await pub.wait_closed()
        await c.wait_for(lambda ms: ms[-1].payload == b"offline")


def trigger(seq: int, source: Published, **kw: Any) -> Published:
    return trigger_event(seq, source, **kw)


async def test_trigger_events_publish_their_rule_message_then_themselves_in_order(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A rule firing reaches the publisher as a `trigger` event after its source: the rule's
    message goes to the rule's topic (with its QoS and retain flag), then the trigger event
    to P/S/trigger, in order with the events around them."""
    glass = ev(1, kind="caption", text="glass breaking")
    alarm = trigger(2, glass, retain=True)
    lights = trigger(4, ev(3), rule="lights", topic="home/kitchen/lights/set", payload="OFF")
    async with (
        collector(mosquitto.port, "home/#", "salmonn/mic/#") as c,
        MqttPublisher(config(mosquitto.url, tmp_path)) as pub,
    ):
        events = [glass, alarm, ev(3), lights, ev(5, kind="answer")]
        for event in events:
            pub.submit(event)
        got = await c.wait_for(lambda ms: any(m.topic.endswith("/answer") for m in ms))
        assert [m.topic for m in got] == [
            "salmonn/mic/caption",
            "home/alarm/trigger",
            "salmonn/mic/trigger",
            "salmonn/mic/transcript",
            "home/kitchen/lights/set",
            "salmonn/mic/trigger",
            "salmonn/mic/answer",
        ]
        assert [json.loads(m.payload) for m in got if m.topic.startswith("salmonn/")] == [
            e.data for e in events
        ]
        assert [m.payload for m in got if m.topic.startswith("home/")] == [
            b'{"heard": "glass breaking"}',
            b"OFF",
        ]
        assert pub.stats()["rule_messages"] == 2
        # The alarm rule's message was retained (the lights one was not).
        async with collector(mosquitto.port, "home/#", client_id="late") as late:
            [retained] = await late.wait_for(lambda ms: len(ms) >= 1)
            assert (retained.topic, retained.retain) == ("home/alarm/trigger", True)
        assert pub.stats()["submitted"] == 5


async def test_control_valid_and_invalid_payloads(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    state: dict[str, dict[str, Any]] = {}

    def on_control(stream: str, payload: dict[str, Any]) -> None:
        unknown = set(payload) - {"mute", "lora_scale"}
        if unknown:
            raise ValueError(f"unknown control key(s) {sorted(unknown)}; known: lora_scale, mute")
        if "mute" in payload and not isinstance(payload["mute"], bool):
            raise ValueError(f"mute: expected true or false, got {payload['mute']!r}")
        state.setdefault(stream, {}).update(payload)

    async with (
        collector(mosquitto.port, "salmonn/+/error", "salmonn/+/state", client_id="ctl") as c,
        MqttPublisher(config(mosquitto.url, tmp_path), on_control=on_control),
    ):
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="remote") as remote:
            await remote.publish("salmonn/mic/set", b'{"mute": true}', qos=1)
            await remote.publish("salmonn/mic/set", b"not json", qos=1)
            await remote.publish("salmonn/mic/set", b"[1, 2]", qos=1)
            await remote.publish("salmonn/mic/set", b'{"mute": "loud"}', qos=1)
            await remote.publish("salmonn/mic/set", b'{"volume": 3}', qos=1)
            await remote.publish("salmonn/mic/set", b"\xff\xfe", qos=1)
            await remote.publish("salmonn/a/b/set", b'{"mute": false}', qos=1)  # not a stream
            await remote.publish("salmonn/robot1/set", b'{"mute": false}', qos=1)
        got = await c.wait_for(
            lambda ms: len(ms) >= 7 and any(m.topic == "salmonn/robot1/state" for m in ms)
        )
    errors = [json.loads(m.payload) for m in got if m.topic == "salmonn/mic/error"]
    assert [e["payload"] for e in errors] == [
        "not json",
        "[1, 2]",
        '{"mute": "loud"}',
        '{"volume": 3}',
        "\ufffd\ufffd",
    ]
    assert "invalid JSON" in errors[0]["error"]
    assert "expected a JSON object, got list" in errors[1]["error"]
    assert "mute: expected true or false" in errors[2]["error"]
    assert "unknown control key(s) ['volume']" in errors[3]["error"]
    # Rejected payloads changed nothing; accepted ones are reflected in the retained state.
    assert state == {"mic": {"mute": True}, "robot1": {"mute": False}}
    states = {m.topic: json.loads(m.payload) for m in got if m.topic.endswith("/state")}
    assert states == {"salmonn/mic/state": {"mute": True}, "salmonn/robot1/state": {"mute": False}}


async def test_discovery_is_published_retained_and_again_on_ha_birth(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = config(mosquitto.url, tmp_path, discovery=True)
    # The subscriber comes after the publisher (Home Assistant starting later): retained.
    async with (
        MqttPublisher(cfg, device_name="Kitchen ears"),
        collector(mosquitto.port, "homeassistant/device/#", client_id="ha") as c,
    ):
        got = await c.wait_for(lambda ms: len(ms) >= 1)
        assert got[0].topic == "homeassistant/device/test-agent/config" and got[0].retain
        payload = json.loads(got[0].payload)
        assert payload["dev"]["name"] == "Kitchen ears"
        assert {cmp["p"] for cmp in payload["cmps"].values()} == {"event", "sensor", "switch"}
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="ha-core") as ha:
            await ha.publish("homeassistant/status", b"online", qos=1)
        await c.wait_for(lambda ms: len(ms) >= 2)


async def test_a_stale_retained_mute_state_is_replaced_at_start(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An earlier run left `{"mute": true}` retained on P/*/state (Home Assistant's mute
    switch): the new publisher replaces it at connection with the real state, unmuted."""
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="earlier-run") as old:
        await old.publish("salmonn/*/state", b'{"mute": true}', qos=1, retain=True)
    async with (
        MqttPublisher(config(mosquitto.url, tmp_path, discovery=True)),
        # Subscribing after the start (Home Assistant restarting later): the retained state.
        collector(mosquitto.port, "salmonn/*/state", client_id="ha") as c,
    ):
        [state] = await c.wait_for(lambda ms: len(ms) >= 1)
        assert state.retain and json.loads(state.payload) == {"mute": False}


async def test_embedded_broker_path(tmp_path: Path) -> None:
    """No URL: the publisher starts amqtt in-process; an independent client receives events."""
    cfg = config(None, tmp_path, embedded_port=0, discovery=True)
    async with MqttPublisher(cfg) as pub:
        assert pub.url is not None
        port = parse_url(pub.url).port
        assert port != 0
        async with collector(port, "salmonn/+/caption", client_id="embedded-sub") as c:
            for i in range(20):
                pub.submit(ev(i, kind="caption"))
            got = await c.wait_for(lambda ms: len(ms) >= 20)
            assert [json.loads(m.payload)["id"] for m in got] == [f"e{i}" for i in range(20)]


async def test_broker_down_at_start_bounded_outbox_survives_restart(tmp_path: Path) -> None:
    """Broker unreachable: start anyway, keep the newest `outbox_max_events`, count and report
    the drops, keep them on disk across a restart of the publisher, deliver when it's up."""
    broker = Mosquitto(tmp_path / "late-broker", port=free_port())
    cfg = config(broker.url, tmp_path, outbox_max_events=5)
    reports: list[dict[str, Any]] = []
    dropped = asyncio.Event()

    def on_status(info: dict[str, Any]) -> None:
        reports.append(info)
        if info["mqtt"] == "dropped":
            dropped.set()

    async with MqttPublisher(cfg, on_status=on_status) as pub:
        assert not pub.connected
        for i in range(8):
            pub.submit(ev(i))
        await asyncio.wait_for(dropped.wait(), 5)
        assert pub.stats()["outbox"]["dropped"] == 3
    assert reports[0]["mqtt"] == "disconnected" and "retry_in_s" in reports[0]
    assert {"mqtt": "dropped", "dropped": 3, "new": 3} in reports

    broker.start()
    try:
        async with (
            collector(broker.port, "salmonn/#", client_id="late") as c,
            MqttPublisher(cfg) as pub2,
        ):
            assert pub2.stats()["outbox"]["recovered"] == 5
            got = await c.wait_for(lambda ms: len(events_on(ms, "/transcript")) >= 5)
            assert [e["id"] for e in events_on(got, "/transcript")] == [
                f"e{i}" for i in range(3, 8)
            ]
    finally:
        broker.stop()


async def test_submit_refuses_events_outside_start_and_close(tmp_path: Path) -> None:
    cfg = config(f"mqtt://127.0.0.1:{free_port()}", tmp_path)
    pub = MqttPublisher(cfg)
    with pytest.raises(RuntimeError, match="before start"):
        pub.submit(ev(0))
    async with pub:
        pub.submit(ev(0))
    with pytest.raises(RuntimeError, match="after close"):
        pub.submit(ev(1))


async def test_embedded_broker_falls_back_to_a_free_port_when_its_port_is_taken(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(None, tmp_path, embedded_port=port)
        async with MqttPublisher(cfg) as pub:
            assert pub.url is not None and parse_url(pub.url).port not in (0, port)
            assert pub.connected
