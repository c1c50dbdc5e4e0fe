"""The WebSocket server (``websockets``' asyncio API): `/events` out, `/audio` in.

* ``/events[?stream=a,b&kind=transcript,caption&partial=0]``: every event as one JSON text
  message. Each client has its own bounded queue (`agent.runtime.fanout.Subscription`): when it
  falls behind it loses its oldest events and is told how many (a ``dropped`` status message); a
  client that stays behind is closed with `CloseCode.TOO_SLOW`.
* ``/audio``: a JSON hello ``{"stream": ID, "sample_rate": HZ, "format": "s16le"|"f32le",
  "channels": N}``, answered by a ``ready`` status message, then binary frames of interleaved
  PCM (a whole number of samples per message). The client closes normally at the end of the
  stream; its open segment is then closed and answered. Protocol errors close with a
  `CloseCode` and a reason; other connections are not affected.

Both paths need the token when one is configured: ``Authorization: Bearer TOKEN`` or
``?token=TOKEN``, compared in constant time (SHA-256 digests of equal length through
`hmac.compare_digest`); failures get HTTP 401 before the upgrade. The token is never logged (the
protocol logger redacts ``token=``, ``Bearer`` and the configured value itself). Unknown paths
get HTTP 404.

Limits (``[ws]``, see ``docs/security.md``): connections (HTTP 503), message size (1009), the
opening handshake and the hello (``hello_timeout_s``: the TCP connection is dropped / 4408),
`/audio` streams per IP address (1013) and the audio rate of a stream (a token bucket:
``max_audio_rate`` times real time sustained, ``audio_burst_s`` ahead; beyond: 1008).

``GET /`` (and ``GET /<file>`` for the files of ``agent/protocols/web/``, package data) serves the
live caption page over plain HTTP, without a token: the page is static and holds no data; it opens
``/events`` itself, passing on the ``?token=`` of its own URL (see ``docs/clients.md``).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import hmac
import http
import json
import logging
import mimetypes
import re
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from importlib import resources
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response
from websockets.protocol import State

from agent.config import AgentConfig, check_stream_id
from agent.errors import AgentError, AudioProtocolError, ConfigError, OutputError
from agent.events import AGENT_STREAM, EventKind, Published, WallClock, client_notice
from agent.runtime.fanout import EventBus, Subscription, SubscriptionClosed
from agent.runtime.pipeline import Pipeline
from streaming.errors import AudioInputError
from streaming.pcm import PCM_FORMATS, SAMPLE_RATE_HZ, decode_pcm

logger = logging.getLogger(__name__)

#: Every `/audio` frame counts as at least this much audio against ``ws.max_audio_rate``, so a
#: flood of tiny frames is limited like a flood of audio.
MIN_FRAME_CHARGE_S = 0.01
_HELLO_KEYS = {"stream", "sample_rate", "format", "channels"}
_ALL_KINDS = {str(k) for k in EventKind}
#: The caption page's files (package data of `agent.protocols`), served at ``/`` (index.html)
#: and ``/<name>``.
WEB_STATIC_DIR = resources.files("agent.protocols") / "web"
_STATIC_NAME_RE = re.compile(r"/[A-Za-z0-9_-][A-Za-z0-9._-]*")
#: The longest the agent waits, after closing a slow `/events` client with 4429, for that client
#: to read up to the close frame while it keeps reading (one that stops is dropped sooner,
#: `SLOW_CLOSE_IDLE_FACTOR`). The frame waits behind what is already buffered for the client:
#: the transport's write limit and the kernel send buffer (both ``ws.send_buffer_bytes``, the
#: kernel's doubled by Linux), then the client's own buffers: at 1 kB/s about a minute.
SLOW_CLOSE_MAX_S = 300.0
#: A client closed as too slow is dropped once it has read nothing for this many times
#: ``ws.send_timeout_s``. A slow reader's own buffers (its receive buffer, its library's
#: message queue) make its progress come in steps: a client reading one 700-byte event a
#: second acknowledged bytes only every 11 s in `bench load`, and was dropped (1006) at 1x.
SLOW_CLOSE_IDLE_FACTOR = 3.0
#: ``tcpi_bytes_acked`` in Linux's ``struct tcp_info`` (a u64 at this offset, since Linux 4.2).
_TCPI_BYTES_ACKED = struct.Struct("=Q")
_TCPI_BYTES_ACKED_OFFSET = 120


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses (documented in ``docs/agent.md``)."""

    NORMAL = 1000  # the stream or subscription ended normally
    GOING_AWAY = 1001  # the agent is shutting down
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (sent by websockets itself)
    INVALID_DATA = 1007  # a text message that is not UTF-8 (sent by websockets itself)
    TOO_FAST = 1008  # /audio faster than ws.max_audio_rate x real time (after audio_burst_s)
    MESSAGE_TOO_BIG = 1009  # a message over ws.max_message_bytes (sent by websockets itself)
    INTERNAL_ERROR = 1011  # a bug on the server side (logged with its traceback)
    TRY_AGAIN_LATER = 1013  # ws.max_streams_per_client /audio streams already open from the IP
    BAD_REQUEST = 4400  # malformed hello or query: not JSON, not an object, missing/mistyped keys
    FORBIDDEN_STREAM = 4403  # the stream id is not allowed (undeclared, or a local stream)
    HELLO_TIMEOUT = 4408  # no hello within ws.hello_timeout_s
    STREAM_IN_USE = 4409  # another source is feeding this stream id
    UNSUPPORTED_FORMAT = 4415  # sample format, rate or channel count not supported
    BAD_FRAME = 4422  # a frame that is not whole samples, text after the hello, NaN samples
    TOO_SLOW = 4429  # an /events client that stays behind


