"""Tests for streaming/reframer.py: exact frames for any chunking."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.errors import StreamingError
from streaming.reframer import Reframer


@pytest.mark.parametrize(
    ("frame", "hop", "chunks"),
    [
        (320, None, [320] * 5),
        (320, None, [1, 7, 1000, 3, 319, 321]),
        (480, None, [0, 0, 4800, 17]),
        (512, None, [100] * 37),
        (512, 256, [300, 700, 1]),
        (160, 80, [1] * 500),
    ],
)
def test_frames_are_exact_and_continuous(frame: int, hop: int | None, chunks: list[int]) -> None:
    signal = np.arange(sum(chunks), dtype=np.float32)
    reframer = Reframer(frame, hop)
    out, position = [], 0
    for n in chunks:
        frames = reframer.push(signal[position : position + n])
        assert frames.shape[1] == frame
        out.append(frames)
        position += n
    frames = np.concatenate(out)
    step = hop or frame
    expected_count = (signal.size - frame) // step + 1 if signal.size >= frame else 0
    assert frames.shape[0] == expected_count == reframer.frames_emitted
    for i, row in enumerate(frames):
        np.testing.assert_array_equal(row, signal[i * step : i * step + frame])


def test_flush_pads_partial_frame_once() -> None:
    reframer = Reframer(4)
    assert reframer.push(np.ones(6, np.float32)).shape == (1, 4)
    tail = reframer.flush()
    np.testing.assert_array_equal(tail, [[1, 1, 0, 0]])
    assert reframer.flush().shape == (0, 4)


def test_flush_without_pad_drops_partial() -> None:
    reframer = Reframer(4)
    reframer.push(np.ones(3, np.float32))
    assert reframer.flush(pad=False).shape == (0, 4)


def test_reset_restarts_numbering() -> None:
    reframer = Reframer(4)
    reframer.push(np.ones(10, np.float32))
    reframer.reset()
    assert reframer.frames_emitted == 0 and reframer.pending_samples == 0


@pytest.mark.parametrize(("frame", "hop"), [(0, None), (4, 0), (4, 5)])
def test_bad_sizes_raise(frame: int, hop: int | None) -> None:
    with pytest.raises(StreamingError):
        Reframer(frame, hop)


def test_two_dimensional_chunk_raises() -> None:
    with pytest.raises(StreamingError, match="1-D"):
        Reframer(4).push(np.zeros((4, 2), np.float32))
