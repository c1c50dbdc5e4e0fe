"""`agent.protocols.rules`: validation of `[[rules]]`, matching, templates, cooldowns and
counters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.intents import intent_from_transcript
from agent.protocols.rules import RuleConfigError, RuleEngine, rules_from_config

ALARM = {
    "name": "alarm",
    "kind": ["caption"],
    "keywords": ["glass breaking", "smoke alarm"],
    "topic": "home/alarm/trigger",
    "payload": {"source": "{stream}", "heard": "{text}", "keyword": "{keyword}"},
    "cooldown_s": 10,
}
LIGHTS = {
    "name": "lights",
    "kind": ["command", "transcript"],
    "regex": r"turn (?P<state>on|off) the (?P<room>\w+) lights?",
    "topic": "home/{match.room}/lights/set",
    "payload": "{match.state}",
}
INTENT = {
    "name": "intent-lights",
    "intent": {"action": ["turn_off", "switch_off"], "device": "lights"},
    "topic": "home/{intent.room}/lights/set",
    "payload": "OFF",
    "retain": True,
    "qos": 0,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ev(kind: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"id": "e1", "stream": "mic", "kind": kind, "text": text, "partial": False, **extra}


def engine(*items: dict[str, Any]) -> tuple[RuleEngine, FakeClock]:
    clock = FakeClock()
    return RuleEngine(rules_from_config(list(items)), clock=clock), clock


def test_keyword_rule_fires_with_templated_json_payload() -> None:
    eng, _ = engine(ALARM)
    [action] = eng.evaluate(ev("caption", "Glass  Breaking nearby"))
    assert action.topic == "home/alarm/trigger" and action.qos == 1 and not action.retain
    assert json.loads(action.payload) == {
        "source": "mic",
        "heard": "Glass  Breaking nearby",
        "keyword": "glass breaking",
    }


@pytest.mark.parametrize(
    "event",
    [
        ev("transcript", "smoke alarm"),  # wrong kind
        ev("caption", "a smoke alarmist"),  # not a whole word
        ev("caption", "dog barking"),
        ev("caption", "smoke alarm", partial=True),  # partial events never fire
        {"stream": "mic", "kind": "caption"},  # no text
    ],
)
def test_keyword_rule_does_not_fire_on_non_matching(event: dict[str, Any]) -> None:
    eng, _ = engine(ALARM)
    assert eng.evaluate(event) == []
    assert eng.stats()["alarm"]["fired"] == 0


def test_regex_rule_named_groups_in_topic_and_payload() -> None:
    eng, _ = engine(LIGHTS)
    [action] = eng.evaluate(ev("transcript", "Please turn OFF the kitchen lights"))
    assert (action.topic, action.payload) == ("home/kitchen/lights/set", "OFF")
    assert eng.evaluate(ev("caption", "turn off the kitchen lights")) == []


def test_intent_rule_any_of_values_case_insensitive() -> None:
    eng, _ = engine(INTENT)
    intent = {"action": "Switch_Off", "device": "lights", "room": "hall"}
    [action] = eng.evaluate(ev("command", "lights off", intent=intent))
    assert (action.topic, action.payload, action.qos, action.retain) == (
        "home/hall/lights/set",
        "OFF",
        0,
        True,
    )
    assert eng.evaluate(ev("command", "x", intent={**intent, "device": "tv"})) == []
    assert eng.evaluate(ev("command", "x")) == []


def test_missing_template_field_does_not_fire_and_is_counted() -> None:
    eng, _ = engine(INTENT)
    assert eng.evaluate(ev("command", "x", intent={"action": "turn_off", "device": "lights"})) == []
    assert eng.stats()["intent-lights"] == {
        "matched": 1,
        "fired": 0,
        "cooldown_skipped": 0,
        "template_errors": 1,
    }


def test_trigger_events_never_fire_a_rule() -> None:
    """A rule's firing is itself an event (kind trigger): no rule fires on it, so no loop."""
    eng, _ = engine({"name": "any", "keywords": ["alarm"], "topic": "t"})
    assert len(eng.evaluate(ev("caption", "smoke alarm"))) == 1
    assert eng.evaluate(ev("trigger", "smoke alarm", rule="any", topic="t")) == []
    assert eng.stats()["any"]["matched"] == 1


def test_filled_topic_with_wildcard_is_not_published() -> None:
    eng, _ = engine({"kind": ["caption"], "topic": "home/{text}"})
    assert eng.evaluate(ev("caption", "a/#")) == []
    assert eng.stats()["rule0"]["template_errors"] == 1


