"""clients/mic_stream against the real agent: a file, stdin, refusals, reconnection, buffer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from clients.mic_stream.streamer import FrameBuffer
from tests.clients.conftest import (
    TIMING,
    AgentProcess,
    finals,
    run_client,
    start_client,
    stop_client,
    stream_file,
)


def start_client_args(module: str) -> list[str]:
    return [sys.executable, "-m", f"clients.{module}"]


def test_frame_buffer_drops_the_oldest_and_counts() -> None:
    async def scenario() -> tuple[list[bytes | None], int]:
        buffer = FrameBuffer(3)
        for i in range(5):
            buffer.put(bytes([i]))
        buffer.close()
        return [await buffer.get() for _ in range(4)], buffer.dropped

    got, dropped = asyncio.run(scenario())
    assert got == [b"\x02", b"\x03", b"\x04", None]
    assert dropped == 2


def test_fast_files_burst_then_keep_under_the_agents_rate_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--fast: the first FAST_BURST_S seconds at once, then FAST_SPEED x real time (the
    agent closes streams that stay above ws.max_audio_rate, 4x by default)."""
    from clients.mic_stream import streamer

    clock = [0.0]

    async def fake_sleep(delay: float) -> None:
        clock[0] += max(0.0, delay)

    monkeypatch.setattr(streamer.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(streamer.asyncio, "sleep", fake_sleep)
    sent_at: list[float] = []

    class Recorder(FrameBuffer):
        def put(self, frame: bytes) -> None:
            sent_at.append(clock[0])

    async def scenario() -> None:
        await streamer._paced([b"x"] * 50, Recorder(100), 1.0, streamer.FAST_SPEED)

    asyncio.run(scenario())
    burst = int(streamer.FAST_BURST_S)
    assert sent_at[: burst + 1] == [0.0] * (burst + 1)
    audio_s = 50.0
    assert sent_at[-1] == pytest.approx((audio_s - 1 - streamer.FAST_BURST_S) / streamer.FAST_SPEED)
    assert streamer.FAST_SPEED < 4.0  # the agent's default ws.max_audio_rate


def test_file_reaches_the_agent_and_is_answered(agent: AgentProcess, clip: Path) -> None:
    done = stream_file(agent, "ms-file", clip)
    assert "sent 130 frames over 1 connection(s); dropped 0" in done.stderr  # 13 s / 100 ms
    agent.wait_for(lambda e: e.get("status") == "stream_closed" and e["stream"] == "ms-file")
    events = agent.of_stream("ms-file")
    ended = [e for e in events if e.get("status") == "segment_ended"]
    assert len(ended) >= 3
    assert {e["detail"]["segment"] for e in ended} <= {"speech", "sound", "mixed"}
    assert all(-90.0 < e["detail"]["level_dbfs"] < 0.0 for e in ended)
    got = finals(events)
    assert {e["kind"] for e in got} >= {"transcript", "caption"}
    assert all(0.0 <= e["start"] < e["end"] <= 13.0 for e in got)


def test_stdin_pcm_in_f32(agent: AgentProcess, clip: Path) -> None:
    audio, rate = soundfile.read(clip, dtype="float32")
    proc = subprocess.run(
        [
            *start_client_args("mic_stream"),
            "--agent",
            agent.ws_url,
            "--stream",
            "ms-stdin",
            "--stdin",
            "--rate",
            str(rate),
            "--format",
            "f32le",
        ],
        input=audio.astype("<f4").tobytes(),
        capture_output=True,
        timeout=60 * TIMING,
    )
    assert proc.returncode == 0, proc.stderr
    agent.wait_for(lambda e: e.get("status") == "stream_closed" and e["stream"] == "ms-stdin")
    assert finals(agent.of_stream("ms-stdin"))


def test_refused_hello_is_a_clear_error_without_retry(agent: AgentProcess) -> None:
    proc = subprocess.run(
        [*start_client_args("mic_stream"), "--agent", agent.ws_url, "--stdin", "--channels", "99"],
        input=b"",
        capture_output=True,
        timeout=30 * TIMING,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "refused the stream: unsupported format (4415)" in err
    assert "Traceback" not in err


def test_unreachable_agent_is_retried_with_backoff_without_traceback(clip: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = start_client("mic_stream", "--agent", f"ws://127.0.0.1:{port}", "--file", str(clip))
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(3)]
    finally:
        _, rest = stop_client(proc)
    assert all("unreachable" in line and "retrying in" in line for line in lines), lines
    delays = [float(line.split("retrying in ")[1].split(" s")[0]) for line in lines]
    assert delays[0] < delays[1] < delays[2]  # 0.5, 1, 2 s (±10 %)
    assert "Traceback" not in rest and proc.returncode == 0


class Proxy:
    """A TCP relay to the agent that the test can open, cut and reopen."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and break every open connection."""
        assert self.server is not None
        self.server.close()
        for writer in list(self.pipes):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_reconnects_after_a_cut_and_drops_the_oldest_beyond_the_buffer(
    agent: AgentProcess, clip: Path
) -> None:
    """Real-time file through a relay: cut it for ~1.5 s with a 0.5 s buffer; the streamer
    reconnects (a second stream_opened), drops and counts the oldest frames, and ends."""
    port = int(agent.ws_url.rsplit(":", 1)[1])
    proxy = Proxy(port)
    await proxy.start()
    proc = await asyncio.create_subprocess_exec(
        *start_client_args("mic_stream"),
        "--agent",
        f"ws://127.0.0.1:{proxy.port}",
        "--stream",
        "ms-cut",
        "--file",
        str(clip),
        "--buffer-s",
        "0.5",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None

    async def line_with(text: str) -> str:
        while True:
            line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
            assert line, "mic_stream exited early"
            if text in line:
                return line

    async with asyncio.timeout(60 * TIMING):
        await line_with("streaming")
        await asyncio.to_thread(
            agent.wait_for, lambda e: e.get("status") == "segment_ended" and e["stream"] == "ms-cut"
        )
        await proxy.cut()
        await line_with("unreachable")
        await line_with("unreachable")  # 0.5 s, then 1 s: more than the 0.5 s buffer
        await proxy.start()
        await line_with("streaming")
        summary = await line_with("sent ")
        assert await proc.wait() == 0
    frames_sent = int(summary.split("sent ")[1].split()[0])
    dropped = int(summary.rsplit("dropped ", 1)[1])
    assert "over 2 connection(s)" in summary
    assert dropped > 0 and frames_sent + dropped >= 130
    await asyncio.to_thread(
        agent.wait_for,
        lambda e: e.get("status") == "stream_closed" and e["stream"] == "ms-cut",
    )
    opened = [e for e in agent.of_stream("ms-cut") if e.get("status") == "stream_opened"]
    assert len(opened) == 2


@pytest.mark.parametrize("module", ["mic_stream", "robot", "speaker", "web"])
def test_help(module: str) -> None:
    done = run_client(module, "--help")
    assert done.returncode == 0 and "usage: python -m clients." + module in done.stdout
