"""Faults (issue #8): the running agent under broker outages, model errors, lost clients, a
broken outbox disk and SIGTERM mid-inference. Every fault must be survived, reported, and must
lose no event the agent promised to deliver.

Already covered elsewhere, and not repeated here: the publisher alone across one broker restart
and a bounded outbox across a restart of the publisher (test_mqtt_publisher.py), SIGTERM/SIGINT
after a caption with a cut segment answered (test_cmd_run.py), a slow `/events` client closed
with 4429 (test_ws.py). Every wait here is on an event or a message, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.events import Published
from agent.protocols.ws import CloseCode
from agent.runtime.app import Agent, run_agent
from tests.agent.conftest import TIMING, make_config, pcm_s16
from tests.agent.mqtt_fixtures import (
    Collector,
    Mosquitto,
    collector,
    free_port,
    mosquitto,  # noqa: F401 - fixture
)

ROOT = Path(__file__).parents[2]
MODEL_KINDS = ("transcript", "caption", "answer", "command")


class Recorder:
    """A sink that keeps every event the agent publishes, for waiting on and comparing."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, item: Published) -> None:
        self.events.append(item.data)
        self._changed.set()

    def statuses(self, word: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("status") == word]

    async def wait_for(
        self, pred: Callable[[list[dict[str, Any]]], object], within_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until ``pred(events)`` holds; raises TimeoutError after ``within_s``."""
        async with asyncio.timeout(within_s * TIMING):
            while not pred(self.events):
                self._changed.clear()
                await self._changed.wait()
        return self.events


def mqtt_section(broker: Mosquitto, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    """`[mqtt]` for a test agent on ``broker``, with fast reconnects."""
    return {
        "enabled": True,
        "url": broker.url,
        "outbox_dir": str(tmp_path / "outbox"),
        "client_id": "agent-under-test",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "discovery": False,
        **kw,
    }


def published(messages: list[Any]) -> list[dict[str, Any]]:
    """Agent events received over MQTT, first copy of each (QoS 1 may deliver twice)."""
    seen: dict[str, dict[str, Any]] = {}
    for m in messages:
        if m.topic.startswith("salmonn/") and m.topic.count("/") == 2:
            event = json.loads(m.payload)
            seen.setdefault(event["id"], event)
    return list(seen.values())


def mqtt_bound(events: list[dict[str, Any]]) -> list[str]:
    """Ids of the events MQTT promises to deliver (finals and status events, not partials)."""
    return [e["id"] for e in events if not e.get("partial")]


@contextlib.asynccontextmanager
async def persistent_subscriber(broker: Mosquitto, client_id: str) -> AsyncIterator[Collector]:
    """A subscriber to ``salmonn/#`` whose session (QoS 1 queue) outlives broker restarts:
    it subscribes once while ``broker`` runs; the broker keeps its session across a stop."""
    async with collector(broker.port, "salmonn/#", client_id=client_id) as c:
        yield c


async def test_broker_down_at_start_agent_buffers_then_delivers_everything(
    tiny_model: Any, clip_path: Path, tmp_path: Path
) -> None:
    """The broker is down when the agent starts: the agent starts anyway, answers the whole
    file into its outbox, and delivers every event, in order, once the broker comes up."""
    broker = Mosquitto(tmp_path / "late-broker", port=free_port())
    broker.start()
    async with persistent_subscriber(broker, "late-sub") as sub:
        await asyncio.to_thread(broker.stop)
        config = make_config(
            ws={"listen": "off"},
            agent={"exit_at_end": True},
            streams=[{"id": "demo", "source": f"file:{clip_path}"}],
            mqtt=mqtt_section(broker, tmp_path),
        )
        agent = Agent(config, lambda: tiny_model)
        local = Recorder()
        agent.add_sink("local", local, maxsize=100_000)
        try:
            async with agent:
                publisher = agent.mqtt
                assert publisher is not None and not publisher.connected
                assert await agent.run() == "end of input"
                before = mqtt_bound(local.events)
                assert any(e["kind"] in MODEL_KINDS for e in local.events)
                assert publisher.stats()["outbox"]["queued"] >= len(before) > 0
                assert not publisher.connected and not sub.messages
                await asyncio.to_thread(broker.start)
                got = await sub.wait_for(
                    lambda ms: {e["id"] for e in published(ms)} >= set(before), within_s=30
                )
                await local.wait_for(lambda evs: any(local.statuses("mqtt_connected")))
            # Every event, in the agent's order; then the agent's own later news.
            ids = [e["id"] for e in published(got)]
            assert ids[: len(before)] == before
            assert published(got)[0]["status"] == "started"
            stats = publisher.stats()["outbox"]
            assert stats["dropped"] == 0 and stats["disk_errors"] == 0
        finally:
            await asyncio.to_thread(broker.stop)


async def test_broker_killed_and_restarted_three_times_loses_nothing(
    tiny_model: Any,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Events keep coming while the broker goes away and comes back three times in one run:
    every event arrives, in order, none lost, none dropped from the outbox."""
    config = make_config(ws={"listen": "off"}, mqtt=mqtt_section(mosquitto, tmp_path))
    agent = Agent(config, lambda: tiny_model)
    local = Recorder()
    agent.add_sink("local", local, maxsize=100_000)
    async with persistent_subscriber(mosquitto, "restart-sub") as sub, agent:
        mqtt = agent.mqtt
        assert mqtt is not None and agent.pipeline is not None
        pipeline = agent.pipeline
        stop = asyncio.Event()

        async def produce() -> None:  # a live agent: news every few ms, outage or not
            n = 0
            while not stop.is_set():
                pipeline.emit_status("tick", f"tick {n}")
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.005)

        producer = asyncio.create_task(produce())
        try:
            for outage in range(1, 4):
                await sub.wait_for(lambda ms, k=outage: len(ms) >= 40 * k)
                await asyncio.to_thread(mosquitto.stop)
                await local.wait_for(
                    lambda _, k=outage: len(local.statuses("mqtt_disconnected")) >= k
                )
                queued_during_outage = mqtt.stats()["outbox"]["queued"]
                await local.wait_for(
                    lambda _, q=queued_during_outage: mqtt.stats()["outbox"]["queued"] > q
                )
                await asyncio.to_thread(mosquitto.start)
                await local.wait_for(lambda _, k=outage: len(local.statuses("mqtt_connected")) >= k)
        finally:
            stop.set()
            await producer
        expected = mqtt_bound(local.events)
        got = await sub.wait_for(
            lambda ms: {e["id"] for e in published(ms)} >= set(expected), within_s=30
        )
        await asyncio.wait_for(mqtt.drain(), 10 * TIMING)
        assert [e["id"] for e in published(got)][: len(expected)] == expected
        outbox = mqtt.stats()["outbox"]
        assert outbox["dropped"] == 0 and outbox["disk_errors"] == 0
        assert outbox["put"] == outbox["acked"]
        assert len(local.statuses("tick")) > 100
        assert mqtt.stats()["connects"] == 4


