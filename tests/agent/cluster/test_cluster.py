"""Edges and workers over one real mosquitto (MQTT 5 shared subscription), tiny-random model.

Downstream is what a consumer sees: a separate MQTT subscriber on the event topics. In-process
workers share the session's tiny model (inference only reads its weights); the killed worker is
a real `salmonn-live worker` process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from agent.cluster.edge import Edge
from agent.cluster.messages import (
    WireError,
    decode_result,
    decode_window,
    encode_result,
    encode_window,
    presence_topic,
)
from agent.cluster.worker import ClusterWorker
from agent.config import AgentConfig
from agent.events import MODEL_KINDS
from agent.runtime.worker import Request, Window
from tests.agent.conftest import TIMING, make_config
from tests.agent.mqtt_fixtures import (  # noqa: F401
    Collector,
    Mosquitto,
    collector,
    mosquitto,
    mosquitto_auth,
)

PREFIX = "t"
ROOT = Path(__file__).parents[3]
WORKER_START_S = 60.0 * TIMING  # a fresh process imports torch and loads the model


def cluster_config(broker: Mosquitto, tmp: Path, name: str, **sections: Any) -> AgentConfig:
    """A test config on ``broker``: short timeouts, no partials, no discovery."""
    base: dict[str, Any] = {
        "mqtt": {
            "enabled": True,
            "url": broker.url,
            "prefix": PREFIX,
            "client_id": f"events-{name}",
            "outbox_dir": str(tmp / f"outbox-{name}"),
            "discovery": False,
        },
        "worker": {"partials": False, "max_wait_ms": 5},
        "cluster": {"accept_timeout_s": 1.0 * TIMING, "result_timeout_s": 10.0 * TIMING},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return make_config(**base)


def edge_config(
    broker: Mosquitto, tmp: Path, device: str, clip: Path, streams: list[str]
) -> AgentConfig:
    return cluster_config(
        broker,
        tmp,
        device,
        agent={"exit_at_end": True},
        cluster={"device": device},
        streams=[{"id": s, "source": f"file:{clip}"} for s in streams],
    )


def worker_config(broker: Mosquitto, tmp: Path, worker_id: str, **worker: Any) -> AgentConfig:
    return cluster_config(
        broker, tmp, worker_id, cluster={"worker_id": worker_id}, worker=worker or {}
    )


@contextlib.asynccontextmanager
async def running_worker(config: AgentConfig, model: Any) -> AsyncIterator[ClusterWorker]:
    async with ClusterWorker(config, lambda: model) as worker:
        await asyncio.wait_for(worker.subscribed.wait(), 10 * TIMING)
        yield worker


async def run_edge(config: AgentConfig) -> Edge:
    """Run an edge over its files until every window is answered; returns it (closed)."""
    edge = Edge(config)
    async with edge:
        reason = await asyncio.wait_for(edge.run(), 60 * TIMING)
        assert reason == "end of input"
    return edge


async def downstream(events: Collector, broker: Mosquitto) -> list[dict[str, Any]]:
    """Every final model event the subscriber got, once a barrier published after the edges
    closed (their publishers had every event acknowledged) has come through."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="barrier") as client:
        await client.publish(f"{PREFIX}/barrier", b"x", qos=1)
    await events.wait_for(lambda ms: any(m.topic == f"{PREFIX}/barrier" for m in ms))
    out = []
    for message in events.messages:
        parts = message.topic.split("/")
        if len(parts) == 3 and parts[2] in MODEL_KINDS:
            event = json.loads(message.payload)
            assert not event["partial"]
            out.append(event)
    return out


def check_exactly_once(events: list[dict[str, Any]], edges: list[Edge]) -> None:
    """Every window of every edge has one final per task, none twice, none missing."""
    ids = collections.Counter(e["id"] for e in events)
    assert [i for i, n in ids.items() if n > 1] == []
    windows = {e["window"]: e for e in events}
    made = 0
    for edge in edges:
        assert edge.pipeline is not None
        stats = edge.remote.stats() if edge.remote else {}
        assert stats["outstanding"] == 0 and stats["given_up"] == 0, stats
        made += stats["windows"]
        assert stats["answered"] == stats["windows"]
    assert len(windows) == made > 0
    config = edges[0].config
    for window, event in windows.items():
        tasks = config.prompts.tasks_for(event["segment"])
        assert {f"{window}/{task}" for task in tasks} == {
            i for i in ids if i.startswith(window + "/")
        }
    assert all(isinstance(e["worker"], str) for e in events)
    for edge in edges:  # each edge numbers what it publishes, as `run` does
        streams = {s.id for s in edge.config.streams}
        seqs = [e["seq"] for e in events if e["stream"] in streams]
        assert len(set(seqs)) == len(seqs)


# -- the wire format ----------------------------------------------------------------------------


