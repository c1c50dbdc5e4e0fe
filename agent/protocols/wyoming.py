"""A Wyoming server: Home Assistant's speech-to-text (and sound detection) protocol.

Home Assistant's Wyoming integration (or any Wyoming client) connects over TCP, or a Unix
socket, and sends events. Each event on the wire is

1. one JSON header line ending in ``\\n``: ``{"type": T, "data": {...}?, "data_length": N?,
   "payload_length": M?, "version": V?}``;
2. ``data_length`` bytes of UTF-8 JSON, an object merged over the header's ``data``;
3. ``payload_length`` bytes of binary payload (PCM audio).

Readers ignore ``version``; this server writes `PROTOCOL_VERSION` and puts ``data`` in the data
section, as the reference library does. The framing is written here (not taken from the
``wyoming`` package) because the server must bound what it reads: a header line longer than
``max_header_bytes``, a ``data_length`` or ``payload_length`` over its limit, deeply nested
JSON, or a client that stops mid-event each end that connection with one log line, an
``error`` event (``{"text", "code"}``) and a close; the other connections go on. (Home
Assistant's speech-to-text reads past an ``error`` and fails the request when the connection
closes, so the reason is in this server's log line.) Tests talk to it with the ``wyoming``
package's own client.

Events served:

- ``describe`` -> ``info``: one ``asr`` program (the model, its languages, transcript
  streaming) and, with a `SoundDetector`, one ``wake`` program whose models are the detector's
  label groups (for the sound tagger, `model.sound_tagger.LABEL_GROUPS`: ``doorbell``,
  ``glass``, ``smoke_alarm``, ...).
- ``transcribe`` (optional ``language``), ``audio-start`` / ``audio-chunk``* / ``audio-stop``
  -> ``transcript-start``, ``transcript-chunk``* (the new text as it grows),
  ``transcript``, ``transcript-stop`` (the streaming events of protocol 1.7; a client that
  knows only ``transcript`` skips the others). Without a ``transcribe`` first, an audio stream
  is transcribed.
- ``detect`` (optional ``names``), then audio -> a ``detection`` per sound heard, and
  ``not-detected`` after ``audio-stop`` when none was.
- ``ping`` -> ``pong``; ``select-program`` is accepted (there is one program per kind);
  other event types are dropped, as the protocol asks.

Audio comes in any rate, width (1: unsigned 8-bit as in WAV files; 2, 3, 4: signed
little-endian) and channel count announced by ``audio-start``; it is averaged to mono and
resampled to 16 kHz float32 chunk by chunk as it arrives, so ``audio-stop`` only flushes the
resampler's look-ahead before the transcriber is called.

The server knows nothing of the agent: it is given a transcriber (a callable from 16 kHz mono
float32 samples to the text, or to an async iterator of the text so far), a
`WyomingDescription`, and optionally a `SoundDetector`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError, ConfigError, OutputError
from streaming.pcm import SAMPLE_RATE_HZ
from streaming.resample import StreamResampler

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: The protocol release whose events this server writes (transcript streaming came in 1.7).
PROTOCOL_VERSION = "1.7.0"
#: Where the server listens unless told otherwise: loopback, Wyoming's usual speech-to-text port.
DEFAULT_URI = "tcp://127.0.0.1:10300"
#: The Zeroconf (mDNS) service type Home Assistant browses for.
ZEROCONF_TYPE = "_wyoming._tcp.local."
#: Sample widths (bytes) the server decodes.
SAMPLE_WIDTHS = (1, 2, 3, 4)
MIN_RATE_HZ = 1000
MAX_RATE_HZ = 384000
MAX_CHANNELS = 32
#: How long a refused connection is drained for (see `_Connection.refuse`).
LINGER_S = 1.0


class BadInput(enum.StrEnum):
    """Why a connection was closed: the ``code`` of its ``error`` event and its counter."""

    MALFORMED_HEADER = "malformed-header"  # not a JSON object line, no type, bad lengths
    TOO_LARGE = "too-large"  # header line, data_length or payload_length over its limit
    MALFORMED_DATA = "malformed-data"  # data not a JSON object, fields of the wrong type
    PROTOCOL = "protocol"  # events out of order: audio before audio-start, a second start
    UNSUPPORTED = "unsupported"  # a valid request this server cannot serve (rate, language)
    TIMEOUT = "timeout"  # a stalled client: no complete event in time, or it stopped reading
    BUSY = "busy"  # max_connections already open
    FAILED = "failed"  # the transcriber or detector failed (logged with its traceback)


class WyomingError(AgentError):
    """A connection broke the protocol, or could not be served; it is closed.

    Attributes:
        kind: Which counter it adds to and the ``code`` sent to the client.
    """

    def __init__(self, kind: BadInput, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class WyomingEvent:
    """One event, as read or to be written.

    Attributes:
        type: The event type, e.g. ``audio-chunk``.
        data: The event's fields (header ``data`` with the data section merged over it).
        payload: The binary payload (PCM for audio chunks), None when there is none.
    """

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes | None = None


@dataclass(frozen=True)
class WyomingLimits:
    """What one connection may send and how long the server waits.

    Attributes:
        max_connections: Connections served at once; one more gets a ``busy`` error.
        max_header_bytes: Longest header line, newline included.
        max_data_bytes: Largest ``data_length``.
        max_payload_bytes: Largest ``payload_length`` (1 MiB is 2.7 s of 48 kHz stereo
            32-bit audio; Home Assistant sends about 2 KiB per chunk).
        max_audio_s: Longest audio stream, in seconds of input.
        idle_timeout_s: Outside an audio stream, the longest wait for the next whole event.
        audio_timeout_s: Inside an audio stream, the longest wait for the next whole event
            (a client streaming in real time sends one every 10-100 ms).
        transcribe_timeout_s: The longest a transcription (or the detector's end of stream)
            may take.
        write_timeout_s: The longest the server waits for a client to take what it sent.
        detect_queue_chunks: Audio chunks held for a detector that falls behind; beyond that
            the oldest is dropped (counted in ``WyomingStats.detect_chunks_dropped``).
    """

    max_connections: int = 16
    max_header_bytes: int = 64 * 1024
    max_data_bytes: int = 64 * 1024
    max_payload_bytes: int = 1024 * 1024
    max_audio_s: float = 60.0
    idle_timeout_s: float = 60.0
    audio_timeout_s: float = 5.0
    transcribe_timeout_s: float = 30.0
    write_timeout_s: float = 10.0
    detect_queue_chunks: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type == "int" else int | float
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                what = "integer" if kind is int else "number"
                raise ConfigError(
                    f"wyoming limit {f.name} must be a positive {what}, got {value!r}"
                )


def _package_version() -> str:
    try:
        return metadata.version("salmonn-live")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


@dataclass(frozen=True)
class WyomingDescription:
    """What ``info`` tells clients about the service.

    Attributes:
        program: The speech-to-text program's name: Home Assistant names the service and its
            speech-to-text entity after it.
        model: The model's name (e.g. ``whisper-base.en``).
        languages: Language codes the model transcribes; a ``transcribe`` asking for another
            one is refused (``unsupported``), ``en-US`` counts as ``en``.
        version: The program's version (default: the installed salmonn-live's).
        model_version: The model's version, if known.
        description: A human-readable line about the program.
        attribution_name: Who made it (``info`` requires an attribution).
        attribution_url: Where it is from.
        streaming: Send ``transcript-start`` / ``transcript-chunk`` / ``transcript-stop``
            around ``transcript`` (and say so in ``info``).
        sounds_program: The sound detector's program name in ``info``.
    """

    program: str = "salmonn-live"
    model: str = "whisper"
    languages: tuple[str, ...] = ("en",)
    version: str = field(default_factory=_package_version)
    model_version: str | None = None
    description: str = "salmonn-live speech-to-text (Whisper behind a streaming front end)"
    attribution_name: str = "salmonn-live"
    attribution_url: str = ""
    streaming: bool = True
    sounds_program: str = "salmonn-live sounds"

    def __post_init__(self) -> None:
        if not self.program or not self.model:
            raise ConfigError("a Wyoming description needs a program and a model name")
        if not self.languages or not all(isinstance(x, str) and x for x in self.languages):
            raise ConfigError(f"expected language codes such as ('en',), got {self.languages!r}")


@dataclass(frozen=True)
class SoundDetection:
    """A sound the detector heard.

    Attributes:
        name: One of the detector's `SoundDetector.names`.
        end_sample: Where it was heard: 16 kHz samples since ``audio-start``.
    """

    name: str
    end_sample: int


class SoundDetector(Protocol):
    """Sound-event detection for ``detect``: label groups reported like wake words.

    ``names`` are the label groups (the sound tagger's `model.sound_tagger.LABEL_GROUPS`:
    ``doorbell``, ``glass``, ``smoke_alarm``, ...): ``info`` lists them as the models of a
    ``wake`` program, which is what Home Assistant reads.
    """

    @property
    def names(self) -> Sequence[str]:
        """The label groups this detector reports."""
        ...

    def detect(
        self, audio: AsyncIterator[FloatArray], names: frozenset[str]
    ) -> AsyncIterator[SoundDetection]:
        """Listen to one audio stream and yield each detection.

        Args:
            audio: 16 kHz mono float32 chunks; it ends at ``audio-stop`` (the connection
                cancels the detection when the client goes away instead).
            names: The groups the client asked for (all of `names` when it named none).

        Returns:
            An async iterator of detections; it ends after ``audio`` ends.
        """
        ...


#: Scores sound patches: 16 kHz mono float32 windows in, each window's label group scores
#: (0..1) out.
PatchScorer = Callable[[list[FloatArray]], Awaitable[Sequence[Mapping[str, float]]]]


class PatchDetector:
    """A `SoundDetector` from a patch scorer (the sound tagger): each label group once per
    stream, the first time one patch scores at least ``threshold`` for it.

    Audio is cut into patches of ``patch_samples`` at ``hop_samples`` as it arrives (the
    sound tagger's 0.96 s at 0.48 s), and each chunk's new patches are scored in one call.
    Where the tagger runs is the caller's: a thread of its own (`salmonn-live wyoming`) or
    the agent's worker (``[wyoming]`` in `run`).

    Args:
        names: The label groups the scorer reports.
        score: Scores a list of patches (see `PatchScorer`).
        patch_samples: Samples per patch.
        hop_samples: Samples between two patch starts.
        threshold: The score (0..1] that reports a group.

    Raises:
        ConfigError: a threshold outside (0, 1], or patch sizes that are not positive.
    """

    def __init__(
        self,
        names: Sequence[str],
        score: PatchScorer,
        *,
        patch_samples: int,
        hop_samples: int,
        threshold: float,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"the sound threshold must lie in (0, 1], got {threshold}")
        if patch_samples <= 0 or hop_samples <= 0:
            raise ConfigError(f"patches of {patch_samples} at {hop_samples}: expected > 0")
        self._names = tuple(names)
        self.score = score
        self.patch_samples = patch_samples
        self.hop_samples = hop_samples
        self.threshold = threshold

    @property
    def names(self) -> Sequence[str]:
        """The label groups."""
        return self._names

    async def detect(
        self, audio: AsyncIterator[FloatArray], names: frozenset[str]
    ) -> AsyncIterator[SoundDetection]:
        """Yield a `SoundDetection` the first time each asked-for group is heard."""
        patch, hop = self.patch_samples, self.hop_samples
        buffer = np.zeros(0, np.float32)
        consumed = 0  # samples dropped from the front of `buffer`
        covered = 0  # the end of the last patch scored, in samples since audio-start
        heard: set[str] = set()

        async def detections(windows: list[FloatArray], ends: list[int]) -> list[SoundDetection]:
            found = []
            for end, groups in zip(ends, await self.score(windows), strict=True):
                for name, value in groups.items():
                    if name in names and name not in heard and value >= self.threshold:
                        heard.add(name)
                        found.append(SoundDetection(name, end))
            return found

        async for chunk in audio:
            buffer = np.concatenate([buffer, chunk])
            if buffer.size < patch:
                continue
            count = (buffer.size - patch) // hop + 1
            windows = [buffer[i * hop : i * hop + patch] for i in range(count)]
            ends = [consumed + i * hop + patch for i in range(count)]
            for detection in await detections(windows, ends):
                yield detection
            covered = ends[-1]
            buffer = buffer[count * hop :]
            consumed += count * hop
        # A short sound, or the end of a long one, that no whole patch covered: its last patch
        # (the tagger pads a short one), unless it is under a tenth of a second.
        end = consumed + buffer.size
        if end - covered >= patch // 10 and buffer.size:
            for detection in await detections([buffer[-patch:]], [end]):
                yield detection


#: The transcriber: 16 kHz mono float32 samples of one audio stream in, the text out, either
#: as a string or as an async iterator of the text so far (each item the whole text up to
#: then, the last one final), or an awaitable of either.
Transcriber = Callable[[FloatArray], Awaitable[str | AsyncIterator[str]] | AsyncIterator[str] | str]


@dataclass
class WyomingStats:
    """Counters of a running server.

    Attributes:
        connections: Connections accepted (refused ones included).
        active: Connections open now.
        events: Events read.
        transcripts: ``transcript`` events sent.
        detections: ``detection`` events sent.
        ignored: Events of types the server does not serve (dropped).
        revised: Partial texts that did not extend the text already streamed (no chunk sent
            for them; the final ``transcript`` has the whole text).
        detect_chunks_dropped: Audio chunks a slow detector lost.
        closed: Connections closed for each `BadInput` (keys are its values).
    """

    connections: int = 0
    active: int = 0
    events: int = 0
    transcripts: int = 0
    detections: int = 0
    ignored: int = 0
    revised: int = 0
    detect_chunks_dropped: int = 0
    closed: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values (``closed`` with every kind, 0 included)."""
        values: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "closed"}
        values["closed"] = {str(kind): self.closed[kind] for kind in BadInput}
        return values