def _reason(text: str) -> str:
    """A close reason within the protocol's 123-byte limit."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class _RedactTokens(logging.Filter):
    """Removes tokens from protocol log records: whole ``Authorization`` header values (any
    scheme), ``token=...`` and ``Bearer ...`` values, and the configured tokens of running
    servers wherever they appear (a token holding a space or ``&`` would otherwise be cut
    short, one sent in the wrong header missed)."""

    _PATTERNS = (
        re.compile(r"(authorization:\s*)[^\r\n]+", re.IGNORECASE),
        re.compile(r"(token=|Bearer\s+)[^&\s'\"]+", re.IGNORECASE),
    )

    def __init__(self) -> None:
        super().__init__()
        self.secrets: collections.Counter[str] = collections.Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg == "opening handshake failed" and isinstance(exc, InvalidHandshake):
            # Anything on the network can send a bad request (scanners, TLS to the plain port):
            # one INFO line, not an ERROR with a traceback quoting the request. (Any other
            # exception is a bug of ours in `_process_request`: it stays an ERROR.)
            cause = exc.__cause__
            record.msg, record.args = (
                "opening handshake failed: %s%s",
                (exc, f" ({cause})" if cause else ""),
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        elif record.exc_info and not record.exc_text:
            # A traceback may quote a request line or header: redact it too.
            record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
        message = record.getMessage()
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True

    def _redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        for pattern in self._PATTERNS:
            text = pattern.sub(r"\1***", text)
        return text


_redact = _RedactTokens()


_protocol_logger = logging.getLogger(__name__ + ".protocol")
_protocol_logger.addFilter(_redact)


def _first(params: Mapping[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[-1] if values else None


def _csv(params: Mapping[str, list[str]], key: str) -> set[str]:
    return {
        item.strip() for value in params.get(key, []) for item in value.split(",") if item.strip()
    }


class WsServer:
    """The `/events` and `/audio` server; an async context manager.

    Args:
        config: The agent configuration (its `ws` slice, and stream settings for `/audio`).
        pipeline: Where `/audio` streams go.
        bus: Where `/events` subscribers read from.
        clock: For the stamps of client notices.

    Attributes:
        port: The bound port (useful with port 0), once started.
    """

    def __init__(
        self, config: AgentConfig, pipeline: Pipeline, bus: EventBus, clock: WallClock
    ) -> None:
        self.config = config
        self.ws = config.ws
        self.pipeline = pipeline
        self.bus = bus
        self.clock = clock
        self.port: int | None = None
        self._server: Server | None = None
        self._audio: set[ServerConnection] = set()
        self._events: set[ServerConnection] = set()
        # /events clients closed as too slow whose close frame may still be on its way.
        self._closing_slow: set[ServerConnection] = set()
        if config.ws.auth and not config.ws.token:
            raise OutputError(
                "the WebSocket server needs a token (ws.token or SALMONN_LIVE_WS_TOKEN), "
                "or ws.auth = false on a loopback address"
            )
        self._token = config.ws.token.encode() if config.ws.token else None
        # Compared as digests: equal lengths, so the time taken says nothing about the token.
        self._token_digest = hashlib.sha256(self._token).digest() if self._token else None
        self._registered_secret: str | None = None
        self._closed = asyncio.Event()
        self._closing = False
        self._audio_per_host: collections.Counter[str] = collections.Counter()
        self.counters = {
            "rejected_auth": 0,
            "rejected_connections": 0,
            "audio_closed_with_error": 0,
            "events_too_slow": 0,
        }

    @property
    def url(self) -> str:
        """``ws://HOST:PORT`` (``wss://`` with TLS)."""
        host, _ = self.ws.host_port
        scheme = "wss" if self.ws.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        host, port = self.ws.host_port
        ssl_context = self._ssl_context()
        if self.ws.token:
            _redact.secrets[self.ws.token] += 1
            self._registered_secret = self.ws.token
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                process_request=self._process_request,
                max_size=self.ws.max_message_bytes,
                open_timeout=self.ws.hello_timeout_s,
                close_timeout=self.ws.close_timeout_s,
                ssl=ssl_context,
                logger=_protocol_logger,
                server_header="salmonn-live",
                compression=None,
                # What one client may have waiting in the agent's transport, beside the kernel's
                # `send_buffer_bytes`: a 4429 close frame goes out behind all of it.
                write_limit=self.ws.send_buffer_bytes or 2**15,
            )
        except OSError as exc:
            self._forget_secret()
            raise OutputError(
                f"cannot listen on {host}:{port} for WebSockets: {exc.strerror or exc}; "
                "choose another port with --ws HOST:PORT"
            ) from exc
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        logger.info(
            "serving /events and /audio on %s (token %s)",
            self.url,
            "required" if self._token else "not required",
        )
        self.pipeline.emit_status(
            "listening",
            f"WebSocket server on {self.url}",
            detail={
                "url": self.url,
                "paths": ["/events", "/audio"],
                "token_required": self._token is not None,
            },
        )
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.ws.tls_cert or not self.ws.tls_key:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.ws.tls_cert, self.ws.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise OutputError(
                f"cannot load the TLS certificate {self.ws.tls_cert} "
                f"and key {self.ws.tls_key}: {exc}"
            ) from exc
        return context

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- shutdown ------------------------------------------------------------------------------

    async def stop_intake(self) -> None:
        """Stop listening and close every `/audio` client with 1001 (their open segments are
        closed and answered); `/events` clients stay until `close`."""
        self._closing = True
        if self._server is not None:
            self._server.close(close_connections=False)
        await asyncio.gather(
            *(c.close(CloseCode.GOING_AWAY, "agent shutting down") for c in list(self._audio)),
            return_exceptions=True,
        )

    async def close(self) -> None:
        """Close every client with 1001 and wait for the handlers (idempotent). Call after the
        bus is closed so `/events` clients receive the last events first."""
        if self._closed.is_set():
            return
        await self.stop_intake()
        if self._server is not None:
            try:
                async with asyncio.timeout(self.ws.close_timeout_s + self.ws.send_timeout_s):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning(
                    "WebSocket handlers still running after the timeout: closing connections"
                )
                for connection in list(self._closing_slow):
                    # Their close frame is queued and their `close_timeout` is off
                    # (`_close_slow_client`): websockets' closing would wait on them for ever.
                    connection.transport.abort()
                self._server.close(close_connections=True)
                await self._server.wait_closed()
        self._forget_secret()
        self._closed.set()

    def _forget_secret(self) -> None:
        """Stop redacting this server's token (other servers' stay)."""
        if self._registered_secret is not None:
            _redact.secrets[self._registered_secret] -= 1
            if _redact.secrets[self._registered_secret] <= 0:
                del _redact.secrets[self._registered_secret]
            self._registered_secret = None

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""
        await self._closed.wait()

    # -- handshake -----------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path not in ("/events", "/audio"):
            return _static_response(connection, request, path)
        if self._closing:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "agent shutting down\n")
        # Every connection has a handler from the moment it is accepted (this one included),
        # so connections still in their handshake count too.
        if self._server is not None and len(self._server.handlers) > self.ws.max_connections:
            self.counters["rejected_connections"] += 1
            logger.warning(
                "refused %s from %s: %d connections already open",
                path,
                connection.remote_address,
                self.ws.max_connections,
            )
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if self._token is not None and not self._authorized(request):
            self.counters["rejected_auth"] += 1
            logger.warning(
                "rejected %s from %s: missing or wrong token", path, connection.remote_address
            )
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="salmonn-live"'
            return response
        return None

    def _authorized(self, request: Request) -> bool:
        assert self._token_digest is not None
        given: str | None = None
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        if given is None:
            given = _first(parse_qs(urlsplit(request.path).query), "token")
        if given is None:
            return False
        digest = hashlib.sha256(given.encode("utf-8", errors="surrogateescape")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    async def _handle(self, connection: ServerConnection) -> None:
        path = urlsplit(connection.request.path).path if connection.request else ""
        try:
            if path == "/events":
                await self._serve_events(connection)
            else:
                await self._serve_audio(connection)
        except ConnectionClosed:
            pass
        except Exception:
            logger.error(
                "handler for %s from %s crashed", path, connection.remote_address, exc_info=True
            )
            await connection.close(CloseCode.INTERNAL_ERROR, "internal error (logged on the agent)")

    # -- /events -------------------------------------------------------------------------------

    async def _serve_events(self, connection: ServerConnection) -> None:
        params = parse_qs(urlsplit(connection.request.path).query if connection.request else "")
        streams = _csv(params, "stream")
        kinds = _csv(params, "kind")
        unknown = sorted(kinds - _ALL_KINDS)
        if unknown:
            await connection.close(
                CloseCode.BAD_REQUEST,
                _reason(f"unknown kind(s) {unknown}; kinds: {sorted(_ALL_KINDS)}"),
            )
            return
        partial = (_first(params, "partial") or "1").lower() not in ("0", "false", "no")

        def accept(item: Published) -> bool:
            event = item.event
            if kinds and event.kind not in kinds:
                return False
            if streams and event.stream not in streams and event.stream != AGENT_STREAM:
                return False
            return partial or not event.partial

        sock = connection.transport.get_extra_info("socket")
        if sock is not None and self.ws.send_buffer_bytes:
            # The kernel's send buffer grows to megabytes: a stalled client would hide a
            # backlog of stale events there before our queue and 4429 ever see it.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.ws.send_buffer_bytes)
            except OSError as exc:
                logger.debug("cannot set SO_SNDBUF on %s: %s", connection.remote_address, exc)
        sub = self.bus.subscribe(f"ws:{connection.remote_address}", self.ws.client_queue, accept)
        self._events.add(connection)
        try:
            await connection.send(
                json.dumps(
                    client_notice(
                        "subscribed",
                        "subscribed to events",
                        {"streams": sorted(streams), "kinds": sorted(kinds), "partial": partial},
                        self.clock,
                    )
                )
            )
            pump = asyncio.create_task(self._pump(connection, sub), name="ws-events-pump")
            reader = asyncio.create_task(self._drain_incoming(connection), name="ws-events-reader")
            try:
                await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, reader):
                    task.cancel()
                results = await asyncio.gather(pump, reader, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, ConnectionClosed):
                    raise result
        finally:
            self._events.discard(connection)
            self.bus.unsubscribe(sub)

    async def _drain_incoming(self, connection: ServerConnection) -> None:
        """Read (and ignore) what an /events client sends, so its close is seen at once."""
        async for _message in connection:
            pass

    async def _pump(self, connection: ServerConnection, sub: Subscription) -> None:
        while True:
            try:
                event = await sub.get()
            except SubscriptionClosed:
                await connection.close(CloseCode.GOING_AWAY, "agent shutting down")
                return
            behind = sub.dropped_since_caught_up
            if behind > self.ws.client_max_dropped:
                await self._too_slow(
                    connection, sub, f"too slow: {behind} events dropped without catching up"
                )
                return
            lost = sub.take_dropped()
            try:
                async with asyncio.timeout(self.ws.send_timeout_s):
                    if lost:
                        await connection.send(
                            json.dumps(
                                client_notice(
                                    "dropped",
                                    f"you fell behind: {lost} event(s) dropped",
                                    {"dropped": lost, "dropped_total": sub.dropped},
                                    self.clock,
                                )
                            )
                        )
                    await connection.send(event.json)  # one serialisation for every client
            except TimeoutError:
                await self._too_slow(
                    connection,
                    sub,
                    f"too slow: a message took over {self.ws.send_timeout_s:g} s to send",
                )
                return

    async def _too_slow(self, connection: ServerConnection, sub: Subscription, reason: str) -> None:
        self.counters["events_too_slow"] += 1
        logger.warning("closing /events client %s: %s", connection.remote_address, reason)
        # It will read no more events: stop queueing them now, not when its close ends.
        self.bus.unsubscribe(sub)
        await self._close_slow_client(connection, CloseCode.TOO_SLOW, _reason(reason))

    async def _close_slow_client(
        self, connection: ServerConnection, code: int, reason: str
    ) -> None:
        """Close a client that is behind in reading so that it still receives the close frame.

        The frame goes out behind everything already buffered for the client. websockets' own
        `close` counts ``close_timeout`` from the moment the frame is queued and then aborts the
        TCP connection, dropping the frame (and whatever is still in the agent's buffer) while
        the client is still reading its backlog: slow clients saw 1006, not 4429. Here nothing
        more is queued, and the connection stays while the client keeps reading; it is dropped
        once the client has read nothing for `SLOW_CLOSE_IDLE_FACTOR` x ``ws.send_timeout_s``
        (what is already in the kernel still reaches it), after `SLOW_CLOSE_MAX_S`, or when the
        server shuts down.
        """
        connection.close_timeout = None  # the deadline is the one below
        self._closing_slow.add(connection)
        closing = asyncio.create_task(connection.close(code, reason), name="ws-events-close")
        loop = asyncio.get_running_loop()
        started = last_progress = loop.time()
        progress = _read_progress(connection)
        poll_s = min(0.25, self.ws.send_timeout_s / 4)
        try:
            while loop.time() - started < SLOW_CLOSE_MAX_S:
                try:
                    async with asyncio.timeout(poll_s):
                        await connection.wait_closed()
                    return
                except TimeoutError:
                    pass
                now, seen = loop.time(), _read_progress(connection)
                if seen > progress:
                    progress, last_progress = seen, now
                elif now - last_progress >= SLOW_CLOSE_IDLE_FACTOR * self.ws.send_timeout_s:
                    logger.info(
                        "dropping /events client %s: it read nothing for %g s after its close",
                        connection.remote_address,
                        SLOW_CLOSE_IDLE_FACTOR * self.ws.send_timeout_s,
                    )
                    return
            logger.info(
                "dropping /events client %s: still reading its backlog after %g s",
                connection.remote_address,
                SLOW_CLOSE_MAX_S,
            )
        finally:
            self._closing_slow.discard(connection)
            connection.transport.abort()  # a no-op once closed
            await closing  # done as soon as websockets has seen the connection end

    # -- /audio --------------------------------------------------------------------------------

    async def _serve_audio(self, connection: ServerConnection) -> None:
        host = str(connection.remote_address[0]) if connection.remote_address else "?"
        self._audio.add(connection)
        self._audio_per_host[host] += 1
        try:
            try:
                if self._audio_per_host[host] > self.ws.max_streams_per_client:
                    raise AudioProtocolError(
                        CloseCode.TRY_AGAIN_LATER,
                        f"{self.ws.max_streams_per_client} /audio streams already open from "
                        f"{host}; close one first",
                    )
                await self._audio_session(connection)
            except AudioProtocolError as exc:
                self.counters["audio_closed_with_error"] += 1
                logger.warning(
                    "closing /audio client %s: %d %s", connection.remote_address, exc.code, exc
                )
                await connection.close(exc.code, _reason(str(exc)))
        finally:
            self._audio.discard(connection)
            self._audio_per_host[host] -= 1
            if self._audio_per_host[host] <= 0:
                del self._audio_per_host[host]

    async def _audio_session(self, connection: ServerConnection) -> None:
        try:
            async with asyncio.timeout(self.ws.hello_timeout_s):
                hello = await connection.recv()
        except TimeoutError:
            if connection.state is not State.OPEN:
                return  # websockets already failed the connection (1007, 1009): not a timeout
            raise AudioProtocolError(
                CloseCode.HELLO_TIMEOUT, f"no hello within {self.ws.hello_timeout_s:g} s"
            ) from None
        stream_id, rate, sample_format, channels = self._parse_hello(hello)
        settings = self.config.stream_settings(stream_id)
        declared = any(s.id == stream_id for s in self.config.streams)
        if declared and settings.kind != "ws":
            raise AudioProtocolError(
                CloseCode.FORBIDDEN_STREAM,
                f"stream {stream_id!r} is a local {settings.kind} stream",
            )
        if not declared and not self.ws.allow_unknown_streams:
            raise AudioProtocolError(
                CloseCode.FORBIDDEN_STREAM, f"stream {stream_id!r} is not declared in [[streams]]"
            )
        try:
            handle = self.pipeline.open_stream(settings, origin=f"ws:{connection.remote_address}")
        except ConfigError as exc:
            raise AudioProtocolError(CloseCode.STREAM_IN_USE, str(exc)) from exc
        except AgentError as exc:
            raise AudioProtocolError(CloseCode.GOING_AWAY, str(exc)) from exc
        try:
            await connection.send(
                json.dumps(
                    client_notice(
                        "ready",
                        f"send {sample_format} PCM frames",
                        {
                            "stream": stream_id,
                            "sample_rate": rate,
                            "format": sample_format,
                            "channels": channels,
                        },
                        self.clock,
                    )
                )
            )
            await self._receive_audio(connection, handle, rate, sample_format, channels)
        finally:
            handle.end()

    def _parse_hello(self, hello: str | bytes) -> tuple[str, int, str, int]:
        bad = CloseCode.BAD_REQUEST
        if isinstance(hello, bytes):
            raise AudioProtocolError(bad, "expected a JSON text hello first, got a binary frame")
        try:
            data = json.loads(hello)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise AudioProtocolError(bad, "the hello is not valid JSON") from None
        if not isinstance(data, dict):
            raise AudioProtocolError(bad, "the hello must be a JSON object")
        missing = sorted(_HELLO_KEYS - set(data))
        unknown = sorted(set(data) - _HELLO_KEYS)
        if missing or unknown:
            raise AudioProtocolError(
                bad,
                f"hello keys: missing {missing}, unknown {unknown}; expected {sorted(_HELLO_KEYS)}",
            )
        try:
            stream_id = check_stream_id(data["stream"], "hello.stream")
        except ConfigError as exc:
            raise AudioProtocolError(bad, str(exc)) from exc
        rate, channels, sample_format = data["sample_rate"], data["channels"], data["format"]
        for name, value in (("sample_rate", rate), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise AudioProtocolError(bad, f"hello.{name}: expected an integer, got {value!r}")
        if not isinstance(sample_format, str):
            raise AudioProtocolError(bad, f"hello.format: expected a string, got {sample_format!r}")
        unsupported = CloseCode.UNSUPPORTED_FORMAT
        if sample_format not in PCM_FORMATS:
            raise AudioProtocolError(
                unsupported,
                f"format {sample_format!r} not supported; use one of {sorted(PCM_FORMATS)}",
            )
        if not 8000 <= rate <= self.ws.max_sample_rate_hz:
            raise AudioProtocolError(
                unsupported,
                f"sample_rate {rate} Hz not supported; use 8000..{self.ws.max_sample_rate_hz}",
            )
        if not 1 <= channels <= self.ws.max_channels:
            raise AudioProtocolError(
                unsupported, f"channels {channels} not supported; use 1..{self.ws.max_channels}"
            )
        return stream_id, rate, sample_format, channels

    async def _receive_audio(
        self,
        connection: ServerConnection,
        handle: Any,
        rate: int,
        sample_format: str,
        channels: int,
    ) -> None:
        from streaming.resample import StreamResampler

        frame_bytes = PCM_FORMATS[sample_format].itemsize * channels
        resampler = StreamResampler(rate, SAMPLE_RATE_HZ) if rate != SAMPLE_RATE_HZ else None
        limit = _AudioRateLimit(self.ws.max_audio_rate, self.ws.audio_burst_s)
        async for message in connection:
            captured = time.monotonic()
            if isinstance(message, str):
                raise AudioProtocolError(
                    CloseCode.BAD_FRAME, "expected binary PCM frames after the hello, got text"
                )
            if not message or len(message) % frame_bytes:
                raise AudioProtocolError(
                    CloseCode.BAD_FRAME,
                    f"a frame of {len(message)} bytes is not a whole number of "
                    f"{frame_bytes}-byte samples "
                    f"({sample_format}, {channels} channel(s))",
                )
            limit.charge(len(message) / (frame_bytes * rate), captured)
            try:
                mono = decode_pcm(message, sample_format, channels)
            except AudioInputError as exc:  # "NaN or infinite samples"
                raise AudioProtocolError(CloseCode.BAD_FRAME, str(exc)) from exc
            if resampler is not None:
                mono = resampler.push(mono)
            if mono.size:
                handle.push(mono.astype(np.float32, copy=False), captured)
        if resampler is not None:
            tail = resampler.flush()
            if tail.size:
                handle.push(tail.astype(np.float32, copy=False), time.monotonic())


def _read_progress(connection: ServerConnection) -> int:
    """A number that grows as the client reads what was sent to it: the bytes its TCP stack
    acknowledged (Linux's ``TCP_INFO``; with TLS too), else less the bytes still waiting in the
    agent's transport buffer."""
    sock = connection.transport.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is not None and tcp_info is not None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
        except OSError:
            info = b""
        end = _TCPI_BYTES_ACKED_OFFSET + _TCPI_BYTES_ACKED.size
        if len(info) >= end:
            return int(_TCPI_BYTES_ACKED.unpack_from(info, _TCPI_BYTES_ACKED_OFFSET)[0])
    return -connection.transport.get_write_buffer_size()


class _AudioRateLimit:
    """A token bucket over seconds of audio: it holds up to ``burst_s`` and refills at ``rate``
    seconds of audio per second; each frame takes its duration (at least `MIN_FRAME_CHARGE_S`).

    Args:
        rate: Sustained limit, in multiples of real time.
        burst_s: Seconds of audio a client may send ahead of that rate.
    """

    def __init__(self, rate: float, burst_s: float) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.allowance_s = burst_s
        self._last: float | None = None

    def charge(self, audio_s: float, now: float) -> None:
        """Take one frame of ``audio_s`` seconds received at ``now`` (monotonic seconds).

        Raises:
            AudioProtocolError: (`CloseCode.TOO_FAST`) the bucket ran dry.
        """
        if self._last is not None:
            self.allowance_s = min(self.burst_s, self.allowance_s + (now - self._last) * self.rate)
        self._last = now
        self.allowance_s -= max(audio_s, MIN_FRAME_CHARGE_S)
        if self.allowance_s < 0:
            raise AudioProtocolError(
                CloseCode.TOO_FAST,
                f"audio faster than {self.rate:g}x real time for over {self.burst_s:g} s of "
                f"audio (frames count as >= {MIN_FRAME_CHARGE_S * 1000:g} ms): send in real time",
            )


def _static_response(connection: ServerConnection, request: Request, path: str) -> Response:
    """The caption page's file for ``GET /`` or ``GET /<name>``; 404 for anything else,
    including WebSocket upgrades to paths other than ``/events`` and ``/audio``."""
    name = "index.html" if path == "/" else path[1:]
    file = WEB_STATIC_DIR / name
    wants_upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if wants_upgrade or not (path == "/" or _STATIC_NAME_RE.fullmatch(path)) or not file.is_file():
        return connection.respond(
            http.HTTPStatus.NOT_FOUND, "unknown path: use /events or /audio (or / for the page)\n"
        )
    body = file.read_bytes()
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(http.HTTPStatus.OK, "OK", headers, body)


def headers_with_token(token: str | None) -> Headers | None:
    """Request headers carrying a bearer token (for clients and tests); None without one."""
    return Headers({"Authorization": f"Bearer {token}"}) if token else None
