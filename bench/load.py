"""`salmonn-live bench load`: the agent under many clients for a while (issue #8, "Load").

The agent runs in a child process (so the clients' own work does not show up in its figures)
on loopback, serving `/events` and `/audio` as `salmonn-live run` does. This process then
connects ``--subscribers`` `/events` clients (``--slow`` of them read one message every
``--slow-read-s`` through a small socket buffer, the rest read as fast as they can) and,
once all are subscribed, ``--streams`` `/audio` streams that send generated scenes (speech
commands and sound events, `bench.pipeline._scenes`) at real-time pace, in 50 ms frames, for
``--seconds``. Then the streams close, their last windows are answered, and the agent gets
SIGTERM.

Measured inside the agent: resident memory every second (peak, and its slope after the
warm-up, MiB/min: it must be flat), event-loop lag (a ticker task on the agent's loop that
sleeps 10 ms and records how late it woke: p99 and max) and the `seq` of every event the bus
published. Measured by the clients: each fast client's received `seq`s against the published
ones (every event published after all clients subscribed must reach every fast client, in
order: anything missing is *lost*), and how the slow clients ended (close code and reason).

``--model tiny-random`` (the default) keeps the model cheap, so the figures are the agent's:
segmenters, batching, fan-out, WebSockets. ``--model nano`` runs the real small model.
The machine's load average is reported beside the lag: on a shared machine a loop that is
not given a CPU looks exactly like a blocked loop. ``SALMONN_BENCH_LOOP_DEBUG=1`` runs the
agent's loop in asyncio debug mode and prints its log, naming callbacks that took over 50 ms.

Soaks (issue 21): ``--minutes N`` runs for N minutes, and the report gets a row per
``--interval-s`` (60 s): windows in and dropped per kind (a window counts as its best task,
`agent.runtime.window_queue.shed_kind`), command p50/p95 and all-kinds p95 latency (the final
event's ``emitted - captured``: from the window's last sample to its answer) and the agent's
RSS. One fast client (the *recorder*) parses every event for those rows. Memory is judged
from its curve (`memory_verdict`): the warm-up ends where the slope over every later
``--slope-window-s`` stays under ``--max-slope-mib-min``; the slope after it is reported, and a
curve that never levels off is a leak (exit code 1). A PNG plots RSS and command p95 over time
(``--plot``; matplotlib is the ``bench`` extra, and without it the plot is skipped with a
note). ``--find-capacity`` runs the whole soak at each stream count of ``--capacity-steps``
(2, 4, 6, 8, ...) and reports the largest with 0 command windows dropped and under 1 % of all
windows dropped (`sustained`). Slow clients keep no keepalive of their own
(``ping_interval=None``): a websockets client pings every 20 s and gives up when the pong
waits behind its backlog, which would end it before it reads the agent's 4429.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import platform
import re
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import answer_paths
from bench.pipeline import BLOCK_S, _percentile, _scenes
from streaming.pcm import SAMPLE_RATE_HZ as RATE_HZ

logger = logging.getLogger(__name__)

TICK_S = 0.01  # the lag ticker's period
SAMPLE_S = 1.0  # memory sampling period
#: The kinds a window counts as, best first (`agent.runtime.window_queue.SHED_KINDS`).
KINDS = ("command", "transcript", "caption", "answer")
#: A stream count is sustained when at most this share of its windows was dropped (and no
#: command window).
MAX_DROPPED_SHARE = 0.01
#: Fewest RSS samples in a slope window for the memory verdict to judge at all.
_MIN_WINDOW_SAMPLES = 5
#: RSS moves by a few MiB up and down as the allocator takes and returns arenas (±7 MiB over
#: ten minutes on the nano model, BENCHMARKS.md): a rise within this is not a climb.
DEFAULT_NOISE_MIB = 10.0
ROOT = Path(__file__).resolve().parents[1]
# Events are compact JSON now (``"seq":41``); older agents wrote ``"seq": 41``.
_SEQ_RE = re.compile(r'"seq":\s*(-?\d+)')
_STREAM_CLOSED_RE = re.compile(r'"status":\s*"stream_closed"')
_DROPPED_NOTICE_RE = re.compile(r'"status":\s*"dropped"')
_START_TIMEOUT_S = 180.0
_SETTLE_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the streams run")
    parser.add_argument(
        "--minutes", type=float, default=None, help="how long the streams run, minutes (a soak)"
    )
    parser.add_argument(
        "--interval-s", type=float, default=60.0, help="one row of the report per this, s"
    )
    parser.add_argument(
        "--find-capacity",
        action="store_true",
        help="run at each of --capacity-steps streams; report the largest sustained",
    )
    parser.add_argument(
        "--capacity-steps",
        default="2,4,6,8,10,12,16",
        help="stream counts for --find-capacity (comma-separated, rising)",
    )
    parser.add_argument(
        "--plot", default="docs/img/bench_load.png", help="PNG of RSS and command p95 ('' = none)"
    )
    parser.add_argument("--subscribers", type=int, default=50, help="/events clients")
    parser.add_argument("--slow", type=int, default=5, help="how many subscribers read slowly")
    parser.add_argument(
        "--slow-read-s", type=float, default=1.0, help="a slow subscriber reads one message per"
    )
    parser.add_argument("--streams", type=int, default=8, help="/audio streams, real-time")
    parser.add_argument(
        "--model", default="tiny-random", help="tiny-random (default: measures the agent) or nano"
    )
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens per answer")
    parser.add_argument(
        "--transcript",
        choices=("llm", "whisper"),
        help="model.transcript (default: run's, whisper; llm for tiny-random)",
    )
    parser.add_argument(
        "--command",
        choices=("llm", "whisper"),
        help="model.command (default: run's, whisper; llm for tiny-random)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the agent")
    parser.add_argument(
        "--device", default="cpu", help="model.device: cpu, cuda, cuda:N or auto (default cpu)"
    )
    parser.add_argument(
        "--dtype", default=None, help="model.dtype: float32, bfloat16 or float16 (default: auto)"
    )
    parser.add_argument("--scene-s", type=float, default=20.0, help="scene length (looped), s")
    parser.add_argument(
        "--max-slope-mib-min",
        type=float,
        default=1.0,
        help="RSS slope under which memory counts as flat, MiB/min",
    )
    parser.add_argument(
        "--slope-window-s",
        type=float,
        default=None,
        help="the RSS slope is judged over windows this long (default: a third of the run, so "
        "a longer run judges a longer stretch)",
    )
    parser.add_argument(
        "--noise-mib",
        type=float,
        default=DEFAULT_NOISE_MIB,
        help="a window's RSS must also rise by more than this to count as climbing: the "
        f"allocator's own steps up and down are not a leak (default {DEFAULT_NOISE_MIB:g})",
    )
    parser.add_argument(
        "--sounds",
        action="store_true",
        help="sounds.enabled: the AudioSet tagger names sounds, the LLM captions only what it "
        "does not name (sounds.caption = unnamed)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


# -- the agent side (child process) ---------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _open_schedstat() -> int | None:
    """This thread's scheduler statistics (Linux), kept open for cheap re-reads."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None


