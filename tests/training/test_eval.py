"""Scoring (WER, intent exact match, caption class, following) and `salmonn-live eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from agent.cli import main
from training.scoring import (
    corpus_wer,
    follows_instruction,
    intent_correct,
    report,
    score_item,
    word_errors,
)


@pytest.mark.parametrize(
    ("ref", "hyp", "errors"),
    [
        ("turn left and stop", "Turn left, and stop.", 0),  # case and punctuation ignored
        ("turn left and stop", "turn right and stop", 1),  # substitution
        ("turn left and stop", "turn left stop", 1),  # deletion
        ("turn left and stop", "please turn left and stop", 1),  # insertion
        ("turn left and stop", "", 4),
        ("", "hello", 1),
        ("a b c d", "b c d e", 2),
        ("move forward two meters", "Move forward 2 meters.", 0),  # Whisper writes digits
        ("turn left forty five degrees", "turn left 45 degrees", 0),
    ],
)
def test_word_errors(ref: str, hyp: str, errors: int) -> None:
    assert word_errors(ref, hyp)[0] == errors


def test_corpus_wer_weights_by_reference_words() -> None:
    assert corpus_wer(["a b c d", "e f"], ["a b c d", "x"]) == pytest.approx(2 / 6)
    assert corpus_wer([], []) is None


def test_intent_exact_match_parses_both_sides() -> None:
    expected = '{"intent": "move", "direction": "forward", "distance": 2}'
    assert intent_correct(expected, '{"direction": "forward", "intent": "move", "distance": 2.0}')
    assert intent_correct(
        expected, 'Sure! {"intent": "move", "direction": "Forward", "distance": 2}'
    )
    assert not intent_correct(expected, '{"intent": "move", "direction": "forward"}')
    assert not intent_correct(expected, '{"intent": "move", "direction": "forward", "distance": 3}')
    # Garbage is wrong, never read as the "none" intent.
    assert not intent_correct('{"intent": "none"}', "I do not know")
    assert intent_correct('{"intent": "none"}', '{"intent": "none"}')
    with pytest.raises(ValueError, match="not an intent"):
        intent_correct("move forward", "{}")


def _fake_predictor(item: dict[str, str]) -> str:
    """Hand-written answers: right for the first of each task, wrong for the second."""
    return {
        "a.wav": "turn left and stop",
        "b.wav": "turn right and stop now",
        "c.wav": '{"intent": "stop"}',
        "d.wav": '{"intent": "dock"}',
        "e.wav": "A siren is wailing in the street.",
        "f.wav": "A doorbell rings and water runs.",
    }[item["path"]]


HAND_MADE = [
    {"path": "a.wav", "task": "asr", "text": "Turn left and stop"},
    {"path": "b.wav", "task": "asr", "text": "Turn left and stop"},
    {"path": "c.wav", "task": "command", "text": '{"intent": "stop"}'},
    {"path": "d.wav", "task": "command", "text": '{"intent": "stop"}'},
    {"path": "e.wav", "task": "audiocaption", "text": "A siren wails."},
    {"path": "f.wav", "task": "audiocaption", "text": "A doorbell chimes."},
]


def test_report_scores_a_hand_made_manifest() -> None:
    items = [score_item(e["path"], e["task"], e["text"], _fake_predictor(e)) for e in HAND_MADE]
    result = report(items)
    assert list(result) == ["wer", "intent_accuracy", "sound_accuracy", "count", "items"]
    assert result["wer"] == pytest.approx(2 / 8)  # "left"->"right" and "now" inserted
    assert result["intent_accuracy"] == 0.5
    assert result["sound_accuracy"] == 0.5  # the second also names running water
    assert result["count"] == {"asr": 2, "command": 2, "audiocaption": 2}
    assert [i["correct"] for i in result["items"]] == [True, False, True, False, True, False]
    assert set(result["items"][0]) == {"path", "task", "expected", "predicted", "correct"}


def test_report_without_a_task_gives_none() -> None:
    result = report([score_item("a.wav", "asr", "stop", "stop")])
    assert result["wer"] == 0.0
    assert result["intent_accuracy"] is None and result["sound_accuracy"] is None


def test_follows_instruction_heuristic() -> None:
    transcript = ["Turn on the lights in the kitchen"]
    story = (
        "Late in the evening a tired woman came home, dropped her bags by the door and asked "
        "her little robot to brighten the kitchen before she started cooking dinner."
    )
    assert follows_instruction(story, transcript)
    assert not follows_instruction("Turn on the lights in the kitchen.", transcript)  # transcript
    assert not follows_instruction("A siren wails.", transcript)  # too short
    assert not follows_instruction('{"intent": "lights_on", "room": "kitchen"}', transcript)
    assert not follows_instruction("the the the the the the the the the the the the", transcript)


def test_eval_cli_on_tiny_random(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        soundfile.write(
            tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000
        )
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "annotation": [
                    {"path": "a.wav", "task": "QA", "text": "Yes.", "Q": "Is it loud?"},
                    {"path": "a.wav", "task": "asr", "text": "turn left"},
                    {"path": "b.wav", "task": "command", "text": '{"intent": "stop"}'},
                    {"path": "b.wav", "task": "audiocaption", "text": "A siren."},
                ]
            }
        )
    )
    code = main(
        ["eval", "--model", "tiny-random", "--manifest", str(manifest), "--json", "--limit", "2",
         "--transcript", "llm", "--command", "llm", "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["wer", "intent_accuracy", "sound_accuracy", "count", "items"]
    assert result["count"] == {"asr": 1, "command": 1, "audiocaption": 0}  # QA is not scored
    assert result["sound_accuracy"] is None
    assert [i["path"] for i in result["items"]] == ["a.wav", "b.wav"]
    assert result["wer"] >= 0 and result["items"][1]["correct"] is False  # random weights


def test_eval_scores_the_agents_whisper_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default (as `run`'s): asr entries are Whisper's transcripts and commands the
    grammar's reading of them, one transcription per clip."""
    from model.salmonn import Salmonn

    heard = {16000: "Turn left.", 8000: "Stop!"}  # told apart by their lengths
    calls: list[int] = []

    def fake_whisper(self: Salmonn, audio: list[np.ndarray], **_: object) -> list[str]:
        calls.extend(a.size for a in audio)
        return [heard[a.size] for a in audio]

    monkeypatch.setattr(Salmonn, "transcribe_with_whisper", fake_whisper)
    for name, samples in (("a", 16000), ("b", 8000)):
        soundfile.write(tmp_path / f"{name}.wav", np.zeros(samples, np.float32), 16000)
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "annotation": [
                    {"path": "a.wav", "task": "asr", "text": "turn left"},
                    {"path": "a.wav", "task": "command", "text": '{"intent": "stop"}'},
                    {"path": "b.wav", "task": "command", "text": '{"intent": "stop"}'},
                ]
            }
        )
    )
    code = main(
        ["eval", "--model", "tiny-random", "--manifest", str(manifest), "--json",
         "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["wer"] == 0.0
    assert [i["correct"] for i in result["items"]] == [True, False, True]
    assert json.loads(result["items"][2]["predicted"]) == {"intent": "stop"}
    assert sorted(calls) == [8000, 16000]  # each clip heard once, also for Whisper's own WER


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], None), (["--checkpoint", "/some/parts"], "/some/parts")],
)
def test_recipe_starts_from_fresh_parts_not_the_shipped_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], expected: str | None
) -> None:
    """`train --recipe nano` must reproduce model/nano/, so it may not start from it."""
    import training.recipe
    from model.presets import NANO_DIR, resolve_model
    from model.salmonn import Salmonn

    assert resolve_model("nano").checkpoint == str(NANO_DIR)  # what every other command loads
    loaded: list = []
    monkeypatch.setattr(Salmonn, "from_config", classmethod(lambda cls, c, **k: loaded.append(c)))
    no_recipe = {"timings_s": {}, "test": {}}
    monkeypatch.setattr(training.recipe, "run_recipe", lambda *a, **k: no_recipe)
    assert main(["train", "--recipe", "nano", "--out", str(tmp_path), *extra]) == 0
    assert [c.name for c in loaded] == ["nano"]
    assert loaded[0].checkpoint == expected
