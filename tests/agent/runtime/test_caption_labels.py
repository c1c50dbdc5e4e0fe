"""`sounds.caption_labels`: the caption instruction names what the tagger heard in the window
(`SoundsConfig.caption_prompt`, `StreamSounds.heard`); standing questions are asked as
written. The tiny model, the real YAMNet tagger and a real GCompris bark, paced in real time
(the live patches' answers are in before the segment ends, as on a microphone)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agent.config import SoundsConfig
from agent.runtime.app import Agent
from tests.agent.conftest import make_config
from tests.agent.runtime.test_pipeline import collect
from tests.agent.runtime.test_sound_pipeline import gcompris, scene, write

PLAIN = "Please describe the audio."
QUESTION = "Is a dog barking?"


def test_caption_prompt_names_the_groups_only_when_on() -> None:
    heard = [("dog", 0.934), ("smoke_alarm", 0.5)]
    on = SoundsConfig(caption_labels=True)
    assert on.caption_prompt(PLAIN, heard) == (
        "Sounds heard: dog (0.93), smoke alarm (0.50). Please describe the audio."
    )
    assert on.caption_prompt(PLAIN, []) == PLAIN  # nothing heard: the plain instruction
    assert SoundsConfig(caption_labels=False).caption_prompt(PLAIN, heard) == PLAIN


async def _instructions(
    tiny_model: Any, path: Path, monkeypatch: pytest.MonkeyPatch, *, labels: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every LLM instruction the worker asked, and the events, for one real-time file."""
    asked: list[str] = []
    generate = tiny_model.generate_from_tokens

    def recording(rows: Any, instructions: Any, **kwargs: Any) -> Any:
        asked.extend(instructions)
        return generate(rows, instructions, **kwargs)

    monkeypatch.setattr(tiny_model, "generate_from_tokens", recording)
    config = make_config(
        streams=[
            {
                "id": "yard",
                "source": f"file:{path}",
                "realtime": True,
                "questions": [{"text": QUESTION, "kinds": ["speech", "sound", "mixed"]}],
            }
        ],
        # The detector takes a bark for speech at times: every kind is captioned here.
        prompts={
            "caption": PLAIN,
            "speech": ["caption"],
            "sound": ["caption"],
            "mixed": ["caption"],
        },
        agent={"exit_at_end": True},
        sounds={"enabled": True, "caption_labels": labels},
    )
    agent = Agent(config, lambda: tiny_model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert await agent.run() == "end of input"
    events = await collect(sub, lambda e: e.get("status") == "stopped")
    return asked, events


@pytest.mark.parametrize("labels", [True, False])
async def test_the_caption_of_a_bark_names_dog_and_questions_are_unchanged(
    tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labels: bool
) -> None:
    bark = gcompris("LRBark_1_LA_cut.ogg")
    path = write(tmp_path / "bark.wav", scene(0.5, bark, 1.5))
    asked, events = await _instructions(tiny_model, path, monkeypatch, labels=labels)
    captions = [a for a in asked if a.endswith(PLAIN)]
    assert captions, asked
    if labels:
        named = [c for c in captions if c != PLAIN]
        assert named, captions
        for caption in named:
            assert re.fullmatch(r"Sounds heard: [a-z ]+ \(\d\.\d\d\)(, [a-z ]+ \(\d\.\d\d\))*\. "
                                + re.escape(PLAIN), caption), caption  # fmt: skip
        assert any(c.startswith("Sounds heard: dog (") for c in named), named
        assert not any("speech" in c or "silence" in c for c in named)  # ignored groups
    else:
        assert set(captions) == {PLAIN}
    # The standing question is asked as written, and answered, either way.
    assert QUESTION in asked
    answers = [e for e in events if e["kind"] == "answer" and not e["partial"]]
    assert answers and all(e["question"] == QUESTION for e in answers)
