"""clients/speaker on the real agent: speaks (to WAV) and tells the agent, which then ignores
the windows captured while it speaks."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiomqtt
import soundfile
from websockets.asyncio.client import connect

from tests.agent.conftest import pcm_s16
from tests.agent.mqtt_fixtures import Mosquitto, free_port
from tests.clients.conftest import TIMING, AgentProcess, finals

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16le


def control_of(agent: AgentProcess, stream: str) -> list[bool]:
    """The `speaking` values the agent applied to a stream, in order."""
    return [
        e["detail"]["speaking"]
        for e in agent.of_stream(stream)
        if e.get("status") == "control" and "speaking" in e["detail"]
    ]


async def test_speaks_answers_and_the_agent_ignores_its_voice(
    agent: AgentProcess, broker: Mosquitto, clip: Path, tmp_path: Path
) -> None:
    wav_dir = tmp_path / "wav"
    speaker = await asyncio.create_subprocess_exec(
        *start_client_args(),
        "--mqtt",
        broker.url,
        "--stream",
        "spk",
        "--kinds",
        "transcript",
        "--wav-dir",
        str(wav_dir),
        "--exit-after",
        "1",
        "--confirm-s",
        str(10 * TIMING),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert speaker.stderr is not None
    async with asyncio.timeout(20 * TIMING):
        assert b"connected" in await speaker.stderr.readline()
    pcm = pcm_s16(clip)
    async with connect(f"{agent.ws_url}/audio") as audio:  # stays open: control needs it
        await audio.send(
            json.dumps({"stream": "spk", "sample_rate": 16000, "format": "s16le", "channels": 1})
        )
        assert json.loads(await audio.recv())["status"] == "ready"
        for i in range(0, len(pcm), FRAME_BYTES):
            await audio.send(pcm[i : i + FRAME_BYTES])
        async with asyncio.timeout(60 * TIMING):
            out, err = await speaker.communicate()
        assert speaker.returncode == 0, err
        assert b"[speaker] spk transcript:" in out and b"Traceback" not in err
        assert b"did not confirm" not in err  # the agent acknowledged both messages
        (wav,) = wav_dir.glob("*.wav")
        info = soundfile.info(str(wav))
        assert info.samplerate > 0 and info.duration > 0.1
        await asyncio.to_thread(agent.wait_for, lambda e: control_of(agent, "spk") == [True, False])

        # While someone speaks, the same audio again gives no window: all are ignored.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="spk-test") as client:
            await client.publish("salmonn/spk/set", json.dumps({"speaking": True}), qos=1)
            await asyncio.to_thread(
                agent.wait_for, lambda e: control_of(agent, "spk") == [True, False, True]
            )
            before = len(finals(agent.of_stream("spk")))
            for i in range(0, len(pcm), FRAME_BYTES):
                await audio.send(pcm[i : i + FRAME_BYTES])
            # The clip's last sound starts again at 24.1 s: once it is seen, every segment
            # of the second pass started while speaking (the last one ends at the close).
            await asyncio.to_thread(
                agent.wait_for,
                lambda e: e.get("status") == "segment_started" and e["detail"]["start"] > 23.5,
            )
            await client.publish("salmonn/spk/set", json.dumps({"speaking": False}), qos=1)
            await asyncio.to_thread(
                agent.wait_for, lambda e: control_of(agent, "spk") == [True, False, True, False]
            )
    await asyncio.to_thread(
        agent.wait_for, lambda e: e.get("status") == "stream_closed" and e["stream"] == "spk"
    )
    events = agent.of_stream("spk")
    ignored = [e for e in events if e.get("status") == "window_ignored"]
    assert len(ignored) >= 3 and all(e["detail"]["end"] > 13.0 for e in ignored)
    late = [e for e in finals(events) if e["start"] >= 13.0]
    assert len(finals(events)) >= before and not late


def start_client_args() -> list[str]:
    return [sys.executable, "-m", "clients.speaker"]


async def test_unreachable_broker_is_retried_without_traceback(tmp_path: Path) -> None:
    speaker = await asyncio.create_subprocess_exec(
        *start_client_args(),
        "--mqtt",
        f"mqtt://127.0.0.1:{free_port()}",
        stderr=asyncio.subprocess.PIPE,
    )
    assert speaker.stderr is not None
    async with asyncio.timeout(20 * TIMING):
        lines = [(await speaker.stderr.readline()).decode() for _ in range(2)]
    speaker.terminate()
    _, rest = await speaker.communicate()
    assert all("unreachable" in line and "retrying in" in line for line in lines), lines
    assert b"Traceback" not in rest
