"""What every example client needs: capped backoff, MQTT URLs and one-line messages.

Kept tiny on purpose: copy this file along with the client you copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

#: The agent's default `[mqtt] prefix` (first level of every topic).
DEFAULT_PREFIX = "salmonn"
#: The agent's default WebSocket address (`salmonn-live run --ws`).
DEFAULT_AGENT_URL = "ws://127.0.0.1:8765"
#: Environment variable holding the WebSocket token (the agent reads the same one).
TOKEN_ENV = "SALMONN_LIVE_WS_TOKEN"


def say(prog: str, message: str) -> None:
    """One line on stderr, prefixed with the client's name (status, warnings, errors)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


class Backoff:
    """Capped exponential backoff with jitter: first_s, 2*first_s, ... up to cap_s.

    Args:
        first_s: First delay.
        cap_s: Longest delay.
    """

    def __init__(self, first_s: float = 0.5, cap_s: float = 10.0) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError(f"backoff: expected 0 < first_s <= cap_s, got {first_s}, {cap_s}")
        self.first_s = first_s
        self.cap_s = cap_s
        self._next = first_s

    def next(self) -> float:
        """The delay to wait now (±10 % jitter); doubles the following one, up to the cap."""
        delay = self._next
        self._next = min(self._next * 2.0, self.cap_s)
        return delay * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        """After a success: the next failure waits `first_s` again."""
        self._next = self.first_s


@dataclass(frozen=True)
class MqttUrl:
    """A parsed ``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse a broker URL (port 1883, or 8883 for mqtts, when absent).

    Raises:
        ValueError: Another scheme, no host, a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"expected mqtt://[user:pass@]host[:port] or mqtts://..., got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    tls = parts.scheme == "mqtts"
    return MqttUrl(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@contextlib.asynccontextmanager
async def mqtt_client(url: MqttUrl, client_id: str) -> AsyncIterator[aiomqtt.Client]:
    """A connected aiomqtt client (raises `aiomqtt.MqttError` when the broker is unreachable)."""
    try:
        async with aiomqtt.Client(
            url.host,
            url.port,
            username=url.username,
            password=url.password,
            identifier=client_id,
            tls_context=ssl.create_default_context() if url.tls else None,
            timeout=5.0,
        ) as client:
            yield client
    except aiomqtt.MqttError:
        # A disconnect that times out while we are being cancelled raises MqttError from
        # aiomqtt's __aexit__, which would hide the cancellation and make the caller reconnect.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        raise


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> list[BaseException | None]:
    """Cancel tasks and wait until every one has finished; the exception each raised (None
    for one that returned or was cancelled).

    Cancels again while any is still running: on Python 3.11, `asyncio.wait_for` (inside
    aiomqtt's publish, for one) drops a cancellation that arrives as its awaited result
    does, and the task would then go on waiting for the next message forever.
    """
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            task.cancel()
    return [None if t.cancelled() else t.exception() for t in tasks]
