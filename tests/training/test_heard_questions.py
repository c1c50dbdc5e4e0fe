"""Questions asked with what the fast paths heard in front, in training and in the test QA
(`training.recipe.heard_questions`, `Heard`, `whisper_heard`, `tagger_instruments`,
`tagger_sounds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.prompts import sample_prompt, with_transcript
from training.recipe import Heard, heard_questions, speech_clips, whisper_heard
from training.train import Sample


def _samples() -> list[Sample]:
    said, quiet = Path("/c/said.wav"), Path("/c/quiet.wav")
    return [
        Sample(said, "Turn left", "asr"),
        Sample(said, "Turn left.", "QA", "What did the speaker say?"),
        Sample(said, "Yes.", "QA", "Is anyone speaking?"),
        Sample(said, "A man speaks.", "audiocaption"),
        Sample(quiet, "No.", "QA", "Is anyone speaking?"),
    ]


def test_every_question_about_a_heard_clip_gets_its_transcript() -> None:
    samples = _samples()
    heard = Heard(transcripts={"/c/said.wav": "Turn left."})
    out = heard_questions(samples, heard, 1.0)
    assert [s.task for s in out] == [
        "asr",
        "QA_heard",
        "QA_heard",
        "audiocaption",
        "QA",
    ]
    assert out[1].question == 'Speech heard: "Turn left." What did the speaker say?'
    assert [s.text for s in out] == [s.text for s in samples]  # the answers stay
    # The trainer asks the whole instruction, as the agent does.
    rng = np.random.default_rng(0)
    assert sample_prompt(out[1].task, rng, out[1].question) == out[1].question
    assert heard_questions(samples, heard, 0.0) == samples
    assert heard_questions(samples, Heard(), 1.0) == samples


def test_a_share_of_the_questions_is_chosen_the_same_way_each_time() -> None:
    said = [Sample(Path(f"/c/{i}.wav"), "Yes.", "QA", "Is anyone speaking?") for i in range(400)]
    heard = Heard(transcripts={str(s.path): "hello" for s in said})
    first = heard_questions(said, heard, 0.7, seed=3)
    share = sum(s.task == "QA_heard" for s in first) / len(said)
    assert 0.6 < share < 0.8
    assert first == heard_questions(said, heard, 0.7, seed=3)
    assert first != heard_questions(said, heard, 0.7, seed=4)


def test_music_questions_get_the_instruments_and_a_sung_one_the_words_too() -> None:
    played, sung = Path("/c/played.wav"), Path("/c/sung.wav")
    heard = Heard(
        transcripts={str(sung): "La la."},
        instruments={
            str(played): [("accordion", 0.62), ("harmonica", 0.2)],
            str(sung): [("piano", 0.5)],
        },
    )
    q = "Which instrument family is playing?"
    assert heard.question(Sample(played, "x", "QA", q), q) == (
        "Instruments heard: accordion (0.62), harmonica (0.20). " + q
    )
    assert heard.question(Sample(sung, "x", "QA", q), q) == (
        'Speech heard: "La la." Instruments heard: piano (0.50). ' + q
    )
    assert heard.question(Sample(Path("/c/other.wav"), "x", "QA", q), q) is None


def test_a_clip_without_speech_is_asked_with_the_sound_groups_instead() -> None:
    said, barked = Path("/c/said.wav"), Path("/c/dog.wav")
    heard = Heard(
        transcripts={str(said): "Sit."},
        instruments={str(barked): [("piano", 0.5)]},
        sounds={str(said): [("dog", 0.9)], str(barked): [("dog", 0.8), ("smoke_alarm", 0.3)]},
    )
    q = "What sound can be heard?"
    # Where there is speech the transcript goes in front, as the agent asks a speech window's.
    assert heard.question(Sample(said, "x", "QA", q), q) == 'Speech heard: "Sit." ' + q
    assert heard.question(Sample(barked, "x", "QA", q), q) == (
        "Sounds heard: dog (0.80), smoke alarm (0.30). Instruments heard: piano (0.50). " + q
    )
    assert Heard(sounds={str(barked): [("dog", 0.8)]})


class _Whisper:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def transcribe_with_whisper(self, audio: list[Any]) -> list[str]:
        self.calls.append(len(audio))
        return [f" heard {a.size} " for a in audio]


def test_whisper_hears_each_speech_clip_once_and_keeps_it(tmp_path: Path) -> None:
    import soundfile

    clips = []
    for i, n in enumerate((1600, 3200, 4800)):
        path = tmp_path / f"{i}.wav"
        soundfile.write(path, np.zeros(n, np.float32), 16000, subtype="PCM_16")
        clips += [Sample(path, "x", "asr"), Sample(path, "Yes.", "QA", "Is anyone speaking?")]
    model = _Whisper()
    spoken = speech_clips(clips)
    assert len(spoken) == 3
    cache = tmp_path / "heard.json"
    heard = whisper_heard(model, spoken, cache, batch_size=2)  # type: ignore[arg-type]
    assert heard == {
        str(tmp_path / f"{i}.wav"): f"heard {n}" for i, n in enumerate((1600, 3200, 4800))
    }
    assert model.calls == [2, 1]
    # Read back from the file: nothing is transcribed again.
    assert whisper_heard(model, spoken[:2], cache) == dict(list(heard.items())[:2])  # type: ignore[arg-type]
    assert model.calls == [2, 1]
    assert with_transcript("Q?", heard[str(tmp_path / "0.wav")]) == 'Speech heard: "heard 1600" Q?'
