"""Audio sources (microphone, file, stdin), a bounded frame buffer, and the `/audio` sender.

Sources put fixed-length PCM frames into a `FrameBuffer`; the `Sender` takes them out and
sends them to the agent (``{"stream", "sample_rate", "format", "channels"}`` hello, a
``ready`` reply, then one binary message per frame). When the connection fails the sender
reconnects with capped backoff and sends a new hello; meanwhile the buffer keeps the newest
frames and drops (and counts) the oldest.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from clients.common import Backoff

#: Bytes per sample of the formats `/audio` accepts.
SAMPLE_BYTES = {"s16le": 2, "f32le": 4}
#: Close codes after which reconnecting cannot help (docs/agent.md): the client must change.
FATAL_CLOSE_CODES = {4400: "bad hello", 4403: "stream not allowed", 4415: "unsupported format"}


class FatalError(Exception):
    """The agent refused us for a reason retrying cannot fix (bad token, hello, format)."""


@dataclass(frozen=True)
class AudioFormat:
    """What the frames hold (the `/audio` hello minus the stream id)."""

    sample_rate: int
    channels: int = 1
    format: str = "s16le"

    def frame_bytes(self, block_ms: int) -> int:
        """Bytes of one frame of ``block_ms`` milliseconds."""
        samples = max(1, self.sample_rate * block_ms // 1000)
        return samples * self.channels * SAMPLE_BYTES[self.format]


class FrameBuffer:
    """A bounded FIFO of frames: `put` drops the oldest when full (counted in `dropped`).

    Args:
        max_frames: Capacity.
    """

    def __init__(self, max_frames: int) -> None:
        self.frames: collections.deque[bytes] = collections.deque(maxlen=max_frames)
        self.dropped = 0
        self.closed = False
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def put(self, frame: bytes) -> None:
        """Add a frame (never blocks; the oldest frame goes when full)."""
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1
        self.frames.append(frame)
        self._ready.set()
        if len(self.frames) == self.frames.maxlen:
            self._room.clear()

    async def wait_room(self) -> None:
        """For sources that can wait (files, stdin): until the buffer is not full."""
        await self._room.wait()

    def close(self) -> None:
        """No more frames will come: `get` returns None once the buffer is empty."""
        self.closed = True
        self._ready.set()

    async def get(self) -> bytes | None:
        """The oldest frame, waiting for one; None after `close` and the last frame."""
        while not self.frames:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame = self.frames.popleft()
        self._room.set()
        return frame


# -- sources ---------------------------------------------------------------------------------


#: ``--fast`` sends a file's first FAST_BURST_S seconds at once, then FAST_SPEED times real
#: time: under the agent's default `/audio` limit (`ws.max_audio_rate` 4x after a 30 s burst),
#: which closes a stream that stays faster.
FAST_BURST_S = 20.0
FAST_SPEED = 3.0


async def _paced(frames: Any, buffer: FrameBuffer, frame_s: float, speed: float) -> None:
    """Put frames into the buffer at ``speed`` times real time. At 1 (a microphone's pace) a
    full buffer drops its oldest frame; faster, the first `FAST_BURST_S` seconds go at once
    and a full buffer makes the file wait."""
    start = time.monotonic()
    fast = speed > 1
    for i, frame in enumerate(frames):
        due = start + max(0.0, i * frame_s - (FAST_BURST_S if fast else 0.0)) / speed
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if fast:
            await buffer.wait_room()
        buffer.put(frame)


def file_format(path: Path) -> AudioFormat:
    """The format a file is sent in: its own rate and channels, as s16le."""
    info = soundfile.info(str(path))
    return AudioFormat(info.samplerate, info.channels, "s16le")


async def file_source(path: Path, block_ms: int, buffer: FrameBuffer, realtime: bool) -> None:
    """Read a sound file (anything libsndfile reads) into s16le frames, then close the buffer.

    Args:
        path: The file.
        block_ms: Frame length.
        buffer: Where frames go.
        realtime: Pace frames at the audio's own speed (like a microphone); else send the
            first `FAST_BURST_S` seconds at once and the rest at `FAST_SPEED` times real time
            (a full buffer makes the file wait, nothing is dropped).
    """
    fmt = file_format(path)
    block = fmt.frame_bytes(block_ms) // (2 * fmt.channels)
    with soundfile.SoundFile(str(path)) as f:
        frames = (
            np.ascontiguousarray(chunk, dtype="<i2").tobytes()
            for chunk in f.blocks(blocksize=block, dtype="int16", always_2d=True)
        )
        await _paced(frames, buffer, block_ms / 1000, 1.0 if realtime else FAST_SPEED)
    buffer.close()


async def stdin_source(fmt: AudioFormat, block_ms: int, buffer: FrameBuffer) -> None:
    """Raw PCM from standard input (``fmt`` says what it is) until end of file."""
    loop = asyncio.get_running_loop()
    size = fmt.frame_bytes(block_ms)
    whole = fmt.channels * SAMPLE_BYTES[fmt.format]
    reader = sys.stdin.buffer
    pending = b""
    while True:
        await buffer.wait_room()
        data = await loop.run_in_executor(None, reader.read, size)
        if not data:
            break
        pending += data
        cut = len(pending) - len(pending) % whole
        if cut:
            buffer.put(pending[:cut])
            pending = pending[cut:]
    buffer.close()


async def mic_source(
    fmt: AudioFormat, block_ms: int, buffer: FrameBuffer, device: str | int | None
) -> None:
    """Capture a microphone (PortAudio, through sounddevice) until cancelled."""
    import sounddevice

    loop = asyncio.get_running_loop()

    def callback(data: Any, frames: int, when: Any, status: Any) -> None:
        loop.call_soon_threadsafe(buffer.put, bytes(data))

    stream = sounddevice.RawInputStream(
        samplerate=fmt.sample_rate,
        channels=fmt.channels,
        dtype="int16" if fmt.format == "s16le" else "float32",
        blocksize=max(1, fmt.sample_rate * block_ms // 1000),
        device=device,
        callback=callback,
    )
    with stream:
        await asyncio.Event().wait()  # until cancelled


# -- sender ----------------------------------------------------------------------------------


class Sender:
    """Sends the buffer's frames to ``<agent>/audio``, reconnecting until the buffer ends.

    Args:
        agent_url: ``ws://HOST:PORT`` (or ``wss://``) of the agent.
        stream: Stream id.
        fmt: What the frames hold.
        buffer: Where frames come from.
        token: The agent's token, if it needs one.
        on_status: Called with one line at each connection change.
        backoff: Reconnection delays.
    """

    def __init__(
        self,
        agent_url: str,
        stream: str,
        fmt: AudioFormat,
        buffer: FrameBuffer,
        token: str | None = None,
        on_status: Callable[[str], None] = print,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = agent_url.rstrip("/") + "/audio"
        self.hello = {
            "stream": stream,
            "sample_rate": fmt.sample_rate,
            "format": fmt.format,
            "channels": fmt.channels,
        }
        self.buffer = buffer
        self.headers = Headers({"Authorization": f"Bearer {token}"}) if token else None
        self.on_status = on_status
        self.backoff = backoff or Backoff()
        self.counters = {"sent": 0, "connections": 0, "failures": 0}
        self._unsent: bytes | None = None

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Send until the buffer is closed and empty.

        Raises:
            FatalError: The agent refused the token, the hello or the format.
        """
        while True:
            try:
                if await self._session():
                    return
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code == 401:
                    raise FatalError(f"{self.url}: token missing or wrong (HTTP 401)") from None
                reason = f"HTTP {code}"
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                if code in FATAL_CLOSE_CODES:
                    detail = exc.rcvd.reason if exc.rcvd else ""
                    raise FatalError(f"{FATAL_CLOSE_CODES[code]} ({code}): {detail}") from None
                reason = f"connection closed ({code} {exc.rcvd.reason if exc.rcvd else ''})"
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
            self.counters["failures"] += 1
            delay = self.backoff.next()
            self.on_status(
                f"agent {self.url} unreachable: {reason}; retrying in {delay:.1f} s "
                f"({len(self.buffer.frames)} frames buffered, {self.buffer.dropped} dropped)"
            )
            await sleep(delay)

    async def _session(self) -> bool:
        """One connection; True when every frame was sent and the stream closed normally."""
        async with connect(
            self.url, additional_headers=self.headers, open_timeout=5.0, close_timeout=5.0
        ) as ws:
            await ws.send(json.dumps(self.hello))
            async with asyncio.timeout(10.0):
                reply = json.loads(await ws.recv())
            if reply.get("status") != "ready":
                raise FatalError(f"unexpected reply to the hello: {reply}")
            self.counters["connections"] += 1
            self.backoff.reset()
            self.on_status(f"streaming {self.hello} to {self.url}")
            while True:
                frame = self._unsent if self._unsent is not None else await self.buffer.get()
                if frame is None:
                    await ws.close()
                    return True
                self._unsent = frame  # resent after a reconnection if this send fails
                await ws.send(frame)
                self._unsent = None
                self.counters["sent"] += 1
