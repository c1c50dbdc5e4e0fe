"""Fuzz: malformed input thrown at a running agent while a well-behaved stream is being heard.

Each kind of bad input gets its documented answer (a close code, an HTTP status, an MQTT
``/error`` message, or one error line and exit code 2 from the command line; see
docs/security.md), nothing crashes (no 1011, no ERROR log), and the well-behaved `/audio`
stream that is mid-utterance while the fuzz runs gets exactly the events it gets alone, in
order (strictly increasing ``seq``), none lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import json
import logging
import re
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe

from agent.cli import main
from agent.config import AgentConfig
from agent.protocols.ws import CloseCode, headers_with_token
from agent.protocols.wyoming import WyomingLimits
from agent.runtime.app import Agent, run_agent
from agent.runtime.fanout import Subscription
from agent.runtime.pipeline import StreamHandle
from streaming.events import SegmentEnded
from tests.agent.conftest import DEMO_WAV, TIMING, make_config, pcm_s16
from tests.agent.mqtt_fixtures import Mosquitto, collector, mosquitto  # noqa: F401
from tests.agent.protocols.test_ws import FRAME_BYTES, comparable, recv_json, url
from tests.agent.protocols.test_wyoming import BAD_INPUTS as WYOMING_BAD_INPUTS
from tests.agent.protocols.test_wyoming import START_16K as WYOMING_START_16K
from tests.agent.protocols.test_wyoming import command_audio as wyoming_command_audio
from tests.agent.protocols.test_wyoming import events_until as wyoming_events_until
from tests.agent.protocols.test_wyoming import header as wyoming_header
from tests.agent.protocols.test_wyoming import raw_exchange as wyoming_raw_exchange
from tests.agent.protocols.test_wyoming import s16 as wyoming_s16
from tests.agent.protocols.test_wyoming import serving as wyoming_serving
from tests.agent.runtime.test_early_commands import BLOCK, RATE, ScriptedWhisper, _clip, _silence

TOKEN = "fuzz-token-Zq8r2Lw"
AUTH = headers_with_token(TOKEN)
GOOD = "good"
#: Where the good stream pauses for the fuzz: inside the clip's speech segment (6.92 to 9.03 s;
#: segments start as "sound" and get their kind at the end), so an utterance is open while the
#: fuzz runs.
SPLIT_S = 8.0
ROOT = Path(__file__).resolve().parents[2]


def hello(stream: str, **changes: Any) -> str:
    """A valid `/audio` hello, with ``changes`` applied."""
    return json.dumps(
        {"stream": stream, "sample_rate": 16000, "format": "s16le", "channels": 1, **changes}
    )


def fuzz_config(
    ws: dict[str, Any] | None = None, worker: dict[str, Any] | None = None, **sections: Any
) -> AgentConfig:
    """Token auth on, small frames, deterministic batches (max_batch 1: the same answers
    whatever else is going on), room for every fuzz connection at once, and a hello timeout
    long enough that dozens of connections starting together on one loop meet it; ``ws`` and
    ``worker`` change those sections."""
    return make_config(
        ws={
            "hello_timeout_s": 3.0 * TIMING,
            "auth": True,
            "token": TOKEN,
            "max_message_bytes": 65536,
            "max_connections": 256,
            "max_streams_per_client": 256,
            "audio_burst_s": 15.0,  # the clip (13 s) at once, for the reference
            **(ws or {}),
        },
        worker={"max_batch": 1, **(worker or {})},
        **sections,
    )


# -- the well-behaved stream ------------------------------------------------------------------


async def good_stream(agent: Agent, pcm: bytes, go_on: asyncio.Event) -> None:
    """Send the clip on `/audio` as stream `good` up to `SPLIT_S`, then (after ``go_on``) the
    rest, then close normally."""
    async with connect(url(agent, "/audio"), additional_headers=AUTH) as audio:
        await audio.send(hello(GOOD))
        assert (await recv_json(audio))["status"] == "ready"
        split = int(SPLIT_S * 32000) // FRAME_BYTES * FRAME_BYTES
        for i in range(0, split, FRAME_BYTES):
            await audio.send(pcm[i : i + FRAME_BYTES])
        await go_on.wait()
        for i in range(split, len(pcm), FRAME_BYTES):
            await audio.send(pcm[i : i + FRAME_BYTES])


async def read_events(
    events: ClientConnection,
    speech_open: asyncio.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Everything an `/events?stream=good` client gets until `good` is closed; sets
    ``speech_open`` when the segment holding `SPLIT_S` starts; ``on_event`` sees each event
    as it comes."""
    out: list[dict[str, Any]] = []
    while True:
        event = await recv_json(events, 60.0)
        out.append(event)
        if on_event is not None:
            on_event(event)
        started = event.get("status") == "segment_started" and event["stream"] == GOOD
        if speech_open is not None and started and 6.0 < event["detail"]["start"] < SPLIT_S:
            speech_open.set()
        if event.get("status") == "stream_closed" and event["stream"] == GOOD:
            return out


@pytest.fixture(scope="module")
def reference(tiny_model: Any, clip_path: Path) -> list[tuple[Any, ...]]:
    """The good stream's final events when nothing else happens."""

    async def alone() -> list[tuple[Any, ...]]:
        async with run_agent(fuzz_config(), lambda: tiny_model) as agent:  # noqa: SIM117 (the inner with needs the agent's port)
            async with connect(
                url(agent, f"/events?stream={GOOD}&partial=0"), additional_headers=AUTH
            ) as events:
                await recv_json(events)
                go_on = asyncio.Event()
                go_on.set()
                await good_stream(agent, pcm_s16(clip_path), go_on)
                return comparable(await read_events(events))

    got = asyncio.run(alone())
    assert len(got) >= 4, "the clip should give a sound, a speech (transcript + command), ..."
    return got


def assert_whole_and_in_order(received: list[dict[str, Any]], reference: list[Any]) -> None:
    """The same final events as alone, strictly increasing seq, no `dropped` notice."""
    seqs = [e["seq"] for e in received if e["seq"] >= 0]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert not [e for e in received if e.get("status") == "dropped"]
    assert comparable(received) == reference
    closed = received[-1]["detail"]
    assert closed["dropped"] == 0 and closed["failed"] == 0, closed


