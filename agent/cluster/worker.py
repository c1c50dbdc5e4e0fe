"""`ClusterWorker`: a model worker of a cluster (`salmonn-live worker`).

It loads the model like `run` does, reads windows from the MQTT 5 shared subscription
``$share/<group>/<prefix>/windows/+`` (the broker hands each window to one worker of the group)
and answers them through the same `Pipeline` and `InferenceWorker` as the single-process agent:
the same batching (``worker.max_batch`` / ``max_wait_ms``, oldest first across streams), the same
events. Instead of publishing the events itself, it sends them to the edge that sent the window
(``<prefix>/results/<device>``), which deduplicates them and publishes them on the event topics.

For each window it sends ``accepted`` at once, then one ``event`` message per model event
(finals; partials too when ``worker.partials``), or ``failed`` when the model raised. Its
presence (``<prefix>/workers/<id>``) is ``online`` while connected; ``offline`` is published at
a clean stop and, as the MQTT will, by the broker when the connection is lost: edges then
republish the windows this worker had accepted.

Windows are acknowledged to the broker on receipt (aiomqtt's default), so a killed worker loses
the windows it held; the edges' republication covers them (see docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt

from agent.aio import backoff_s, cancel_and_wait, finish_before_cancel, reraise_if_cancelling
from agent.cluster.messages import (
    WireError,
    broker_address,
    decode_window,
    default_name,
    encode_result,
    make_client,
    presence_topic,
    results_topic,
    shared_subscription,
    tls_context,
)
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.events import ModelEvent, StatusEvent, WallClock
from agent.protocols.mqtt import fatal_reason
from agent.runtime.fanout import EventBus, Subscription
from agent.runtime.pipeline import Pipeline
from agent.runtime.window_sink import LocalWindows
from agent.runtime.worker import InferenceWorker, Window, check_whisper_text

logger = logging.getLogger(__name__)

#: Result messages waiting for the broker while the connection is down (oldest dropped: the
#: edges republish what they miss).
MAX_OUTGOING = 10000
_RECONNECT_MIN_S = 0.2
_RECONNECT_MAX_S = 10.0
_FLUSH_TIMEOUT_S = 5.0


class _WorkerPipeline(Pipeline):
    """The agent's pipeline fed with windows made elsewhere (no segmenter runs here)."""

    def submit(self, window: Window, origin: str) -> None:
        """Queue a window for the next batches, opening its stream on first sight.

        Raises:
            ConfigError: the stream id is not a valid one.
            AgentError: the pipeline is shutting down.
        """
        handle = self.streams.get(window.stream)
        if handle is None:
            handle = self.open_stream(
                self.config.stream_settings(window.stream), origin=origin, overload="backpressure"
            )
        self.enqueue(handle, window)


@dataclass
class _Route:
    """Where the answers of a window go, and which of its requests are still unanswered."""

    device: str
    run: str
    remaining: set[str] = field(default_factory=set)