class FailingModel:
    """The tiny model, with one failure injected on its ``fail_on``-th model call.

    Args:
        model: The model answering every other call.
        where: ``encode`` (``encode_audio`` raises) or ``generate`` (``generate_from_tokens``
            raises after its second token, when partials were already sent).
        fail_on: Which call of that method fails (1 is the worker's warm-up).
    """

    def __init__(self, model: Any, where: str, fail_on: int) -> None:
        self._model = model
        self._where = where
        self._fail_on = fail_on
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _count(self, where: str) -> bool:
        if where != self._where:
            return False
        self._calls += 1
        return self._calls == self._fail_on

    def encode_audio(self, audios: Any) -> Any:
        if self._count("encode"):
            raise RuntimeError("simulated model failure (encode)")
        return self._model.encode_audio(audios)

    def generate_from_tokens(self, *args: Any, on_token: Any = None, **kw: Any) -> Any:
        if not self._count("generate") or on_token is None:
            return self._model.generate_from_tokens(*args, on_token=on_token, **kw)
        tokens = 0

        def failing(row: int, token: int) -> None:
            nonlocal tokens
            tokens += 1
            if tokens > 2:
                raise RuntimeError("simulated model failure (generate)")
            on_token(row, token)

        return self._model.generate_from_tokens(*args, on_token=failing, **kw)