@contextlib.asynccontextmanager
async def background() -> AsyncIterator[Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]]:
    """``start(coro)`` runs a task that is cancelled (and awaited) on exit if still running."""
    tasks: set[asyncio.Task[Any]] = set()

    def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        tasks.add(task)
        return task

    try:
        yield start
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    """Fails if anything is logged at ERROR (a crashed handler logs there, then closes 1011)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- WebSocket cases -------------------------------------------------------------------------

#: Marks where the case's own valid hello goes (and its `ready` is awaited).
HELLO = object()


@dataclass(frozen=True)
class Utf8Raw:
    """A text frame with these bytes, valid UTF-8 or not (the client does not check)."""

    data: bytes


@dataclass(frozen=True)
class Case:
    """Messages sent on `/audio` (str: text, bytes: binary) and the close code they get."""

    name: str
    messages: tuple[Any, ...]
    code: int


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hello_with(**changes: Any) -> str:
    return hello("x", **changes)


def _drop(key: str) -> str:
    data = json.loads(hello("x"))
    del data[key]
    return json.dumps(data)


BAD, UNSUPPORTED, FRAME = CloseCode.BAD_REQUEST, CloseCode.UNSUPPORTED_FORMAT, CloseCode.BAD_FRAME
AUDIO_CASES = [
    # Hellos that are not a JSON object.
    Case("non-JSON hello", ("{stream",), BAD),
    Case("empty text hello", ("",), BAD),
    Case("hello is a list", ("[1, 2]",), BAD),
    Case("hello is null", ("null",), BAD),
    Case("hello is a string", ('"hello"',), BAD),
    Case("deeply nested JSON", (_nested(30_000),), BAD),
    Case("integer of 5000 digits", ('{"sample_rate": ' + "9" * 5000 + "}",), BAD),
    # Missing, unknown and mistyped fields.
    *(Case(f"missing {k}", (_drop(k),), BAD) for k in ("stream", "sample_rate", "format")),
    Case("unknown key", (_hello_with(codec="opus"),), BAD),
    Case("rate as text", (_hello_with(sample_rate="16k"),), BAD),
    Case("rate as float", (_hello_with(sample_rate=16000.0),), BAD),
    Case(
        "rate is infinite",
        ('{"stream": "x", "sample_rate": 1e999, "format": "s16le", "channels": 1}',),
        BAD,
    ),
    Case("channels as bool", (_hello_with(channels=True),), BAD),
    Case("format as number", (_hello_with(format=16),), BAD),
    Case("stream as number", (hello(7),), BAD),  # type: ignore[arg-type]
    Case("stream with slash", (hello("a/b"),), BAD),
    Case("stream with a trailing newline", (hello("robot\n"),), BAD),
    Case("stream with NUL", (hello("a\x00b"),), BAD),
    Case("stream too long", (hello("s" * 65),), BAD),
    Case("empty stream", (hello(""),), BAD),
    # Absurd rates, channel counts and formats.
    *(
        Case(f"rate {r}", (_hello_with(sample_rate=r),), UNSUPPORTED)
        for r in (0, -16000, 7999, 48001, 10**18)
    ),
    *(Case(f"channels {c}", (_hello_with(channels=c),), UNSUPPORTED) for c in (0, -1, 9, 65536)),
    Case("format mp3", (_hello_with(format="mp3"),), UNSUPPORTED),
    Case("format in capitals", (_hello_with(format="S16LE"),), UNSUPPORTED),
    # Binary where the text hello is expected (audio before the hello).
    Case("audio before the hello", (b"\x00\x01" * 800,), BAD),
    # Frames that are not whole samples, empty, or not finite.
    Case("odd byte count s16le", (HELLO, b"\x00\x01\x02"), FRAME),
    Case("one byte", (HELLO, b"\x00"), FRAME),
    Case("empty binary frame", (HELLO, b""), FRAME),
    Case("good then odd frame", (HELLO, b"\x00\x00" * 160, b"\x00" * 321), FRAME),
    # Text where binary frames are expected.
    Case("text after the hello", (HELLO, "more"), FRAME),
    Case("second hello", (HELLO, HELLO), FRAME),
    # Too big: the hello itself, and a frame.
    Case("oversized hello", ("x" * 70_000,), CloseCode.MESSAGE_TOO_BIG),
    Case("oversized frame", (HELLO, b"\x00" * 70_000), CloseCode.MESSAGE_TOO_BIG),
    # Not UTF-8.
    Case("invalid UTF-8 hello", (Utf8Raw(b'{"stream": "\xff\xfe"}'),), CloseCode.INVALID_DATA),
    Case("invalid UTF-8 after hello", (HELLO, Utf8Raw(b"\xc3\x28")), CloseCode.INVALID_DATA),
    # A connection that never says hello.
    Case("no hello", (), CloseCode.HELLO_TIMEOUT),
]
F32_CASES = [
    Case("f32 stereo: 6 bytes", (HELLO, b"\x00" * 6), FRAME),
    Case("f32 NaN", (HELLO, struct.pack("<2f", float("nan"), 0.0)), FRAME),
    Case("f32 infinity", (HELLO, struct.pack("<2f", float("inf"), 0.0)), FRAME),
    # Finite but far out of range (the mean of two would overflow to inf): clipped, accepted;
    # the odd frame after it proves the stream was still being served.
    Case("f32 huge values", (HELLO, struct.pack("<2f", 3e38, 3e38) * 800, b"\x00"), FRAME),
]


async def run_case(agent: Agent, case: Case, stream: str, f32: bool) -> tuple[int | None, str]:
    """Send a case's messages on a fresh `/audio` connection; the close code and reason."""
    own_hello = hello(stream, format="f32le", channels=2) if f32 else hello(stream)
    async with connect(url(agent, "/audio"), additional_headers=AUTH) as audio:
        with contextlib.suppress(ConnectionClosed):
            for message in case.messages:
                if message is HELLO:
                    await audio.send(own_hello)
                    assert (await recv_json(audio))["status"] == "ready", case.name
                elif isinstance(message, Utf8Raw):
                    await audio.send(message.data, text=True)
                else:
                    await audio.send(message)
        async with asyncio.timeout(10 * TIMING):
            await audio.wait_closed()
    return audio.close_code, audio.close_reason or ""