# ---------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class WyomingAddress:
    """Where a server listens: ``tcp://HOST:PORT`` or ``unix://PATH``.

    Attributes:
        scheme: ``tcp`` or ``unix``.
        host: TCP host (an address or a name); empty for Unix sockets.
        port: TCP port (0: any free one); 0 for Unix sockets.
        path: The Unix socket's path; empty for TCP.
    """

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def uri(self) -> str:
        """The address as a URI (IPv6 hosts in brackets)."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for Unix sockets and TCP on a loopback address or ``localhost``."""
        if self.scheme == "unix" or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_uri(uri: str) -> WyomingAddress:
    """Parse ``tcp://HOST:PORT`` or ``unix://PATH``.

    Args:
        uri: The listening address; a TCP host may be an IPv6 address in brackets.

    Returns:
        The parsed address.

    Raises:
        ConfigError: For another scheme, a missing port or path, or a port out of range.
    """
    parts = urlsplit(uri)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ConfigError(f"expected unix://PATH, got {uri!r}")
        return WyomingAddress("unix", path=path)
    if parts.scheme != "tcp":
        raise ConfigError(f"expected a tcp://HOST:PORT or unix://PATH URI, got {uri!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"the port of {uri!r} must be 0..65535") from exc
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"expected tcp://HOST:PORT (e.g. {DEFAULT_URI}), got {uri!r}")
    return WyomingAddress("tcp", host=parts.hostname, port=port)


