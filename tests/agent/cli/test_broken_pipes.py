"""agent/cli/logsetup.py and the shutdown signals of `run`, `edge` and `worker`, as subprocesses:
a reader of stderr or stdout that goes away never hangs or floods the agent, and SIGHUP shuts
it down like SIGTERM.

The pipes here are made by the test (`os.pipe`), so that closing the reading end is a public
operation: the agent then sees EPIPE on its next write, as with ``2>&1 | head -1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pytest
from websockets.asyncio.client import connect

from agent.cli.logsetup import GuardedStream
from agent.cluster.messages import presence_topic
from tests.agent.cli.test_run import MODEL_KINDS, ROOT, agent_env, read_event
from tests.agent.conftest import TIMING
from tests.agent.mqtt_fixtures import Mosquitto, collector, mosquitto  # noqa: F401

EXIT_TIMEOUT_S = 90.0 * TIMING  # a fresh process imports torch and loads the tiny model
# tiny-random's Whisper has no tokenizer: the LLM writes transcripts and reads commands.
# One waiting window per stream: a looping file keeps the queue full, and the shutdown answers it.
RUN_ARGS = ("--model", "tiny-random", "--input-mode", "trimmed", "--max-new-tokens", "4",
            "--transcript", "llm", "--command", "llm", "--max-pending", "1")  # fmt: skip
T = TypeVar("T")
BAD_SIGNS = ("Traceback", "Exception ignored", "Logging error")


class Pipe:
    """A pipe whose writing end goes to the agent and whose reading end the test can close."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.reader = asyncio.StreamReader()
        self._transport: asyncio.ReadTransport | None = None

    async def open_reader(self) -> None:
        """Close our copy of the writing end, read the other end with `reader`."""
        os.close(self.write_fd)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.reader), os.fdopen(self.read_fd, "rb", 0)
        )

    def close(self) -> None:
        """The reader goes away: the agent's next write to this pipe fails with EPIPE."""
        if self._transport is not None:
            self._transport.close()