async def flood_tiny_frames(agent: Agent) -> tuple[int | None, str]:
    """One-sample frames as fast as the socket takes them, until the agent closes (1008)."""
    async with connect(url(agent, "/audio"), additional_headers=AUTH) as audio:
        await audio.send(hello("flood"))
        await recv_json(audio)
        async with asyncio.timeout(60 * TIMING):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await audio.send(b"\x01\x00")
                    await asyncio.sleep(0)  # a client of its own would not hold up the others
            await audio.wait_closed()
    return audio.close_code, audio.close_reason or ""


async def half_open_handshake(agent: Agent) -> bytes:
    """A TCP connection that starts an HTTP upgrade and never finishes it: dropped after
    `ws.hello_timeout_s` (websockets' opening handshake timeout)."""
    assert agent.ws is not None and agent.ws.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.ws.port)
    try:
        writer.write(b"GET /audio HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        await writer.drain()
        async with asyncio.timeout(10 * TIMING):
            return await reader.read()  # until EOF
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


#: Raw bytes that are not a valid WebSocket opening handshake: each gets HTTP 400 or a closed
#: connection, and one INFO line in the log (not an ERROR with a traceback).
_UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
)
RAW_HANDSHAKES: list[tuple[str, bytes]] = [
    ("garbage request line", b"GARBAGE\r\n\r\n"),
    ("TLS hello to the plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
    ("HTTP/1.0", b"GET /audio HTTP/1.0\r\n\r\n"),
    ("POST", b"POST /audio HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"),
    ("a 10 kB header line", b"GET /audio HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n"),
    ("300 headers", b"GET /audio HTTP/1.1\r\n" + b"X: y\r\n" * 300 + b"\r\n"),
    ("bad key", b"GET /audio HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"Sec-WebSocket-Key: !\r\n\r\n"),
    ("no key", b"GET /audio HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"\r\n"),
    ("NUL in the path", b"GET /au\x00dio HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"\r\n"),
]


async def raw_handshake(agent: Agent, data: bytes) -> str:
    """Send raw bytes; "closed" if the agent closes without a word or answers with HTTP 4xx."""
    assert agent.ws is not None and agent.ws.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.ws.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10 * TIMING):
            answer = await reader.read()
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return "closed" if answer == b"" or re.match(rb"HTTP/1\.1 4\d\d ", answer) else repr(answer)


def ws_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, masked: bool = True
) -> bytes:
    """One raw WebSocket frame as a client would send it (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([mask_bit | len(payload)])
    else:
        head += bytes([mask_bit | 126]) + struct.pack(">H", len(payload))
    if not masked:
        return head + payload
    key = b"\x12\x34\x56\x78"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


#: Frames that break RFC 6455 itself, sent after a good hello: websockets closes with 1002.
BAD_FRAMES: list[tuple[str, bytes]] = [
    ("unmasked frame", ws_frame(0x2, b"\x00\x00", masked=False)),
    ("RSV1 without an extension", ws_frame(0x2, b"\x00\x00", rsv1=True)),
    ("unknown opcode", ws_frame(0x3, b"\x00\x00")),
    ("control frame of 126 bytes", ws_frame(0x9, b"p" * 126)),
    ("fragmented ping", ws_frame(0x9, b"p", fin=False)),
    ("continuation without a start", ws_frame(0x0, b"\x00\x00")),
    ("close code 999", ws_frame(0x8, struct.pack(">H", 999))),
    (
        "new message inside a fragmented one",
        ws_frame(0x2, b"\x00", fin=False) + ws_frame(0x2, b"\x00"),
    ),
]


async def raw_frames(agent: Agent, frames: bytes) -> int | None:
    """Open `/audio` by hand, send a good hello, then ``frames``; the close code the agent
    answers with (None if it closes without a close frame)."""
    assert agent.ws is not None and agent.ws.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.ws.port)
    try:
        writer.write(
            b"GET /audio HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        )
        async with asyncio.timeout(10 * TIMING):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            writer.write(ws_frame(0x1, hello(f"raw{id(frames)}").encode()) + frames)
            data = await reader.read()  # the ready notice, then the close frame, then EOF
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    while data:  # server frames are unmasked; walk them to the close frame
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, offset = struct.unpack(">H", data[2:4])[0], 4
        payload, data = data[offset : offset + length], data[offset + length :]
        if opcode == 0x8:
            return int(struct.unpack(">H", payload[:2])[0]) if len(payload) >= 2 else None
    return None


EVENTS_QUERIES = ["/events?kind=poem", "/events?kind=%FF%FE", "/events?kind=caption,,status,x"]


async def events_query(agent: Agent, path: str) -> tuple[int | None, str]:
    """An `/events` subscription with a bad query: its close code and reason."""
    async with connect(url(agent, path), additional_headers=AUTH) as events:
        async with asyncio.timeout(10 * TIMING):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await events.recv()
    return events.close_code, events.close_reason or ""


async def http_status(agent: Agent, path: str, headers: Any = None) -> int:
    """The HTTP status of a refused WebSocket handshake (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(agent, path), additional_headers=headers):
            pass
    return info.value.response.status_code


HANDSHAKE_CASES: list[tuple[str, str, Any, int]] = [
    # Unknown paths (checked before the token: nothing is revealed either way).
    ("unknown path", "/nowhere", AUTH, 404),
    ("path in capitals", "/AUDIO", AUTH, 404),
    ("path with a suffix", "/audio/extra", AUTH, 404),
    ("dot-dot path", "/../audio", AUTH, 404),
    ("static file with upgrade", "/index.html", AUTH, 404),
    # Missing, wrong and misplaced tokens.
    ("no token", "/audio", None, 401),
    ("wrong token", "/audio", headers_with_token("wrong"), 401),
    ("token prefix", "/audio", headers_with_token(TOKEN[:-1]), 401),
    ("token plus a character", "/events", headers_with_token(TOKEN + "x"), 401),
    ("token in other case", "/events", headers_with_token(TOKEN.upper()), 401),
    ("empty query token", "/events?token=", None, 401),
    ("wrong query token", "/audio?token=nope", None, 401),
    ("token key in capitals", f"/audio?Token={TOKEN}", None, 401),
    ("token as Basic auth", "/audio", {"Authorization": f"Basic {TOKEN}"}, 401),
    ("token in another header", "/audio", {"X-Token": TOKEN}, 401),
    ("token as subprotocol", "/events", {"Sec-WebSocket-Protocol": TOKEN}, 401),
    ("token in the path", f"/audio/{TOKEN}", None, 404),
    ("non-ASCII token", "/events", {"Authorization": "Bearer t\u00f6ken"}, 401),
]


async def junk_events_client(agent: Agent) -> ClientConnection:
    """An `/events` client that sends junk text and binary (ignored, per docs/agent.md)."""
    events = await connect(url(agent, f"/events?stream={GOOD}&partial=0"), additional_headers=AUTH)
    await recv_json(events)
    for junk in ("hello?", '{"kind": "x"}', b"\x00\xff" * 100, hello(GOOD)):
        await events.send(junk)
    return events


async def fuzz_session(
    agent: Agent, pcm: bytes, on_event: Callable[[dict[str, Any]], None] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The WebSocket fuzz session: every kind of bad `/audio` and handshake input at once,
    while the good stream (``pcm``) is mid-utterance; asserts that each input got its
    documented answer and the server counted the refusals.

    Args:
        agent: A running agent made with `fuzz_config`.
        pcm: The good stream's audio, s16le at 16 kHz.
        on_event: Sees each event of the good `/events` client as it comes.

    Returns:
        What the good `/events` client and the junk-sending one received, up to `good`'s
        ``stream_closed``.
    """
    async with background() as start:
        events = await connect(
            url(agent, f"/events?stream={GOOD}&partial=0"), additional_headers=AUTH
        )
        await recv_json(events)
        speech_open, go_on = asyncio.Event(), asyncio.Event()
        reader = start(read_events(events, speech_open, on_event))
        junk = await junk_events_client(agent)
        junk_reader = start(read_events(junk))
        good = start(good_stream(agent, pcm, go_on))
        async with asyncio.timeout(60 * TIMING):
            await speech_open.wait()  # the good stream is mid-utterance from here on

        async def expect(name: str, got: Awaitable[Any], want: Any) -> str | None:
            value = await got
            if isinstance(value, tuple):
                code, reason = value
                if code != want:
                    return f"{name}: got {code} {reason!r}, expected {want}"
                if code not in (CloseCode.MESSAGE_TOO_BIG, CloseCode.INVALID_DATA) and not reason:
                    return f"{name}: {code} without a reason"
                return None
            return None if value == want else f"{name}: got {value!r}, expected {want!r}"

        checks: list[Awaitable[str | None]] = []
        for i, case in enumerate(AUDIO_CASES):
            checks.append(expect(case.name, run_case(agent, case, f"fz{i}", False), case.code))
        for i, case in enumerate(F32_CASES):
            checks.append(expect(case.name, run_case(agent, case, f"ff{i}", True), case.code))
        for name, path, headers, status in HANDSHAKE_CASES:
            checks.append(expect(name, http_status(agent, path, headers), status))
        checks.append(expect("flood of tiny frames", flood_tiny_frames(agent), CloseCode.TOO_FAST))
        checks.append(expect("half-open handshake", half_open_handshake(agent), b""))
        for name, data in RAW_HANDSHAKES:
            checks.append(expect(name, raw_handshake(agent, data), "closed"))
        for name, frames in BAD_FRAMES:
            checks.append(expect(name, raw_frames(agent, frames), CloseCode.PROTOCOL_ERROR))
        for path in EVENTS_QUERIES:
            checks.append(expect(path, events_query(agent, path), CloseCode.BAD_REQUEST))
        # The stream the good client is feeding cannot be taken over.
        stolen = Case("good's stream id", (hello(GOOD),), CloseCode.STREAM_IN_USE)
        checks.append(expect(stolen.name, run_case(agent, stolen, GOOD, False), stolen.code))
        failures = [f for f in await asyncio.gather(*checks) if f]
        assert not failures, "\n".join(failures)

        go_on.set()
        async with asyncio.timeout(60 * TIMING):
            await good
            received, junk_received = await reader, await junk_reader
        await events.close()
        await junk.close()
    assert agent.ws is not None
    counted = len(AUDIO_CASES) + len(F32_CASES) + 2  # + the flood, + the stolen id
    closed_with_error = agent.ws.counters["audio_closed_with_error"]
    # websockets itself closes 1007 and 1009 (no AudioProtocolError for those).
    itself = sum(c.code in (CloseCode.MESSAGE_TOO_BIG, CloseCode.INVALID_DATA) for c in AUDIO_CASES)
    assert closed_with_error == counted - itself
    assert agent.ws.counters["rejected_auth"] == sum(s == 401 for *_, s in HANDSHAKE_CASES)
    return received, junk_received


async def test_malformed_websocket_input_while_a_good_stream_is_heard(
    tiny_model: Any,
    clip_path: Path,
    reference: list[tuple[Any, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every kind of bad `/audio` and handshake input at once, mid-way through a good stream:
    each gets its documented answer; the good stream loses nothing and keeps its order."""
    config = fuzz_config()
    pcm = pcm_s16(clip_path)
    async with no_errors_logged(caplog), run_agent(config, lambda: tiny_model) as agent:
        received, junk_received = await fuzz_session(agent, pcm)
    assert_whole_and_in_order(received, reference)
    assert comparable(junk_received) == reference
    assert account_for_windows(received, config, pcm) == {"answered": 3}


# -- every window accounted for (issue 14, item 6) --------------------------------------------


def segments_of(pcm: bytes, config: AgentConfig) -> list[tuple[str, float, float]]:
    """What the good stream's segmenter makes of ``pcm`` fed in `/audio`'s frames, offline:
    (kind, start, end). It counts samples, not time, so a loaded machine or a fuzzed server
    cannot change it."""
    from streaming.segmenter import Segmenter

    segmenter = Segmenter(config.stream_settings(GOOD).vad)
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / np.float32(32768.0)
    frame = FRAME_BYTES // 2
    ended = [
        e for i in range(0, samples.size, frame) for e in segmenter.push(samples[i : i + frame])
    ]
    ended += segmenter.flush()
    return [
        (str(e.kind), round(e.start_s, 3), round(e.end_s, 3))
        for e in ended
        if isinstance(e, SegmentEnded)
    ]


def account_for_windows(
    received: list[dict[str, Any]], config: AgentConfig, pcm: bytes
) -> collections.Counter[str]:
    """Fails unless every segment of the good stream became one window that was either
    answered (a final event for each of its tasks reached the client) or dropped with a
    ``window_dropped`` event naming it, its requests and a reason; and the stream's counters
    in ``stream_closed`` say the same.

    Returns:
        How many windows were answered and how many dropped.
    """
    settings = config.stream_settings(GOOD)
    segments = [
        (e["detail"]["segment"], e["detail"]["start"], e["detail"]["end"])
        for e in received
        if e.get("status") == "segment_ended" and e["stream"] == GOOD
    ]
    assert segments == segments_of(pcm, config), "the segmentation changed"
    notices = [e for e in received if e.get("status") == "dropped"]
    assert not notices, f"the good /events client fell behind: {notices}"
    finals: dict[str, set[str]] = collections.defaultdict(set)
    window_at: dict[tuple[str, float], set[str]] = collections.defaultdict(set)
    for e in received:
        if e["kind"] != "status" and e["kind"] != "trigger" and not e["partial"]:
            finals[e["window"]].add(e["kind"])
            window_at[e["segment"], e["end"]].add(e["window"])
    dropped: dict[str, dict[str, Any]] = {}
    for e in received:
        if e.get("status") == "window_dropped" and e["stream"] == GOOD:
            detail = e["detail"]
            dropped[detail["window"]] = detail
            window_at[detail["segment"], detail["end"]].add(detail["window"])
    outcome: collections.Counter[str] = collections.Counter()
    unaccounted = []
    for kind, start, end in segments:
        tasks = set(settings.prompts.tasks_for(kind))
        windows = window_at.pop((kind, end), set())
        if len(windows) != 1:
            unaccounted.append(f"{kind} {start}-{end} s: windows {sorted(windows)}")
            continue
        (window,) = windows
        if window in dropped:
            detail = dropped[window]
            assert detail["reason"] and window not in finals, detail
            assert sorted(detail["requests"]) == sorted(f"{window}/{t}" for t in tasks), detail
            outcome["dropped"] += 1
        elif finals[window] == tasks:
            outcome["answered"] += 1
        else:
            unaccounted.append(f"{window}: finals {sorted(finals[window])}, asked {sorted(tasks)}")
    assert not unaccounted and not window_at, (unaccounted, dict(window_at))
    closed = received[-1]["detail"]
    assert received[-1]["status"] == "stream_closed", received[-1]
    assert closed["windows"] == len(segments), closed
    assert (closed["answered"], closed["dropped"], closed["failed"]) == (
        outcome["answered"],
        outcome["dropped"],
        0,
    ), closed
    return outcome


class HeldModel:
    """The tiny-random model, but once `hold` is set its next audio encoding (the first
    window's) waits on the worker thread until `release` is set: the stream's later windows
    meet a full queue, whatever the speed of the machine."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_audio(self, audio: Any) -> Any:
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(60 * TIMING), "the held window was never released"
        return self._model.encode_audio(audio)


@contextlib.contextmanager
def busy_core() -> Any:
    """One core kept busy by another process while the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


#: (how the session runs, repetition): ``plain`` as the test above, ``held`` with one window
#: waiting at most (``worker.max_pending_windows = 1``) and the worker held on the first
#: window until every segment has ended, so the others are dropped; ``loaded`` plain, with
#: one core busy.
SESSIONS = [
    pytest.param("held", 0, id="held-0"),
    *(
        pytest.param(how, i, id=f"{how}-{i}", marks=pytest.mark.slow)
        for how in ("plain", "held", "loaded")
        for i in (1, 2, 3)
    ),
]


@pytest.mark.parametrize(("how", "repetition"), SESSIONS)
async def test_every_window_of_the_good_stream_is_answered_or_reported_dropped(
    tiny_model: Any, how: str, repetition: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The fuzz session on the whole demo scene (six segments), repeated: each segment the
    good stream's segmenter emitted became a window that the good client either got every
    final event of, or was told was dropped (``window_dropped``, with its reason); the
    counters in ``stream_closed`` agree. Overload drops windows, never silently."""
    pcm = pcm_s16(DEMO_WAV)
    held = how == "held"
    config = fuzz_config(
        ws={"audio_burst_s": 30.0},  # the rest of the scene at once after the fuzz
        worker={"max_pending_windows": 1} if held else None,
    )
    model = HeldModel(tiny_model)
    expected = len(segments_of(pcm, config))
    seen: list[dict[str, Any]] = []

    def release_when_all_ended(event: dict[str, Any]) -> None:
        # A window is queued at once after its segment_ended is published.
        if event.get("status") == "segment_ended":
            seen.append(event)
            if len(seen) == expected:
                model.release.set()

    load = busy_core() if how == "loaded" else contextlib.nullcontext()
    with load:
        async with no_errors_logged(caplog), run_agent(config, lambda: model) as agent:
            if held:
                model.hold.set()
            else:
                model.release.set()
            received, _ = await fuzz_session(agent, pcm, release_when_all_ended)
    seqs = [e["seq"] for e in received if e["seq"] >= 0]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    outcome = account_for_windows(received, config, pcm)
    if held:
        # The first window ran, the last waited, the four between were pushed out one by
        # one within a second: each has its own event (`overload` sums up one a second).
        assert outcome == {"answered": 2, "dropped": expected - 2}, outcome
    else:
        assert outcome == {"answered": expected}, outcome


def _whisper_config(**changes: Any) -> AgentConfig:
    """Whisper transcripts and grammar-read commands (the defaults of `run`), no `/events`."""
    model = {"transcript": "whisper", "command": "whisper", "early_command_ms": 0.0}
    return make_config(model={**model, **changes.pop("model", {})}, ws={"listen": "off"}, **changes)


def _push(handle: StreamHandle, audio: np.ndarray) -> None:
    """Feed ``audio`` in 20 ms blocks without yielding to the loop (a burst)."""
    for k in range(0, audio.size, BLOCK):
        handle.push(audio[k : k + BLOCK])


async def _finish(handle: StreamHandle, sub: Subscription) -> list[dict[str, Any]]:
    """End the stream, wait until its windows are answered; every event published so far."""
    handle.end()
    async with asyncio.timeout(30 * TIMING):
        await handle.wait_done()
    events = []
    while (event := sub.get_nowait()) is not None:
        events.append(event.data)
    return events


async def test_a_full_queue_never_drops_an_early_command_read(tiny_model: Any) -> None:
    """An early command read still waiting when its segment ends is the segment's command
    (the segment's own window then asks none). With one window allowed to wait, the
    segment's window used to push it out: the command was lost, and only counted."""
    model = ScriptedWhisper(tiny_model, lambda s: "Stop.")
    config = _whisper_config(
        model={"early_command_ms": 250, "command_whisper": "model"},
        vad={"end_silence_ms": 700},
        worker={"max_pending_windows": 1},
    )
    agent = Agent(config, lambda: model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert agent.pipeline is not None
        handle = agent.pipeline.open_stream(config.stream_settings("s"), origin="test")
        # At once: the early read (taken in the pause) still waits when the segment ends.
        _push(handle, np.concatenate([_silence(0.5), _clip(), _silence(1.0)]))
        assert handle.counters["early_windows"] == 1 and handle.counters["windows"] == 1
        events = await _finish(handle, sub)
    commands = [e for e in events if e["kind"] == "command"]
    assert [c["intent"] for c in commands] == [{"intent": "stop"}], events
    assert not [e for e in events if e.get("status") in ("window_dropped", "overload")]
    assert (handle.counters["answered"], handle.counters["dropped"]) == (1, 0)


async def test_a_window_for_the_fast_lane_pushes_no_waiting_window_out(tiny_model: Any) -> None:
    """Whisper-only windows (transcript and command) that come while the LLM runs go to the
    fast lane, not the queue, so they need no room in it: one used to drop the caption
    window waiting there all the same."""
    model = HeldModel(ScriptedWhisper(tiny_model, lambda s: "Stop."))
    config = _whisper_config(worker={"max_pending_windows": 1})
    scene, rate = soundfile.read(DEMO_WAV, dtype="float32")
    assert rate == RATE
    agent = Agent(config, lambda: model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert agent.pipeline is not None
        handle = agent.pipeline.open_stream(config.stream_settings("s"), origin="test")
        model.hold.set()
        _push(handle, scene[: 6 * RATE])  # the alarm (3.1-5.2 s): its caption is held
        assert await asyncio.to_thread(model.entered.wait, 30 * TIMING)
        _push(handle, scene[6 * RATE : 14 * RATE])  # speech (fast lane), the doorbell (waits)
        assert handle.counters["windows"] == 3 and len(handle.pending) == 1
        _push(handle, scene[14 * RATE : 18 * RATE])  # speech again: the fast lane
        assert handle.counters["windows"] == 4
        model.release.set()
        events = await _finish(handle, sub)
    kinds = collections.Counter(
        e["kind"] for e in events if e["kind"] != "status" and not e["partial"]
    )
    assert kinds == {"caption": 2, "transcript": 2, "command": 2}, kinds
    assert not [e for e in events if e.get("status") == "window_dropped"]
    assert (handle.counters["answered"], handle.counters["dropped"]) == (4, 0)


# -- MQTT control ----------------------------------------------------------------------------

#: Malformed `salmonn/<stream>/set` payloads: each gets one `salmonn/<stream>/error` message.
BAD_CONTROL: list[tuple[str, bytes]] = [
    ("not JSON", b"{mute"),
    ("empty payload", b""),
    ("invalid UTF-8", b'{"mute": "\xff"}'),
    ("a list", b"[true]"),
    ("null", b"null"),
    ("a number", b"42"),
    ("a string", b'"mute"'),
    ("empty object", b"{}"),
    ("deeply nested", _nested(100_000).encode()),
    ("unknown key", b'{"volume": 11}'),
    ("mute as a string", b'{"mute": "yes"}'),
    ("mute as a number", b'{"mute": 1}'),
    ("speaking as null", b'{"speaking": null}'),
    ("lora_scale NaN", b'{"lora_scale": NaN}'),
    ("lora_scale infinite", b'{"lora_scale": 1e999}'),
    ("lora_scale negative", b'{"lora_scale": -1}'),
    ("lora_scale as text", b'{"lora_scale": "0.5"}'),
    ("questions not a list", b'{"questions": "Is it raining?"}'),
    ("question not an object", b'{"questions": [1]}'),
    ("question without text", b'{"questions": [{"kinds": ["speech"]}]}'),
    ("question with empty text", b'{"questions": [{"text": "  "}]}'),
    ("question with unknown kind", b'{"questions": [{"text": "Rain?", "kinds": ["music"]}]}'),
    ("valid key plus a bad one", b'{"mute": true, "lora_scale": "x"}'),
    ("one megabyte", b'{"mute": "' + b"x" * 1_000_000 + b'"}'),
    # Each question is one more LLM request per window, its text part of the prompt.
    ("17 questions", json.dumps({"questions": [{"text": f"Q{i}?"} for i in range(17)]}).encode()),
    ("a question of 1001 characters", json.dumps({"questions": [{"text": "x" * 1001}]}).encode()),
]


async def test_malformed_mqtt_control_while_a_good_stream_is_heard(
    tiny_model: Any,
    clip_path: Path,
    reference: list[tuple[Any, ...]],
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every bad control payload gets one `/error` message and changes nothing; control of
    unknown streams and odd topics is refused or ignored; the agent stays connected, a good
    command still works, and the good stream's events are whole and in order."""
    config = fuzz_config(
        mqtt={
            "enabled": True,
            "url": mosquitto.url,
            "outbox_dir": str(tmp_path / "outbox"),
            "discovery": False,
            "client_id": "fuzzed-agent",
        }
    )
    agent = Agent(config, lambda: tiny_model)
    async with (
        no_errors_logged(caplog),
        collector(mosquitto.port, "salmonn/+/error", "salmonn/+/state", client_id="fz") as c,
        agent,
        background() as start,
    ):
        publisher = agent.mqtt
        assert publisher is not None
        events = await connect(
            url(agent, f"/events?stream={GOOD}&partial=0"), additional_headers=AUTH
        )
        await recv_json(events)
        speech_open, go_on = asyncio.Event(), asyncio.Event()
        reader = start(read_events(events, speech_open))
        good = start(good_stream(agent, pcm_s16(clip_path), go_on))
        async with asyncio.timeout(60 * TIMING):
            await speech_open.wait()  # the good stream is mid-utterance from here on
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="fuzzer") as remote:
            for _name, payload in BAD_CONTROL:
                await remote.publish(f"salmonn/{GOOD}/set", payload, qos=1)
            await remote.publish("salmonn/nobody/set", b'{"mute": true}', qos=1)
            for topic in (f"salmonn/{GOOD}/x/set", "salmonn//set", f"salmonn/{GOOD}/SET"):
                await remote.publish(topic, b'{"mute": true}', qos=1)  # not control: ignored
            # Last, a valid command: once its state is published, every earlier one is handled.
            await remote.publish(f"salmonn/{GOOD}/set", b'{"lora_scale": 2.5}', qos=1)
            got = await c.wait_for(lambda ms: any(m.topic.endswith("/state") for m in ms), 60)
        errors = [json.loads(m.payload) for m in got if m.topic == f"salmonn/{GOOD}/error"]
        assert len(errors) == len(BAD_CONTROL), [e["error"] for e in errors]
        assert all(e["error"] for e in errors)
        assert [m.topic for m in got if m.topic.endswith("/error")].count(
            "salmonn/nobody/error"
        ) == 1
        states = [json.loads(m.payload) for m in got if m.topic.endswith("/state")]
        assert states == [{"lora_scale": 2.5}]  # nothing from the bad payloads got applied
        assert agent.pipeline is not None
        handle = agent.pipeline.streams[GOOD]
        assert not handle.muted and handle.lora_scale == 2.5
        assert publisher.connected
        assert publisher.stats()["control_errors"] == len(BAD_CONTROL) + 1
        go_on.set()
        async with asyncio.timeout(60 * TIMING):
            await good
            received = await reader
        await events.close()
    assert_whole_and_in_order(received, reference)


# -- the command line: truncated and corrupt audio files --------------------------------------


def _tone_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return path


def _wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def _truncated(tmp: Path) -> Path:
    data = _tone_wav(tmp / "whole.wav").read_bytes()
    (tmp / "truncated.wav").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.wav"


def _header_only(tmp: Path) -> Path:
    (tmp / "header.wav").write_bytes(_wav_header(16000, 1, 32000))
    return tmp / "header.wav"


def _half_header(tmp: Path) -> Path:
    (tmp / "half.wav").write_bytes(_wav_header(16000, 1, 32000)[:20])
    return tmp / "half.wav"


def _random_bytes(tmp: Path) -> Path:
    rng = np.random.default_rng(8)
    (tmp / "noise.wav").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return tmp / "noise.wav"


def _corrupt_flac(tmp: Path) -> Path:
    path = tmp / "bad.flac"
    t = np.arange(32000) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    data[200:] = rng.integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _text_as_wav(tmp: Path) -> Path:
    (tmp / "notes.wav").write_text("not audio\n" * 100)
    return tmp / "notes.wav"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.wav").write_bytes(b"")
    return tmp / "empty.wav"


def _rate_one_hz(tmp: Path) -> Path:
    """A header claiming 1 Hz: resampled to 16 kHz it would be 16000 times longer."""
    (tmp / "slow.wav").write_bytes(_wav_header(1, 1, 200_000) + b"\x00\x10" * 100_000)
    return tmp / "slow.wav"


def _zero_channels(tmp: Path) -> Path:
    (tmp / "nochan.wav").write_bytes(_wav_header(16000, 0, 3200) + b"\x00" * 3200)
    return tmp / "nochan.wav"


def _nan(tmp: Path) -> Path:
    audio = np.zeros(16000, np.float32)
    audio[500] = np.nan
    soundfile.write(tmp / "nan.wav", audio, 16000, subtype="FLOAT")
    return tmp / "nan.wav"


def _missing(tmp: Path) -> Path:
    return tmp / "missing.wav"


def _directory(tmp: Path) -> Path:
    (tmp / "dir.wav").mkdir()
    return tmp / "dir.wav"


BAD_FILES: list[tuple[Callable[[Path], Path], str]] = [
    (_truncated, "truncated"),
    (_header_only, "truncated|zero-length"),
    (_half_header, "cannot decode|truncated"),
    (_random_bytes, "cannot decode"),
    (_corrupt_flac, "corrupt|cannot decode|truncated"),
    (_text_as_wav, "cannot decode"),
    (_empty, "cannot decode|zero-length"),
    (_rate_one_hz, "sample rate"),
    (_zero_channels, "cannot decode|channels"),
    (_nan, "NaN or infinite"),
    (_missing, "no such file"),
    (_directory, "not a regular file"),
]
IDS = [make.__name__.strip("_") for make, _ in BAD_FILES]


@pytest.mark.parametrize("command", ["ask", "segment"])
@pytest.mark.parametrize(("make", "message"), BAD_FILES, ids=IDS)
def test_bad_audio_files_get_one_error_line_and_exit_code_2(
    command: str,
    make: Callable[[Path], Path],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = make(tmp_path)
    argv = [command, str(path)] + (
        ["Describe.", "--model", "tiny-random"] if command == "ask" else []
    )
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"salmonn-live {command}: error: "), err
    assert re.search(message, lines[-1]), lines[-1]
    assert "Traceback" not in err


def test_a_corrupt_file_through_the_real_command(tmp_path: Path) -> None:
    """The entry point as a process: exit status 2, one error line, no traceback (`ask` goes
    through the same `main`, tested in process above: its process would import torch)."""
    command = "segment"
    path = _truncated(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", command, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120 * TIMING,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"salmonn-live {command}: error: ")
    assert "truncated" in done.stderr


def _huge_float_stereo(tmp: Path) -> Path:
    """A float WAV far beyond full scale (3e38): averaging its channels would overflow."""
    soundfile.write(tmp / "huge.wav", np.full((16000, 2), 3e38, np.float32), 16000, "FLOAT")
    return tmp / "huge.wav"


def test_out_of_range_float_audio_is_clipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float audio beyond +-1 (a file for `ask`'s loader and `segment`, raw stdin) is clipped,
    not averaged into inf (warnings are errors here, so an overflow would fail the test)."""
    from streaming.audio_file import load_audio

    path = _huge_float_stereo(tmp_path)
    audio = load_audio(path)
    assert audio.size and float(np.abs(audio).max()) <= 1.0
    assert main(["segment", str(path), "--json"]) == 0
    assert "segments" in json.loads(capsys.readouterr().out)
    raw = np.full((16000, 2), -3e38, "<f4").tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert main(["segment", "-", "--json", "--format", "f32le", "--channels", "2"]) == 0
    assert "segments" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--rate", "1"], b"\x00\x01" * 100, r"--rate 1 Hz out of range"),
        (["--rate", "10000000"], b"\x00\x01" * 100, r"--rate 10000000 Hz out of range"),
        (["--channels", "0"], b"\x00\x01" * 100, r"channel"),
        (["--channels", "1000"], b"\x00\x01" * 100, r"--channels 1000 out of range"),
        (["--format", "f32le"], struct.pack("<2f", 0.5, float("nan")) * 100, r"NaN or infinite"),
        ([], b"", r"no audio received"),
    ],
    ids=["rate 1", "rate 10 MHz", "0 channels", "1000 channels", "NaN", "empty"],
)
def test_bad_raw_stdin_for_segment(
    args: list[str],
    stdin: bytes,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert main(["segment", "-", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert re.search(message, err.strip().splitlines()[-1]), err


# -- Wyoming (issue 18) -----------------------------------------------------------------------
#
# Each bad input alone, with its code, is tested in tests/agent/protocols/test_wyoming.py; here
# they all come at once, with seeded binary garbage and randomly mutated sessions, while a good
# client streams a command through the `wyoming` package's own client.


async def hashing_transcriber(audio: np.ndarray) -> AsyncIterator[str]:
    """The text is a digest of the samples, so the good client's transcript shows that its
    audio came through whole; streamed in two steps, as a model's partial texts are."""
    yield "heard"
    await asyncio.sleep(0)
    yield f"heard {audio.size} samples, sha256 {hashlib.sha256(audio.tobytes()).hexdigest()[:16]}"


def wyoming_garbage(seed: int = 18) -> list[bytes]:
    """Binary garbage: random bytes (with and without newlines), long lines of NUL and 0xff,
    random data sections and payloads behind valid headers, and a valid session (transcribe,
    audio-start, three chunks, audio-stop) with 1 to 8 of its bytes replaced at random."""
    rng = np.random.default_rng(seed)
    chunks = b"".join(
        wyoming_header("audio-chunk", payload_length=640) + rng.bytes(640) for _ in range(3)
    )
    session = (
        wyoming_header("transcribe", data={"language": "en"})
        + WYOMING_START_16K
        + chunks
        + wyoming_header("audio-stop")
    )
    cases = [rng.bytes(int(rng.integers(1, 4096))) for _ in range(8)]
    for _ in range(4):
        blob = bytearray(rng.bytes(int(rng.integers(64, 4096))))
        for at in rng.integers(0, len(blob), 4):
            blob[at] = 0x0A  # newlines: several "header lines" of garbage
        cases.append(bytes(blob))
    cases += [b"\0" * 1000 + b"\n", b"\xff" * 1000 + b"\n"]
    cases.append(wyoming_header("transcribe", data_length=200) + rng.bytes(200))
    cases.append(
        WYOMING_START_16K + wyoming_header("audio-chunk", payload_length=1000) + rng.bytes(1050)
    )
    for flips in range(1, 9):
        mutated = bytearray(session)
        for at in rng.integers(0, len(mutated), flips):
            mutated[at] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    return cases


async def test_malformed_wyoming_input_while_a_good_client_transcribes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every bad input of the Wyoming table, two stalled clients and 24 pieces of binary
    garbage, each on its own connection and all at once, while a good client is mid-command:
    the good client gets exactly what it gets alone, each table case its code and each stall
    its time-out, every garbage connection ends (with at most one error, never `failed`),
    nothing is logged as an error, and the server answers afterwards."""
    pcm = wyoming_s16(wyoming_command_audio())

    async def good(port: int, fuzz: Callable[[], Awaitable[Any]]) -> list[tuple[str, str]]:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            step = 640  # 20 ms
            task = None
            for i in range(0, len(pcm), step):
                chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + step])
                await client.write_event(chunk.event())
                if task is None and i > len(pcm) // 3:
                    task = asyncio.create_task(fuzz())  # the stream is open while it runs
                await asyncio.sleep(0)
            assert task is not None
            await task
            await client.write_event(AudioStop().event())
            events = await wyoming_events_until(client, "transcript-stop")
        return [(e.type, str(e.data.get("text", ""))) for e in events]

    async with wyoming_serving(hashing_transcriber) as alone:
        reference = await good(alone.address.port, lambda: asyncio.sleep(0))
    assert reference[-2][1].startswith(f"heard {len(pcm) // 2} samples")

    garbage = wyoming_garbage()
    limits = WyomingLimits(
        idle_timeout_s=0.5 * TIMING, audio_timeout_s=0.5 * TIMING, max_connections=128
    )
    results: list[list[Any]] = []
    async with (
        no_errors_logged(caplog),
        wyoming_serving(hashing_transcriber, limits=limits) as server,
    ):
        port = server.address.port

        async def fuzz() -> None:
            results.extend(
                await asyncio.gather(
                    *(wyoming_raw_exchange(port, data) for _, data, _ in WYOMING_BAD_INPUTS),
                    *(
                        wyoming_raw_exchange(port, data, eof=False)
                        for data in (b'{"type": "desc', WYOMING_START_16K)
                    ),
                    *(wyoming_raw_exchange(port, data) for data in garbage),
                )
            )

        seen = await good(port, fuzz)
        async with AsyncTcpClient("127.0.0.1", port) as client:  # still serving
            await client.write_event(Describe().event())
            await wyoming_events_until(client, "info")
    assert seen == reference
    table = len(WYOMING_BAD_INPUTS)
    codes = [[e.data.get("code") for e in events if e.type == "error"] for events in results]
    assert codes[:table] == [[str(kind)] for _, _, kind in WYOMING_BAD_INPUTS]
    assert codes[table : table + 2] == [["timeout"], ["timeout"]]
    for events in results[table + 2 :]:
        errors = [i for i, e in enumerate(events) if e.type == "error"]
        assert errors in ([], [len(events) - 1]), [e.type for e in events]  # an error ends it
    closed = server.stats.as_dict()["closed"]
    assert closed["failed"] == 0 and closed["busy"] == 0, closed
    assert sum(closed.values()) == sum(map(len, codes))  # one count per error sent
    print(f"wyoming fuzz: {len(results)} bad connections at once, closed {closed}")
