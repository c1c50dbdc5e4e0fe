"""Scoring model answers (pure text, no model): WER for ``asr``, intent exact match for
``command``, the sound class named in the caption for ``audiocaption``, and the
instruction-following heuristic used to measure the paper's task over-fitting.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from agent.intents import validate_intent
from training.corpus import number_words
from training.corpus_v2 import sound_classes_named

logger = logging.getLogger(__name__)

SCORED_TASKS = ("asr", "command", "audiocaption")

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_OBJECT_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation: ``"Turn left, now!"`` -> ``["turn", "left",
    "now"]``. Apostrophes inside words are kept (``"don't"``); whole numbers under 1000 are
    spelled out (``"2"`` -> ``"two"``), so Whisper's digits match the corpus's number words."""
    words: list[str] = []
    for word in _WORD_RE.findall(text.lower()):
        if word.isdigit() and len(word) <= 3:
            words += number_words(int(word)).split()
        else:
            words.append(word)
    return words


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level Levenshtein distance (substitutions + deletions + insertions) after
    `normalize_words`, and the reference's word count.

    Returns:
        ``(errors, reference_words)``.
    """
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (ref_word != hyp_word),  # substitution or match
            )
        previous = current
    return previous[-1], len(ref)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float | None:
    """Total word errors over total reference words (None for no references)."""
    errors = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        e, n = word_errors(ref, hyp)
        errors, words = errors + e, words + n
    return errors / words if words else None


def read_intent(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` that is a valid intent, normalised by
    `agent.intents.validate_intent`; None when there is none (an unparseable answer is
    wrong, never read as ``{"intent": "none"}``)."""
    for match in _OBJECT_RE.finditer(text):
        try:
            intent = validate_intent(json.loads(match.group(0)))
        except ValueError:
            continue
        if intent is not None:
            return intent
    return None


def intent_correct(expected: str, predicted: str) -> bool:
    """Exact match of the intent JSON: both parsed and compared as dicts."""
    want = read_intent(expected)
    if want is None:
        raise ValueError(f"expected text is not an intent JSON object: {expected!r}")
    return read_intent(predicted) == want


def caption_correct(expected: str, predicted: str) -> bool:
    """The caption names exactly the sound classes the expected caption names."""
    return sound_classes_named(predicted) == sound_classes_named(expected)


@dataclass(frozen=True)
class ScoredItem:
    """One scored answer (the `items` of the eval JSON)."""

    path: str
    task: str
    expected: str
    predicted: str
    correct: bool


def score_item(path: str, task: str, expected: str, predicted: str) -> ScoredItem:
    """Score one answer; for ``asr``, ``correct`` means no word error.

    Raises:
        ValueError: a task other than ``asr``, ``command``, ``audiocaption``.
    """
    if task == "asr":
        correct = word_errors(expected, predicted)[0] == 0
    elif task == "command":
        correct = intent_correct(expected, predicted)
    elif task == "audiocaption":
        correct = caption_correct(expected, predicted)
    else:
        raise ValueError(f"cannot score task {task!r}; scored tasks: {SCORED_TASKS}")
    return ScoredItem(path, task, expected, predicted, correct)


def report(items: list[ScoredItem]) -> dict[str, Any]:
    """The eval JSON: ``{"wer", "intent_accuracy", "sound_accuracy", "count": {"asr",
    "command", "audiocaption"}, "items": [...]}``; a figure is None when its task has no item."""
    by_task: dict[str, list[ScoredItem]] = {
        t: [i for i in items if i.task == t] for t in SCORED_TASKS
    }

    def accuracy(task: str) -> float | None:
        rows = by_task[task]
        return sum(i.correct for i in rows) / len(rows) if rows else None

    asr = by_task["asr"]
    return {
        "wer": corpus_wer([i.expected for i in asr], [i.predicted for i in asr]),
        "intent_accuracy": accuracy("command"),
        "sound_accuracy": accuracy("audiocaption"),
        "count": {task: len(rows) for task, rows in by_task.items()},
        "items": [asdict(i) for i in items],
    }


