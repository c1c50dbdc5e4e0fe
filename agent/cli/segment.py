"""`salmonn-live segment` and `salmonn-live devices`: segment audio, list capture devices.

Heavy imports (numpy, soundfile, webrtcvad, torch for Silero) happen inside the command
functions so `salmonn-live --help` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def _out(line: str) -> None:
    """Write one line of command output to stdout (the command's result, not a log)."""
    print(line, flush=True)  # noqa: T201


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``segment`` and ``devices`` sub-commands."""
    seg = subparsers.add_parser(
        "segment",
        help="split audio into speech and sound segments",
        description=(
            "Segment AUDIO (a wav/flac/ogg file, or '-' for raw PCM on stdin, e.g."
            " `arecord -f S16_LE -r 16000 | salmonn-live segment -`) into speech and sound"
            " segments. Times are seconds from the start of the stream."
        ),
    )
    seg.add_argument("audio", metavar="AUDIO|-", help="audio file, or '-' for raw PCM on stdin")
    seg.add_argument("--json", action="store_true", help="print one JSON object")
    seg.add_argument("--vad", choices=("webrtc", "silero"), default="webrtc")
    seg.add_argument(
        "--mode",
        choices=("both", "speech", "sound"),
        default="both",
        help=(
            "open segments on speech or sound (default), on the VAD only (kinds are still"
            " classified: the VAD fires on many alarms), or on sound only"
        ),
    )
    seg.add_argument("--aggressiveness", type=int, default=2, help="webrtcvad 0-3 (default 2)")
    seg.add_argument("--frame-ms", type=int, default=20, help="webrtcvad frame: 10, 20 or 30")
    seg.add_argument("--silero-threshold", type=float, default=0.5)
    seg.add_argument("--pre-roll-ms", type=int, default=60)
    seg.add_argument("--post-roll-ms", type=int, default=30)
    seg.add_argument("--min-active-ms", type=int, default=100, help="minimum segment activity")
    seg.add_argument("--end-silence-ms", type=int, default=500, help="silence that ends a segment")
    seg.add_argument(
        "--max-segment-ms",
        type=int,
        default=20000,
        help="longest segment; longer ones are split (must exceed end silence + pre-roll)",
    )
    seg.add_argument("--realtime", action="store_true", help="pace a file at real-time speed")
    seg.add_argument("--rate", type=int, default=16000, help="raw stdin: sample rate in Hz")
    seg.add_argument("--channels", type=int, default=1, help="raw stdin: channels")
    seg.add_argument(
        "--format", choices=("s16le", "f32le"), default="s16le", help="raw stdin: sample format"
    )
    seg.set_defaults(func=run_segment)

    dev = subparsers.add_parser("devices", help="list audio input devices")
    dev.add_argument("--json", action="store_true", help="print a JSON list")
    dev.set_defaults(func=run_devices)


def _config(args: argparse.Namespace) -> Any:
    """The segmenter settings; the split search is half the maximum length (at most 5 s, at
    least one frame).

    Raises:
        SegmenterConfigError: Settings the segmenter rejects (one line for the user).
    """
    from streaming.segmenter import SILERO_FRAME_MS, SegmenterConfig

    frame_ms = SILERO_FRAME_MS if args.vad == "silero" else args.frame_ms
    return SegmenterConfig(
        mode=args.mode,
        vad=args.vad,
        aggressiveness=args.aggressiveness,
        frame_ms=args.frame_ms,
        silero_threshold=args.silero_threshold,
        pre_roll_ms=args.pre_roll_ms,
        post_roll_ms=args.post_roll_ms,
        min_active_ms=args.min_active_ms,
        end_silence_ms=args.end_silence_ms,
        max_segment_ms=args.max_segment_ms,
        split_search_ms=min(5000, max(args.max_segment_ms // 2, frame_ms)),
    )


async def _segment(args: argparse.Namespace) -> list[Any]:
    from streaming.events import SegmentEnded, SegmentStarted
    from streaming.segmenter import Segmenter
    from streaming.sources import FileSource, RawPcmSource

    segmenter = Segmenter(_config(args))  # validates settings before any input is read
    source: FileSource | RawPcmSource
    if args.audio == "-":
        _check_raw_format(args.rate, args.channels)
        source = RawPcmSource(sys.stdin.buffer, args.rate, args.channels, args.format)
    else:
        source = FileSource(args.audio, block_ms=500, realtime=args.realtime)
    ended: list[SegmentEnded] = []
    live = not args.json and (args.realtime or args.audio == "-")
    async with source:
        async for block in source:
            for event in segmenter.push(block.samples):
                if isinstance(event, SegmentEnded):
                    ended.append(event)
                    if live:
                        _print_segment(event)
                elif isinstance(event, SegmentStarted) and live:
                    _out(f"{event.start_s:9.3f}  ... {event.kind} started")
    for event in segmenter.flush():
        if isinstance(event, SegmentEnded):
            ended.append(event)
            if live:
                _print_segment(event)
    if not ended and segmenter.samples_pushed == 0:
        from streaming.errors import AudioInputError

        raise AudioInputError("no audio received (zero length input)")
    return ended


#: Most channels accepted on raw stdin (a block holds 100 ms of every channel).
MAX_RAW_CHANNELS = 256


def _check_raw_format(rate_hz: int, channels: int) -> None:
    """Refuse raw stdin settings that would make no sense or blow up (a 1 Hz stream resampled
    to 16 kHz is 16000 times as long).

    Raises:
        AudioInputError: rate outside the range files may declare, or channels outside
            1..`MAX_RAW_CHANNELS`.
    """
    from streaming.audio_file import MAX_FILE_RATE_HZ, MIN_FILE_RATE_HZ
    from streaming.errors import AudioInputError

    if not MIN_FILE_RATE_HZ <= rate_hz <= MAX_FILE_RATE_HZ:
        raise AudioInputError(
            f"--rate {rate_hz} Hz out of range: expected {MIN_FILE_RATE_HZ}..{MAX_FILE_RATE_HZ}"
        )
    if not 1 <= channels <= MAX_RAW_CHANNELS:
        raise AudioInputError(f"--channels {channels} out of range: expected 1..{MAX_RAW_CHANNELS}")


def _print_segment(event: Any) -> None:
    _out(f"{event.start_s:9.3f} {event.end_s:9.3f}  {event.kind}")


def run_segment(args: argparse.Namespace) -> int:
    """Segment a file or stdin; print segments as text or one JSON object."""
    ended = asyncio.run(_segment(args))
    if args.json:
        _out(
            json.dumps(
                {
                    "sample_rate": 16000,
                    "segments": [
                        {
                            "start": round(e.start_s, 3),
                            "end": round(e.end_s, 3),
                            "kind": str(e.kind),
                        }
                        for e in ended
                    ],
                }
            )
        )
    elif not (args.realtime or args.audio == "-"):
        for event in ended:
            _print_segment(event)
    return 0


def run_devices(args: argparse.Namespace) -> int:
    """List capture devices; exit 2 with one line when there are none."""
    from streaming.errors import AudioDeviceError
    from streaming.sources import list_input_devices

    devices = list_input_devices()
    if not devices:
        raise AudioDeviceError("no audio input devices found (PortAudio reports none)")
    if args.json:
        _out(json.dumps([d.__dict__ for d in devices]))
        return 0
    for d in devices:
        mark = "*" if d.is_default else " "
        _out(
            f"{mark}{d.index:3d}  {d.name}  ({d.host_api}, {d.max_input_channels} ch,"
            f" {d.default_sample_rate_hz} Hz)"
        )
    return 0
