"""`Edge`: capture and segmentation next to the microphones (`salmonn-live edge`).

An edge is the agent without a model: the same sources, segmenters, `/audio` and `/events`
WebSocket paths, MQTT publisher (events, rules, Home Assistant, control) as `run`, but each
finished window goes to the worker pool over MQTT instead of a local inference thread:

* `RemoteWindows` publishes the window on ``<prefix>/windows/<device>`` (QoS 1) and keeps it
  until every one of its requests has a final answer. A window no worker accepted within
  ``cluster.accept_timeout_s``, or accepted but unanswered within ``cluster.result_timeout_s``,
  is published again (up to ``cluster.max_attempts`` times); so are, at once, the windows of a
  worker whose ``offline`` presence (its MQTT will) arrives, and every unanswered window after
  a reconnection (answers sent while the edge was away are lost with its clean session).
* Answers are deduplicated here, the one place that sees all answers to a window: the first
  final per event id (``<window>/<task>``) is published, later ones (a window answered twice
  after a republication) are counted and dropped, as is anything for a finished window or for
  an earlier run of this edge. Partials are passed on only from the window's first worker.
* `RemoteWindows` is a `WindowSink`: the agent's own `Pipeline` hands it the windows in
  place of the local model's queue, and passes its answers on (`Pipeline.window_event`) with
  this edge's ``seq`` (strictly increasing, as in `run`), its ``timing.emitted`` and a
  ``worker`` field naming who answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import aiomqtt

from agent.aio import backoff_s, cancel_and_wait, finish_before_cancel, reraise_if_cancelling
from agent.cluster.messages import (
    RESERVED_STREAMS,
    WireError,
    broker_address,
    decode_result,
    default_name,
    encode_window,
    make_client,
    presence_topic,
    results_topic,
    tls_context,
    windows_topic,
)
from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError
from agent.events import WallClock
from agent.runtime.app import Agent
from agent.runtime.pipeline import Pipeline
from agent.runtime.window_queue import Drop
from agent.runtime.window_sink import WindowDone, WindowListener, WindowSink
from agent.runtime.worker import Window

logger = logging.getLogger(__name__)

#: Finished window ids remembered to recognise late duplicates without logging them as strays.
_RECENT_WINDOWS = 4096
_RECONNECT_MIN_S = 0.2
_RECONNECT_MAX_S = 10.0


@dataclass
class Outstanding:
    """A window sent to the pool and not yet fully answered.

    Attributes:
        window: The window.
        keys: Its request keys (the event ids it expects a final for).
        finals: The keys answered so far.
        attempt: Publications so far.
        deadline: ``time.monotonic()`` by which an answer must come; None while it waits to be
            (re)sent.
        queued: Waiting in the send queue.
        worker: The worker that accepted it last.
        owner: The worker whose partials are passed on.
    """

    window: Window
    keys: frozenset[str]
    finals: set[str] = field(default_factory=set)
    attempt: int = 0
    deadline: float | None = None
    queued: bool = False
    worker: str | None = None
    owner: str | None = None


OnEvent = Callable[[dict[str, Any], str, Outstanding], None]
OnDone = Callable[[Outstanding, str, str | None], None]


class _Overloaded(Protocol):
    """Anything that names an overload policy (a `StreamHandle`)."""

    overload: str


class RemoteWindows:
    """Windows out to the worker pool, deduplicated answers back; an async context manager.

    It is the edge pipeline's `WindowSink` (`attach`, `put`, ...); `bind` and `submit` are the
    same without a pipeline (``bench cluster``).

    Args:
        config: The validated configuration (``[mqtt]`` with a URL, ``[cluster]``).
        device: This edge's name.
        run: This run's id (random per start).
        clock: The edge's clock (stamps travel as Unix times).
    """

    model_name = "cluster"

    def __init__(self, config: AgentConfig, *, device: str, run: str, clock: WallClock) -> None:
        self.config = config
        self.device = device
        self.run = run
        self._settings = config.cluster
        self._address = broker_address(config.mqtt)
        self._prefix = config.mqtt.prefix
        self._wall_offset_s = clock.wall(0.0) or 0.0
        self._outstanding: dict[str, Outstanding] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._to_send: collections.deque[str] = collections.deque()
        self._send_ready = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._next_deadline: float | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self._on_event: OnEvent | None = None
        self._on_done: OnDone | None = None
        self._overloads: dict[str, str] = {}  # open streams' policies
        self._held: collections.Counter[str] = collections.Counter()  # outstanding per stream
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.counters = {
            "windows": 0,
            "published": 0,
            "republished": 0,
            "answered": 0,
            "failed": 0,
            "given_up": 0,
            "duplicates": 0,
            "stale": 0,
            "workers_lost": 0,
            "connects": 0,
        }
        self.answered_by: collections.Counter[str] = collections.Counter()

    def bind(self, on_event: OnEvent, on_done: OnDone) -> None:
        """Where answers go: ``on_event(event, worker, outstanding)`` for each event to
        publish; ``on_done(outstanding, status, error)`` once per window (``status``:
        ``answered``, ``window_failed``, ``window_unfinished`` or ``dropped``)."""
        self._on_event, self._on_done = on_event, on_done

    async def __aenter__(self) -> Self:
        context = await asyncio.to_thread(tls_context, self.config.mqtt, self._address)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._connection(context), name="edge-connection")
        self._timer = loop.create_task(self._expire_loop(), name="edge-timer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect (idempotent). Windows still outstanding are reported unfinished."""
        await cancel_and_wait(t for t in (self._task, self._timer) if t is not None)
        self._task = self._timer = None
        self.abandon("edge shut down before an answer came")

    # -- the pipeline's side -------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """True when ``cluster.max_in_flight`` windows wait for answers."""
        return len(self._outstanding) >= self._settings.max_in_flight

    @property
    def outstanding(self) -> int:
        """Windows waiting for answers."""
        return len(self._outstanding)

    def submit(self, window: Window, handle: _Overloaded) -> None:
        """Send a window to the pool (now, or once connected). When full and the window's
        stream drops rather than waits (``handle.overload``), the oldest outstanding window is
        given up."""
        self._submit(window, handle.overload)

    def _submit(self, window: Window, overload: str) -> None:
        # Counted first: giving up the oldest below must not find the window's stream idle.
        self._held[window.stream] += 1
        if self.full and overload == "drop_oldest":
            oldest = next(iter(self._outstanding.values()))
            logger.warning(
                "edge %s: %d windows unanswered (cluster.max_in_flight): giving up %s",
                self.device,
                len(self._outstanding),
                oldest.window.id,
            )
            self._finish(oldest, "dropped", "too many unanswered windows (cluster.max_in_flight)")
        item = Outstanding(window, frozenset(r.key for r in window.requests))
        self._outstanding[window.id] = item
        self._empty.clear()
        self.counters["windows"] += 1
        self._queue(item)

    async def drain(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` until every window is answered; returns the ids left."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        return list(self._outstanding)

    def abandon(self, reason: str) -> None:
        """Report every outstanding window unfinished (at shutdown, after the drain)."""
        for item in list(self._outstanding.values()):
            self._finish(item, "window_unfinished", reason)

    # -- WindowSink ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Windows wait for answers."""
        return bool(self._outstanding)

    @property
    def backlogged(self) -> bool:
        """As `busy`: the pool's queues are not seen from here (and an edge reads no early
        commands)."""
        return self.busy

    def attach(self, listener: WindowListener) -> None:
        """Report answers and finished windows to ``listener`` (the edge's pipeline)."""

        def on_event(event: dict[str, Any], worker: str, item: Outstanding) -> None:
            listener.window_event(event, item.window, worker)

        def on_done(item: Outstanding, status: str, error: str | None) -> None:
            unfinished = tuple(sorted(item.keys - item.finals))
            listener.window_done(item.window, WindowDone(status, unfinished, error))

        self.bind(on_event, on_done)

    def check_stream(self, stream: str) -> None:
        """Refuse the stream ids the cluster's topics use.

        Raises:
            ConfigError: a reserved id (``windows``, ``results``, ``workers``).
        """
        if stream in RESERVED_STREAMS:
            raise ConfigError(
                f"stream id {stream!r} is reserved on an edge (its events would share "
                f"topics with the cluster's {list(RESERVED_STREAMS)}): rename the stream"
            )

    def open_stream(self, stream: str, overload: str) -> None:
        """Note the stream's overload policy."""
        self._overloads[stream] = overload

    def close_stream(self, stream: str) -> None:
        """Forget the stream."""
        self._overloads.pop(stream, None)

    def put(self, window: Window) -> Drop | None:
        """`submit` for the pipeline: a window given up to make room is reported through
        `WindowListener.window_done` (``dropped``), so nothing is returned."""
        self._submit(window, self._overloads.get(window.stream, "drop_oldest"))
        return None

    def waiting(self, stream: str) -> tuple[Window, ...]:
        """Nothing waits here: windows go out as they come."""
        return ()

    def in_flight(self, stream: str) -> int:
        """The stream's windows waiting for answers."""
        return self._held[stream]

    def has_room(self, stream: str) -> bool:
        """``backpressure`` sources wait while ``cluster.max_in_flight`` windows are out."""
        return self._overloads.get(stream) != "backpressure" or not self.full

    def serve(self) -> Coroutine[Any, Any, None]:
        """Nothing to schedule: the connection's own tasks run from `__aenter__`."""
        return asyncio.sleep(0)

    async def wait_idle(self) -> None:
        """Wait until every window is answered."""
        await self._empty.wait()

    async def shutdown(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` for the answers; report the windows still out unfinished.
        Returns no ids: each was reported on its own (``window_unfinished``)."""
        left = await self.drain(timeout_s)
        if left:
            logger.warning("edge: %d window(s) unanswered at shutdown: %s", len(left), left)
            self.abandon(f"no answer within worker.drain_timeout_s = {timeout_s} s of shutdown")
        return []

    def stats(self) -> dict[str, Any]:
        """Counters, windows outstanding and the answers per worker."""
        return {
            **self.counters,
            "outstanding": len(self._outstanding),
            "connected": self.connected.is_set(),
            "answered_by": dict(self.answered_by),
        }

    # -- bookkeeping ---------------------------------------------------------------------------

    def _queue(self, item: Outstanding) -> None:
        item.deadline = None
        if not item.queued:
            item.queued = True
            self._to_send.append(item.window.id)
            self._send_ready.set()

    def _set_deadline(self, item: Outstanding, after_s: float) -> None:
        item.deadline = time.monotonic() + after_s
        if self._next_deadline is None or item.deadline < self._next_deadline:
            self._timer_wake.set()

    def _finish(self, item: Outstanding, status: str, error: str | None) -> None:
        if self._outstanding.pop(item.window.id, None) is None:
            return
        stream = item.window.stream
        self._held[stream] -= 1
        if not self._held[stream]:
            del self._held[stream]
        self._recent[item.window.id] = None
        while len(self._recent) > _RECENT_WINDOWS:
            self._recent.popitem(last=False)
        if not self._outstanding:
            self._empty.set()
        self.counters["answered" if status == "answered" else "given_up"] += 1
        if status == "window_failed":
            self.counters["failed"] += 1
        if self._on_done is not None:
            self._on_done(item, status, error)

    async def _expire_loop(self) -> None:
        """Republish windows whose deadline passed; give up after ``max_attempts``."""
        while True:
            now = time.monotonic()
            due = [i for i in self._outstanding.values() if i.deadline and i.deadline <= now]
            for item in due:
                if item.attempt >= self._settings.max_attempts:
                    self._finish(
                        item,
                        "window_failed",
                        f"no answer after {item.attempt} publications (cluster.max_attempts)",
                    )
                    continue
                logger.info(
                    "edge %s: no %s for %s from %s; publishing it again",
                    self.device,
                    "answer" if item.worker else "worker",
                    item.window.id,
                    item.worker or "the pool",
                )
                item.worker = None
                self._queue(item)
            deadlines = [i.deadline for i in self._outstanding.values() if i.deadline is not None]
            self._next_deadline = min(deadlines, default=None)
            self._timer_wake.clear()
            wait = None if self._next_deadline is None else self._next_deadline - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

    # -- MQTT ----------------------------------------------------------------------------------

    async def _connection(self, context: Any) -> None:
        failures = 0
        while True:
            try:
                async with make_client(
                    self._address,
                    context,
                    f"salmonn-edge-{self.device}",
                    keepalive_s=self._settings.keepalive_s,
                ) as client:
                    failures = 0
                    self.counters["connects"] += 1
                    await finish_before_cancel(
                        client.subscribe(results_topic(self._prefix, self.device), qos=1)
                    )
                    await finish_before_cancel(
                        client.subscribe(presence_topic(self._prefix, "+"), qos=1)
                    )
                    # Answers published while this edge was away are lost (clean start):
                    # everything unanswered goes again.
                    for item in self._outstanding.values():
                        self._queue(item)
                    self.connected.set()
                    logger.info("edge %s: connected; windows go to %s", self.device, self._topic)
                    try:
                        await self._session(client)
                    finally:
                        self.connected.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reraise_if_cancelling(exc)
                failures += 1
                delay = backoff_s(failures, _RECONNECT_MIN_S, _RECONNECT_MAX_S)
                logger.warning(
                    "edge %s: MQTT connection lost or refused (%s); retrying in %.1f s "
                    "(%d windows waiting)",
                    self.device,
                    exc,
                    delay,
                    len(self._outstanding),
                )
                await asyncio.sleep(delay)

    @property
    def _topic(self) -> str:
        return windows_topic(self._prefix, self.device)

    async def _session(self, client: aiomqtt.Client) -> None:
        tasks = {
            asyncio.create_task(self._send(client), name="edge-send"),
            asyncio.create_task(self._receive(client), name="edge-receive"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        raise aiomqtt.MqttError("MQTT session ended")

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            while self._to_send:
                item = self._outstanding.get(self._to_send.popleft())
                if item is None or not item.queued:
                    continue
                item.queued = False
                item.attempt += 1
                payload = await asyncio.to_thread(
                    encode_window,
                    item.window,
                    run=self.run,
                    device=self.device,
                    attempt=item.attempt,
                    wall_offset_s=self._wall_offset_s,
                )
                try:
                    await client.publish(self._topic, payload, qos=1)
                except BaseException:
                    self._queue(item)  # not sent: again after the reconnection
                    item.attempt -= 1
                    raise
                self.counters["published" if item.attempt == 1 else "republished"] += 1
                if item.window.id in self._outstanding and not item.queued:
                    accepted = item.worker is not None
                    self._set_deadline(
                        item,
                        self._settings.result_timeout_s
                        if accepted
                        else self._settings.accept_timeout_s,
                    )
            self._send_ready.clear()
            await self._send_ready.wait()

    async def _receive(self, client: aiomqtt.Client) -> None:
        results = results_topic(self._prefix, self.device)
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if message.topic.value == results:
                try:
                    self._on_result(decode_result(payload))
                except WireError as exc:
                    logger.warning("edge %s: skipped a result: %s", self.device, exc)
            else:
                with contextlib.suppress(ValueError, AttributeError):
                    presence = json.loads(payload)
                    if presence.get("state") == "offline":
                        self._worker_lost(str(presence.get("worker")))

    def _worker_lost(self, worker: str) -> None:
        lost = [i for i in self._outstanding.values() if worker in (i.worker, i.owner)]
        if lost:
            self.counters["workers_lost"] += 1
            logger.warning(
                "edge %s: worker %s went offline holding %d window(s); publishing them again",
                self.device,
                worker,
                len(lost),
            )
        for item in lost:
            item.worker = None
            if item.owner == worker:
                item.owner = None
            self._queue(item)

    def _on_result(self, body: dict[str, Any]) -> None:
        if body["run"] != self.run:
            self.counters["stale"] += 1
            return
        item = self._outstanding.get(body["window"])
        if item is None:
            self.counters["duplicates"] += 1
            if body["window"] not in self._recent:
                logger.debug("edge %s: result for unknown window %s", self.device, body["window"])
            return
        worker, kind = body["worker"], body["type"]
        if kind == "accepted":
            item.worker = worker
            item.owner = item.owner or worker
            if not item.queued:
                self._set_deadline(item, self._settings.result_timeout_s)
        elif kind == "event":
            self._on_answer(item, worker, body.get("event"))
        elif kind == "failed":
            self._finish(item, "window_failed", f"{worker}: {body.get('error', 'failed')}")

    def _on_answer(self, item: Outstanding, worker: str, event: Any) -> None:
        if not isinstance(event, dict) or event.get("id") not in item.keys:
            logger.warning("edge %s: malformed event from %s: %.200r", self.device, worker, event)
            return
        key = event["id"]
        if key in item.finals:
            self.counters["duplicates"] += 1
            return
        if event.get("partial"):
            if item.owner in (None, worker):
                item.owner = worker
                assert self._on_event is not None
                self._on_event(event, worker, item)
            return
        item.finals.add(key)
        item.worker = item.worker or worker
        assert self._on_event is not None
        self._on_event(event, worker, item)
        if item.finals >= item.keys:
            self.answered_by[worker] += 1
            self._finish(item, "answered", None)
        elif not item.queued:
            self._set_deadline(item, self._settings.result_timeout_s)


def _no_model() -> Any:
    raise AgentError("an edge has no model: windows are answered by `salmonn-live worker`")


class Edge(Agent):
    """The agent with the model replaced by the worker pool (see the module docstring).

    Args:
        config: The validated configuration (``mqtt.url`` is required).

    Attributes:
        device: This edge's name (``cluster.device`` or ``<hostname>-<pid>``).
        run_id: Random per start; results carry it back.
        remote: The `RemoteWindows`, once entered.
    """

    def __init__(self, config: AgentConfig) -> None:
        # Early reads are settled against a local worker's answers (agent/runtime/pipeline.py); the
        # pool's answers come back as finished events, so an edge runs without them.
        model = config.model.without_early_commands("on an edge")
        if config.sounds.enabled:
            # The tagger runs on the worker thread of the process that holds the audio; an
            # edge has no model worker, and its HA sound entities would never fire.
            raise ConfigError(
                "sounds.enabled is not supported on an edge: an edge loads no sound tagger"
                " (its windows go to the worker pool), so it would make no sound events; tag"
                " on an agent instead (salmonn-live run --sounds where the audio is), and leave"
                " [sounds] off here (drop --sounds / set sounds.enabled = false)"
            )
        config = dataclasses.replace(config, model=model)
        super().__init__(config, _no_model)
        self.device = config.cluster.device or default_name()
        self.run_id = secrets.token_hex(6)
        self.remote: RemoteWindows | None = None

    async def _open_sink(self) -> WindowSink:
        """The worker pool in place of the model (`Agent.__aenter__` does the rest)."""
        self.remote = await self._stack.enter_async_context(
            RemoteWindows(self.config, device=self.device, run=self.run_id, clock=self.clock)
        )
        return self.remote

    async def _close_pipeline(self, pipeline: Pipeline) -> None:
        """End every stream (open segments become last windows) and wait up to
        ``worker.drain_timeout_s`` for the pool's answers, as streams still close one by
        one (each with its ``stream_closed``); then close the pipeline."""
        if self.remote is not None:
            for handle in list(pipeline.streams.values()):
                handle.end()
            await self.remote.shutdown(self.config.worker.drain_timeout_s)
        await pipeline.close()