def _runqueue_wait_s(fd: int | None) -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 where unknown)."""
    if fd is None:
        return 0.0
    return int(os.pread(fd, 128, 0).split()[1]) / 1e9


async def _serve(spec: dict[str, Any]) -> None:
    """Run the agent with a lag ticker, a memory sampler and a recorder of published seqs;
    write a JSON report to ``spec["report"]`` after SIGTERM's clean shutdown."""
    from agent.config import AgentConfig
    from agent.runtime.app import Agent

    config = AgentConfig.from_dict(
        {
            "agent": {"print": "none"},
            "model": {
                "name": spec["model"],
                "max_new_tokens": spec["max_new_tokens"],
                "threads": spec["threads"],
                "device": spec["device"],
                "dtype": spec["dtype"],
                "input_mode": "trimmed",
                "transcript": spec["transcript"],
                "command": spec["command"],
            },
            "ws": {"listen": "127.0.0.1:0", "auth": False, "max_connections": 256},
            "mqtt": {"enabled": False},
            "sounds": {"enabled": bool(spec.get("sounds"))},
            "streams": [],
        }
    )

    def load() -> Any:
        from model.presets import resolve_model
        from model.salmonn import Salmonn

        settings = config.model
        return Salmonn.from_config(
            resolve_model(spec["model"], input_mode="trimmed"),
            device=settings.device,
            dtype=settings.dtype,
        )

    agent = Agent(config, load)
    # The probes store into flat arrays, so their own bookkeeping does not look like a leak.
    published = array.array("q")
    closed: dict[str, dict[str, Any]] = {}
    first_opened: list[int] = []

    def record(item: Any) -> None:
        event = item.data
        published.append(event["seq"])
        if event.get("status") == "stream_opened" and not first_opened:
            first_opened.append(event["seq"])
        elif event.get("status") == "stream_closed":
            closed[event["stream"]] = event["detail"]

    lag_at = array.array("d")  # loop time of each tick
    lags = array.array("d")  # how late each tick woke, s
    rss: list[tuple[float, float]] = []  # (when, MiB), loop time
    load: list[float] = []  # the machine's 1-minute load average, each second
    blocks: list[int] = []  # Python objects alive (allocated blocks), each second
    loop = asyncio.get_running_loop()

    starved = array.array("d")  # per tick: seconds the loop thread sat runnable without a CPU
    schedstat = _open_schedstat()

    async def ticker() -> None:
        waited = _runqueue_wait_s(schedstat)
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            now = loop.time()
            lag_at.append(now)
            lags.append(now - before - TICK_S)
            waited_now = _runqueue_wait_s(schedstat)
            starved.append(waited_now - waited)
            waited = waited_now

    async def sampler() -> None:
        while True:
            rss.append((loop.time(), _rss_mib()))
            blocks.append(sys.getallocatedblocks())
            load.append(os.getloadavg()[0])
            await asyncio.sleep(SAMPLE_S)

    if os.environ.get("SALMONN_BENCH_LOOP_DEBUG"):  # name the callbacks that block the loop
        loop.set_debug(True)
        loop.slow_callback_duration = 0.05
    agent.add_sink("bench-recorder", record, maxsize=1_000_000)
    loop.add_signal_handler(signal.SIGTERM, agent.request_shutdown, "SIGTERM")
    probes = [loop.create_task(ticker()), loop.create_task(sampler())]
    try:
        async with agent:
            assert agent.ws is not None
            ready = loop.time()  # the model is loaded and the server listens
            sys.stdout.write(json.dumps({"url": agent.ws.url}) + "\n")
            sys.stdout.flush()
            await agent.run()
            shutdown = loop.time()
        ws_counters = dict(agent.ws.counters)
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
    report = json.dumps(
        {
            "published": published.tolist(),
            "first_stream_opened": first_opened[0] if first_opened else None,
            "streams": closed,
            "lags_s": [
                lag for when, lag in zip(lag_at, lags, strict=True) if ready <= when <= shutdown
            ],
            "lags_not_starved_s": [
                max(0.0, lag - wait)
                for when, lag, wait in zip(lag_at, lags, starved, strict=False)
                if ready <= when <= shutdown
            ],
            "starved_s": sum(
                wait for when, wait in zip(lag_at, starved, strict=False) if ready <= when
            ),
            "run_s": shutdown - ready,
            "ready_wall": agent.clock.wall(ready),  # loop.time() is time.monotonic()
            "worst_lag_at_s": [
                [round(when - ready, 2), round(lag * 1000, 1)]
                for when, lag in sorted(zip(lag_at, lags, strict=True), key=lambda x: -x[1])
                if ready <= when <= shutdown
            ][:5],
            "rss": [(when - ready, mib) for when, mib in rss if when >= ready],
            "python_blocks": [
                n for (when, _), n in zip(rss, blocks, strict=False) if when >= ready
            ],
            "load_avg_1min": load,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ws": ws_counters,
            "worker": agent.worker.stats() if agent.worker is not None else {},
        }
    )
    await asyncio.to_thread(Path(spec["report"]).write_text, report)


