"""`salmonn-live ask` end to end, in process, on tiny random weights and on the real nano parts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "turn_left_and_stop.wav"


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
    assert set(result) == {"text", "token_ids", "audio_tokens", "timings_ms"}
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
    )
    assert code == 0
    result = json.loads(out)
    samples = sf.info(str(EXAMPLE)).frames
    assert (
        result["audio_tokens"] == int(np.ceil(samples / 320)) // 8
    )  # nano: trimmed, 8-frame windows
    assert 1 <= len(result["token_ids"]) <= 3
