"""Security: tokens (constant-time, never logged), WebSocket TLS, MQTT over TLS with a password
file, the `[ws]` limits, and no audio on disk.

Certificates are made by the test (``openssl``); the broker is a real mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

import agent.protocols.ws
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.protocols.mqtt import MqttConfig, MqttConnectError, MqttPublisher
from agent.protocols.ws import CloseCode, headers_with_token
from agent.runtime.app import Agent, run_agent
from tests.agent.conftest import TIMING, make_config, pcm_s16
from tests.agent.events_fixtures import model_event
from tests.agent.mqtt_fixtures import (
    BrokerTls,
    Mosquitto,
    collector,
    make_self_signed_cert,
    mosquitto,  # noqa: F401 - fixture
    trusting,
)
from tests.agent.protocols.test_ws import FRAME_BYTES, recv_json, url

#: A token with a space, '&', '/' and '=' in it: a pattern-only redaction would cut it short.
TOKEN = "open sesame&42/xY=="


def hello(stream: str = "s", **changes: Any) -> str:
    return json.dumps(
        {"stream": stream, "sample_rate": 16000, "format": "s16le", "channels": 1, **changes}
    )


# -- tokens ----------------------------------------------------------------------------------


async def test_tokens_are_never_logged_nor_sent_to_clients(
    tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Successes and failures of every kind, with the protocol logged at DEBUG: neither the
    token nor the wrong ones tried appear in any record of the agent, or in any event."""
    caplog.set_level(logging.DEBUG)
    wrong = ["wrong-guess-1", TOKEN[:-1], TOKEN + "x"]
    config = make_config(ws={"auth": True, "token": TOKEN})
    async with run_agent(config, lambda: tiny_model) as agent:
        assert agent.ws is not None
        refused = [
            ("/events", None),
            *[(f"/events?token={quote(w)}", None) for w in wrong],
            *[("/audio", headers_with_token(w)) for w in wrong],
            ("/audio", {"Authorization": f"Basic {TOKEN}"}),  # right token, wrong place
            ("/audio", {"X-Token": TOKEN}),
        ]
        for path, headers in refused:
            with pytest.raises(InvalidStatus) as info:
                await connect(url(agent, path), additional_headers=headers)
            assert info.value.response.status_code == 401, path
        assert agent.ws.counters["rejected_auth"] == len(refused)
        # Requests websockets cannot parse: the request line and headers get quoted in the
        # error it logs.
        for raw in [
            f"GET /events?token={quote(TOKEN)} HTTP/1.0\r\n\r\n",
            f"GET /events?token={quote(TOKEN)} HTTP/1.1 junk\r\n\r\n",
            f"GET /audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: !\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n",
        ]:
            assert agent.ws.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.ws.port)
            writer.write(raw.encode())
            async with asyncio.timeout(10 * TIMING):
                await reader.read()
            writer.close()
            await writer.wait_closed()
        async with connect(url(agent, f"/events?token={quote(TOKEN)}")) as events:
            await recv_json(events)
            async with connect(
                url(agent, "/audio"), additional_headers=headers_with_token(TOKEN)
            ) as audio:
                await audio.send(hello("s"))
                assert (await recv_json(audio))["status"] == "ready"
                await audio.send(b"\x00\x00" * 1600)
            seen = [await recv_json(events)]
            while seen[-1].get("status") != "stream_closed":
                seen.append(await recv_json(events))
        assert TOKEN not in json.dumps(seen)
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    protocol_logger = "agent.protocols.ws.protocol"
    assert any(r.name == protocol_logger for r in records), "the protocol was not logged"
    text = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in records
    )
    for secret in [TOKEN, quote(TOKEN), quote(TOKEN, safe=""), *wrong]:
        assert secret not in text, secret
    assert "token=***" in text and "Authorization: ***" in text
    assert "opening handshake failed" in text
    assert not [r for r in records if r.levelno >= logging.ERROR], "network noise logged as ERROR"
    assert TOKEN not in json.dumps(config.redacted())


