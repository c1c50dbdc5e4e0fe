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
