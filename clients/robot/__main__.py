"""Drive a (simulated) robot from the agent's spoken commands, over MQTT.

Subscribes to ``<prefix>/<stream>/command`` (the agent's final command events) and executes
``move``, ``turn``, ``dock`` and ``stop`` on a simulated differential-drive robot. Every
executed command is acknowledged on ``<prefix>/<stream>/robot/ack``; refused commands (unknown,
``none``, low confidence, too far, queue full, cancelled by stop) are reported on
``<prefix>/<stream>/robot/refused``. ``stop`` preempts whatever runs.

Example: python -m clients.robot --mqtt mqtt://127.0.0.1:1883 --path-png path.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

import aiomqtt

from clients.common import (
    DEFAULT_PREFIX,
    Backoff,
    MqttUrl,
    cancel_and_wait,
    mqtt_client,
    parse_mqtt_url,
    say,
)
from clients.robot.driver import SimulatedDiffDrive
from clients.robot.png import draw_path
from clients.robot.robot import Robot

PROG = "robot"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.robot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mqtt",
        default=os.environ.get("SALMONN_LIVE_MQTT_URL", "mqtt://127.0.0.1:1883"),
        metavar="URL",
        help="broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (default: "
        "$SALMONN_LIVE_MQTT_URL or the agent's embedded broker, mqtt://127.0.0.1:1883)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the agent's topic prefix")
    parser.add_argument("--stream", default="+", help="only this stream's commands (default all)")
    parser.add_argument("--client-id", default="salmonn-robot", help="MQTT client id")
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.8,
        help="refuse commands less sure than this, 0..1 (stop is never refused for it)",
    )
    parser.add_argument(
        "--max-distance", type=float, default=5.0, metavar="M", help="refuse longer moves"
    )
    parser.add_argument("--speed", type=float, default=0.5, metavar="M/S", help="linear speed")
    parser.add_argument(
        "--turn-rate", type=float, default=90.0, metavar="DEG/S", help="turning speed"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated seconds per real second (10 = ten times faster)",
    )
    parser.add_argument(
        "--path-png", metavar="FILE", help="redraw the robot's path into this PNG after each move"
    )
    parser.add_argument(
        "--exit-after",
        type=int,
        metavar="N",
        help="exit after N commands were handled (acknowledged or refused); for tests and demos",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, url: MqttUrl) -> int:
    """Connect (retrying with backoff), execute commands, reconnect on broker loss."""
    driver = SimulatedDiffDrive(args.speed, args.turn_rate, time_scale=args.time_scale)
    client: aiomqtt.Client | None = None
    handled = 0
    finished = asyncio.Event()

    def draw() -> None:
        if args.path_png:
            draw_path(driver.path, driver.pose.heading).save(args.path_png)

    async def report(what: str, stream: str, body: dict[str, Any]) -> None:
        nonlocal handled
        topic = f"{args.prefix}/{stream}/robot/{what}"
        if client is None:
            say(PROG, f"not connected: {what} not sent on {topic}")
        else:
            try:
                await client.publish(topic, json.dumps(body), qos=1)
            except aiomqtt.MqttError as exc:
                say(PROG, f"could not publish on {topic}: {exc}")
        handled += 1
        if args.exit_after is not None and handled >= args.exit_after:
            finished.set()

    robot = Robot(
        driver,
        report,
        min_confidence=args.min_confidence,
        max_distance_m=args.max_distance,
        on_done=draw,
    )
    draw()
    runner = asyncio.create_task(robot.run(), name="robot-runner")
    backoff = Backoff()
    topic = f"{args.prefix}/{args.stream}/command"
    try:
        while not finished.is_set():
            try:
                async with mqtt_client(url, args.client_id) as connected:
                    client = connected
                    await client.subscribe(topic, qos=1)
                    backoff.reset()
                    say(PROG, f"connected to {url}, waiting for commands on {topic}")
                    listener = asyncio.create_task(_listen(client, robot))
                    done = asyncio.create_task(finished.wait())
                    try:
                        await asyncio.wait({listener, done}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        errors = await cancel_and_wait(listener, done)
                    for error in errors:
                        if isinstance(error, aiomqtt.MqttError):
                            raise error
            except aiomqtt.MqttError as exc:
                client = None
                delay = backoff.next()
                say(PROG, f"broker {url} unreachable ({exc}); retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
    finally:
        await cancel_and_wait(runner)
        draw()
        say(PROG, f"pose {driver.pose}; {robot.counters}")
    return 0


async def _listen(client: aiomqtt.Client, robot: Robot) -> None:
    async for message in client.messages:
        payload = message.payload
        try:
            event = json.loads(payload if isinstance(payload, bytes | str) else b"")
        except ValueError:
            event = {"stream": message.topic.value.split("/")[-2], "text": str(payload)[:200]}
        await robot.handle(event)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run until Ctrl-C (or ``--exit-after``)."""
    args = parse_args(argv)
    try:
        url = parse_mqtt_url(args.mqtt)
    except ValueError as exc:
        say(PROG, f"--mqtt: {exc}")
        return 2
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(args, url))
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return loop.run_until_complete(task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        return 0
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
