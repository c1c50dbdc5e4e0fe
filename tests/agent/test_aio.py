"""`agent.aio`: the reconnect delay of the publisher, the edge and the cluster worker doubles up
to its cap, with jitter, for any number of failures; cancellation outlasts a task that swallows
it, and a cancelling task's errors turn back into cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest

from agent.aio import backoff_s, cancel_and_wait, finish_before_cancel, reraise_if_cancelling


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top of the jitter range (100 %)."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@pytest.mark.usefixtures("no_jitter")
def test_doubles_from_min_up_to_max() -> None:
    delays = [backoff_s(failures, 0.5, 30.0) for failures in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


@pytest.mark.usefixtures("no_jitter")
@pytest.mark.parametrize("failures", [1024, 1025, 1026, 5000, 10**6, 10**100])
def test_any_number_of_failures_gives_the_cap(failures: int) -> None:
    """2 ** 1024 no longer fits a float: a broker away for a long time (about 1025 failed
    attempts) must not raise OverflowError in the reconnect loop, which would end it."""
    assert backoff_s(failures, 0.5, 30.0) == 30.0
    assert backoff_s(failures, 1e-9, 1e9) == 1e9


@pytest.mark.usefixtures("no_jitter")
@pytest.mark.parametrize("failures", [0, -1, -(10**6)])
def test_no_failure_yet_waits_the_minimum(failures: int) -> None:
    assert backoff_s(failures, 0.5, 30.0) == 0.5


def test_jitter_stays_within_80_to_100_percent() -> None:
    random.seed(1234)
    for failures in (1, 3, 2000):
        base = min(30.0, 0.5 * 2.0 ** min(failures - 1, 100))
        delays = [backoff_s(failures, 0.5, 30.0) for _ in range(200)]
        assert all(0.8 * base <= d <= base for d in delays)
        assert max(delays) - min(delays) > 0.1 * base  # it does vary: clients don't retry in step


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """Python 3.11's wait_for (inside aiomqtt's publish) can drop a cancellation; the
    session's tasks must stop anyway, or the agent's shutdown would hang."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        assert await cancel_and_wait([task]) == [None]
    assert swallowed.is_set() and task.cancelled()


async def test_cancel_and_wait_returns_what_each_task_raised() -> None:
    async def fails() -> None:
        raise KeyError("boom")

    async def returns() -> int:
        return 1

    failing, returning = asyncio.create_task(fails()), asyncio.create_task(returns())
    await asyncio.wait([failing, returning])
    errors = await cancel_and_wait([failing, returning])
    assert isinstance(errors[0], KeyError) and errors[1] is None


async def test_reraise_if_cancelling_only_while_cancelled() -> None:
    reraise_if_cancelling(OSError("lost"))  # not being cancelled: nothing happens
    started, caught = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def reconnect_loop() -> None:
        try:
            started.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            # What aiomqtt's __aexit__ may do: replace the cancellation with its own error.
            try:
                raise OSError("disconnect timed out") from None
            except OSError as exc:
                caught.set()
                try:
                    reraise_if_cancelling(exc)
                except asyncio.CancelledError:
                    outcome.append("cancelled")
                    raise
                outcome.append("swallowed")

    task = asyncio.create_task(reconnect_loop())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caught.is_set() and outcome == ["cancelled"]


async def test_finish_before_cancel_lets_the_request_finish_then_raises() -> None:
    """A caller cancelled while its request waits for the reply: the request still gets its
    reply, then the caller's cancellation goes on."""
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    got: list[str] = []

    async def request() -> str:
        got.append(await reply)
        return got[-1]

    caller = asyncio.create_task(finish_before_cancel(request(), timeout_s=5.0))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    assert not caller.done()  # waiting for the reply, not gone
    reply.set_result("SUBACK")
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert got == ["SUBACK"]


async def test_finish_before_cancel_gives_up_after_its_timeout() -> None:
    """No reply within the timeout: the request is cancelled and so is the caller."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def request() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(finish_before_cancel(request(), timeout_s=0.05))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, timeout=5.0)
    assert cancelled.is_set()
    assert await finish_before_cancel(asyncio.sleep(0, "plain")) == "plain"  # no cancel
