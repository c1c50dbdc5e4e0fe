"""Frame-level detectors: is each frame speech (webrtcvad), is it sound above the noise floor.

Both are pure: fed exact frames (see :class:`streaming.reframer.Reframer`), they return one
boolean per frame and keep only their own small state. The segmenter turns these per-frame
decisions into segments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from streaming.errors import StreamingError, UnsupportedRateError
from streaming.pcm import SAMPLE_RATE_HZ

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

WEBRTC_RATES_HZ = (8000, 16000, 32000, 48000)
WEBRTC_FRAME_MS = (10, 20, 30)


class SpeechDetector(Protocol):
    """A voice-activity detector over fixed frames."""

    #: Samples per frame the detector accepts.
    frame_samples: int

    def classify(self, frames: FloatArray) -> BoolArray:
        """Return one speech decision per row of ``frames`` (shape ``(n, frame_samples)``)."""
        ...

    def reset(self) -> None:
        """Forget stream state."""
        ...


class WebrtcVadDetector:
    """webrtcvad (the WebRTC GMM VAD) on 10, 20 or 30 ms frames of 16-bit PCM.

    Args:
        aggressiveness: 0 (keeps most speech) to 3 (rejects most non-speech).
        frame_ms: 10, 20 or 30.
        sample_rate_hz: 8000, 16000, 32000 or 48000.

    Raises:
        StreamingError: Aggressiveness or frame length out of range.
        UnsupportedRateError: A rate webrtcvad does not support.
    """

    def __init__(
        self, aggressiveness: int = 2, frame_ms: int = 20, sample_rate_hz: int = SAMPLE_RATE_HZ
    ) -> None:
        import webrtcvad  # small C extension; imported here so the module imports without it

        if aggressiveness not in (0, 1, 2, 3):
            raise StreamingError(f"webrtcvad aggressiveness must be 0-3, got {aggressiveness}")
        if frame_ms not in WEBRTC_FRAME_MS:
            raise StreamingError(f"webrtcvad frame_ms must be 10, 20 or 30, got {frame_ms}")
        if sample_rate_hz not in WEBRTC_RATES_HZ:
            raise UnsupportedRateError(
                f"webrtcvad supports {WEBRTC_RATES_HZ} Hz, got {sample_rate_hz} Hz; resample first"
            )
        self.aggressiveness = aggressiveness
        self.sample_rate_hz = sample_rate_hz
        self.frame_samples = sample_rate_hz * frame_ms // 1000
        self._vad = webrtcvad.Vad(aggressiveness)

    def classify(self, frames: FloatArray) -> BoolArray:
        """Return one webrtcvad decision per frame.

        Args:
            frames: ``(n, frame_samples)`` float32 in [-1, 1].

        Returns:
            ``(n,)`` booleans.
        """
        pcm = (np.clip(frames, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
        data = pcm.tobytes()
        step = self.frame_samples * 2
        is_speech = self._vad.is_speech
        rate = self.sample_rate_hz
        return np.fromiter(
            (is_speech(data[i : i + step], rate) for i in range(0, len(data), step)),
            dtype=np.bool_,
            count=frames.shape[0],
        )

    def reset(self) -> None:
        """webrtcvad keeps no state between frames that matters here; a fresh one is made."""
        import webrtcvad

        self._vad = webrtcvad.Vad(self.aggressiveness)


class SoundActivityDetector:
    """Sound above an adaptive noise floor, by band energy and spectral flux.

    Band energies (dB) are smoothed over two frames. Per band, the noise floor adapts as follows
    (all falls are capped at ``max_fall_db_per_s``):

    - during the first ``warmup_s`` it tracks within 50 ms, so the stream's initial background
      becomes the floor;
    - while the detector is *active* it moves only with ``active_rise_s`` (both ways): a sound
      neither becomes the floor quickly nor drags it down (a codec that zeroes the bands a
      loud beep masks must not lower the floor under them);
    - while *idle* it follows the bands with a time constant of ``track_s``, and falls within
      ``fall_s`` when the *whole frame* is more than ``fall_margin_db`` below it (a noise
      source stopped), never faster than ``max_fall_db_per_s``;
    - a frame with no signal at all (every band below ``no_signal_db``: digital zeros, a
      dropout, a muted input) leaves it unchanged: it says nothing about the room.

    So steady hum or a dishwasher becomes the floor, while an alarm or a knock stands out, and
    a short dropout in steady noise does not make the noise's return look like a new sound.

    A frame is active when the mean of its ``top_bands`` largest band excesses over the floor
    is at least ``on_db``, or when its spectral flux (mean positive rise of the band energies
    over the previous frame) is at least ``flux_db`` and the excess at least ``on_db / 2``.

    Args:
        frame_ms: Frame duration in ms (for the time constants).
        on_db: Excess over the floor that makes a frame active, in dB.
        flux_db: Onset strength that makes a frame active at half the excess, in dB.
        top_bands: How many of the loudest band excesses are averaged.
        track_s: Floor time constant while inactive, in s.
        fall_s: Floor time constant while idle and the whole frame is more than
            ``fall_margin_db`` below it, in s.
        fall_margin_db: Drop below the floor that counts as a quieter background, in dB.
        max_fall_db_per_s: Fastest fall of the floor, in dB/s (a longer fade or a background
            that stops takes a few seconds to become the floor).
        no_signal_db: Band energy (dB re full scale) below which every band of a frame must lie
            for it to count as no signal (16-bit quantisation noise is about -95 dB).
        active_rise_s: Floor time constant while active, in s.
        warmup_s: Initial period of fast tracking, in s (events in it may be missed).
        band_bins: FFT bins per band. A band estimated from few bins fluctuates more (the log
            of a chi-square power estimate has a standard deviation of about
            ``5.6 / sqrt(bins)`` dB), so its excess is reduced by ``margin_sigmas`` times that.
            None: no reduction.
        margin_sigmas: See ``band_bins``.
    """

    def __init__(
        self,
        frame_ms: float,
        on_db: float = 9.0,
        flux_db: float = 4.0,
        top_bands: int = 3,
        track_s: float = 1.0,
        fall_s: float = 0.1,
        fall_margin_db: float = 6.0,
        active_rise_s: float = 20.0,
        warmup_s: float = 0.5,
        max_fall_db_per_s: float = 10.0,
        no_signal_db: float = -90.0,
        band_bins: Sequence[int] | None = None,
        margin_sigmas: float = 1.5,
    ) -> None:
        frame_s = frame_ms / 1000.0

        def alpha(tau_s: float) -> float:
            return 1.0 - float(np.exp(-frame_s / tau_s))

        self.on_db = on_db
        self.flux_db = flux_db
        self.top_bands = top_bands
        self.fall_margin_db = fall_margin_db
        self.no_signal_db = no_signal_db
        self._max_fall_db = max_fall_db_per_s * frame_s
        self._track = alpha(track_s)
        self._fall = alpha(fall_s)
        self._active_rise = alpha(active_rise_s)
        self._warmup_alpha = alpha(0.05)
        self._warmup_frames = round(warmup_s / frame_s)
        self._margins = (
            None
            if band_bins is None
            else [margin_sigmas * 5.6 / float(np.sqrt(max(1, b))) for b in band_bins]
        )
        self.reset()

    def reset(self) -> None:
        """Forget the noise floor (it restarts from the next frame's energy)."""
        self._floor: list[float] | None = None
        self._smoothed: list[float] | None = None
        self._frames = 0

    @property
    def floor_db(self) -> FloatArray | None:
        """A copy of the per-band noise floor in dB; None before the first frame."""
        return None if self._floor is None else np.asarray(self._floor, np.float32)

    def update(self, band_db: FloatArray) -> tuple[BoolArray, FloatArray]:
        """Decide each frame and adapt the floor.

        Args:
            band_db: ``(n, bands)`` band energies of consecutive frames, dB
                (:attr:`streaming.features.BandFeatures.band_db`).

        Returns:
            ``(active, excess_db)``: per-frame booleans and the top-band mean excess in dB.
        """
        n = band_db.shape[0]
        active = np.zeros(n, np.bool_)
        excess_out = np.zeros(n, np.float32)
        if n == 0:
            return active, excess_out
        rows = band_db.astype(np.float64).tolist()
        # Plain floats: for a dozen bands a Python loop beats per-frame numpy calls.
        floor = list(rows[0]) if self._floor is None else self._floor
        smoothed = list(rows[0]) if self._smoothed is None else self._smoothed
        k = self.top_bands
        margins = self._margins
        n_bands = len(floor)
        on_db, half_on, flux_min = self.on_db, self.on_db / 2, self.flux_db * n_bands
        margin = -self.fall_margin_db
        fall, track, active_rise = self._fall, self._track, self._active_rise
        max_fall, no_signal = -self._max_fall_db, self.no_signal_db
        warmup_alpha, warmup_left = self._warmup_alpha, self._warmup_frames - self._frames
        for i, row in enumerate(rows):
            flux = 0.0
            new_smoothed = []
            for previous, current in zip(smoothed, row, strict=True):
                value = 0.5 * (previous + current)
                if value > previous:
                    flux += value - previous
                new_smoothed.append(value)
            smoothed = new_smoothed
            excess = [v - f for v, f in zip(smoothed, floor, strict=True)]
            scored = (
                excess if margins is None else [e - m for e, m in zip(excess, margins, strict=True)]
            )
            top = sum(sorted(scored)[-k:]) / k
            is_active = top >= on_db or (flux >= flux_min and top >= half_on)
            if is_active:
                active[i] = True
            excess_out[i] = top
            if max(row) < no_signal:
                continue  # no signal: the floor holds
            if i < warmup_left:
                floor = [f + warmup_alpha * e for f, e in zip(floor, excess, strict=True)]
                continue
            # Active: slow both ways. Idle: fast fall only when the whole frame is quieter.
            rate = active_rise if is_active else fall if max(excess) < margin else track
            floor = [
                f + (step if (step := rate * e) > max_fall else max_fall)
                for f, e in zip(floor, excess, strict=True)
            ]
        self._frames += n
        self._floor, self._smoothed = floor, smoothed
        return active, excess_out
