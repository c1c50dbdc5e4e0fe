"""Tests for `salmonn-live segment` / `devices` through agent.cli.main (in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from agent.cli import main
from streaming.scenes import SR, alarm_beeping


def _scene_file(tmp_path: Path) -> Path:
    audio = (0.0005 * np.random.default_rng(0).standard_normal(5 * SR)).astype(np.float32)
    clip = 0.3 * alarm_beeping(np.random.default_rng(1))
    audio[2 * SR : 2 * SR + clip.size] += clip.astype(np.float32)
    path = tmp_path / "scene.wav"
    soundfile.write(path, audio, SR)
    return path


def test_segment_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segment", str(_scene_file(tmp_path)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sample_rate"] == 16000
    assert len(out["segments"]) == 1
    segment = out["segments"][0]
    assert segment["kind"] == "sound" and 1.8 < segment["start"] < 2.1


def test_segment_stdin_raw_pcm(tmp_path: Path) -> None:
    audio, _ = soundfile.read(_scene_file(tmp_path), dtype="int16")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "segment", "-", "--json"],
        input=audio.tobytes(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["segments"]) == 1


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: p / "missing.wav", [], "no such file"),
        (
            lambda p: (p / "t.wav").write_bytes(b"RIFF....WAVEjunk") and p / "t.wav",
            [],
            "cannot decode",
        ),
        (lambda p: _scene_file(p), ["--frame-ms", "15"], "frame_ms"),
        (lambda p: _scene_file(p), ["--aggressiveness", "9"], "aggressiveness"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make,
    args: list[str],
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    assert main(["segment", str(make(tmp_path)), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("salmonn-live segment: error:")


def test_devices_without_devices_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from streaming.sources import list_input_devices

    if list_input_devices():
        pytest.skip("this machine has an input device")
    assert main(["devices"]) == 2
    assert "no audio input devices" in capsys.readouterr().err


def test_module_import_is_light() -> None:
    code = (
        "import sys, agent.cmd_segment, bench.segment;"
        " print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
