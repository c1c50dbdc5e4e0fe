"""Tests for streaming/sources.py: file and raw-PCM streaming, the mic hand-over path, and
device selection.

These tests need no capture device: the microphone is tested at its seam (the PortAudio
callback -> call_soon_threadsafe -> bounded queue path, driven from a real foreign thread),
device selection against a faked sounddevice device list, plus the clear error when no device
exists. The real PortAudio path, through a virtual PulseAudio device the test starts itself,
is in test_mic_pulseaudio.py (skipped where PulseAudio is not installed).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from streaming import sources
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


async def test_mic_block_is_stamped_when_the_callback_received_it() -> None:
    mic = MicSource(queue_blocks=10)
    mic._prepare_without_device(16000)
    stamps: list[float] = []

    def portaudio_thread() -> None:
        stamps.append(time.monotonic())
        mic._callback(np.full((320, 1), 0.1, np.float32), 320, None, "")
        stamps.append(time.monotonic())

    thread = threading.Thread(target=portaudio_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    taken_at = time.monotonic()  # the consumer takes the block only now
    mic.feed(np.zeros(320, np.float32), "", captured_at=1234.5)  # a stamp passed through as is
    await mic.close()
    blocks = [block async for block in mic]
    assert len(blocks) == 2
    assert stamps[0] <= blocks[0].captured_at <= stamps[1] < taken_at
    assert blocks[1].captured_at == 1234.5


def _fake_sounddevice(devices: list[dict], default_input: int = -1) -> SimpleNamespace:
    return SimpleNamespace(
        query_devices=lambda: devices,
        query_hostapis=lambda: [{"name": "ALSA"}, {"name": "PulseAudio"}],
        default=SimpleNamespace(device=(default_input, -1)),
    )


def _device(name: str, inputs: int, hostapi: int = 0) -> dict:
    return {
        "name": name,
        "max_input_channels": inputs,
        "max_output_channels": 2,
        "default_samplerate": 48000.0,
        "hostapi": hostapi,
    }


_DEVICES = [
    _device("HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2),
    _device("HDMI 0 (hw:0,3)", 0),  # output only
    _device("USB Audio Mic (hw:1,0)", 1),
    _device("pulse", 32, hostapi=1),
    _device("default", 32, hostapi=1),
]


@pytest.mark.parametrize(
    ("wanted", "default_input", "index"),
    [
        (None, 4, 4),  # the default input
        (None, 1, 0),  # default is not an input: the first input
        (None, -1, 0),  # no default at all
        (2, -1, 2),
        ("2", -1, 2),  # an index given as text (a command-line argument)
        ("usb", -1, 2),  # a name fragment, case-insensitive
        ("USB AUDIO MIC", -1, 2),
        ("ALC3246", -1, 0),
        ("pulse", -1, 3),  # the first match
    ],
)
def test_resolve_input_device_by_name_or_index(
    monkeypatch: pytest.MonkeyPatch, wanted: int | str | None, default_input: int, index: int
) -> None:
    fake = _fake_sounddevice(_DEVICES, default_input)
    monkeypatch.setattr(sources, "_sounddevice", lambda: fake)
    device = resolve_input_device(wanted)
    assert device.index == index
    assert device.name == _DEVICES[index]["name"]
    assert device.max_input_channels == _DEVICES[index]["max_input_channels"]
    assert device.host_api == ("PulseAudio" if index >= 3 else "ALSA")
    assert device.is_default == (index == default_input)


@pytest.mark.parametrize(
    ("devices", "wanted", "message"),
    [
        (_DEVICES, 1, "no input device with index 1"),  # output only
        (_DEVICES, 9, "no input device with index 9"),
        (_DEVICES, "bluetooth", "no input device named like 'bluetooth'"),
        ([_device("HDMI 0 (hw:0,3)", 0)], None, "no audio input device found"),
        ([], "usb", "no audio input device found"),
    ],
)
def test_resolve_input_device_errors(
    monkeypatch: pytest.MonkeyPatch, devices: list[dict], wanted: int | str | None, message: str
) -> None:
    fake = _fake_sounddevice(devices)
    monkeypatch.setattr(sources, "_sounddevice", lambda: fake)
    with pytest.raises(AudioDeviceError, match=message) as info:
        resolve_input_device(wanted)
    assert "\n" not in str(info.value)


def test_device_query_failure_is_an_audio_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[dict]:
        raise RuntimeError("PortAudio not initialized")

    fake = _fake_sounddevice(_DEVICES)
    fake.query_devices = broken
    monkeypatch.setattr(sources, "_sounddevice", lambda: fake)
    with pytest.raises(AudioDeviceError, match="cannot query audio devices"):
        resolve_input_device("usb")
