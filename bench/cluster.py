"""`salmonn-live bench cluster --workers N`: throughput and latency of an edge and a worker pool.

One in-process edge (`agent.cluster.edge.RemoteWindows`, the real code) publishes ``--windows``
speech windows (2 s of generated scene audio each, two requests: transcript and command) through a
mosquitto on loopback, keeping ``--max-batch`` x workers of them in flight, to 1, 2, ... N
`salmonn-live worker` processes (each its own model and torch threads). Measured per N:
windows per second (first publication to last answer) and latency (publication to the window's
last final, p50 / p95).

Before that, the same run with an in-process echo responder in place of the workers (decodes
each window, answers both requests at once, no model) measures the messaging cost per window
(FLAC, JSON, two broker hops each way): the capacity formula's overhead term.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from bench import answer_paths
from streaming.pcm import SAMPLE_RATE_HZ as RATE_HZ

logger = logging.getLogger(__name__)

PREFIX = "bench"
WINDOW_S = 2.0
_START_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--workers", type=int, default=3, help="most workers (1, 2, ... N)")
    parser.add_argument("--model", default="tiny-random", help="preset or checkpoint directory")
    parser.add_argument("--input-mode", choices=("official", "trimmed"), default=None)
    parser.add_argument("--windows", type=int, default=48, help="windows per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--mqtt", metavar="URL", help="an existing broker (default: a mosquitto started here)"
    )


def _windows(count: int) -> list[Any]:
    from agent.runtime.worker import Request, Window
    from training.scenes import make_scene

    scene = make_scene(7, max(30.0, count * WINDOW_S / 4), n_speech=6, n_sounds=2)
    size = int(WINDOW_S * RATE_HZ)
    starts = np.linspace(0, scene.audio.size - size, count).astype(int)
    out = []
    for i, start in enumerate(starts):
        wid = f"bench:{i}"
        out.append(
            Window(
                id=wid,
                stream="bench",
                kind="speech",
                audio=scene.audio[start : start + size],
                start_s=start / RATE_HZ,
                end_s=(start + size) / RATE_HZ,
                captured=time.monotonic(),
                segment_end=time.monotonic(),
                requests=(
                    Request(f"{wid}/transcript", "transcript", "Transcribe the speech."),
                    Request(f"{wid}/command", "command", "What is the command?"),
                ),
            )
        )
    return out


async def _measure(config: Any, windows: list[Any], in_flight: int) -> dict[str, Any]:
    """Push ``windows`` through `RemoteWindows` with ``in_flight`` outstanding at most."""
    from agent.cluster.edge import Outstanding, RemoteWindows
    from agent.events import WallClock

    room = asyncio.Semaphore(in_flight)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    finished = asyncio.Event()
    statuses: dict[str, int] = {}

    def on_event(event: dict[str, Any], worker: str, item: Outstanding) -> None:
        pass

    def on_done(item: Outstanding, status: str, error: str | None) -> None:
        statuses[status] = statuses.get(status, 0) + 1
        latencies.append(time.perf_counter() - sent[item.window.id])
        room.release()
        if len(latencies) == len(windows):
            finished.set()

    handle = cast(Any, SimpleNamespace(overload="backpressure"))
    async with RemoteWindows(
        config, device="bench-edge", run=os.urandom(4).hex(), clock=WallClock()
    ) as remote:
        remote.bind(on_event, on_done)
        await asyncio.wait_for(remote.connected.wait(), 10)
        started = time.perf_counter()
        for window in windows:
            await room.acquire()
            sent[window.id] = time.perf_counter()
            remote.submit(window, handle)
        await asyncio.wait_for(finished.wait(), _START_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        stats = remote.stats()
    return {
        "windows": len(windows),
        "elapsed_s": elapsed,
        "windows_per_s": len(windows) / elapsed,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "statuses": statuses,
        "answered_by": stats["answered_by"],
        "republished": stats["republished"],
    }


async def _echo(config: Any, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """A worker without a model: decode each window, answer its requests at once."""
    from agent.cluster.messages import (
        broker_address,
        decode_window,
        encode_result,
        make_client,
        results_topic,
        shared_subscription,
    )

    address = broker_address(config.mqtt)
    async with make_client(address, None, "bench-echo") as client:
        await client.subscribe(shared_subscription(PREFIX, "salmonn"), qos=1)
        ready.set()

        async def serve() -> None:
            async for message in client.messages:
                decoded = decode_window(bytes(cast(bytes, message.payload)), 0.0)
                topic = results_topic(PREFIX, decoded.device)
                w = decoded.window
                await client.publish(
                    topic,
                    encode_result("accepted", run=decoded.run, window=w.id, worker="echo"),
                    qos=1,
                )
                for r in w.requests:
                    event = {"id": r.key, "window": w.id, "partial": False, "timing": {}}
                    payload = encode_result(
                        "event", run=decoded.run, window=w.id, worker="echo", event=event
                    )
                    await client.publish(topic, payload, qos=1)

        task = asyncio.create_task(serve())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _start_workers(args: argparse.Namespace, url: str, count: int) -> list[Any]:
    import aiomqtt

    from agent.cluster.messages import presence_topic
    from agent.protocols.mqtt import parse_url

    address = parse_url(url)
    procs = []
    async with aiomqtt.Client(address.host, address.port, identifier="bench-watch") as watch:
        await watch.subscribe(presence_topic(PREFIX, "+"), qos=1)
        for i in range(count):
            command = [sys.executable, "-m", "agent.cli", "-q", "worker", "--mqtt", url]
            command += ["--mqtt-prefix", PREFIX, "--worker-id", f"bw{i}", "--model", args.model]
            command += ["--threads", str(args.threads), "--max-batch", str(args.max_batch)]
            command += ["--max-new-tokens", str(args.max_new_tokens), "--max-wait-ms", "20"]
            command += ["--transcript", answer_paths(args.model, None, None)["transcript"]]
            if args.input_mode:
                command += ["--input-mode", args.input_mode]
            procs.append(await asyncio.create_subprocess_exec(*command))
        online: set[str] = set()
        async with asyncio.timeout(_START_TIMEOUT_S):
            async for message in watch.messages:
                body = json.loads(cast(bytes, message.payload))
                if body.get("state") == "online":
                    online.add(body["worker"])
                if len(online) == count:
                    break
    return procs


async def _stop_workers(procs: list[Any]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _bench(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    from agent.config import AgentConfig

    config = AgentConfig.from_dict(
        {
            "mqtt": {"url": url, "prefix": PREFIX},
            "cluster": {"accept_timeout_s": 30.0, "result_timeout_s": 600.0},
        }
    )
    windows = _windows(args.windows)
    rows = []
    stop, ready = asyncio.Event(), asyncio.Event()
    echo = asyncio.create_task(_echo(config, stop, ready))
    await ready.wait()
    row = await _measure(config, windows, args.max_batch)
    rows.append({"workers": "echo (no model)", **row})
    stop.set()
    await echo
    for count in range(1, args.workers + 1):
        procs = await _start_workers(args, url, count)
        try:
            await _measure(config, windows[: args.max_batch * count], args.max_batch * count)
            row = await _measure(config, windows, args.max_batch * count)
        finally:
            await _stop_workers(procs)
        rows.append({"workers": count, **row})
        logger.info("%s", rows[-1])
    return rows


@contextlib.contextmanager
def _mosquitto() -> Any:
    import socket
    import subprocess

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
        proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start")
                time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a Markdown section for BENCHMARKS.md."""
    with contextlib.ExitStack() as stack:
        url = args.mqtt or stack.enter_context(_mosquitto())
        rows = asyncio.run(_bench(args, url))
    out = sys.stdout
    out.write(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), model `{args.model}`, "
        f"{args.max_new_tokens} new tokens per answer, max batch {args.max_batch}, "
        f"{args.threads} torch thread(s) per worker, {args.windows} windows of {WINDOW_S:.0f} s "
        "(2 requests each), in flight: max batch x workers.\n\n"
        "| workers | windows/s | p50 latency (s) | p95 latency (s) | answered by | republished |\n"
        "|---|---:|---:|---:|---|---:|\n"
    )
    for row in rows:
        by = ", ".join(f"{k} {v}" for k, v in sorted(row["answered_by"].items()))
        out.write(
            f"| {row['workers']} | {row['windows_per_s']:.2f} | {row['p50_s']:.3f} | "
            f"{row['p95_s']:.3f} | {by} | {row['republished']} |\n"
        )
    echo = rows[0]
    out.write(
        f"\nMessaging cost per window (echo): {1000 / echo['windows_per_s']:.1f} ms "
        "(edge + broker + responder on the same cores).\n"
    )
    return 0