@pytest.mark.parametrize("where", ["encode", "generate"])
async def test_model_exception_on_one_window_is_reported_and_the_pipeline_goes_on(
    tiny_model: Any, clip_path: Path, where: str
) -> None:
    """The model raises on the second window: that window gets a `window_failed` status
    event naming its unanswered requests; the windows before and after are answered; the
    stream's counters account for every window; the agent does not stop."""
    config = make_config(
        ws={"listen": "off"},
        agent={"exit_at_end": True},
        worker={"max_batch": 1},
        streams=[{"id": "demo", "source": f"file:{clip_path}"}],
    )
    agent = Agent(config, lambda: FailingModel(tiny_model, where, fail_on=3))
    local = Recorder()
    agent.add_sink("local", local, maxsize=100_000)
    async with agent:
        assert await agent.run() == "end of input"
        assert agent.pipeline is not None and agent.pipeline.failure is None
    failed = local.statuses("window_failed")
    assert len(failed) == 1, failed
    detail = failed[0]["detail"]
    assert detail["window"] == "demo:1" and "simulated model failure" in detail["error"]
    finals = [e for e in local.events if e["kind"] in MODEL_KINDS and not e["partial"]]
    answered = {e["window"] for e in finals}
    assert "demo:1" not in answered  # nothing half-reported as a final
    assert detail["requests"] and all(r.startswith("demo:1/") for r in detail["requests"])
    assert "demo:0" in answered and any(int(w.split(":")[1]) > 1 for w in answered)
    closed = local.statuses("stream_closed")[0]["detail"]
    assert closed["failed"] == 1 and closed["dropped"] == 0
    assert closed["answered"] + closed["failed"] == closed["windows"] == len(answered) + 1
    assert local.statuses("stopped")[0]["detail"]["unfinished_windows"] == []


async def test_audio_client_lost_mid_utterance_closes_and_reports_its_segment(
    tiny_model: Any, clip_path: Path
) -> None:
    """A robot's connection drops (TCP reset, no close frame) in the middle of speech: the
    open segment is closed where the audio stopped, answered, and the stream is closed."""
    pcm = pcm_s16(clip_path)
    cut_s = 8.0  # the clip's speech runs 6.9-9.0 s

    def is_cut_start(event: dict[str, Any]) -> bool:
        return event.get("status") == "segment_started" and 6.0 < event["detail"]["start"] < cut_s

    async with run_agent(make_config(), lambda: tiny_model) as agent:
        assert agent.ws is not None and agent.pipeline is not None
        base = agent.ws.url
        async with connect(f"{base}/events?stream=r1&partial=0") as events:
            assert json.loads(await events.recv())["status"] == "subscribed"
            audio = await connect(f"{base}/audio")
            await audio.send(
                json.dumps({"stream": "r1", "sample_rate": 16000, "format": "s16le", "channels": 1})
            )
            assert json.loads(await audio.recv())["status"] == "ready"
            for i in range(0, int(cut_s * 16000) * 2, 3200):
                await audio.send(pcm[i : i + 3200])
            got: list[dict[str, Any]] = []
            async with asyncio.timeout(30 * TIMING):  # the utterance has begun on the agent
                while not any(is_cut_start(e) for e in got):
                    got.append(json.loads(await events.recv()))
            assert audio.transport is not None
            audio.transport.abort()  # the network goes away: no close frame, a TCP reset
            async with asyncio.timeout(60 * TIMING):
                while not (got and got[-1].get("status") == "stream_closed"):
                    got.append(json.loads(await events.recv()))
    speech_start = next(e["detail"]["start"] for e in got if is_cut_start(e))
    ended = [
        e
        for e in got
        if e.get("status") == "segment_ended" and e["detail"]["start"] == speech_start
    ]
    assert len(ended) == 1 and speech_start < ended[0]["detail"]["end"] <= cut_s + 0.01
    cut = [e for e in got if e["kind"] in MODEL_KINDS and e["start"] >= speech_start - 0.5]
    assert cut and all(e["end"] == pytest.approx(ended[0]["detail"]["end"], abs=0.01) for e in cut)
    assert all(e["seq"] < got[-1]["seq"] for e in cut)
    closed = got[-1]["detail"]
    assert closed["answered"] == closed["windows"] >= 2 and closed["failed"] == 0


