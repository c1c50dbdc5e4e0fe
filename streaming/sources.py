"""Audio sources: microphone, file and raw PCM, as async iterators of timestamped blocks.

This is the only module in ``streaming/`` that touches devices, files-as-streams or asyncio.
Every source yields :class:`AudioBlock` objects of mono float32 at ``sample_rate_hz`` (16 kHz by
default; other input rates are converted with :class:`~streaming.resample.StreamResampler`),
each stamped with its offset on the source's sample clock. Sources are async context managers
with an idempotent ``close()`` and ``wait_closed()``.

The microphone path follows the PortAudio threading rule: the sounddevice callback runs on
PortAudio's thread and only hands a copy of the block to the event loop with
``call_soon_threadsafe``; the loop side puts it in a **bounded** queue and, when the consumer
falls behind, drops the *oldest* block, counts it in :attr:`MicSource.dropped_blocks` and logs
a warning (at most once per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import numpy as np
import numpy.typing as npt

from streaming.audio_file import open_sound_file
from streaming.errors import AudioDeviceError, AudioInputError
from streaming.pcm import PCM_FORMATS, SAMPLE_RATE_HZ, decode_pcm
from streaming.resample import StreamResampler

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AudioBlock:
    """A block of captured audio.

    Attributes:
        start_sample: Offset of ``samples[0]`` on the source clock (samples at
            ``sample_rate_hz`` since the source started).
        samples: Mono float32, shape ``(n,)``.
        sample_rate_hz: Rate of ``samples``.
        captured_at: ``time.monotonic()`` when the block arrived (s): for the microphone, when
            PortAudio's callback delivered the input block that completed it (not when the
            consumer took it off the queue); for files and stdin, when it was read.
    """

    start_sample: int
    samples: FloatArray = field(repr=False, compare=False)
    sample_rate_hz: int
    captured_at: float

    @property
    def end_sample(self) -> int:
        """One past the last sample's offset."""
        return self.start_sample + int(self.samples.size)


