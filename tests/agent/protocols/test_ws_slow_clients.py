"""agent/protocols/ws.py: `/events` clients that stop reading are closed with 4429 and its
reason, and see that close code once they read again; fast clients lose nothing meanwhile.

A real `WsServer` on 127.0.0.1 (port 0) with the real `EventBus`; only the pipeline is a stub
(the server asks it for nothing but `emit_status` on `/events`). Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent.events import StatusEvent, WallClock
from agent.protocols.ws import CloseCode, WsServer
from agent.runtime.fanout import EventBus
from agent.runtime.pipeline import Pipeline
from tests.agent.conftest import TIMING, make_config

SLOW_CLIENTS = 3
FAST_CLIENTS = 2
BURST = 32  # events per burst: well under `client_queue`, so fast clients never drop one
PAD = "x" * 1000  # about 1 kB an event, like a caption with its detail
#: A slow client, once it reads again, takes one message per pause: reading its backlog (tens of
#: kB) takes far longer than `close_timeout_s`, as for a client on a poor link.
READ_PAUSE_S = 0.02


class _StubPipeline:
    """What `WsServer` needs of a `Pipeline` for `/events`: status events onto the bus."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def emit_status(
        self,
        status: str,
        message: str,
        *,
        stream: str = "*",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        self.bus.publish(_status(status, message, dict(detail or {})))


def _status(status: str, message: str, detail: dict[str, Any]) -> StatusEvent:
    return StatusEvent(
        id="status:0", seq=0, stream="*", status=status, message=message, emitted=0.0, detail=detail
    )