def _can_mount_tmpfs() -> bool:
    return sys.platform == "linux" and shutil.which("mount") is not None


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A real, tiny filesystem at ``path`` that fills up (needs root; skips otherwise)."""
    path.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


async def test_outbox_directory_unwritable_counts_reports_and_still_delivers(
    tiny_model: Any, clip_path: Path, tmp_path: Path
) -> None:
    """The outbox directory cannot be created (its parent is a regular file: ENOTDIR, which
    stops root too): the agent runs, says so in a status event, counts the disk errors, keeps
    the outbox in memory (bounded: drops counted and reported) and delivers what it kept, in
    order, once the broker is up."""
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("I am not a directory\n")
    bound = 5
    broker.start()
    async with persistent_subscriber(broker, "disk-sub") as sub:
        await asyncio.to_thread(broker.stop)
        config = make_config(
            ws={"listen": "off"},
            agent={"exit_at_end": True},
            streams=[{"id": "demo", "source": f"file:{clip_path}"}],
            mqtt={
                **mqtt_section(broker, tmp_path),
                "outbox_dir": str(not_a_dir / "outbox"),
                "outbox_max_events": bound,
            },
        )
        agent = Agent(config, lambda: tiny_model)
        local = Recorder()
        agent.add_sink("local", local, maxsize=100_000)
        try:
            async with agent:
                publisher = agent.mqtt
                assert publisher is not None
                assert await agent.run() == "end of input"
                await local.wait_for(lambda _: local.statuses("mqtt_dropped"))
                stats = publisher.stats()["outbox"]
                assert stats["disk_errors"] >= 1 and stats["queued"] == bound
                assert stats["dropped"] == stats["put"] - bound > 0
                disk = local.statuses("mqtt_outbox_error")
                assert len(disk) == 1 and "Not a directory" in disk[0]["detail"]["error"]
                last = mqtt_bound(local.events)[-1]
                await asyncio.to_thread(broker.start)
                await asyncio.wait_for(publisher.drain(), 30 * TIMING)
                acked = publisher.stats()["outbox"]["acked"]
                got = await sub.wait_for(lambda ms: len(published(ms)) >= acked, within_s=30)
            # What was kept arrives in order: the newest events, the oldest were dropped.
            order = {event_id: i for i, event_id in enumerate(mqtt_bound(local.events))}
            ids = [e["id"] for e in published(got)]
            assert last in ids and [order[i] for i in ids] == sorted(order[i] for i in ids)
            stats = publisher.stats()["outbox"]
            assert stats["put"] == stats["acked"] + stats["dropped"] and stats["queued"] == 0
            assert 0 < local.statuses("mqtt_dropped")[-1]["detail"]["dropped"] <= stats["dropped"]
        finally:
            await asyncio.to_thread(broker.stop)
    assert not (not_a_dir / "outbox").exists()


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs Linux mount")
async def test_outbox_disk_full_mid_run_is_reported_and_recovers(
    tiny_model: Any,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The outbox's filesystem (a real 16 KiB tmpfs) fills up while the broker is away: no
    crash, `mqtt_outbox_error` with ENOSPC, events kept in memory and all delivered when the
    broker returns; the journal is then emptied and writable again (`mqtt_outbox_ok`)."""
    with tiny_tmpfs(tmp_path / "small-disk", 16) as disk:
        outbox_dir = disk / "outbox"
        config = make_config(
            ws={"listen": "off"}, mqtt=mqtt_section(mosquitto, tmp_path, outbox_dir=str(outbox_dir))
        )
        agent = Agent(config, lambda: tiny_model)
        local = Recorder()
        agent.add_sink("local", local, maxsize=100_000)
        async with persistent_subscriber(mosquitto, "full-sub") as sub, agent:
            mqtt = agent.mqtt
            assert mqtt is not None and agent.pipeline is not None
            await asyncio.to_thread(mosquitto.stop)
            await local.wait_for(lambda _: local.statuses("mqtt_disconnected"))
            padding = "x" * 600  # about 40 events fill the disk
            for i in range(120):
                agent.pipeline.emit_status("news", f"news {i}", detail={"pad": padding})
            await local.wait_for(lambda _: local.statuses("mqtt_outbox_error"))
            error = local.statuses("mqtt_outbox_error")[0]["detail"]["error"]
            assert "No space left on device" in error
            assert mqtt.stats()["outbox"]["disk_errors"] >= 1
            expected = mqtt_bound(local.events)
            await asyncio.to_thread(mosquitto.start)
            got = await sub.wait_for(
                lambda ms: {e["id"] for e in published(ms)} >= set(expected), within_s=30
            )
            assert [e["id"] for e in published(got)][: len(expected)] == expected
            await asyncio.wait_for(mqtt.drain(), 10 * TIMING)
            # Drained: the journal gives its space back and is used again.
            await local.wait_for(lambda _: local.statuses("mqtt_outbox_ok"))
            agent.pipeline.emit_status("news", "after the disk recovered")
            await asyncio.wait_for(mqtt.drain(), 10 * TIMING)
            stats = mqtt.stats()["outbox"]
            assert stats["dropped"] == 0 and stats["put"] == stats["acked"]
            assert len(local.statuses("mqtt_outbox_error")) == 1