class ClusterWorker:
    """One model worker of a cluster; an async context manager.

    Args:
        config: The validated configuration (``[model]``, ``[worker]``, ``[mqtt]``,
            ``[cluster]``; ``mqtt.url`` is required).
        load_model: Loads the model; called once, on the inference thread.

    Attributes:
        id: This worker's name (``cluster.worker_id`` or ``<hostname>-<pid>``).
        subscribed: Set while connected and subscribed to the windows.
        counters: ``windows`` received, ``duplicates`` (a copy of a window already here),
            ``answered``, ``failed``, ``bad_messages``, ``connects``, ``dropped_results``.
    """

    def __init__(self, config: AgentConfig, load_model: Callable[[], Any]) -> None:
        self.config = config
        self.id = config.cluster.worker_id or default_name()
        self._load_model = load_model
        self._address = broker_address(config.mqtt)
        self._prefix = config.mqtt.prefix
        self.clock = WallClock()
        self._wall_offset_s = self.clock.wall(0.0) or 0.0
        self.bus = EventBus(self.clock)
        self.worker: InferenceWorker | None = None
        self.pipeline: _WorkerPipeline | None = None
        self.subscribed = asyncio.Event()
        #: Why the broker refused this worker for good (bad credentials, TLS); None until then.
        self.refused: str | None = None
        self._refused = asyncio.Event()
        self.counters = {
            "windows": 0,
            "duplicates": 0,
            "answered": 0,
            "failed": 0,
            "bad_messages": 0,
            "connects": 0,
            "dropped_results": 0,
        }
        self._routes: dict[str, _Route] = {}
        self._outgoing: collections.deque[tuple[str, bytes]] = collections.deque()
        self._outgoing_ready = asyncio.Event()
        self._flushed = asyncio.Event()
        self._intake = True
        self._stopping = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            context = await asyncio.to_thread(tls_context, self.config.mqtt, self._address)
            model = self.config.model
            self.worker = await self._stack.enter_async_context(
                InferenceWorker(
                    self._load_model,
                    max_new_tokens=model.max_new_tokens,
                    partials=self.config.worker.partials,
                    threads=model.threads,
                    # Edges read no early commands (agent/cluster/edge.py): no recogniser to load.
                    command_whisper=None,
                    pack_weights=model.pack_weights,
                )
            )
            check_whisper_text(self.worker.model, model)
            self.pipeline = await self._stack.enter_async_context(
                _WorkerPipeline(
                    self.config, LocalWindows(self.config.worker, self.worker), self.bus, self.clock
                )
            )
            subscription = self.bus.subscribe("cluster", maxsize=MAX_OUTGOING)
            self._spawn(self._forward(subscription), "forward")
            self._spawn(self._connection(context), "connection")
        except BaseException:
            await self.close()
            raise
        logger.info(
            "worker %s: model %s loaded; reading %s",
            self.id,
            self.worker.model_name,
            shared_subscription(self._prefix, self.config.cluster.group),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"cluster-worker-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> str:
        """Serve until ``stop`` is set or the pipeline fails; returns why it stopped."""
        assert self.pipeline is not None, "ClusterWorker used outside 'async with'"
        waiters = {
            asyncio.ensure_future(stop.wait()): "stop requested",
            asyncio.ensure_future(self.pipeline.wait_failed()): "pipeline failed",
            asyncio.ensure_future(self._refused.wait()): "refused by the broker",
        }
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return waiters[next(iter(done))]

    async def close(self) -> None:
        """Stop cleanly (idempotent): take no new windows (unsubscribe), answer those held
        within ``worker.drain_timeout_s``, send their results (up to 5 s), say ``offline``,
        disconnect, stop the model thread."""
        if self._closed:
            return
        self._closed = True
        self._intake = False
        client = self._client
        if client is not None and self.subscribed.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.unsubscribe(
                    shared_subscription(self._prefix, self.config.cluster.group), timeout=2.0
                )
        if self.pipeline is not None:
            await self.pipeline.close()
        self.bus.close()
        forward = [t for t in self._tasks if t.get_name().endswith("forward")]
        if forward:
            await asyncio.wait(forward, timeout=_FLUSH_TIMEOUT_S)
        if self._outgoing and self.subscribed.is_set():
            self._flushed.clear()
            self._outgoing_ready.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), _FLUSH_TIMEOUT_S)
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_FLUSH_TIMEOUT_S)
            await cancel_and_wait(pending)
        await self._stack.aclose()
        logger.info("worker %s stopped: %s", self.id, self.counters)

    # -- MQTT ----------------------------------------------------------------------------------

    def _presence(self, state: str) -> bytes:
        return json.dumps({"worker": self.id, "state": state}).encode()

    async def _connection(self, context: Any) -> None:
        """Connect, announce, subscribe, serve; reconnect with capped backoff."""
        topic = presence_topic(self._prefix, self.id)
        will = aiomqtt.Will(topic, self._presence("offline"), qos=1)
        failures = 0
        while not self._stopping.is_set():
            try:
                async with make_client(
                    self._address,
                    context,
                    f"salmonn-worker-{self.id}",
                    will=will,
                    keepalive_s=self.config.cluster.keepalive_s,
                ) as client:
                    failures = 0
                    self._client = client
                    self.counters["connects"] += 1
                    await client.publish(topic, self._presence("online"), qos=1)
                    if self._intake:
                        group = self.config.cluster.group
                        await finish_before_cancel(
                            client.subscribe(shared_subscription(self._prefix, group), qos=1)
                        )
                        self.subscribed.set()
                    try:
                        await self._session(client)
                    finally:
                        self.subscribed.clear()
                        self._client = None
                    await client.publish(topic, self._presence("offline"), qos=1)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reraise_if_cancelling(exc)
                fatal = fatal_reason(exc)
                if fatal is not None and not self.counters["connects"]:
                    # Wrong credentials or TLS files: retrying cannot help, so say so and stop.
                    self.refused = fatal
                    logger.error("worker %s: the MQTT broker refused it: %s", self.id, fatal)
                    self._refused.set()
                    return
                failures += 1
                delay = backoff_s(failures, _RECONNECT_MIN_S, _RECONNECT_MAX_S)
                logger.warning(
                    "worker %s: MQTT connection lost or refused (%s); retrying in %.1f s",
                    self.id,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        """Receive windows and send results until `close` says stop or the connection fails."""
        tasks = {
            asyncio.create_task(self._receive(client), name="cluster-worker-receive"),
            asyncio.create_task(self._send(client), name="cluster-worker-send"),
            asyncio.create_task(self._stopping.wait(), name="cluster-worker-stop"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        if not self._stopping.is_set():
            raise aiomqtt.MqttError("MQTT session ended")

    async def _send(self, client: aiomqtt.Client) -> None:
        """Publish queued results in order (each waits for the broker's PUBACK)."""
        while True:
            while self._outgoing:
                topic, payload = self._outgoing[0]
                await client.publish(topic, payload, qos=1)
                self._outgoing.popleft()
            self._flushed.set()
            self._outgoing_ready.clear()
            await self._outgoing_ready.wait()

    def _queue(self, route: _Route, kind: str, window: str, **fields: Any) -> None:
        if len(self._outgoing) >= MAX_OUTGOING:
            self._outgoing.popleft()
            self.counters["dropped_results"] += 1
        payload = encode_result(kind, run=route.run, window=window, worker=self.id, **fields)
        self._outgoing.append((results_topic(self._prefix, route.device), payload))
        self._outgoing_ready.set()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not self._intake or self.pipeline is None:
                continue  # stopping: the edge republishes what nobody accepted
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                decoded = await asyncio.to_thread(decode_window, payload, self._wall_offset_s)
            except WireError as exc:
                self.counters["bad_messages"] += 1
                logger.warning("worker %s: skipped a message: %s", self.id, exc)
                continue
            window = decoded.window
            self.counters["windows"] += 1
            route = self._routes.get(window.id)
            if route is not None and route.run == decoded.run:
                # A republished copy of a window still being answered here: say so, once more.
                self.counters["duplicates"] += 1
                self._queue(route, "accepted", window.id)
                continue
            if route is not None:
                logger.warning(
                    "worker %s: window id %s comes from %s and %s: stream ids must be unique "
                    "across edges",
                    self.id,
                    window.id,
                    route.device,
                    decoded.device,
                )
            route = _Route(decoded.device, decoded.run, {r.key for r in window.requests})
            self._routes[window.id] = route
            self._queue(route, "accepted", window.id)
            try:
                self.pipeline.submit(window, origin=f"mqtt:{decoded.device}")
            except ConfigError as exc:
                del self._routes[window.id]
                self.counters["failed"] += 1
                self._queue(
                    route, "failed", window.id, error=str(exc), requests=sorted(route.remaining)
                )

    # -- results -------------------------------------------------------------------------------

    async def _forward(self, subscription: Subscription) -> None:
        """Turn the pipeline's events into result messages for the windows' edges."""
        async for item in subscription:
            event = item.event
            if isinstance(event, StatusEvent):
                self._forward_status(event)
                continue
            if not isinstance(event, ModelEvent):
                continue
            route = self._routes.get(event.window)
            if route is None:
                continue
            self._queue(route, "event", event.window, event=item.data)
            if not event.partial:
                route.remaining.discard(event.id)
                if not route.remaining:
                    del self._routes[event.window]
                    self.counters["answered"] += 1

    def _forward_status(self, event: StatusEvent) -> None:
        status = event.status
        if status not in ("window_failed", "window_unfinished"):
            logger.debug("worker %s: status %s: %s", self.id, status, event.message)
            return
        window = str(event.detail.get("window", ""))
        route = self._routes.pop(window, None)
        if route is None or status == "window_unfinished":
            # Cut by the shutdown drain: say nothing; the edge republishes it when this
            # worker's `offline` comes.
            return
        self.counters["failed"] += 1
        self._queue(
            route,
            "failed",
            window,
            error=str(event.detail.get("error", status)),
            requests=sorted(route.remaining),
        )
