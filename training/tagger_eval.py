"""The sound tagger on the GCompris recordings: label-group accuracy per class, and its cost.

``python -m training.tagger_eval --split test`` prints, for each pooling, top-1 / top-3
label-group accuracy per sound class and overall, and how often music is heard as music;
``--cost`` adds the cost of a 0.96 s patch on one core, one patch per call and batched.
A clip is right at top-k when one of its expected groups (`training.gcompris`) is among the
k best groups of its sound event (`event_groups`).

**The sound event** of a window is what a smart home would be told: the tagger's best label
groups (`model.sound_tagger.SoundTagger.top_groups`) without `NOT_SOUND_EVENTS`. Speech is the
transcript's business, not a sound event, and silence, room tone and noise are what is left
when nothing happens; so a window of talking or of a quiet room has no sound event above a
threshold, and a dog barking under speech is reported as ``dog``.

`evaluate_tagger` scores the tagger on a manifest (``salmonn-live eval --tagger``): each
``audiocaption`` entry is right when its sound event names the sound classes its caption names,
by `training.corpus.SOUND_CLASS_KEYWORDS` applied to the group's name (``smoke_alarm`` ->
"smoke alarm" names ``alarm_beeping``), as `training.scoring.caption_correct` scores an LLM's
caption.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from training.train import Sample

logger = logging.getLogger(__name__)

NOT_SOUND_EVENTS: frozenset[str] = frozenset({"speech", "silence", "room", "noise"})
"""Label groups that are never a sound event (module docstring)."""


def event_groups(
    tagger: SoundTagger, pooled: npt.NDArray[np.float32], k: int = 3
) -> list[tuple[str, float]]:
    """The ``k`` best groups of pooled scores (521,) that are sound events, best first."""
    ranked = tagger.top_groups(pooled, k + len(NOT_SOUND_EVENTS))
    return [(group, score) for group, score in ranked if group not in NOT_SOUND_EVENTS][:k]


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
        results.append(ClipResult(clip, event_groups(tagger, pooled), tagger.top_labels(pooled, 3)))
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


# -- scoring a manifest (`salmonn-live eval --tagger`) -------------------------------------


def event_names(group: str) -> set[str]:
    """The sound classes (`training.corpus.SOUND_CLASS_KEYWORDS`) a published group names.

    The group's name is read as text with underscores as spaces (``smoke_alarm`` -> "smoke
    alarm" names ``alarm_beeping``); a class outside every group is published under its
    display name, which is read the same way.
    """
    from training.corpus import sound_classes_named

    return sound_classes_named(group.replace("_", " "))


def tagged_correct(expected: str, groups: Sequence[tuple[str, float]], k: int) -> bool:
    """Whether a sound event names the classes of an expected caption, at top-``k``.

    Top-1 is `training.scoring.caption_correct`'s rule on the first group: it names exactly
    the classes the caption names (a caption naming none, like "A man speaks.", wants a group
    naming none). At ``k`` > 1 every class the caption names is named by one of the first
    ``k`` groups; a caption naming none is scored as at top-1.
    """
    from training.corpus import sound_classes_named

    wanted = sound_classes_named(expected)
    first = event_names(groups[0][0]) if groups else set()
    if k == 1 or not wanted:
        return first == wanted
    named: set[str] = set()
    for group, _ in groups[:k]:
        named |= event_names(group)
    return wanted <= named


def _sample_audio(sample: Sample, loader: Any) -> npt.NDArray[np.float32]:
    from training.train import load_sample_audio

    return np.asarray(load_sample_audio(sample, loader), dtype=np.float32)


def evaluate_tagger(
    tagger: SoundTagger,
    samples: Sequence[Sample],
    loader: Any,
    *,
    limit: int | None = None,
    clips_per_call: int = 16,
) -> dict[str, Any]:
    """Tag every ``audiocaption`` entry's clip and score its sound event against the caption.

    Each distinct clip (with its ``expand_wav`` clips) is tagged once, ``clips_per_call``
    clips batched per `SoundTagger.scores_batch`, pooled with ``tagger.config.pooling``.

    Args:
        tagger: the loaded tagger.
        samples: the manifest's entries (other tasks are skipped and counted).
        loader: reads one audio file as 16 kHz mono float32.
        limit: score only the first ``limit`` audiocaption entries.
        clips_per_call: clips per batched call.

    Returns:
        ``{"wer": None, "intent_accuracy": None, "sound_accuracy", "sound_accuracy_top3",
        "count": {"asr": 0, "command": 0, "audiocaption"}, "skipped", "per_class", "items"}``:
        the eval JSON's keys (its speech figures None: no LLM, no Whisper), top-3, per class
        (``{class: {"n", "top1", "top3"}}``, the caption's classes joined by commas), and per
        item ``{"path", "task", "expected", "predicted", "correct", "correct_top3", "groups",
        "labels"}`` with the event's groups and the best classes as ``[name, score]``.
    """
    from training.corpus import sound_classes_named

    chosen = [s for s in samples if s.task == "audiocaption"]
    chosen = chosen[:limit] if limit is not None else chosen
    clips: dict[tuple[str, ...], Sample] = {}
    for sample in chosen:
        clips.setdefault((str(sample.path), *map(str, sample.expand_wav)), sample)
    keys = list(clips)
    pooled: dict[tuple[str, ...], npt.NDArray[np.float32]] = {}
    for start in range(0, len(keys), clips_per_call):
        batch = keys[start : start + clips_per_call]
        scores = tagger.scores_batch([_sample_audio(clips[key], loader) for key in batch])
        for key, patch_scores in zip(batch, scores, strict=True):
            pooled[key] = pool(patch_scores, tagger.config.pooling)
    items: list[dict[str, Any]] = []
    for sample in chosen:
        window = pooled[(str(sample.path), *map(str, sample.expand_wav))]
        groups = event_groups(tagger, window, 3)
        items.append(
            {
                "path": sample.manifest_path or str(sample.path),
                "task": sample.task,
                "expected": sample.text,
                "predicted": groups[0][0] if groups else "",
                "correct": tagged_correct(sample.text, groups, 1),
                "correct_top3": tagged_correct(sample.text, groups, 3),
                "groups": [[g, round(v, 4)] for g, v in groups],
                "labels": [[n, round(v, 4)] for n, v in tagger.top_labels(window, 5)],
            }
        )
    per_class: dict[str, dict[str, float | int]] = {}
    for label in sorted({",".join(sorted(sound_classes_named(i["expected"]))) for i in items}):
        rows = [i for i in items if ",".join(sorted(sound_classes_named(i["expected"]))) == label]
        per_class[label or "(none named)"] = {
            "n": len(rows),
            "top1": sum(i["correct"] for i in rows) / len(rows),
            "top3": sum(i["correct_top3"] for i in rows) / len(rows),
        }
    return {
        "wer": None,
        "intent_accuracy": None,
        "sound_accuracy": sum(i["correct"] for i in items) / len(items) if items else None,
        "sound_accuracy_top3": (
            sum(i["correct_top3"] for i in items) / len(items) if items else None
        ),
        "count": {"asr": 0, "command": 0, "audiocaption": len(items)},
        "skipped": sum(s.task in ("asr", "command") for s in samples),
        "per_class": per_class,
        "items": items,
    }


def format_tagger_result(result: dict[str, Any]) -> str:
    """`evaluate_tagger`'s result as the text `salmonn-live eval --tagger` prints."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    lines = [
        f"audiocaption  sound class named by the tagger's sound event: top-1"
        f" {pct(result['sound_accuracy'])}, top-3 {pct(result['sound_accuracy_top3'])}"
        f" over {result['count']['audiocaption']} entries"
        f" ({result['skipped']} asr/command entries not scored: no LLM)",
    ]
    for label, row in result["per_class"].items():
        lines.append(
            f"  {label:28s} top-1 {pct(row['top1']):>8s}  top-3 {pct(row['top3']):>8s}"
            f"  n={row['n']}"
        )
    return "\n".join(lines)


