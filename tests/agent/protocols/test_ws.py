"""agent/protocols/ws.py: a real server on 127.0.0.1, port 0: /events, /audio, tokens, close
codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agent.protocols.ws import CloseCode, headers_with_token
from agent.runtime.app import Agent, run_agent
from tests.agent.conftest import TIMING, make_config, pcm_s16
from tests.agent.runtime.test_pipeline import collect, finals

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16le mono


def url(agent: Agent, path: str) -> str:
    assert agent.ws is not None
    return f"{agent.ws.url}{path}"


async def recv_json(ws: ClientConnection, timeout_s: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s * TIMING):
        return json.loads(await ws.recv())  # type: ignore[no-any-return]


async def events_until(
    ws: ClientConnection, until: Any, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    out = []
    while True:
        event = await recv_json(ws, timeout_s)
        out.append(event)
        if until(event):
            return out


async def send_audio(agent: Agent, stream: str, pcm: bytes, **hello: Any) -> None:
    async with connect(url(agent, "/audio")) as audio:
        await audio.send(
            json.dumps(
                {"stream": stream, "sample_rate": 16000, "format": "s16le", "channels": 1, **hello}
            )
        )
        ready = await recv_json(audio)
        assert ready["status"] == "ready"
        for i in range(0, len(pcm), FRAME_BYTES):
            await audio.send(pcm[i : i + FRAME_BYTES])


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (e["id"], e["kind"], e["segment"], e["start"], e["end"], e["text"]) for e in finals(events)
    ]


async def test_audio_ingest_gives_the_same_events_as_the_file_source(
    tiny_model: Any, clip_path: Path
) -> None:
    file_config = make_config(
        streams=[{"id": "demo", "source": f"file:{clip_path}"}],
        agent={"exit_at_end": True},
        ws={"listen": "off"},
        worker={"max_batch": 1},
    )
    agent = Agent(file_config, lambda: tiny_model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        await agent.run()
    from_file = comparable(await collect(sub, lambda e: e.get("status") == "stopped"))

    async with run_agent(make_config(worker={"max_batch": 1}), lambda: tiny_model) as agent:  # noqa: SIM117 (the inner with needs the agent's port)
        async with connect(url(agent, "/events?stream=demo&partial=0")) as events:
            assert (await recv_json(events))["status"] == "subscribed"
            await send_audio(agent, "demo", pcm_s16(clip_path))
            received = await events_until(events, lambda e: e.get("status") == "stream_closed")
    assert not any(e["partial"] for e in finals(received))
    assert comparable(received) == from_file
    assert len(from_file) >= 4  # sound, speech (transcript + command), sound


async def test_events_filters_by_stream_and_kind(tiny_model: Any, clip_path: Path) -> None:
    async with run_agent(make_config(), lambda: tiny_model) as agent:  # noqa: SIM117 (the inner with needs the agent's port)
        async with connect(url(agent, "/events?stream=a&kind=caption,status")) as events:
            await recv_json(events)
            await send_audio(agent, "b", pcm_s16(clip_path))  # another stream: filtered out
            await send_audio(agent, "a", pcm_s16(clip_path))
            got = await events_until(
                events, lambda e: e.get("status") == "stream_closed" and e["stream"] == "a"
            )
    assert {e["stream"] for e in got} <= {"a", "*"}
    assert {e["kind"] for e in got} == {"caption", "status"}
    async with (
        run_agent(make_config(), lambda: tiny_model) as agent,
        connect(url(agent, "/events?kind=poem")) as bad,
    ):
        with pytest.raises(ConnectionClosed):
            await recv_json(bad)
        assert bad.close_code == CloseCode.BAD_REQUEST


class _TooSlowReason(logging.Handler):
    """Keeps the reason the agent logs as it closes an /events client as too slow."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reason: str | None = None
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("closing /events client") and ": too slow: " in message:
            self.reason = message.split(": ", 1)[1]
            self.seen.set()


async def _read_once_closed(ws: ClientConnection, closed: asyncio.Event) -> int:
    """Once the agent has closed ``ws`` as too slow, read what it buffered up to the close
    frame, at once (a client that reads nothing for `send_timeout_s` after its close is cut
    without one); the messages read."""
    await closed.wait()
    received = 0
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
            received += 1
    return received


async def test_slow_events_client_does_not_delay_a_fast_one(tiny_model: Any) -> None:
    """A client that does not read fills its socket, then its own queue: it loses events and
    is closed as too slow, while a fast client receives every event of every burst at once.
    Reading again, the slow client sees the documented close: 4429 and the reason logged."""
    config = make_config(ws={"client_queue": 64, "client_max_dropped": 20, "send_timeout_s": 1.0})
    too_slow = _TooSlowReason()
    ws_logger = logging.getLogger("agent.protocols.ws")
    ws_logger.addHandler(too_slow)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(ws_logger.removeHandler, too_slow)
        agent = await stack.enter_async_context(run_agent(config, lambda: tiny_model))
        assert agent.pipeline is not None and agent.ws is not None
        slow = await connect(url(agent, "/events?kind=status"), max_queue=1)
        fast = await connect(url(agent, "/events?kind=status"))
        await recv_json(fast)
        slow_reads = asyncio.create_task(_read_once_closed(slow, too_slow.seen))
        padding = "x" * 4096
        seen = 0
        for burst in range(100):
            for i in range(32):
                agent.pipeline.emit_status("load", f"{burst}/{i}", detail={"pad": padding})
            async with asyncio.timeout(5 * TIMING):  # every burst reaches the fast client promptly
                while seen < (burst + 1) * 32:
                    event = json.loads(await fast.recv())
                    assert event["status"] == "load", event  # never a "dropped" notice
                    seen += 1
        async with asyncio.timeout(30 * TIMING):
            received = await slow_reads
        assert too_slow.reason is not None and too_slow.reason.startswith("too slow: ")
        assert (slow.close_code, slow.close_reason) == (CloseCode.TOO_SLOW, too_slow.reason)
        assert agent.ws.counters["events_too_slow"] == 1
        assert received < 3200
        await fast.close()


