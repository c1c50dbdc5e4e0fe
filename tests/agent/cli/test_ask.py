"""`salmonn-live ask` end to end, in process, on tiny random weights and on the real nano parts."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "turn_left_and_stop.wav"


def _ask(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["ask", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_answer_on_tiny_random(capsys) -> None:
    code, out, _ = _ask(
        capsys,
        str(EXAMPLE),
        "Please describe the audio.",
        "--model",
        "tiny-random",
        "--json",
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"instruction", "text", "token_ids", "audio_tokens", "timings_ms"}
    assert result["instruction"] == "Please describe the audio."
    assert result["audio_tokens"] == 88  # official mode: every clip is padded to 30 s
    assert 1 <= len(result["token_ids"]) <= 4
    assert {"load_ms", "encoder_ms", "qformer_ms", "generate_ms"} <= set(result["timings_ms"])


def test_trimmed_mode_counts_windows_over_the_real_length(capsys) -> None:
    code, out, _ = _ask(
        capsys,
        str(EXAMPLE),
        "Please describe the audio.",
        "--model",
        "tiny-random",
        "--input-mode",
        "trimmed",
        "--json",
        "--max-new-tokens",
        "2",
    )
    assert code == 0
    samples = sf.info(str(EXAMPLE)).frames
    assert json.loads(out)["audio_tokens"] == int(np.ceil(samples / 320)) // 17


def test_any_rate_and_channel_count_is_resampled(tmp_path, capsys, caplog) -> None:
    stereo = tmp_path / "stereo44k.wav"
    subprocess.run(["sox", str(EXAMPLE), "-r", "44100", "-c", "2", str(stereo)], check=True)
    with caplog.at_level("INFO"):
        code, out, _ = _ask(
            capsys,
            str(stereo),
            "Please describe the audio.",
            "--model",
            "tiny-random",
            "--json",
            "--max-new-tokens",
            "2",
        )
    assert code == 0
    assert json.loads(out)["audio_tokens"] == 88
    assert any("44100" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(b""), ""),
        (lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage"), ""),
        (lambda p: sf.write(str(p), np.zeros(31 * 16000, dtype=np.float32), 16000), "30 s"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, make, needle) -> None:
    path = tmp_path / "bad.wav"
    make(path)
    code, out, err = _ask(capsys, str(path), "Please describe the audio.", "--model", "tiny-random")
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert needle in lines[0]


def test_audio_over_30_s_is_refused_in_trimmed_mode_too(tmp_path, capsys) -> None:
    path = tmp_path / "long.wav"
    sf.write(str(path), np.zeros(31 * 16000, dtype=np.float32), 16000)
    code, out, err = _ask(
        capsys, str(path), "Hi.", "--model", "tiny-random", "--input-mode", "trimmed"
    )
    assert code == 2 and out == "" and "Traceback" not in err
    assert "30 s" in err


def test_official_preset_without_beats_is_one_error_line(tmp_path, capsys) -> None:
    code, out, err = _ask(
        capsys,
        str(EXAMPLE),
        "Hi.",
        "--model",
        "salmonn-7b",
        "--whisper",
        str(tmp_path / "whisper-large-v2"),
        "--llm",
        str(tmp_path / "vicuna-7b-v1.5"),
    )
    assert code == 2 and out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "--beats" in lines[0]


def test_missing_weights_are_one_error_line(tmp_path, capsys) -> None:
    code, _, err = _ask(
        capsys, str(EXAMPLE), "Hi.", "--model", "tiny-random", "--llm", str(tmp_path / "nowhere")
    )
    assert code == 2 and "Traceback" not in err and "nowhere" in err
    code, _, err = _ask(capsys, str(EXAMPLE), "Hi.", "--model", "no-such-preset")
    assert code == 2 and "no-such-preset" in err


def test_with_transcript_needs_a_whisper_that_writes_text(capsys) -> None:
    code, out, err = _ask(
        capsys, str(EXAMPLE), "Who?", "--model", "tiny-random", "--with-transcript"
    )
    assert code == 2 and out == "" and "--with-transcript" in err and "Traceback" not in err


def test_nano_runs_end_to_end_on_real_weights(capsys) -> None:
    code, out, _ = _ask(
        capsys,
        str(EXAMPLE),
        "Recognize the speech and give me the transcription.",
        "--model",
        "nano",
        "--json",
        "--max-new-tokens",
        "3",
        "--with-transcript",
    )
    assert code == 0
    result = json.loads(out)
    # Whisper base heard the example's "Turn left ... stop", in front of the instruction.
    instruction = "Recognize the speech and give me the transcription."
    said = re.fullmatch(f'Speech heard: "(.+)" {re.escape(instruction)}', result["instruction"])
    assert said and "left" in said.group(1).lower()
    samples = sf.info(str(EXAMPLE)).frames
    assert (
        result["audio_tokens"] == int(np.ceil(samples / 320)) // 8
    )  # nano: trimmed, 8-frame windows
    assert 1 <= len(result["token_ids"]) <= 3


# -- --model salmonn: an official-layout checkpoint with an LLM no Vicuna preset takes --


def test_salmonn_preset_answers_from_an_official_layout_checkpoint_of_a_small_llama(
    tmp_path, capsys, caplog
) -> None:
    """`ask --model salmonn` with a 48-wide random LLaMA and a checkpoint in the official
    layout (768-wide Q-Former): every tensor loads, none missing or unexpected, and it answers."""
    from tests.model.official_layout import official_parts

    parts = official_parts(tmp_path, llm_hidden=48)
    options = [f"--{name}={path}" for name, path in parts.items()]
    with caplog.at_level("INFO", logger="model.salmonn"):
        code, out, err = _ask(
            capsys,
            str(EXAMPLE),
            "Please describe the audio.",
            "--model",
            "salmonn",
            *options,
            "--max-new-tokens",
            "4",
        )
    assert code == 0, err
    assert out.endswith("\n") and out.strip()  # the answer, one line
    reports = [
        re.search(r"(\d+) loaded, (\d+) missing, (\d+) unexpected", r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith(f"checkpoint {parts['checkpoint']}:")
    ]
    assert len(reports) == 1 and reports[0] is not None
    assert reports[0].groups() == ("69", "0", "0")  # every trainable tensor of SALMONN.md §6
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_salmonn_preset_loads_an_llm_the_vicuna_presets_refuse(tmp_path, capsys) -> None:
    from tests.model.official_layout import official_parts

    parts = official_parts(tmp_path, llm_hidden=48)
    options = [f"--{name}={path}" for name, path in parts.items()]
    for preset in ("salmonn-13b", "salmonn-7b"):
        code, out, err = _ask(capsys, str(EXAMPLE), "Hi.", "--model", preset, *options)
        assert code == 2 and out == "" and "hidden size 48" in err
    code, out, err = _ask(
        capsys,
        str(EXAMPLE),
        "Hi.",
        "--model",
        "salmonn",
        *options,
        "--json",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
    assert json.loads(out)["audio_tokens"] == 88  # official input: 30 s, 17-frame windows


def _model_options(parser: argparse.ArgumentParser, path: str = "salmonn-live") -> dict[str, str]:
    """Every `--model` option of every sub-command, by command path: its help text."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if "--model" in action.option_strings:
            found[path] = action.help or ""
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_model_options(sub, f"{path} {name}"))
    return found


def test_every_model_help_that_lists_presets_lists_them_all() -> None:
    from agent.cli import build_parser
    from model.presets import PRESETS

    helps = _model_options(build_parser())
    listing = {path: text for path, text in helps.items() if text.startswith("preset (")}
    # ask, run, train, eval and bench model list them; the others say "preset or directory".
    assert {"salmonn-live ask", "salmonn-live run", "salmonn-live eval"} <= set(listing)
    for path, text in listing.items():
        named = set(re.findall(r"[\w-]+", text.split(")")[0]))
        assert set(PRESETS) <= named, f"{path} --model help misses {set(PRESETS) - named}"
