"""Tests for streaming/audio_file.py: formats, conversion, and one clear error per bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile

from streaming.audio_file import load_audio
from streaming.errors import AudioInputError, StreamingError
from tests.streaming.conftest import truncated_copy

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)


def _tone(rate_hz: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("suffix", "subtype"),
    [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS"), (".wav", "FLOAT")],
)
def test_formats_load_as_16k_mono(tmp_path: Path, suffix: str, subtype: str) -> None:
    path = tmp_path / f"tone{suffix}"
    soundfile.write(path, _tone(16000), 16000, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == 8000
    np.testing.assert_allclose(audio, _tone(16000), atol=0.02 if subtype == "VORBIS" else 1e-4)


def test_stereo_44k_is_averaged_resampled_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    left = _tone(44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, 44100, subtype="FLOAT")
    with caplog.at_level(logging.INFO, logger="streaming.audio_file"):
        audio = load_audio(str(path))
    assert audio.size == 8000
    amplitude = float(np.sqrt(2 * np.mean(audio[500:-500] ** 2)))
    assert amplitude == pytest.approx(0.25, abs=0.005)  # average of 0.5 and 0
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "44100" in infos[0].getMessage()


def test_no_log_when_nothing_converted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "plain.wav"
    soundfile.write(path, _tone(16000), 16000)
    with caplog.at_level(logging.INFO, logger="streaming.audio_file"):
        load_audio(path)
    assert not caplog.records


def test_other_target_rate(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, _tone(16000), 16000)
    assert load_audio(path, sample_rate_hz=8000).size == 4000


def _write_good(tmp_path: Path, suffix: str = ".wav") -> Path:
    path = tmp_path / f"good{suffix}"
    soundfile.write(path, _tone(16000, 1.0), 16000)
    return path


def _bad_missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.wav"


def _bad_directory(tmp_path: Path) -> Path:
    return tmp_path


def _bad_text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    return path


def _bad_unknown_extension(tmp_path: Path) -> Path:
    path = tmp_path / "data.xyz"
    path.write_bytes(bytes(range(256)) * 40)
    return path


def _bad_truncated_wav(tmp_path: Path) -> Path:
    return truncated_copy(_write_good(tmp_path), 0.6)


def _bad_header_only_wav(tmp_path: Path) -> Path:
    return truncated_copy(_write_good(tmp_path), 0.001)


def _bad_truncated_flac(tmp_path: Path) -> Path:
    return truncated_copy(_write_good(tmp_path, ".flac"), 0.5)


def _write_ogg(tmp_path: Path) -> Path:
    path = tmp_path / "good.ogg"
    soundfile.write(path, _tone(16000, 2.0), 16000, subtype="VORBIS")
    return path


def _bad_truncated_ogg(tmp_path: Path) -> Path:
    return truncated_copy(_write_ogg(tmp_path), 0.6)  # ends inside a page


def _bad_ogg_without_last_page(tmp_path: Path) -> Path:
    # Cut exactly before the last page: every page is complete, none is the end of stream.
    path = _write_ogg(tmp_path)
    data = path.read_bytes()
    out = path.with_name("cut.ogg")
    out.write_bytes(data[: data.rfind(b"OggS")])
    return out


def _bad_ogg_corrupt_last_page(tmp_path: Path) -> Path:
    path = _write_ogg(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last page's checksum no longer matches
    out = path.with_name("corrupt.ogg")
    out.write_bytes(bytes(data))
    return out


def _bad_zero_length(tmp_path: Path) -> Path:
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), 16000)
    return path


def _bad_empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    return path


def _bad_nan(tmp_path: Path) -> Path:
    audio = _tone(16000)
    audio[100] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    return path


def _bad_inf(tmp_path: Path) -> Path:
    audio = _tone(16000)
    audio[7] = np.inf
    path = tmp_path / "inf.wav"
    soundfile.write(path, audio, 16000, subtype="DOUBLE")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_missing, "no such file"),
        (_bad_directory, "not a regular file"),
        (_bad_text, "cannot decode"),
        (_bad_unknown_extension, "cannot decode"),
        (_bad_truncated_wav, "truncated"),
        (_bad_header_only_wav, "truncated|cannot decode"),
        (_bad_truncated_flac, "corrupt|truncated"),
        (_bad_truncated_ogg, "truncated Ogg file: it does not end with a complete page"),
        (_bad_ogg_without_last_page, "truncated Ogg file: its last page lacks the end-of-stream"),
        (_bad_ogg_corrupt_last_page, "truncated Ogg file"),
        (_bad_zero_length, "zero-length"),
        (_bad_empty_file, "cannot decode|zero-length"),
        (_bad_nan, "NaN or infinite"),
        (_bad_inf, "NaN or infinite"),
    ],
)
def test_bad_input_raises_one_line_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AudioInputError, match=message) as info:
        load_audio(make(tmp_path))
    assert isinstance(info.value, StreamingError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_complete_ogg_passes_the_end_of_stream_check(tmp_path: Path, subtype: str) -> None:
    from streaming.audio_file import check_ogg_complete

    path = tmp_path / f"a_{subtype}.ogg"
    soundfile.write(path, _tone(16000, 2.0), 16000, subtype=subtype)
    check_ogg_complete(path)  # does not raise
    check_ogg_complete(_write_good(tmp_path))  # not Ogg: not checked