# -- the client side (this process) ---------------------------------------------------------


class _Record:
    """What the recorder client keeps of the events for the per-interval rows (wall times)."""

    def __init__(self) -> None:
        self.t0: float | None = None  # the first stream_opened
        self.finals: list[tuple[float, str, str, float]] = []  # emitted, window, task, latency
        self.drops: list[tuple[float, str, str]] = []  # emitted, window, kind

    def add(self, event: dict[str, Any]) -> None:
        """Keep what the rows need of one event."""
        timing = event.get("timing") or {}
        emitted = timing.get("emitted")
        if emitted is None:
            return
        if event.get("kind") == "status":
            if event.get("status") == "stream_opened" and self.t0 is None:
                self.t0 = emitted
            elif event.get("status") == "window_dropped":
                detail = event.get("detail", {})
                self.drops.append((emitted, detail.get("window", ""), detail.get("kind", "")))
        elif event.get("kind") in KINDS and not event.get("partial"):
            captured = timing.get("captured")
            latency = emitted - captured if captured is not None else float("nan")
            self.finals.append((emitted, event.get("window", ""), event["kind"], latency))


# -- pure functions (the report's logic, tested on synthetic data) ----------------------------


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MiB)`` samples, MiB/min (nan for under 3)."""
    if len(samples) < 3:
        return float("nan")
    t = np.array([p[0] for p in samples], dtype=np.float64)
    v = np.array([p[1] for p in samples], dtype=np.float64)
    spread = float(((t - t.mean()) ** 2).sum())
    if spread == 0:
        return float("nan")
    return float(((t - t.mean()) * (v - v.mean())).sum() / spread * 60.0)


def memory_verdict(
    samples: list[tuple[float, float]],
    max_slope_mib_min: float,
    window_s: float,
    noise_mib: float = 0.0,
) -> dict[str, Any]:
    """Judge an RSS curve, ``(seconds, MiB)`` samples in time order.

    The slope is fitted over every window of ``window_s`` that fits in the run (one starting
    at each sample). A window *climbs* when its slope exceeds ``max_slope_mib_min`` and its
    last quarter's median sits more than ``noise_mib`` above its first quarter's (so one step
    of the allocator, up or down, is not a climb; shrinking is never one). The warm-up ends
    at the start of the first window after which no window climbs: memory has levelled off
    there (with a ``noise_mib``, once memory has also come within it of its median level
    after that point), and the slope over everything after it is the one reported. When the
    last window climbs, the curve never levelled off: a leak. A run too short for one window of
    ``_MIN_WINDOW_SAMPLES`` samples is not judged.

    Returns:
        ``warmup_s`` (None when never levelled or not judged), ``slope_mib_per_min`` (after
        the warm-up; over the whole run when there is none), ``levelled``, ``leak``,
        ``judged`` and ``window_s``.
    """
    out: dict[str, Any] = {
        "warmup_s": None,
        "slope_mib_per_min": slope_mib_per_min(samples),
        "levelled": False,
        "leak": False,
        "judged": False,
        "window_s": window_s,
    }
    if not samples:
        return out
    times = [t for t, _ in samples]
    end = times[-1]
    slopes: list[tuple[int, bool]] = []  # (first sample, climbs) of each whole window
    last = 0
    for first, start in enumerate(times):
        if start + window_s > end:
            break
        while last < len(times) and times[last] <= start + window_s:
            last += 1
        window = samples[first:last]
        if len(window) >= _MIN_WINDOW_SAMPLES:
            quarter = max(1, len(window) // 4)
            rise = float(
                np.median([v for _, v in window[-quarter:]])
                - np.median([v for _, v in window[:quarter]])
            )
            climbs = slope_mib_per_min(window) > max_slope_mib_min and rise > noise_mib
            slopes.append((first, climbs))
    if not slopes:
        return out
    out["judged"] = True
    levelled_from: int | None = None
    for first, climbs in reversed(slopes):
        if climbs:
            break
        levelled_from = first
    if levelled_from is None:
        out["leak"] = True
        return out
    if noise_mib > 0:
        # The windows judge by medians, so a climb shorter than a quarter window escapes them:
        # the warm-up also lasts until memory first reaches its later level, less the noise.
        level = float(np.median([v for _, v in samples[levelled_from:]])) - noise_mib
        levelled_from = next(
            (i for i in range(levelled_from, len(samples)) if samples[i][1] >= level),
            levelled_from,
        )
    out["warmup_s"] = times[levelled_from] - times[0]
    out["slope_mib_per_min"] = slope_mib_per_min(samples[levelled_from:])
    out["levelled"] = True
    return out


def best_kind(tasks: set[str]) -> str:
    """What a window counts as: its best task (`agent.runtime.window_queue.shed_kind`)."""
    return next((k for k in KINDS if k in tasks), "answer")


def _p(values: list[float], q: float) -> float | None:
    values = [v for v in values if v == v]  # no nan
    return round(_percentile(values, q), 3) if values else None


def interval_rows(
    finals: list[tuple[float, str, str, float]],
    drops: list[tuple[float, str, str]],
    rss: list[tuple[float, float]],
    interval_s: float,
) -> list[dict[str, Any]]:
    """One row per ``interval_s`` from the run's start (times are seconds from it).

    ``finals``: ``(t, window, task, latency s)`` of final model events; ``drops``: ``(t,
    window, kind)`` of ``window_dropped`` events; ``rss``: ``(t, MiB)``. A window answered
    counts in the interval of its first final, as its best task; a dropped one in the
    interval of its drop, as the kind named. Each row: ``end_s``, ``windows`` and ``dropped``
    per kind, ``command_p50_s``/``command_p95_s``, ``all_p95_s`` and ``rss_mib`` (the last
    sample in the interval)."""
    windows: dict[str, tuple[float, set[str]]] = {}
    for t, window, task, _ in finals:
        first, tasks = windows.get(window, (t, set()))
        tasks.add(task)
        windows[window] = (min(first, t), tasks)
    ends = [t for t, *_ in finals] + [t for t, *_ in drops] + [t for t, _ in rss]
    count = int(max(ends, default=0.0) // interval_s) + 1 if ends else 0
    rows: list[dict[str, Any]] = [
        {
            "end_s": round((i + 1) * interval_s, 1),
            "windows": dict.fromkeys(KINDS, 0),
            "dropped": dict.fromkeys(KINDS, 0),
            "command_latency": [],
            "all_latency": [],
            "rss_mib": None,
        }
        for i in range(count)
    ]

    def row(t: float) -> dict[str, Any] | None:
        return rows[int(t // interval_s)] if t >= 0 else None

    for first, tasks in windows.values():
        if (r := row(first)) is not None:
            r["windows"][best_kind(tasks)] += 1
    for t, _, kind in drops:
        if (r := row(t)) is not None and kind in KINDS:
            r["windows"][kind] += 1
            r["dropped"][kind] += 1
    for t, _, task, latency in finals:
        if (r := row(t)) is not None:
            r["all_latency"].append(latency)
            if task == "command":
                r["command_latency"].append(latency)
    for t, mib in rss:
        if (r := row(t)) is not None:
            r["rss_mib"] = round(mib, 1)
    for r in rows:
        command, every = r.pop("command_latency"), r.pop("all_latency")
        r["command_p50_s"], r["command_p95_s"] = _p(command, 50), _p(command, 95)
        r["all_p95_s"] = _p(every, 95)
    return rows


def sustained(windows: int, dropped_by_kind: dict[str, int]) -> bool:
    """A run sustained its load: no command window dropped, and under `MAX_DROPPED_SHARE` of
    all its windows."""
    dropped = sum(dropped_by_kind.values())
    return dropped_by_kind.get("command", 0) == 0 and dropped < MAX_DROPPED_SHARE * max(windows, 1)


def capacity(steps: list[dict[str, Any]]) -> int | None:
    """The largest stream count sustained, counting only up to the first step that was not
    (``steps``: ``streams`` and ``sustained``, in rising order); None when none was."""
    best = None
    for step in steps:
        if not step["sustained"]:
            break
        best = step["streams"]
    return best


class _Subscriber:
    """One `/events` client: the seqs it received and how it ended."""

    def __init__(self, index: int, slow: bool, recorder: bool = False) -> None:
        self.index = index
        self.slow = slow
        self.recorder = recorder
        self.record = _Record()
        self.seqs: list[int] = []
        self.dropped_notices = 0
        self.dropped_reported = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.streams_closed = 0
        self.all_streams_closed = asyncio.Event()
        self.expect_closed = 0

    async def run(self, url: str, subscribed: asyncio.Semaphore, read_s: float) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        kwargs: dict[str, Any] = {}
        if self.slow:
            # A reader on a bad link: a small socket buffer, and one message per `read_s`.
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            # No keepalive of its own: the agent, not the client's pings, must end it (4429).
            kwargs = {"sock": sock, "max_queue": 1, "ping_interval": None}
        ws = await connect(url, max_size=None, open_timeout=60, **kwargs)
        try:
            await ws.recv()  # the `subscribed` notice
            subscribed.release()
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                match = _SEQ_RE.search(message)
                seq = int(match.group(1)) if match else -1
                if seq >= 0:
                    self.seqs.append(seq)
                    if self.recorder:
                        self.record.add(json.loads(message))
                    if _STREAM_CLOSED_RE.search(message):
                        self.streams_closed += 1
                        if self.streams_closed >= self.expect_closed:
                            self.all_streams_closed.set()
                elif _DROPPED_NOTICE_RE.search(message):
                    self.dropped_notices += 1
                    self.dropped_reported += json.loads(message)["detail"]["dropped"]
                if self.slow:
                    await asyncio.sleep(read_s)  # the slowness being simulated
        except ConnectionClosed:
            pass
        finally:
            await ws.close()
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason or ""


async def _stream(url: str, stream_id: str, pcm: bytes, seconds: float) -> int:
    """Send ``pcm`` (looped) at real-time pace for ``seconds``; returns the frames sent."""
    from websockets.asyncio.client import connect

    frame = int(BLOCK_S * RATE_HZ) * 2
    sent = 0
    async with connect(url, open_timeout=60) as ws:
        await ws.send(
            json.dumps(
                {"stream": stream_id, "sample_rate": RATE_HZ, "format": "s16le", "channels": 1}
            )
        )
        await ws.recv()  # ready
        loop = asyncio.get_running_loop()
        start = loop.time()
        total = int(seconds / BLOCK_S)
        for k in range(total):
            delay = start + (k + 1) * BLOCK_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing a live microphone
            offset = (k * frame) % len(pcm)
            chunk = pcm[offset : offset + frame]
            if len(chunk) < frame:
                chunk += pcm[: frame - len(chunk)]
            await ws.send(chunk)
            sent += 1
    return sent


async def _drive(args: argparse.Namespace, workdir: Path, streams: int) -> dict[str, Any]:
    """One run at ``streams`` streams: the agent in a child process, the clients here."""
    report_path = workdir / "agent-report.json"
    spec = {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        **answer_paths(args.model, args.transcript, args.command),
        "sounds": args.sounds,
        "report": str(report_path),
    }
    scenes = _scenes(streams, args.scene_s)
    pcms = [(np.clip(s.audio, -1.0, 1.0) * 32767).astype("<i2").tobytes() for s in scenes]
    log_path = workdir / "agent.log"
    with log_path.open("wb") as log:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.load",
            json.dumps(spec),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert child.stdout is not None
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            line = await child.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent did not start: {log_path.read_text()[-3000:]}")
        base = json.loads(line)["url"]
        subscribed = asyncio.Semaphore(0)
        # The first fast client also records every event for the per-interval rows.
        subs = [_Subscriber(i, i < args.slow, i == args.slow) for i in range(args.subscribers)]
        for sub in subs:
            sub.expect_closed = streams
        sub_tasks = [
            asyncio.create_task(s.run(f"{base}/events", subscribed, args.slow_read_s)) for s in subs
        ]
        async with asyncio.timeout(60):
            for _ in subs:
                await subscribed.acquire()
        started = time.monotonic()
        sent = await asyncio.gather(
            *(
                _stream(f"{base}/audio", f"load{i}", pcms[i % len(pcms)], args.seconds)
                for i in range(streams)
            )
        )
        streamed_s = time.monotonic() - started
        # Let the last windows be answered: wait until a fast client saw every stream close.
        fast = [s for s in subs if not s.slow]
        if fast:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fast[0].all_streams_closed.wait(), _SETTLE_TIMEOUT_S)
        child.send_signal(signal.SIGTERM)
        async with asyncio.timeout(120):
            code = await child.wait()
        _, pending = await asyncio.wait(sub_tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*sub_tasks, return_exceptions=True)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    agent = json.loads(report_path.read_text())
    if os.environ.get("SALMONN_BENCH_LOOP_DEBUG"):
        logger.warning("agent log:\n%s", log_path.read_text(errors="replace")[-20000:])
    return _summarise(args, streams, agent, subs, sent, streamed_s, code, log_path)


_TOO_SLOW_RE = re.compile(r"closing /events client .*?: (too slow: .*)")
#: What became of a client closed as too slow (INFO lines of `agent.protocols.ws`): it read
#: up to the close frame, or the agent dropped it (1006 on its side).
_SLOW_DROPPED_RE = re.compile(r"dropping /events client .*?: (.*)")


def _summarise(
    args: argparse.Namespace,
    stream_count: int,
    agent: dict[str, Any],
    subs: list[_Subscriber],
    sent: list[int],
    streamed_s: float,
    exit_code: int,
    log_path: Path,
) -> dict[str, Any]:
    published: list[int] = agent["published"]
    first = agent["first_stream_opened"]
    expected = [s for s in published if first is not None and s >= first]
    expected_set = set(expected)
    fast = [s for s in subs if not s.slow]
    slow = [s for s in subs if s.slow]
    lost_per_fast = []
    out_of_order = 0
    for s in fast:
        got = [q for q in s.seqs if q >= (first or 0)]
        lost_per_fast.append(len(expected_set - set(got)))
        out_of_order += sum(1 for a, b in itertools.pairwise(got) if b <= a)
    closes = collections.Counter(
        f"{s.close_code} {re.sub(r'[0-9.]+', 'N', s.close_reason)}".strip() for s in slow
    )
    lags_ms = [1000 * v for v in agent["lags_s"]]
    own_ms = [1000 * v for v in agent["lags_not_starved_s"]]
    rss = agent["rss"]
    streams = agent["streams"]
    windows = {k: sum(int(d.get(k, 0)) for d in streams.values()) for k in (
        "windows", "answered", "dropped", "failed", "early_windows")}  # fmt: skip
    dropped_by_kind = {
        k: sum(int(d.get("dropped_by_kind", {}).get(k, 0)) for d in streams.values()) for k in KINDS
    }
    run_s = rss[-1][0] if rss else 0.0
    window_s = run_s / 3 if args.slope_window_s is None else min(args.slope_window_s, run_s / 3)
    memory = memory_verdict(rss, args.max_slope_mib_min, window_s, args.noise_mib)
    slope = memory["slope_mib_per_min"]
    # Rows from the first stream's opening (the recorder's clock is the agent's wall clock).
    record = next((s.record for s in subs if s.recorder), _Record())
    t0 = record.t0 if record.t0 is not None else agent.get("ready_wall") or 0.0
    ready = agent.get("ready_wall") or t0
    rows = interval_rows(
        [(t - t0, w, k, lat) for t, w, k, lat in record.finals],
        [(t - t0, w, k) for t, w, k in record.drops],
        [(ready + t - t0, mib) for t, mib in rss],
        args.interval_s,
    )
    log_text = log_path.read_text(errors="replace")
    server_reasons = collections.Counter(
        re.sub(r"\d+(\.\d+)?", "N", m.group(1)) for m in _TOO_SLOW_RE.finditer(log_text)
    )
    slow_dropped = collections.Counter(m.group(1) for m in _SLOW_DROPPED_RE.finditer(log_text))
    return {
        "model": args.model,
        "seconds": args.seconds,
        "streamed_s": round(streamed_s, 1),
        "subscribers": len(subs),
        "fast": len(fast),
        "slow": len(slow),
        "streams": stream_count,
        "frames_sent": sum(sent),
        "windows": windows,
        "dropped_by_kind": dropped_by_kind,
        "sustained": sustained(windows["windows"], dropped_by_kind),
        "intervals": rows,
        "streams_closed": len(streams),
        "events_published": len(expected),
        "events_per_s": round(len(expected) / streamed_s, 1) if streamed_s else 0.0,
        "messages_to_clients": sum(len(s.seqs) for s in subs),
        "fast_delivered_min": min((len(expected_set & set(s.seqs)) for s in fast), default=0),
        "fast_lost_total": sum(lost_per_fast),
        "fast_out_of_order": out_of_order,
        "fast_dropped_notices": sum(s.dropped_notices for s in fast),
        "fast_close_codes": dict(collections.Counter(str(s.close_code) for s in fast)),
        "slow_closed_too_slow": sum(1 for s in slow if s.close_code == 4429),
        "slow_close": dict(closes),
        "slow_received": [len(s.seqs) for s in slow],
        "slow_dropped_reported": [s.dropped_reported for s in slow],
        "ws_counters": agent["ws"],
        "too_slow_reasons": dict(server_reasons),
        "slow_dropped_after_close": dict(slow_dropped),
        "loop_lag_ms": {
            "p50": round(_percentile(lags_ms, 50), 2),
            "p99": round(_percentile(lags_ms, 99), 2),
            "max": round(max(lags_ms, default=float("nan")), 2),
            "ticks": len(lags_ms),
            "worst_at_s_ms": agent["worst_lag_at_s"],
            "p99_without_cpu_wait": round(_percentile(own_ms, 99), 2),
            "max_without_cpu_wait": round(max(own_ms, default=float("nan")), 2),
            "loop_thread_cpu_wait_s": round(agent["starved_s"], 2),
            "run_s": round(agent["run_s"], 1),
        },
        "rss_mib": {
            "peak": round(agent["peak_rss_mib"], 1),
            "start": round(rss[0][1], 1) if rss else None,
            "end": round(rss[-1][1], 1) if rss else None,
            "slope_mib_per_min": round(slope, 2),
            "warmup_s": memory["warmup_s"],
            "levelled": memory["levelled"],
            "leak": memory["leak"],
            "judged": memory["judged"],
            "slope_window_s": round(memory["window_s"], 1),
            "flat": bool(memory["levelled"] and slope <= args.max_slope_mib_min),
            "noise_mib": args.noise_mib,
            "samples": len(rss),
            "every_s": [round(v, 1) for _, v in rss],
            "python_blocks_start_end": [
                agent["python_blocks"][0] if agent["python_blocks"] else None,
                agent["python_blocks"][-1] if agent["python_blocks"] else None,
            ],
        },
        "worker": agent["worker"],
        "machine_load_1min": {
            "max": round(max(agent["load_avg_1min"], default=float("nan")), 2),
            "mean": round(float(np.mean(agent["load_avg_1min"] or [float("nan")])), 2),
        },
        "agent_exit_code": exit_code,
        "agent_log_tracebacks": log_text.count("Traceback"),
    }


def _out(line: str) -> None:
    print(line, flush=True)  # noqa: T201 (benchmark output)


def _trend(rss: dict[str, Any]) -> str:
    if not rss["judged"]:
        return "too short to judge"
    if rss["leak"]:
        return "LEAK: never levelled off"
    return "flat" if rss["flat"] else "levelled, but the slope after is steep"


def _kinds(counts: dict[str, int]) -> str:
    return " / ".join(str(counts.get(k, 0)) for k in KINDS)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_table(r: dict[str, Any]) -> None:
    lag, rss, w = r["loop_lag_ms"], r["rss_mib"], r["windows"]
    rows = [
        ("run", f"{r['streamed_s']:g} s, {r['streams']} real-time /audio streams, "
         f"{r['subscribers']} /events clients ({r['slow']} slow), model `{r['model']}`"),
        ("windows", f"{w['windows']} ({w['answered']} answered, {w['dropped']} dropped by "
         f"overload, {w['failed']} failed), and {w.get('early_windows', 0)} early command reads "
         "(the rows below count each as a command window of its own, and the rest of its "
         "segment as the transcript window it becomes)"),
        ("dropped by kind", f"{_kinds(r['dropped_by_kind'])} (command / transcript / caption / "
         f"answer): {'sustained' if r['sustained'] else 'NOT sustained'} (0 commands and under "
         f"{MAX_DROPPED_SHARE:.0%} of windows dropped)"),
        ("events published", f"{r['events_published']} ({r['events_per_s']:g}/s); "
         f"{r['messages_to_clients']} messages to clients"),
        ("fast clients: delivered", f"{r['fast_delivered_min']} of {r['events_published']} "
         f"(the least any fast client got), out of order: {r['fast_out_of_order']}"),
        ("events lost (fast clients)", str(r["fast_lost_total"])),
        ("fast clients: closed with", ", ".join(f"{k} x{v}" for k, v in
                                                 r["fast_close_codes"].items())),
        ("slow clients: dropped", f"{r['ws_counters'].get('events_too_slow', 0)} closed with 4429 "
         "by the agent (" + "; ".join(f"{k} x{v}" for k, v in r["too_slow_reasons"].items())
         + "); close codes the slow clients saw: "
         + ", ".join(f"{k} x{v}" for k, v in r["slow_close"].items())
         + "".join(f"; then dropped by the agent: {k} x{v}"
                   for k, v in r.get("slow_dropped_after_close", {}).items())),
        ("event-loop lag", f"p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms "
         f"({lag['ticks']} ticks of {TICK_S * 1000:g} ms)"),
        ("lag less CPU wait", f"p99 {lag['p99_without_cpu_wait']} ms, max "
         f"{lag['max_without_cpu_wait']} ms (the loop thread waited {lag['loop_thread_cpu_wait_s']}"
         f" s of {lag['run_s']} s for a CPU)"),
        ("RSS", f"peak {rss['peak']} MiB; {rss['start']} -> {rss['end']} MiB; warm-up "
         + (f"{rss['warmup_s']:.0f} s" if rss["warmup_s"] is not None else "not found")
         + f" (no later {rss['slope_window_s']:g} s climbs over {r['max_slope_mib_min']:g} "
         f"MiB/min by more than {rss.get('noise_mib', 0):g} MiB); slope "
         + ("after it" if rss["warmup_s"] is not None else "over the run")
         + f" {rss['slope_mib_per_min']} MiB/min ({_trend(rss)})"),
        ("machine load (1 min avg)", f"mean {r['machine_load_1min']['mean']}, max "
         f"{r['machine_load_1min']['max']} on {os.cpu_count()} CPUs (shared with other work)"),
        ("agent exit", f"code {r['agent_exit_code']}, {r['agent_log_tracebacks']} tracebacks"),
    ]  # fmt: skip
    _out("| measure | result |")
    _out("|---|---|")
    for name, value in rows:
        _out(f"| {name} | {value} |")


def _print_intervals(r: dict[str, Any]) -> None:
    _out(
        f"\nPer {r['interval_s']:g} s (windows counted as their best task: command / transcript"
        " / caption / answer; latency from a window's last sample to its final event):\n"
    )
    _out("| until | windows in | dropped | command p50 / p95 s | all p95 s | RSS MiB |")
    _out("|---:|---|---|---|---:|---:|")
    for row in r["intervals"]:
        _out(
            f"| {row['end_s']:g} s | {_kinds(row['windows'])} | {_kinds(row['dropped'])} | "
            f"{_s(row['command_p50_s'])} / {_s(row['command_p95_s'])} | {_s(row['all_p95_s'])} "
            f"| {row['rss_mib'] if row['rss_mib'] is not None else '-'} |"
        )


def _plot(r: dict[str, Any], path: str) -> str | None:
    """RSS (every sample) and command p95 (per interval) over time; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    every = r["rss_mib"]["every_s"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([i * SAMPLE_S / 60 for i in range(len(every))], every, color="tab:blue")
    ax.set_xlabel("minutes since the agent was ready")
    ax.set_ylabel("agent RSS (MiB)", color="tab:blue")
    warmup = r["rss_mib"]["warmup_s"]
    if warmup is not None:
        ax.axvline(warmup / 60, color="tab:blue", linestyle=":", label="end of warm-up")
        ax.legend(loc="lower right")
    p95 = ax.twinx()
    rows = [row for row in r["intervals"] if row["command_p95_s"] is not None]
    p95.plot(
        [row["end_s"] / 60 for row in rows],
        [row["command_p95_s"] for row in rows],
        "o-",
        color="tab:red",
    )
    p95.set_ylabel("command p95 per interval (s)", color="tab:red")
    p95.set_ylim(bottom=0)
    ax.set_title(f"bench load: {r['streams']} streams, {r['subscribers']} clients, {r['model']}")
    ax.grid(True, alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _print_capacity(
    steps: list[dict[str, Any]], best: int | None, args: argparse.Namespace
) -> None:
    _out(
        f"\nCapacity: {args.seconds:g} s at each stream count; sustained = 0 command windows "
        f"and under {MAX_DROPPED_SHARE:.0%} of all windows dropped.\n"
    )
    _out("| streams | windows | dropped (command / transcript / caption / answer) | dropped % "
         "| command p95 s (worst interval) | RSS slope MiB/min | sustained |")  # fmt: skip
    _out("|---:|---:|---|---:|---:|---|---|")
    for r in steps:
        total = r["windows"]["windows"]
        share = 100 * sum(r["dropped_by_kind"].values()) / max(total, 1)
        worst = max((row["command_p95_s"] or 0.0 for row in r["intervals"]), default=0.0)
        _out(
            f"| {r['streams']} | {total} | {_kinds(r['dropped_by_kind'])} | {share:.1f} | "
            f"{worst:.2f} | {r['rss_mib']['slope_mib_per_min']} ({_trend(r['rss_mib'])}) | "
            f"{'yes' if r['sustained'] else 'no'} |"
        )
    _out(
        f"\n**Capacity: {best} streams**"
        if best is not None
        else "\n**Capacity: none of the stream counts tried was sustained**"
    )


def _print_markdown(
    report: dict[str, Any], steps: list[dict[str, Any]] | None, best: int | None,
    args: argparse.Namespace, plot: str | None,
) -> None:  # fmt: skip
    minutes = (
        f"--minutes {args.seconds / 60:g}" if args.seconds >= 60 else f"--seconds {args.seconds:g}"
    )
    command = f"salmonn-live bench load {minutes} --streams {report['streams']}"
    if steps is not None:
        command = f"salmonn-live bench load {minutes} --find-capacity"
    if args.model != "tiny-random":
        command += f" --model {args.model}"
    if args.sounds:
        command += " --sounds"
    if args.threads != 1:
        command += f" --threads {args.threads}"
    _out(f"## Load over time (`{command}`)\n")
    _out(f"{report['machine']}, model `{report['model']}`.\n")
    if steps is not None:
        _print_capacity(steps, best, args)
        _out(f"\nThe run at {report['streams']} streams:\n")
    _print_table(report)
    _print_intervals(report)
    if plot:
        _out(f"\n![agent RSS and command p95 over time]({plot})")
    elif args.plot:
        _out("\n(No plot: matplotlib is not installed; `pip install '.[bench]'`.)")


def run(args: argparse.Namespace) -> int:
    """Run the load benchmark (or, with ``--find-capacity``, one run per stream count); print
    a Markdown section (or ``--json``). Exit code 1 when fast clients lost events, memory never
    levelled off, the agent failed, or (``--find-capacity``) no stream count was sustained."""
    if args.minutes is not None:
        args.seconds = args.minutes * 60.0
    try:
        counts = [int(n) for n in str(args.capacity_steps).split(",") if n.strip()]
    except ValueError:
        counts = []
    if args.find_capacity and (not counts or min(counts) < 1 or counts != sorted(set(counts))):
        logger.error("expected rising stream counts for --capacity-steps, got %r",
                     args.capacity_steps)  # fmt: skip
        return 2
    if args.interval_s <= 0 or (args.slope_window_s is not None and args.slope_window_s <= 0):
        logger.error("expected --interval-s > 0 and --slope-window-s > 0")
        return 2
    if not 0 <= args.slow <= args.subscribers or args.streams < 1 or args.seconds <= 0:
        logger.error(
            "expected 0 <= --slow <= --subscribers, --streams >= 1 and --seconds > 0; got "
            "--slow %d --subscribers %d --streams %d --seconds %g",
            args.slow,
            args.subscribers,
            args.streams,
            args.seconds,
        )
        return 2
    steps: list[dict[str, Any]] = []
    best: int | None = None
    with tempfile.TemporaryDirectory(prefix="salmonn-load-") as tmp:
        if args.find_capacity:
            for n in counts:
                logger.warning("bench load: %d streams for %g s", n, args.seconds)
                step = asyncio.run(_drive(args, Path(tmp), n))
                steps.append(step)
                if not step["sustained"]:
                    break  # more streams only drop more
            best = capacity(steps)
            report = next((r for r in steps if r["streams"] == best), steps[-1])
        else:
            report = asyncio.run(_drive(args, Path(tmp), args.streams))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    for r in [report, *steps]:
        r["machine"], r["interval_s"], r["max_slope_mib_min"] = (
            machine,
            args.interval_s,
            args.max_slope_mib_min,
        )
    plot = _plot(report, args.plot) if args.plot else None
    if args.plot and plot is None:
        logger.warning("matplotlib is not installed (pip install '.[bench]'): no plot")
    if args.json:
        out = dict(report)
        if args.find_capacity:
            out = {"capacity_streams": best, "steps": steps, "plot": plot}
        else:
            out["plot"] = plot
        _out(json.dumps(out, indent=2))
    else:
        _print_markdown(report, steps if args.find_capacity else None, best, args, plot)
    # Memory is judged on the run reported: an overloaded step's backlog may well grow.
    ok = (
        all(
            r["fast_lost_total"] == 0
            and r["agent_exit_code"] == 0
            and r["agent_log_tracebacks"] == 0
            for r in steps or [report]
        )
        and not report["rss_mib"]["leak"]
        and (best is not None or not args.find_capacity)
    )
    return 0 if ok else 1


if __name__ == "__main__":  # the agent side, started by `_drive`
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.protocols.ws").setLevel(logging.INFO)  # what ends slow clients
    asyncio.run(_serve(json.loads(sys.argv[1])))
