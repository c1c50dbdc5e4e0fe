"""Tests for `salmonn-live segment` / `devices` through agent.cli.main (in process)."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from agent.cli import main
from tests.streaming.conftest import truncated_copy
from training.scenes import SR, alarm_beeping


def _scene_audio() -> np.ndarray:
    audio = (0.0005 * np.random.default_rng(0).standard_normal(5 * SR)).astype(np.float32)
    clip = 0.3 * alarm_beeping(np.random.default_rng(1))
    audio[2 * SR : 2 * SR + clip.size] += clip.astype(np.float32)
    return audio


def _nan_wav(tmp_path: Path) -> Path:
    audio = _scene_audio()
    audio[3 * SR] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, audio, SR, subtype="FLOAT")
    return path


def _ogg_file(tmp_path: Path) -> Path:
    path = tmp_path / "scene.ogg"
    soundfile.write(path, _scene_audio(), SR, subtype="VORBIS")
    return path


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    return path


def _zero_frames_wav(tmp_path: Path) -> Path:
    path = tmp_path / "zero.wav"
    soundfile.write(path, np.zeros(0, np.float32), SR)
    return path


def _scene_file(tmp_path: Path) -> Path:
    path = tmp_path / "scene.wav"
    soundfile.write(path, _scene_audio(), SR)
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
        (_nan_wav, [], "NaN or infinite"),
        (lambda p: truncated_copy(_scene_file(p), 0.6), [], "truncated WAV"),
        (lambda p: truncated_copy(_ogg_file(p), 0.6), [], "truncated Ogg"),
        (_empty_file, [], "cannot decode"),
        (_zero_frames_wav, [], "zero-length"),
        # A maximum length no segment could end within used to split every few frames to the
        # end of the stream (20..200 ms) or crash with a traceback (1 ms).
        (lambda p: _scene_file(p), ["--max-segment-ms", "1"], "max_segment_ms (1) must exceed"),
        (lambda p: _scene_file(p), ["--max-segment-ms", "20"], "max_segment_ms (20) must"),
        (lambda p: _scene_file(p), ["--max-segment-ms", "200"], "end_silence_ms + pre_roll_ms"),
        (
            lambda p: _scene_file(p),
            ["--max-segment-ms", "200", "--end-silence-ms", "300", "--pre-roll-ms", "0"],
            "(300 ms)",
        ),
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


def test_empty_stdin_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["segment", "-", "--json"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == ""
    assert len(err) == 1 and "zero length input" in err[0]


@pytest.mark.parametrize(
    ("max_segment_ms", "end_silence_ms", "pre_roll_ms"), [(561, 500, 60), (100, 40, 0)]
)
def test_short_max_segment_splits_and_ends(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    max_segment_ms: int,
    end_silence_ms: int,
    pre_roll_ms: int,
) -> None:
    args = ["--max-segment-ms", str(max_segment_ms), "--end-silence-ms", str(end_silence_ms)]
    args += ["--pre-roll-ms", str(pre_roll_ms)]
    assert main(["segment", str(_scene_file(tmp_path)), "--json", *args]) == 0
    segments = json.loads(capsys.readouterr().out)["segments"]
    assert len(segments) >= 3
    for previous, segment in itertools.pairwise(segments):
        assert previous["end"] <= segment["start"]
    for segment in segments:
        assert segment["start"] < segment["end"] <= segment["start"] + max_segment_ms / 1000


def test_devices_without_devices_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from streaming.sources import list_input_devices

    if list_input_devices():
        pytest.skip("this machine has an input device")
    assert main(["devices"]) == 2
    assert "no audio input devices" in capsys.readouterr().err


def test_module_import_is_light() -> None:
    code = (
        "import sys, agent.cli.segment, bench.segment;"
        " print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
