"""What edges and workers say to each other over MQTT 5 (see docs/deployment.md).

Topics (``P`` is ``mqtt.prefix``):

* ``P/windows/<device>``: an edge publishes each finished window here (QoS 1). Workers read
  them through the shared subscription ``$share/<group>/P/windows/+``, so each message goes
  to one member of the group.
* ``P/results/<device>``: workers answer the edge that sent the window (QoS 1): ``accepted``
  when a window reaches a worker, one ``event`` per model event, ``failed`` when the model
  raised. The edge deduplicates them and publishes the events on ``P/<stream>/<kind>``.
* ``P/workers/<worker>``: a worker's presence, ``online`` on connect, ``offline`` on a clean
  stop and, as its MQTT will, when the broker loses it. Edges republish at once the windows
  a lost worker had accepted.

A window message is one JSON header line, ``\\n``, then the audio as a FLAC file (16-bit,
16 kHz, mono). FLAC is lossless over 16-bit samples: the float32 samples are rounded to
16-bit on the edge (what microphones and ``s16le`` clients deliver anyway; a step of
1/32768, -96 dBFS) and the worker decodes exactly those samples. Speech compresses to about
half of raw 16-bit PCM, at about 1 ms per 3 s window each way.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiomqtt
import numpy as np
import soundfile

from agent.config import BrokerAddress, MqttConfig, MqttConfigError, parse_url
from agent.errors import AgentError
from agent.runtime.worker import Request, Window
from streaming.pcm import SAMPLE_RATE_HZ

#: Version of the window and result messages (``v``); bumped on incompatible changes.
WIRE_VERSION = 1
#: Stream ids an edge refuses: ``P/<stream>/<kind>`` would fall into the cluster's own topics.
RESERVED_STREAMS = ("windows", "results", "workers")
_PCM16_SCALE = 32768.0
_SEPARATOR = b"\n"


class WireError(AgentError):
    """A window or result message that cannot be decoded (logged and skipped)."""


def windows_topic(prefix: str, device: str) -> str:
    """Where ``device`` publishes its windows."""
    return f"{prefix}/windows/{device}"


def results_topic(prefix: str, device: str) -> str:
    """Where workers answer ``device``."""
    return f"{prefix}/results/{device}"


def presence_topic(prefix: str, worker: str) -> str:
    """A worker's ``online`` / ``offline`` messages."""
    return f"{prefix}/workers/{worker}"


def shared_subscription(prefix: str, group: str) -> str:
    """The MQTT 5 shared subscription of a worker group to every device's windows."""
    return f"$share/{group}/{prefix}/windows/+"


