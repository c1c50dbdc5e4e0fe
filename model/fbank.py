"""Kaldi-compatible log mel filter bank in plain torch (BEATs' front end).

BEATs computes its input with ``torchaudio.compliance.kaldi.fbank``; torchaudio cannot be installed
next to the CPU torch build we use, so this module re-implements the subset of that function the
official call exercises, with the same defaults:

- frames of ``frame_length_ms`` every ``frame_shift_ms``, ``snip_edges=True``: only whole frames,
  the first starting at sample 0, so ``frames = 1 + (N - window) // shift``;
- no dither; per-frame DC offset removal; pre-emphasis 0.97 whose first sample uses itself as its
  predecessor (Kaldi's convention); the Povey window ``hann(periodic=False) ** 0.85``;
- zero-padding to the next power of two (400 -> 512 samples), power spectrum ``|rfft|**2``;
- ``num_mel_bins`` triangles between 20 Hz and Nyquist, triangular on the Kaldi mel scale
  ``1127 ln(1 + f / 700)``, the Nyquist FFT bin weighted 0;
- natural log of ``max(energy, float32 eps)``; no energy column, no mean subtraction.
"""

from __future__ import annotations

import functools
import math

import torch

from model.audio import SAMPLE_RATE_HZ

__all__ = ["kaldi_fbank", "kaldi_mel_banks", "num_frames"]

# Kaldi's fixed defaults that BEATs inherits (not parameters of the official call).
_PREEMPHASIS = 0.97
_POVEY_EXPONENT = 0.85
_LOW_FREQ_HZ = 20.0
# Kaldi floors energies at std::numeric_limits<float>::epsilon() before the log, whatever the dtype.
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def _window_sizes(
    sample_frequency_hz: float, frame_length_ms: float, frame_shift_ms: float
) -> tuple[int, int]:
    """Frame length and shift in samples, truncated as torchaudio does (not rounded)."""
    window_samples = int(sample_frequency_hz * frame_length_ms * 0.001)
    shift_samples = int(sample_frequency_hz * frame_shift_ms * 0.001)
    return window_samples, shift_samples


