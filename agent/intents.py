"""Command intents: the fixed JSON schema of spoken commands, and a lenient parser for LLM answers.

An intent is a flat JSON object ``{"intent": NAME, ...slots}`` (see ``docs/intents.md``). The
schema is shared with training (issue 7): the ``command`` task's target text is
:func:`format_intent` of the expected intent.

Until the model is trained the LLM's answer may be anything, so :func:`parse_intent` never
raises: it finds the first JSON object in the answer, keeps the known intent and its known
slots with the right types, and falls back to ``{"intent": "none"}``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One slot of an intent.

    Attributes:
        name: The JSON key.
        kind: ``"str"`` or ``"number"``.
        choices: For strings, the allowed values (None: any text).
    """

    name: str
    kind: str = "str"
    choices: tuple[str, ...] | None = None


DIRECTIONS = ("forward", "backward", "left", "right")
TURN_DIRECTIONS = ("left", "right", "around")

#: Every intent and its slots. Slots are optional: a missing slot means "not said".
INTENTS: dict[str, tuple[Slot, ...]] = {
    "move": (Slot("direction", choices=DIRECTIONS), Slot("distance", "number")),  # metres
    "turn": (Slot("direction", choices=TURN_DIRECTIONS), Slot("angle", "number")),  # degrees
    "stop": (),
    "dock": (),
    "pick": (Slot("object"),),
    "place": (Slot("object"), Slot("location")),
    "lights_on": (Slot("room"),),
    "lights_off": (Slot("room"),),
    "set_temperature": (Slot("room"), Slot("value", "number")),  # degrees Celsius
    "question": (Slot("text"),),
    "none": (),
}

NONE_INTENT: dict[str, Any] = {"intent": "none"}

#: The instruction that asks the model for an intent (the `command` task's default prompt).
COMMAND_INSTRUCTION = (
    "If the speech is a command, answer with its intent as JSON, one of: "
    + ", ".join(INTENTS)
    + ', for example {"intent": "turn", "direction": "left", "angle": 90}. '
    'Otherwise answer {"intent": "none"}.'
)

_OBJECT_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)


def _slot_value(slot: Slot, value: Any) -> Any:
    """The slot's value normalised, or None when it does not fit the slot."""
    if slot.kind == "number":
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return None
            return int(number) if number.is_integer() else number
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    text = str(value).strip().lower() if slot.choices else str(value).strip()
    if not text:
        return None
    if slot.choices is not None and text not in slot.choices:
        return None
    return text


def validate_intent(candidate: Any) -> dict[str, Any] | None:
    """A clean intent from a decoded JSON value, or None when it is not an intent.

    The intent name is matched case-insensitively (``"lights off"`` and ``"lights-off"`` are
    read as ``lights_off``); unknown slots and slots of the wrong type are dropped.

    Args:
        candidate: Any decoded JSON value.

    Returns:
        ``{"intent": name, **slots}`` with slots in schema order, or None.
    """
    if not isinstance(candidate, dict):
        return None
    name = candidate.get("intent")
    if not isinstance(name, str):
        return None
    name = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if name not in INTENTS:
        return None
    out: dict[str, Any] = {"intent": name}
    for slot in INTENTS[name]:
        if slot.name in candidate:
            value = _slot_value(slot, candidate[slot.name])
            if value is not None:
                out[slot.name] = value
    return out


def parse_intent(answer: str) -> dict[str, Any]:
    """Read an intent from a model answer, leniently; never raises.

    Args:
        answer: The model's text, e.g. ``'Sure: {"intent": "stop"}'``.

    Returns:
        The first valid intent found in the answer's JSON objects, else ``{"intent": "none"}``.
    """
    for match in _OBJECT_RE.finditer(answer):
        try:
            decoded = json.loads(match.group(0))
        except ValueError:
            continue
        intent = validate_intent(decoded)
        if intent is not None:
            return intent
    logger.debug("no intent in answer %r", answer[:200])
    return dict(NONE_INTENT)


def format_intent(intent: dict[str, Any]) -> str:
    """The canonical JSON text of an intent (compact, schema order): training targets use it.

    Raises:
        ValueError: ``intent`` is not a valid intent.
    """
    clean = validate_intent(intent)
    if clean is None or clean != intent:
        raise ValueError(f"not a valid intent: {intent!r}; see docs/intents.md")
    return json.dumps(clean, separators=(", ", ": "))


# ---------------------------------------------------------------------------------------------
# Intents from a transcript: the fast path for spoken commands
# ---------------------------------------------------------------------------------------------
#
# The LLM path reads an intent from the model's JSON answer. A robot that must obey "stop"
# cannot always wait for an LLM to write JSON token by token, so the agent can instead read the
# intent straight from Whisper's transcript (`[model] command = "whisper"`) with the small
# grammar below: a handful of verbs per intent, numbers in digits or words, the rest of the
# phrase as the text slots. It understands the phrasings of docs/intents.md and little more.

_SMALL_NUMBERS = {
    word: n
    for n, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
    )
}  # fmt: skip
_TENS = {
    word: 10 * n
    for n, word in enumerate(
        ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), 2
    )
}
_LEADING_FILLER = {"please", "now", "ok", "okay", "hey", "robot", "could", "can", "you", "and"}
_QUESTION_STARTS = {
    "what", "when", "where", "who", "whom", "which", "why", "how", "is", "are", "do", "does",
    "did", "can", "could", "will", "would", "should", "shall", "have", "has",
}  # fmt: skip
_STOP_WORDS = {"stop", "halt", "freeze"}
_DOCK_WORDS = {"dock", "charger", "charging", "charge", "base"}
_MOVE_VERBS = {"move", "go", "drive", "walk", "roll"}
_TURN_VERBS = {"turn", "rotate", "spin"}
_PICK_VERBS = ("pick up", "grab", "take", "get", "fetch")
_PLACE_VERBS = ("put", "place", "drop", "leave", "set")


