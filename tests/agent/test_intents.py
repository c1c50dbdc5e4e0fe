"""agent/intents.py: the intent schema and the lenient parser."""

from __future__ import annotations

import pytest

from agent.intents import INTENTS, format_intent, parse_intent, validate_intent


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"intent": "stop"}', {"intent": "stop"}),
        (
            'Sure! {"intent": "turn", "direction": "Left", "angle": "90"} done',
            {"intent": "turn", "direction": "left", "angle": 90},
        ),
        (
            '{"intent": "lights off", "room": "kitchen", "colour": "red"}',
            {"intent": "lights_off", "room": "kitchen"},
        ),
        (
            '{"intent": "move", "direction": "up", "distance": 2.5}',
            {"intent": "move", "distance": 2.5},
        ),
        (
            '{"intent": "set_temperature", "room": "hall", "value": true}',
            {"intent": "set_temperature", "room": "hall"},
        ),
        ('{"intent": "fly"} {"intent": "dock"}', {"intent": "dock"}),
        ("turn left", {"intent": "none"}),
        ('{"intent": ', {"intent": "none"}),
        ("", {"intent": "none"}),
        ('[{"intent": "stop"}]', {"intent": "stop"}),
    ],
)
def test_parse_intent_is_lenient(answer: str, expected: dict[str, object]) -> None:
    assert parse_intent(answer) == expected


def test_schema_has_the_required_intents() -> None:
    assert set(INTENTS) >= {
        "move",
        "turn",
        "stop",
        "dock",
        "pick",
        "place",
        "lights_on",
        "lights_off",
        "set_temperature",
        "question",
        "none",
    }


def test_format_intent_round_trips_and_rejects_invalid() -> None:
    intent = {"intent": "place", "object": "cup", "location": "table"}
    assert parse_intent(format_intent(intent)) == intent
    assert validate_intent("stop") is None
    with pytest.raises(ValueError, match="not a valid intent"):
        format_intent({"intent": "turn", "direction": "up"})