async def test_tokens_header_query_and_rejections(
    tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    token = "s3cret-token-value"
    caplog.set_level(logging.DEBUG)
    async with run_agent(
        make_config(ws={"token": token, "auth": True}), lambda: tiny_model
    ) as agent:
        for path, headers in [
            ("/events", None),
            ("/events?token=wrong", None),
            ("/audio", headers_with_token("nope")),
            ("/events?token=", None),
        ]:
            with pytest.raises(InvalidStatus) as info:
                await connect(url(agent, path), additional_headers=headers)
            assert info.value.response.status_code == 401
        async with connect(
            url(agent, "/events"), additional_headers=headers_with_token(token)
        ) as ws:
            assert (await recv_json(ws))["status"] == "subscribed"
        async with connect(url(agent, f"/events?token={token}")) as ws:
            assert (await recv_json(ws))["status"] == "subscribed"
        with pytest.raises(InvalidStatus) as info:
            await connect(url(agent, f"/nowhere?token={token}"))
        assert info.value.response.status_code == 404
    server_logs = [r.getMessage() for r in caplog.records if r.name.startswith("agent")]
    assert any("token=***" in m for m in server_logs)  # the request line was logged, redacted
    assert any("Bearer ***" in m for m in server_logs)
    assert not any(token in m for m in server_logs)


MALFORMED = [
    ("non-JSON hello", ["{stream"], CloseCode.BAD_REQUEST),
    ("hello is a list", ["[1, 2]"], CloseCode.BAD_REQUEST),
    ("missing keys", [json.dumps({"stream": "x"})], CloseCode.BAD_REQUEST),
    (
        "mistyped rate",
        [json.dumps({"stream": "x", "sample_rate": "16k", "format": "s16le", "channels": 1})],
        CloseCode.BAD_REQUEST,
    ),
    (
        "bad stream id",
        [json.dumps({"stream": "a/b", "sample_rate": 16000, "format": "s16le", "channels": 1})],
        CloseCode.BAD_REQUEST,
    ),
    ("binary before hello", [b"\x00\x00"], CloseCode.BAD_REQUEST),
    (
        "mp3",
        [json.dumps({"stream": "x", "sample_rate": 16000, "format": "mp3", "channels": 1})],
        CloseCode.UNSUPPORTED_FORMAT,
    ),
    (
        "absurd rate",
        [json.dumps({"stream": "x", "sample_rate": 1_000_000, "format": "s16le", "channels": 1})],
        CloseCode.UNSUPPORTED_FORMAT,
    ),
    (
        "zero channels",
        [json.dumps({"stream": "x", "sample_rate": 16000, "format": "s16le", "channels": 0})],
        CloseCode.UNSUPPORTED_FORMAT,
    ),
    ("odd bytes", ["HELLO", b"\x00\x01\x02"], CloseCode.BAD_FRAME),
    ("text after hello", ["HELLO", "more"], CloseCode.BAD_FRAME),
    ("oversized frame", ["HELLO", b"\x00" * 70_000], CloseCode.MESSAGE_TOO_BIG),
    ("no hello", [], CloseCode.HELLO_TIMEOUT),
]
HELLO = json.dumps({"stream": "x", "sample_rate": 16000, "format": "s16le", "channels": 1})


async def test_malformed_audio_gets_its_close_code_and_the_server_keeps_serving(
    tiny_model: Any, clip_path: Path
) -> None:
    config = make_config(ws={"max_message_bytes": 65536})
    async with run_agent(config, lambda: tiny_model) as agent:  # noqa: SIM117 (the inner with needs the agent's port)
        async with connect(url(agent, "/events?stream=good&partial=0")) as events:
            await recv_json(events)
            for name, messages, code in MALFORMED:
                async with connect(url(agent, "/audio")) as audio:
                    for message in messages:
                        await audio.send(HELLO if message == "HELLO" else message)
                        if message == "HELLO":
                            assert (await recv_json(audio))["status"] == "ready"
                    async with asyncio.timeout(10 * TIMING):
                        await audio.wait_closed()
                    assert audio.close_code == code, (name, audio.close_code, audio.close_reason)
                    assert audio.close_reason or code == CloseCode.MESSAGE_TOO_BIG, name
            # The same stream id twice at once: the second is refused.
            async with (
                connect(url(agent, "/audio")) as first,
                connect(url(agent, "/audio")) as second,
            ):
                await first.send(HELLO)
                await recv_json(first)
                await second.send(HELLO)
                async with asyncio.timeout(10 * TIMING):
                    await second.wait_closed()
                assert second.close_code == CloseCode.STREAM_IN_USE
            # And a well-behaved stream is still answered.
            await send_audio(agent, "good", pcm_s16(clip_path))
            got = await events_until(events, lambda e: e.get("status") == "stream_closed")
            assert any(e["kind"] == "transcript" for e in got)