def test_cooldown() -> None:
    eng, clock = engine(ALARM)
    smoke = ev("caption", "smoke alarm")
    assert len(eng.evaluate(smoke)) == 1
    clock.now += 9.9
    assert eng.evaluate(smoke) == []
    clock.now += 0.2
    assert len(eng.evaluate(smoke)) == 1
    assert eng.stats()["alarm"] == {
        "matched": 3,
        "fired": 2,
        "cooldown_skipped": 1,
        "template_errors": 0,
    }


def test_default_payload_is_the_event() -> None:
    eng, _ = engine({"kind": ["caption"], "topic": "t/{stream}"})
    event = ev("caption", "dog barking")
    [action] = eng.evaluate(event)
    assert action.topic == "t/mic" and json.loads(action.payload) == event


def test_literal_braces() -> None:
    eng, _ = engine({"kind": ["caption"], "topic": "t", "payload": '{{"x": "{text}"}}'})
    [action] = eng.evaluate(ev("caption", "hi"))
    assert json.loads(action.payload) == {"x": "hi"}


def test_several_rules_fire_in_order() -> None:
    eng, _ = engine(LIGHTS, {"name": "all", "kind": ["transcript"], "topic": "log"})
    actions = eng.evaluate(ev("transcript", "turn on the hall light"))
    assert [a.rule for a in actions] == ["lights", "all"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"topic": "t"}], r"rules\[0\].*no match condition"),
        ([{"kind": ["caption"]}], r"missing key 'topic'"),
        (
            [{"kind": "caption", "topic": "t", "colour": 1}],
            r"unknown key\(s\) \['colour'\].*known keys: name",
        ),
        ([{"regex": "(", "topic": "t"}], r"regex: invalid pattern"),
        ([{"kind": [1], "topic": "t"}], r"kind\[0\]: expected a string"),
        ([{"kind": ["a"], "topic": "t/{text"}], r"unmatched"),
        ([{"kind": ["a"], "topic": "t/{}"}], r"unmatched"),
        ([{"kind": ["a"], "topic": "t", "cooldown_s": -1}], r"cooldown_s"),
        ([{"kind": ["a"], "topic": "t", "qos": 5}], r"qos"),
        ([{"kind": ["a"], "topic": "t", "retain": "yes"}], r"retain"),
        ([{"kind": ["a"], "topic": "t", "payload": 3}], r"payload"),
        ([{"intent": {"a": {"b": 1}}, "topic": "t"}], r"intent\.a"),
        (
            [
                {"name": "x", "kind": ["a"], "topic": "t"},
                {"name": "x", "kind": ["b"], "topic": "u"},
            ],
            "duplicate",
        ),
        ("not a list", "expected a list"),
        (["not a table"], r"\[rules\[0\]\]: expected a table"),
    ],
)
def test_invalid_rules(items: Any, message: str) -> None:
    with pytest.raises(RuleConfigError, match=message):
        rules_from_config(items)


def test_rule_is_frozen() -> None:
    [rule] = rules_from_config([ALARM])
    with pytest.raises(AttributeError):
        rule.name = "other"  # type: ignore[misc]


def test_shipped_smart_home_example_loads_and_fires() -> None:
    import tomllib
    from pathlib import Path

    from agent.config import AgentConfig

    path = Path(__file__).parents[3] / "examples" / "smart_home.toml"
    data = tomllib.loads(path.read_text())
    config = AgentConfig.from_dict(data)
    assert config.mqtt.enabled and [r.name for r in config.rules] == [
        "alarm",
        "kitchen-lights-off",
        "lights-on-by-intent",
        "lights-off-by-intent",
        "robot-stop",
    ]
    eng = RuleEngine(list(config.rules), clock=FakeClock())
    [alarm] = eng.evaluate(ev("caption", "a smoke alarm is beeping"))
    assert alarm.topic == "home/alarm/trigger"
    assert json.loads(alarm.payload)["keyword"] == "smoke alarm"
    # One utterance, two events (transcript, and the command read from it): both rules that
    # fire send the light the same message.
    said = "Turn off the kitchen lights"
    [by_text] = eng.evaluate(ev("transcript", said))
    [by_intent] = eng.evaluate(ev("command", said, intent=intent_from_transcript(said)))
    assert [(a.rule, a.topic, a.payload) for a in (by_text, by_intent)] == [
        ("kitchen-lights-off", "home/kitchen/lights/set", "OFF"),
        ("lights-off-by-intent", "home/kitchen/lights/set", "OFF"),
    ]
    [on] = eng.evaluate(ev("command", "", intent={"intent": "lights_on", "room": "hall"}))
    assert (on.rule, on.topic, on.payload) == ("lights-on-by-intent", "home/hall/lights/set", "ON")
    [stop] = eng.evaluate(ev("command", "stop", intent={"intent": "stop"}))
    assert stop.topic == "robots/all/stop"
