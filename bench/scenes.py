"""`salmonn-live bench scenes`: what plain `salmonn-live run` hears on recorded scenes.

Each configuration runs the real command (`python -m agent.cli run`, one process per scene,
the file paced in real time, events read as JSON lines from stdout) on the same scenes. The
answers are scored against each scene's ground truth (`examples/demo_scene.json` layout):

- transcripts: word error rate over the spoken sentences;
- commands: the intent exact match, the truth being the intent grammar's reading of the
  sentence that was really said (`{"intent": "none"}` for a question);
- captions: the sound class named (`training.corpus.sound_classes_named`);
- latency: end of the spoken sentence (truth) -> its final `command` event, through the
  event's `captured` stamp.

The default compares the defaults (``plain``) with the LLM answering everything (``llm``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("plain=", "llm=--transcript llm --command llm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument("--model", default="nano", help="preset or checkpoint directory")
    parser.add_argument(
        "--wav",
        action="append",
        type=Path,
        help="a recorded scene with its truth beside it (SCENE.json, as examples/demo_scene);"
        " repeat; default: generate --scenes scenes",
    )
    parser.add_argument("--scenes", type=int, default=5, help="scenes to generate")
    parser.add_argument("--scene-s", type=float, default=30.0, help="generated scene length, s")
    parser.add_argument(
        "--seed", type=int, default=500, help="first generated scene's seed (unseen: >= 500)"
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME=ARGS",
        help="a configuration: `run` options after NAME=; repeat; default: "
        + ", ".join(repr(c) for c in DEFAULT_CONFIGS),
    )
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="most seconds one run may take"
    )
    parser.add_argument("--json", type=Path, help="also write every event and score here")


@dataclass(frozen=True)
class Truth:
    """One ground-truth event of a scene (stream clock, seconds)."""

    kind: str
    label: str
    start: float
    end: float


@dataclass
class Tally:
    """Scores of one configuration over every scene."""

    references: list[str] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    intents: list[bool] = field(default_factory=list)
    captions: list[bool] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def read_truth(wav: Path) -> list[Truth]:
    """The events of ``SCENE.json`` beside ``SCENE.wav``."""
    data = json.loads(wav.with_suffix(".json").read_text())
    return [Truth(e["kind"], e["label"], e["start"], e["end"]) for e in data["events"]]


def _generate(directory: Path, count: int, duration_s: float, seed: int) -> list[Path]:
    import soundfile

    from training.scenes import make_scene

    paths = []
    for i in range(count):
        scene = make_scene(
            seed + i, duration_s, n_speech=4, n_sounds=3, snr_db_range=(15.0, 25.0)
        )
        path = directory / f"scene{seed + i}.wav"
        soundfile.write(path, scene.audio, scene.sample_rate_hz, subtype="PCM_16")
        events = [
            {"kind": e.kind, "label": e.label, "start": e.start_s, "end": e.end_s}
            for e in scene.events
        ]
        path.with_suffix(".json").write_text(json.dumps({"events": events}))
        paths.append(path)
    return paths


def run_agent(model: str, wav: Path, extra: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """The final events of `salmonn-live run` on one scene, in real time.

    Raises:
        RuntimeError: the command failed or took longer than ``timeout_s``.
    """
    command = [
        sys.executable, "-m", "agent.cli", "-q", "run", "--model", model,
        "--source", f"scene=file:{wav}", "--realtime", "--exit-at-end", "--print", "json",
        "--ws", "off", "--no-mqtt", "--status-interval", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{shlex.join(command)} took over {timeout_s:g} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e["kind"] != "status" and not e.get("partial", False)]


def _overlapping(events: list[dict[str, Any]], kind: str, truth: Truth) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["kind"] == kind and min(e["end"], truth.end) - max(e["start"], truth.start) > 0
    ]


def score_scene(events: list[dict[str, Any]], truths: list[Truth], tally: Tally) -> None:
    """Add one scene's answers to ``tally`` (see the module docstring)."""
    from agent.intents import intent_from_transcript
    from training.corpus import sound_classes_named

    for truth in truths:
        if truth.kind == "speech":
            said = _overlapping(events, "transcript", truth)
            tally.references.append(truth.label)
            tally.hypotheses.append(" ".join(e["text"] for e in said))
            commands = _overlapping(events, "command", truth)
            expected = intent_from_transcript(truth.label)
            tally.intents.append(bool(commands) and commands[0].get("intent") == expected)
            if commands:
                first = commands[0]
                # `captured` is when the window's last sample arrived: back to the truth's end.
                spoken_end = first["timing"]["captured"] - (first["end"] - truth.end)
                tally.latencies_s.append(first["timing"]["emitted"] - spoken_end)
        elif truth.kind == "sound":
            captions = _overlapping(events, "caption", truth)
            tally.captions.append(
                any(truth.label in sound_classes_named(e["text"]) for e in captions)
            )


def _pct(values: list[bool]) -> str:
    if not values:
        return "-"
    return f"{100 * sum(values) / len(values):.1f} % ({sum(values)}/{len(values)})"


def run(args: argparse.Namespace) -> int:
    """Run every configuration on every scene and print a Markdown section."""
    from training.scoring import corpus_wer

    configs = []
    for spec in args.config or DEFAULT_CONFIGS:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            logger.error("--config: expected NAME=ARGS, got %r", spec)
            return 2
        configs.append((name, shlex.split(extra)))
    with tempfile.TemporaryDirectory(prefix="bench-scenes-") as tmp:
        wavs = args.wav or _generate(Path(tmp), args.scenes, args.scene_s, args.seed)
        for wav in wavs:
            if not wav.is_file() or not wav.with_suffix(".json").is_file():
                logger.error("%s: expected the scene and its truth %s", wav, wav.stem + ".json")
                return 2
        tallies: dict[str, Tally] = {}
        dump: dict[str, Any] = {}
        for name, extra in configs:
            tally = tallies[name] = Tally()
            for wav in wavs:
                started = time.perf_counter()
                events = run_agent(args.model, wav, extra, args.timeout_s)
                tally.wall_s += time.perf_counter() - started
                score_scene(events, read_truth(wav), tally)
                dump.setdefault(name, {})[wav.name] = events
                logger.info("%s %s: %d events", name, wav.name, len(events))
    _out(f"\n## Scenes: what `salmonn-live run` hears (`bench scenes --model {args.model}`)\n")
    _out(
        f"{len(wavs)} recorded scenes ({', '.join(w.name for w in wavs)}), each through the real"
        " command in real time, one process per scene. WER over the spoken sentences; intent:"
        " exact match with the grammar's reading of what was said; caption: the sound class is"
        " named; latency: end of the sentence -> its final command event.\n"
    )
    _out("| configuration | run options | WER | intent | caption | command p50 (s) | p95 (s) |")
    _out("|---|---|---:|---:|---:|---:|---:|")
    for name, extra in configs:
        t = tallies[name]
        wer = corpus_wer(t.references, t.hypotheses)
        lat = t.latencies_s
        p50, p95 = (f"{np.percentile(lat, q):.2f}" for q in (50, 95)) if lat else ("-", "-")
        _out(
            f"| {name} | `{shlex.join(extra) or '(none)'}` | "
            f"{'-' if wer is None else f'{100 * wer:.1f} %'} | {_pct(t.intents)} | "
            f"{_pct(t.captions)} | {p50} | {p95} |"
        )
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))
    return 0


def _out(line: str) -> None:
    print(line, flush=True)  # noqa: T201 (benchmark output)
