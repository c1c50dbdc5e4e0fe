"""`[model] command = "whisper"`: command intents read from Whisper's transcript."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from agent.app import Agent
from tests.agent.conftest import TIMING, make_config


class HeardModel:
    """The tiny-random model, but Whisper always hears ``said`` and each call is recorded."""

    def __init__(self, model: Any, said: str) -> None:
        self._model = model
        self.said = said
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe_with_whisper(self, audio: list[np.ndarray]) -> list[str]:
        self.calls.append(len(audio))
        return [self.said] * len(audio)


async def test_whisper_commands_share_one_transcription_per_window(
    tiny_model: Any, clip_path: Path
) -> None:
    heard = HeardModel(tiny_model, "Turn left 90 degrees.")
    config = make_config(
        model={"transcript": "whisper", "command": "whisper"},
        streams=[{"id": "s", "source": f"file:{clip_path}"}],
        agent={"exit_at_end": True},
        ws={"listen": "off"},
    )
    agent = Agent(config, lambda: heard)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        async with asyncio.timeout(120 * TIMING):
            assert await agent.run() == "end of input"
    events = []
    while (event := sub.get_nowait()) is not None:
        events.append(event)
    commands = [e for e in events if e["kind"] == "command" and not e["partial"]]
    transcripts = [e for e in events if e["kind"] == "transcript" and not e["partial"]]
    assert commands and len(commands) == len(transcripts)
    for command in commands:
        assert command["source"] == "whisper"
        assert command["text"] == "Turn left 90 degrees."
        assert command["intent"] == {"intent": "turn", "direction": "left", "angle": 90}
    # One transcription per speech window serves both of its requests.
    assert sum(heard.calls) == len({c["window"] for c in commands})