def default_name() -> str:
    """``<hostname>-<pid>``: a name unique on the network for one process."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


# -- windows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowMessage:
    """A decoded window message.

    Attributes:
        run: The sending edge's run id (random per start): results echo it, so an answer meant
            for an earlier run of the same device (same window ids) is never taken for a new one.
        device: The sending edge.
        attempt: 1 for the first publication, then 2, 3, ... for republications.
        window: The window, its stamps on the receiver's monotonic clock.
    """

    run: str
    device: str
    attempt: int
    window: Window


def _flac(audio: np.ndarray[Any, Any]) -> bytes:
    pcm = np.clip(np.round(audio * _PCM16_SCALE), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE_HZ, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_window(
    window: Window, *, run: str, device: str, attempt: int, wall_offset_s: float
) -> bytes:
    """The message for ``window`` (see the module docstring).

    Args:
        window: 16 kHz mono float32 audio with its requests; stamps on this process's
            ``time.monotonic()`` clock.
        run: This edge's run id.
        device: This edge's name.
        attempt: Publication number (1, 2, ...).
        wall_offset_s: ``time.time() - time.monotonic()`` of this process (one per run), so
            the stamps travel as Unix times.
    """
    header = {
        "v": WIRE_VERSION,
        "run": run,
        "device": device,
        "attempt": attempt,
        "window": window.id,
        "stream": window.stream,
        "kind": window.kind,
        "start": window.start_s,
        "end": window.end_s,
        "captured": round(window.captured + wall_offset_s, 4),
        "segment_end": round(window.segment_end + wall_offset_s, 4),
        "sample_rate": SAMPLE_RATE_HZ,
        "samples": int(window.audio.size),
        "codec": "flac",
        "requests": [
            {
                "key": r.key,
                "task": r.task,
                "instruction": r.instruction,
                "lora_scale": r.lora_scale,
                "engine": r.engine,
                "question": r.question,
                "language": r.language,
                "whisper_task": r.whisper_task,
                "with_transcript": r.with_transcript,
            }
            for r in window.requests
        ],
    }
    return json.dumps(header, separators=(",", ":")).encode() + _SEPARATOR + _flac(window.audio)


def decode_window(payload: bytes, wall_offset_s: float) -> WindowMessage:
    """Parse a window message; stamps are converted to this process's monotonic clock.

    Raises:
        WireError: not a window message of this version, or undecodable audio.
    """
    head, sep, body = payload.partition(_SEPARATOR)
    if not sep:
        raise WireError("window message: expected a JSON header line then FLAC audio")
    try:
        header = json.loads(head)
        if header.get("v") != WIRE_VERSION or header.get("codec") != "flac":
            raise WireError(
                f"window message: expected v={WIRE_VERSION} codec=flac, "
                f"got v={header.get('v')!r} codec={header.get('codec')!r}"
            )
        pcm, rate = soundfile.read(io.BytesIO(body), dtype="int16")
        if rate != SAMPLE_RATE_HZ or pcm.ndim != 1 or pcm.size != header["samples"]:
            raise WireError(
                f"window message: expected {header['samples']} mono samples at "
                f"{SAMPLE_RATE_HZ} Hz, got shape {pcm.shape} at {rate} Hz"
            )
        requests = tuple(
            Request(
                key=str(r["key"]),
                task=str(r["task"]),
                instruction=str(r["instruction"]),
                lora_scale=None if r["lora_scale"] is None else float(r["lora_scale"]),
                engine="whisper" if r["engine"] == "whisper" else "llm",
                question=r["question"],
                # Absent from an older edge's message: English, as it was then.
                language=str(r.get("language", "en")),
                whisper_task="translate" if r.get("whisper_task") == "translate" else "transcribe",
                with_transcript=r.get("with_transcript") is True,
            )
            for r in header["requests"]
        )
        window = Window(
            id=str(header["window"]),
            stream=str(header["stream"]),
            kind=str(header["kind"]),
            audio=pcm.astype(np.float32) / _PCM16_SCALE,
            start_s=float(header["start"]),
            end_s=float(header["end"]),
            captured=float(header["captured"]) - wall_offset_s,
            segment_end=float(header["segment_end"]) - wall_offset_s,
            requests=requests,
        )
        return WindowMessage(
            run=str(header["run"]),
            device=str(header["device"]),
            attempt=int(header["attempt"]),
            window=window,
        )
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise WireError(f"window message: {type(exc).__name__}: {exc}") from exc


# -- results ------------------------------------------------------------------------------------


def encode_result(kind: str, *, run: str, window: str, worker: str, **fields: Any) -> bytes:
    """A result message: ``{"v", "type", "run", "window", "worker", ...fields}`` as JSON.

    ``kind`` is ``accepted``, ``event`` (with ``event``: the event dict) or ``failed`` (with
    ``error`` and ``requests``: the unanswered request keys).
    """
    body = {"v": WIRE_VERSION, "type": kind, "run": run, "window": window, "worker": worker}
    body.update(fields)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode_result(payload: bytes) -> dict[str, Any]:
    """Parse a result message.

    Raises:
        WireError: not JSON, another version or a missing field.
    """
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise WireError(f"result message: invalid JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
        raise WireError(f"result message: expected a v={WIRE_VERSION} object, got {body!r:.200}")
    missing = [k for k in ("type", "run", "window", "worker") if not isinstance(body.get(k), str)]
    if missing:
        raise WireError(f"result message: missing or non-string {missing}")
    return body


# -- connections --------------------------------------------------------------------------------


def broker_address(config: MqttConfig) -> BrokerAddress:
    """The broker of a cluster role: ``mqtt.url`` is required (no embedded broker).

    Raises:
        MqttConfigError: MQTT is off or no URL is set.
    """
    if not config.enabled or config.url is None:
        raise MqttConfigError(
            "edge and worker need a broker: set mqtt.url (--mqtt URL or SALMONN_LIVE_MQTT_URL) "
            "to a mosquitto or EMQX both can reach"
        )
    return parse_url(config.url)


def tls_context(config: MqttConfig, address: BrokerAddress) -> ssl.SSLContext | None:
    """TLS for ``mqtts://`` (``ca_file``; ``cert_file``/``key_file`` for mutual TLS).

    Raises:
        MqttConfigError: unreadable or invalid PEM files.
    """
    if not address.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
        if config.cert_file is not None:
            context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise MqttConfigError(
            f"mqtt TLS files: cannot load ca_file={config.ca_file!r} "
            f"cert_file={config.cert_file!r} key_file={config.key_file!r}: {exc}"
        ) from exc
    return context


def make_client(
    address: BrokerAddress,
    context: ssl.SSLContext | None,
    identifier: str,
    *,
    will: aiomqtt.Will | None = None,
    keepalive_s: int = 10,
) -> aiomqtt.Client:
    """An MQTT 5 client with a clean start (no session kept across connections).

    ``keepalive_s`` bounds how long the broker takes to notice a silently dead peer (1.5 x)
    and so to publish its will.
    """
    return aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        will=will,
        keepalive=keepalive_s,
        timeout=10.0,
        tls_context=context,
        max_concurrent_outgoing_calls=256,
    )
