"""`salmonn-live bench segment`: segmenter throughput (x real time per core) and scene quality.

Throughput is audio seconds divided by the CPU time of this process (``time.process_time``),
so it is "x real time per core" even on a shared machine; torch is limited to one thread for
the Silero run. Quality is scored on generated scenes (:mod:`training.scenes`).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from typing import Any

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--scenes", type=int, default=6, help="number of generated scenes")
    parser.add_argument("--scene-s", type=float, default=60.0, help="length of each scene, s")
    parser.add_argument(
        "--noise-s", type=float, default=60.0, help="noise-only audio per background, s"
    )
    parser.add_argument("--chunk-ms", type=int, default=1000, help="push size, ms")
    parser.add_argument(
        "--vad", choices=("webrtc", "silero", "both"), default="both", help="backends to measure"
    )
    parser.add_argument("--frame-ms", type=int, default=20, help="webrtcvad frame, ms")


def _run_scenes(config: Any, scenes: list[Any], chunk: int) -> tuple[float, list[list[Any]]]:
    from streaming.events import SegmentEnded
    from streaming.pcm import SAMPLE_RATE_HZ
    from streaming.segmenter import Segmenter

    segmenter = Segmenter(config)
    # Warm-up (Silero's TorchScript optimises itself on the first calls).
    segmenter.push(scenes[0].audio[: SAMPLE_RATE_HZ * 2])
    segmenter.flush()
    cpu = 0.0
    outputs = []
    for scene in scenes:
        segmenter.reset()
        started = time.process_time()
        events = []
        for i in range(0, scene.audio.size, chunk):
            events += segmenter.push(scene.audio[i : i + chunk])
        events += segmenter.flush()
        cpu += time.process_time() - started
        outputs.append([e for e in events if isinstance(e, SegmentEnded)])
    return cpu, outputs


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a Markdown report. Returns 0."""
    import numpy as np
    import torch

    from streaming.pcm import SAMPLE_RATE_HZ
    from streaming.segmenter import SegmenterConfig
    from training.evaluate import Score, SegmentSpan, score_scene
    from training.scenes import BACKGROUND_NAMES, make_noise_only, make_scene

    torch.set_num_threads(1)
    scenes = [
        make_scene(seed, args.scene_s, n_speech=6, n_sounds=8, noise_level_dbfs=-50 + seed % 4 * 6)
        for seed in range(args.scenes)
    ]
    noise = [
        make_noise_only(100 + i, args.noise_s, name, noise_level_dbfs=-35.0)
        for i, name in enumerate(BACKGROUND_NAMES)
    ]
    chunk = 16 * args.chunk_ms
    backends = ("webrtc", "silero") if args.vad == "both" else (args.vad,)
    lines = [
        f"machine: {platform.machine()}, {platform.processor() or platform.system()},"
        f" python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        f"scenes: {len(scenes)} x {args.scene_s:.0f} s (6 utterances + 8 sound events each,"
        f" SNR 10-30 dB, background -50..-32 dBFS) + {len(noise)} x {args.noise_s:.0f} s noise-only"
        f" at -35 dBFS; push size {args.chunk_ms} ms",
        "",
        "| backend | x real time per core | speech recall | as speech | median start err ms"
        " | median end err ms | p90 start/end ms | sound as sound/mixed | as sound"
        " | false segs / noise-min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_label_lines = []
    for vad in backends:
        config = SegmenterConfig(vad=vad, frame_ms=args.frame_ms)  # type: ignore[arg-type]
        cpu, outputs = _run_scenes(config, scenes + noise, chunk)
        audio_s = sum(s.audio.size for s in scenes + noise) / SAMPLE_RATE_HZ
        score = Score()
        for scene, ended in zip(scenes + noise, outputs, strict=True):
            spans = [SegmentSpan.from_event(e) for e in ended]
            score_scene(scene.events, spans, scene.audio.size, score=score)
        p90 = (
            f"{1000 * np.percentile(score.start_errors_s, 90):.0f}/"
            f"{1000 * np.percentile(score.end_errors_s, 90):.0f}"
            if score.start_errors_s
            else "-"
        )
        lines.append(
            f"| {vad} ({config.effective_frame_ms:g} ms frames) | {audio_s / cpu:.0f}x"
            f" | {score.speech_found}/{score.speech_events} | {score.speech_as_speech}"
            f" | {1000 * score.median_start_error_s:.0f} | {1000 * score.median_end_error_s:.0f}"
            f" | {p90} | {score.sound_found}/{score.sound_events} | {score.sound_as_sound}"
            f" | {score.false_segments} / {score.noise_only_s / 60:.1f} min"
            f" = {score.false_per_minute:.2f} |"
        )
        by_label_lines.append(
            f"{vad}: sound events found by label: "
            + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in sorted(score.sound_by_label.items()))
        )
        for miss in score.misses:
            by_label_lines.append(f"  {vad} miss: {miss}")
    for line in [*lines, "", *by_label_lines]:
        print(line)  # noqa: T201
    return 0