async def test_shutdown_during_inference_cuts_and_reports_every_waiting_window(
    tiny_model: Any, clip_path: Path
) -> None:
    """What SIGTERM triggers, in-process: the agent closes while a window is generating (1024
    tokens) and two more wait. After `worker.drain_timeout_s` the running window is cut at its
    next token and the waiting ones are cancelled: each gets `window_unfinished`, all are
    listed in `stopped`, and the stream's counters account for every window."""
    import soundfile

    audio, _ = soundfile.read(clip_path, dtype="float32")
    config = make_config(
        ws={"listen": "off"},
        model={"max_new_tokens": 1024},
        worker={"max_batch": 1, "drain_timeout_s": 0.2},
    )
    local = Recorder()
    async with run_agent(config, lambda: tiny_model) as agent:
        assert agent.pipeline is not None
        agent.add_sink("local", local, maxsize=100_000)
        handle = agent.pipeline.open_stream(config.stream_settings("r1"), origin="test")
        handle.push(audio)  # three windows at once; the last one closes at shutdown
        await local.wait_for(
            lambda evs: any(e["kind"] in MODEL_KINDS and e["partial"] for e in evs)
        )
    stopped = local.statuses("stopped")
    assert len(stopped) == 1 and local.events[-1] is stopped[0]
    unfinished = stopped[0]["detail"]["unfinished_windows"]
    cut = [e["detail"]["window"] for e in local.statuses("window_unfinished")]
    assert sorted(cut) == sorted(unfinished) and len(unfinished) == 3
    counters = stopped[0]["detail"]["streams"]["r1"]
    assert counters["windows"] == 3 and counters["failed"] == 3 and counters["answered"] == 0
    assert not any(e["kind"] in MODEL_KINDS and not e["partial"] for e in local.events)


async def read_json_line(stream: asyncio.StreamReader, until: Any) -> dict[str, Any]:
    """The first JSON line on the agent's stdout for which ``until`` is true."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError("the agent exited early")
        event = json.loads(line)
        if until(event):
            return event  # type: ignore[no-any-return]


@pytest.mark.slow  # a subprocess that loads torch: 10-20 s on the shared 2-core machine
async def test_sigterm_during_inference_shuts_down_cleanly(clip_path: Path, tmp_path: Path) -> None:
    """SIGTERM while a window is being generated (1024 tokens, several seconds) with a short
    drain timeout: the window is cut at its next token and reported (`window_unfinished`, and
    in `stopped`), `/audio` and `/events` clients get 1001, the process exits 0 with nothing
    on stderr that looks like a crash."""
    toml = tmp_path / "agent.toml"
    toml.write_text("[worker]\ndrain_timeout_s = 0.2\nmax_batch = 1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "run", "--config", str(toml),
        "--model", "tiny-random", "--input-mode", "trimmed", "--source", "ws",
        "--transcript", "llm", "--command", "llm",
        "--ws", "127.0.0.1:0", "--ws-no-auth", "--no-mqtt", "--print", "json",
        "--max-new-tokens", "1024", "--status-interval", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    stderr = ""
    try:
        async with asyncio.timeout(120 * TIMING):
            listening = await read_json_line(proc.stdout, lambda e: e.get("status") == "listening")
            base = listening["detail"]["url"]
            events = await connect(f"{base}/events")
            assert json.loads(await events.recv())["status"] == "subscribed"
            audio = await connect(f"{base}/audio")
            await audio.send(
                json.dumps({"stream": "r1", "sample_rate": 16000, "format": "s16le", "channels": 1})
            )
            assert json.loads(await audio.recv())["status"] == "ready"
            pcm = pcm_s16(clip_path)
            for i in range(0, 16000 * 2 * 6, 16000):  # the sound at 3.1-5.3 s ends: a window
                await audio.send(pcm[i : i + 16000])
            got: list[dict[str, Any]] = []
            while not (got and got[-1]["kind"] in MODEL_KINDS and got[-1]["partial"]):
                got.append(json.loads(await events.recv()))
            generating = got[-1]["window"]  # tokens are coming for it: inference under way
            proc.send_signal(signal.SIGTERM)
            await audio.wait_closed()
            assert audio.close_code == CloseCode.GOING_AWAY
            with pytest.raises(ConnectionClosed):
                while True:
                    got.append(json.loads(await events.recv()))
            assert events.close_code == CloseCode.GOING_AWAY
            assert events.close_reason == "agent shutting down"
            stderr = (await proc.stderr.read()).decode()
            assert await proc.wait() == 0, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stopped = [e for e in got if e.get("status") == "stopped"]
    assert len(stopped) == 1 and got[-1] is stopped[0]
    assert generating in stopped[0]["detail"]["unfinished_windows"]
    cut = [e for e in got if e.get("status") == "window_unfinished"]
    assert any(e["detail"]["window"] == generating for e in cut)
    assert not any(
        e["kind"] in MODEL_KINDS and not e["partial"] and e["window"] == generating for e in got
    )
    for bad in ("Traceback", "Task was destroyed", "never retrieved", "Unclosed", "Exception in"):
        assert bad not in stderr, stderr
