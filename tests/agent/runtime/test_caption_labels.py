"""`sounds.caption_labels`: the caption instruction names what the tagger heard in the window
(`SoundsConfig.caption_prompt`, `StreamSounds.heard`); standing questions are asked as
written. `sounds.caption`: a sound window the tagger named gets its sound event and no LLM
caption under "unnamed". The tiny model, the real YAMNet tagger and a real GCompris bark."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.config import SoundsConfig
from agent.runtime.app import Agent
from agent.runtime.pipeline import StreamSounds
from agent.runtime.sound_events import tracker_config
from agent.runtime.worker import PatchTags, TagResult
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
    tiny_model: Any,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    labels: bool,
    caption: str = "always",
    realtime: bool = True,
    **sections: Any,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every LLM instruction the worker asked, and the events, for one file (paced in real
    time: the live patches' answers are in before the segment ends, as on a microphone)."""
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
                "realtime": realtime,
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
        sounds={"enabled": True, "caption_labels": labels, "caption": caption},
        **sections,
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
    # The standing question is asked, and answered, either way: as written in the windows the
    # detector takes for speech (tiny-random's Whisper writes no transcript to put in front).
    assert QUESTION in asked
    answers = [e for e in events if e["kind"] == "answer" and not e["partial"]]
    assert answers and all(e["question"] == QUESTION for e in answers)


def _segments(events: list[dict[str, Any]]) -> list[str]:
    return [e["detail"]["segment"] for e in events if e.get("status") == "segment_ended"]


@pytest.mark.parametrize("caption", ["unnamed", "always", "never"])
async def test_a_named_bark_is_captioned_only_under_always(
    tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caption: str
) -> None:
    """The bark as a sound segment (the segmenter in sound mode: its detector takes this bark
    for speech), not paced: under "unnamed" the window waits for the tagger's answers, which
    name the dog, so its caption is left to the sound event."""
    bark = gcompris("LRBark_1_LA_cut.ogg")
    path = write(tmp_path / "bark.wav", scene(0.5, bark, 1.5))
    asked, events = await _instructions(
        tiny_model,
        path,
        monkeypatch,
        labels=True,
        caption=caption,
        realtime=False,
        vad={"mode": "sound"},
    )
    assert _segments(events) == ["sound"]
    dog = [e for e in events if e["kind"] == "sound" and e["group"] == "dog"]
    assert [e["state"] for e in dog] == ["start", "end"]  # the sound event, in every mode
    captions = [a for a in asked if a.endswith(PLAIN)]
    assert len(captions) == (1 if caption == "always" else 0), asked
    assert not [e for e in events if e["kind"] == "caption"] or caption == "always"
    # The standing question either way, with the groups the tagger heard in the sound window
    # in front (`[[questions]] heard`).
    assert any(a.startswith("Sounds heard: dog (") and a.endswith(QUESTION) for a in asked), asked


async def test_a_sound_the_tagger_cannot_name_still_gets_its_caption(
    tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brown noise: YAMNet's best group is under every start threshold (wind about 0.3), so
    no sound event, and under "unnamed" the LLM captions it."""
    rng = np.random.default_rng(0)
    rumble = (0.3 * np.cumsum(rng.standard_normal(24_000)) / 200).astype(np.float32)
    path = write(tmp_path / "rumble.wav", scene(0.5, rumble, 1.5))
    asked, events = await _instructions(
        tiny_model,
        path,
        monkeypatch,
        labels=True,
        caption="unnamed",
        realtime=False,
        vad={"mode": "sound"},
    )
    assert _segments(events) == ["sound"]
    assert not [e for e in events if e["kind"] == "sound"]
    assert len([a for a in asked if a.endswith(PLAIN)]) == 1, asked
    assert [e for e in events if e["kind"] == "caption" and not e["partial"]]


class _HeldTagging:
    """A `SoundTagging` whose answers come only when the test gives them."""

    def __init__(self) -> None:
        self.sound_tagger = SimpleNamespace(
            config=SimpleNamespace(patch_samples=15_360, patch_hop_samples=7_680)
        )
        self.held: list[Callable[[TagResult], None]] = []

    def submit_tags(self, clips: Any, on_done: Callable[[TagResult], None]) -> None:
        self.held.append(on_done)


def _answer(*patches: dict[str, float]) -> TagResult:
    """One clip's answer: a patch per ``groups``, at YAMNet's 0.48 s hop."""
    tags = tuple(
        PatchTags(i * 0.48, i * 0.48 + 0.96, groups, ()) for i, groups in enumerate(patches)
    )
    return TagResult(clips=(tags,), model_start=0.0)


def test_a_window_decides_its_caption_once_the_tagger_has_answered() -> None:
    """`StreamSounds.after_answers` holds the caption decision until the clips handed to the
    tagger are answered; `named` counts a group at its start threshold on as many patches as
    a sound event needs (`min_patches`, 2), never an ignored group."""
    tagging = _HeldTagging()
    config = SoundsConfig()
    events = SimpleNamespace(emit_sound=lambda *a: None, emit_status=lambda *a, **k: None)
    sounds = StreamSounds(
        events,  # type: ignore[arg-type]
        "yard",
        tagging,
        config,
        tracker_config(config),
        background=False,
        on_idle=lambda: None,
    )
    decided: list[bool] = []
    sounds.window("sound", 0, np.zeros(24_000, np.float32), 0.0)
    sounds.window("sound", 80_000, np.zeros(24_000, np.float32), 0.0)  # at 5 s
    sounds.window("sound", 160_000, np.zeros(24_000, np.float32), 0.0)  # at 10 s
    sounds.after_answers(lambda: decided.append(sounds.named(0.0, 1.5)))
    # Speech is ignored; animal starts at 0.7.
    tagging.held[0](_answer({"speech": 0.99, "animal": 0.6}, {"speech": 0.99, "animal": 0.6}))
    tagging.held[1](_answer({"dog": 0.9}, {"dog": 0.8}))
    assert decided == []  # the third clip is still out
    tagging.held[2](_answer({"dog": 0.9}, {"dog": 0.2}))
    assert decided == [False]
    assert sounds.named(5.0, 6.5)  # two patches at dog's threshold: its event starts
    assert not sounds.named(10.0, 11.5)  # one: no event, so the caption stays
    sounds.after_answers(lambda: decided.append(True))  # nothing out: at once
    assert decided == [False, True]
