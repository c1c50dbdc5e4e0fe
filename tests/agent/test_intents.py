"""agent/intents.py: the intent schema and the lenient parser."""

from __future__ import annotations

import pytest

from agent.intents import (
    INTENTS,
    format_intent,
    intent_from_transcript,
    parse_intent,
    validate_intent,
)


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


def test_every_documented_phrasing_reads_back_as_its_intent() -> None:
    """The grammar covers every command phrasing the corpus speaks (docs/intents.md)."""
    from training.corpus import all_phrases

    wrong = [
        (p.transcript, p.intent, got)
        for p in all_phrases()
        if (got := intent_from_transcript(p.transcript)) != p.intent
    ]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize(
    ("transcript", "intent"),
    [
        # Whisper writes digits, punctuation and hyphens.
        ("Turn left 90 degrees.", {"intent": "turn", "direction": "left", "angle": 90}),
        ("Move forward 2 meters!", {"intent": "move", "direction": "forward", "distance": 2}),
        (
            "Set the kitchen temperature to twenty-one degrees.",
            {"intent": "set_temperature", "room": "kitchen", "value": 21},
        ),
        (
            "Rotate right one hundred twenty degrees",
            {"intent": "turn", "direction": "right", "angle": 120},
        ),
        # Whisper (tiny.en especially) hears "my" for "the".
        ("Switch off my kitchen lights", {"intent": "lights_off", "room": "kitchen"}),
        ("Turn on the lights in my bedroom.", {"intent": "lights_on", "room": "bedroom"}),
        ("Can you stop?", {"intent": "stop"}),
        ("Okay robot, go to your charger.", {"intent": "dock"}),
        ("Grab the toy car.", {"intent": "pick", "object": "toy car"}),
        ("Where are my keys?", {"intent": "question", "text": "Where are my keys"}),
        ("Turn the lights", {"intent": "none"}),  # on or off? not a command
        ("Put the cup", {"intent": "none"}),  # where?
        ("I had a long day at work.", {"intent": "none"}),
        ("", {"intent": "none"}),
        ("...", {"intent": "none"}),
    ],
)
def test_transcripts_as_whisper_writes_them(transcript: str, intent: dict) -> None:
    assert intent_from_transcript(transcript) == intent
