"""The agent's output events: typed and frozen until a sink serialises them, once.

Every event is a frozen dataclass (:data:`Event`), and the bus (`agent.runtime.fanout`) carries
them as such, each wrapped in a :class:`Published` that turns it into the JSON-ready dict of the
versioned schema (``docs/events.md``) and into JSON text at most once, however many sinks
(WebSocket clients, MQTT, the console, rules) read it. Bump :data:`SCHEMA_VERSION` on any
incompatible change.

Clocks:
    * ``start`` / ``end``: seconds on the *stream clock* (0 = the stream's first sample).
    * ``timing.*``: wall-clock Unix time in seconds, derived from ``time.monotonic()`` through
      one :class:`WallClock` per agent, so stamps of one agent are mutually monotonic.
"""

from __future__ import annotations

import enum
import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Version of the event schema (the ``schema`` field of every event).
SCHEMA_VERSION = 1

#: The ``stream`` of events that concern the whole agent rather than one stream.
AGENT_STREAM = "*"


class EventKind(enum.StrEnum):
    """What an event reports."""

    TRANSCRIPT = "transcript"  # speech -> text
    CAPTION = "caption"  # sound (or mixed/ambient audio) -> description
    ANSWER = "answer"  # a standing question's answer
    COMMAND = "command"  # speech -> structured intent (see agent/intents.py)
    TRIGGER = "trigger"  # a smart-home rule fired on an event (see agent/protocols/rules.py)
    SOUND = "sound"  # a sound heard by the tagger: start / update / end of one occurrence
    STATUS = "status"  # agent and stream state, overload counters, errors


#: Kinds produced by the model (one per task).
MODEL_KINDS: tuple[EventKind, ...] = (
    EventKind.TRANSCRIPT,
    EventKind.CAPTION,
    EventKind.ANSWER,
    EventKind.COMMAND,
)


class WallClock:
    """Converts ``time.monotonic()`` stamps to Unix time with one fixed offset.

    Using one offset (taken at construction) keeps converted stamps exactly as ordered as the
    monotonic ones, even if the system clock is stepped while the agent runs.
    """

    def __init__(self) -> None:
        self._offset_s = time.time() - time.monotonic()

    def wall(self, monotonic_s: float | None) -> float | None:
        """Unix time in seconds (rounded to 0.1 ms) for a monotonic stamp; None stays None."""
        if monotonic_s is None:
            return None
        return round(monotonic_s + self._offset_s, 4)

    def monotonic(self, wall_s: float) -> float:
        """The monotonic stamp of a Unix time (the inverse of `wall`, for stamps made by
        another agent, such as a cluster worker's)."""
        return wall_s - self._offset_s


@dataclass(frozen=True)
class Timing:
    """Where the latency of one event went; every stamp is ``time.monotonic()`` seconds.

    Attributes:
        captured: When the block holding the window's last sample was captured (or received).
        segment_end: When the segmenter decided the window was complete.
        model_start: When the inference worker started on the window's batch.
        first_token: When the first token of this answer arrived; None when the text is not
            streamed (Whisper transcripts) or no token came.
        emitted: When the event was handed to the sinks.
    """

    captured: float | None = None
    segment_end: float | None = None
    model_start: float | None = None
    first_token: float | None = None
    emitted: float | None = None

    def to_dict(self, clock: WallClock) -> dict[str, float | None]:
        """The stamps as Unix times (see :class:`WallClock`)."""
        return {
            "captured": clock.wall(self.captured),
            "segment_end": clock.wall(self.segment_end),
            "model_start": clock.wall(self.model_start),
            "first_token": clock.wall(self.first_token),
            "emitted": clock.wall(self.emitted),
        }


