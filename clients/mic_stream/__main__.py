"""Stream a microphone, a sound file or raw PCM on stdin to the agent's /audio endpoint.

Audio goes out in frames of --block-ms. If the agent is unreachable or the connection
drops, the streamer reconnects with capped backoff and a new hello (the agent then starts
a new stream clock); meanwhile at most --buffer-s seconds of audio wait, the oldest dropped
and counted. Files are paced in real time unless --fast (first 20 s at once, then 3x real
time, under the agent's rate limit; they wait for room, nothing is dropped).

Examples:
  python -m clients.mic_stream --agent ws://robot-host:8765 --stream kitchen
  python -m clients.mic_stream --file examples/demo_scene.wav --stream demo
  sox -d -t raw -r 16000 -e signed -b 16 -c 1 - | python -m clients.mic_stream --stdin
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from clients.common import DEFAULT_AGENT_URL, TOKEN_ENV, cancel_and_wait, say
from clients.mic_stream.streamer import (
    AudioFormat,
    FatalError,
    FrameBuffer,
    Sender,
    file_format,
    file_source,
    mic_source,
    stdin_source,
)

PROG = "mic_stream"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.mic_stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agent", default=DEFAULT_AGENT_URL, metavar="URL", help="the agent, ws://HOST:PORT"
    )
    parser.add_argument("--stream", default="mic", help="stream id (default mic)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="stream this sound file instead of a mic")
    source.add_argument("--stdin", action="store_true", help="stream raw PCM from stdin")
    parser.add_argument("--device", help="microphone (name or index; default: the system's)")
    parser.add_argument(
        "--rate", type=int, default=16000, help="sample rate of the mic or stdin (Hz)"
    )
    parser.add_argument("--channels", type=int, default=1, help="channels of the mic or stdin")
    parser.add_argument(
        "--format", choices=("s16le", "f32le"), default="s16le", help="stdin sample format"
    )
    parser.add_argument("--block-ms", type=int, default=100, help="frame length (ms)")
    parser.add_argument(
        "--buffer-s",
        type=float,
        default=10.0,
        help="audio kept while disconnected (s); the oldest beyond it is dropped",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="send a --file faster than real time: its first 20 s at once, then 3x (under the"
        " agent's default ws.max_audio_rate)",
    )
    parser.add_argument(
        "--token", help=f"the agent's token (better: the {TOKEN_ENV} environment variable)"
    )
    args = parser.parse_args(argv)
    if args.block_ms <= 0 or args.buffer_s <= 0:
        parser.error("--block-ms and --buffer-s must be positive")
    return args


async def stream(args: argparse.Namespace) -> int:
    """Run the source and the sender; 0 at the end of a file or stdin, 1 when refused."""
    device = int(args.device) if args.device and args.device.isdigit() else args.device
    if args.file is not None:
        fmt = file_format(args.file)
    else:
        fmt = AudioFormat(args.rate, args.channels, args.format if args.stdin else "s16le")
    buffer = FrameBuffer(max(1, round(args.buffer_s * 1000 / args.block_ms)))
    if args.file is not None:
        producer = file_source(args.file, args.block_ms, buffer, realtime=not args.fast)
    elif args.stdin:
        producer = stdin_source(fmt, args.block_ms, buffer)
    else:
        producer = mic_source(fmt, args.block_ms, buffer, device)
    token = args.token or os.environ.get(TOKEN_ENV)
    sender = Sender(
        args.agent, args.stream, fmt, buffer, token, on_status=lambda line: say(PROG, line)
    )
    source_task = asyncio.create_task(producer, name="source")
    send_task = asyncio.create_task(sender.run(), name="sender")
    try:
        done, _ = await asyncio.wait({source_task, send_task}, return_when=asyncio.FIRST_EXCEPTION)
        if source_task in done and source_task.exception() is not None:
            raise source_task.exception()  # type: ignore[misc]
        await send_task
        return 0
    except FatalError as exc:
        say(PROG, f"the agent refused the stream: {exc}")
        return 1
    finally:
        await cancel_and_wait(source_task, send_task)
        say(
            PROG,
            f"sent {sender.counters['sent']} frames over {sender.counters['connections']} "
            f"connection(s); dropped {buffer.dropped}",
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point: stream until the end of the input or Ctrl-C."""
    args = parse_args(argv)
    if args.file is not None and not args.file.is_file():
        say(PROG, f"--file: no such file {str(args.file)!r}")
        return 2
    loop = asyncio.new_event_loop()
    task = loop.create_task(stream(args))
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return loop.run_until_complete(task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        return 0
    except Exception as exc:  # a source failure: no microphone, unreadable file
        say(PROG, f"error: {exc}")
        return 1
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