class _ClockedConverter:
    """Resamples input blocks to the output rate and stamps them on the output clock."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        self.out_rate_hz = out_rate_hz
        self._resampler = StreamResampler(in_rate_hz, out_rate_hz)
        self._position = 0

    def convert(
        self, data: npt.ArrayLike, final: bool = False, captured_at: float | None = None
    ) -> AudioBlock | None:
        """Resample ``data``; ``captured_at`` (``time.monotonic()``, s) defaults to now."""
        out = self._resampler.push(data)
        if final:
            out = np.concatenate([out, self._resampler.flush()])
        if out.size == 0:
            return None
        stamp = time.monotonic() if captured_at is None else captured_at
        block = AudioBlock(self._position, out, self.out_rate_hz, stamp)
        self._position += out.size
        return block


# ---------------------------------------------------------------------------------------------
# Files


class FileSource:
    """Stream a wav/flac/ogg file in blocks, as fast as possible or paced in real time.

    The file is never read whole: each block is read in a worker thread.

    Args:
        path: The audio file.
        block_ms: Block length in ms of input audio.
        realtime: Pace blocks at the file's real-time rate (as a microphone would deliver).
        sample_rate_hz: Output rate in Hz.

    Raises:
        AudioInputError: (on ``__aenter__``) missing, unknown, truncated or empty file; (while
            iterating) corrupt data or NaN/inf samples.
    """

    def __init__(
        self,
        path: str | Path,
        block_ms: int = 100,
        realtime: bool = False,
        sample_rate_hz: int = SAMPLE_RATE_HZ,
    ) -> None:
        if block_ms <= 0:
            raise AudioInputError(f"block_ms must be > 0, got {block_ms}")
        self.path = Path(path)
        self.block_ms = block_ms
        self.realtime = realtime
        self.sample_rate_hz = sample_rate_hz
        self._sound: Any = None
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._sound = await asyncio.to_thread(open_sound_file, self.path)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the file (idempotent)."""
        if self._sound is not None:
            self._sound.close()
            self._sound = None
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has run."""
        await self._closed.wait()

    def _read(self, frames: int) -> npt.NDArray[np.float32]:
        data: npt.NDArray[np.float32]
        try:
            data = self._sound.read(frames, dtype="float32", always_2d=True)
        except RuntimeError as exc:  # soundfile.LibsndfileError is a RuntimeError
            raise AudioInputError(f"{self.path}: corrupt audio data ({exc})") from exc
        if not np.isfinite(data).all():
            raise AudioInputError(f"{self.path}: NaN or infinite samples; expected finite audio")
        return np.clip(data, -1.0, 1.0, out=data)  # float files may hold more (a mean: inf)

    async def __aiter__(self) -> AsyncIterator[AudioBlock]:
        if self._sound is None:
            raise AudioInputError("FileSource used outside 'async with'")
        in_rate = int(self._sound.samplerate)
        block_frames = max(1, in_rate * self.block_ms // 1000)
        converter = _ClockedConverter(in_rate, self.sample_rate_hz)
        loop = asyncio.get_running_loop()
        started = loop.time()
        read_frames = 0
        total = int(self._sound.frames)
        while self._sound is not None:
            data = await asyncio.to_thread(self._read, block_frames)
            read_frames += data.shape[0]
            final = data.shape[0] < block_frames or read_frames >= total
            if data.shape[0] == 0 and read_frames < total:
                raise AudioInputError(
                    f"{self.path}: truncated audio: header declares {total} frames, only"
                    f" {read_frames} could be decoded"
                )
            if self.realtime:
                due = started + read_frames / in_rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            block = converter.convert(data, final=final)
            if block is not None:
                yield block
            if final:
                return


# ---------------------------------------------------------------------------------------------
# Raw PCM (stdin)


class RawPcmSource:
    """Raw little-endian PCM from a binary stream, e.g. ``arecord -f S16_LE -r 16000 | ...``.

    Args:
        stream: A binary file object (``sys.stdin.buffer``); read in a worker thread.
        sample_rate_hz: Input rate in Hz.
        channels: Interleaved channels (averaged to mono).
        sample_format: ``"s16le"`` or ``"f32le"``.
        block_ms: Block length in ms.
        out_rate_hz: Output rate in Hz.

    Raises:
        AudioInputError: Bad format or rate; (while iterating) NaN/inf float samples.
    """

    def __init__(
        self,
        stream: BinaryIO,
        sample_rate_hz: int = SAMPLE_RATE_HZ,
        channels: int = 1,
        sample_format: str = "s16le",
        block_ms: int = 100,
        out_rate_hz: int = SAMPLE_RATE_HZ,
    ) -> None:
        if sample_format not in PCM_FORMATS:
            raise AudioInputError(
                f"raw sample format must be one of {sorted(PCM_FORMATS)}, got {sample_format!r}"
            )
        if sample_rate_hz <= 0 or channels <= 0 or block_ms <= 0:
            raise AudioInputError(
                f"raw PCM needs positive rate, channels and block, got {sample_rate_hz} Hz,"
                f" {channels} channel(s), {block_ms} ms"
            )
        self.stream = stream
        self.sample_rate_hz = sample_rate_hz
        self.channels = channels
        self.sample_format = sample_format
        self.dtype = PCM_FORMATS[sample_format]
        self.block_ms = block_ms
        self.out_rate_hz = out_rate_hz
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading (idempotent; the stream itself belongs to the caller)."""
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has run."""
        await self._closed.wait()

    async def __aiter__(self) -> AsyncIterator[AudioBlock]:
        frame_bytes = self.dtype.itemsize * self.channels
        block_bytes = max(1, self.sample_rate_hz * self.block_ms // 1000) * frame_bytes
        converter = _ClockedConverter(self.sample_rate_hz, self.out_rate_hz)
        leftover = b""
        while not self._closed.is_set():
            chunk = await asyncio.to_thread(self.stream.read, block_bytes)
            final = not chunk
            data = leftover + (chunk or b"")
            usable = len(data) - len(data) % frame_bytes
            leftover = data[usable:]
            try:
                samples = decode_pcm(data[:usable], self.sample_format, self.channels)
            except AudioInputError as exc:
                raise AudioInputError(f"raw PCM contains {exc}") from exc
            block = converter.convert(samples, final)
            if block is not None:
                yield block
            if final:
                if leftover:
                    logger.warning(
                        "raw PCM ended mid-frame: %d trailing byte(s) ignored", len(leftover)
                    )
                return


# ---------------------------------------------------------------------------------------------
# Microphone


@dataclass(frozen=True)
class InputDevice:
    """A capture device as PortAudio reports it.

    Attributes:
        index: PortAudio device index.
        name: Device name.
        max_input_channels: Input channels.
        default_sample_rate_hz: The device's default rate.
        host_api: Host API name (ALSA, PulseAudio, ...).
        is_default: Whether it is the default input device.
    """

    index: int
    name: str
    max_input_channels: int
    default_sample_rate_hz: int
    host_api: str
    is_default: bool


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: PortAudio library missing
        raise AudioDeviceError(
            f"sounddevice/PortAudio unavailable ({exc}); install libportaudio2"
        ) from exc
    return sounddevice


def list_input_devices() -> list[InputDevice]:
    """All devices with at least one input channel.

    Raises:
        AudioDeviceError: PortAudio cannot be loaded or queried.
    """
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except Exception as exc:  # PortAudioError and friends
        raise AudioDeviceError(f"cannot query audio devices: {exc}") from exc
    out = []
    for index, info in enumerate(devices):
        if info["max_input_channels"] > 0:
            out.append(
                InputDevice(
                    index=index,
                    name=str(info["name"]),
                    max_input_channels=int(info["max_input_channels"]),
                    default_sample_rate_hz=int(info["default_samplerate"]),
                    host_api=str(apis[info["hostapi"]]["name"]),
                    is_default=index == default_in,
                )
            )
    return out


def resolve_input_device(device: int | str | None) -> InputDevice:
    """Find an input device by index, by (case-insensitive) name substring, or the default.

    Args:
        device: Index, name fragment, or None for the default input device.

    Returns:
        The device.

    Raises:
        AudioDeviceError: No input devices, or none matching ``device``.
    """
    devices = list_input_devices()
    if not devices:
        raise AudioDeviceError(
            "no audio input device found; connect a microphone or use a file or '-' (stdin)"
        )
    if device is None:
        return next((d for d in devices if d.is_default), devices[0])
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        wanted = int(device)
        for d in devices:
            if d.index == wanted:
                return d
        raise AudioDeviceError(
            f"no input device with index {wanted}; inputs are {[d.index for d in devices]}"
        )
    matches = [d for d in devices if device.lower() in d.name.lower()]
    if not matches:
        raise AudioDeviceError(
            f"no input device named like {device!r}; inputs are {[d.name for d in devices]}"
        )
    return matches[0]


class MicSource:
    """Microphone capture through sounddevice, as an async iterator of :class:`AudioBlock`.

    Args:
        device: Device index, name fragment, or None for the default input.
        block_ms: Block length delivered by PortAudio, in ms.
        queue_blocks: Bound of the hand-over queue; when full the oldest block is dropped.
        device_rate_hz: Capture rate; None uses the device's default rate.
        channels: Channels captured (averaged to mono).
        sample_rate_hz: Output rate in Hz.

    Raises:
        AudioDeviceError: (on ``__aenter__``) no device, unknown device, or PortAudio failure.

    Attributes:
        dropped_blocks: Blocks dropped because the consumer fell behind.
        status_flags: PortAudio status messages seen (input overflows etc.), counted.
    """

    def __init__(
        self,
        device: int | str | None = None,
        block_ms: int = 20,
        queue_blocks: int = 100,
        device_rate_hz: int | None = None,
        channels: int = 1,
        sample_rate_hz: int = SAMPLE_RATE_HZ,
    ) -> None:
        if queue_blocks <= 0 or block_ms <= 0:
            raise AudioDeviceError(
                f"queue_blocks and block_ms must be > 0, got {queue_blocks}, {block_ms}"
            )
        self.device = device
        self.block_ms = block_ms
        self.queue_blocks = queue_blocks
        self.device_rate_hz = device_rate_hz
        self.channels = channels
        self.sample_rate_hz = sample_rate_hz
        self.dropped_blocks = 0
        self.status_flags: dict[str, int] = {}
        self._stream: Any = None
        self._queue: asyncio.Queue[tuple[npt.NDArray[np.float32], float] | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = asyncio.Event()
        self._last_drop_log = 0.0
        self._converter: _ClockedConverter | None = None

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_blocks)
        info = resolve_input_device(self.device)
        rate = self.device_rate_hz or info.default_sample_rate_hz
        self._converter = _ClockedConverter(rate, self.sample_rate_hz)
        sd = _sounddevice()
        try:
            self._stream = sd.InputStream(
                device=info.index,
                samplerate=rate,
                channels=min(self.channels, info.max_input_channels),
                dtype="float32",
                blocksize=max(1, rate * self.block_ms // 1000),
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:  # sd.PortAudioError, ValueError for bad settings
            self._stream = None
            raise AudioDeviceError(f"cannot open input device {info.name!r}: {exc}") from exc
        logger.info("capturing from %r at %d Hz, %d ms blocks", info.name, rate, self.block_ms)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio thread: copy the block and hand it to the loop. Never blocks."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        arrived = time.monotonic()
        # RuntimeError: the loop closed between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(
                self.feed, np.array(indata, dtype=np.float32), str(status), arrived
            )

    def feed(
        self,
        block: npt.NDArray[np.float32],
        status: str = "",
        captured_at: float | None = None,
    ) -> None:
        """Loop thread: enqueue one captured block, dropping the oldest when full.

        Called through ``call_soon_threadsafe`` by the PortAudio callback; public so the
        hand-over can be tested without a device.

        Args:
            block: ``(frames, channels)`` or ``(frames,)`` float32 at the device rate.
            status: PortAudio's status text for the block ('' when fine).
            captured_at: ``time.monotonic()`` when the callback received the block (s); None:
                now.
        """
        if self._queue is None or self._closed.is_set():
            return
        if status:
            self.status_flags[status] = self.status_flags.get(status, 0) + 1
        item = (block, time.monotonic() if captured_at is None else captured_at)
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_blocks += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                logger.warning(
                    "microphone queue full (%d blocks): dropped the oldest, %d dropped so far",
                    self.queue_blocks,
                    self.dropped_blocks,
                )
        self._queue.put_nowait(item)

    async def close(self) -> None:
        """Stop capture and end the iteration (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await asyncio.to_thread(stream.stop)
                stream.close()
            except Exception:  # PortAudio errors on shutdown are logged, not raised
                logger.warning("error while closing the input stream", exc_info=True)
        if self._queue is not None:
            if self._queue.full():
                self._queue.get_nowait()
                self.dropped_blocks += 1
            self._queue.put_nowait(None)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has run."""
        await self._closed.wait()

    async def __aiter__(self) -> AsyncIterator[AudioBlock]:
        if self._queue is None or self._converter is None:
            raise AudioDeviceError("MicSource used outside 'async with'")
        while True:
            item = await self._queue.get()
            if item is None:
                return
            data, captured_at = item
            block = self._converter.convert(data, captured_at=captured_at)
            if block is not None:
                yield block

    def _prepare_without_device(self, device_rate_hz: int) -> None:
        """Set up queue and converter on the running loop without PortAudio (tests only)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_blocks)
        self._converter = _ClockedConverter(device_rate_hz, self.sample_rate_hz)
