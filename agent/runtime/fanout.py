"""Fan-out of typed events to sinks, each with its own bounded queue.

`EventBus.publish` takes an event object (`agent.events.Event`), wraps it once in a
`agent.events.Published` (which makes its schema dict and JSON text at most once, for every
sink together) and is synchronous and never blocks: it appends it to every matching
subscription's queue. A full queue drops its *oldest* event and counts it, so a slow sink
(a WebSocket client on a bad link, a broker that is away) never slows the pipeline or the other
sinks. Each sink drains its `Subscription` in its own task.

Listeners (`EventBus.add_listener`) see each event synchronously as it is published, before
`publish` returns; they derive events from it (smart-home rules turn an event into `trigger`
events), and what they publish follows its source on every subscription.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable

from agent.events import Event, Published, WallClock

logger = logging.getLogger(__name__)

EventFilter = Callable[[Published], bool]
EventListener = Callable[[Published], None]


class SubscriptionClosed(Exception):
    """`Subscription.get` was called on a closed, drained subscription."""


class Subscription:
    """One sink's bounded queue of published events (drop oldest when full).

    Args:
        name: For logs and stats (e.g. ``ws:127.0.0.1:50522``).
        maxsize: Most events queued.
        accept: Optional filter; events it rejects are never queued.

    Attributes:
        dropped: Events dropped because the queue was full, in total.
        delivered: Events handed out by `get`.
    """

    def __init__(self, name: str, maxsize: int, accept: EventFilter | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"subscription queue size must be >= 1, got {maxsize}")
        self.name = name
        self.maxsize = maxsize
        self.accept = accept
        self.dropped = 0
        self.delivered = 0
        self._unreported = 0  # drops not yet reported by take_dropped()
        self._since_caught_up = 0  # drops since the queue was last empty
        self._queue: collections.deque[Published] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def offer(self, event: Published) -> bool:
        """Queue an event if the filter accepts it; never blocks.

        Returns:
            False when the oldest event had to be dropped to make room.
        """
        if self._closed or (self.accept is not None and not self.accept(event)):
            return True
        kept = True
        if len(self._queue) >= self.maxsize:
            self._queue.popleft()
            self.dropped += 1
            self._unreported += 1
            self._since_caught_up += 1
            kept = False
        self._queue.append(event)
        self._ready.set()
        return kept

    @property
    def pending(self) -> int:
        """Events waiting."""
        return len(self._queue)

    @property
    def dropped_since_caught_up(self) -> int:
        """Drops since the queue was last emptied by the sink (how far behind it stays)."""
        return self._since_caught_up

    def take_dropped(self) -> int:
        """Drops since the last call (for telling the sink how many it lost)."""
        count, self._unreported = self._unreported, 0
        return count

    def get_nowait(self) -> Published | None:
        """The oldest waiting event, or None."""
        if not self._queue:
            return None
        event = self._queue.popleft()
        self.delivered += 1
        if not self._queue:
            self._since_caught_up = 0
            if not self._closed:
                self._ready.clear()
        return event

    async def get(self) -> Published:
        """Wait for the oldest event.

        Raises:
            SubscriptionClosed: the subscription is closed and empty.
        """
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            if self._closed:
                raise SubscriptionClosed(self.name)
            await self._ready.wait()

    def close(self) -> None:
        """Stop accepting events; `get` drains what is queued, then raises (idempotent)."""
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return self._closed

    async def __aiter__(self) -> AsyncIterator[Published]:
        while True:
            try:
                yield await self.get()
            except SubscriptionClosed:
                return

    def stats(self) -> dict[str, int]:
        """Counters for status events."""
        return {"pending": len(self._queue), "delivered": self.delivered, "dropped": self.dropped}


class EventBus:
    """Hands every published event to every open subscription (see the module docstring).

    Args:
        clock: The agent's clock: the sinks' Unix times.
    """

    def __init__(self, clock: WallClock) -> None:
        self.clock = clock
        self._subscriptions: dict[int, Subscription] = {}
        self._listeners: list[EventListener] = []
        self.published = 0

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every event published from now on, right after the
        event is queued for the subscriptions (on the publisher's call stack, so it must not
        block). It may `publish` events of its own: they are queued after their source. An
        exception it raises is logged and does not reach the publisher."""
        self._listeners.append(listener)

    def subscribe(self, name: str, maxsize: int, accept: EventFilter | None = None) -> Subscription:
        """Open a subscription; close it with `unsubscribe` (or `close` on the bus)."""
        sub = Subscription(name, maxsize, accept)
        self._subscriptions[id(sub)] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Close and forget a subscription (idempotent)."""
        sub.close()
        self._subscriptions.pop(id(sub), None)

    def publish(self, event: Event) -> None:
        """Offer an event to every subscription; never blocks."""
        self.published += 1
        item = Published(event, self.clock)
        for sub in list(self._subscriptions.values()):
            if not sub.offer(item) and (sub.dropped in (1, 10, 100) or sub.dropped % 1000 == 0):
                logger.warning(
                    "sink %s is behind: %d event(s) dropped so far", sub.name, sub.dropped
                )
        for listener in list(self._listeners):
            try:
                listener(item)
            except Exception:
                logger.error("event listener failed on event %s", event.id, exc_info=True)

    @property
    def subscriptions(self) -> list[Subscription]:
        """Open subscriptions."""
        return list(self._subscriptions.values())

    def close(self) -> None:
        """Close every subscription: each sink drains what it has, then ends."""
        for sub in list(self._subscriptions.values()):
            sub.close()
        self._subscriptions.clear()
