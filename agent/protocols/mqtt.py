"""MQTT output: the publisher.

`MqttPublisher` publishes events to a broker through a bounded on-disk outbox and hands control
messages to a callback. It is entered with ``async with`` and never knows its caller: the agent
(`agent.runtime.app.Agent`) enters it into its exit stack beside the WebSocket server, feeds it
through a sink and turns its `on_status` reports into status events (`status_line`). The
`[mqtt]` slice it is configured by (`MqttConfig`), broker URLs (`parse_url`) and
`MqttConfigError` live in `agent.config` with every other slice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import socket
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiomqtt

from agent.aio import backoff_s, cancel_and_wait, finish_before_cancel, reraise_if_cancelling
from agent.config import (
    BrokerAddress,
    MqttConfig,
    MqttConfigError,
    MqttError,
    parse_url,
    redact_url,
)
from agent.events import Published, TriggerEvent
from agent.protocols.homeassistant import (
    ALL_STREAMS,
    DEFAULT_COMMAND_EVENT_TYPES,
    DEFAULT_SOUND_EVENT_TYPES,
    INITIAL_CONTROL_STATE,
    device_id_for,
    discovery_message,
)
from agent.protocols.outbox import Outbox, OutboxEntry

if TYPE_CHECKING:
    from agent.protocols.broker import EmbeddedBroker

logger = logging.getLogger(__name__)

_TOPIC_LEVEL_RE = re.compile(r"^[^#+\x00]+$")


class MqttConnectError(MqttError):
    """The broker refused the connection for a reason retrying cannot fix (credentials, TLS)."""


# --------------------------------------------------------------------------------------
# The publisher
# --------------------------------------------------------------------------------------

ControlCallback = Callable[[str, dict[str, Any]], None]
StatusCallback = Callable[[dict[str, Any]], None]

# Messages published concurrently while waiting for PUBACKs (order is kept on the wire).
PUBLISH_WINDOW = 32
# Seconds to wait for a PUBACK (or a SUBACK) before declaring the connection dead.
OPERATION_TIMEOUT_S = 10.0
# Keepalive: how fast the broker notices a dead agent (and fires the last will), seconds.
KEEPALIVE_S = 30
# Shutdown: how long to keep delivering the outbox before disconnecting, seconds.
DRAIN_TIMEOUT_S = 2.0
# Drops are reported through on_status at most this often, seconds.
DROP_REPORT_INTERVAL_S = 1.0
# CONNACK codes (MQTT 3.1.1 values and their MQTT 5 reason codes) that retrying cannot fix.
_LOGIN_REFUSED = (
    "login refused (bad user name or password, or not authorized): check user:pass in the "
    "--mqtt URL (mqtt://USER:PASS@HOST:PORT) and the broker's password file and ACL"
)
_FATAL_CONNACK = {
    2: "the broker rejected the client id: set mqtt.client_id",
    133: "the broker rejected the client id: set mqtt.client_id",
    4: _LOGIN_REFUSED,
    134: _LOGIN_REFUSED,
    5: _LOGIN_REFUSED,
    135: _LOGIN_REFUSED,
}


class MqttPublisher:
    """Publishes agent events to MQTT, reliably, in order, through an on-disk outbox.

    Topics (`P` = `config.prefix`):

    - `P/<stream>/<kind>`: every final event as JSON, QoS `config.qos`, not retained
      (`trigger` events included).
    - `P/status`: retained `online`; last will (and clean shutdown) `offline`.
    - `P/<stream>/set`: subscribed; a JSON object passed to `on_control(stream, dict)`.
    - `P/<stream>/error`: `{"error": message, "payload": raw}` for a rejected control payload.
    - `P/<stream>/state`: retained JSON of the stream's control state: `initial_state`
      (published at every connection, so that a state retained by an earlier run is
      replaced), updated with the control keys applied since.
    - rule topics: a `trigger` event's `topic` gets its `payload` (with its `qos` and
      `retain`), just before the trigger itself goes to `P/<stream>/trigger`.
    - `<discovery_prefix>/device/<id>/config`: retained Home Assistant discovery.

    Args:
        config: the MQTT config; with `url` None an embedded amqtt broker is started on
            `embedded_host:embedded_port` and stopped with the publisher.
        on_control: called on the loop with `(stream, payload)` for each valid control
            message; raise `ValueError` to reject it (the message goes to the error topic).
        on_status: called on the loop with a dict on connection changes and drops, e.g.
            `{"mqtt": "connected", "url": ...}`, `{"mqtt": "disconnected", "error": ...,
            "retry_in_s": ...}`, `{"mqtt": "dropped", "dropped": total, "new": n}`,
            `{"mqtt": "outbox_error", "error": ..., "disk_errors": n, ...}` when the outbox's
            journal stops working (disk full or unwritable) and `{"mqtt": "outbox_ok"}` when
            it works again.
        device_name: device name in Home Assistant.
        command_event_types: event types of the Home Assistant voice command entity.
        sound_event_types: event type -> keywords of the Home Assistant sound entity.
        sound_groups: the sound tagger's label groups that make sound events (``[sounds]``
            on): Home Assistant gets an event entity per group (`discovery_message`).
        sustained_groups: those with start / update / end: also a binary sensor each.
        initial_state: stream -> control state at start, published retained on
            `P/<stream>/state` at every connection; None: with `config.discovery`,
            `{"*": {"mute": false}}` (Home Assistant's mute switch reads `P/*/state`, and the
            agent's streams start unmuted), else nothing.

    Connection policy: at start, a refused login (bad credentials, not authorized, client
    id rejected) or a TLS failure raises `MqttConnectError` from `__aenter__`; a broker that
    cannot be reached is retried in the background (events wait in the outbox). After a
    successful start every failure is retried with capped exponential backoff and reported
    through `on_status`.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        on_control: ControlCallback | None = None,
        on_status: StatusCallback | None = None,
        device_name: str = "salmonn-live",
        command_event_types: Sequence[str] = DEFAULT_COMMAND_EVENT_TYPES,
        sound_event_types: Mapping[str, Sequence[str]] = DEFAULT_SOUND_EVENT_TYPES,
        initial_state: Mapping[str, Mapping[str, Any]] | None = None,
        sound_groups: Sequence[str] = (),
        sustained_groups: Collection[str] = (),
    ) -> None:
        self._config = config
        self._sound_groups = tuple(sound_groups)
        self._sustained_groups = frozenset(sustained_groups)
        self._on_control = on_control
        self._on_status = on_status
        self._device_name = device_name
        self._command_types = tuple(command_event_types)
        self._sound_types = dict(sound_event_types)
        self._url = config.url
        self._broker: EmbeddedBroker | None = None
        self._outbox: Outbox | None = None
        self._client: aiomqtt.Client | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._first_attempt: asyncio.Future[None] | None = None
        self._drop_report: asyncio.TimerHandle | None = None
        self._reported_drops = 0
        self._reported_disk_ok = True
        self._closing = False
        self._started = False
        self._connected = False
        if initial_state is None:
            initial_state = {ALL_STREAMS: INITIAL_CONTROL_STATE} if config.discovery else {}
        self._control_state = {k: dict(v) for k, v in initial_state.items()}
        self._counters = {
            "submitted": 0,
            "published": 0,
            "skipped_partial": 0,
            "rule_messages": 0,
            "control_ok": 0,
            "control_errors": 0,
            "connects": 0,
            "disconnects": 0,
        }

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The broker URL in use (the embedded broker's once started), password redacted."""
        return None if self._url is None else redact_url(self._url)

    @property
    def connected(self) -> bool:
        """True while a broker session is up."""
        return self._connected

    async def start(self) -> None:
        """Open the outbox, start the embedded broker if needed, and connect.

        Raises:
            MqttConnectError: the broker refused the login or TLS failed (fix the config).
            MqttConfigError: a TLS file cannot be read.
            EmbeddedBrokerError: the embedded broker cannot listen.
        """
        if self._started:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._started = True
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._stopping = asyncio.Event()
        self._first_attempt = loop.create_future()
        outbox_dir = self._config.effective_outbox_dir
        self._outbox = await asyncio.to_thread(Outbox, outbox_dir, self._config.outbox_max_events)
        logger.info(
            "MQTT outbox %s (bound %d, %d waiting from a previous run)",
            outbox_dir,
            self._config.outbox_max_events,
            len(self._outbox),
        )
        tls_context = await asyncio.to_thread(self._tls_context)
        try:
            if self._url is None:
                self._url = await self._start_embedded_broker()
                logger.info("MQTT: no --mqtt URL given; embedded broker at %s", self._url)
            self._run_task = loop.create_task(
                self._run(parse_url(self._url), tls_context), name="mqtt-publisher"
            )
            await asyncio.shield(self._first_attempt)
        except BaseException:
            self.close()
            await self.wait_closed()
            raise

    async def _start_embedded_broker(self) -> str:
        """Start the embedded broker; returns its URL."""
        from agent.protocols.broker import EmbeddedBroker, EmbeddedBrokerPortInUse

        host, port = self._config.embedded_host, self._config.embedded_port
        self._broker = EmbeddedBroker(host, port)
        try:
            if port and not _port_free(host, port):  # spares us amqtt's traceback in the log
                raise EmbeddedBrokerPortInUse(f"{host}:{port} in use")
            await self._broker.start()
        except EmbeddedBrokerPortInUse:
            # The embedded broker is a convenience: rather than fail the agent, take any free
            # port and say so loudly (clients configured for the usual port won't find it).
            self._broker = EmbeddedBroker(host, 0)
            await self._broker.start()
            logger.warning(
                "MQTT: port %d on %s is taken by another program; the embedded broker "
                "listens on %s instead (set mqtt.embedded_port, or --mqtt URL of that broker)",
                port,
                host,
                self._broker.url,
            )
        return self._broker.url

    def _tls_context(self) -> ssl.SSLContext | None:
        if self._url is None or not parse_url(self._url).tls:
            return None
        cfg = self._config
        try:
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            if cfg.cert_file is not None:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise MqttConfigError(
                f"mqtt TLS files: cannot load ca_file={cfg.ca_file!r} cert_file="
                f"{cfg.cert_file!r} key_file={cfg.key_file!r}: {exc}"
            ) from exc
        return ctx

    def close(self) -> None:
        """Begin shutdown (idempotent): stop intake, deliver what the outbox holds for up to
        2 s, publish `offline`, disconnect, stop the embedded broker, close the outbox.
        Undelivered messages stay in the outbox for the next start."""
        if self._closing:
            return
        self._closing = True
        if not self._started:
            return
        self._close_task = asyncio.get_running_loop().create_task(
            self._shutdown(), name="mqtt-publisher-close"
        )

    async def wait_closed(self) -> None:
        """Wait until `close()` has finished."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def __aenter__(self) -> MqttPublisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    async def _shutdown(self) -> None:
        assert self._stopping is not None and self._drained is not None
        if self._drop_report is not None:
            self._drop_report.cancel()
        try:
            if self._connected and self._outbox is not None and len(self._outbox):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT_S)
            client = self._client
            if self._connected and client is not None:
                try:
                    await client.publish(
                        self._status_topic, "offline", qos=1, retain=True, timeout=DRAIN_TIMEOUT_S
                    )
                except aiomqtt.MqttError as exc:
                    logger.info("MQTT: could not publish offline status: %s", exc)
            self._stopping.set()
            if self._run_task is not None:
                (error,) = await cancel_and_wait([self._run_task])
                if error is not None:
                    raise error
        finally:
            if self._broker is not None:
                self._broker.close()
                await self._broker.wait_closed()
            if self._outbox is not None:
                if len(self._outbox):
                    logger.warning(
                        "MQTT: %d message(s) not delivered; kept in %s for the next start",
                        len(self._outbox),
                        self._outbox.path,
                    )
                self._outbox.close()

    # -- intake ---------------------------------------------------------------------------

    def submit(self, item: Published) -> None:
        """Queue an event for publication (sync, never blocks on the network).

        The event goes to the outbox (bounded: beyond `outbox_max_events` the oldest message
        is dropped and counted) as its JSON text on ``<prefix>/<stream>/<kind>``, and the
        sender is woken. A `trigger` event (a smart-home rule fired,
        `agent.events.TriggerEvent`) first puts the rule's own message: its `payload` on its
        `topic`, with its `qos` and `retain` (validated with the rules, `agent.config.RuleSpec`).
        Events with `partial: true` are skipped unless `publish_partials` is set.

        Args:
            item: The published event (stream ids are valid topic levels: `check_stream_id`).

        Raises:
            RuntimeError: before `start()` or after `close()`.
        """
        if self._outbox is None or self._closing:
            raise RuntimeError(
                "MqttPublisher.submit() before start() or after close(); events are dropped"
            )
        event = item.event
        if event.partial and not self._config.publish_partials:
            self._counters["skipped_partial"] += 1
            return
        self._counters["submitted"] += 1
        dropped = 0
        if isinstance(event, TriggerEvent):
            self._counters["rule_messages"] += 1
            dropped += self._outbox.put(event.topic, event.payload, event.qos, event.retain)
        dropped += self._outbox.put(
            f"{self._config.prefix}/{event.stream}/{event.kind}", item.json, self._config.qos
        )
        if dropped:
            self._schedule_drop_report()
        self._check_disk()
        assert self._wakeup is not None and self._drained is not None
        self._drained.clear()
        self._wakeup.set()

    async def drain(self) -> None:
        """Wait until the outbox is empty (every message acknowledged by the broker).

        Waits forever while the broker is away: wrap it in `asyncio.wait_for`.
        """
        assert self._drained is not None and self._outbox is not None, "not started"
        while len(self._outbox):
            await self._drained.wait()

    def stats(self) -> dict[str, Any]:
        """Counters: publisher (`submitted`, `published`, `rule_messages`, ...) and `outbox`
        (per-rule counters: `agent.runtime.app.Agent.rules`)."""
        return {
            **self._counters,
            "connected": self._connected,
            "outbox": self._outbox.stats() if self._outbox is not None else {},
        }

    # -- status reporting -----------------------------------------------------------------

    def _status(self, info: dict[str, Any]) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status(info)
        except Exception:
            logger.exception("MQTT: on_status callback failed for %s", info)

    def _check_disk(self) -> None:
        """Report the outbox journal failing (``outbox_error``) or working again
        (``outbox_ok``), once per change. Checked after each put and ack rather than when the
        outbox opens, so the report reaches an agent that is up."""
        assert self._outbox is not None
        ok = self._outbox.disk_ok
        if ok == self._reported_disk_ok:
            return
        self._reported_disk_ok = ok
        path = str(self._outbox.path)
        if ok:
            self._status({"mqtt": "outbox_ok", "path": path})
            return
        stats = self._outbox.stats()
        self._status(
            {
                "mqtt": "outbox_error",
                "path": path,
                "error": self._outbox.last_disk_error,
                "disk_errors": stats["disk_errors"],
                "queued": stats["queued"],
            }
        )

    def _schedule_drop_report(self) -> None:
        if self._drop_report is None:
            self._drop_report = asyncio.get_running_loop().call_later(
                DROP_REPORT_INTERVAL_S, self._report_drops
            )

    def _report_drops(self) -> None:
        self._drop_report = None
        assert self._outbox is not None
        total = self._outbox.dropped
        new = total - self._reported_drops
        self._reported_drops = total
        logger.warning(
            "MQTT outbox full (%d): dropped %d oldest message(s), %d in total",
            self._outbox.max_events,
            new,
            total,
        )
        self._status({"mqtt": "dropped", "dropped": total, "new": new})

    # -- connection loop ------------------------------------------------------------------

    @property
    def _status_topic(self) -> str:
        return f"{self._config.prefix}/status"

    def _make_client(
        self, addr: BrokerAddress, tls_context: ssl.SSLContext | None
    ) -> aiomqtt.Client:
        client = aiomqtt.Client(
            addr.host,
            addr.port,
            username=addr.username,
            password=addr.password,
            identifier=self._config.effective_client_id,
            will=aiomqtt.Will(self._status_topic, "offline", qos=1, retain=True),
            clean_session=True,
            keepalive=KEEPALIVE_S,
            timeout=OPERATION_TIMEOUT_S,
            tls_context=tls_context,
            logger=logging.getLogger(__name__ + ".paho"),
        )
        # The sender keeps a window of publishes in flight on purpose; don't warn about it.
        client.pending_calls_threshold = PUBLISH_WINDOW + 16
        return client

    async def _run(self, addr: BrokerAddress, tls_context: ssl.SSLContext | None) -> None:
        assert self._first_attempt is not None and self._stopping is not None
        cfg = self._config
        failures = 0
        where = redact_url(self._url or "")
        while not self._stopping.is_set():
            try:
                async with self._make_client(addr, tls_context) as client:
                    failures = 0
                    self._client = client
                    self._connected = True
                    self._counters["connects"] += 1
                    logger.info("MQTT connected to %s as %s", where, cfg.effective_client_id)
                    self._status({"mqtt": "connected", "url": where})
                    try:
                        await self._session(client)
                    finally:
                        self._connected = False
                        self._client = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reraise_if_cancelling(exc)
                fatal = fatal_reason(exc)
                if not self._first_attempt.done():
                    if fatal is not None:
                        self._first_attempt.set_exception(
                            MqttConnectError(f"MQTT broker {where} refused the connection: {fatal}")
                        )
                        return
                    self._first_attempt.set_result(None)
                failures += 1
                delay = backoff_s(failures, cfg.reconnect_min_s, cfg.reconnect_max_s)
                was = "lost connection to" if self._counters["connects"] else "cannot reach"
                if isinstance(exc, aiomqtt.MqttError | OSError):
                    logger.warning(
                        "MQTT %s %s: %s%s; retrying in %.1f s (%d waiting in the outbox)",
                        was,
                        where,
                        exc,
                        f" ({fatal})" if fatal else "",
                        delay,
                        len(self._outbox or ()),
                    )
                else:
                    logger.error("MQTT session crashed; reconnecting", exc_info=True)
                if self._counters["connects"] or failures == 1:
                    self._counters["disconnects"] += 1
                    self._status(
                        {
                            "mqtt": "disconnected",
                            "url": where,
                            "error": fatal or str(exc),
                            "retry_in_s": round(delay, 2),
                        }
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connected session: announce, subscribe, then publish and serve control."""
        assert self._first_attempt is not None
        cfg = self._config
        await client.publish(self._status_topic, "online", qos=1, retain=True)
        for stream, state in list(self._control_state.items()):
            await self._publish_state(client, stream, state)
        await finish_before_cancel(client.subscribe(f"{cfg.prefix}/+/set", qos=1))
        if cfg.discovery:
            await finish_before_cancel(client.subscribe(f"{cfg.discovery_prefix}/status", qos=1))
            await self._publish_discovery(client)
        if not self._first_attempt.done():
            self._first_attempt.set_result(None)
        tasks = [
            asyncio.create_task(self._sender(client), name="mqtt-sender"),
            asyncio.create_task(self._receiver(client), name="mqtt-receiver"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc
        raise aiomqtt.MqttError("MQTT session ended")

    async def _publish_discovery(self, client: aiomqtt.Client) -> None:
        topic, payload = discovery_message(
            prefix=self._config.prefix,
            discovery_prefix=self._config.discovery_prefix,
            device_id=device_id_for(self._config.effective_client_id),
            device_name=self._device_name,
            command_event_types=self._command_types,
            sound_event_types=self._sound_types,
            sound_groups=self._sound_groups,
            sustained_groups=self._sustained_groups,
        )
        await client.publish(topic, payload, qos=1, retain=True)
        logger.info("MQTT: Home Assistant discovery published on %s", topic)

    async def _sender(self, client: aiomqtt.Client) -> None:
        """Publish the outbox in order, keeping up to PUBLISH_WINDOW messages in flight."""
        assert self._outbox is not None and self._wakeup is not None
        assert self._drained is not None
        outbox = self._outbox
        in_flight: collections.deque[tuple[OutboxEntry, asyncio.Task[None]]] = collections.deque()
        first = outbox.first()
        last_sent = first.seq - 1 if first is not None else 0
        try:
            while True:
                room = PUBLISH_WINDOW - len(in_flight)
                for entry in outbox.after(last_sent, room) if room > 0 else ():
                    task = asyncio.create_task(
                        client.publish(
                            entry.topic, entry.payload, qos=entry.qos, retain=entry.retain
                        )
                    )
                    in_flight.append((entry, task))
                    last_sent = entry.seq
                if not in_flight:
                    self._drained.set()
                    self._wakeup.clear()
                    if outbox.after(last_sent, 1):
                        continue
                    await self._wakeup.wait()
                    continue
                entry, task = in_flight[0]
                await asyncio.shield(task)
                in_flight.popleft()
                outbox.ack(entry.seq)
                self._counters["published"] += 1
                self._check_disk()
        finally:
            await cancel_and_wait(t for _, t in in_flight)

    async def _receiver(self, client: aiomqtt.Client) -> None:
        """Serve control messages and Home Assistant's birth message."""
        cfg = self._config
        ha_status = f"{cfg.discovery_prefix}/status"
        async for message in client.messages:
            topic = message.topic.value
            if cfg.discovery and topic == ha_status:
                if message.payload in (b"online", "online"):
                    logger.info("MQTT: Home Assistant came online; re-publishing discovery")
                    await self._publish_discovery(client)
                continue
            head, tail = cfg.prefix + "/", "/set"
            if topic.startswith(head) and topic.endswith(tail):
                stream = topic[len(head) : -len(tail)]
                if stream and "/" not in stream:
                    await self._handle_control(client, stream, message.payload)

    async def _handle_control(self, client: aiomqtt.Client, stream: str, raw: Any) -> None:
        raw_bytes = raw if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        raw_text = bytes(raw_bytes).decode("utf-8", errors="replace")
        error: str | None = None
        payload: Any = None
        try:
            payload = json.loads(raw_bytes)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            error = f"expected a JSON object, got invalid JSON: {exc}"
        if error is None and not isinstance(payload, dict):
            error = f"expected a JSON object, got {type(payload).__name__}"
        if error is None and self._on_control is None:
            error = "control is not enabled on this agent"
        if error is None:
            assert self._on_control is not None
            try:
                self._on_control(stream, payload)
            except ValueError as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:
                logger.exception("MQTT: on_control(%r, %r) crashed", stream, payload)
                error = f"internal error: {type(exc).__name__}"
        if error is not None:
            self._counters["control_errors"] += 1
            logger.warning("MQTT control on %s rejected: %s", stream, error)
            body = {"error": error, "payload": raw_text[:1000]}
            await client.publish(
                f"{self._config.prefix}/{stream}/error", json.dumps(body, ensure_ascii=False), qos=1
            )
            return
        self._counters["control_ok"] += 1
        state = self._control_state.setdefault(stream, {})
        state.update(payload)
        await self._publish_state(client, stream, state)

    async def _publish_state(
        self, client: aiomqtt.Client, stream: str, state: Mapping[str, Any]
    ) -> None:
        await client.publish(
            f"{self._config.prefix}/{stream}/state",
            json.dumps(state, ensure_ascii=False),
            qos=1,
            retain=True,
        )


def _port_free(host: str, port: int) -> bool:
    """Whether a TCP listener could bind `host:port` now (as asyncio's server would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def fatal_reason(exc: BaseException) -> str | None:
    """What to fix when `exc` is a connection failure retrying cannot cure, else None."""
    if isinstance(exc, aiomqtt.MqttCodeError):
        rc = exc.rc
        value = getattr(rc, "value", rc)
        if isinstance(value, int) and value in _FATAL_CONNACK:
            return _FATAL_CONNACK[value]
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed ({cur.verify_message}): "
                "set mqtt.ca_file to the CA that signed the broker's certificate"
            )
        if isinstance(cur, ssl.SSLError):
            return f"TLS handshake failed ({cur}): check the mqtts:// port and TLS files"
        cur = cur.__cause__ or cur.__context__
    return None


def status_line(info: Mapping[str, Any]) -> tuple[str, str]:
    """The status word and message of an `on_status` report (for the agent's status events).

    Args:
        info: What `MqttPublisher` passed to `on_status` (``{"mqtt": what, ...}``).

    Returns:
        ``("mqtt_<what>", one human-readable line)``.
    """
    what = str(info.get("mqtt", "state"))
    if what == "dropped":
        message = f"MQTT outbox full: dropped {info['new']} oldest ({info['dropped']} total)"
    elif what == "outbox_error":
        message = (
            f"MQTT outbox journal unusable ({info.get('error')}): undelivered events are "
            "kept in memory only (bounded) until the disk works again"
        )
    elif what == "outbox_ok":
        message = f"MQTT outbox journal {info.get('path')} writable again"
    elif what == "disconnected":
        message = f"MQTT broker unreachable: {info.get('error')}"
    else:
        message = f"MQTT {what} to {info.get('url')}"
    return f"mqtt_{what}", message
