"""agent/cli/run.py: `salmonn-live run` as a subprocess: shut down by SIGTERM or SIGINT,
its MQTT output on the embedded broker and on mosquitto (last will when killed).

Every agent here keeps its state (the MQTT outbox) under the test's temporary directory and
listens on ephemeral ports only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.cli.run import MQTT_URL_ENV, TOKEN_ENV, format_event
from agent.config import parse_url
from agent.protocols.ws import CloseCode
from tests.agent.conftest import TIMING, pcm_s16
from tests.agent.mqtt_fixtures import Mosquitto, collector, mosquitto  # noqa: F401

ROOT = Path(__file__).parents[3]
MODEL_KINDS = ("transcript", "caption", "answer", "command")


def agent_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an agent subprocess: state (the MQTT outbox) under ``tmp_path``, not
    ``~/.local/state``; no broker URL or WebSocket token inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in (MQTT_URL_ENV, TOKEN_ENV)}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return env


async def start_agent(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    """``salmonn-live run --model tiny-random ARGS`` with stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "run", "--model", "tiny-random",
        "--transcript", "llm", "--command", "llm", *args,
        cwd=ROOT, env=agent_env(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_event(
    stream: asyncio.StreamReader, until: Any, seen: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The first JSON line on the agent's stdout for which ``until`` is true; every event
    read on the way (that one included) is appended to ``seen``."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError("the agent exited early")
        event = json.loads(line)
        if seen is not None:
            seen.append(event)
        if until(event):
            return event  # type: ignore[no-any-return]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_shuts_down_cleanly(
    sig: signal.Signals, clip_path: Path, tmp_path: Path
) -> None:
    """Intake stops (the /audio client is closed with 1001), the open segment is answered,
    /events clients get the last events then 1001 with a reason, the process exits 0 with no
    task left behind."""
    proc = await start_agent(
        tmp_path, "--input-mode", "trimmed", "--source", "ws", "--ws", "127.0.0.1:0",
        "--ws-no-auth", "--no-mqtt", "--print", "json", "--max-new-tokens", "4",
        "--status-interval", "0",
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(120 * TIMING):
            listening = await read_event(proc.stdout, lambda e: e.get("status") == "listening")
            base = listening["detail"]["url"]
            events = await connect(f"{base}/events?partial=0")
            assert json.loads(await events.recv())["status"] == "subscribed"
            audio = await connect(f"{base}/audio")
            await audio.send(
                json.dumps({"stream": "r1", "sample_rate": 16000, "format": "s16le", "channels": 1})
            )
            assert json.loads(await audio.recv())["status"] == "ready"
            pcm = pcm_s16(clip_path)
            # 8 s, in 0.5 s frames: the sound (3.1-5.3 s) ends, the speech (6.9-9.0 s) is cut.
            for i in range(0, 16000 * 2 * 8, 16000):
                await audio.send(pcm[i : i + 16000])
            await read_event(proc.stdout, lambda e: e.get("kind") == "caption")
            proc.send_signal(sig)
            await audio.wait_closed()
            assert audio.close_code == CloseCode.GOING_AWAY
            got = []
            with pytest.raises(ConnectionClosed):
                while True:
                    got.append(json.loads(await events.recv()))
            assert (
                events.close_code == CloseCode.GOING_AWAY
                and events.close_reason == "agent shutting down"
            )
            stopped = [e for e in got if e.get("status") == "stopped"]
            assert stopped and stopped[0]["detail"]["unfinished_windows"] == []
            # The segment cut by the shutdown was closed and answered before "stopped".
            cut = [e for e in got if e["kind"] == "transcript" and e["start"] > 6.0]
            assert cut and cut[0]["seq"] < stopped[0]["seq"]
            rest = await proc.stdout.read()
            assert b'"stopped"' in rest
            stderr = (await proc.stderr.read()).decode()
            assert await proc.wait() == 0, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for bad in ("Traceback", "Task was destroyed", "never retrieved", "Unclosed"):
        assert bad not in stderr


async def test_a_token_is_generated_when_none_is_configured(tmp_path: Path) -> None:
    """Secure by default: no token configured -> one is made for the run, shown once on stderr,
    and /events refuses connections without it."""
    from websockets.exceptions import InvalidStatus

    proc = await start_agent(
        tmp_path, "--source", "ws", "--ws", "127.0.0.1:0", "--no-mqtt", "--print", "json",
        "--status-interval", "0",
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(120 * TIMING):
            token = None
            while token is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "the agent exited before showing its token"
                if line.startswith("WebSocket token for this run: "):
                    token = line.split(": ", 1)[1].strip()
            assert len(token) >= 20
            listening = await read_event(proc.stdout, lambda e: e.get("status") == "listening")
            base = listening["detail"]["url"]
            assert listening["detail"]["token_required"] is True
            assert token not in json.dumps(listening)
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"{base}/events")
            assert refused.value.response.status_code == 401
            async with connect(f"{base}/events?token={token}") as events:
                assert json.loads(await events.recv())["status"] == "subscribed"
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_embedded_broker_delivers_events_to_an_independent_subscriber(
    clip_path: Path, tmp_path: Path
) -> None:
    """No --mqtt: `run` starts the embedded amqtt broker (here on a free port, from the
    config) and says where in its first `mqtt_connected` status. A separate aiomqtt client
    there receives every final event, and the rule's firing three ways: the rule's message,
    and the `trigger` event on MQTT, on the console and on /events."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[mqtt]\nembedded_port = 0\nclient_id = "cmd-run-embedded"\n\n'
        '[[rules]]\nname = "heard"\nkind = ["caption"]\ntopic = "home/heard/{stream}"\n'
        'payload = "{text}"\n'
    )
    proc = await start_agent(
        tmp_path, "--config", str(config), "--input-mode", "trimmed", "--source", "ws",
        "--ws", "127.0.0.1:0", "--ws-no-auth", "--print", "json", "--max-new-tokens", "4",
        "--status-interval", "0",
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.create_task(proc.stderr.read())  # drained all along: never blocks it
    printed: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(120 * TIMING):
            connected = await read_event(
                proc.stdout, lambda e: e.get("status") == "mqtt_connected", printed
            )
            port = parse_url(connected["detail"]["url"]).port
            assert connected["detail"]["url"] == f"mqtt://127.0.0.1:{port}" and port != 1883
            [listening] = [e for e in printed if e.get("status") == "listening"]
            base = listening["detail"]["url"]
            async with (
                collector(port, "salmonn/#", "home/#", client_id="independent") as sub,
                connect(f"{base}/events?kind=trigger") as events,
                connect(f"{base}/audio") as audio,
            ):
                assert json.loads(await events.recv())["status"] == "subscribed"
                hello = {"stream": "r1", "sample_rate": 16000, "format": "s16le", "channels": 1}
                await audio.send(json.dumps(hello))
                assert json.loads(await audio.recv())["status"] == "ready"
                pcm = pcm_s16(clip_path)
                for i in range(0, 16000 * 2 * 8, 16000):  # 8 s: the sound at 3.1-5.3 s ends
                    await audio.send(pcm[i : i + 16000])
                trigger = await read_event(proc.stdout, lambda e: e["kind"] == "trigger", printed)
                assert json.loads(await events.recv()) == trigger  # /events, filtered by kind
                caption = next(e for e in printed if e["id"] == trigger["source_id"])
                assert caption["kind"] == "caption" and trigger["seq"] == caption["seq"] + 1
                assert trigger["topic"] == "home/heard/r1" and trigger["payload"] == caption["text"]
                assert format_event(trigger).split()[:3] == ["r1", "trigger", "heard:"]
                # Every final event printed so far, the trigger included, reaches the
                # subscriber on P/<stream>/<kind> as it was printed; and the rule's message.
                expected = [
                    (f"salmonn/r1/{e['kind']}", e)
                    for e in printed
                    if e["kind"] in (*MODEL_KINDS, "trigger")
                ]
                assert ("salmonn/r1/caption", caption) in expected

                def arrived(messages: list[Any]) -> bool:
                    got = [
                        (m.topic, json.loads(m.payload))
                        for m in messages
                        if m.topic.startswith("salmonn/r1/")
                    ]
                    rule = [m.payload for m in messages if m.topic == "home/heard/r1"]
                    return all(e in got for e in expected) and bool(rule)

                got = await sub.wait_for(arrived, within_s=30 * TIMING)
                assert next(m.payload for m in got if m.topic == "home/heard/r1") == (
                    caption["text"].encode()
                )
                assert next(m.payload for m in got if m.topic == "salmonn/status") == b"online"
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            stderr = (await stderr_task).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr_task.cancel()
    assert f"embedded broker at mqtt://127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "state" / "salmonn-live" / "outbox" / "cmd-run-embedded").is_dir()


async def test_last_will_fires_when_the_agent_is_killed(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A running agent SIGKILLed (no chance to say goodbye): the broker publishes its last
    will, `offline` on P/status, for Home Assistant and every robot listening."""

    def started(messages: list[Any]) -> bool:
        return any(
            m.topic == "salmonn/*/status" and json.loads(m.payload)["status"] == "started"
            for m in messages
        )

    async with collector(mosquitto.port, "salmonn/status", "salmonn/*/status") as sub:
        proc = await start_agent(
            tmp_path, "--mqtt", mosquitto.url, "--source", "ws", "--ws", "127.0.0.1:0",
            "--ws-no-auth", "--print", "none", "--status-interval", "0",
        )  # fmt: skip
        assert proc.stderr is not None
        stderr_task = asyncio.create_task(proc.stderr.read())
        try:
            await sub.wait_for(started, within_s=120 * TIMING)
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
            got = await sub.wait_for(lambda ms: ms[-1].payload == b"offline", within_s=10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr_task.cancel()
    assert [m.payload for m in got if m.topic == "salmonn/status"] == [b"online", b"offline"]
