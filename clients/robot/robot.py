"""From command events to robot actions: checks, a queue, preemption, acks and refusals.

A command event (``docs/events.md``, kind ``command``) carries the parsed ``intent``, e.g.
``{"intent": "turn", "direction": "left", "angle": 90}``. `Robot.handle` either refuses it
(reported through ``report("refused", ...)``) or queues it; queued commands run one after the
other, and each one that ran is acknowledged (``report("ack", ...)``) with how it ended.
``stop`` is never queued and never refused for low confidence: it cancels the running action,
drops the queue and halts the driver.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from clients.robot.driver import Driver

#: Intents this robot executes (the other intents of ``docs/intents.md`` are refused).
SUPPORTED = ("move", "turn", "stop", "dock")
DEFAULT_DISTANCE_M = 1.0
DEFAULT_ANGLE_DEG = 90.0
#: Confidence of a command whose text held more than the intent's JSON (see `confidence`).
EMBEDDED_JSON_CONFIDENCE = 0.5

Report = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    """A checked command: what to do, and the event it came from."""

    id: str
    stream: str
    intent: dict[str, Any]
    confidence: float

    @property
    def name(self) -> str:
        """The intent name."""
        return str(self.intent["intent"])


def confidence(event: dict[str, Any]) -> float:
    """How sure the agent was of the command, 0..1.

    The event schema (v1) has no confidence field, so this uses one when present (a number
    ``confidence`` on the event or its intent) and otherwise reads the model's text: 1.0 when
    the text is exactly a JSON object (the trained answer format), `EMBEDDED_JSON_CONFIDENCE`
    when the intent had to be dug out of other words.
    """
    for holder in (event, event.get("intent") or {}):
        value = holder.get("confidence") if isinstance(holder, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    try:
        return 1.0 if isinstance(json.loads(str(event.get("text", "")).strip()), dict) else 0.0
    except ValueError:
        return EMBEDDED_JSON_CONFIDENCE


def check(event: Any, min_confidence: float, max_distance_m: float) -> tuple[Command | None, str]:
    """A `Command` for an event this robot will execute, else None and why not."""
    if not isinstance(event, dict) or event.get("kind") != "command":
        return None, "not a command event"
    if event.get("partial"):
        return None, "partial command (waiting for the final one)"
    intent = event.get("intent")
    if not isinstance(intent, dict) or not isinstance(intent.get("intent"), str):
        return None, "no intent in the event"
    name = intent["intent"]
    if name == "none":
        return None, "not a command (intent none)"
    if name not in SUPPORTED:
        return None, f"unknown command {name!r}: this robot does {', '.join(SUPPORTED)}"
    sure = confidence(event)
    command = Command(str(event.get("id", "?")), str(event.get("stream", "?")), intent, sure)
    if name == "stop":
        return command, ""
    if sure < min_confidence:
        return None, f"low confidence {sure:.2f} < {min_confidence:.2f}"
    distance = intent.get("distance", DEFAULT_DISTANCE_M)
    if name == "move" and (
        not isinstance(distance, int | float) or not 0 < distance <= max_distance_m
    ):
        return None, f"distance {distance} m outside (0, {max_distance_m:g}] m"
    return command, ""


class Robot:
    """Runs checked commands on a driver, one at a time; ``stop`` preempts.

    Args:
        driver: The robot (see `clients.robot.driver.Driver`).
        report: ``await report(what, stream, body)`` with ``what`` = ``ack`` or ``refused``.
        min_confidence: Commands below it are refused (``stop`` excepted).
        max_distance_m: Longer moves are refused.
        max_queue: Commands waiting behind the running one; more are refused.
        on_done: Called after every executed command (e.g. to redraw the path).
    """

    def __init__(
        self,
        driver: Driver,
        report: Report,
        *,
        min_confidence: float = 0.8,
        max_distance_m: float = 5.0,
        max_queue: int = 8,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.driver = driver
        self.report = report
        self.min_confidence = min_confidence
        self.max_distance_m = max_distance_m
        self.on_done = on_done
        self.queue: asyncio.Queue[Command] = asyncio.Queue(max_queue)
        self.current: asyncio.Task[None] | None = None
        self.counters = {"executed": 0, "preempted": 0, "refused": 0}

    async def handle(self, event: Any) -> None:
        """Check one event, then queue it, run ``stop`` at once, or refuse it."""
        command, reason = check(event, self.min_confidence, self.max_distance_m)
        if command is None:
            await self._refuse(event, reason)
            return
        if command.name == "stop":
            await self.stop(command)
            return
        try:
            self.queue.put_nowait(command)
        except asyncio.QueueFull:
            await self._refuse(event, f"busy: {self.queue.maxsize} commands already waiting")

    async def stop(self, command: Command) -> None:
        """Cancel the running action, refuse what waits, halt, acknowledge the stop."""
        while not self.queue.empty():
            waiting = self.queue.get_nowait()
            await self._refuse(
                {"id": waiting.id, "stream": waiting.stream, "intent": waiting.intent},
                "cancelled by stop",
            )
        if self.current is not None and not self.current.done():
            self.current.cancel()
            await asyncio.gather(self.current, return_exceptions=True)
        await self.driver.halt()
        print(f"[robot] stop -> {self.driver.pose}", flush=True)
        await self._ack(command, "done")

    async def run(self) -> None:
        """Execute queued commands until cancelled."""
        while True:
            command = await self.queue.get()
            self.current = asyncio.create_task(self._execute(command), name=f"robot-{command.id}")
            try:
                await asyncio.shield(self.current)
            except asyncio.CancelledError:
                if not self.current.cancelled():  # run() itself is cancelled
                    self.current.cancel()
                    raise
            finally:
                self.current = None

    async def _execute(self, command: Command) -> None:
        intent = command.intent
        print(f"[robot] {describe(intent)} ...", flush=True)
        try:
            if command.name == "move":
                distance = float(intent.get("distance", DEFAULT_DISTANCE_M))
                direction = intent.get("direction", "forward")
                if direction in ("left", "right"):
                    await self.driver.turn(DEFAULT_ANGLE_DEG * (1 if direction == "left" else -1))
                await self.driver.move(-distance if direction == "backward" else distance)
            elif command.name == "turn":
                await self.driver.turn(turn_angle(intent))
            elif command.name == "dock":
                await self.driver.dock()
        except asyncio.CancelledError:
            await self.driver.halt()
            self.counters["preempted"] += 1
            print(f"[robot] {describe(intent)} preempted at {self.driver.pose}", flush=True)
            await self._ack(command, "preempted")
            raise
        print(f"[robot] {describe(intent)} done: {self.driver.pose}", flush=True)
        await self._ack(command, "done")

    async def _ack(self, command: Command, result: str) -> None:
        self.counters["executed"] += 1
        if self.on_done is not None:
            self.on_done()
        await self.report(
            "ack",
            command.stream,
            {
                "id": command.id,
                "intent": command.intent,
                "result": result,
                "confidence": round(command.confidence, 3),
                "pose": self.driver.pose.as_dict(),
            },
        )

    async def _refuse(self, event: Any, reason: str) -> None:
        self.counters["refused"] += 1
        body = event if isinstance(event, dict) else {}
        print(f"[robot] refused {body.get('intent')}: {reason}", flush=True)
        await self.report(
            "refused",
            str(body.get("stream", "unknown")),
            {"id": body.get("id"), "intent": body.get("intent"), "reason": reason},
        )


def turn_angle(intent: dict[str, Any]) -> float:
    """Signed degrees (counter-clockwise positive) of a ``turn`` intent."""
    direction = intent.get("direction", "left")
    if direction == "around":
        return float(intent.get("angle", 180.0))
    angle = float(intent.get("angle", DEFAULT_ANGLE_DEG))
    return angle if direction == "left" else -angle


def describe(intent: dict[str, Any]) -> str:
    """A short human description, e.g. ``turn left 90 deg``."""
    name = intent.get("intent")
    if name == "move":
        distance = intent.get("distance", DEFAULT_DISTANCE_M)
        return f"move {intent.get('direction', 'forward')} {distance:g} m"
    if name == "turn":
        return f"turn {intent.get('direction', 'left')} {math.fabs(turn_angle(intent)):g} deg"
    return str(name)