def per_class(items: list[ScoredItem]) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per expected intent (``command``) and per expected sound class
    (``audiocaption``).

    Returns:
        ``{"command": {intent: {"n", "accuracy"}}, "audiocaption": {class: {...}}}``.
    """
    totals: dict[str, Counter[str]] = {"command": Counter(), "audiocaption": Counter()}
    rights: dict[str, Counter[str]] = {"command": Counter(), "audiocaption": Counter()}
    for item in items:
        if item.task == "command":
            intent = read_intent(item.expected)
            label = intent["intent"] if intent else "?"
        elif item.task == "audiocaption":
            label = ",".join(sorted(sound_classes_named(item.expected))) or "(speech only)"
        else:
            continue
        totals[item.task][label] += 1
        rights[item.task][label] += item.correct
    return {
        task: {
            label: {"n": n, "accuracy": rights[task][label] / n}
            for label, n in sorted(counter.items())
        }
        for task, counter in totals.items()
    }


def speech_engine(path: str) -> str:
    """Which text-to-speech engine spoke a corpus v2 clip, by its name (``*-piper.wav``,
    ``*-espeak.wav``); ``other`` for any other file."""
    for engine in ("piper", "espeak"):
        if path.endswith(f"-{engine}.wav"):
            return engine
    return "other"


def by_speech_engine(items: list[ScoredItem]) -> dict[str, dict[str, Any]]:
    """Transcript WER and intent accuracy per `speech_engine` (Piper's one voice is in every
    split; the espeak-ng test voices are held out, so the two are reported apart).

    Returns:
        ``{engine: {"wer", "intent_accuracy", "count": {"asr", "command"}}}``.
    """
    engines = sorted({speech_engine(i.path) for i in items if i.task in ("asr", "command")})
    out: dict[str, dict[str, Any]] = {}
    for engine in engines:
        mine = [i for i in items if speech_engine(i.path) == engine]
        full = report(mine)
        out[engine] = {
            "wer": full["wer"],
            "intent_accuracy": full["intent_accuracy"],
            "count": {t: full["count"][t] for t in ("asr", "command")},
        }
    return out


# -- questions about the audio (corpus v2's QA) -----------------------------------------------

_ARTICLES = {"a", "an", "the"}
_SAID = re.compile(r"^what did the \w+ say\b.*$")


def qa_correct(expected: str, predicted: str) -> bool:
    """A QA answer is right when it gives the reference's words: the first word for a yes/no
    reference ("Yes." against "Yes, there is."), otherwise all of them, in order, ignoring
    case, punctuation and articles ("A man." against "man")."""
    want = normalize_words(expected)
    got = normalize_words(predicted)
    if want in (["yes"], ["no"]):
        return got[:1] == want
    return [w for w in got if w not in _ARTICLES] == [w for w in want if w not in _ARTICLES]


def qa_question_kind(question: str) -> tuple[str, str]:
    """What a corpus v2 question asks about, and its template: ``("speech", "What did the ...
    say ...?")``, ``("music", "Is there music?")``, ``("sound", "What sound can be heard ...?")``.

    Questions about what was said and who said it are ``speech`` even over music.
    """
    q = question.strip()
    low = q.lower()
    if _SAID.match(low):
        return "speech", "What did the ... say ...?"
    if low.startswith("what sound"):
        return "sound", "What sound can be heard ...?"
    if any(w in low for w in ("music", "instrument", "piece")):
        return "music", q
    return "speech", q


def qa_report(questions: list[str], items: list[ScoredItem]) -> dict[str, Any]:
    """Accuracy over QA answers, per kind (`qa_question_kind`) and per question template;
    and, for the sound questions, the share of answers naming the reference's sound class
    (`sound_classes_named`: "A frog is croaking." names "Frogs croaking during a storm."),
    since `qa_correct` wants the held-out recording's own words.

    Returns:
        ``{"accuracy", "n", "per_kind": {kind: {"n", "accuracy"}}, "per_question": {...},
        "sound_named": {"n", "accuracy"}, "items": [...]}``.
    """
    groups: dict[str, dict[str, list[bool]]] = {"per_kind": {}, "per_question": {}}
    named: list[bool] = []
    for question, item in zip(questions, items, strict=True):
        kind, template = qa_question_kind(question)
        groups["per_kind"].setdefault(kind, []).append(item.correct)
        groups["per_question"].setdefault(template, []).append(item.correct)
        if kind == "sound":
            want = sound_classes_named(item.expected)
            named.append(bool(want & sound_classes_named(item.predicted)))
    out: dict[str, Any] = {
        "accuracy": sum(i.correct for i in items) / len(items) if items else None,
        "n": len(items),
        "sound_named": {"n": len(named), "accuracy": sum(named) / len(named) if named else None},
    }
    for name, by in groups.items():
        out[name] = {
            key: {"n": len(rights), "accuracy": sum(rights) / len(rights)}
            for key, rights in sorted(by.items())
        }
    out["items"] = [{**asdict(i), "question": q} for q, i in zip(questions, items, strict=True)]
    return out


# -- instruction following ---------------------------------------------------------------------

FOLLOW_MIN_WORDS = 12
FOLLOW_MAX_OVERLAP = 0.6
FOLLOW_MIN_DISTINCT = 0.3


def follows_instruction(answer: str, references: list[str]) -> bool:
    """Whether an answer to an open instruction (a story, a poem, a detailed description)
    actually follows it rather than falling back on a trained task.

    The heuristic (documented in docs/training.md): the answer has at least
    `FOLLOW_MIN_WORDS` words; it is not an intent JSON object; it is not a transcript or a
    caption (at most `FOLLOW_MAX_OVERLAP` of its words occur in the clip's transcript and
    caption); and it is not a repetition loop (at least `FOLLOW_MIN_DISTINCT` of its words are
    distinct).

    Args:
        answer: the model's answer.
        references: the clip's transcript and/or caption.
    """
    words = normalize_words(answer)
    if len(words) < FOLLOW_MIN_WORDS or read_intent(answer) is not None:
        return False
    if len(set(words)) / len(words) < FOLLOW_MIN_DISTINCT:
        return False
    known = {w for ref in references for w in normalize_words(ref)}
    overlap = sum(w in known for w in words) / len(words)
    return overlap <= FOLLOW_MAX_OVERLAP
