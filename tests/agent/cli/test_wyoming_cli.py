"""`salmonn-live wyoming` for real: a subprocess with Whisper base and the sound tagger, talked
to with the `wyoming` package's own client, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.sound_tagger import LABEL_GROUPS
from tests.agent.protocols.test_wyoming import events_until, send_audio
from training.scenes import SOUND_EVENTS

wyoming = pytest.importorskip("wyoming")
from wyoming.asr import Transcribe  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402
from wyoming.wake import Detect  # noqa: E402

ROOT = Path(__file__).parents[3]
TIMING = float(os.environ.get("SALMONN_TEST_TIMING", "1"))
PHRASE = "turn left and stop"


class Service:
    """The command as a subprocess; its stderr lines collected, the port read from them."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "wyoming", "--uri", "tcp://127.0.0.1:0", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(180 * TIMING):
            self.proc.kill()
            raise AssertionError(f"never listened; stderr: {self.lines[-20:]}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"wyoming: listening on tcp://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._listening.set()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    running = Service("--sounds")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()


@pytest.fixture(scope="module")
def speech_pcm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    from streaming.audio_file import load_audio

    path = tmp_path_factory.mktemp("speech") / "phrase.wav"
    subprocess.run(["espeak-ng", "-w", str(path), PHRASE], check=True)
    audio = load_audio(path)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def test_describes_transcribes_and_detects(service: Service, speech_pcm: bytes) -> None:
    async with AsyncTcpClient("127.0.0.1", service.port) as client:
        await client.write_event(Describe().event())
        [info] = await events_until(client, "info", 30)
        asr = info.data["asr"][0]
        assert asr["models"][0]["languages"] == ["en"]
        sounds = [m["name"] for m in info.data["wake"][0]["models"]]
        assert sounds == list(LABEL_GROUPS)  # the tagger's own group names, in its order

        await client.write_event(Transcribe(language="en").event())
        await send_audio(client, speech_pcm)
        got = await events_until(client, "transcript", 60)
        text = got[-1].data["text"]
        assert " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split()) == PHRASE, text

    async with AsyncTcpClient("127.0.0.1", service.port) as client:
        await client.write_event(Detect(names=["smoke_alarm"]).event())
        alarm = SOUND_EVENTS["alarm_beeping"](np.random.default_rng(0))
        pcm = (np.clip(alarm, -1, 1) * 32767 * 0.5).astype("<i2").tobytes()
        await send_audio(client, pcm)
        got = await events_until(client, "detection", 60)
        assert got[-1].data["name"] == "smoke_alarm"


def test_sigterm_stops_it_cleanly(service: Service) -> None:
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(60 * TIMING) == 0
    assert not any("Traceback" in line for line in service.lines), service.lines[-20:]


def test_an_unknown_language_is_refused_naming_the_codes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "wyoming", "--language", "xx"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180 * TIMING,
    )
    assert done.returncode == 2
    assert "unknown language code 'xx'" in done.stderr and " de " in done.stderr, done.stderr