# ---------------------------------------------------------------------------------------------
# Framing


def encode_event(event: WyomingEvent) -> bytes:
    """The wire bytes of one event: header line, data section, payload.

    Args:
        event: The event; its data must be JSON-serialisable.

    Returns:
        The bytes to write.
    """
    header: dict[str, Any] = {"type": event.type, "version": PROTOCOL_VERSION}
    data = b""
    if event.data:
        data = json.dumps(event.data, ensure_ascii=False).encode()
        header["data_length"] = len(data)
    payload = event.payload or b""
    if payload:
        header["payload_length"] = len(payload)
    line = json.dumps(header, ensure_ascii=False).encode() + b"\n"
    return line + data + payload


def _json_object(raw: bytes, what: str, kind: BadInput) -> dict[str, Any]:
    try:
        # Decoded first: json.loads would take a UTF-16 or UTF-32 byte order mark too.
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting beyond the stack
        raise WyomingError(kind, f"{what} is not valid UTF-8 JSON: {_short(exc)}") from None
    if not isinstance(value, dict):
        raise WyomingError(kind, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _length(header: Mapping[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WyomingError(
            BadInput.MALFORMED_HEADER, f"{key} must be a non-negative integer, got {value!r}"
        )
    if value > limit:
        raise WyomingError(BadInput.TOO_LARGE, f"{key} {value} is over the limit of {limit} bytes")
    return value


def parse_header(line: bytes, limits: WyomingLimits) -> tuple[str, dict[str, Any], int, int]:
    """Check one header line.

    Args:
        line: The line, with or without its newline.
        limits: The data and payload limits.

    Returns:
        ``(type, data, data_length, payload_length)``.

    Raises:
        WyomingError: ``malformed-header`` or ``too-large``.
    """
    header = _json_object(line, "the header line", BadInput.MALFORMED_HEADER)
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise WyomingError(
            BadInput.MALFORMED_HEADER, f"the header needs a string type, got {event_type!r}"
        )
    data = header.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise WyomingError(
            BadInput.MALFORMED_HEADER, f"the header's data must be an object, got {data!r:.80}"
        )
    data_length = _length(header, "data_length", limits.max_data_bytes)
    payload_length = _length(header, "payload_length", limits.max_payload_bytes)
    return event_type, data, data_length, payload_length


async def read_event(reader: asyncio.StreamReader, limits: WyomingLimits) -> WyomingEvent | None:
    """Read one whole event.

    Args:
        reader: The connection; its ``limit`` bounds the header line.
        limits: What a header may announce.

    Returns:
        The event, or None at a clean end of the stream (between events).

    Raises:
        WyomingError: For a malformed or oversized event, or a stream that ends mid-event.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise WyomingError(
            BadInput.MALFORMED_HEADER,
            f"the connection ended inside a header line ({len(exc.partial)} bytes, no newline)",
        ) from None
    except asyncio.LimitOverrunError:
        raise WyomingError(
            BadInput.TOO_LARGE,
            f"a header line is longer than the limit of {limits.max_header_bytes} bytes",
        ) from None
    event_type, data, data_length, payload_length = parse_header(line, limits)
    try:
        if data_length:
            extra = await reader.readexactly(data_length)
            data.update(_json_object(extra, f"the data of {event_type!r}", BadInput.MALFORMED_DATA))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError as exc:
        raise WyomingError(
            BadInput.PROTOCOL,
            f"the connection ended inside {event_type!r}: {len(exc.partial)} of "
            f"{exc.expected} announced bytes came",
        ) from None
    return WyomingEvent(event_type, data, payload)


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:120]


# ---------------------------------------------------------------------------------------------
# Audio


def _int_field(data: Mapping[str, Any], key: str, low: int, high: int, event: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WyomingError(
            BadInput.MALFORMED_DATA, f"{event} needs an integer {key}, got {value!r:.40}"
        )
    if not low <= value <= high:
        raise WyomingError(BadInput.UNSUPPORTED, f"{event} {key} {value} is not in {low}..{high}")
    return value


@dataclass(frozen=True)
class AudioFormat:
    """The PCM format of an audio stream, as ``audio-start`` announces it."""

    rate: int
    width: int
    channels: int

    @classmethod
    def from_data(cls, data: Mapping[str, Any], event: str) -> AudioFormat:
        """Read ``rate`` / ``width`` / ``channels`` from an event's data.

        Raises:
            WyomingError: ``malformed-data`` for missing or non-integer fields,
                ``unsupported`` for values out of range.
        """
        rate = _int_field(data, "rate", MIN_RATE_HZ, MAX_RATE_HZ, event)
        width = _int_field(data, "width", 1, 4, event)
        channels = _int_field(data, "channels", 1, MAX_CHANNELS, event)
        return cls(rate, width, channels)

    def frames(self, payload: bytes) -> np.ndarray:
        """Decode PCM bytes to an integer array of shape ``(frames, channels)``.

        Width 1 is unsigned (WAV's 8-bit), 2 and 4 are signed little-endian, 3 (24-bit) is
        widened to int32 (its sign bit moved to the top).
        """
        if self.width == 3:
            b = np.frombuffer(payload, np.uint8).reshape(-1, 3).astype(np.uint32)
            samples = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).view(np.int32)
        else:
            samples = np.frombuffer(payload, {1: "u1", 2: "<i2", 4: "<i4"}[self.width])
        # to_mono_float32 (inside the resampler) scales native-order int16/int32/uint8.
        return samples.astype(samples.dtype.newbyteorder("="), copy=False).reshape(
            -1, self.channels
        )


class _AudioStream:
    """One stream's audio, converted to 16 kHz mono float32 chunk by chunk."""

    def __init__(self, audio_format: AudioFormat, max_audio_s: float, timestamp: int) -> None:
        self.format = audio_format
        self.frame_bytes = audio_format.width * audio_format.channels
        self.max_frames = int(max_audio_s * audio_format.rate)
        self.timestamp_ms = timestamp
        self.input_frames = 0
        self.resampler = StreamResampler(audio_format.rate, SAMPLE_RATE_HZ)
        self.chunks: list[FloatArray] = []

    def push(self, payload: bytes) -> FloatArray:
        if len(payload) % self.frame_bytes:
            raise WyomingError(
                BadInput.PROTOCOL,
                f"an audio-chunk of {len(payload)} bytes is not a whole number of "
                f"{self.frame_bytes}-byte frames (width {self.format.width}, "
                f"{self.format.channels} channel(s))",
            )
        frames = self.format.frames(payload)
        self.input_frames += len(frames)
        if self.input_frames > self.max_frames:
            raise WyomingError(
                BadInput.TOO_LARGE,
                "the audio stream is longer than the limit of "
                f"{self.max_frames / self.format.rate:g} s",
            )
        return self.resampler.push(frames)

    def flush(self) -> FloatArray:
        return self.resampler.flush()


# ---------------------------------------------------------------------------------------------
# The server


class WyomingServer:
    """A Wyoming service for speech-to-text, and sound detection when given a detector.

    Args:
        transcribe: The transcriber (see `Transcriber`); it is awaited on the event loop, so a
            blocking model call belongs in a thread or the agent's worker.
        description: What ``info`` says.
        uri: ``tcp://HOST:PORT`` (port 0: any free port) or ``unix://PATH``; loopback by
            default. Wyoming has no authentication: listen on a LAN address only on a
            trusted network.
        limits: Connection limits and timeouts.
        detector: Sound-event detection for ``detect``, or None (``detect`` is refused and
            ``info`` lists no ``wake`` program).
        zeroconf: Announce the service as ``_wyoming._tcp`` over mDNS (TCP only; needs the
            ``zeroconf`` package).
        zeroconf_name: The announced instance name (default ``salmonn-live-<hostname>``).

    Raises:
        ConfigError: For a bad URI, or zeroconf on a Unix socket.

    Attributes:
        stats: The counters (`WyomingStats`).
        address: Where it listens; with port 0, the bound port once started.
        info_event: The `info` event answered to `describe`.
    """

    def __init__(
        self,
        transcribe: Transcriber,
        description: WyomingDescription | None = None,
        *,
        uri: str = DEFAULT_URI,
        limits: WyomingLimits | None = None,
        detector: SoundDetector | None = None,
        zeroconf: bool = False,
        zeroconf_name: str | None = None,
    ) -> None:
        self.transcribe = transcribe
        self.description = description or WyomingDescription()
        self.limits = limits or WyomingLimits()
        self.detector = detector
        self.address = parse_uri(uri)
        if zeroconf and self.address.scheme != "tcp":
            raise ConfigError("zeroconf announces TCP services only; use a tcp:// URI")
        self.zeroconf = zeroconf
        self.zeroconf_name = zeroconf_name or f"salmonn-live-{socket.gethostname()}"
        self.stats = WyomingStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._zeroconf: Any = None
        self._closing = False
        self._closed = asyncio.Event()
        self.info_event = WyomingEvent("info", self._info_data())

    @property
    def uri(self) -> str:
        """The listening URI (with the bound port once started)."""
        return self.address.uri

    def _info_data(self) -> dict[str, Any]:
        d = self.description
        attribution = {"name": d.attribution_name, "url": d.attribution_url}
        model = {
            "name": d.model,
            "languages": list(d.languages),
            "attribution": attribution,
            "installed": True,
            "description": d.model,
            "version": d.model_version,
        }
        asr = {
            "name": d.program,
            "attribution": attribution,
            "installed": True,
            "description": d.description,
            "version": d.version,
            "models": [model],
            "supports_transcript_streaming": d.streaming,
            # The client (Home Assistant's voice pipeline) finds the end of the command.
            "requires_external_vad": True,
        }
        data: dict[str, Any] = {"asr": [asr]}
        if self.detector is not None:
            data["wake"] = [
                {
                    "name": d.sounds_program,
                    "attribution": attribution,
                    "installed": True,
                    "description": "sound events heard by salmonn-live, by label group",
                    "version": d.version,
                    "models": [
                        _sound_model(name, attribution, d.version) for name in self.sound_names
                    ],
                }
            ]
        return data

    @property
    def sound_names(self) -> tuple[str, ...]:
        """The sound detector's groups (none without a detector)."""
        return tuple(self.detector.names) if self.detector is not None else ()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (and announce over Zeroconf when asked).

        Raises:
            OutputError: When the address cannot be listened on (in use, no permission), or
                zeroconf is asked for and not installed.
        """
        a = self.address
        limit = self.limits.max_header_bytes
        try:
            if a.scheme == "unix":
                _remove_stale_socket(Path(a.path))
                self._server = await asyncio.start_unix_server(
                    self._on_connection, a.path, limit=limit
                )
            else:
                self._server = await asyncio.start_server(
                    self._on_connection, a.host, a.port, limit=limit
                )
        except OSError as exc:
            raise OutputError(
                f"cannot listen on {a.uri} for Wyoming: {exc.strerror or exc}; choose another "
                "address (tcp://HOST:PORT or unix://PATH)"
            ) from exc
        if a.scheme == "tcp":
            bound = self._server.sockets[0].getsockname()
            self.address = WyomingAddress("tcp", host=a.host, port=int(bound[1]))
        if not self.address.is_loopback:
            logger.warning(
                "Wyoming on %s: the protocol has no authentication; anyone who can reach it "
                "can use the speech-to-text (keep it on a trusted network)",
                self.uri,
            )
        logger.info(
            "Wyoming server on %s (asr %s, %d sound group(s))",
            self.uri,
            self.description.model,
            len(self.sound_names),
        )
        if self.zeroconf:
            try:
                await self._announce()
            except BaseException:
                await self.close()
                raise

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening, end every connection and wait for them (idempotent).

        Connection handlers get ``write_timeout_s`` to finish after being cancelled.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()  # intake first: no new connection while the rest ends
            if self._zeroconf is not None:
                zc, self._zeroconf = self._zeroconf, None
                with contextlib.suppress(Exception):
                    await zc.async_unregister_all_services()
                await zc.async_close()
            for task in list(self._tasks):
                task.cancel("Wyoming server closing")
            if self._tasks:
                _, pending = await asyncio.wait(
                    list(self._tasks), timeout=self.limits.write_timeout_s
                )
                if pending:
                    logger.warning("%d Wyoming connection(s) did not end in time", len(pending))
            if self._server is not None:
                await self._server.wait_closed()
            if self.address.scheme == "unix" and self._server is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address.path)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until `close` has finished."""
        await self._closed.wait()

    async def _announce(self) -> None:
        try:
            from zeroconf import InterfaceChoice, IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError as exc:
            raise OutputError(
                "zeroconf announcement needs the zeroconf package: pip install zeroconf"
            ) from exc
        host = _announced_host(self.address.host)
        if ipaddress.ip_address(host).is_loopback:
            logger.warning(
                "Zeroconf: the Wyoming server listens on loopback (%s); only this machine can "
                "use what it announces",
                host,
            )
        # A server bound to one address is announced on that interface only (loopback: this
        # machine); the host found for 0.0.0.0 is the default route's, so announce on all.
        interfaces: Any = InterfaceChoice.All if self.address.host in ("0.0.0.0", "") else [host]
        zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        info = AsyncServiceInfo(
            ZEROCONF_TYPE,
            f"{self.zeroconf_name}.{ZEROCONF_TYPE}",
            addresses=[socket.inet_aton(host)],
            port=self.address.port,
            server=f"{socket.gethostname()}.local.",
        )
        try:
            await zc.async_register_service(info)
        except Exception as exc:
            await zc.async_close()
            raise OutputError(f"cannot announce {self.zeroconf_name} over Zeroconf: {exc}") from exc
        self._zeroconf = zc
        logger.info("announced %s.%s on %s:%d", self.zeroconf_name, ZEROCONF_TYPE, host, info.port)

    # -- connections ---------------------------------------------------------------------------

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Accept one connection into a task of our own (asyncio's own connection task would
        report our cancellation at shutdown as an error)."""
        self.stats.connections += 1
        connection = _Connection(self, reader, writer)
        refusal = None
        if self._closing:
            refusal = WyomingError(BadInput.BUSY, "the server is shutting down")
        elif self.stats.active >= self.limits.max_connections:
            refusal = WyomingError(
                BadInput.BUSY,
                f"{self.stats.active} connections already open (max_connections "
                f"{self.limits.max_connections}); try again later",
            )
        else:
            self.stats.active += 1
        task = asyncio.get_running_loop().create_task(
            self._serve(connection, refusal), name=f"wyoming-{connection.peer}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, connection: _Connection, refusal: WyomingError | None) -> None:
        try:
            if refusal is not None:
                raise refusal
            await connection.run()
        except WyomingError as exc:
            await connection.refuse(exc)
        except ConnectionError as exc:
            logger.info("Wyoming %s went away: %s", connection.peer, _short(exc))
        except Exception as exc:  # a bug here: log it, close this connection, keep serving
            logger.error("Wyoming %s: unexpected error", connection.peer, exc_info=True)
            await connection.refuse(WyomingError(BadInput.FAILED, f"internal error: {_short(exc)}"))
        finally:
            if refusal is None:
                self.stats.active -= 1
            await connection.close()


def _sound_model(name: str, attribution: Mapping[str, str], version: str) -> dict[str, Any]:
    phrase = name.replace("_", " ")
    return {
        "name": name,
        "attribution": dict(attribution),
        "installed": True,
        "description": phrase.capitalize(),
        "version": version,
        "languages": [],  # sounds have none
        "phrase": phrase,
    }


def _announced_host(host: str) -> str:
    """An IPv4 address to announce for a listening host (the outgoing one for 0.0.0.0)."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise OutputError(f"zeroconf: cannot resolve {host!r} to an IPv4 address") from exc
    if not address.is_unspecified:
        return str(address)
    # The address of the route to the mDNS group; connecting a UDP socket sends nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("224.0.0.251", 5353))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket file left by a server that is gone; refuse a live one or a file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OutputError(f"{path} exists and is not a socket; choose another unix:// path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OutputError(f"another server is listening on {path}")


class _Connection:
    """One client: reads events in order and answers them."""

    def __init__(
        self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix client"
        self.write_lock = asyncio.Lock()
        self.request: str | None = None  # "transcribe" or "detect": what the next stream is for
        self.language: str | None = None
        self.names: frozenset[str] = frozenset()
        self.audio: _AudioStream | None = None
        self.mode = "transcribe"
        self.detect_queue: asyncio.Queue[FloatArray | None] | None = None
        self.detect_task: asyncio.Task[int] | None = None
        self.unwritable = False  # a write timed out: the client reads nothing

    async def run(self) -> None:
        while True:
            timeout = self.limits.audio_timeout_s if self.audio else self.limits.idle_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    event = await read_event(self.reader, self.limits)
            except TimeoutError:
                raise WyomingError(
                    BadInput.TIMEOUT,
                    f"no complete event within {timeout:g} s"
                    + (" inside an audio stream" if self.audio else ""),
                ) from None
            if event is None:
                if self.audio is not None:
                    logger.info("Wyoming %s closed inside an audio stream", self.peer)
                return
            self.server.stats.events += 1
            self._check_detection()
            await self.handle(event)

    async def handle(self, event: WyomingEvent) -> None:
        """Answer one event (audio events in order; the others at any time)."""
        kind, data = event.type, event.data
        if kind == "audio-chunk":
            await self._audio_chunk(event)
        elif kind == "describe":
            await self.write(self.server.info_event)
        elif kind == "transcribe":
            self.language = self._language(data)
            self.request = "transcribe"
        elif kind == "detect":
            self.names = self._detect_names(data)
            self.request = "detect"
        elif kind == "audio-start":
            await self._audio_start(data)
        elif kind == "audio-stop":
            await self._audio_stop()
        elif kind == "ping":
            await self.write(WyomingEvent("pong", {"text": data.get("text")}))
        elif kind == "select-program":
            pass  # one program per kind: any selection is the one there is
        else:
            self.server.stats.ignored += 1
            logger.debug("Wyoming %s: dropped a %r event (not served here)", self.peer, kind)

    def _language(self, data: Mapping[str, Any]) -> str | None:
        language = data.get("language")
        if language is None:
            return None
        if not isinstance(language, str):
            raise WyomingError(
                BadInput.MALFORMED_DATA, f"transcribe language must be a string, got {language!r}"
            )
        supported = self.server.description.languages
        base = language.replace("_", "-").split("-")[0].lower()
        if language not in supported and base not in supported:
            raise WyomingError(
                BadInput.UNSUPPORTED,
                f"language {language!r} is not transcribed here; this model does {list(supported)}",
            )
        return language

    def _detect_names(self, data: Mapping[str, Any]) -> frozenset[str]:
        if self.server.detector is None:
            raise WyomingError(
                BadInput.UNSUPPORTED, "this server detects no sounds (speech-to-text only)"
            )
        names = data.get("names")
        known = self.server.sound_names
        if names is None:
            return frozenset(known)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise WyomingError(
                BadInput.MALFORMED_DATA,
                f"detect names must be a list of strings, got {names!r:.80}",
            )
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise WyomingError(
                BadInput.UNSUPPORTED, f"unknown sound group(s) {unknown}; known: {list(known)}"
            )
        return frozenset(names) or frozenset(known)

    async def _audio_start(self, data: Mapping[str, Any]) -> None:
        if self.audio is not None:
            raise WyomingError(BadInput.PROTOCOL, "audio-start inside an open audio stream")
        audio_format = AudioFormat.from_data(data, "audio-start")
        timestamp = data.get("timestamp")
        start_ms = (
            timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else 0
        )
        self.audio = _AudioStream(audio_format, self.limits.max_audio_s, start_ms)
        self.mode = self.request or "transcribe"
        self.request = None
        if self.mode == "detect":
            assert self.server.detector is not None  # `detect` is refused without one
            self.detect_queue = asyncio.Queue(self.limits.detect_queue_chunks + 1)
            self.detect_task = asyncio.create_task(
                self._detect(self.server.detector, self.detect_queue, self.audio, self.names),
                name=f"wyoming-detect-{self.peer}",
            )

    async def _audio_chunk(self, event: WyomingEvent) -> None:
        if self.audio is None:
            raise WyomingError(BadInput.PROTOCOL, "audio-chunk before audio-start")
        announced = self.audio.format
        fields = {k: event.data[k] for k in ("rate", "width", "channels") if k in event.data}
        if fields and AudioFormat.from_data({**vars(announced), **fields}, "audio-chunk") != (
            announced
        ):
            raise WyomingError(
                BadInput.UNSUPPORTED,
                f"an audio-chunk in {fields} inside a stream announced as {vars(announced)}",
            )
        samples = self.audio.push(event.payload or b"")
        if self.mode == "detect":
            self._feed_detector(samples)
        elif samples.size:
            self.audio.chunks.append(samples)

    async def _audio_stop(self) -> None:
        if self.audio is None:
            raise WyomingError(BadInput.PROTOCOL, "audio-stop before audio-start")
        audio, self.audio = self.audio, None
        tail = audio.flush()
        if self.mode == "detect":
            self._feed_detector(tail)
            await self._finish_detection()
            return
        if tail.size:
            audio.chunks.append(tail)
        samples = np.concatenate(audio.chunks) if audio.chunks else np.zeros(0, np.float32)
        await self._transcribe(samples)

    # -- transcription -------------------------------------------------------------------------

    async def _transcribe(self, samples: FloatArray) -> None:
        description = self.server.description
        language = self.language or description.languages[0]
        streaming = description.streaming
        started = time.monotonic()
        if streaming:
            await self.write(WyomingEvent("transcript-start", {"language": language}))
        sent = ""
        final = ""
        try:
            async with asyncio.timeout(self.limits.transcribe_timeout_s):
                async for text in _texts(self.server.transcribe(samples)):
                    final = text
                    if not streaming:
                        continue
                    if text.startswith(sent):
                        if len(text) > len(sent):
                            await self.write(
                                WyomingEvent("transcript-chunk", {"text": text[len(sent) :]})
                            )
                            sent = text
                    else:
                        self.server.stats.revised += 1
        except TimeoutError:
            raise WyomingError(
                BadInput.FAILED,
                f"the transcription took over {self.limits.transcribe_timeout_s:g} s",
            ) from None
        except (WyomingError, ConnectionError):
            raise
        except Exception as exc:
            logger.error("Wyoming %s: the transcriber failed", self.peer, exc_info=True)
            raise WyomingError(BadInput.FAILED, f"the transcriber failed: {_short(exc)}") from exc
        await self.write(WyomingEvent("transcript", {"text": final, "language": language}))
        if streaming:
            await self.write(WyomingEvent("transcript-stop"))
        self.server.stats.transcripts += 1
        logger.debug(
            "Wyoming %s: %.2f s of audio transcribed in %.3f s",
            self.peer,
            samples.size / SAMPLE_RATE_HZ,
            time.monotonic() - started,
        )

    # -- detection -----------------------------------------------------------------------------

    def _feed_detector(self, samples: FloatArray) -> None:
        queue = self.detect_queue
        if queue is None or not samples.size:
            return
        if queue.qsize() >= self.limits.detect_queue_chunks:
            queue.get_nowait()  # the detector fell behind: lose the oldest audio, not the newest
            self.server.stats.detect_chunks_dropped += 1
            if self.server.stats.detect_chunks_dropped == 1:
                logger.warning(
                    "Wyoming %s: the sound detector falls behind; dropping audio", self.peer
                )
        queue.put_nowait(samples)

    async def _detect(
        self,
        detector: SoundDetector,
        queue: asyncio.Queue[FloatArray | None],
        audio: _AudioStream,
        names: frozenset[str],
    ) -> int:
        async def chunks() -> AsyncIterator[FloatArray]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        found = 0
        async for hit in detector.detect(chunks(), names):
            if hit.name not in names:  # Home Assistant skips names it did not ask for
                continue
            stamp = audio.timestamp_ms + round(hit.end_sample * 1000 / SAMPLE_RATE_HZ)
            await self.write(WyomingEvent("detection", {"name": hit.name, "timestamp": stamp}))
            self.server.stats.detections += 1
            found += 1
        return found

    def _check_detection(self) -> None:
        """Surface a detector that failed while audio was still coming."""
        task = self.detect_task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self.detect_task = None
                raise self._detector_failure(exc)

    def _detector_failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, WyomingError | ConnectionError):
            return exc
        logger.error("Wyoming %s: the sound detector failed", self.peer, exc_info=exc)
        return WyomingError(BadInput.FAILED, f"the sound detector failed: {_short(exc)}")

    async def _finish_detection(self) -> None:
        task, queue = self.detect_task, self.detect_queue
        self.detect_task = self.detect_queue = None
        assert task is not None and queue is not None
        if queue.full():
            queue.get_nowait()
            self.server.stats.detect_chunks_dropped += 1
        queue.put_nowait(None)
        try:
            async with asyncio.timeout(self.limits.transcribe_timeout_s):
                found = await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            raise WyomingError(
                BadInput.FAILED,
                f"the sound detector did not finish within {self.limits.transcribe_timeout_s:g} s",
            ) from None
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception as exc:
            raise self._detector_failure(exc) from exc
        if not found:
            await self.write(WyomingEvent("not-detected"))

    # -- output --------------------------------------------------------------------------------

    async def write(self, event: WyomingEvent) -> None:
        """Send one event, waiting at most ``write_timeout_s`` for the client to take it."""
        async with self.write_lock:
            self.writer.write(encode_event(event))
            try:
                async with asyncio.timeout(self.limits.write_timeout_s):
                    await self.writer.drain()
            except TimeoutError:
                self.unwritable = True
                raise WyomingError(
                    BadInput.TIMEOUT,
                    f"the client took nothing for {self.limits.write_timeout_s:g} s",
                ) from None

    async def refuse(self, exc: WyomingError) -> None:
        """Log, count, and tell the client why it is being closed (best effort)."""
        self.server.stats.closed[exc.kind] += 1
        logger.warning("Wyoming %s: %s (%s); closing the connection", self.peer, exc, exc.kind)
        if self.unwritable:
            return  # it reads nothing: an error event would wait too
        error = WyomingEvent("error", {"text": str(exc), "code": str(exc.kind)})
        linger_s = min(LINGER_S, self.limits.write_timeout_s)
        with contextlib.suppress(Exception):
            self.writer.write(encode_event(error))
            async with asyncio.timeout(linger_s):
                await self.writer.drain()
                # Closing with unread input would reset the connection, and a reset can
                # destroy the error event before the client reads it: end our side, then
                # discard what the client still sends until it closes (bounded in time).
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                while await self.reader.read(65536):
                    pass

    async def close(self) -> None:
        """End the detection (if any) and close the socket."""
        task = self.detect_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.write_timeout_s):
                await self.writer.wait_closed()


async def _texts(result: Any) -> AsyncIterator[str]:
    """The texts of a transcriber's result: a string, an async iterator, or an awaitable."""
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, str):
        yield result
        return
    if not hasattr(result, "__aiter__"):
        raise TypeError(f"a transcriber must give a str or an async iterator, got {result!r:.80}")
    async for text in result:
        if not isinstance(text, str):
            raise TypeError(f"a transcriber's partial text must be a str, got {text!r:.80}")
        yield text
