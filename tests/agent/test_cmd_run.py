"""agent/cmd_run.py: `salmonn-live run` as a subprocess, shut down by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.ws import CloseCode
from tests.agent.conftest import TIMING, pcm_s16

ROOT = Path(__file__).parents[2]


async def read_event(stream: asyncio.StreamReader, until: Any) -> dict[str, Any]:
    """The first JSON line on the agent's stdout for which ``until`` is true."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError("the agent exited early")
        event = json.loads(line)
        if until(event):
            return event  # type: ignore[no-any-return]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_shuts_down_cleanly(sig: signal.Signals, clip_path: Path) -> None:
    """Intake stops (the /audio client is closed with 1001), the open segment is answered,
    /events clients get the last events then 1001 with a reason, the process exits 0 with no
    task left behind."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--model",
        "tiny-random",
        "--input-mode",
        "trimmed",
        "--source",
        "ws",
        "--ws",
        "127.0.0.1:0",
        "--ws-no-auth",
        "--print",
        "json",
        "--max-new-tokens",
        "4",
        "--status-interval",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
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


async def test_a_token_is_generated_when_none_is_configured(clip_path: Path) -> None:
    """Secure by default: no token configured -> one is made for the run, shown once on stderr,
    and /events refuses connections without it."""
    from websockets.exceptions import InvalidStatus

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "run", "--model", "tiny-random", "--source", "ws",
        "--ws", "127.0.0.1:0", "--no-mqtt", "--print", "json", "--status-interval", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
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
