"""Silero VAD backend: the model file shipped inside the ``silero-vad`` package, run with torch.

This is the only module in ``streaming/`` that imports torch, and it does so lazily in
:class:`SileroVadDetector`'s constructor. The TorchScript file is located through
``importlib.util.find_spec`` *without importing the package*: ``silero_vad/__init__`` calls
``torch.set_num_threads(1)`` at import time, which would change the whole process. Nothing is
downloaded; torchaudio is not needed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streaming.errors import StreamingError, UnsupportedRateError
from streaming.pcm import SAMPLE_RATE_HZ

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

#: Silero VAD v5 takes exactly 512 samples per call at 16 kHz.
SILERO_FRAME_SAMPLES = 512


class SileroLoadError(StreamingError):
    """The silero-vad package or its model file is missing or cannot be loaded."""


def silero_model_path() -> Path:
    """Path of the TorchScript model shipped in the installed ``silero-vad`` package.

    Raises:
        SileroLoadError: Package not installed or file missing.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise SileroLoadError("silero-vad is not installed; pip install silero-vad")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "silero_vad.jit"
        if path.is_file():
            return path
    raise SileroLoadError("silero-vad is installed but data/silero_vad.jit is missing")


class SileroVadDetector:
    """Silero VAD on 512-sample frames at 16 kHz, with probability hysteresis.

    A frame is speech when its probability is at least ``threshold``, or when the previous
    frame was speech and the probability is at least ``neg_threshold``.

    Args:
        threshold: Speech probability that turns speech on (0..1).
        neg_threshold: Probability below which speech turns off; default ``threshold - 0.15``.
        sample_rate_hz: Must be 16000.
        num_threads: torch intra-op threads for this model (None: leave torch's setting).

    Raises:
        UnsupportedRateError: Any rate other than 16 kHz.
        SileroLoadError: Model missing or not loadable.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        sample_rate_hz: int = SAMPLE_RATE_HZ,
        num_threads: int | None = None,
    ) -> None:
        if sample_rate_hz != SAMPLE_RATE_HZ:
            raise UnsupportedRateError(
                f"the Silero backend runs at {SAMPLE_RATE_HZ} Hz, got {sample_rate_hz} Hz;"
                " resample first"
            )
        if not 0.0 < threshold < 1.0:
            raise StreamingError(f"silero threshold must be in (0, 1), got {threshold}")
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._torch: Any = torch
        path = silero_model_path()
        try:
            # torch.jit.load carries no annotations in torch 2.x.
            self._model: Any = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        except (RuntimeError, OSError) as exc:
            raise SileroLoadError(f"cannot load Silero model {path}: {exc}") from exc
        self._model.eval()
        self.threshold = threshold
        self.neg_threshold = max(0.01, threshold - 0.15) if neg_threshold is None else neg_threshold
        self.frame_samples = SILERO_FRAME_SAMPLES
        self.sample_rate_hz = sample_rate_hz
        logger.debug("loaded Silero VAD from %s", path)
        self.reset()

    def reset(self) -> None:
        """Reset the model's recurrent state and the hysteresis."""
        self._model.reset_states()
        self._speaking = False

    def probabilities(self, frames: FloatArray) -> FloatArray:
        """Speech probability per 512-sample frame (the model is stateful: frames in order).

        Args:
            frames: ``(n, 512)`` float32.

        Returns:
            ``(n,)`` probabilities in 0..1.
        """
        torch = self._torch
        out = np.empty(frames.shape[0], np.float32)
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
            for i in range(frames.shape[0]):
                out[i] = float(self._model(tensor[i : i + 1], self.sample_rate_hz))
        return out

    def classify(self, frames: FloatArray) -> BoolArray:
        """Speech decision per frame, with hysteresis between the two thresholds."""
        probs = self.probabilities(frames)
        decisions = np.zeros(probs.size, np.bool_)
        speaking = self._speaking
        for i, p in enumerate(probs):
            speaking = p >= (self.neg_threshold if speaking else self.threshold)
            decisions[i] = speaking
        self._speaking = bool(speaking)
        return decisions
