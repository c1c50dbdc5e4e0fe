"""Test helpers for MQTT: a real mosquitto on loopback, and a collecting subscriber.

Import the fixtures explicitly in each test module (`from tests.agent.mqtt_fixtures import
mosquitto  # noqa: F401`); this file is not a conftest, so it stays out of other suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
# Environment-independent waits are in seconds; every wait has a deadline.
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_self_signed_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` and 127.0.0.1 (and its key), made with the
    ``openssl`` command line; the certificate is its own CA.

    Returns:
        (certificate PEM, private key PEM).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name},IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the server certificate and key (PEM), and the CA clients trust."""

    cert: Path
    key: Path
    ca: Path


class Mosquitto:
    """A mosquitto broker on 127.0.0.1, started and stopped by the test.

    Args:
        workdir: directory for the config, password file, persistence and log.
        port: TCP port (0: a free one, kept across restarts).
        users: user -> password; when given, anonymous access is off (on every listener).
        tls: also listen with TLS on `tls_port` (a free port) with these files.
    """

    def __init__(
        self,
        workdir: Path,
        port: int = 0,
        users: dict[str, str] | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (make apt installs it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        lines = [
            # Run as whoever runs the tests (as root, mosquitto would switch to the
            # `mosquitto` user, who cannot read the test's private temp directory).
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            # Never drop QoS 1 messages queued for a slow test subscriber (default: 1000).
            "max_queued_messages 0",
            f"persistence_location {workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"certfile {tls.cert}",
                f"keyfile {tls.key}",
                f"cafile {tls.ca}",
            ]
        if users:
            pw = workdir / "passwd"
            for i, (user, password) in enumerate(users.items()):
                flags = ["-c"] if i == 0 else []
                subprocess.run(
                    [MOSQUITTO_PASSWD, *flags, "-b", str(pw), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def tls_url(self, userinfo: str = "") -> str:
        """``mqtts://[USER:PASS@]127.0.0.1:TLS_PORT`` (needs ``tls`` at construction)."""
        assert self.tls_port is not None, "this broker has no TLS listener"
        return f"mqtts://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        """Start and wait (bounded) until the port accepts connections."""
        assert self.proc is None, "already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log_path.read_text()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port} in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running anonymous mosquitto on a free loopback port, killed at teardown."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_auth(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto that only accepts user `robot` with password `s3cret`."""
    broker = Mosquitto(tmp_path / "mosquitto-auth", users={"robot": "s3cret"})
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Collector:
    """An independent subscriber that survives broker restarts (persistent session, QoS 1).

    Collected messages are in `messages`; `wait_for(pred)` waits, with a deadline, until
    `pred(messages)` holds.
    """

    def __init__(
        self, url_port: int, topics: list[str], client_id: str, **client_options: Any
    ) -> None:
        self.port = url_port
        self.topics = topics
        self.client_id = client_id
        self.client_options = client_options  # e.g. username, password, tls_context
        self.messages: list[Received] = []
        self.connected = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    clean_session=False,
                    **self.client_options,
                ) as client:
                    for t in self.topics:
                        await client.subscribe(t, qos=1)
                    self.connected.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        async with self._changed:
                            self.messages.append(Received(m.topic.value, payload, m.retain))
                            self._changed.notify_all()
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)  # reconnect backoff while the broker is down

    async def wait_for(
        self, pred: Callable[[list[Received]], object], within_s: float = 15.0
    ) -> list[Received]:
        """Wait until `pred(messages)` is true; returns the messages. Raises TimeoutError."""

        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(pred(self.messages)))

        await asyncio.wait_for(_wait(), within_s)
        return self.messages

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), START_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def collector(
    port: int, *topics: str, client_id: str = "test-collector", **client_options: Any
) -> AsyncIterator[Collector]:
    """`async with collector(port, "salmonn/#") as c:` — a started `Collector`
    (``client_options`` go to `aiomqtt.Client`: ``username``, ``password``, ``tls_context``)."""
    async with Collector(port, list(topics), client_id, **client_options) as c:
        yield c


def trusting(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts only ``ca``."""
    return ssl.create_default_context(cafile=str(ca))