@contextlib.asynccontextmanager
async def agent_process(
    tmp_path: Path, *args: str, stdout: Any, stderr: Any
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m agent.cli ARGS``, killed at exit if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", *args,
        cwd=ROOT, env={**agent_env(tmp_path), "PYTHONPATH": str(ROOT)},
        stdout=stdout, stderr=stderr,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def within(aw: Awaitable[T], what: str) -> T:
    """``await aw``, or a failure naming the hang when it takes over `EXIT_TIMEOUT_S`."""
    try:
        return await asyncio.wait_for(aw, EXIT_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"the agent hung {what} (over {EXIT_TIMEOUT_S} s)") from None


async def exit_code(proc: asyncio.subprocess.Process, what: str) -> int:
    """The exit code, or a failure naming the hang when the process does not exit in time."""
    return await within(proc.wait(), f"after {what}: no exit")


def log_of(path: Path) -> str:
    text = path.read_text(errors="replace")
    for bad in BAD_SIGNS:
        assert bad not in text, text[-3000:]
    return text


async def test_stderr_reader_gone_during_start_up_the_run_still_finishes(
    clip_path: Path, tmp_path: Path
) -> None:
    """The reader of stderr reads the first log line and exits before the model loads (whose
    weight-loading progress bars used to fail to write and leave tqdm's lock held: a hang at
    the next garbage collection). The agent answers the whole file and exits 0."""
    err = Pipe()
    async with agent_process(
        tmp_path, "run", *RUN_ARGS, "--source", f"file:{clip_path}", "--exit-at-end",
        "--ws", "off", "--no-mqtt", "--print", "json", "--status-interval", "0",
        stdout=asyncio.subprocess.PIPE, stderr=err.write_fd,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        await err.open_reader()
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            first = await err.reader.readline()
        assert b"effective configuration" in first
        err.close()
        out = await within(proc.stdout.read(), "after stderr was closed: stdout stays open")
        assert await exit_code(proc, "stderr was closed") == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert any(e["kind"] in MODEL_KINDS for e in events)
    assert events[-1].get("status") == "stopped"


async def test_one_pipe_for_stdout_and_stderr_closed_after_a_line(
    clip_path: Path, tmp_path: Path
) -> None:
    """``salmonn-live run ... 2>&1 | head -1``: both streams break (the stdout warning goes to
    the broken stderr: no loop), the console was the only output, so the agent stops, exit 0."""
    both = Pipe()
    async with agent_process(
        tmp_path, "run", *RUN_ARGS, "--source", f"file:{clip_path}", "--loop",
        "--ws", "off", "--no-mqtt",
        stdout=both.write_fd, stderr=both.write_fd,
    ) as proc:  # fmt: skip
        await both.open_reader()
        await within(both.reader.readline(), "before its first line")
        both.close()
        assert await exit_code(proc, "its only pipe was closed") == 0


async def test_stdout_reader_gone_the_agent_goes_on_serving_events(
    clip_path: Path, tmp_path: Path
) -> None:
    """stdout closes while events print: one warning, no traceback per event, and `/events`
    keeps receiving events until SIGTERM; exit code 0."""
    out = Pipe()
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        async with agent_process(
            tmp_path, "run", *RUN_ARGS, "--source", f"file:{clip_path}", "--loop",
            "--ws", "127.0.0.1:0", "--ws-no-auth", "--no-mqtt", "--print", "json",
            "--status-interval", "0",
            stdout=out.write_fd, stderr=err,
        ) as proc:  # fmt: skip
            await out.open_reader()
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                listening = await read_event(out.reader, lambda e: e.get("status") == "listening")
                events = await connect(f"{listening['detail']['url']}/events?partial=0")
                assert json.loads(await events.recv())["status"] == "subscribed"
                await read_event(out.reader, lambda e: e["kind"] in MODEL_KINDS)
                out.close()
                # Events go on after stdout closed: the loop source repeats the clip.
                later = []
                while len(later) < 3:
                    event = json.loads(await events.recv())
                    if event["kind"] in MODEL_KINDS:
                        later.append(event)
                await events.close()
            proc.send_signal(signal.SIGTERM)
            assert await exit_code(proc, "SIGTERM with stdout closed") == 0
    log = log_of(err_path)
    assert log.count("stdout is closed") == 1, log[-3000:]
    assert "shutdown requested: SIGTERM" in log


async def test_stdout_reader_gone_with_no_other_output_the_agent_stops(
    clip_path: Path, tmp_path: Path
) -> None:
    """With WebSocket and MQTT off, the console was the only output: the agent shuts down as
    if signalled, exit code 0 (the looping file source would run forever otherwise)."""
    out = Pipe()
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        async with agent_process(
            tmp_path, "run", *RUN_ARGS, "--source", f"file:{clip_path}", "--loop",
            "--ws", "off", "--no-mqtt", "--print", "json",
            stdout=out.write_fd, stderr=err,
        ) as proc:  # fmt: skip
            await out.open_reader()
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await out.reader.readline()
            out.close()
            assert await exit_code(proc, "stdout was closed") == 0
    log = log_of(err_path)
    assert log.count("stdout is closed") == 1, log[-3000:]
    assert "stopping: stdout closed and no other output" in log


async def test_sighup_shuts_run_down_cleanly(clip_path: Path, tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) is a graceful shutdown: the ``stopped`` event, exit 0."""
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        async with agent_process(
            tmp_path, "run", *RUN_ARGS, "--source", f"file:{clip_path}", "--loop",
            "--ws", "off", "--no-mqtt", "--print", "json", "--status-interval", "0",
            stdout=asyncio.subprocess.PIPE, stderr=err,
        ) as proc:  # fmt: skip
            assert proc.stdout is not None
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await read_event(proc.stdout, lambda e: e["kind"] in MODEL_KINDS)
                proc.send_signal(signal.SIGHUP)
                await read_event(proc.stdout, lambda e: e.get("status") == "stopped")
            assert await exit_code(proc, "SIGHUP") == 0
    log = log_of(err_path)
    assert "shutdown requested: SIGHUP" in log
    # stderr is a file, no terminal: no weight-loading progress bars from transformers.
    assert "model.salmonn: loaded model" in log and "Loading weights" not in log


async def test_sighup_shuts_edge_down_cleanly(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        async with agent_process(
            tmp_path, "edge", "--mqtt", mosquitto.url, "--mqtt-prefix", "t", "--device", "pi1",
            "--source", "ws", "--ws", "127.0.0.1:0", "--ws-no-auth", "--print", "json",
            stdout=asyncio.subprocess.PIPE, stderr=err,
        ) as proc:  # fmt: skip
            assert proc.stdout is not None
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await read_event(proc.stdout, lambda e: e.get("status") == "listening")
                proc.send_signal(signal.SIGHUP)
                await read_event(proc.stdout, lambda e: e.get("status") == "stopped")
            assert await exit_code(proc, "SIGHUP") == 0
    assert "shutdown requested: SIGHUP" in log_of(err_path)


async def test_sighup_shuts_worker_down_cleanly(
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The worker says ``online``, then on SIGHUP ``offline`` (its own message, not the will
    a killed worker leaves) and exits 0."""
    presence = presence_topic("t", "w1")

    def said(state: str) -> Any:
        return lambda ms: any(
            m.topic == presence and json.loads(m.payload)["state"] == state for m in ms
        )

    config = tmp_path / "worker.toml"  # `worker` has no --command flag
    config.write_text(
        '[model]\nname = "tiny-random"\ninput_mode = "trimmed"\ntranscript = "llm"\n'
        'command = "llm"\n'
    )
    err_path = tmp_path / "stderr.txt"
    async with collector(mosquitto.port, presence, client_id="watcher") as watcher:
        with err_path.open("w") as err:
            async with agent_process(
                tmp_path, "worker", "--config", str(config), "--mqtt", mosquitto.url,
                "--mqtt-prefix", "t", "--worker-id", "w1",
                stdout=asyncio.subprocess.DEVNULL, stderr=err,
            ) as proc:  # fmt: skip
                await watcher.wait_for(said("online"), EXIT_TIMEOUT_S)
                proc.send_signal(signal.SIGHUP)
                assert await exit_code(proc, "SIGHUP") == 0
                await watcher.wait_for(said("offline"), 10 * TIMING)
    assert "stopping: " in log_of(err_path)


class _Failing:
    """A stream whose writes fail like a pipe without a reader (counts the attempts)."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise OSError("no file descriptor")  # dup2 onto /dev/null is skipped

    def isatty(self) -> bool:
        return False


def test_a_guarded_stream_drops_writes_after_the_first_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No exception reaches the writer, the broken stream is not written again, and a stdout
    break is logged once."""
    failing = _Failing()
    stream = GuardedStream(failing, "stdout", warn=True)  # type: ignore[arg-type]
    for _ in range(5):
        assert stream.write("event\n") == 6
        stream.flush()
    assert stream.broken and failing.writes == 1 and not stream.isatty()
    assert [r.getMessage() for r in caplog.records].count(
        "stdout is closed (BrokenPipeError: its reader went away): console output stops"
    ) == 1


def test_a_guarded_stream_points_its_descriptor_at_dev_null(tmp_path: Path) -> None:
    """After a break, writes to the descriptor (C code, the interpreter's last flush) succeed."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    raw: TextIO = os.fdopen(write_fd, "w")
    stream = GuardedStream(raw, "stderr", warn=False)
    stream.write("x" * 100)
    stream.flush()
    assert stream.broken
    os.write(write_fd, b"after the break")  # would raise BrokenPipeError without the redirect
    raw.close()


@pytest.mark.parametrize("tty", [True, False])
def test_training_bars_only_on_a_terminal(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.train import _bar_off

    class Stderr(_Failing):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert _bar_off(True) is not tty
    assert _bar_off(False)
