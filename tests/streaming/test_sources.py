"""Tests for streaming/sources.py: file and raw-PCM streaming, and the mic hand-over path.

There is no capture device (and no PulseAudio) on the CI machine, so the microphone is tested
at its seam: the PortAudio callback -> call_soon_threadsafe -> bounded queue path, driven from
a real foreign thread, plus the clear error when no device exists.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from streaming.errors import AudioDeviceError, AudioInputError
from streaming.resample import resample
from streaming.sources import FileSource, MicSource, RawPcmSource, resolve_input_device


def _signal(rate_hz: int, seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(rate_hz * seconds))).astype(
        np.float32
    )


async def _collect(source) -> list:  # type: ignore[no-untyped-def]
    async with source:
        return [block async for block in source]


@pytest.mark.parametrize(
    ("rate_hz", "suffix"), [(16000, ".wav"), (44100, ".flac"), (48000, ".wav")]
)
async def test_file_source_streams_whole_file_in_order(
    tmp_path: Path, rate_hz: int, suffix: str
) -> None:
    audio = _signal(rate_hz, 1.3)
    path = tmp_path / f"a{suffix}"
    soundfile.write(path, np.stack([audio, audio], axis=1), rate_hz, subtype="PCM_24")
    blocks = await _collect(FileSource(path, block_ms=100))
    assert len(blocks) > 5
    assert [b.start_sample for b in blocks] == list(
        np.cumsum([0] + [b.samples.size for b in blocks[:-1]])
    )
    joined = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(joined, resample(audio, rate_hz), atol=2e-4)


async def test_file_source_realtime_pacing(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    soundfile.write(path, _signal(16000, 0.5), 16000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _collect(FileSource(path, block_ms=100, realtime=True))
    assert loop.time() - started >= 0.45  # 0.5 s of audio cannot arrive sooner


async def test_file_source_bad_file_raises(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="no such file"):
        await _collect(FileSource(tmp_path / "missing.wav"))


async def test_file_source_nan_raises(tmp_path: Path) -> None:
    audio = _signal(16000, 0.5)
    audio[4000] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    with pytest.raises(AudioInputError, match="NaN"):
        await _collect(FileSource(path))


@pytest.mark.parametrize(("fmt", "dtype"), [("s16le", "<i2"), ("f32le", "<f4")])
async def test_raw_pcm_source(fmt: str, dtype: str) -> None:
    audio = _signal(16000, 0.77)
    data = (audio * 32767).astype(dtype) if dtype == "<i2" else audio.astype(dtype)
    payload = data.tobytes() + b"\x01"  # a dangling byte is ignored with a warning
    blocks = await _collect(RawPcmSource(io.BytesIO(payload), 16000, 1, fmt, block_ms=50))
    joined = np.concatenate([b.samples for b in blocks])
    assert joined.size == audio.size
    np.testing.assert_allclose(joined, audio, atol=2e-4)


async def test_raw_pcm_stereo_8k_is_resampled() -> None:
    audio = _signal(8000, 0.5)
    stereo = np.stack([audio, audio], axis=1)
    payload = (stereo * 32767).astype("<i2").tobytes()
    blocks = await _collect(RawPcmSource(io.BytesIO(payload), 8000, 2))
    assert sum(b.samples.size for b in blocks) == 8000


def test_raw_pcm_bad_format() -> None:
    with pytest.raises(AudioInputError, match="format"):
        RawPcmSource(io.BytesIO(b""), sample_format="mp3")


def test_no_device_is_a_clear_error() -> None:
    from streaming.sources import list_input_devices

    if list_input_devices():
        pytest.skip("this machine has an input device")
    with pytest.raises(AudioDeviceError, match="no audio input device"):
        resolve_input_device(None)


async def test_mic_without_device_raises_on_enter() -> None:
    from streaming.sources import list_input_devices

    if list_input_devices():
        pytest.skip("this machine has an input device")
    with pytest.raises(AudioDeviceError):
        async with MicSource():
            pass


async def test_mic_callback_thread_hands_blocks_to_the_loop_in_order() -> None:
    mic = MicSource(queue_blocks=1000, block_ms=10)
    mic._prepare_without_device(48000)
    blocks_in = [np.full((480, 1), i / 1000, np.float32) for i in range(200)]

    def portaudio_thread() -> None:
        for block in blocks_in:
            mic._callback(block, 480, None, "")

    thread = threading.Thread(target=portaudio_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    received = []

    async def consume() -> None:
        async for block in mic:
            received.append(block)
            if sum(b.samples.size for b in received) >= 200 * 160 - 100:
                await mic.close()

    await asyncio.wait_for(consume(), timeout=10)
    assert mic.dropped_blocks == 0
    starts = [b.start_sample for b in received]
    assert starts == sorted(starts)


async def test_mic_queue_overflow_drops_oldest_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    mic = MicSource(queue_blocks=5)
    mic._prepare_without_device(16000)
    with caplog.at_level(logging.WARNING, logger="streaming.sources"):
        for i in range(12):
            mic.feed(np.full(320, i, np.float32), "input overflow" if i == 3 else "")
    assert mic.dropped_blocks == 7
    assert mic.status_flags == {"input overflow": 1}
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    await mic.close()
    values = [float(b.samples[0]) async for b in mic]
    assert values == [8.0, 9.0, 10.0, 11.0]  # newest kept (one slot given to the end marker)
