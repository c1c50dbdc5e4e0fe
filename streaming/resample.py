"""Sample-rate conversion to the pipeline rate: any rate, any channels, int or float in.

The converter is a rational polyphase resampler with a Kaiser-windowed sinc kernel, written in
numpy. For an input rate ``in_hz`` and an output rate ``out_hz`` it reduces ``out/in`` to
``up/down`` and computes output sample ``n`` at input time ``n * down / up`` (in input samples)
as a weighted sum of the ``2 * half_taps`` nearest input samples. The ``up`` kernel phases are
tabulated once in ``__init__``; every row is normalised to unit sum, so DC passes exactly.

The cut-off is ``rolloff * min(in_hz, out_hz) / 2``: when downsampling, everything above the new
Nyquist frequency is removed before it can alias.

Two entry points share one kernel:

- :func:`resample` converts a whole array at once (zero padding at both ends).
- :class:`StreamResampler` does the same chunk by chunk with ``push`` / ``flush`` / ``reset``;
  the concatenated output equals :func:`resample`'s output exactly (same length, same values up
  to float rounding), whatever the chunk sizes.

Channels are averaged to mono *before* resampling (see :func:`to_mono_float32`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from streaming.errors import AudioInputError
from streaming.pcm import SAMPLE_RATE_HZ, int16_to_float32

logger = logging.getLogger(__name__)

# Kernel design: zero crossings of the sinc on each side, Kaiser beta, pass-band fraction.
_ZERO_CROSSINGS = 16
_KAISER_BETA = 8.6
_ROLLOFF = 0.945
# Output samples computed per vectorised block (bounds the gather matrix to a few MB).
_BLOCK_OUTPUT_SAMPLES = 8192

FloatArray = npt.NDArray[np.float32]


def to_mono_float32(audio: npt.ArrayLike) -> FloatArray:
    """Convert PCM to mono float32 in [-1, 1).

    Args:
        audio: Samples, shape ``(samples,)`` or ``(samples, channels)``. Integer types are
            scaled by their full range (int16 by 32768, int32 by 2**31, uint8 centred on 128);
            float types are taken as already in [-1, 1].

    Returns:
        Mono float32 samples, shape ``(samples,)``. Several channels are **averaged** (not
        channel 0), so a source panned to one side is kept at half level rather than lost.

    Raises:
        AudioInputError: For an unsupported dtype or more than two dimensions.
    """
    array = np.asarray(audio)
    if array.ndim not in (1, 2):
        raise AudioInputError(
            f"expected audio of shape (samples,) or (samples, channels), got shape {array.shape}"
        )
    if array.dtype == np.int16:
        floats = int16_to_float32(array)
    elif array.dtype == np.int32:
        floats = (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif array.dtype == np.uint8:
        floats = (array.astype(np.float32) - np.float32(128.0)) / np.float32(128.0)
    elif array.dtype in (np.float32, np.float64):
        floats = array.astype(np.float32, copy=False)
    else:
        raise AudioInputError(
            f"unsupported sample type {array.dtype}; expected int16, int32, uint8, float32 or"
            " float64"
        )
    if floats.ndim == 2:
        if floats.shape[1] == 0:
            raise AudioInputError("audio has zero channels")
        floats = floats.mean(axis=1, dtype=np.float32) if floats.shape[1] > 1 else floats[:, 0]
    return np.ascontiguousarray(floats, dtype=np.float32)


class _PolyphaseKernel:
    """Tabulated windowed-sinc kernel for a fixed ``in_hz -> out_hz`` conversion.

    Attributes:
        up: Output-rate factor after reduction by the gcd.
        down: Input-rate factor after reduction by the gcd.
        half_taps: Input samples used on each side of an output instant.
        table: ``(up, 2 * half_taps)`` float32 weights; row ``p`` serves output instants whose
            fractional input position is ``p / up``.
    """

    def __init__(self, in_hz: int, out_hz: int) -> None:
        gcd = math.gcd(in_hz, out_hz)
        self.up = out_hz // gcd
        self.down = in_hz // gcd
        # Cut-off in cycles per input sample.
        cutoff = 0.5 * _ROLLOFF * min(1.0, out_hz / in_hz)
        half_width_in = _ZERO_CROSSINGS / (2.0 * cutoff)  # kernel half-length, input samples
        self.half_taps = max(1, math.ceil(half_width_in))
        taps = 2 * self.half_taps
        phases = np.arange(self.up, dtype=np.float64)[:, None] / self.up
        j = np.arange(taps, dtype=np.float64)[None, :]
        # Distance (input samples) from the output instant to tap j's input sample.
        t = phases + (self.half_taps - 1) - j
        window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (t / half_width_in) ** 2, 0.0, 1.0)))
        window /= np.i0(_KAISER_BETA)
        window[np.abs(t) > half_width_in] = 0.0
        kernel = 2.0 * cutoff * np.sinc(2.0 * cutoff * t) * window
        kernel /= kernel.sum(axis=1, keepdims=True)
        self.table: FloatArray = kernel.astype(np.float32)
        self._offsets = np.arange(taps, dtype=np.int64)

    def output_length(self, input_samples: int) -> int:
        """Number of output samples for ``input_samples`` inputs: ``ceil(n * up / down)``."""
        return -(-input_samples * self.up // self.down)

    def first_input(self, n: int) -> int:
        """Absolute input index of the first tap for output sample ``n``."""
        return (n * self.down) // self.up - (self.half_taps - 1)

    def apply(self, buffer: FloatArray, buffer_start: int, n_start: int, n_end: int) -> FloatArray:
        """Compute output samples ``n_start .. n_end - 1``.

        Args:
            buffer: Input samples; ``buffer[0]`` is absolute input index ``buffer_start``. It must
                cover every tap of the requested outputs (callers pad with zeros).
            buffer_start: Absolute input index of ``buffer[0]`` (negative inside left padding).
            n_start: First output index (absolute, on the output clock).
            n_end: One past the last output index.

        Returns:
            float32 array of ``n_end - n_start`` output samples.
        """
        out = np.empty(max(0, n_end - n_start), dtype=np.float32)
        for block_start in range(n_start, n_end, _BLOCK_OUTPUT_SAMPLES):
            block_end = min(n_end, block_start + _BLOCK_OUTPUT_SAMPLES)
            n = np.arange(block_start, block_end, dtype=np.int64)
            scaled = n * self.down
            phase = scaled % self.up
            first = scaled // self.up - (self.half_taps - 1) - buffer_start
            gathered = buffer[first[:, None] + self._offsets[None, :]]
            out[block_start - n_start : block_end - n_start] = np.einsum(
                "ij,ij->i", gathered, self.table[phase]
            )
        return out


def _check_rate(name: str, rate_hz: int) -> int:
    if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, np.integer)) or rate_hz <= 0:
        raise AudioInputError(f"{name} must be a positive integer in Hz, got {rate_hz!r}")
    return int(rate_hz)


def resample(
    audio: npt.ArrayLike,
    in_rate_hz: int,
    out_rate_hz: int = SAMPLE_RATE_HZ,
) -> FloatArray:
    """Convert a whole signal to mono float32 at ``out_rate_hz``.

    Args:
        audio: Samples, shape ``(samples,)`` or ``(samples, channels)``, int16/int32/uint8 or
            float32/float64 (see :func:`to_mono_float32`).
        in_rate_hz: Sample rate of ``audio`` in Hz.
        out_rate_hz: Wanted sample rate in Hz (default 16 kHz).

    Returns:
        Mono float32 samples at ``out_rate_hz``; length ``ceil(samples * out / in)``. Equal
        rates return the (downmixed) input unchanged.

    Raises:
        AudioInputError: For a non-positive rate or an unsupported array.
    """
    in_hz = _check_rate("in_rate_hz", in_rate_hz)
    out_hz = _check_rate("out_rate_hz", out_rate_hz)
    mono = to_mono_float32(audio)
    if in_hz == out_hz:
        return mono
    kernel = _PolyphaseKernel(in_hz, out_hz)
    n_out = kernel.output_length(mono.size)
    pad = kernel.half_taps + 1
    padded = np.concatenate(
        [np.zeros(pad, np.float32), mono, np.zeros(pad + kernel.half_taps, np.float32)]
    )
    return kernel.apply(padded, -pad, 0, n_out)


class StreamResampler:
    """Chunk-by-chunk version of :func:`resample` with the same output.

    Args:
        in_rate_hz: Sample rate of the pushed chunks in Hz.
        out_rate_hz: Output sample rate in Hz (default 16 kHz).

    Raises:
        AudioInputError: For a non-positive rate.

    Example:
        >>> rs = StreamResampler(44100)
        >>> parts = [rs.push(chunk) for chunk in chunks] + [rs.flush()]
        >>> audio_16k = np.concatenate(parts)

    The output lags the input by about ``half_taps`` input samples (the kernel's look-ahead,
    under 1 ms at 44.1 kHz -> 16 kHz); :meth:`flush` emits that tail.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int = SAMPLE_RATE_HZ) -> None:
        self.in_rate_hz = _check_rate("in_rate_hz", in_rate_hz)
        self.out_rate_hz = _check_rate("out_rate_hz", out_rate_hz)
        self._identity = self.in_rate_hz == self.out_rate_hz
        self._kernel = None if self._identity else _PolyphaseKernel(self.in_rate_hz, out_rate_hz)
        self.reset()

    @property
    def latency_samples(self) -> int:
        """Input samples held back for look-ahead (0 when the rates are equal)."""
        return 0 if self._kernel is None else self._kernel.half_taps + 1

    def reset(self) -> None:
        """Forget all pushed audio and restart the stream clock at zero."""
        self._input_samples = 0  # absolute count of input samples pushed
        self._next_output = 0  # absolute index of the next output sample
        self._flushed = False
        if self._kernel is None:
            self._buffer = np.zeros(0, np.float32)
            self._buffer_start = 0
        else:
            pad = self._kernel.half_taps + 1
            self._buffer = np.zeros(pad, np.float32)  # left zero padding
            self._buffer_start = -pad

    def push(self, chunk: npt.ArrayLike) -> FloatArray:
        """Add input samples and return every output sample that is now complete.

        Args:
            chunk: Samples at ``in_rate_hz``, shape ``(samples,)`` or ``(samples, channels)``;
                any length, including zero.

        Returns:
            Mono float32 samples at ``out_rate_hz`` (possibly empty).

        Raises:
            AudioInputError: If called after :meth:`flush` without :meth:`reset`, or for an
                unsupported array.
        """
        if self._flushed:
            raise AudioInputError("push() after flush(); call reset() to start a new stream")
        mono = to_mono_float32(chunk)
        self._input_samples += mono.size
        if self._kernel is None:
            return mono
        self._buffer = np.concatenate([self._buffer, mono])
        # Output n is ready once its last tap, first_input(n) + 2 * half_taps - 1, is present.
        last_available = self._input_samples - 1
        k = self._kernel
        # Largest n with floor(n * down / up) + half_taps <= last_available.
        limit = last_available - k.half_taps
        n_end = 0 if limit < 0 else (limit * k.up) // k.down + 1
        n_end = min(n_end, k.output_length(self._input_samples))
        return self._emit(n_end)

    def flush(self) -> FloatArray:
        """Return the remaining output samples (the look-ahead tail) and end the stream.

        Returns:
            Mono float32 samples; after this the stream's total output length is
            ``ceil(input_samples * out / in)``, exactly as :func:`resample`.
        """
        if self._flushed:
            return np.zeros(0, np.float32)
        self._flushed = True
        if self._kernel is None:
            return np.zeros(0, np.float32)
        k = self._kernel
        self._buffer = np.concatenate([self._buffer, np.zeros(2 * k.half_taps + 1, np.float32)])
        return self._emit(k.output_length(self._input_samples))

    def _emit(self, n_end: int) -> FloatArray:
        k = self._kernel
        assert k is not None  # only called on the resampling path
        if n_end <= self._next_output:
            return np.zeros(0, np.float32)
        out = k.apply(self._buffer, self._buffer_start, self._next_output, n_end)
        self._next_output = n_end
        # Drop input no later output will read.
        drop = k.first_input(n_end) - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start += drop
        return out
