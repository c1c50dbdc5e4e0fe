"""Per-frame spectral features shared by the sound detector and the speech/sound classifier.

For every frame the analyser looks at a causal window: the 32 ms (512 samples at 16 kHz)
ending with the frame, Hann-weighted. In two steps, so that the costly part runs only on
frames that are active at all:

:meth:`FrameAnalyzer.bands` (every frame)
    ``band_db``: mean power in ``N_BANDS`` log-spaced bands from 150 Hz to Nyquist (dB);
    ``energy_db``: mean square of the frame itself (dB, used to find quiet split points).

:meth:`FrameAnalyzer.voice` (active frames only)
    ``peak_fraction``: share of the 80 Hz+ energy within +-110 Hz of the strongest bin (near
    1 for a pure or dual tone, near 0 for noise);
    ``line_fraction``: the same within +-min(110 Hz, half the pitch) of it: the strongest
    line alone. A low voice (pitch 100 Hz) has its neighbouring harmonics within +-110 Hz of
    its strongest one, so its ``peak_fraction`` reads like a tone's (above 0.6 on about half
    of Piper joe's voiced frames) while ``line_fraction`` does not;
    ``harmonicity``: the highest normalised autocorrelation at lags of 2.5-12.5 ms, i.e. a
    pitch of 80-400 Hz (high for voiced speech and tones, low for noise and clicks);
    ``pitch_hz``: the pitch at that lag, refined by a parabola through its neighbours (so
    frame-to-frame changes well under one lag step show: a voice's pitch moves, a tone's
    does not);
    ``low_fraction``: share of the 80 Hz+ energy below 1 kHz.

A frame is *speech-like* when it is harmonic, much of its energy is low, and its strongest
line does not dominate (:meth:`VoiceFeatures.speech_like`). Some vowels are a single line
too (a high voice's /i/ can put 98 % of its energy in its first harmonic); the segmenter
counts those when their pitch glides (see `streaming.segmenter`). Distributions on generated
scenes and recordings are in ``docs/streaming.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

N_BANDS = 12
_LOW_BAND_HZ = 150.0
# +-110 Hz: a Hann main lobe plus a 20 Hz ringer warble, or both tones of a 440 + 480 Hz
# ring, but not two neighbouring harmonics of a voice.
_PEAK_HALF_WIDTH_HZ = 110.0
# Energies are floored at -100 dB (full scale = 0 dB) so digital silence stays finite.
_FLOOR_POWER = np.float32(1e-10)


@dataclass(frozen=True)
class BandFeatures:
    """Band energies of ``n`` consecutive frames.

    Attributes:
        band_db: ``(n, N_BANDS)`` band mean power, dB re full scale.
        energy_db: ``(n,)`` frame mean square, dB re full scale.
        windows: ``(n, window_samples)`` the Hann-weighted analysis windows (for
            :meth:`FrameAnalyzer.voice`).
    """

    band_db: FloatArray
    energy_db: FloatArray
    windows: FloatArray


@dataclass(frozen=True)
class VoiceFeatures:
    """Voice-versus-sound features of ``m`` frames (all arrays ``(m,)``).

    Attributes:
        peak_fraction: 0..1, tonal concentration (+-110 Hz around the strongest bin).
        harmonicity: -1..1, best normalised autocorrelation in the pitch range.
        low_fraction: 0..1, energy share below 1 kHz.
        line_fraction: 0..1, energy share of the strongest line alone (+-min(110 Hz,
            pitch / 2) around the strongest bin).
        pitch_hz: 80..400, the pitch of the best autocorrelation lag (sub-sample refined);
            meaningful where ``harmonicity`` is high.
    """

    peak_fraction: FloatArray
    harmonicity: FloatArray
    low_fraction: FloatArray
    line_fraction: FloatArray
    pitch_hz: FloatArray

    def harmonic(self, min_harmonicity: float = 0.5, min_low_fraction: float = 0.3) -> BoolArray:
        """Frames that are periodic in the voice's pitch range with much of their energy low
        (voiced speech, and also tones and many instruments)."""
        return (self.harmonicity >= min_harmonicity) & (self.low_fraction >= min_low_fraction)

    def speech_like(
        self,
        min_harmonicity: float = 0.5,
        max_peak_fraction: float = 0.6,
        min_low_fraction: float = 0.3,
    ) -> BoolArray:
        """Frames that look like voiced speech: harmonic, energy mostly low, and no single
        spectral line dominating (``line_fraction``).

        Args:
            min_harmonicity: Lowest pitch-range autocorrelation.
            max_peak_fraction: Highest share of the strongest line.
            min_low_fraction: Lowest share of energy below 1 kHz.

        Returns:
            ``(m,)`` booleans.
        """
        return self.harmonic(min_harmonicity, min_low_fraction) & (
            self.line_fraction <= max_peak_fraction
        )

    def tonal(self, min_peak_fraction: float = 0.6) -> BoolArray:
        """Frames dominated by one or two close tones (alarms, sirens, bells, ring tones; also
        about half the voiced frames of a low voice, see the module docstring)."""
        return self.peak_fraction > min_peak_fraction

    def line(self, min_line_fraction: float = 0.6) -> BoolArray:
        """Frames dominated by their strongest line alone."""
        return self.line_fraction > min_line_fraction


class FrameAnalyzer:
    """Computes features for consecutive frames of one stream.

    Args:
        frame_samples: Samples per frame (at most ``window_ms`` long).
        sample_rate_hz: Stream rate in Hz.
        window_ms: Causal analysis window per frame, in ms.

    The analyser keeps the samples before the next frame between calls, so results do not
    depend on how frames are batched.
    """

    def __init__(self, frame_samples: int, sample_rate_hz: int, window_ms: float = 32.0) -> None:
        self.frame_samples = frame_samples
        self.sample_rate_hz = sample_rate_hz
        self.window_samples = max(frame_samples, int(sample_rate_hz * window_ms / 1000))
        self.band_fft = 1 << (self.window_samples - 1).bit_length()
        self.voice_fft = 2 * self.band_fft  # zero padding: linear autocorrelation, finer bins
        self._hann = np.hanning(self.window_samples).astype(np.float32)
        # Bands are contiguous bin ranges of the band FFT: reduceat over their start bins.
        freqs = np.fft.rfftfreq(self.band_fft, 1.0 / sample_rate_hz)
        edges_hz = np.geomspace(_LOW_BAND_HZ, sample_rate_hz / 2, N_BANDS + 1)
        starts = np.searchsorted(freqs, edges_hz[:-1])
        starts = np.maximum.accumulate(np.maximum(starts, np.arange(N_BANDS) + starts[0]))
        self._band_starts = starts.astype(np.intp)
        self._band_sizes = np.diff(np.append(starts, freqs.size)).astype(np.float32)
        #: FFT bins per band (few bins: a noisier energy estimate).
        self.band_bins: tuple[int, ...] = tuple(int(b) for b in self._band_sizes)
        voice_freqs = np.fft.rfftfreq(self.voice_fft, 1.0 / sample_rate_hz)
        self._first_80 = int(np.searchsorted(voice_freqs, 80.0))
        self._first_1k = int(np.searchsorted(voice_freqs, 1000.0))
        bin_hz = sample_rate_hz / self.voice_fft
        self._voice_bin_hz = bin_hz
        self._peak_half_bins = max(1, round(_PEAK_HALF_WIDTH_HZ / bin_hz))
        self._min_lag = int(sample_rate_hz / 400)
        self._max_lag = min(int(sample_rate_hz / 80), self.window_samples // 2)
        # Autocorrelation of the window itself: dividing by it undoes the taper's decay with lag
        # (Boersma 1993), so a periodic signal scores near 1 at its period.
        window_power = np.abs(np.fft.rfft(self._hann, self.voice_fft)) ** 2
        window_ac = np.fft.irfft(window_power, self.voice_fft)[: self._max_lag + 1]
        self._window_ac = (window_ac / window_ac[0]).astype(np.float32)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next frame's window starts with zeros)."""
        self._tail = np.zeros(self.window_samples - self.frame_samples, np.float32)

    def bands(self, frames: FloatArray) -> BandFeatures:
        """Band and frame energies for ``frames`` (``(n, frame_samples)``), continuing the stream.

        Args:
            frames: Consecutive frames, float32.

        Returns:
            The frames' band features.
        """
        n = frames.shape[0]
        flat = np.concatenate([self._tail, frames.reshape(-1)])
        if self._tail.size:
            self._tail = flat[flat.size - self._tail.size :].copy()
        windows = (
            sliding_window_view(flat, self.window_samples)[:: self.frame_samples][:n] * self._hann
        )
        spectrum = np.fft.rfft(windows, self.band_fft, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        band = np.add.reduceat(power, self._band_starts, axis=1) / self._band_sizes
        band_db = 10.0 * np.log10(band / np.float32(self.window_samples) + _FLOOR_POWER)
        energy = np.einsum("ij,ij->i", frames, frames) / np.float32(self.frame_samples)
        energy_db = 10.0 * np.log10(energy + _FLOOR_POWER)
        return BandFeatures(band_db.astype(np.float32), energy_db.astype(np.float32), windows)

    def voice(self, windows: FloatArray) -> VoiceFeatures:
        """Voice features of some analysis windows (rows of :attr:`BandFeatures.windows`).

        Args:
            windows: ``(m, window_samples)`` Hann-weighted windows.

        Returns:
            Their voice features.
        """
        m = windows.shape[0]
        if m == 0:
            empty = np.zeros(0, np.float32)
            return VoiceFeatures(empty, empty, empty, empty, empty)
        spectrum = np.fft.rfft(windows, self.voice_fft, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        upper = power[:, self._first_80 :]
        total = upper.sum(axis=1) + _FLOOR_POWER
        peak = upper.argmax(axis=1)
        offsets = np.arange(-self._peak_half_bins, self._peak_half_bins + 1)
        around = np.clip(peak[:, None] + offsets[None, :], 0, upper.shape[1] - 1)
        # Clipping repeats edge bins; count each bin once.
        around_unique = np.where(np.diff(around, axis=1, prepend=-1) > 0, around, -1)
        rows = np.arange(m)[:, None]
        peak_energy = np.where(around_unique >= 0, upper[rows, np.maximum(around_unique, 0)], 0)
        peak_fraction = peak_energy.sum(axis=1) / total
        low_fraction = upper[:, : self._first_1k - self._first_80].sum(axis=1) / total
        autocorr = np.fft.irfft(power, self.voice_fft, axis=1)[:, : self._max_lag + 1]
        normalised = autocorr[:, self._min_lag :] / (autocorr[:, :1] + _FLOOR_POWER)
        corrected = normalised / self._window_ac[self._min_lag :]
        best = corrected.argmax(axis=1)
        harmonicity = corrected[np.arange(m), best]
        # Parabola through the best lag and its neighbours: the sub-sample lag.
        centre = np.clip(best, 1, corrected.shape[1] - 2)
        y0, y1, y2 = (corrected[np.arange(m), centre + k] for k in (-1, 0, 1))
        curvature = y0 - 2 * y1 + y2
        shift = np.where(
            curvature < 0, 0.5 * (y0 - y2) / np.where(curvature < 0, curvature, -1.0), 0.0
        )
        lag = centre + self._min_lag + np.clip(shift, -0.5, 0.5)
        pitch_hz = self.sample_rate_hz / lag
        # The strongest line alone: no wider than half the pitch, so a neighbouring harmonic
        # (one pitch away) stays outside.
        half = np.minimum(self._peak_half_bins, np.floor(0.5 * pitch_hz / self._voice_bin_hz))
        in_line = np.abs(offsets)[None, :] <= half[:, None]
        line_fraction = np.where(in_line, peak_energy, 0).sum(axis=1) / total
        return VoiceFeatures(
            peak_fraction.astype(np.float32),
            harmonicity.astype(np.float32),
            low_fraction.astype(np.float32),
            line_fraction.astype(np.float32),
            pitch_hz.astype(np.float32),
        )
