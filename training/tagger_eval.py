"""The sound tagger on the GCompris recordings: label-group accuracy per class, and its cost.

``python -m training.tagger_eval --split test`` prints, for each pooling, top-1 / top-3
label-group accuracy per sound class and overall, and how often music is heard as music;
``--cost`` adds the cost of a 0.96 s patch on one core, one patch per call and batched.
A clip is right at top-k when one of its expected groups (`training.gcompris`) is among the
tagger's k best groups (`model.sound_tagger.SoundTagger.top_groups`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from model.sound_tagger import (
    POOLINGS,
    Pooling,
    SoundTagger,
    SoundTaggerConfig,
    load_sound_tagger,
    log_mel_patches,
    pool,
)
from training.gcompris import RECORDING_BUNDLES, GcomprisClip, Split, clips_of, load_clip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipResult:
    """One clip's answer: its label, the best groups and the best classes."""

    clip: GcomprisClip
    top_groups: list[tuple[str, float]]
    top_labels: list[tuple[str, float]]

    def hit(self, k: int) -> bool:
        """Whether an expected group is among the first ``k`` groups."""
        return any(group in self.clip.expected_groups for group, _ in self.top_groups[:k])


def clip_scores(
    tagger: SoundTagger, clips: Sequence[GcomprisClip]
) -> list[npt.NDArray[np.float32]]:
    """Per-patch scores of each clip, shape (patches, 521), the clips batched together."""
    return tagger.scores_batch([load_clip(clip) for clip in clips])


def rank(
    tagger: SoundTagger,
    clips: Sequence[GcomprisClip],
    scores: Sequence[npt.NDArray[np.float32]],
    pooling: Pooling,
) -> list[ClipResult]:
    """Pool each clip's scores and rank its groups and classes."""
    results = []
    for clip, patch_scores in zip(clips, scores, strict=True):
        pooled = pool(patch_scores, pooling)
        results.append(ClipResult(clip, tagger.top_groups(pooled, 3), tagger.top_labels(pooled, 3)))
    return results


def summarize(results: Sequence[ClipResult]) -> dict[str, Any]:
    """Top-1 / top-3 accuracy overall, per sound class and per source (the recordings of
    `RECORDING_BUNDLES` or the games' effects), and music heard as music (%)."""

    def rates(items: Sequence[ClipResult]) -> dict[str, float | int]:
        return {
            "clips": len(items),
            "top1": round(100.0 * sum(r.hit(1) for r in items) / len(items), 1),
            "top3": round(100.0 * sum(r.hit(3) for r in items) / len(items), 1),
        }

    classes = sorted({str(r.clip.sound_class) for r in results})
    music = [r for r in results if r.clip.is_music]
    return {
        "overall": rates(results),
        "per_source": {
            source: rates(items)
            for source, items in (
                ("recordings", [r for r in results if r.clip.bundle in RECORDING_BUNDLES]),
                ("game effects", [r for r in results if r.clip.bundle not in RECORDING_BUNDLES]),
            )
            if items
        },
        "per_class": {
            name: rates([r for r in results if r.clip.sound_class == name]) for name in classes
        },
        "music_as_music": round(
            100.0 * sum(r.top_groups[0][0] == "music" for r in music) / len(music), 1
        )
        if music
        else None,
    }


def patch_cost_ms(
    tagger: SoundTagger, batch_patches: int, seconds: float = 3.0
) -> dict[str, float]:
    """Milliseconds per 0.96 s patch: front end, graph, and both, ``batch_patches`` per call.

    The front end is timed on a clip that gives exactly ``batch_patches`` patches, the graph
    on those patches; each is repeated for about ``seconds``.
    """
    config = tagger.config
    rng = np.random.default_rng(0)
    samples = config.patch_samples + (batch_patches - 1) * config.patch_hop_samples
    audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)

    def per_patch(call: Any) -> float:
        call()  # warm-up
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call()
            runs += 1
        return 1000.0 * (time.perf_counter() - started) / runs / batch_patches

    patches = log_mel_patches(audio, config)
    front_end = per_patch(lambda: log_mel_patches(audio, config))
    graph = per_patch(lambda: tagger.run_patches(patches))
    return {
        "front_end_ms": round(front_end, 3),
        "graph_ms": round(graph, 3),
        "total_ms": round(front_end + graph, 3),
    }


def _table(summary: dict[str, Any]) -> str:
    lines = [f"{'class':<16} {'clips':>5} {'top1 %':>7} {'top3 %':>7}"]
    rows = [*summary["per_class"].items(), *summary["per_source"].items()]
    for name, row in [*rows, ("overall", summary["overall"])]:
        lines.append(f"{name:<16} {row['clips']:>5} {row['top1']:>7} {row['top3']:>7}")
    lines.append(f"music heard as music: {summary['music_as_music']} %")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m training.tagger_eval [--split dev|test] [--cost] [--json]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--source", default=SoundTaggerConfig.source)
    parser.add_argument("--pooling", choices=POOLINGS, action="append")
    parser.add_argument("--score-output", choices=("float", "quantized"), default="float")
    parser.add_argument("--generic-yield", type=float, default=SoundTaggerConfig.generic_yield)
    parser.add_argument("--log-offset", type=float, default=SoundTaggerConfig.log_offset)
    parser.add_argument("--cost", action="store_true", help="also time a patch on one core")
    parser.add_argument("--json", action="store_true", help="every clip's groups and labels")
    args = parser.parse_args(argv)

    config = SoundTaggerConfig(
        source=args.source,
        score_output=args.score_output,
        generic_yield=args.generic_yield,
        log_offset=args.log_offset,
    )
    tagger = load_sound_tagger(config)
    split: Split = args.split
    clips = clips_of(split)
    scores = clip_scores(tagger, clips)
    report: dict[str, Any] = {"split": split, "config": repr(config), "poolings": {}}
    for pooling in args.pooling or list(POOLINGS):
        results = rank(tagger, clips, scores, pooling)
        report["poolings"][pooling] = summarize(results)
        if args.json:
            report["poolings"][pooling]["clips"] = [
                {
                    "clip": r.clip.key,
                    "class": r.clip.sound_class,
                    "expected": list(r.clip.expected_groups),
                    "groups": r.top_groups,
                    "labels": r.top_labels,
                }
                for r in results
            ]
    if args.cost:
        one_core = load_sound_tagger(replace(config, intra_op_threads=1))
        report["cost_one_core"] = {
            "one_patch_per_call": patch_cost_ms(one_core, 1),
            "8_patches_per_call": patch_cost_ms(one_core, 8),
            "32_patches_per_call": patch_cost_ms(one_core, 32),
        }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return 0
    sys.stdout.write(f"{len(clips)} {split} clips, {config}\n")
    for pooling, summary in report["poolings"].items():
        sys.stdout.write(f"\n-- pooling {pooling}\n{_table(summary)}\n")
    for name, cost in report.get("cost_one_core", {}).items():
        sys.stdout.write(f"cost {name}: {cost}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
