"""`agent.config.MqttConfig`: validation of the `[mqtt]` table and broker URLs (also importable
from `agent.protocols.mqtt`)."""

from __future__ import annotations

import pytest

from agent.config import MqttConfig, MqttConfigError, parse_url, redact_url


def test_defaults() -> None:
    cfg = MqttConfig.from_dict({})
    assert cfg == MqttConfig()
    assert cfg.enabled and cfg.url is None and cfg.qos == 1 and cfg.prefix == "salmonn"
    assert cfg.effective_client_id == "salmonn-live-salmonn"
    assert cfg.effective_outbox_dir.parts[-3:] == ("salmonn-live", "outbox", "salmonn-live-salmonn")


def test_unknown_key_names_it_and_lists_known() -> None:
    with pytest.raises(
        MqttConfigError, match=r"unknown key\(s\) \['urll'\].*known keys: enabled, url"
    ):
        MqttConfig.from_dict({"urll": "mqtt://x"})
    with pytest.raises(ValueError):  # the contract: a ValueError subclass
        MqttConfig.from_dict({"nope": 1})


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"qos": 3}, "qos: expected 0, 1 or 2"),
        ({"qos": "1"}, "qos: expected an integer"),
        ({"enabled": "yes"}, "enabled: expected true or false"),
        ({"url": "http://host"}, "expected mqtt://"),
        ({"url": "mqtt://"}, "no host"),
        ({"url": "mqtt://h:99999"}, "bad port"),
        ({"url": "mqtt://h:1883/path"}, "no path"),
        ({"prefix": "a/+/b"}, "prefix: expected topic levels"),
        ({"prefix": ""}, "prefix"),
        ({"outbox_max_events": 0}, "outbox_max_events"),
        ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "min <= max"),
        ({"embedded_port": -1}, "embedded_port"),
        ({"key_file": "k.pem"}, "without mqtt.cert_file"),
    ],
)
def test_invalid_values(d: dict[str, object], message: str) -> None:
    with pytest.raises(MqttConfigError, match=message):
        MqttConfig.from_dict(d)


def test_int_accepted_for_float() -> None:
    assert MqttConfig.from_dict({"reconnect_min_s": 1, "reconnect_max_s": 2}).reconnect_min_s == 1


def test_parse_url() -> None:
    a = parse_url("mqtt://user:p%40ss@example.org:1884")
    assert (a.host, a.port, a.tls, a.username, a.password) == (
        "example.org",
        1884,
        False,
        "user",
        "p@ss",
    )
    b = parse_url("mqtts://broker")
    assert (b.port, b.tls, b.username, b.password) == (8883, True, None, None)
    assert parse_url("mqtt://h").port == 1883


def test_password_redacted() -> None:
    assert redact_url("mqtt://u:secret@h:1") == "mqtt://u:***@h:1"
    cfg = MqttConfig(url="mqtt://u:secret@h:1")
    assert "secret" not in repr(cfg.redacted()) and "secret" not in repr(cfg)
    with pytest.raises(MqttConfigError) as err:
        MqttConfig(url="http://u:secret@h")
    assert "secret" not in str(err.value)


def test_connect_and_config_errors_share_the_mqtt_error_base() -> None:
    from agent.protocols import mqtt

    assert issubclass(MqttConfigError, mqtt.MqttError) and issubclass(
        mqtt.MqttConnectError, mqtt.MqttError
    )
