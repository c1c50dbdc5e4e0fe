"""Fixtures for agent tests: one tiny-random model per session, agent configs on port 0."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import soundfile

from agent.config import AgentConfig, merge

if TYPE_CHECKING:
    from agent.runtime.app import Agent

DEMO_WAV = Path(__file__).parents[2] / "examples" / "demo_scene.wav"
#: Scales every timeout in these tests (slow CI machines: SALMONN_TEST_TIMING=3).
TIMING = float(os.environ.get("SALMONN_TEST_TIMING", "1"))


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """The tiny-random model in trimmed mode (fast on CPU), loaded once."""
    from model.presets import resolve_model
    from model.salmonn import Salmonn

    return Salmonn.from_config(resolve_model("tiny-random", input_mode="trimmed"))


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 13 s of the demo scene (2 speech segments, 2 sounds): enough, and fast."""
    audio, rate = soundfile.read(DEMO_WAV, dtype="int16")
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    soundfile.write(path, audio[: 13 * rate], rate, subtype="PCM_16")
    return path


def pcm_s16(path: Path) -> bytes:
    """The file's samples as s16le bytes."""
    audio, _ = soundfile.read(path, dtype="int16")
    return np.asarray(audio, dtype="<i2").tobytes()


def make_config(**sections: Any) -> AgentConfig:
    """A test configuration: ws on 127.0.0.1:0, no periodic stats, short tokens, no MQTT."""
    base: dict[str, Any] = {
        "agent": {"status_interval_s": 0, "print": "none"},
        # tiny-random's Whisper has no tokenizer: the LLM answers every task.
        "model": {
            "name": "tiny-random",
            "max_new_tokens": 6,
            "transcript": "llm",
            "command": "llm",
        },
        "ws": {
            "listen": "127.0.0.1:0",
            "auth": False,
            "hello_timeout_s": 1.0 * TIMING,
            "close_timeout_s": 1.0,
        },
        "worker": {"max_wait_ms": 5},
        "mqtt": {"enabled": False},
        "streams": [],
    }
    return AgentConfig.from_dict(merge(base, sections))


async def events_to_end(agent: Agent, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run ``agent`` to the end of its input (within ``timeout_s`` x TIMING) and return every
    event it published, in order."""
    import asyncio

    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        async with asyncio.timeout(timeout_s * TIMING):
            assert await agent.run() == "end of input"
    events = []
    while (event := sub.get_nowait()) is not None:
        events.append(event.data)
    return events


class HeardModel:
    """The tiny-random model, but Whisper always hears ``said`` and each call is recorded."""

    def __init__(self, model: Any, said: str) -> None:
        self._model = model
        self.said = said
        self.calls: list[int] = []

    whisper_tokenizer = "scripted"  # Whisper's text is given: no tokenizer is needed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe_with_whisper(self, audio: list[np.ndarray], **_: Any) -> list[str]:
        self.calls.append(len(audio))
        return [self.said] * len(audio)


class FakeTokens:
    """`encode_audio`'s result for fake models: any row is one zero token."""

    def row(self, i: int) -> Any:
        return np.zeros((1, 4), np.float32)


class FakeText:
    """A `generate_from_tokens` result row."""

    def __init__(self, text: str) -> None:
        self.text = text


class FakeTokenizer:
    """Decodes n tokens as n x's."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)
