"""The pipeline's audio format: one sample rate, and integer PCM to float32.

Everything downstream of capture runs at `SAMPLE_RATE_HZ`, mono float32 in [-1, 1]. The agent,
the training room and the benchmarks take the rate from here; `model.audio.SAMPLE_RATE_HZ` is
the models' own copy of the same value (``model/`` and ``streaming/`` import nothing of each
other, and tests/test_architecture.py keeps it so).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from streaming.errors import AudioInputError

FloatArray = npt.NDArray[np.float32]

SAMPLE_RATE_HZ = 16_000
"""The rate of everything downstream of the resampler, and the models' input rate."""

_S16LE: np.dtype[np.int16] = np.dtype("<i2")
_F32LE: np.dtype[np.float32] = np.dtype("<f4")
#: Raw interleaved PCM the sources and the agent's `/audio` accept, by name.
PCM_FORMATS: dict[str, np.dtype[np.int16] | np.dtype[np.float32]] = {
    "s16le": _S16LE,
    "f32le": _F32LE,
}

_INT16_FULL_SCALE = np.float32(32768.0)


def int16_to_float32(samples: npt.NDArray[np.int16]) -> FloatArray:
    """Scale 16-bit PCM to float32 in [-1, 1): divided by 32768, so -32768 becomes -1.0.

    Args:
        samples: int16 samples of any shape and byte order.

    Returns:
        A new float32 array of the same shape.
    """
    return samples.astype(np.float32) / _INT16_FULL_SCALE


def decode_pcm(data: bytes, sample_format: str, channels: int) -> FloatArray:
    """Interleaved raw PCM to mono float32 in [-1, 1].

    Args:
        data: Whole frames of ``channels`` samples each, little-endian.
        sample_format: A key of `PCM_FORMATS`: ``"s16le"`` is scaled by `int16_to_float32`,
            ``"f32le"`` is clipped to [-1, 1] (beyond full scale a mean of channels could
            overflow to inf).
        channels: Interleaved channels, **averaged** to mono.

    Returns:
        ``(len(data) // (itemsize * channels),)`` float32 samples.

    Raises:
        AudioInputError: ``f32le`` data holding NaN or infinite samples (the message is
            "NaN or infinite samples"; callers name the source).
        KeyError: an unknown ``sample_format`` (callers validate it against `PCM_FORMATS`).
    """
    if PCM_FORMATS[sample_format] is _F32LE:
        floats = np.frombuffer(data, _F32LE).reshape(-1, channels).astype(np.float32)
        if not np.isfinite(floats).all():
            raise AudioInputError("NaN or infinite samples")
        np.clip(floats, -1.0, 1.0, out=floats)
    else:
        floats = int16_to_float32(np.frombuffer(data, _S16LE).reshape(-1, channels))
    return floats.mean(axis=1, dtype=np.float32) if channels > 1 else floats[:, 0]