class _TooSlowLog(logging.Handler):
    """Sets one event per client address as the agent logs that it closes it as too slow."""

    _ADDRESS = re.compile(r"closing /events client \('127\.0\.0\.1', (\d+)\)")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.closed: dict[int, asyncio.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = self._ADDRESS.search(record.getMessage())
        if match:
            self.closed.setdefault(int(match.group(1)), asyncio.Event()).set()

    def event(self, port: int) -> asyncio.Event:
        return self.closed.setdefault(port, asyncio.Event())


@contextlib.asynccontextmanager
async def _server(**ws: Any) -> AsyncIterator[tuple[WsServer, EventBus, _TooSlowLog]]:
    clock = WallClock()
    bus = EventBus(clock)
    log = _TooSlowLog()
    ws_logger = logging.getLogger("agent.protocols.ws")
    ws_logger.addHandler(log)
    config = make_config(ws=ws)
    try:
        async with WsServer(config, cast(Pipeline, _StubPipeline(bus)), bus, clock) as server:
            yield server, bus, log
            bus.close()  # as the agent does before closing the server
    finally:
        ws_logger.removeHandler(log)


async def _slow_client(port: int) -> ClientConnection:
    """A client on a poor link: a 4 KiB receive buffer, one message queued, and (until the test
    reads) no reading at all."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await connect(f"ws://127.0.0.1:{port}/events", sock=sock, max_queue=1)


async def _read_slowly_to_the_end(ws: ClientConnection) -> int:
    """Read one message per `READ_PAUSE_S` until the connection closes; the messages read."""
    read = 0
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
            read += 1
            await asyncio.sleep(READ_PAUSE_S)  # the slowness being simulated
    return read


async def _read_burst(ws: ClientConnection, seqs: list[int], count: int) -> None:
    async with asyncio.timeout(10 * TIMING):
        for _ in range(count):
            event = json.loads(await ws.recv())
            assert event["status"] == "load", event  # never a `dropped` notice
            seqs.append(event["detail"]["seq"])


async def _publish_until(closed: asyncio.Event, bus: EventBus) -> None:
    """Publish bursts of padded events until the client is closed as too slow."""
    while not closed.is_set():
        for _ in range(BURST):
            bus.publish(_status("load", "", {"pad": PAD}))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):  # publish while waiting
                await closed.wait()


@pytest.mark.parametrize("send_buffer_bytes", [4096, 65536])
async def test_stalled_clients_see_4429_with_its_reason_and_fast_ones_lose_nothing(
    send_buffer_bytes: int,
) -> None:
    """Slow clients stop reading while events go out: each send to them blocks, and after
    `send_timeout_s` the agent closes them with 4429. They read again only then, slowly (their
    backlog takes longer than `close_timeout_s` to read): each still gets the close frame with
    4429 and the documented reason, and the agent stops queueing events for them at once. The
    fast clients get every event, in order, before and after."""
    send_timeout_s = 1.0 * TIMING
    async with asyncio.timeout(90 * TIMING):  # covers the shutdown too
        async with _server(
            send_timeout_s=send_timeout_s,
            close_timeout_s=0.1,
            send_buffer_bytes=send_buffer_bytes,
            client_queue=4 * BURST,
            client_max_dropped=1_000_000,  # only the send timeout closes them here
        ) as (server, bus, log):
            assert server.port is not None
            slow = [await _slow_client(server.port) for _ in range(SLOW_CLIENTS)]
            fast = [
                await connect(f"ws://127.0.0.1:{server.port}/events") for _ in range(FAST_CLIENTS)
            ]
            for ws in fast:
                async with asyncio.timeout(10 * TIMING):
                    assert json.loads(await ws.recv())["status"] == "subscribed"
            closed = [log.event(ws.local_address[1]) for ws in slow]
            fast_seqs: list[list[int]] = [[] for _ in fast]
            published = 0

            async def publish_burst() -> None:
                nonlocal published
                for _ in range(BURST):
                    bus.publish(_status("load", str(published), {"seq": published, "pad": PAD}))
                    published += 1
                for ws, seqs in zip(fast, fast_seqs, strict=True):
                    await _read_burst(ws, seqs, BURST)

            # Publish until every slow client has been closed: their sends block on full buffers.
            async with asyncio.timeout(60 * TIMING):
                while not all(event.is_set() for event in closed):
                    await publish_burst()
                    await asyncio.sleep(0)
            assert server.counters["events_too_slow"] == SLOW_CLIENTS
            # The agent no longer queues events for them (checked below): only the fast ones.
            subscribed_while_closing = len(bus.subscriptions)
            # ... and it keeps serving the fast clients while the slow ones still have not read.
            for _ in range(4):
                await publish_burst()

            async with asyncio.timeout(60 * TIMING):
                read = await asyncio.gather(*(_read_slowly_to_the_end(ws) for ws in slow))
            reason = f"too slow: a message took over {send_timeout_s:g} s to send"
            for ws, messages in zip(slow, read, strict=True):
                assert (ws.close_code, ws.close_reason) == (CloseCode.TOO_SLOW, reason), messages
                assert messages < published
            assert subscribed_while_closing == FAST_CLIENTS
            for seqs in fast_seqs:
                assert seqs == list(range(published))
            for ws in fast:
                await ws.close()


async def test_a_client_that_never_reads_again_is_dropped_and_does_not_hold_up_shutdown() -> None:
    """A slow client closed with 4429 that then reads nothing more is dropped once it has read
    nothing for `send_timeout_s`, and the server still shuts down (the old code waited on it
    for ever)."""
    dropped = _LogFlag("dropping /events client")
    ws_logger = logging.getLogger("agent.protocols.ws")
    level = ws_logger.level
    ws_logger.setLevel(logging.INFO)  # the drop is an INFO record
    ws_logger.addHandler(dropped)
    try:
        async with asyncio.timeout(60 * TIMING):  # covers the shutdown too
            async with _server(
                send_timeout_s=1.0 * TIMING, close_timeout_s=0.1, send_buffer_bytes=4096
            ) as (server, bus, log):
                assert server.port is not None
                ws = await _slow_client(server.port)
                closed = log.event(ws.local_address[1])
                await _publish_until(closed, bus)
                await dropped.seen.wait()
                assert bus.subscriptions == []
            ws.transport.abort()
    finally:
        ws_logger.removeHandler(dropped)
        ws_logger.setLevel(level)


async def test_a_client_whose_reading_comes_in_steps_still_sees_4429() -> None:
    """A slow reader's own buffers make its progress come in steps: it reads a handful of
    messages, then nothing for longer than `send_timeout_s` while its library's queue and
    receive buffer drain (`bench load`'s slow clients: a step every 11 s against a 10 s
    timeout). Such a client is still reading its backlog: it must reach the 4429 close frame,
    not be dropped as one that stopped (1006)."""
    send_timeout_s = 1.0 * TIMING
    async with asyncio.timeout(90 * TIMING):
        async with _server(
            send_timeout_s=send_timeout_s, close_timeout_s=0.1, send_buffer_bytes=4096
        ) as (server, bus, log):
            assert server.port is not None
            ws = await _slow_client(server.port)
            closed = log.event(ws.local_address[1])
            await _publish_until(closed, bus)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.sleep(1.5 * send_timeout_s)  # a step of no progress
                    for _ in range(8):
                        await ws.recv()
            assert ws.close_code == CloseCode.TOO_SLOW, ws.close_code


class _LogFlag(logging.Handler):
    """Set once a record containing ``needle`` is logged."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()
