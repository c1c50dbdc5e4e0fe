"""Tests for streaming/pcm.py: the pipeline rate and raw PCM to mono float32."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from streaming.errors import AudioInputError
from streaming.pcm import PCM_FORMATS, decode_pcm, int16_to_float32
from streaming.resample import to_mono_float32


def test_int16_full_scale_maps_to_minus_one_and_just_below_one() -> None:
    out = int16_to_float32(np.array([-32768, -16384, 0, 1, 32767], dtype=np.int16))
    assert out.dtype == np.float32
    assert out.tolist() == [-1.0, -0.5, 0.0, 1 / 32768, 32767 / 32768]


def test_int16_big_endian_input_is_read_by_value() -> None:
    big = np.array([-32768, 256], dtype=">i2")
    assert int16_to_float32(big).tolist() == [-1.0, 256 / 32768]


@pytest.mark.parametrize(
    ("data", "sample_format", "channels", "expected"),
    [
        (struct.pack("<3h", -32768, 0, 16384), "s16le", 1, [-1.0, 0.0, 0.5]),
        # Interleaved stereo is averaged (L, R), (L, R): not channel 0 alone.
        (struct.pack("<4h", 16384, 0, -32768, 32767), "s16le", 2, [0.25, -1 / 65536]),
        (struct.pack("<3f", 0.25, -2.0, 3.0), "f32le", 1, [0.25, -1.0, 1.0]),  # clipped
        (struct.pack("<4f", 1e38, 1e38, -0.5, 0.5), "f32le", 2, [1.0, 0.0]),  # no inf mean
        (b"", "s16le", 2, []),
    ],
)
def test_decode_pcm(data: bytes, sample_format: str, channels: int, expected: list[float]) -> None:
    out = decode_pcm(data, sample_format, channels)
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.tolist() == pytest.approx(expected, abs=0.0)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_decode_pcm_s16le_equals_the_resamplers_conversion(channels: int) -> None:
    pcm = np.random.default_rng(channels).integers(-32768, 32768, (257, channels), np.int16)
    decoded = decode_pcm(pcm.astype("<i2").tobytes(), "s16le", channels)
    assert np.array_equal(decoded, to_mono_float32(pcm))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decode_pcm_refuses_non_finite_floats(bad: float) -> None:
    with pytest.raises(AudioInputError, match=r"^NaN or infinite samples$"):
        decode_pcm(struct.pack("<2f", 0.5, bad), "f32le", 1)


def test_formats_are_little_endian_16_bit_int_and_32_bit_float() -> None:
    assert {name: dtype.str for name, dtype in PCM_FORMATS.items()} == {
        "s16le": "<i2",
        "f32le": "<f4",
    }
