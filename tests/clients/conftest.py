"""One real agent (`salmonn-live run`, tiny-random) and one mosquitto for the client tests.

The agent runs as a subprocess for the whole session, on ephemeral ports, with its MQTT
publisher pointed at a private mosquitto; each test feeds its own stream id. Its JSON event
lines are collected by a thread; `AgentProcess.wait_for` waits on them with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile

from tests.agent.mqtt_fixtures import Mosquitto

ROOT = Path(__file__).parents[2]
DEMO_WAV = ROOT / "examples" / "demo_scene.wav"
#: Scales every timeout (slow machines: SALMONN_TEST_TIMING=3).
TIMING = float(os.environ.get("SALMONN_TEST_TIMING", "1"))
START_TIMEOUT_S = 120.0 * TIMING
QUESTION = "Is anyone speaking?"

Event = dict[str, Any]


class AgentProcess:
    """A running `salmonn-live run` whose stdout (``--print json``) is collected."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.stderr_path = workdir / "agent.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.events: list[Event] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="agent-stdout", daemon=True)
        self._reader.start()
        listening = self.wait_for(lambda e: e.get("status") == "listening", START_TIMEOUT_S)
        self.ws_url: str = listening["detail"]["url"]
        self.http_url = self.ws_url.replace("ws://", "http://", 1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout_s: float = 60.0) -> Event:
        """The first collected event matching ``pred``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s * TIMING
        with self._changed:
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"the agent exited ({self.proc.returncode}): "
                        + self.stderr_path.read_text()[-2000:]
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching agent event within {timeout_s * TIMING} s")
                self._changed.wait(left)

    def of_stream(self, stream: str) -> list[Event]:
        """The events of one stream so far."""
        with self._changed:
            return [e for e in self.events if e.get("stream") == stream]

    def stop(self) -> None:
        """SIGTERM, then wait (kill if it hangs)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def finals(events: list[Event]) -> list[Event]:
    """Final model events."""
    return [
        e
        for e in events
        if e.get("kind") in ("transcript", "caption", "answer", "command") and not e["partial"]
    ]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A mosquitto on a free loopback port for the whole session."""
    mosquitto = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture(scope="session")
def agent(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """`salmonn-live run` (tiny-random) on 127.0.0.1:0, publishing to `broker`."""
    workdir = tmp_path_factory.mktemp("agent")
    config = workdir / "agent.toml"
    config.write_text(
        f'[mqtt]\noutbox_dir = "{workdir / "outbox"}"\nclient_id = "agent-under-test"\n'
        f'discovery = false\n\n[[questions]]\ntext = "{QUESTION}"\nkinds = ["speech"]\n'
    )
    process = AgentProcess(
        [
            "--config",
            str(config),
            "--source",
            "ws",
            "--model",
            "tiny-random",
            "--transcript",
            "llm",
            "--command",
            "llm",
            "--input-mode",
            "trimmed",
            "--ws",
            "127.0.0.1:0",
            "--ws-no-auth",
            "--mqtt",
            broker.url,
            "--print",
            "json",
            "--print-partials",
            "--status-interval",
            "0",
            "--max-new-tokens",
            "4",
            "--max-pending",
            "64",
        ],
        workdir,
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 13 s of the demo scene: 2 speech segments and 2 sounds."""
    audio, rate = soundfile.read(DEMO_WAV, dtype="int16")
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    soundfile.write(path, audio[: 13 * rate], rate, subtype="PCM_16")
    return path


def run_client(
    module: str, *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m clients.<module> ARGS`` to completion (text output captured)."""
    return subprocess.run(
        [sys.executable, "-m", f"clients.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s * TIMING,
    )


def start_client(module: str, *args: str) -> subprocess.Popen[str]:
    """``python -m clients.<module> ARGS`` in the background (line-buffered text pipes)."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", f"clients.{module}", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        # A client that hangs on SIGTERM gets SIGABRT from stop_client: dump its stacks.
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )


def stop_client(proc: subprocess.Popen[str], timeout_s: float = 15.0) -> tuple[str, str]:
    """SIGTERM a client and return its remaining (stdout, stderr).

    A client that does not exit in time is a bug: it is aborted (Python dumps every thread's
    stack on stderr) and the test fails with that dump.
    """
    proc.terminate()
    try:
        return proc.communicate(timeout=timeout_s * TIMING)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(
            f"client did not exit within {timeout_s * TIMING} s of SIGTERM:\n{out[-2000:]}\n"
            f"{err[-6000:]}"
        ) from None


def stream_file(agent: AgentProcess, stream: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Send a file to the agent with the mic_stream client (as fast as it takes it)."""
    done = run_client(
        "mic_stream", "--agent", agent.ws_url, "--stream", stream, "--file", str(path), "--fast"
    )
    assert done.returncode == 0, done.stderr
    return done
