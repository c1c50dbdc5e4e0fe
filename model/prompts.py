"""Task prompts for training and evaluation: several paraphrases per task, one picked at random
per training sample (as the official `prompts/train_prompt.json`), the first one used for
evaluation (the official `test_prompt.json` wording where there is one).

Task keys are the official ones (SALMONN.md section 7) plus ``command``, our spoken-command
intent task. ``QA`` prompts hold ``{}``, filled from the manifest's ``Q`` field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# The `command` task's first paraphrase is the agent's runtime instruction
# (`agent.intents.COMMAND_INSTRUCTION`); tests/training/test_corpus.py checks they stay equal.
COMMAND_INTENT_NAMES = (
    "move, turn, stop, dock, pick, place, lights_on, lights_off, set_temperature, question, none"
)

PROMPTS: dict[str, tuple[str, ...]] = {
    "asr": (
        "Recognize the speech and give me the transcription.",
        "Transcribe the speech.",
        "Write down exactly what the speaker says.",
        "What does the person say? Give the words only.",
        "Please transcribe this recording.",
        "Listen to the speech and write it down.",
        "Give me the transcript of the audio.",
    ),
    "audiocaption": (
        "Please describe the audio.",
        "Describe what you hear.",
        "Write a short caption for this audio.",
        "What can be heard in this recording?",
        "Caption the sounds in the audio.",
        "Briefly describe the sounds you hear.",
    ),
    "command": (
        "If the speech is a command, answer with its intent as JSON, one of: "
        + COMMAND_INTENT_NAMES
        + ', for example {"intent": "turn", "direction": "left", "angle": 90}. '
        'Otherwise answer {"intent": "none"}.',
        "Give the intent of the spoken command as JSON.",
        "Convert what the speaker asks for into an intent JSON object.",
        'What does the speaker want the robot or the house to do? Answer as JSON, or {"intent":'
        ' "none"} if nothing.',
        "Parse the spoken request into a JSON intent.",
    ),
    "QA": (
        "{}",
        "Answer the question about the audio: {}",
        "Listen to the audio and answer. {}",
    ),
    # A caption asked with the sound tagger's labels in front ("Sounds heard: dog (0.93).
    # Please describe the audio.", the agent's `sounds.caption_labels`): the manifest's ``Q``
    # is the whole instruction.
    "audiocaption_tagged": ("{}",),
    # A question asked with what the fast paths heard in front: Whisper's transcript of a
    # speech window (`with_transcript`), the tagger's instruments in music (`with_instruments`),
    # as the agent asks its standing questions: ``Q`` is the whole instruction.
    "QA_heard": ("{}",),
    "audio_story_telling": (
        "Based on the audio, write a story in detail. Your story should be highly related to "
        "the audio.",
        "Write a story inspired by what you hear.",
        "Tell a detailed story about the sounds in this recording.",
    ),
}

#: Instructions never used in training, for measuring how well the model follows new kinds of
#: instruction (the paper's task over-fitting, section 5.2).
UNSEEN_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the audio in detail, in at least three sentences.",
    "Write a short poem about what you hear.",
    "Imagine where this recording was made and explain why.",
    "How would a person feel hearing this? Explain your answer.",
    "Suggest what someone should do after hearing this, and why.",
    "Write a diary entry about the moment in this recording.",
)


def with_transcript(question: str, transcript: str) -> str:
    """``question`` with what Whisper heard in front: ``Speech heard: "Turn left." What did the
    man say?``. The LLM answers questions about what was said from Whisper's words (its own
    audio tokens carry too little of them at nano's size; BENCHMARKS.md, "nano v2"); the
    audio still answers everything else. Unchanged when nothing was heard."""
    heard = " ".join(transcript.split())
    return f'Speech heard: "{heard}" {question.strip()}' if heard else question


def with_instruments(question: str, instruments: Sequence[tuple[str, float]]) -> str:
    """``question`` with the sound tagger's best instruments in front: ``Instruments heard:
    accordion (0.62), harmonica (0.20). Which instrument family is playing?``
    (`model.sound_tagger.SoundTagger.instruments`). Unchanged when none was heard."""
    if not instruments:
        return question
    named = ", ".join(f"{name} ({score:.2f})" for name, score in instruments)
    return f"Instruments heard: {named}. {question.strip()}"


def with_sounds(question: str, heard: Sequence[tuple[str, float]]) -> str:
    """``question`` with the sound tagger's label groups heard in the window in front, best
    first: ``Sounds heard: glass (0.88), alarm (0.41). What sound can be heard?`` (underscores
    read as spaces: ``smoke alarm``). Captions are asked the same way
    (``sounds.caption_labels``). Unchanged when nothing was heard."""
    if not heard:
        return question
    named = ", ".join(f"{group.replace('_', ' ')} ({score:.2f})" for group, score in heard)
    return f"Sounds heard: {named}. {question.strip()}"


def eval_prompt(task: str, question: str = "") -> str:
    """The fixed instruction for evaluating a task (its first paraphrase).

    Args:
        task: an official task key, e.g. ``"asr"``.
        question: for ``QA``, the manifest's ``Q``.

    Raises:
        KeyError: unknown task.
    """
    return _fill(PROMPTS[task][0], question)


def sample_prompt(task: str, rng: np.random.Generator, question: str = "") -> str:
    """A random paraphrase for one training sample.

    Args:
        task: an official task key.
        rng: the random source (deterministic per sample in training).
        question: for ``QA``, the manifest's ``Q``.

    Raises:
        KeyError: unknown task.
    """
    options = PROMPTS[task]
    return _fill(options[int(rng.integers(len(options)))], question)


def _fill(template: str, question: str) -> str:
    return template.replace("{}", question.strip()) if "{}" in template else template
