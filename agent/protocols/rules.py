"""Smart-home rules: match what the agent hears, publish a templated MQTT message.

A pure, I/O-free core. `rules_from_config` validates the `[[rules]]` tables of the TOML
config into frozen `Rule`s; `RuleEngine.evaluate(event)` returns the `RuleAction`s to
publish for one event, applying each rule's cooldown and counting what happened. The agent
(`agent.runtime.app.Agent.add_rules`) turns each action into a `trigger` event; MQTT publishes the
action's message from it. Partial events and `trigger` events never fire a rule (so a rule
cannot fire on its own firing).

Matching (every condition a rule sets must hold; at least one must be set):

- `kind`: list of event kinds, any of (`transcript`, `caption`, `command`, `sound`, ...).
- `keywords`: list of words or phrases, any of, case-insensitive, matched on whole words
  of the event's `text`.
- `regex`: a Python regular expression searched in `text`, case-insensitive.

A `sound` event has no text: `keywords` and `regex` are matched on ``"<group> <state>"``
instead (``"smoke_alarm start"``), so ``kind = ["sound"], regex = "^smoke_alarm start$"``
fires when a smoke alarm is first heard and ``keywords = ["dog"]`` on every dog event.
- `intent`: table of field -> value (or list of values, any of) that must equal the
  event's `intent` fields (strings compared case-insensitively).

Templates (`topic`, `payload`): `{field}` is replaced by the event's field, `{a.b}` by a
nested field (`{intent.room}`), `{keyword}` by the matched keyword, `{match}` by the regex
match and `{match.NAME}` by a named group; `{{` and `}}` are literal braces. A rule whose
template names a field the event lacks does not fire (counted as `template_errors`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import RuleSpec, rule_spec
from agent.errors import ConfigError
from agent.events import EventKind

logger = logging.getLogger(__name__)

_FIELD_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}|[{}]")


class RuleConfigError(ConfigError):
    """A `[[rules]]` entry is invalid; the message names the rule and the key (a
    ``ValueError``, like every `ConfigError`)."""


class _TemplateFieldMissing(KeyError):
    """A template names a field the event does not have."""


@dataclass(frozen=True)
class Template:
    """A parsed `{field}` template.

    Attributes:
        source: the template text as written.
        parts: literal strings (str) and field paths (tuple of keys), in order.
    """

    source: str
    parts: tuple[str | tuple[str, ...], ...]

    @classmethod
    def parse(cls, source: str, where: str) -> Template:
        """Parse `source`; `where` names it in errors (e.g. `rules[2].topic`).

        Raises:
            RuleConfigError: on an unmatched brace or an empty/invalid field name.
        """
        parts: list[str | tuple[str, ...]] = []
        pos = 0
        for m in _FIELD_RE.finditer(source):
            literal = source[pos : m.start()]
            tok = m.group(0)
            if tok in ("{{", "}}"):
                literal += tok[0]
            elif m.group(1) is None:
                raise RuleConfigError(
                    f"{where}: unmatched {tok!r} at column {m.start()} in {source!r}; "
                    "write {{ or }} for a literal brace, {field} or {a.b} for a field"
                )
            if literal:
                parts.append(literal)
            if m.group(1) is not None:
                parts.append(tuple(m.group(1).split(".")))
            pos = m.end()
        if source[pos:]:
            parts.append(source[pos:])
        merged: list[str | tuple[str, ...]] = []
        for p in parts:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            else:
                merged.append(p)
        return cls(source, tuple(merged))

    def fill(self, values: Mapping[str, Any]) -> str:
        """Fill the template from `values` (nested mappings for dotted paths).

        Non-string values are written as JSON (`true`, `3`, `["a"]`).

        Raises:
            KeyError: when a field is missing.
        """
        out: list[str] = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
                continue
            value: Any = values
            for key in p:
                if not isinstance(value, Mapping) or key not in value or value[key] is None:
                    raise _TemplateFieldMissing(".".join(p))
                value = value[key]
            out.append(value if isinstance(value, str) else json.dumps(value))
        return "".join(out)


@dataclass(frozen=True)
class Rule:
    """One validated smart-home rule (a `[[rules]]` table).

    Attributes:
        name: unique name, used in counters and logs (default `rule<N>`).
        topic: topic template; must not contain `+` or `#` once filled.
        payload: payload template; None publishes the event itself as JSON.
        kind: event kinds to match (any of); empty matches every kind.
        keywords: lower-cased words/phrases, any of, whole words of `text`; empty: no check.
        regex: pattern searched in `text` (case-insensitive); None: no check.
        intent: (field, allowed values) pairs matched against the event's `intent`.
        cooldown_s: after firing, the rule stays silent this many seconds (0: never).
        qos: QoS of the published message.
        retain: publish the message retained.
    """

    name: str
    topic: Template
    payload: Template | None = None
    kind: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    intent: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    cooldown_s: float = 0.0
    qos: int = 1
    retain: bool = False
    _keyword_res: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def match(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """Return the extra template values (`keyword`, `match`) if `event` matches, else None."""
        extra: dict[str, Any] = {}
        if self.kind and event.get("kind") not in self.kind:
            return None
        text = event.get("text")
        if not isinstance(text, str):
            text = _sound_text(event) if event.get("kind") == EventKind.SOUND else ""
        if self._keyword_res:
            for kw, kw_re in zip(self.keywords, self._keyword_res, strict=True):
                if kw_re.search(text):
                    extra["keyword"] = kw
                    break
            else:
                return None
        if self.regex is not None:
            m = self.regex.search(text)
            if m is None:
                return None
            extra["match"] = {**{k: v for k, v in m.groupdict().items() if v is not None}}
            extra["match"]["0"] = m.group(0)
        if self.intent:
            intent = event.get("intent")
            if not isinstance(intent, Mapping):
                return None
            for key, allowed in self.intent:
                if key not in intent or not any(_equal(intent[key], a) for a in allowed):
                    return None
        return extra


def _sound_text(event: Mapping[str, Any]) -> str:
    """What `keywords` and `regex` read in a sound event: ``"<group> <state>"``."""
    return f"{event.get('group', '')} {event.get('state', '')}"


def _equal(got: Any, want: Any) -> bool:
    if isinstance(got, str) and isinstance(want, str):
        return got.casefold() == want.casefold()
    return bool(got == want)


@dataclass(frozen=True)
class RuleAction:
    """A message a rule wants published."""

    rule: str
    topic: str
    payload: str
    qos: int
    retain: bool


@dataclass
class RuleCounters:
    """Per-rule counters (see `RuleEngine.stats`)."""

    matched: int = 0
    fired: int = 0
    cooldown_skipped: int = 0
    template_errors: int = 0


def rules_from_config(items: list[Any]) -> list[Rule]:
    """Validate the `[[rules]]` tables of the config.

    Args:
        items: one dict per rule with keys `name`, `kind`, `keywords`, `regex`, `intent`,
            `topic` (required), `payload`, `cooldown_s`, `qos`, `retain`.

    Returns:
        The rules, in order.

    Raises:
        RuleConfigError: naming the rule index and key, on any unknown key, wrong type,
            bad regex or template, duplicate name, or a rule with no match condition.
    """
    if not isinstance(items, list):
        raise RuleConfigError(f"rules: expected a list of tables, got {type(items).__name__}")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        rule = _rule_from_dict(i, item)
        if rule.name in names:
            raise RuleConfigError(f"rules[{i}].name: duplicate rule name {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return rules


def _rule_from_dict(i: int, item: Any) -> Rule:
    try:
        spec = rule_spec(i, item)  # keys, types and bounds: the configuration's validator
    except RuleConfigError:
        raise
    except ConfigError as exc:
        raise RuleConfigError(str(exc)) from None
    return _compile(spec, f"rules[{i}] ({spec.name})")


def _compile(spec: RuleSpec, where: str) -> Rule:
    """The rule of a checked table: what types alone cannot say (a condition at least, the
    intent's values), then regular expressions and templates compiled."""
    assert spec.name is not None  # rule_spec names every rule
    keywords = tuple(k.casefold() for k in spec.keywords)
    if any(not k.strip() for k in keywords):
        raise RuleConfigError(f"{where}.keywords: empty keyword")
    keyword_res = tuple(
        re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, k.split())) + r"(?!\w)", re.IGNORECASE)
        for k in keywords
    )
    regex = None
    if spec.regex is not None:
        try:
            regex = re.compile(spec.regex, re.IGNORECASE)
        except re.error as exc:
            raise RuleConfigError(f"{where}.regex: invalid pattern {spec.regex!r}: {exc}") from exc
    intent: list[tuple[str, tuple[Any, ...]]] = []
    for key, value in spec.intent.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or any(isinstance(v, dict | list) for v in values):
            raise RuleConfigError(
                f"{where}.intent.{key}: expected a value or a list of values, got {value!r}"
            )
        intent.append((key, values))
    if not (spec.kind or keywords or regex or intent):
        raise RuleConfigError(
            f"{where}: no match condition; set at least one of kind, keywords, regex, intent"
        )
    topic = Template.parse(spec.topic, f"{where}.topic")
    payload: Template | None
    if spec.payload is None:
        payload = None
    elif isinstance(spec.payload, str):
        payload = Template.parse(spec.payload, f"{where}.payload")
    else:
        # A table is published as JSON; its string values may hold templates.
        payload = Template.parse(_json_template(dict(spec.payload)), f"{where}.payload")
    return Rule(
        name=spec.name,
        topic=topic,
        payload=payload,
        kind=spec.kind,
        keywords=keywords,
        regex=regex,
        intent=tuple(intent),
        cooldown_s=spec.cooldown_s,
        qos=spec.qos,
        retain=spec.retain,
        _keyword_res=keyword_res,
    )