def test_window_message_round_trip_is_lossless_on_16_bit_samples() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2)
    tone = 3000 * np.sin(2 * np.pi * 440 * t / 16000) + rng.integers(-40, 40, t.size)
    audio = np.round(tone).astype(np.float32) / 32768  # 16-bit values: a tone in light noise
    window = Window(
        id="robot1:3",
        stream="robot1",
        kind="speech",
        audio=audio,
        start_s=1.5,
        end_s=3.5,
        captured=100.25,
        segment_end=100.5,
        requests=(
            Request(key="robot1:3/transcript", task="transcript", instruction="Say it."),
            Request(
                key="robot1:3/q0",
                task="answer",
                instruction="Who?",
                lora_scale=2.0,
                with_transcript=True,
            ),
            Request(
                key="robot1:3/command",
                task="command",
                instruction="",
                engine="whisper",
                language="auto",
                whisper_task="translate",
            ),
        ),
    )
    payload = encode_window(window, run="r1", device="pi", attempt=2, wall_offset_s=1000.0)
    message = decode_window(payload, wall_offset_s=990.0)
    assert (message.run, message.device, message.attempt) == ("r1", "pi", 2)
    got = message.window
    assert np.array_equal(got.audio, audio)
    assert got.requests == window.requests
    assert (got.id, got.stream, got.kind, got.start_s, got.end_s) == (
        "robot1:3",
        "robot1",
        "speech",
        1.5,
        3.5,
    )
    # Stamps travel as Unix times and land on the receiver's clock.
    assert got.captured == pytest.approx(110.25) and got.segment_end == pytest.approx(110.5)
    assert len(payload) < 0.6 * audio.size * 2  # FLAC: well under raw 16-bit PCM


@pytest.mark.parametrize(
    "payload", [b"", b"{}", b'{"v": 1, "codec": "flac"}\nnot flac', b"\xff\xfe\n\x00"]
)
def test_bad_window_messages_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_window(payload, 0.0)


def test_result_messages() -> None:
    body = decode_result(encode_result("failed", run="r", window="a:1", worker="w", error="x"))
    assert body["type"] == "failed" and body["error"] == "x"
    for bad in (b"[]", b'{"v": 2}', b'{"v": 1, "type": "event"}', b"nope"):
        with pytest.raises(WireError):
            decode_result(bad)


# -- the cluster --------------------------------------------------------------------------------


async def test_two_edges_three_workers_every_window_answered_once(
    mosquitto: Mosquitto,  # noqa: F811
    tiny_model: Any,
    clip_path: Path,
    tmp_path: Path,
) -> None:
    async with (
        collector(mosquitto.port, f"{PREFIX}/#", client_id="downstream") as events,
        running_worker(worker_config(mosquitto, tmp_path, "w1"), tiny_model) as w1,
        running_worker(worker_config(mosquitto, tmp_path, "w2"), tiny_model) as w2,
        running_worker(worker_config(mosquitto, tmp_path, "w3"), tiny_model) as w3,
    ):
        edges = await asyncio.gather(
            run_edge(edge_config(mosquitto, tmp_path, "pi1", clip_path, ["a1", "a2"])),
            run_edge(edge_config(mosquitto, tmp_path, "pi2", clip_path, ["b1", "b2"])),
        )
        got = await downstream(events, mosquitto)
    check_exactly_once(got, list(edges))
    assert {e["stream"] for e in got} == {"a1", "a2", "b1", "b2"}
    # The broker spread the windows: every worker answered some.
    answered = {w.id: w.counters["answered"] for w in (w1, w2, w3)}
    assert all(n > 0 for n in answered.values()), answered
    assert sum(answered.values()) >= len({e["window"] for e in got})