def num_frames(
    num_samples: int,
    sample_frequency_hz: float = float(SAMPLE_RATE_HZ),
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Number of frames `kaldi_fbank` returns for ``num_samples`` (``snip_edges=True``).

    Returns 0 when the input is shorter than one frame (``kaldi_fbank`` raises in that case).
    """
    window_samples, shift_samples = _window_sizes(
        sample_frequency_hz, frame_length_ms, frame_shift_ms
    )
    if num_samples < window_samples:
        return 0
    return 1 + (num_samples - window_samples) // shift_samples


def _kaldi_mel(freq_hz: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale, 1127 ln(1 + f/700) (natural log, not HTK's 2595 log10)."""
    if isinstance(freq_hz, torch.Tensor):
        return 1127.0 * torch.log1p(freq_hz / 700.0)
    return 1127.0 * math.log1p(freq_hz / 700.0)


@functools.lru_cache(maxsize=8)
def _mel_banks_float64(
    num_mel_bins: int, padded_window_samples: int, sample_frequency_hz: float
) -> torch.Tensor:
    # Computed once per geometry in float64 (torchaudio uses float32; the difference is rounding).
    # Callers must not modify the cached tensor in place: `kaldi_mel_banks` hands out copies.
    num_fft_bins = padded_window_samples // 2
    nyquist_hz = 0.5 * sample_frequency_hz
    mel_low = _kaldi_mel(_LOW_FREQ_HZ)
    mel_high = _kaldi_mel(nyquist_hz)
    assert isinstance(mel_low, float) and isinstance(mel_high, float)
    # num_mel_bins triangles need num_mel_bins + 2 equally spaced mel edge points.
    mel_step = (mel_high - mel_low) / (num_mel_bins + 1)
    edges = mel_low + mel_step * torch.arange(num_mel_bins + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each

    fft_bin_width_hz = sample_frequency_hz / padded_window_samples
    bin_mel = _kaldi_mel(fft_bin_width_hz * torch.arange(num_fft_bins, dtype=torch.float64))
    assert isinstance(bin_mel, torch.Tensor)
    rising = (bin_mel - left) / (center - left)  # (M, num_fft_bins)
    falling = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    # Kaldi's filters span FFT bins 0..n/2-1; the Nyquist bin (index n/2) gets weight 0.
    return torch.nn.functional.pad(banks, (0, 1))  # (M, num_fft_bins + 1)


def kaldi_mel_banks(
    num_mel_bins: int = 128,
    padded_window_samples: int = 512,
    sample_frequency_hz: float = float(SAMPLE_RATE_HZ),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Kaldi's triangular mel filters.

    Args:
        num_mel_bins: number of filters M.
        padded_window_samples: FFT size n (a power of two).
        sample_frequency_hz: sampling rate; the filters span 20 Hz to its half.
        dtype: dtype of the returned tensor.

    Returns:
        Tensor (M, n/2 + 1): filter weights over the rfft bins; the last column (Nyquist) is 0.
    """
    return _mel_banks_float64(num_mel_bins, padded_window_samples, float(sample_frequency_hz)).to(
        dtype=dtype, copy=True
    )


def kaldi_fbank(
    waveform: torch.Tensor,
    num_mel_bins: int = 128,
    sample_frequency_hz: float = float(SAMPLE_RATE_HZ),
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """Log mel filter bank as ``torchaudio.compliance.kaldi.fbank`` computes it with its defaults.

    The scale of ``waveform`` is kept: BEATs passes 16-bit-range samples (``wav * 2**15``), and the
    float32-epsilon floor before the log is absolute, so the scale changes the result.

    Args:
        waveform: Tensor (N,) or (1, N), mono samples (float; other dtypes are cast to float32).
        num_mel_bins: number of mel filters M.
        sample_frequency_hz: sampling rate of ``waveform``.
        frame_length_ms: analysis window length (25 ms = 400 samples at 16 kHz).
        frame_shift_ms: hop between frames (10 ms = 160 samples at 16 kHz).

    Returns:
        Tensor (1 + (N - window) // shift, M): natural-log mel energies, in ``waveform``'s dtype
        (float32 for non-float input), on its device.

    Raises:
        ValueError: ``waveform`` is not 1-D or (1, N), or is shorter than one frame.
    """
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(
            "kaldi_fbank expects a mono waveform of shape (N,) or (1, N), "
            f"got {tuple(waveform.shape)}"
        )
    if not waveform.is_floating_point():
        waveform = waveform.to(torch.float32)
    window_samples, shift_samples = _window_sizes(
        sample_frequency_hz, frame_length_ms, frame_shift_ms
    )
    if waveform.numel() < window_samples:
        raise ValueError(
            f"kaldi_fbank needs at least one {frame_length_ms} ms frame "
            f"({window_samples} samples), got {waveform.numel()} samples; pad the audio first"
        )
    padded_window_samples = 1 << (window_samples - 1).bit_length()  # next power of two

    frames = waveform.unfold(0, window_samples, shift_samples)  # (F, window) view, snip_edges
    frames = frames - frames.mean(dim=1, keepdim=True)  # DC offset removal, per frame
    # Pre-emphasis x[i] - 0.97 x[i-1] inside each frame; Kaldi uses x[0] as its own predecessor
    # (moot in practice: the Povey window's first tap is 0).
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - _PREEMPHASIS * previous
    window = torch.hann_window(
        window_samples, periodic=False, dtype=frames.dtype, device=frames.device
    ).pow(_POVEY_EXPONENT)
    frames = frames * window

    spectrum = torch.fft.rfft(frames, n=padded_window_samples, dim=1)  # zero-pads on the right
    power = spectrum.real.square() + spectrum.imag.square()  # (F, n/2 + 1)

    banks = kaldi_mel_banks(
        num_mel_bins, padded_window_samples, sample_frequency_hz, dtype=power.dtype
    ).to(power.device)
    mel_energies = power @ banks.T  # (F, M)
    return torch.clamp(mel_energies, min=_LOG_FLOOR).log()
