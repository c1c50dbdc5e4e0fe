"""Generic asyncio helpers shared by the MQTT publisher, the edge and the cluster worker.

Nothing here knows about MQTT or the agent: cancellation that survives a swallowed
`CancelledError`, a request let finish before its caller is cancelled, and the reconnect delay
every long-lived client uses.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# Doublings of `backoff_s` stop here: 2.0 ** 1024 overflows a float (OverflowError, after
# 1025 failures), and 2 ** 1000 is far past any max_s / min_s ratio.
_MAX_DOUBLINGS = 1000


def reraise_if_cancelling(exc: BaseException) -> None:
    """Raise `asyncio.CancelledError` when the current task is being cancelled.

    aiomqtt's ``__aexit__`` can turn a cancellation into ``MqttError`` (the disconnect times
    out), which a reconnect loop would otherwise take for a lost connection and swallow.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException | None]:
    """Cancel tasks and wait until every one has finished, cancelling again while any runs;
    the exception each raised (None for one that returned or was cancelled).

    On Python 3.11, `asyncio.wait_for` (inside aiomqtt's publish) drops a cancellation that
    arrives as its awaited result does; a plain cancel-then-gather can then wait forever.
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            task.cancel()
    return [None if t.cancelled() else t.exception() for t in tasks]


async def finish_before_cancel(awaitable: Awaitable[T], timeout_s: float = 2.0) -> T:
    """Await ``awaitable``; when the caller is cancelled meanwhile, let it finish first (for
    at most ``timeout_s``, or until a second cancellation), then raise `CancelledError`.

    For a request whose reply must find its waiter: aiomqtt drops a subscribe's waiter on
    cancellation, and the broker's SUBACK, arriving a moment later as the client shuts down,
    is then logged as an error with a traceback ("Unexpected message ID").
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await asyncio.wait({task}, timeout=timeout_s)
        finally:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: the caller is cancelled whatever it was
        raise


def backoff_s(failures: int, min_s: float, max_s: float) -> float:
    """The wait before reconnection attempt ``failures`` (1, 2, ...): doubling from ``min_s``,
    capped at ``max_s``, with jitter (80-100 %) so that clients do not retry in step.

    Any number of failures is fine (a broker away for days): the doubling stops at the cap.
    """
    doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
    return min(max_s, min_s * 2.0**doublings) * random.uniform(0.8, 1.0)