async def test_a_killed_worker_s_windows_are_answered_by_another(
    mosquitto: Mosquitto,  # noqa: F811
    tiny_model: Any,
    clip_path: Path,
    tmp_path: Path,
) -> None:
    # The victim batches slowly (it waits 30 s to fill a batch), so the windows it accepts are
    # still unanswered when it is killed.
    config = tmp_path / "victim.toml"
    config.write_text(
        f"""
[model]
name = "tiny-random"
input_mode = "trimmed"
max_new_tokens = 6
transcript = "llm"
command = "llm"
[worker]
max_wait_ms = 30000
max_batch = 64
partials = false
[mqtt]
url = "{mosquitto.url}"
prefix = "{PREFIX}"
[cluster]
worker_id = "victim"
"""
    )
    async with collector(
        mosquitto.port, f"{PREFIX}/#", presence_topic(PREFIX, "+"), client_id="downstream"
    ) as events:
        victim = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "agent.cli", "-q", "worker", "--config", str(config)),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:

            def victim_said(state: str) -> Any:
                return lambda ms: any(
                    m.topic == presence_topic(PREFIX, "victim")
                    and json.loads(m.payload)["state"] == state
                    for m in ms
                )

            await events.wait_for(victim_said("online"), WORKER_START_S)

            def victim_accepted(ms: list[Any]) -> bool:
                return any(
                    m.topic.startswith(f"{PREFIX}/results/")
                    and json.loads(m.payload).get("worker") == "victim"
                    and json.loads(m.payload)["type"] == "accepted"
                    for m in ms
                )

            async with running_worker(worker_config(mosquitto, tmp_path, "w1"), tiny_model) as w1:
                edge_task = asyncio.create_task(
                    run_edge(edge_config(mosquitto, tmp_path, "pi1", clip_path, ["a1", "a2"]))
                )
                await events.wait_for(victim_accepted, 30 * TIMING)
                victim.send_signal(signal.SIGKILL)
                # The broker publishes the victim's will as soon as its socket closes.
                await events.wait_for(victim_said("offline"), 10 * TIMING)
                edge = await edge_task
                got = await downstream(events, mosquitto)
        finally:
            with contextlib.suppress(ProcessLookupError):
                victim.kill()
            await asyncio.wait_for(victim.wait(), 10)
    check_exactly_once(got, [edge])
    assert edge.remote is not None
    stats = edge.remote.stats()
    assert stats["workers_lost"] >= 1 and stats["republished"] >= 1, stats
    assert set(stats["answered_by"]) == {"w1"}
    assert {e["worker"] for e in got} == {"w1"}
    assert w1.counters["answered"] == len({e["window"] for e in got})


async def test_a_late_worker_joins_the_pool_and_takes_load(
    mosquitto: Mosquitto,  # noqa: F811
    tiny_model: Any,
    clip_path: Path,
    tmp_path: Path,
) -> None:
    async with (
        collector(mosquitto.port, f"{PREFIX}/#", client_id="downstream") as events,
        running_worker(worker_config(mosquitto, tmp_path, "early"), tiny_model) as early,
    ):
        first = await run_edge(edge_config(mosquitto, tmp_path, "pi1", clip_path, ["a1"]))
        assert first.remote is not None
        assert set(first.remote.stats()["answered_by"]) == {"early"}
        async with running_worker(worker_config(mosquitto, tmp_path, "late"), tiny_model) as late:
            second = await run_edge(
                edge_config(mosquitto, tmp_path, "pi2", clip_path, ["b1", "b2", "b3"])
            )
        got = await downstream(events, mosquitto)
    check_exactly_once(got, [first, second])
    assert second.remote is not None
    share = second.remote.stats()["answered_by"]
    # Round robin between two members: the late worker answers about half.
    assert share.get("late", 0) >= second.remote.stats()["windows"] // 3, share
    assert late.counters["answered"] == share["late"]
    assert early.counters["answered"] == share.get("early", 0) + first.remote.stats()["windows"]


async def test_a_worker_refused_by_the_broker_stops_with_the_reason(
    mosquitto_auth: Mosquitto,  # noqa: F811
    tmp_path: Path,
    tiny_model: Any,
) -> None:
    """Wrong credentials cannot be cured by retrying: the worker says why and stops."""
    config = cluster_config(
        mosquitto_auth,
        tmp_path,
        "w-bad",
        mqtt={"url": f"mqtt://robot:wrong@127.0.0.1:{mosquitto_auth.port}"},
        cluster={"worker_id": "w-bad"},
    )
    async with ClusterWorker(config, lambda: tiny_model) as worker:
        reason = await asyncio.wait_for(worker.run(asyncio.Event()), 30 * TIMING)
    assert reason == "refused by the broker"
    assert worker.refused is not None and "login refused" in worker.refused
    assert "wrong" not in worker.refused


def test_an_edge_refuses_early_commands() -> None:
    """Early reads are settled against a local worker's answers; an edge has none."""
    from agent.errors import ConfigError

    config = make_config(
        model={"command": "whisper", "early_command_ms": 200},
        mqtt={"enabled": True, "url": "mqtt://127.0.0.1:1"},
    )
    with pytest.raises(ConfigError, match="not supported on an edge"):
        Edge(config)


def test_an_edge_refuses_sound_events() -> None:
    """An edge loads no tagger: `[sounds] enabled` there is a ConfigError naming the fix (tag
    on the agent), not an edge that advertises sound entities and never fires them."""
    from agent.errors import ConfigError

    mqtt = {"enabled": True, "url": "mqtt://127.0.0.1:1"}
    config = make_config(sounds={"enabled": True}, mqtt=mqtt)
    with pytest.raises(ConfigError, match=r"sounds\.enabled is not supported on an edge") as info:
        Edge(config)
    assert "salmonn-live run --sounds" in str(info.value)
    assert "sounds.enabled = false" in str(info.value)
    # [sounds] tables with enabled = false are fine there.
    Edge(make_config(sounds={"enabled": False, "threshold": 0.6}, mqtt=mqtt))
