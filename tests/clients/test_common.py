"""clients/common.py: shutdown of client tasks."""

from __future__ import annotations

import asyncio

from clients.common import cancel_and_wait


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """Python 3.11's wait_for can drop a cancellation; the task must still be stopped."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.set()  # as wait_for does when its result and the cancel cross
        await asyncio.sleep(60)

    async def failing() -> None:
        raise ValueError("broken")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        errors = await cancel_and_wait(*tasks)
    assert swallowed.is_set() and tasks[0].cancelled()
    assert errors[0] is None and isinstance(errors[1], ValueError)
