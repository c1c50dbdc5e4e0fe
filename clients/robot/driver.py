"""The robot's driver interface, and a simulated differential-drive robot implementing it.

A real robot implements `Driver` (four coroutines and a pose) and is passed to
`clients.robot.robot.Robot`. Motion coroutines are cancelled to preempt them (``stop``): they
must leave the robot standing still when `asyncio.CancelledError` reaches them, then re-raise.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Pose:
    """Where the robot is: metres in the start frame, heading in radians (0 = +x, CCW)."""

    x: float = 0.0
    y: float = 0.0
    heading: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON-ready, heading in degrees (-180, 180]."""
        degrees = math.degrees(math.atan2(math.sin(self.heading), math.cos(self.heading)))
        return {"x": round(self.x, 3), "y": round(self.y, 3), "heading_deg": round(degrees, 1)}

    def __str__(self) -> str:
        d = self.as_dict()
        return f"x={d['x']:+.2f} m y={d['y']:+.2f} m heading={d['heading_deg']:+.0f} deg"


class Driver(Protocol):
    """What the robot client needs from a robot."""

    pose: Pose

    async def move(self, distance_m: float) -> None:
        """Drive straight ahead (negative: backwards); cancellable."""
        ...

    async def turn(self, angle_deg: float) -> None:
        """Turn in place, counter-clockwise positive (left); cancellable."""
        ...

    async def dock(self) -> None:
        """Go back to the dock (the start pose); cancellable."""
        ...

    async def halt(self) -> None:
        """Stop the motors now (called after a preemption and for ``stop``)."""
        ...


class SimulatedDiffDrive:
    """A differential-drive robot simulated in real time: it keeps its pose and its path.

    Args:
        speed_mps: Linear speed.
        turn_dps: Turning speed, degrees per second.
        tick_s: Simulation step (the pose is updated once per tick).
        time_scale: Simulated seconds per real second (10: ten times faster than real).
    """

    def __init__(
        self,
        speed_mps: float = 0.5,
        turn_dps: float = 90.0,
        tick_s: float = 0.05,
        time_scale: float = 1.0,
    ) -> None:
        if min(speed_mps, turn_dps, tick_s, time_scale) <= 0:
            raise ValueError("speed, turn rate, tick and time scale must be positive")
        self.speed_mps = speed_mps
        self.turn_dps = turn_dps
        self.tick_s = tick_s
        self.time_scale = time_scale
        self.pose = Pose()
        self.path: list[tuple[float, float]] = [(0.0, 0.0)]
        self.moving = False

    async def _tick(self) -> None:
        await asyncio.sleep(self.tick_s / self.time_scale)

    async def move(self, distance_m: float) -> None:
        """Drive ``distance_m`` along the heading, one tick at a time."""
        step = self.speed_mps * self.tick_s
        left = abs(distance_m)
        sign = 1.0 if distance_m >= 0 else -1.0
        self.moving = True
        try:
            while left > 1e-9:
                d = min(step, left)
                await self._tick()
                self.pose.x += sign * d * math.cos(self.pose.heading)
                self.pose.y += sign * d * math.sin(self.pose.heading)
                self.path.append((self.pose.x, self.pose.y))
                left -= d
        finally:
            self.moving = False

    async def turn(self, angle_deg: float) -> None:
        """Turn ``angle_deg`` in place (counter-clockwise positive)."""
        step = self.turn_dps * self.tick_s
        left = abs(angle_deg)
        sign = 1.0 if angle_deg >= 0 else -1.0
        self.moving = True
        try:
            while left > 1e-9:
                d = min(step, left)
                await self._tick()
                self.pose.heading += sign * math.radians(d)
                left -= d
        finally:
            self.moving = False

    async def dock(self) -> None:
        """Face the origin, drive there, face +x."""
        distance = math.hypot(self.pose.x, self.pose.y)
        if distance > 1e-6:
            await self.turn(_wrap_deg(math.atan2(-self.pose.y, -self.pose.x) - self.pose.heading))
            await self.move(distance)
        await self.turn(_wrap_deg(-self.pose.heading))

    async def halt(self) -> None:
        """Nothing to brake in a simulation: the pose stays where the last tick left it."""
        self.moving = False


def _wrap_deg(angle_rad: float) -> float:
    """An angle in radians as degrees in (-180, 180]."""
    return math.degrees(math.atan2(math.sin(angle_rad), math.cos(angle_rad)))