# -- LLM captions with and without the tagger's labels (`salmonn-live eval --gcompris`) ------

#: Words (matched at a word's start, any case) with which a caption names each GCompris class
#: (`training.gcompris`): the thing itself, the sound it makes, and its usual parent ("bird"
#: for an owl, "music" for an instrument).
CAPTION_WORDS: dict[str, tuple[str, ...]] = {
    "dog bark": ("dog", "bark", "puppy", "woof"),
    "dog": ("dog", "bark", "puppy", "woof"),
    "cat": ("cat", "meow", "miaow", "purr", "kitten"),
    "applause": ("applau", "clap", "cheer"),
    "rain": ("rain", "storm"),
    "car engine": ("car", "engine", "motor", "vehicle"),
    "car": ("car", "engine", "motor", "vehicle", "traffic"),
    "ringing": ("ring", "phone", "telephone", "bell"),
    "door": ("door",),
    "heartbeat": ("heart",),
    "train": ("train", "locomotive", "railway"),
    "frogs": ("frog", "croak", "toad"),
    "gong": ("gong", "bell", "music"),
    "object falling": ("fall", "drop", "thud", "crash", "impact", "bang"),
    "hits": ("hit", "knock", "bang", "thud", "impact", "strike"),
    "guitar": ("guitar", "music", "strum"),
    "livestock": (
        "cow", "moo", "cattle", "horse", "neigh", "whinny", "pig", "oink", "grunt", "sheep",
        "bleat", "livestock", "farm animal",
    ),
    "fowl": ("chicken", "hen", "rooster", "cluck", "duck", "quack", "fowl", "poultry", "bird"),
    "owl": ("owl", "hoot", "bird"),
    "instrument": (
        "music", "instrument", "melod", "piano", "guitar", "violin", "cello", "drum", "flute",
        "trumpet", "horn", "harp", "organ", "bell", "saxophone", "clarinet", "string",
    ),
    "world music": ("music", "instrument", "melod", "drum", "song", "sing"),
    "xylophone": ("xylophone", "music", "chime", "note", "melod", "bell"),
    "knock": ("knock",),
    "water": ("water", "drip", "pour", "splash", "liquid", "stream", "flow"),
    "helicopter": ("helicopter", "aircraft", "rotor"),
}  # fmt: skip


