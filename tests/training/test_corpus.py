"""The synthetic corpus: official manifests, every sound class, held-out voices and phrases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile

from agent.intents import COMMAND_INSTRUCTION, validate_intent
from model.prompts import PROMPTS, eval_prompt
from training.corpus import (
    SOUND_CAPTIONS,
    SOUND_EVENT_NAMES,
    VOICES,
    all_phrases,
    make_specs,
    number_words,
    phrases_by_split,
    sound_classes_named,
    synthesize_corpus,
)
from training.scenes import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(root, size="tiny", seed=3, workers=2)
    return root


def _entries(root: Path, name: str) -> list[dict[str, str]]:
    data = json.loads((root / f"{name}.json").read_text())
    assert list(data) == ["annotation"]
    return data["annotation"]


def test_manifests_are_official_and_point_at_16k_wavs(corpus: Path) -> None:
    for name in ("train", "pretrain", "dev", "test"):
        entries = _entries(corpus, name)
        assert entries, name
        for entry in entries:
            assert set(entry) <= {"path", "text", "task", "Q"}
            assert entry["task"] in PROMPTS
            assert isinstance(entry["text"], str) and entry["text"]
            assert ("Q" in entry) == (entry["task"] == "QA")
    for entry in _entries(corpus, "test")[:5]:
        info = soundfile.info(str(corpus / entry["path"]))
        assert info.samplerate == 16000 and info.channels == 1
        assert 0.5 < info.duration < 10
    assert {e["task"] for e in _entries(corpus, "pretrain")} == {"asr", "audiocaption"}


def test_every_sound_class_is_captioned_in_train_and_test(corpus: Path) -> None:
    for split in ("train", "test"):
        named = set()
        for entry in _entries(corpus, split):
            if entry["task"] == "audiocaption":
                named |= sound_classes_named(entry["text"])
        assert named == set(SOUND_EVENT_NAMES), split


def test_test_voices_and_phrases_are_held_out(corpus: Path) -> None:
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["voices"]["test"] and meta["phrases"]["test"]
    assert not set(meta["voices"]["test"]) & set(meta["voices"]["train"])
    assert not set(meta["phrases"]["test"]) & set(meta["phrases"]["train"])
    train_text = {e["text"].lower() for e in _entries(corpus, "train") if e["task"] == "asr"}
    test_text = {e["text"].lower() for e in _entries(corpus, "test") if e["task"] == "asr"}
    assert test_text and not test_text & train_text
    # Held out by construction too, for every phrase the generator can produce.
    splits = phrases_by_split()
    texts = {s: {p.text for d in splits[s].values() for p in d} for s in splits}
    assert not texts["test"] & texts["train"] and not texts["dev"] & texts["train"]
    assert sum(len(t) for t in texts.values()) == len({p.text for p in all_phrases()})
    assert not set(VOICES["test"]) & set(VOICES["train"])


def test_command_targets_are_schema_intents(corpus: Path) -> None:
    intents = set()
    for entry in _entries(corpus, "train") + _entries(corpus, "test"):
        if entry["task"] == "command":
            decoded = json.loads(entry["text"])
            assert validate_intent(decoded) == decoded
            intents.add(decoded["intent"])
    assert {"move", "turn", "pick", "place"} & intents


def test_every_intent_and_domain_is_in_the_test_split() -> None:
    test = phrases_by_split()["test"]
    assert set(test) == {"robot", "home", "question", "sentence"}
    intents = {p.intent["intent"] for phrases in test.values() for p in phrases}
    expected = {"move", "turn", "stop", "dock", "pick", "place", "lights_on", "lights_off"}
    assert expected | {"set_temperature", "question", "none"} <= intents


def test_specs_are_deterministic() -> None:
    assert make_specs("tiny", 1) == make_specs("tiny", 1)
    assert make_specs("tiny", 1) != make_specs("tiny", 2)


def test_caption_templates_name_exactly_their_class() -> None:
    for name, captions in SOUND_CAPTIONS.items():
        for caption in captions:
            assert sound_classes_named(caption) == {name}, caption
    assert sound_classes_named("A man speaks.") == set()


def test_command_prompt_is_the_agents_instruction() -> None:
    assert eval_prompt("command") == COMMAND_INSTRUCTION


@pytest.mark.parametrize(
    ("n", "words"),
    [(0, "zero"), (7, "seven"), (19, "nineteen"), (40, "forty"), (45, "forty five"),
     (180, "one hundred eighty")],
)  # fmt: skip
def test_number_words(n: int, words: str) -> None:
    assert number_words(n) == words
