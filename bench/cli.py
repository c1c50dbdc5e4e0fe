"""`salmonn-live bench ...`: speed and memory benchmarks (results go in BENCHMARKS.md).

Each benchmark is a module in `bench/` with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

_BENCHMARKS = {
    "model": ("bench.model", "load time, encoder, Q-Former, prefill and decode speed, peak RSS"),
    "pipeline": (
        "bench.pipeline",
        "live pipeline: end-of-utterance latency p50/p95, real-time streams, vs the baseline",
    ),
    "cluster": (
        "bench.cluster",
        "edge + worker pool over MQTT 5: windows/s and latency with 1..N workers",
    ),
    "load": (
        "bench.load",
        "many /events clients (some slow) and real-time /audio streams: memory, loop lag, losses",
    ),
    "scenes": (
        "bench.scenes",
        "plain `run` on recorded scenes: transcript WER, intents, captions, command latency",
    ),
    "languages": (
        "bench.languages",
        "Whisper language detection, transcript WER and translation in eight languages",
    ),
    "segment": (
        "bench.segment",
        "segmenter throughput (x real time per core) and quality on generated scenes",
    ),
    "sounds": (
        "bench.sounds",
        "sound tagger: real recordings and synthetic classes named, false events, patch cost",
    ),
    "wyoming": (
        "bench.wyoming",
        "salmonn-live wyoming through the wyoming client: WER vs run's Whisper, latency, 8 clients",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark",
        description="Speed and memory benchmarks. Record what they print in BENCHMARKS.md,"
        " with the machine, the command and the date.",
    )
    kinds = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in _BENCHMARKS.items():
        sub = kinds.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
