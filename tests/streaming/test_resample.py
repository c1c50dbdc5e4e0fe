"""Tests for streaming/resample.py: rates, channels, dtypes, and streaming == one-shot."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.errors import AudioInputError
from streaming.resample import StreamResampler, resample, to_mono_float32

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)

RATES_HZ = [8000, 11025, 16000, 22050, 32000, 44100, 48000, 16001]


def _tone(freq_hz: float, rate_hz: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return np.sin(2 * np.pi * freq_hz * t).astype(np.float32)


def _amplitude(x: np.ndarray) -> float:
    return float(np.sqrt(2 * np.mean(x**2)))


@pytest.mark.parametrize("rate_hz", RATES_HZ)
def test_length_is_ceil_of_ratio(rate_hz: int) -> None:
    for n in (0, 1, 7, rate_hz + 3):
        out = resample(np.zeros(n, np.float32), rate_hz)
        assert out.dtype == np.float32
        assert out.size == -(-n * 16000 // rate_hz)


@pytest.mark.parametrize("rate_hz", [8000, 22050, 44100, 48000])
def test_passband_tone_keeps_amplitude_and_frequency(rate_hz: int) -> None:
    out = resample(_tone(1000.0, rate_hz), rate_hz)[1000:-1000]
    assert _amplitude(out) == pytest.approx(1.0, abs=0.01)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spectrum) * 16000 / out.size
    assert peak_hz == pytest.approx(1000.0, abs=5.0)


@pytest.mark.parametrize("rate_hz", [22050, 44100, 48000])
def test_above_new_nyquist_is_removed(rate_hz: int) -> None:
    # 9 kHz would alias to 7 kHz at 16 kHz; the anti-alias filter must remove it.
    out = resample(_tone(9000.0, rate_hz), rate_hz)[1000:-1000]
    assert _amplitude(out) < 1e-3


def test_dc_passes_exactly() -> None:
    out = resample(np.full(44100, 0.25, np.float32), 44100)
    np.testing.assert_allclose(out[200:-200], 0.25, atol=1e-5)


@pytest.mark.parametrize("rate_hz", RATES_HZ)
def test_stream_equals_one_shot_for_random_chunks(rate_hz: int) -> None:
    rng = np.random.default_rng(rate_hz)
    audio = (0.1 * rng.standard_normal((rate_hz + 1234, 2))).astype(np.float32)
    expected = resample(audio, rate_hz)
    stream = StreamResampler(rate_hz)
    parts, i = [], 0
    while i < len(audio):
        n = int(rng.integers(0, 2500))  # includes empty chunks
        parts.append(stream.push(audio[i : i + n]))
        i += n
    parts.append(stream.flush())
    got = np.concatenate(parts)
    assert got.size == expected.size
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_stream_emits_with_bounded_lag() -> None:
    stream = StreamResampler(48000)
    emitted = 0
    for _ in range(10):
        emitted += stream.push(np.zeros(4800, np.float32)).size
    # 48000 inputs -> 16000 outputs; only the look-ahead may still be held back.
    assert 16000 - emitted <= stream.latency_samples


def test_reset_restarts_the_stream() -> None:
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(5000).astype(np.float32)
    stream = StreamResampler(44100)
    first = np.concatenate([stream.push(audio), stream.flush()])
    with pytest.raises(AudioInputError):
        stream.push(audio)
    stream.reset()
    second = np.concatenate([stream.push(audio), stream.flush()])
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([16384, -32768], np.int16), [0.5, -1.0]),
        (np.array([1 << 30], np.int32), [0.5]),
        (np.array([192, 64], np.uint8), [0.5, -0.5]),
        (np.array([0.25], np.float64), [0.25]),
        (np.array([[0.5, -0.5], [1.0, 0.0]], np.float32), [0.0, 0.5]),  # channels averaged
        (np.array([[16384, 0]], np.int16), [0.25]),
    ],
)
def test_to_mono_float32(array: np.ndarray, expected: list[float]) -> None:
    out = to_mono_float32(array)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected)


def test_identity_rate_returns_mono_float32() -> None:
    stereo = np.array([[100, 300], [-100, -300]], np.int16)
    np.testing.assert_allclose(resample(stereo, 16000), [200 / 32768, -200 / 32768])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 2, 2), np.float32), np.array(["a"]), np.zeros((4, 0), np.float32)],
)
def test_bad_arrays_raise(bad: np.ndarray) -> None:
    with pytest.raises(AudioInputError):
        resample(bad, 16000)


@pytest.mark.parametrize("rate", [0, -8000, 16000.5, True])
def test_bad_rates_raise(rate: object) -> None:
    with pytest.raises(AudioInputError, match="positive integer"):
        StreamResampler(rate)  # type: ignore[arg-type]
