"""The embedded MQTT broker: amqtt running in-process, so the agent needs nothing installed.

Used when MQTT is on and no `--mqtt URL` is given. It is a convenience for demos and
single-machine setups (anonymous, no TLS, nothing persisted across restarts); a real home
should run mosquitto and point `--mqtt` at it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from types import TracebackType
from typing import Any

from agent.config import MqttError

logger = logging.getLogger(__name__)

_LISTENER = "default"


class EmbeddedBrokerError(MqttError):
    """The embedded broker could not start (port in use, bad address)."""


class EmbeddedBrokerPortInUse(EmbeddedBrokerError):
    """The embedded broker's port is taken by another program."""


class EmbeddedBroker:
    """An in-process amqtt broker bound to one TCP listener.

    Args:
        host: interface to listen on (loopback by default: other machines cannot reach it).
        port: TCP port; 0 picks a free one (see `url` / `port` once started).

    Use as an async context manager; `close()` is idempotent and `wait_closed()` waits for
    the listener and sessions to be gone.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._broker: Any = None
        self._closing = False
        self._closed_task: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        """The listening interface."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when started with port 0).

        Raises:
            RuntimeError: before `start()`.
        """
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not started")
        return self._port

    @property
    def url(self) -> str:
        """`mqtt://host:port` of the running broker."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> None:
        """Start listening.

        Raises:
            EmbeddedBrokerError: when amqtt cannot bind (port in use: pick another with
                `mqtt.embedded_port`, or 0 for any free port).
        """
        from amqtt.broker import Broker
        from amqtt.errors import BrokerError

        bind_host = f"[{self._host}]" if ":" in self._host else self._host
        config = {
            "listeners": {
                _LISTENER: {"type": "tcp", "bind": f"{bind_host}:{self._requested_port}"},
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except (BrokerError, OSError) as exc:
            error = EmbeddedBrokerPortInUse if _address_in_use(exc) else EmbeddedBrokerError
            raise error(
                f"embedded MQTT broker could not listen on {self._host}:{self._requested_port}: "
                f"{exc}; set mqtt.embedded_port (0 = any free port) or give --mqtt URL"
            ) from exc
        self._broker = broker
        self._port = self._bound_port(broker)
        logger.info("embedded MQTT broker (amqtt) listening on %s", self.url)

    def _bound_port(self, broker: Any) -> int:
        if self._requested_port != 0:
            return self._requested_port
        # amqtt keeps its asyncio.Server per listener; read the port the OS chose.
        try:
            server = broker._servers[_LISTENER].instance
            return int(server.sockets[0].getsockname()[1])
        except (AttributeError, KeyError, IndexError) as exc:  # pragma: no cover - amqtt change
            raise EmbeddedBrokerError(
                "embedded MQTT broker: cannot find the port chosen for port 0 in this amqtt "
                "version; set mqtt.embedded_port to a fixed port"
            ) from exc

    def close(self) -> None:
        """Start shutting down (idempotent); `wait_closed()` waits for the end."""
        if self._closing:
            return
        self._closing = True
        if self._broker is not None:
            self._closed_task = asyncio.get_running_loop().create_task(self._shutdown())

    async def _shutdown(self) -> None:
        try:
            await self._broker.shutdown()
        except Exception:  # amqtt raises plain exceptions from its state machine
            logger.warning("embedded MQTT broker: error while shutting down", exc_info=True)
        logger.info("embedded MQTT broker on %s stopped", self.url)

    async def wait_closed(self) -> None:
        """Wait until the broker has shut down (returns at once if it never started)."""
        if self._closed_task is not None:
            await asyncio.shield(self._closed_task)

    async def __aenter__(self) -> EmbeddedBroker:
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


def _address_in_use(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.EADDRINUSE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False
