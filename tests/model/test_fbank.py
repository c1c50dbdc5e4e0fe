"""`model/fbank.py` against a loop-by-loop numpy reference written from Kaldi's formulas."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from model.fbank import kaldi_fbank, kaldi_mel_banks, num_frames

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)

SAMPLE_RATE_HZ = 16000
WINDOW = 400  # 25 ms
SHIFT = 160  # 10 ms
FFT_SIZE = 512
NUM_MEL = 128
PCM16 = 2.0**15


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread hand-offs
    cost 30x the arithmetic; restore the setting for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_fbank(x: np.ndarray) -> np.ndarray:
    """Kaldi fbank spelled out one frame and one filter weight at a time, in float64.

    Returns:
        (frames, 128) natural-log mel energies.
    """

    def mel(freq_hz: float) -> float:
        return 1127.0 * math.log(1.0 + freq_hz / 700.0)

    x = np.asarray(x, dtype=np.float64)
    mel_low, mel_high = mel(20.0), mel(SAMPLE_RATE_HZ / 2)
    step = (mel_high - mel_low) / (NUM_MEL + 1)
    weights = np.zeros((NUM_MEL, FFT_SIZE // 2 + 1))
    for m in range(NUM_MEL):
        left, center, right = (mel_low + (m + i) * step for i in range(3))
        for k in range(FFT_SIZE // 2):  # the Nyquist bin keeps weight 0
            f_mel = mel(k * SAMPLE_RATE_HZ / FFT_SIZE)
            if left < f_mel < right:
                if f_mel <= center:
                    weights[m, k] = (f_mel - left) / (center - left)
                else:
                    weights[m, k] = (right - f_mel) / (right - center)

    window = [(0.5 - 0.5 * math.cos(2 * math.pi * n / (WINDOW - 1))) ** 0.85 for n in range(WINDOW)]
    rows = []
    for start in range(0, len(x) - WINDOW + 1, SHIFT):
        frame = x[start : start + WINDOW].copy()
        frame -= frame.mean()
        emphasised = np.empty(WINDOW)
        emphasised[0] = frame[0] - 0.97 * frame[0]
        for n in range(1, WINDOW):
            emphasised[n] = frame[n] - 0.97 * frame[n - 1]
        padded = np.zeros(FFT_SIZE)
        padded[:WINDOW] = emphasised * np.array(window)
        power = np.abs(np.fft.rfft(padded)) ** 2
        energies = weights @ power
        rows.append(np.log(np.maximum(energies, np.finfo(np.float32).eps)))
    return np.array(rows)


def _time_s(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ


def _sine() -> np.ndarray:
    return 0.5 * PCM16 * np.sin(2 * np.pi * 440.0 * _time_s(0.5))


def _noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(8000) * 3000.0


def _chirp() -> np.ndarray:
    t = _time_s(0.5)
    # Linear sweep 100 Hz -> 7 kHz over 0.5 s: phase 2 pi (f0 t + (f1 - f0) t^2 / (2 T)).
    return 0.3 * PCM16 * np.sin(2 * np.pi * (100.0 * t + (7000.0 - 100.0) * t**2))


SIGNALS = {"sine": _sine, "noise": _noise, "chirp": _chirp}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_float64_matches_reference(name: str) -> None:
    x = SIGNALS[name]()
    got = kaldi_fbank(torch.from_numpy(x)).numpy()
    expected = reference_fbank(x)
    assert got.shape == expected.shape == (num_frames(len(x)), NUM_MEL)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_float32_matches_reference_above_rounding_floor(name: str) -> None:
    """float32 agrees wherever the energy is within 60 dB of the frame's peak.

    Further down, float32 FFT rounding noise (about 1e-7 of the peak amplitude) dominates.
    """
    x = SIGNALS[name]()
    got = kaldi_fbank(torch.from_numpy(x).float())
    assert got.dtype == torch.float32
    expected = reference_fbank(x)
    loud = expected > expected.max(axis=1, keepdims=True) - math.log(1e6)
    assert loud.mean() > 0.05  # the comparison covers a real share of the bins (chirp: 12%)
    np.testing.assert_allclose(got.numpy()[loud], expected[loud], rtol=0, atol=2e-3)


def test_matches_transformers_kaldi_path() -> None:
    """A second, independently written Kaldi fbank: transformers' numpy spectrogram."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    x = _noise()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "at least one mel filter has all zero values" (true)
        filters = audio_utils.mel_filter_bank(
            num_frequency_bins=FFT_SIZE // 2 + 1,
            num_mel_filters=NUM_MEL,
            min_frequency=20.0,
            max_frequency=SAMPLE_RATE_HZ / 2,
            sampling_rate=SAMPLE_RATE_HZ,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )
    expected = audio_utils.spectrogram(
        x,
        audio_utils.window_function(WINDOW, "povey", periodic=False),
        frame_length=WINDOW,
        hop_length=SHIFT,
        fft_length=FFT_SIZE,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=filters,
        log_mel="log",
        mel_floor=float(np.finfo(np.float32).eps),
        remove_dc_offset=True,
    ).T
    got = kaldi_fbank(torch.from_numpy(x)).numpy()
    # transformers keeps its filters in float32, hence 1e-5 rather than float64 precision.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560, 561, 16000, 16001])
def test_frame_count_snips_edges(num_samples: int) -> None:
    expected = 1 + (num_samples - 400) // 160
    assert num_frames(num_samples) == expected
    assert kaldi_fbank(torch.zeros(num_samples)).shape == (expected, NUM_MEL)


def test_thirty_seconds_give_2998_frames() -> None:
    assert kaldi_fbank(torch.zeros(30 * SAMPLE_RATE_HZ)).shape == (2998, NUM_MEL)


def test_one_khz_tone_peaks_in_mel_bin_43() -> None:
    """1 kHz is FFT bin 32 exactly, at 1000.0 mel; filter 43 is centred at 989.6 mel and filter 44
    at 1011.4 mel (edges 31.75 + i * 21.77 mel), so 43's falling slope weighs it most."""
    x = 0.5 * PCM16 * np.sin(2 * np.pi * 1000.0 * _time_s(0.3))
    fbank = kaldi_fbank(torch.from_numpy(x).float())
    assert fbank.argmax(dim=1).tolist() == [43] * fbank.shape[0]


def test_silence_is_log_float32_eps() -> None:
    fbank = kaldi_fbank(torch.zeros(1000))
    torch.testing.assert_close(
        fbank, torch.full_like(fbank, math.log(np.finfo(np.float32).eps)), rtol=0, atol=1e-6
    )


def test_accepts_one_by_n_and_rejects_other_shapes() -> None:
    x = torch.from_numpy(_noise()).float()
    torch.testing.assert_close(kaldi_fbank(x[None]), kaldi_fbank(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N,\) or \(1, N\)"):
        kaldi_fbank(torch.zeros(2, 1000))


def test_shorter_than_one_frame_raises() -> None:
    with pytest.raises(ValueError, match="400 samples"):
        kaldi_fbank(torch.zeros(399))


def test_mel_banks_are_kaldi_triangles() -> None:
    banks = kaldi_mel_banks()
    assert banks.shape == (NUM_MEL, FFT_SIZE // 2 + 1)
    assert torch.all(banks[:, -1] == 0)  # Nyquist bin
    assert float(banks.max()) <= 1.0
    # The highest filter ends at Nyquist and the lowest starts at 20 Hz (FFT bin 0 is 0 Hz).
    assert torch.all(banks[:, 0] == 0)
    assert float(banks[-1, -2]) > 0