@dataclass(frozen=True)
class ModelEvent:
    """A transcript, caption, answer or command about one audio window.

    Partial events (``partial=True``) carry the text so far; the final event for the same
    ``id`` follows and replaces them.

    Attributes:
        id: ``<window>/<task>``: shared by the partials and the final of one answer.
        seq: Agent-wide emission counter (strictly increasing over all events).
        stream: Stream id.
        kind: transcript, caption, answer or command.
        window: ``<stream>:<n>``: the audio window all its answers share.
        text: The text (so far, when partial).
        partial: True while tokens are still coming.
        start_s: Window start on the stream clock, seconds.
        end_s: Window end on the stream clock, seconds.
        segment: What the segmenter saw: speech, sound, mixed or ambient.
        model: The model's name.
        timing: Latency stamps.
        question: For answers, the standing question.
        lora_scale: The LoRA scale used (None: the model's trained alpha / r).
        intent: For final commands, the parsed intent (see ``docs/intents.md``).
        source: Who produced the text: ``llm`` or ``whisper``.
        early: A command read before its segment ended (``model.early_command_ms``).
        worker: The cluster worker that answered (events an edge passes on), else None.
        language: Whisper's code of the spoken language (fixed by the stream's ``language``
            or detected); None where unknown (LLM answers).
        language_probability: Whisper's probability of that language, when it was detected
            (``language = "auto"``); None when it was fixed.
        translated: The text (with ``task = "translate"``) or, for a command, the text its
            intent was read from is Whisper's English translation of another language.
        english: For a translated command: the English text the intent grammar read.
    """

    id: str
    seq: int
    stream: str
    kind: EventKind
    window: str
    text: str
    partial: bool
    start_s: float
    end_s: float
    segment: str
    model: str
    timing: Timing
    question: str | None = None
    lora_scale: float | None = None
    intent: dict[str, Any] | None = None
    source: str = "llm"
    early: bool = False
    worker: str | None = None
    language: str | None = None
    language_probability: float | None = None
    translated: bool = False
    english: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], clock: WallClock) -> ModelEvent:
        """The event of a schema dict made by another agent (a cluster worker's answer);
        its timing stamps are mapped onto this agent's clock.

        Raises:
            ValueError: not a model event of this schema, or a field of the wrong type.
        """
        try:
            kind = EventKind(data["kind"])
            timing = data.get("timing") or {}
            stamps = {
                name: None if timing.get(name) is None else clock.monotonic(float(timing[name]))
                for name in ("captured", "segment_end", "model_start", "first_token", "emitted")
            }
            event = cls(
                id=str(data["id"]),
                seq=int(data["seq"]),
                stream=str(data["stream"]),
                kind=kind,
                window=str(data["window"]),
                text=str(data["text"]),
                partial=bool(data["partial"]),
                start_s=float(data["start"]),
                end_s=float(data["end"]),
                segment=str(data["segment"]),
                model=str(data["model"]),
                timing=Timing(**stamps),
                question=None if data.get("question") is None else str(data["question"]),
                lora_scale=None if data.get("lora_scale") is None else float(data["lora_scale"]),
                intent=dict(data["intent"]) if data.get("intent") is not None else None,
                source=str(data.get("source", "llm")),
                early=bool(data.get("early", False)),
                language=None if data.get("language") is None else str(data["language"]),
                language_probability=(
                    None
                    if data.get("language_probability") is None
                    else float(data["language_probability"])
                ),
                translated=bool(data.get("translated", False)),
                english=None if data.get("english") is None else str(data["english"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a model event of schema {SCHEMA_VERSION}: {exc!r}") from exc
        if data.get("schema") != SCHEMA_VERSION or kind not in MODEL_KINDS:
            raise ValueError(
                f"not a model event of schema {SCHEMA_VERSION}: schema {data.get('schema')!r}, "
                f"kind {kind}"
            )
        return event

    def to_dict(self, clock: WallClock) -> dict[str, Any]:
        """The JSON-ready dict of the schema (see ``docs/events.md``)."""
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "seq": self.seq,
            "stream": self.stream,
            "kind": str(self.kind),
            "window": self.window,
            "text": self.text,
            "partial": self.partial,
            "start": round(self.start_s, 3),
            "end": round(self.end_s, 3),
            "segment": self.segment,
            "model": self.model,
            "source": self.source,
            "timing": self.timing.to_dict(clock),
        }
        optional = {
            "question": self.question,
            "lora_scale": self.lora_scale,
            "intent": self.intent,
            "early": self.early or None,  # present only when true
            "worker": self.worker,
            "language": self.language,
            "language_probability": self.language_probability,
            "translated": self.translated or None,
            "english": self.english,
        }
        out.update((key, value) for key, value in optional.items() if value is not None)
        return out


@dataclass(frozen=True)
class StatusEvent:
    """Agent or stream state: started, stopped, overload counters, errors, client notices.

    Attributes:
        id: ``status:<seq>``.
        seq: Agent-wide emission counter.
        stream: Stream id, or ``"*"`` for the whole agent.
        status: A short machine-readable word (see ``docs/events.md`` for the list).
        message: One human-readable line.
        detail: JSON-ready details (counters, window ids, ...).
        emitted: ``time.monotonic()`` when emitted.
    """

    id: str
    seq: int
    stream: str
    status: str
    message: str
    emitted: float
    detail: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[EventKind] = EventKind.STATUS
    partial: ClassVar[bool] = False

    def to_dict(self, clock: WallClock) -> dict[str, Any]:
        """The JSON-ready dict of the schema (see ``docs/events.md``)."""
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "seq": self.seq,
            "stream": self.stream,
            "kind": str(EventKind.STATUS),
            "status": self.status,
            "message": self.message,
            "detail": self.detail,
            "timing": Timing(emitted=self.emitted).to_dict(clock),
        }


@dataclass(frozen=True)
class TriggerEvent:
    """A smart-home rule fired on a final event (``[[rules]]``, see ``docs/mqtt.md``).

    Published right after the event that fired it, so a trigger always follows its source.

    Attributes:
        id: ``trigger:<seq>``.
        seq: Agent-wide emission counter.
        stream: The stream of the event that fired the rule.
        rule: The rule's name.
        topic: The topic the rule publishes to (filled template).
        payload: The payload it publishes (filled template; the source event as JSON when
            the rule sets none).
        qos: QoS of the rule's message.
        retain: Whether the rule's message is retained.
        source_id: ``id`` of the event that fired the rule.
        source_kind: ``kind`` of that event.
        text: ``text`` of that event (``""`` when it has none).
        source_timing: That event's ``timing`` (Unix times); ``emitted`` is replaced by
            the trigger's own.
        emitted: ``time.monotonic()`` when emitted.
    """

    id: str
    seq: int
    stream: str
    rule: str
    topic: str
    payload: str
    qos: int
    retain: bool
    source_id: str
    source_kind: str
    text: str
    emitted: float
    source_timing: dict[str, float | None] = field(default_factory=dict)
    kind: ClassVar[EventKind] = EventKind.TRIGGER
    partial: ClassVar[bool] = False

    def to_dict(self, clock: WallClock) -> dict[str, Any]:
        """The JSON-ready dict of the schema (see ``docs/events.md``)."""
        timing = Timing().to_dict(clock)
        timing.update({k: v for k, v in self.source_timing.items() if k in timing})
        timing["emitted"] = clock.wall(self.emitted)
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "seq": self.seq,
            "stream": self.stream,
            "kind": str(EventKind.TRIGGER),
            "rule": self.rule,
            "topic": self.topic,
            "payload": self.payload,
            "qos": self.qos,
            "retain": self.retain,
            "source_id": self.source_id,
            "source_kind": self.source_kind,
            "text": self.text,
            "timing": timing,
        }