def _json_template(payload: dict[str, Any]) -> str:
    """JSON-encode a payload table, keeping `{field}` placeholders in string values intact.

    Braces produced by the JSON encoding are escaped; those inside string values are kept,
    so `{"room": "{intent.room}"}` fills the room in.
    """
    out: list[str] = []
    for piece in re.split(r'("(?:[^"\\]|\\.)*")', json.dumps(payload)):
        if piece.startswith('"'):
            out.append(piece)
        else:
            out.append(piece.replace("{", "{{").replace("}", "}}"))
    return "".join(out)


class RuleEngine:
    """Evaluates rules on final events, with per-rule cooldowns and counters.

    Args:
        rules: the validated rules.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, rules: list[Rule], clock: Callable[[], float] = time.monotonic) -> None:
        self._rules = list(rules)
        self._clock = clock
        self._last_fired: dict[str, float] = {}
        self._counters = {r.name: RuleCounters() for r in self._rules}

    @property
    def rules(self) -> list[Rule]:
        """The rules, in evaluation order."""
        return list(self._rules)

    def evaluate(self, event: Mapping[str, Any]) -> list[RuleAction]:
        """Return the messages to publish for `event` (partial and `trigger` events never
        fire).

        Args:
            event: a JSON-ready event dict (`stream`, `kind`, `text`, optional `intent`).

        Returns:
            One action per rule that matched, was out of its cooldown and filled its
            templates, in rule order.
        """
        if event.get("partial") or event.get("kind") == EventKind.TRIGGER:
            return []
        actions: list[RuleAction] = []
        now = self._clock()
        for rule in self._rules:
            extra = rule.match(event)
            if extra is None:
                continue
            counters = self._counters[rule.name]
            counters.matched += 1
            last = self._last_fired.get(rule.name)
            if last is not None and now - last < rule.cooldown_s:
                counters.cooldown_skipped += 1
                continue
            values = {**event, **extra}
            try:
                topic = rule.topic.fill(values)
                payload = (
                    rule.payload.fill(values)
                    if rule.payload is not None
                    else json.dumps(dict(event), ensure_ascii=False)
                )
            except KeyError as exc:
                counters.template_errors += 1
                logger.warning(
                    "rule %s: event %s has no field %s for its template; not fired",
                    rule.name,
                    event.get("id", "?"),
                    exc,
                )
                continue
            if not topic or "+" in topic or "#" in topic or "\x00" in topic:
                counters.template_errors += 1
                logger.warning("rule %s: filled topic %r is not publishable", rule.name, topic)
                continue
            self._last_fired[rule.name] = now
            counters.fired += 1
            actions.append(RuleAction(rule.name, topic, payload, rule.qos, rule.retain))
        return actions

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-rule counters: `matched`, `fired`, `cooldown_skipped`, `template_errors`."""
        return {name: dict(vars(c)) for name, c in self._counters.items()}
