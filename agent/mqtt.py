"""MQTT output: configuration, errors and the publisher.

`MqttConfig` is the validated `[mqtt]` slice of the agent configuration. `MqttPublisher`
(below) publishes events to a broker through a bounded on-disk outbox.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
_TOPIC_LEVEL_RE = re.compile(r"^[^#+\x00]+$")


class MqttError(Exception):
    """Base of every MQTT error raised by salmonn-live."""


class MqttConfigError(MqttError, ValueError):
    """The `[mqtt]` configuration is invalid (unknown key, wrong type, bad URL)."""


class MqttConnectError(MqttError):
    """The broker refused the connection for a reason retrying cannot fix (credentials, TLS)."""


@dataclass(frozen=True)
class MqttConfig:
    """Validated MQTT settings (the `[mqtt]` table of the TOML config).

    Attributes:
        enabled: False turns MQTT off entirely (`--no-mqtt`).
        url: `mqtt://[user:pass@]host[:port]` or `mqtts://...`; None starts the embedded
            amqtt broker on `embedded_host:embedded_port`.
        prefix: first topic level of every event topic (`<prefix>/<stream>/<kind>`).
        ca_file: PEM CA bundle for `mqtts://`; None uses the system trust store.
        cert_file: PEM client certificate for mutual TLS; None sends none.
        key_file: PEM key of `cert_file`; None means the key is inside `cert_file`.
        client_id: MQTT client identifier; None uses `salmonn-live-<prefix>`.
        qos: QoS of event publications (0, 1 or 2).
        outbox_dir: directory of the on-disk outbox; None uses the user's state directory.
        outbox_max_events: outbox bound; beyond it the oldest events are dropped and counted.
        reconnect_min_s: first reconnect delay after a lost connection, seconds.
        reconnect_max_s: cap of the exponential reconnect delay, seconds.
        discovery: publish Home Assistant MQTT discovery (retained).
        discovery_prefix: Home Assistant's discovery prefix.
        embedded_host: interface of the embedded broker (used when `url` is None).
        embedded_port: port of the embedded broker; 0 picks a free one (logged).
        publish_partials: also publish `partial: true` events (off by default).
    """

    enabled: bool = True
    url: str | None = None
    prefix: str = "salmonn"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None
    qos: int = 1
    outbox_dir: str | None = None
    outbox_max_events: int = 10000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    embedded_host: str = "127.0.0.1"
    embedded_port: int = DEFAULT_PORT
    publish_partials: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.url is not None:
            parse_url(self.url)
        for name in ("prefix", "discovery_prefix"):
            value = getattr(self, name)
            if not value or not all(_TOPIC_LEVEL_RE.match(level) for level in value.split("/")):
                raise MqttConfigError(
                    f"mqtt.{name}: expected topic levels without '+', '#' or empty levels, "
                    f"got {value!r}"
                )
        if self.qos not in (0, 1, 2):
            raise MqttConfigError(f"mqtt.qos: expected 0, 1 or 2, got {self.qos!r}")
        if self.outbox_max_events < 1:
            raise MqttConfigError(
                f"mqtt.outbox_max_events: expected >= 1, got {self.outbox_max_events}"
            )
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise MqttConfigError(
                "mqtt.reconnect_min_s/reconnect_max_s: expected 0 < min <= max, got "
                f"{self.reconnect_min_s} and {self.reconnect_max_s}"
            )
        if not 0 <= self.embedded_port <= 65535:
            raise MqttConfigError(
                f"mqtt.embedded_port: expected 0..65535 (0 = any free port), "
                f"got {self.embedded_port}"
            )
        if self.key_file is not None and self.cert_file is None:
            raise MqttConfigError("mqtt.key_file is set without mqtt.cert_file: set both")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MqttConfig:
        """Build a config from the `[mqtt]` table, rejecting unknown keys.

        Args:
            d: mapping of field name to value (TOML types: int where float is expected is
                accepted).

        Returns:
            The validated config.

        Raises:
            MqttConfigError: on an unknown key, a wrong type or an invalid value.
        """
        if not isinstance(d, dict):
            raise MqttConfigError(f"[mqtt]: expected a table, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise MqttConfigError(
                    f"[mqtt]: unknown key {key!r}; known keys: {', '.join(known)}"
                )
        return cls(**d)

    @property
    def effective_client_id(self) -> str:
        """The MQTT client id: `client_id` or `salmonn-live-<prefix>` (slashes replaced)."""
        return self.client_id or "salmonn-live-" + self.prefix.replace("/", "-")

    @property
    def effective_outbox_dir(self) -> Path:
        """The outbox directory: `outbox_dir` or `$XDG_STATE_HOME/salmonn-live/outbox/<id>`."""
        if self.outbox_dir is not None:
            return Path(self.outbox_dir).expanduser()
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "salmonn-live" / "outbox" / self.effective_client_id

    def __repr__(self) -> str:
        """The dataclass repr with any URL password replaced by `***`."""
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"MqttConfig({body})"

    def redacted(self) -> dict[str, Any]:
        """The config as a dict for logging, with any URL password replaced by `***`."""
        out = dataclasses.asdict(self)
        if self.url is not None:
            out["url"] = redact_url(self.url)
        return out


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_url(url: str) -> BrokerAddress:
    """Parse `mqtt://[user[:pass]@]host[:port]` or `mqtts://...`.

    Args:
        url: the broker URL; the port defaults to 1883 (mqtt) or 8883 (mqtts).

    Returns:
        The parsed address (username/password None when absent, percent-decoded).

    Raises:
        MqttConfigError: on another scheme, a missing host, a bad port or a path.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttConfigError(
            f"mqtt.url: expected mqtt://[user:pass@]host:port or mqtts://..., got scheme "
            f"{parts.scheme!r} in {redact_url(url)!r}"
        )
    if not parts.hostname:
        raise MqttConfigError(f"mqtt.url: no host in {redact_url(url)!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise MqttConfigError(f"mqtt.url: bad port in {redact_url(url)!r}") from exc
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttConfigError(f"mqtt.url: expected no path or query, got {redact_url(url)!r}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def redact_url(url: str) -> str:
    """Return `url` with its password (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Check a field value against its (string) annotation; ints are accepted for floats."""
    ann = str(annotation)
    optional = "None" in ann
    if value is None:
        if optional:
            return
        raise MqttConfigError(f"mqtt.{name}: expected {ann}, got None")
    base = ann.replace("| None", "").strip()
    ok = {
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }.get(base, True)
    if not ok:
        raise MqttConfigError(
            f"mqtt.{name}: expected {base}{' or none' if optional else ''}, "
            f"got {type(value).__name__} {value!r}"
        )