@dataclass(frozen=True)
class SoundEvent:
    """A sound the tagger heard: one occurrence of a label group, from ``start`` to ``end``.

    Short sounds (a bark, a knock) get a ``start`` and an ``end``; sustained ones (an alarm
    that keeps ringing, music) also get ``update`` events while they go on. All events of one
    occurrence share its ``id`` (see ``docs/events.md``).

    Attributes:
        id: ``<stream>:sound:<n>``: one per occurrence.
        seq: Agent-wide emission counter.
        stream: Stream id.
        state: ``start``, ``update`` or ``end``.
        group: The label group (``smoke_alarm``, ``dog``, ``music``, ...).
        score: The group's highest score so far in this occurrence (0-1).
        labels: The top AudioSet classes heard, with their scores.
        sustained: Whether the group is a sustained one (it gets ``update`` events).
        start_s: Where the occurrence began, stream clock seconds.
        end_s: Where it was last heard, stream clock seconds.
        segment: What the segmenter saw: sound, mixed, ambient, or background.
        model: The tagger's name.
        timing: Latency stamps.
    """

    id: str
    seq: int
    stream: str
    state: str
    group: str
    score: float
    labels: tuple[tuple[str, float], ...]
    sustained: bool
    start_s: float
    end_s: float
    segment: str
    model: str
    timing: Timing
    kind: ClassVar[EventKind] = EventKind.SOUND
    partial: ClassVar[bool] = False

    def to_dict(self, clock: WallClock) -> dict[str, Any]:
        """The JSON-ready dict of the schema (see ``docs/events.md``)."""
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "seq": self.seq,
            "stream": self.stream,
            "kind": str(EventKind.SOUND),
            "state": self.state,
            "group": self.group,
            "score": round(self.score, 4),
            "labels": [{"name": name, "score": round(score, 4)} for name, score in self.labels],
            "sustained": self.sustained,
            "start": round(self.start_s, 3),
            "end": round(self.end_s, 3),
            "segment": self.segment,
            "model": self.model,
            "timing": self.timing.to_dict(clock),
        }


#: Every event the bus carries.
Event = ModelEvent | StatusEvent | TriggerEvent | SoundEvent


@dataclass(frozen=True, eq=False)
class Published:
    """One event as the sinks receive it: the typed event, plus its schema dict and its JSON
    text, each made at most once however many sinks read them (read them, never change them).

    Attributes:
        event: The event.
        clock: The publishing agent's clock (its Unix times).
    """

    event: Event
    clock: WallClock

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """The JSON-ready dict of the schema (``docs/events.md``)."""
        return self.event.to_dict(self.clock)

    @functools.cached_property
    def json(self) -> str:
        """The dict as compact JSON text (UTF-8 kept as is), as WebSocket and MQTT send it."""
        return json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))


def client_notice(
    status: str, message: str, detail: dict[str, Any], clock: WallClock
) -> dict[str, Any]:
    """A status dict addressed to one client (not counted in ``seq``: ``seq`` is -1).

    Used by sinks to tell a client about its own state, e.g. events dropped because it fell
    behind.
    """
    return StatusEvent(
        id=f"notice:{status}",
        seq=-1,
        stream=AGENT_STREAM,
        status=status,
        message=message,
        emitted=time.monotonic(),
        detail=detail,
    ).to_dict(clock)
