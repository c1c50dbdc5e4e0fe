"""clients/robot: checks and PNG in process; the CLI on a real mosquitto and the real agent."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import aiomqtt

from clients.robot.png import draw_path
from clients.robot.robot import check
from tests.agent.mqtt_fixtures import Mosquitto, collector, free_port
from tests.clients.conftest import TIMING, AgentProcess, start_client, stop_client, stream_file


def command(n: int, intent: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    """A final command event as the agent publishes it (docs/events.md)."""
    return {
        "schema": 1,
        "id": f"rb:{n}/command",
        "seq": n,
        "stream": "rb",
        "kind": "command",
        "window": f"rb:{n}",
        "text": json.dumps(intent) if text is None else text,
        "partial": False,
        "start": float(n),
        "end": n + 1.0,
        "segment": "speech",
        "model": "test",
        "source": "llm",
        "timing": {},
        "intent": intent,
    }


def test_check_refuses_unknown_low_confidence_and_far_commands() -> None:
    ok, _ = check(command(1, {"intent": "turn", "direction": "left"}), 0.8, 5.0)
    assert ok is not None and ok.confidence == 1.0
    for intent, text, reason in [
        ({"intent": "none"}, None, "intent none"),
        ({"intent": "pick", "object": "cup"}, None, "unknown command 'pick'"),
        ({"intent": "move"}, 'sure: {"intent": "move"}', "low confidence 0.50"),
        ({"intent": "move", "distance": 50}, None, "outside (0, 5] m"),
    ]:
        refused, why = check(command(2, intent, text), 0.8, 5.0)
        assert refused is None and reason in why
    stop, _ = check(command(3, {"intent": "stop"}, "uh, stop it"), 0.8, 5.0)
    assert stop is not None  # stop is never refused for low confidence


def test_path_png_is_a_valid_image() -> None:
    data = draw_path([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)], 1.57, size=64).png()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (64, 64, 8, 2)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == 64 * (1 + 64 * 3)
    assert raw.count(bytes((30, 90, 200))) > 10  # the blue path is drawn


def read_until(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return line
    raise AssertionError(f"robot exited before printing {text!r}")


async def test_executes_preempts_refuses_and_acknowledges(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """Command events published as the agent does: a long move is preempted by stop, a turn
    runs, unknown and low-confidence commands are refused, each outcome on its topic."""
    png = tmp_path / "path.png"
    robot = start_client("robot", "--mqtt", broker.url, "--time-scale", "2", "--path-png", str(png))
    try:
        async with collector(broker.port, "salmonn/rb/robot/#", client_id="rb-watch") as c:
            await asyncio.to_thread(read_stderr_until, robot, "waiting for commands")
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="rb-agent") as agent:

                async def publish(event: dict[str, Any]) -> None:
                    await agent.publish("salmonn/rb/command", json.dumps(event), qos=1)

                await publish(command(1, {"intent": "move", "direction": "forward", "distance": 3}))
                await asyncio.to_thread(read_until, robot, "move forward 3 m ...")
                await publish(command(2, {"intent": "stop"}))
                await c.wait_for(lambda ms: len(ms) >= 2, 20 * TIMING)
                await publish(command(3, {"intent": "turn", "direction": "left", "angle": 90}))
                await publish(command(4, {"intent": "pick", "object": "cup"}))
                await publish(command(5, {"intent": "move"}, 'ok {"intent": "move"} then'))
                got = await c.wait_for(lambda ms: len(ms) >= 5, 20 * TIMING)
    finally:
        _, err = stop_client(robot)
    acks = [json.loads(m.payload) for m in got if m.topic == "salmonn/rb/robot/ack"]
    refused = [json.loads(m.payload) for m in got if m.topic == "salmonn/rb/robot/refused"]
    assert [(a["id"], a["result"]) for a in acks] == [
        ("rb:1/command", "preempted"),
        ("rb:2/command", "done"),
        ("rb:3/command", "done"),
    ]
    stopped_at = acks[0]["pose"]["x"]
    assert 0.0 <= stopped_at < 3.0  # the stop cut the 3 m move short
    assert acks[2]["pose"] == {"x": stopped_at, "y": 0.0, "heading_deg": 90.0}
    assert [r["id"] for r in refused] == ["rb:4/command", "rb:5/command"]
    assert "unknown command 'pick'" in refused[0]["reason"]
    assert "low confidence" in refused[1]["reason"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in err


def read_stderr_until(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            return line
    raise AssertionError(f"robot exited before saying {text!r}")


async def test_commands_of_the_real_agent_are_all_answered(
    agent: AgentProcess, broker: Mosquitto, clip: Path
) -> None:
    """Every final command event the agent publishes for the stream gets an ack or a refusal
    (the tiny-random model's commands are meaningless, so they are refused)."""
    robot = start_client("robot", "--mqtt", broker.url, "--stream", "rb-live")
    try:
        async with collector(broker.port, "salmonn/rb-live/#", client_id="rb-live-watch") as c:
            await asyncio.to_thread(read_stderr_until, robot, "waiting for commands")
            stream_file(agent, "rb-live", clip)
            closed = await c.wait_for(
                lambda ms: any(b'"stream_closed"' in m.payload for m in ms), 60 * TIMING
            )
            n = sum(1 for m in closed if m.topic == "salmonn/rb-live/command")
            assert n >= 1
            got = await c.wait_for(
                lambda ms: sum(1 for m in ms if "/robot/" in m.topic) >= n, 20 * TIMING
            )
    finally:
        _, err = stop_client(robot)
    commands = [json.loads(m.payload) for m in got if m.topic == "salmonn/rb-live/command"]
    answers = [json.loads(m.payload) for m in got if "/robot/" in m.topic]
    assert sorted(a["id"] for a in answers) == sorted(e["id"] for e in commands)
    assert "Traceback" not in err


def test_unreachable_broker_is_retried_without_traceback() -> None:
    robot = start_client("robot", "--mqtt", f"mqtt://127.0.0.1:{free_port()}")
    try:
        assert robot.stderr is not None
        lines = [robot.stderr.readline() for _ in range(2)]
    finally:
        _, rest = stop_client(robot)
    assert all("unreachable" in line and "retrying in" in line for line in lines), lines
    assert "Traceback" not in rest
