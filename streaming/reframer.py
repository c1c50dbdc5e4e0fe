"""Exact framing: any chunk sizes in, fixed-size frames out (the one framing boundary).

Every detector downstream needs frames of one exact size (webrtcvad: 10/20/30 ms of 16-bit PCM;
Silero: 512 samples at 16 kHz). :class:`Reframer` is the single place that cuts a stream of
arbitrarily sized chunks into such frames and keeps the remainder for the next push.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from streaming.errors import StreamingError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


class Reframer:
    """Cut a stream of 1-D float32 chunks into consecutive frames of ``frame_samples``.

    Args:
        frame_samples: Samples per output frame (> 0).
        hop_samples: Samples between frame starts; defaults to ``frame_samples`` (no overlap).
            Must be in ``1 .. frame_samples``.

    Raises:
        StreamingError: For a non-positive frame size or an out-of-range hop.

    Frame ``i`` covers stream samples ``[i * hop_samples, i * hop_samples + frame_samples)``;
    :attr:`frames_emitted` counts frames so far, so callers can recover each frame's offset.
    """

    def __init__(self, frame_samples: int, hop_samples: int | None = None) -> None:
        if frame_samples <= 0:
            raise StreamingError(f"frame_samples must be > 0, got {frame_samples}")
        hop = frame_samples if hop_samples is None else hop_samples
        if not 0 < hop <= frame_samples:
            raise StreamingError(f"hop_samples must be in 1..{frame_samples}, got {hop}")
        self.frame_samples = frame_samples
        self.hop_samples = hop
        self.reset()

    def reset(self) -> None:
        """Drop buffered samples and restart frame numbering at zero."""
        self._pending: FloatArray = np.zeros(0, np.float32)
        self.frames_emitted = 0
        self.samples_pushed = 0

    @property
    def pending_samples(self) -> int:
        """Samples buffered but not yet emitted in a frame."""
        return int(self._pending.size)

    def next_frame_start_sample(self) -> int:
        """Stream offset (samples) of the next frame to be emitted."""
        return self.frames_emitted * self.hop_samples

    def push(self, chunk: npt.ArrayLike) -> FloatArray:
        """Add samples; return every complete frame.

        Args:
            chunk: 1-D samples of any length (converted to float32).

        Returns:
            Array of shape ``(n_frames, frame_samples)``, possibly ``n_frames == 0``. The rows
            are copies, safe to keep.

        Raises:
            StreamingError: If ``chunk`` is not 1-D.
        """
        samples = np.asarray(chunk, dtype=np.float32)
        if samples.ndim != 1:
            raise StreamingError(f"expected a 1-D chunk, got shape {samples.shape}")
        self.samples_pushed += samples.size
        pending = np.concatenate([self._pending, samples]) if self._pending.size else samples
        if pending.size < self.frame_samples:
            self._pending = pending.copy() if pending is samples else pending
            return np.zeros((0, self.frame_samples), np.float32)
        n_frames = (pending.size - self.frame_samples) // self.hop_samples + 1
        if self.hop_samples == self.frame_samples:
            frames = pending[: n_frames * self.frame_samples].reshape(n_frames, -1).copy()
        else:
            starts = np.arange(n_frames) * self.hop_samples
            frames = pending[starts[:, None] + np.arange(self.frame_samples)[None, :]]
        self._pending = pending[n_frames * self.hop_samples :].copy()
        self.frames_emitted += n_frames
        return frames

    def flush(self, pad: bool = True) -> FloatArray:
        """End the stream: return the trailing partial frame, zero-padded, if any.

        Args:
            pad: If False, drop the partial frame instead of padding it.

        Returns:
            Array of shape ``(0 or 1, frame_samples)``. The reframer is then reset for reuse
            except that :attr:`frames_emitted` keeps counting.
        """
        tail = self._pending
        self._pending = np.zeros(0, np.float32)
        # With hop < frame, samples already inside the last frame's overlap are not "new".
        new_samples = self.samples_pushed - self.frames_emitted * self.hop_samples
        if not pad or tail.size == 0 or new_samples <= 0:
            return np.zeros((0, self.frame_samples), np.float32)
        frame = np.zeros((1, self.frame_samples), np.float32)
        frame[0, : tail.size] = tail
        self.frames_emitted += 1
        return frame