def caption_names(sound_class: str, caption: str) -> bool:
    """Whether an LLM caption names a GCompris clip's class (`CAPTION_WORDS`).

    Raises:
        KeyError: a class without words.
    """
    words = CAPTION_WORDS[sound_class]
    return re.search(r"\b(?:" + "|".join(map(re.escape, words)) + ")", caption, re.I) is not None


def heard_groups(
    tagger: SoundTagger, pooled: npt.NDArray[np.float32], min_score: float, k: int = 3
) -> list[tuple[str, float]]:
    """The sound-event groups of a whole clip scoring at least ``min_score``, best first: what
    the agent puts in a caption prompt (``min_score`` is the tracker's off-threshold there)."""
    return [(g, v) for g, v in event_groups(tagger, pooled, k) if v >= min_score]


def evaluate_captions(
    model: Any,
    tagger: SoundTagger,
    clips: Sequence[GcomprisClip],
    instruction: str,
    with_labels: Callable[[str, Sequence[tuple[str, float]]], str],
    *,
    min_score: float = 0.3,
    max_new_tokens: int = 40,
    batch_size: int = 8,
    max_audio_s: float = 30.0,
    lora_scale: float | None = None,
) -> dict[str, Any]:
    """The LLM's caption of each clip asked plainly and with the tagger's labels in the prompt;
    the share of captions naming the clip's class (`caption_names`) both ways.

    Args:
        model: a `model.salmonn.Salmonn` (greedy, its default LoRA scale, as the agent asks).
        tagger: the loaded tagger.
        clips: labelled GCompris clips.
        instruction: the caption instruction (the agent's ``prompts.caption``).
        with_labels: ``(instruction, heard) -> instruction`` with the labels
            (`agent.config.SoundsConfig.caption_prompt`).
        min_score: least score of a group put in the prompt.
        max_new_tokens: tokens per caption.
        batch_size: clips per LLM call.
        max_audio_s: the clip's last seconds the model hears (the agent's window limit).
        lora_scale: the captions' LoRA scale (None: the model's, as the agent's default).

    Returns:
        ``{"plain", "labels"}`` rates (0..1), ``"count"``, ``"per_class"``
        (``{class: {"n", "plain", "labels"}}``) and ``"items"`` (clip key, class, heard groups,
        both prompts' captions and whether each names the class).
    """
    rate = tagger.config.sample_rate_hz
    audio = [load_clip(c)[-int(max_audio_s * rate) :] for c in clips]
    heard = [
        heard_groups(tagger, pool(scores, tagger.config.pooling), min_score)
        for scores in tagger.scores_batch(audio)
    ]
    prompts = [with_labels(instruction, h) for h in heard]
    plain: list[str] = []
    labelled: list[str] = []
    for start in range(0, len(clips), batch_size):
        part = audio[start : start + batch_size]
        for texts, asked in ((plain, instruction), (labelled, prompts[start : start + batch_size])):
            answers = model.generate(
                part, asked, num_beams=1, max_new_tokens=max_new_tokens, lora_scale=lora_scale
            )
            texts.extend(a.text for a in answers)
    items = [
        {
            "clip": clip.key,
            "class": clip.sound_class,
            "heard": [[g, round(v, 3)] for g, v in groups],
            "prompt": prompt,
            "plain": text,
            "plain_named": caption_names(str(clip.sound_class), text),
            "labels": labelled_text,
            "labels_named": caption_names(str(clip.sound_class), labelled_text),
        }
        for clip, groups, prompt, text, labelled_text in zip(
            clips, heard, prompts, plain, labelled, strict=True
        )
    ]

    def share(rows: Sequence[dict[str, Any]], key: str) -> float | None:
        return sum(r[key] for r in rows) / len(rows) if rows else None

    per_class = {}
    for name in sorted({str(i["class"]) for i in items}):
        rows = [i for i in items if i["class"] == name]
        per_class[name] = {
            "n": len(rows),
            "plain": share(rows, "plain_named"),
            "labels": share(rows, "labels_named"),
        }
    return {
        "plain": share(items, "plain_named"),
        "labels": share(items, "labels_named"),
        "count": len(items),
        "per_class": per_class,
        "items": items,
    }