async def test_tokens_are_compared_as_equal_length_digests(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every comparison goes through `hmac.compare_digest` with inputs of one fixed length,
    whatever the length of the token tried, so the time taken tells nothing about it."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(agent.protocols.ws.hmac, "compare_digest", spy)
    config = make_config(ws={"auth": True, "token": TOKEN})
    async with run_agent(config, lambda: tiny_model) as agent_:
        for guess in ["x", TOKEN[:5], TOKEN + "y" * 1000]:
            with pytest.raises(InvalidStatus):
                await connect(url(agent_, f"/events?token={quote(guess)}"))
        async with connect(url(agent_, "/events"), additional_headers=headers_with_token(TOKEN)):
            pass
    assert len(calls) == 4
    assert {a for a, _ in calls} == {b for _, b in calls} == {32}


# -- WebSocket TLS ---------------------------------------------------------------------------


async def test_websocket_tls_with_a_self_signed_certificate(
    tiny_model: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """wss:// works for a client that trusts the certificate (both paths); a plain ws://
    client and a client that does not trust it get nowhere (and log no error)."""
    caplog.set_level(logging.WARNING)
    cert, key = make_self_signed_cert(tmp_path / "tls")
    config = make_config(
        ws={"auth": True, "token": TOKEN, "tls_cert": str(cert), "tls_key": str(key)}
    )
    auth = headers_with_token(TOKEN)
    async with run_agent(config, lambda: tiny_model) as agent_:
        assert agent_.ws is not None and agent_.ws.url.startswith("wss://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        async with connect(url(agent_, "/events"), ssl=trusted, additional_headers=auth) as ev:
            assert (await recv_json(ev))["status"] == "subscribed"
            async with connect(url(agent_, "/audio"), ssl=trusted, additional_headers=auth) as au:
                await au.send(hello("tls"))
                assert (await recv_json(au))["status"] == "ready"
                await au.send(b"\x00\x00" * 1600)
            while (await recv_json(ev)).get("status") != "stream_closed":
                pass
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(url(agent_, "/events"), ssl=ssl.create_default_context())
        plain = url(agent_, "/events").replace("wss://", "ws://")
        with pytest.raises((InvalidHandshake, OSError, EOFError)):
            async with asyncio.timeout(10 * TIMING):
                await connect(plain, additional_headers=auth, open_timeout=5 * TIMING)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- MQTT over TLS with a password file -------------------------------------------------------


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Any:
    """mosquitto with a TLS listener (self-signed certificate) and a password file (user
    `robot`, password `s3cret`); its plain listener needs the password too."""
    cert, key = make_self_signed_cert(tmp_path / "broker-tls")
    broker = Mosquitto(
        tmp_path / "mosquitto-tls",
        users={"robot": "s3cret"},
        tls=BrokerTls(cert=cert, key=key, ca=cert),
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _mqtt_config(url: str, tmp_path: Path, ca: Path | None, **kw: Any) -> MqttConfig:
    return MqttConfig(
        url=url,
        ca_file=str(ca) if ca else None,
        outbox_dir=str(tmp_path / "outbox"),
        client_id="tls-agent",
        discovery=False,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        **kw,
    )


async def test_mqtt_over_tls_with_credentials_delivers(
    mosquitto_tls: Mosquitto, tmp_path: Path
) -> None:
    """mqtts:// with the broker's CA and the right password: events arrive."""
    cert = tmp_path / "broker-tls" / "localhost.crt"
    async with (
        collector(
            mosquitto_tls.tls_port or 0,
            "salmonn/#",
            client_id="tls-collector",
            username="robot",
            password="s3cret",
            tls_context=trusting(cert),
        ) as c,
        MqttPublisher(
            _mqtt_config(mosquitto_tls.tls_url("robot:s3cret"), tmp_path, cert)
        ) as publisher,
    ):
        assert publisher.connected
        event = model_event(1, "caption", text="a dog")
        publisher.submit(event)
        got = await c.wait_for(lambda ms: any(m.topic == "salmonn/mic/caption" for m in ms))
    assert [json.loads(m.payload) for m in got if m.topic == "salmonn/mic/caption"] == [event.data]
    assert "s3cret" not in repr(publisher.url) and "s3cret" not in repr(
        _mqtt_config(mosquitto_tls.tls_url("robot:s3cret"), tmp_path, cert)
    )


@pytest.mark.parametrize(
    ("userinfo", "trust", "message"),
    [
        ("robot:wrong", True, r"login refused"),
        ("", True, r"login refused"),
        ("robot:s3cret", False, r"TLS certificate verification failed.*ca_file"),
    ],
    ids=["wrong password", "no credentials", "untrusted certificate"],
)
async def test_mqtt_tls_refusals_are_clear_errors(
    mosquitto_tls: Mosquitto, tmp_path: Path, userinfo: str, trust: bool, message: str
) -> None:
    cert = tmp_path / "broker-tls" / "localhost.crt"
    config = _mqtt_config(mosquitto_tls.tls_url(userinfo), tmp_path, cert if trust else None)
    with pytest.raises(MqttConnectError, match=message) as info:
        async with MqttPublisher(config):
            pass
    assert "s3cret" not in str(info.value)


# -- limits ----------------------------------------------------------------------------------


async def test_max_connections_counts_handshakes_and_frees_slots(tiny_model: Any) -> None:
    config = make_config(ws={"max_connections": 3, "hello_timeout_s": 30.0})
    async with run_agent(config, lambda: tiny_model) as agent_:
        assert agent_.ws is not None and agent_.ws.port is not None
        # One connection that never finishes its handshake holds a slot too.
        _reader, half_open = await asyncio.open_connection("127.0.0.1", agent_.ws.port)
        half_open.write(b"GET /events HTTP/1.1\r\n")
        first = await connect(url(agent_, "/events"))
        second = await connect(url(agent_, "/events"))
        with pytest.raises(InvalidStatus) as info:
            await connect(url(agent_, "/audio"))
        assert info.value.response.status_code == 503
        assert agent_.ws.counters["rejected_connections"] == 1
        half_open.close()
        await half_open.wait_closed()
        await first.close()

        async def retry() -> ClientConnection:
            while True:  # what a client does after 503: try again
                with contextlib.suppress(InvalidStatus):
                    return await connect(url(agent_, "/events"))
                await asyncio.sleep(0.05)

        async with asyncio.timeout(10 * TIMING):
            third = await retry()
        await asyncio.gather(second.close(), third.close())


async def test_streams_per_client(tiny_model: Any) -> None:
    """The third /audio stream from one address is closed with 1013 (try again later);
    /events connections do not count; once a stream ends, another may start."""
    config = make_config(ws={"max_streams_per_client": 2})
    async with run_agent(config, lambda: tiny_model) as agent_:
        events = await connect(url(agent_, "/events"))
        streams: list[ClientConnection] = []
        for i in range(2):
            streams.append(await connect(url(agent_, "/audio")))
            await streams[-1].send(hello(f"s{i}"))
            assert (await recv_json(streams[-1]))["status"] == "ready"
        async with connect(url(agent_, "/audio")) as third:
            async with asyncio.timeout(10 * TIMING):
                await third.wait_closed()
            assert third.close_code == CloseCode.TRY_AGAIN_LATER
            assert "2 /audio streams already open" in (third.close_reason or "")
        await streams.pop().close()

        async def retry() -> None:
            while True:  # what a client does after 1013: try again
                async with connect(url(agent_, "/audio")) as again:
                    with contextlib.suppress(ConnectionClosed):
                        await again.send(hello("s9"))
                        if (await recv_json(again))["status"] == "ready":
                            return
                await asyncio.sleep(0.05)

        async with asyncio.timeout(10 * TIMING):
            await retry()
        await asyncio.gather(events.close(), *(s.close() for s in streams))


async def test_frame_size_limit_is_exact(tiny_model: Any) -> None:
    config = make_config(ws={"max_message_bytes": 4096})
    async with run_agent(config, lambda: tiny_model) as agent_:
        async with connect(url(agent_, "/audio")) as ok:
            await ok.send(hello("a"))
            await recv_json(ok)
            await ok.send(b"\x00" * 4096)
            await ok.close()
        assert ok.close_code == CloseCode.NORMAL
        async with connect(url(agent_, "/audio")) as big:
            await big.send(hello("b"))
            await recv_json(big)
            with contextlib.suppress(ConnectionClosed):
                await big.send(b"\x00" * 4098)
            async with asyncio.timeout(10 * TIMING):
                await big.wait_closed()
        assert big.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_hello_timeout(tiny_model: Any) -> None:
    config = make_config(ws={"hello_timeout_s": 0.5})
    async with run_agent(config, lambda: tiny_model) as agent_:
        started = time.monotonic()
        async with connect(url(agent_, "/audio")) as silent:
            async with asyncio.timeout(10 * TIMING):
                await silent.wait_closed()
        assert silent.close_code == CloseCode.HELLO_TIMEOUT
        assert time.monotonic() - started >= 0.5


async def test_audio_faster_than_the_limit_is_closed(tiny_model: Any, clip_path: Path) -> None:
    """At most max_audio_rate x real time after a burst of audio_burst_s: 10 s of audio at
    once against 1x and a 1 s burst is closed with 1008 (the server would need 9 s to read
    it to stay within the limit)."""
    config = make_config(ws={"max_audio_rate": 1.0, "audio_burst_s": 1.0})
    pcm = pcm_s16(clip_path)[: 10 * 32000]
    async with run_agent(config, lambda: tiny_model) as agent_:
        async with connect(url(agent_, "/audio")) as fast:
            await fast.send(hello("fast"))
            await recv_json(fast)
            with contextlib.suppress(ConnectionClosed):
                for i in range(0, len(pcm), FRAME_BYTES):
                    await fast.send(pcm[i : i + FRAME_BYTES])
            async with asyncio.timeout(10 * TIMING):
                await fast.wait_closed()
        assert fast.close_code == CloseCode.TOO_FAST
        assert "faster than 1x real time" in (fast.close_reason or "")


async def test_a_real_time_client_longer_than_the_burst_is_never_closed(tiny_model: Any) -> None:
    """2 s of audio paced at real time against a 1 s burst and a 1.5x limit: whatever the
    scheduling jitter, the bucket refills faster than a paced client can drain it."""
    config = make_config(ws={"max_audio_rate": 1.5, "audio_burst_s": 1.0})
    frame_s = FRAME_BYTES / 32000
    async with run_agent(config, lambda: tiny_model) as agent_:
        async with connect(url(agent_, "/audio")) as paced:
            await paced.send(hello("paced"))
            await recv_json(paced)
            start = time.monotonic()
            for i in range(int(2.0 / frame_s)):
                await asyncio.sleep(max(0.0, start + i * frame_s - time.monotonic()))
                await paced.send(b"\x00\x01" * (FRAME_BYTES // 2))
            await paced.close()
        assert paced.close_code == CloseCode.NORMAL


class _LogFlag(logging.Handler):
    """Sets `seen` when a record containing ``needle`` is logged (on the loop's thread)."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


async def test_a_stalled_events_client_is_caught_by_the_agent(tiny_model: Any) -> None:
    """A client that stops reading (small receive buffer, one message queued) while 600
    events of 4 kB (2.4 MB) go out: with the kernel send buffer capped (`send_buffer_bytes`)
    a send soon blocks and the client is closed with 4429 within `send_timeout_s`; reading
    again, it gets that close code and its reason. (With the system's buffer, megabytes, the
    backlog would hide in the kernel and nothing notice.)"""
    config = make_config(
        ws={
            "client_queue": 16,
            "client_max_dropped": 32,
            "send_timeout_s": 2.0,
            "send_buffer_bytes": 16384,
        }
    )
    gave_up = _LogFlag("too slow")
    logging.getLogger("agent.protocols.ws").addHandler(gave_up)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(logging.getLogger("agent.protocols.ws").removeHandler, gave_up)
        agent_ = await stack.enter_async_context(run_agent(config, lambda: tiny_model))
        assert agent_.ws is not None and agent_.pipeline is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", agent_.ws.port))
        stalled = await connect(url(agent_, "/events?kind=status"), sock=sock, max_queue=1)
        padding = "x" * 4096
        for i in range(600):
            agent_.pipeline.emit_status("load", str(i), detail={"pad": padding})
            await asyncio.sleep(0)  # let the pump run, as with a real event source
            if gave_up.seen.is_set():
                break  # closed: read again now (see below)
        async with asyncio.timeout(20 * TIMING):
            await gave_up.seen.wait()  # the agent's "closing ... too slow" warning
        assert agent_.ws.counters["events_too_slow"] == 1
        received = 0
        # Read again at once, as a client on a slow link would: what was buffered, then the
        # close frame. (One that reads nothing for send_timeout_s after its close is cut
        # without it.)
        async with asyncio.timeout(20 * TIMING):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await stalled.recv()
                    received += 1
        reason = "too slow: a message took over 2 s to send"
        assert (stalled.close_code, stalled.close_reason) == (CloseCode.TOO_SLOW, reason)
        assert received < 300


@pytest.mark.parametrize(
    ("ws", "message"),
    [
        ({"max_streams_per_client": 0}, r"ws.max_streams_per_client: expected >= 1"),
        ({"max_audio_rate": 0.5}, r"ws.max_audio_rate: expected >= 1.0"),
        ({"audio_burst_s": 0}, r"ws.audio_burst_s: expected > 0"),
        ({"max_connections": 0}, r"ws.max_connections: expected >= 1"),
        ({"hello_timeout_s": -1}, r"ws.hello_timeout_s: expected > 0"),
    ],
)
def test_limits_are_validated(ws: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict({"ws": ws})


@pytest.mark.parametrize(
    ("questions", "message"),
    [
        ([{"text": f"Q{i}?"} for i in range(17)], r"questions: expected at most 16 questions"),
        ([{"text": "x" * 1001}], r"questions\[0\].text: expected at most 1000 characters"),
    ],
)
def test_standing_questions_are_bounded(questions: list[Any], message: str) -> None:
    """Each question is one more LLM request per window: at most 16, of 1000 characters."""
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict({"questions": questions})
    with pytest.raises(
        ConfigError, match=message.replace("questions", "streams\\[0\\].questions", 1)
    ):
        AgentConfig.from_dict({"streams": [{"id": "a", "questions": questions}]})
    at_the_limit = [{"text": "x" * 1000} for _ in range(16)]
    assert len(AgentConfig.from_dict({"questions": at_the_limit}).questions) == 16


def test_limits_have_safe_defaults() -> None:
    ws = AgentConfig.from_dict({}).ws
    assert ws.host_port[0] == "127.0.0.1" and ws.auth
    assert ws.max_connections == 64 and ws.max_streams_per_client == 16
    assert ws.max_message_bytes == 1 << 18 and ws.hello_timeout_s == 10.0
    assert ws.max_audio_rate == 4.0 and ws.audio_burst_s == 30.0


# -- no audio on disk ------------------------------------------------------------------------

_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\x93NUMPY", b"FORM", b".snd")


async def test_no_audio_is_written_to_disk(
    tiny_model: Any,
    clip_path: Path,
    mosquitto: Mosquitto,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole WebSocket stream heard with MQTT on (default outbox under $XDG_STATE_HOME): no
    audio writer is called, and no file under the working, cache, state (outbox) or home
    directories holds audio (by name, by header, or as a run of the PCM that was sent)."""
    home = tmp_path / "home"
    for name, sub in [("HOME", "."), ("XDG_CACHE_HOME", "cache"), ("XDG_STATE_HOME", "state")]:
        (home / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(home / sub))
    (home / "work").mkdir()
    monkeypatch.chdir(home / "work")
    written: list[str] = []

    def forbid(what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def writer(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | os.PathLike):
                written.append(f"{what}({file})")
            return real(file, *args, **kwargs)

        return writer

    monkeypatch.setattr(soundfile, "write", forbid("soundfile.write", soundfile.write))
    monkeypatch.setattr(np, "save", forbid("np.save", np.save))
    config = make_config(
        mqtt={"enabled": True, "url": mosquitto.url, "discovery": False},
        worker={"max_batch": 1},
    )
    agent_ = Agent(config, lambda: tiny_model)
    pcm = pcm_s16(clip_path)
    async with agent_, connect(url(agent_, "/events?partial=0")) as events:
        await recv_json(events)
        async with connect(url(agent_, "/audio")) as audio:
            await audio.send(hello("private"))
            await recv_json(audio)
            for i in range(0, len(pcm), FRAME_BYTES):
                await audio.send(pcm[i : i + FRAME_BYTES])
        got = [await recv_json(events)]
        while got[-1].get("status") != "stream_closed":
            got.append(await recv_json(events))
    assert any(e["kind"] in ("transcript", "caption") for e in got), "nothing was heard"
    assert not written, written
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any("outbox" in p.parts for p in files), "the MQTT outbox was not where expected"
    samples = np.frombuffer(pcm, "<i2")
    loud = int(np.argmax(np.abs(samples)))
    probes = [pcm[loud * 2 : loud * 2 + 64]]
    probes.append((samples[loud : loud + 16].astype("<f4") / 32768).tobytes())
    for path in files:
        data = path.read_bytes()
        assert path.suffix.lower() not in (".wav", ".flac", ".ogg", ".pcm", ".raw", ".npy"), path
        assert not data.startswith(_AUDIO_MAGIC), path
        assert not any(p in data for p in probes), path
