"""Tests for streaming/silero.py: the shipped model loads without a hub and finds speech."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from streaming.errors import UnsupportedRateError
from streaming.silero import SileroVadDetector, silero_model_path
from training.scenes import SR, speak

from .conftest import requires_espeak

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)


def test_model_is_the_packaged_file_and_package_is_not_imported() -> None:
    path = silero_model_path()
    assert path.name == "silero_vad.jit" and path.is_file()
    SileroVadDetector()
    assert "silero_vad" not in sys.modules  # its __init__ would change torch's thread count


@requires_espeak
def test_speech_frames_are_detected_and_silence_is_not() -> None:
    detector = SileroVadDetector()
    clip = speak("hello robot, come here please")
    audio = np.concatenate([np.zeros(SR, np.float32), clip, np.zeros(SR, np.float32)])
    n = audio.size // 512
    decisions = detector.classify(audio[: n * 512].reshape(n, 512))
    speech_frames = slice(SR // 512 + 2, (SR + clip.size) // 512 - 2)
    assert decisions[speech_frames].mean() > 0.8
    assert not decisions[: SR // 512 - 1].any()


def test_wrong_rate_is_rejected() -> None:
    with pytest.raises(UnsupportedRateError):
        SileroVadDetector(sample_rate_hz=8000)