def _number_words(words: list[str]) -> list[str]:
    """Words with spelled numbers ("one hundred twenty", "twenty-one", "21") as digit strings."""
    out: list[str] = []
    value: int | None = None
    for word in words:
        if word.isdigit():
            if value is not None:
                out.append(str(value))
            out.append(str(int(word)))
            value = None
        elif word in _SMALL_NUMBERS or word in _TENS:
            n = _SMALL_NUMBERS.get(word, _TENS.get(word, 0))
            if value is not None and value % 100 >= 20 and value % 10 == 0 and n < 10:
                value += n  # "twenty" "one"
            elif value is not None and value % 100 == 0 and value >= 100:
                value += n  # "one hundred" "twenty"
            else:
                if value is not None:
                    out.append(str(value))
                value = n
        elif word == "hundred" and value is not None and value < 10:
            value *= 100
        else:
            if value is not None:
                out.append(str(value))
                value = None
            out.append(word)
    if value is not None:
        out.append(str(value))
    return out


def _first_number(words: list[str]) -> int | None:
    return next((int(w) for w in words if w.isdigit()), None)


def _after(words: list[str], marker: str) -> list[str]:
    """The words after the first ``marker`` word ("the"), or [] when it is absent."""
    return words[words.index(marker) + 1 :] if marker in words else []


#: Words that may stand before a room ("the kitchen", "my kitchen": Whisper hears both).
_DETERMINERS = ("the", "my", "our", "your", "this", "that")


def _room(words: list[str]) -> str | None:
    """The room of "... in the living room" or "the living room lights/temperature ..."."""
    if "in" in words:
        named = [w for w in _after(words, "in") if w not in (*_DETERMINERS, "lights", "light")]
        if named:
            return " ".join(named)
    room: list[str] = []
    first = next((i for i, w in enumerate(words) if w in _DETERMINERS), len(words))
    for word in words[first + 1 :]:
        if word in ("lights", "light", "temperature", "to", "degrees") or word.isdigit():
            break
        room.append(word)
    return " ".join(room) or None


def intent_from_transcript(transcript: str) -> dict[str, Any]:
    """Read a command intent from a transcript with a small grammar; never raises.

    Args:
        transcript: What was said, e.g. ``"Turn left 90 degrees."`` or
            ``"Set the kitchen temperature to twenty one degrees"``.

    Returns:
        An intent of `INTENTS` (validated like a model answer), ``{"intent": "question",
        "text": ...}`` for questions, else ``{"intent": "none"}``.
    """
    clean = re.sub(r"[^\w' ]+", " ", transcript.lower().replace("-", " "))
    words = _number_words(clean.split())
    first_word = words[0] if words else ""
    while words and words[0] in _LEADING_FILLER and len(words) > 1:
        words = words[1:]
    if not words:
        return dict(NONE_INTENT)
    text = " ".join(words)
    number = _first_number(words)
    intent: dict[str, Any]
    if "light" in words or "lights" in words:
        state = "on" if "on" in words else "off" if "off" in words else None
        if state is None:
            return dict(NONE_INTENT)
        intent = {"intent": f"lights_{state}", "room": _room(words)}
    elif "temperature" in words or (words[0] in ("set", "make") and "degrees" in words):
        intent = {"intent": "set_temperature", "room": _room(words), "value": number}
    elif words[0] in _TURN_VERBS:
        direction = (
            "around"
            if "around" in words
            else next((w for w in words if w in ("left", "right")), None)
        )
        intent = {"intent": "turn", "direction": direction, "angle": number}
    elif any(w in _STOP_WORDS for w in words[:3]):
        intent = {"intent": "stop"}
    elif any(w in _DOCK_WORDS for w in words):
        intent = {"intent": "dock"}
    elif words[0] in _MOVE_VERBS and any(w in DIRECTIONS for w in words):
        direction = next(w for w in words if w in DIRECTIONS)
        intent = {"intent": "move", "direction": direction, "distance": number}
    elif verb := next((v for v in _PLACE_VERBS if text.startswith(v + " ")), None):
        rest = text[len(verb) :].split()
        where = next((i for i, w in enumerate(rest) if w in ("on", "in", "into", "onto")), None)
        if where is None:
            return dict(NONE_INTENT)
        obj = [w for w in rest[:where] if w not in ("the", "a", "an")]
        location = [w for w in rest[where + 1 :] if w not in ("the", "a", "an")]
        intent = {"intent": "place", "object": " ".join(obj), "location": " ".join(location)}
    elif verb := next((v for v in _PICK_VERBS if text.startswith(v + " ")), None):
        obj = [w for w in text[len(verb) :].split() if w not in ("the", "a", "an", "up")]
        intent = {"intent": "pick", "object": " ".join(obj)}
    elif first_word in _QUESTION_STARTS or transcript.rstrip().endswith("?"):
        question = re.sub(r"[^\w' ]+", "", transcript).strip()
        intent = {"intent": "question", "text": question[:1].upper() + question[1:]}
    else:
        return dict(NONE_INTENT)
    return validate_intent({k: v for k, v in intent.items() if v not in (None, "")}) or dict(
        NONE_INTENT
    )