def format_caption_result(result: dict[str, Any]) -> str:
    """`evaluate_captions`' result as the text `salmonn-live eval --gcompris` prints."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    lines = [
        f"gcompris captions naming the sound class over {result['count']} clips: plain prompt"
        f" {pct(result['plain'])}, with the tagger's labels {pct(result['labels'])}",
    ]
    for name, row in result["per_class"].items():
        lines.append(
            f"  {name:16s} plain {pct(row['plain']):>8s}  labels {pct(row['labels']):>8s}"
            f"  n={row['n']}"
        )
    return "\n".join(lines)


def patch_cost_ms(
    tagger: SoundTagger, batch_patches: int, seconds: float = 3.0
) -> dict[str, float]:
    """CPU milliseconds per 0.96 s patch: front end, graph, and both, ``batch_patches`` per call.

    The front end is timed on a clip that gives exactly ``batch_patches`` patches, the graph
    on those patches; each is repeated for about ``seconds``.
    """
    config = tagger.config
    rng = np.random.default_rng(0)
    samples = config.patch_samples + (batch_patches - 1) * config.patch_hop_samples
    audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)

    def per_patch(call: Any) -> float:
        call()  # warm-up
        # CPU time of this process, not wall time: on a shared machine waiting for a core is
        # not the tagger's cost (the graph runs on one onnxruntime thread).
        runs, started = 0, time.process_time()
        while time.process_time() - started < seconds:
            call()
            runs += 1
        return 1000.0 * (time.process_time() - started) / runs / batch_patches

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
