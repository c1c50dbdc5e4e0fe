"""The three-stage SALMONN recipe on the synthetic corpus, and the model-driven evaluations:
manifest scoring (`evaluate_model`), activation-tuning data (`make_activation_data`) and the
instruction-following rate (`measure_following`).

`run_recipe` is what ``salmonn-live train --recipe nano`` runs: synthesize the corpus
(deterministic seeds), pre-train, instruction-tune, activation-tune, evaluate on the held-out
test split, and write the final trainable parts to ``OUT/final`` (to be copied into
``model/nano/``). Every stage trains in one process on one loaded model, and the encoders run
once per clip (`training.train.EncoderCache`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from model.prompts import (
    PROMPTS,
    UNSEEN_INSTRUCTIONS,
    eval_prompt,
    with_instruments,
    with_sounds,
    with_transcript,
)
from model.salmonn import Salmonn
from training.corpus import CorpusSize, synthesize_corpus, write_manifest
from training.scoring import (
    SCORED_TASKS,
    ScoredItem,
    follows_instruction,
    per_class,
    report,
    score_item,
)
from training.train import (
    AudioLoader,
    EncoderCache,
    Sample,
    TrainConfig,
    Trainer,
    TrainingError,
    generate_answers,
    load_sample_audio,
    read_manifest,
    read_wav_16k,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Token budget per task when evaluating (answers are short: a transcript, a JSON, a caption).
EVAL_MAX_NEW_TOKENS = {"asr": 40, "command": 40, "audiocaption": 24}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def scored_samples(samples: list[Sample], limit: int | None = None) -> list[Sample]:
    """The entries eval scores (tasks ``asr``, ``command``, ``audiocaption``), the first
    ``limit`` of them when given."""
    chosen = [s for s in samples if s.task in SCORED_TASKS]
    return chosen[:limit] if limit is not None else chosen


def evaluate_model(
    model: Salmonn,
    cache: EncoderCache,
    samples: list[Sample],
    *,
    batch_size: int = 8,
    whisper: bool = True,
    loader: AudioLoader = read_wav_16k,
    progress: bool = False,
    transcript: str = "llm",
    command: str = "llm",
) -> dict[str, Any]:
    """Answer every scored entry with its task's evaluation prompt and score it.

    Args:
        model: the model.
        cache: its encoder-output cache.
        samples: entries to score (others are ignored).
        batch_size: rows per generation call (each call holds one task).
        whisper: also transcribe the ``asr`` entries with Whisper's own decoder.
        loader: audio reader for Whisper.
        progress: show progress bars.
        transcript: ``llm``, or ``whisper``: ``asr`` entries are answered by Whisper's own
            decoder, as ``run --transcript whisper`` does.
        command: ``llm``, or ``whisper``: ``command`` entries are read from Whisper's
            transcript by the intent grammar, as ``run --command whisper`` does.

    Returns:
        `training.scoring.report`'s dict (the eval JSON), plus ``"whisper_wer"`` (None when not
        measured) and ``"per_class"``; callers printing the exact eval JSON drop those two.
    """
    from agent.intents import intent_from_transcript
    from training.scoring import corpus_wer

    chosen = scored_samples(samples)
    predictions: dict[int, str] = {}
    by_whisper = {
        t for t, engine in (("asr", transcript), ("command", command)) if engine == "whisper"
    }
    heard = _whisper_transcripts(
        model, [s for s in chosen if s.task in by_whisper], batch_size, loader
    )
    for i, s in enumerate(chosen):
        if s.task in by_whisper:
            text = heard[str(s.path)]
            predictions[i] = (
                json.dumps(intent_from_transcript(text)) if s.task == "command" else text
            )
    for task in SCORED_TASKS:
        indices = [i for i, s in enumerate(chosen) if s.task == task and task not in by_whisper]
        if not indices:
            continue
        answers = generate_answers(
            model,
            cache,
            [chosen[i] for i in indices],
            [eval_prompt(task)] * len(indices),
            batch_size=batch_size,
            max_new_tokens=EVAL_MAX_NEW_TOKENS[task],
            progress=progress,
        )
        predictions.update(zip(indices, answers, strict=True))
    items = [
        score_item(s.manifest_path or str(s.path), s.task, s.text, predictions[i])
        for i, s in enumerate(chosen)
    ]
    out = report(items)
    out["whisper_wer"] = None
    asr = [s for s in chosen if s.task == "asr"]
    if whisper and asr and model.whisper_tokenizer is not None:
        heard = {**heard, **_whisper_transcripts(
            model, [s for s in asr if str(s.path) not in heard], batch_size, loader
        )}  # fmt: skip
        out["whisper_wer"] = corpus_wer([s.text for s in asr], [heard[str(s.path)] for s in asr])
    out["per_class"] = per_class(items)
    return out


def evaluate_qa(
    model: Salmonn,
    cache: EncoderCache,
    samples: list[Sample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 40,
    progress: bool = False,
    heard: Heard | None = None,
) -> dict[str, Any]:
    """Answer every ``QA`` entry's question with the evaluation prompt and score it by
    `training.scoring.qa_correct`.

    ``heard`` asks the questions about the clips in it with what was heard in front
    (`Heard.question`), as the agent asks its standing questions.

    Returns:
        `training.scoring.qa_report`'s dict: accuracy overall, per kind (speech, sound, music)
        and per question template, and the items.
    """
    from training.scoring import qa_correct, qa_report

    chosen = [s for s in samples if s.task == "QA"]
    answers = generate_answers(
        model,
        cache,
        chosen,
        [_qa_prompt(s, heard) for s in chosen],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    items = [
        ScoredItem(s.manifest_path or str(s.path), "QA", s.text, a, qa_correct(s.text, a))
        for s, a in zip(chosen, answers, strict=True)
    ]
    return qa_report([s.question for s in chosen], items)


@dataclass(frozen=True)
class Heard:
    """What the fast paths heard in each clip, by path: Whisper's transcript of the clips with
    speech (`whisper_heard`), the tagger's instruments in those with music
    (`tagger_instruments`) and its sound-event groups (`tagger_sounds`), which only a clip
    without a transcript is asked with, as the agent asks a sound window's questions."""

    transcripts: dict[str, str] = dataclasses.field(default_factory=dict)
    instruments: dict[str, list[tuple[str, float]]] = dataclasses.field(default_factory=dict)
    sounds: dict[str, list[tuple[str, float]]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.transcripts or self.instruments or self.sounds)

    def question(self, sample: Sample, question: str) -> str | None:
        """``question`` as the agent would ask it of this clip (the instruments, then the
        transcript or else the sound groups in front: `with_instruments`, `with_transcript`,
        `with_sounds`); None when nothing was heard in it."""
        path = str(sample.path)
        if not any(path in found for found in (self.transcripts, self.instruments, self.sounds)):
            return None
        asked = with_instruments(question, self.instruments.get(path, []))
        if path in self.transcripts:
            return with_transcript(asked, self.transcripts[path])
        return with_sounds(asked, self.sounds.get(path, []))


def _qa_prompt(sample: Sample, heard: Heard | None) -> str:
    question = eval_prompt("QA", sample.question)
    hinted = heard.question(sample, question) if heard else None
    return question if hinted is None else hinted


def speech_clips(samples: list[Sample]) -> list[Sample]:
    """One entry per clip with speech in it (the clips with an ``asr`` entry)."""
    return list({str(s.path): s for s in samples if s.task == "asr"}.values())


def whisper_heard(
    model: Salmonn,
    samples: list[Sample],
    cache_file: Path,
    *,
    batch_size: int = 8,
    loader: AudioLoader = read_wav_16k,
    progress: bool = False,
) -> dict[str, str]:
    """Whisper's own transcript (the agent's short-context decode) of each clip of
    ``samples``, by path; kept in ``cache_file`` (JSON) and only the clips missing there are
    transcribed (about 0.16 s a clip on 2 cores)."""
    from tqdm import tqdm

    from training.train import _bar_off

    heard: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    todo = [s for s in {str(s.path): s for s in samples}.values() if str(s.path) not in heard]
    steps = range(0, len(todo), batch_size)
    for start in tqdm(steps, desc="whisper transcripts", disable=_bar_off(progress) or not todo):
        chunk = todo[start : start + batch_size]
        texts = model.transcribe_with_whisper([load_sample_audio(s, loader) for s in chunk])
        heard.update(zip((str(s.path) for s in chunk), (t.strip() for t in texts), strict=True))
    if todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(heard, indent=0) + "\n")
    return {str(s.path): heard[str(s.path)] for s in samples}


def tagger_instruments(
    samples: list[Sample],
    cache_file: Path,
    *,
    min_music: float = 0.3,
    loader: AudioLoader = read_wav_16k,
) -> dict[str, list[tuple[str, float]]]:
    """The tagger's best instruments (`SoundTagger.instruments`) in each clip of ``samples``
    where its ``music`` group scores at least ``min_music`` (the agent's off-threshold), by
    path; kept in ``cache_file`` (JSON) like `whisper_heard`."""

    def instruments(tagger: Any, pooled: Any) -> list[tuple[str, float]]:
        if tagger.group_scores(pooled).get("music", 0.0) < min_music:
            return []
        return list(tagger.instruments(pooled))

    return _tagged(samples, cache_file, instruments, loader)


def tagger_sounds(
    samples: list[Sample],
    cache_file: Path,
    *,
    min_score: float = 0.3,
    loader: AudioLoader = read_wav_16k,
) -> dict[str, list[tuple[str, float]]]:
    """The tagger's sound-event groups heard in each clip of ``samples`` at ``min_score`` or
    more (`training.tagger_eval.heard_groups`, as a caption's labels), by path, for the clips
    where it heard one; kept in ``cache_file`` (JSON) like `whisper_heard`."""
    from training.tagger_eval import heard_groups

    return _tagged(samples, cache_file, lambda t, p: heard_groups(t, p, min_score), loader)


def _tagged(
    samples: list[Sample],
    cache_file: Path,
    name: Callable[[Any, Any], list[tuple[str, float]]],
    loader: AudioLoader,
) -> dict[str, list[tuple[str, float]]]:
    """``name(tagger, pooled scores)`` of each distinct clip of ``samples`` where it names
    something, by path; read from ``cache_file`` when it exists, else written there."""
    from model.sound_tagger import SoundTaggerConfig, load_sound_tagger

    if cache_file.is_file():
        found = json.loads(cache_file.read_text())
        return {path: [(n, v) for n, v in heard] for path, heard in found.items()}
    tagger = load_sound_tagger(SoundTaggerConfig())
    clips = list({str(s.path): s for s in samples}.values())
    found = {}
    for s, pooled in _pooled_scores(tagger, clips, loader):
        heard = name(tagger, pooled)
        if heard:
            found[str(s.path)] = heard
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(found, indent=0) + "\n")
    return found


def heard_questions(
    samples: list[Sample], heard: Heard, fraction: float, seed: int = 0
) -> list[Sample]:
    """``samples`` with a ``fraction`` of the ``QA`` entries about clips in ``heard`` asked
    with what was heard in front (task ``QA_heard``, `Heard.question`); the choice is fixed
    by ``seed``. The rest stay as they are, so the model still answers from the audio
    alone."""
    import numpy as np

    rng = np.random.default_rng([seed, 17])
    out: list[Sample] = []
    for s in samples:
        question = heard.question(s, s.question) if s.task == "QA" else None
        if question is not None and rng.random() < fraction:
            s = dataclasses.replace(s, task="QA_heard", question=question)
        out.append(s)
    return out


def _whisper_transcripts(
    model: Salmonn, samples: list[Sample], batch_size: int, loader: AudioLoader
) -> dict[str, str]:
    """Whisper's own transcript of each distinct clip, by path (the live agent's short
    context mode)."""
    clips = list({str(s.path): s for s in samples}.values())
    heard: dict[str, str] = {}
    for start in range(0, len(clips), batch_size):
        chunk = clips[start : start + batch_size]
        texts = model.transcribe_with_whisper([load_sample_audio(s, loader) for s in chunk])
        heard.update(zip((str(s.path) for s in chunk), texts, strict=True))
    return heard


def exact_eval_json(result: dict[str, Any]) -> dict[str, Any]:
    """Only the keys of the documented eval JSON."""
    return {k: result[k] for k in ("wer", "intent_accuracy", "sound_accuracy", "count", "items")}


# ---------------------------------------------------------------------------------------------
# Activation tuning and the following rate
# ---------------------------------------------------------------------------------------------


def spread(items: list[T], count: int) -> list[T]:
    """``count`` items taken at even steps over ``items`` (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    stride = len(items) / count
    return [items[int(i * stride)] for i in range(count)]


def pick_clips(samples: list[Sample], count: int) -> list[Sample]:
    """``count`` distinct clips spread over the manifest (every k-th distinct path), so sound,
    speech and mixed clips all appear; deterministic."""
    return spread(list({str(s.path): s for s in samples}.values()), count)


def _references(samples: list[Sample]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for s in samples:
        if s.task in ("asr", "audiocaption"):
            refs.setdefault(str(s.path), []).append(s.text)
    return refs


def make_activation_data(
    model: Salmonn,
    cache: EncoderCache,
    samples: list[Sample],
    out_manifest: Path,
    *,
    count: int = 12,
    lora_scale: float = 2.0,
    max_new_tokens: int = 120,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The paper's activation data: the instruction-tuned model, at a reduced LoRA scale,
    writes stories about ``count`` training clips; they become ``audio_story_telling``
    targets. Written as an official-format manifest (absolute paths).

    Returns:
        The manifest entries.
    """
    clips = pick_clips(samples, count)
    stories = PROMPTS["audio_story_telling"]
    instructions = [stories[i % len(stories)] for i in range(len(clips))]
    answers = generate_answers(
        model,
        cache,
        clips,
        instructions,
        batch_size=4,
        lora_scale=lora_scale,
        max_new_tokens=max_new_tokens,
        repetition_penalty=1.2,
        seed=seed,
    )
    entries = [
        {"path": str(c.path), "text": a, "task": "audio_story_telling"}
        for c, a in zip(clips, answers, strict=True)
        if a.strip()
    ]
    out_manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out_manifest, entries)
    logger.info("activation data: %d stories -> %s", len(entries), out_manifest)
    return entries


def measure_following(
    model: Salmonn,
    cache: EncoderCache,
    samples: list[Sample],
    *,
    clips: int = 8,
    instructions: tuple[str, ...] = UNSEEN_INSTRUCTIONS[:3],
    lora_scales: tuple[float, ...] = (4.0, 2.0),
    max_new_tokens: int = 80,
) -> dict[str, Any]:
    """How often the model follows instructions it was never trained on, per LoRA scale.

    Each of ``clips`` clips gets each instruction; an answer counts as following by
    `training.scoring.follows_instruction` (long enough, not a transcript or caption of the clip,
    not an intent, not a loop).

    Returns:
        ``{"rates": {scale: rate}, "mean_words": {scale: n}, "examples": {scale: [...]},
        "n": answers per scale}``.
    """
    from training.scoring import normalize_words

    refs = _references(samples)
    chosen = pick_clips(samples, clips)
    rows = [(c, i) for c in chosen for i in instructions]
    out: dict[str, Any] = {"rates": {}, "mean_words": {}, "examples": {}, "n": len(rows)}
    for scale in lora_scales:
        answers = generate_answers(
            model,
            cache,
            [c for c, _ in rows],
            [i for _, i in rows],
            batch_size=8,
            lora_scale=scale,
            max_new_tokens=max_new_tokens,
        )
        follows = [
            follows_instruction(a, refs.get(str(c.path), []))
            for (c, _), a in zip(rows, answers, strict=True)
        ]
        key = f"{scale:g}"
        out["rates"][key] = sum(follows) / len(follows) if follows else 0.0
        out["mean_words"][key] = (
            sum(len(normalize_words(a)) for a in answers) / len(answers) if answers else 0.0
        )
        pairs = list(zip(rows, answers, strict=True))[:3]
        out["examples"][key] = [{"instruction": i, "answer": a} for (_, i), a in pairs]
    return out


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipePlan:
    """Sizes and options of one recipe run."""

    corpus_size: CorpusSize
    pretrain: TrainConfig
    instruct: TrainConfig
    activation: TrainConfig
    caption_repeats: int = 1  # instruction tuning sees each audiocaption entry this often
    activation_samples: int = 12  # the paper: 12 stories, 12 steps, batch 1, LoRA only
    activation_lora_scale: float = 2.0
    story_tokens: int = 120
    following_clips: int = 8
    following_tokens: int = 80
    eval_limit: int | None = None
    #: ``v1``: `training.corpus`; ``v2``: `training.corpus_v2`, whose own stories and
    #: descriptions (``activation.json``) are the activation data instead of generated ones.
    corpus: str = "v1"
    qa_limit: int = 0  # test QA entries scored (`evaluate_qa`); 0 scores none
    #: The repeated captions (``caption_repeats``) are asked with the sound tagger's labels in
    #: the instruction, as the agent asks (`tagged_captions`).
    tagged_captions: bool = False
    #: Steps of `training.class_init` before pre-training (0: none; corpus v2 only).
    class_init_steps: int = 0
    #: The share of instruction tuning's questions about clips with speech or music asked with
    #: Whisper's transcript and the tagger's instruments in front (`heard_questions`), as the
    #: agent asks its standing questions; the test QA is then scored both ways (0: neither).
    heard_questions: float = 0.0


#: The nano recipe, sized to finish well under 3 hours on a 2-core CPU (docs/training.md).
#: Learning rates are 5x the first run's (2e-4 / 1e-4 / 2e-5): on this budget of steps the
#: fresh Q-Former learned too slowly (BENCHMARKS.md, "Training the nano model"), and sound
#: captions, the part of nano the agent relies on, are seen twice as often.
NANO_PLAN = RecipePlan(
    corpus_size="full",
    pretrain=TrainConfig(
        stage="pretrain", steps=450, batch_size=8, lr=1e-3, warmup_steps=50, min_lr=1e-4,
        eval_every=150, dev_limit=64,
    ),
    instruct=TrainConfig(
        stage="instruct", steps=700, batch_size=8, lr=5e-4, warmup_steps=30, min_lr=5e-5,
        eval_every=175, dev_limit=64,
    ),
    activation=TrainConfig(
        stage="activation", steps=12, batch_size=1, lr=1e-4, warmup_steps=0, min_lr=5e-5,
        eval_every=0, dev_limit=64, lora_only=True,
    ),
    caption_repeats=2,
)  # fmt: skip

#: nano v2 (`train --recipe nano-v2`, model ``nano-dual``: Whisper + YAMNet): corpus v2 (Piper
#: and espeak-ng speech, real GCompris recordings, rendered music), NANO_PLAN's learning rates,
#: fewer steps because v2 clips are about three times as long (so are the rows), the
#: corpus's own stories and descriptions as activation data, and the repeated captions asked
#: with the tagger's labels (on real recordings 20/45 captions name the class against 3/45
#: without), and most questions asked with what was heard (speech QA 53.0 -> 71.5 % asked as
#: the agent asks: BENCHMARKS.md, "nano v2", "Run 3").
NANO_V2_PLAN = RecipePlan(
    corpus_size="full",
    pretrain=dataclasses.replace(NANO_PLAN.pretrain, steps=300, eval_every=150),
    instruct=dataclasses.replace(NANO_PLAN.instruct, steps=600, eval_every=200),
    activation=NANO_PLAN.activation,
    caption_repeats=2,
    activation_samples=24,
    eval_limit=480,
    corpus="v2",
    qa_limit=240,
    tagged_captions=True,
    heard_questions=0.7,
)

#: nano v2 at a third of the steps (100 pretrain + 200 instruct), everything else the same: to
#: compare LLMs (`--model nano-dual-gemma`, `nano-dual-qwen`) on one budget on a 2-core CPU,
#: where the full plan on the bigger LLMs would take hours (BENCHMARKS.md, "nano v2").
NANO_V2_SHORT_PLAN = dataclasses.replace(
    NANO_V2_PLAN,
    pretrain=dataclasses.replace(NANO_V2_PLAN.pretrain, steps=100, eval_every=100),
    instruct=dataclasses.replace(NANO_V2_PLAN.instruct, steps=200, eval_every=200),
)

#: A smoke-test plan: the whole pipeline in a couple of minutes (meaningless numbers).
TINY_PLAN = RecipePlan(
    corpus_size="tiny",
    pretrain=TrainConfig(
        stage="pretrain", steps=3, batch_size=4, lr=1e-3, warmup_steps=1, min_lr=1e-4,
        eval_every=0, dev_limit=8,
    ),
    instruct=TrainConfig(
        stage="instruct", steps=3, batch_size=4, lr=1e-3, warmup_steps=1, min_lr=1e-4,
        eval_every=0, dev_limit=8,
    ),
    activation=TrainConfig(
        stage="activation", steps=2, batch_size=1, lr=1e-4, warmup_steps=0, min_lr=1e-5,
        eval_every=0, dev_limit=4, lora_only=True,
    ),
    activation_samples=2,
    story_tokens=12,
    following_clips=2,
    following_tokens=12,
)  # fmt: skip
TINY_V2_PLAN = dataclasses.replace(TINY_PLAN, corpus="v2", qa_limit=8)

#: ``train --recipe NAME``: (full plan, --tiny plan, the preset trained when --model is not
#: given).
RECIPES: dict[str, tuple[RecipePlan, RecipePlan, str]] = {
    "nano": (NANO_PLAN, TINY_PLAN, "nano"),
    "nano-v2": (NANO_V2_PLAN, TINY_V2_PLAN, "nano-dual"),
    "nano-v2-short": (NANO_V2_SHORT_PLAN, TINY_V2_PLAN, "nano-dual"),
}


def with_options(plan: RecipePlan, curriculum: bool, class_init_steps: int) -> RecipePlan:
    """``plan`` with ``train --recipe``'s options: a short-answers-first curriculum over the
    first half of pre-training and instruction tuning (`TrainConfig.curriculum_steps`), and
    ``class_init_steps`` steps of `training.class_init` first."""
    if class_init_steps < 0:
        raise TrainingError(f"--class-init: expected steps >= 0, got {class_init_steps}")
    if class_init_steps and plan.corpus != "v2":
        raise TrainingError(
            "--class-init needs a corpus v2 recipe (nano-v2, nano-v2-short): the classes come"
            " from its clip specs"
        )
    if curriculum:
        plan = dataclasses.replace(
            plan,
            pretrain=dataclasses.replace(plan.pretrain, curriculum_steps=plan.pretrain.steps // 2),
            instruct=dataclasses.replace(plan.instruct, curriculum_steps=plan.instruct.steps // 2),
        )
    return dataclasses.replace(plan, class_init_steps=class_init_steps)


def run_recipe(
    model: Salmonn,
    out_dir: str | Path,
    plan: RecipePlan,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    caption_labels: CaptionLabels | None = None,
) -> dict[str, Any]:
    """Run the whole recipe; every artefact goes under ``out_dir``.

    Layout: ``corpus/`` (wavs + manifests), ``cache/`` (encoder outputs), ``pretrain/``,
    ``instruct/``, ``activation/`` (each a `Trainer` directory), ``final/`` (the trainable
    parts to ship), ``report.json`` (timings, dev metrics, test evaluation, following rates).

    Args:
        model: the base model (e.g. the ``nano`` preset without trained parts).
        out_dir: the output directory.
        plan: sizes and options.
        seed: corpus seed (training seeds are in the plan's configs).
        resume: continue stages that stopped early, skip finished ones.
        progress: show progress bars.
        caption_labels: the agent's labelled caption prompt (required by
            ``plan.tagged_captions``; with it, the heard test questions about clips without
            speech also get the tagger's groups at its ``min_score``, as the agent asks).

    Returns:
        The report (also written to ``report.json``).
    """
    if plan.tagged_captions and caption_labels is None:
        raise ValueError("plan.tagged_captions needs caption_labels (the agent's prompt)")
    if plan.class_init_steps and plan.corpus != "v2":
        raise ValueError("plan.class_init_steps needs corpus v2 (its clip specs name classes)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    rep: dict[str, Any] = {"plan": dataclasses.asdict(plan), "seed": seed, "timings_s": timings}

    started = time.perf_counter()
    corpus_dir = out / "corpus"
    meta_file = corpus_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    wanted = (plan.corpus_size, seed, plan.corpus)
    if (meta.get("size"), meta.get("seed"), meta.get("corpus", "v1")) != wanted:
        synthesize = synthesize_corpus
        if plan.corpus == "v2":
            from training.corpus_v2 import synthesize_corpus as synthesize
        synthesize(corpus_dir, size=plan.corpus_size, seed=seed)
    timings["corpus"] = time.perf_counter() - started

    train_all = read_manifest(corpus_dir / "train.json")
    pretrain = read_manifest(corpus_dir / "pretrain.json")
    dev = read_manifest(corpus_dir / "dev.json")
    test = read_manifest(corpus_dir / "test.json")
    cache = EncoderCache(model, out / "cache")
    started = time.perf_counter()
    encoded = cache.warm(train_all + dev + test, progress=progress)
    timings["encoder_cache"] = time.perf_counter() - started
    rep["encoded_clips"] = encoded

    dev_pretrain = [s for s in dev if s.task in ("asr", "audiocaption")]
    captions = [s for s in train_all if s.task == "audiocaption"]
    if plan.tagged_captions and plan.caption_repeats > 1:
        assert caption_labels is not None  # checked before any work
        started = time.perf_counter()
        captions = tagged_captions(captions, out / "tagged_captions.json", caption_labels)
        timings["tagged_captions"] = time.perf_counter() - started
    instruct = train_all + captions * (plan.caption_repeats - 1)
    heard = Heard()
    if plan.heard_questions:
        started = time.perf_counter()
        spoken = speech_clips(train_all + test)
        asked = [s for s in train_all + test if s.task == "QA"]
        heard = Heard(
            # A Whisper without a tokenizer (tiny-random's) writes no text: instruments only.
            {}
            if model.whisper_tokenizer is None
            else whisper_heard(model, spoken, out / "whisper_heard.json", progress=progress),
            tagger_instruments(asked, out / "tagger_instruments.json"),
        )
        instruct = heard_questions(instruct, heard, plan.heard_questions, seed)
        timings["heard"] = time.perf_counter() - started
    if plan.class_init_steps:
        started = time.perf_counter()
        rep["class_init"] = _class_init(model, cache, train_all, corpus_dir, out, plan, resume)
        timings["class_init"] = time.perf_counter() - started
    stages = (("pretrain", plan.pretrain, pretrain, dev_pretrain), ("instruct", plan.instruct,
              instruct, dev))  # fmt: skip
    for name, config, samples, dev_samples in stages:
        started = time.perf_counter()
        result = _run_stage(
            model, config, samples, dev_samples, out / name, cache, resume, progress
        )
        timings[name] = time.perf_counter() - started
        rep[name] = result
        model.load_checkpoint(out / name / "best")

    # Activation tuning: stories from the instruction-tuned model at a reduced LoRA scale.
    started = time.perf_counter()
    # Spread over the split, not its first entries: v2's test manifest lists speech clips first.
    eval_samples = scored_samples(test)
    if plan.eval_limit is not None:
        eval_samples = spread(eval_samples, plan.eval_limit)
    rep["following_before"] = measure_following(
        model, cache, test, clips=plan.following_clips, max_new_tokens=plan.following_tokens
    )
    stories_manifest = out / "activation" / "stories.json"
    if plan.corpus == "v2":
        written = json.loads((corpus_dir / "activation.json").read_text())["annotation"]
        chosen = spread(written, plan.activation_samples)
        stories_manifest.parent.mkdir(parents=True, exist_ok=True)
        write_manifest(
            stories_manifest, [{**e, "path": str(corpus_dir / e["path"])} for e in chosen]
        )
    elif not (resume and stories_manifest.is_file()):
        make_activation_data(
            model,
            cache,
            train_all,
            stories_manifest,
            count=plan.activation_samples,
            lora_scale=plan.activation_lora_scale,
            max_new_tokens=plan.story_tokens,
        )
    stories = read_manifest(stories_manifest)
    timings["activation_data"] = time.perf_counter() - started
    started = time.perf_counter()
    rep["activation"] = _run_stage(
        model, plan.activation, stories, dev, out / "activation", cache, resume, progress
    )
    model.load_checkpoint(out / "activation" / "last")
    timings["activation"] = time.perf_counter() - started
    started = time.perf_counter()
    rep["following_after"] = measure_following(
        model, cache, test, clips=plan.following_clips, max_new_tokens=plan.following_tokens
    )
    timings["following"] = time.perf_counter() - started

    started = time.perf_counter()
    model.pack_for_inference()  # training is over: faster decoding, same answers
    result = evaluate_model(model, cache, eval_samples, progress=progress)
    if plan.corpus == "v2":
        from training.scoring import by_speech_engine

        result["by_engine"] = by_speech_engine([ScoredItem(**i) for i in result["items"]])
    if plan.qa_limit:
        qa = [s for s in test if s.task == "QA"]
        result["qa"] = evaluate_qa(model, cache, spread(qa, plan.qa_limit))
        if heard:
            asked = spread(qa, plan.qa_limit)
            if caption_labels is not None:
                # As the agent asks a sound window's questions with [sounds] on (never trained).
                sounds = tagger_sounds(
                    asked, out / "tagger_sounds.json", min_score=caption_labels.min_score
                )
                heard = dataclasses.replace(heard, sounds=sounds)
            result["qa_heard"] = evaluate_qa(model, cache, asked, heard=heard)
    timings["eval"] = time.perf_counter() - started
    rep["test"] = {k: v for k, v in result.items() if k != "items"}
    for key in ("qa", "qa_heard"):
        if key in rep["test"]:
            rep["test"][key] = {k: v for k, v in result[key].items() if k != "items"}
    (out / "test_eval.json").write_text(json.dumps(result, indent=1) + "\n")

    final = out / "final"
    final.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy2(out / "activation" / "last" / name, final / name)
    timings["total"] = sum(timings.values())
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    logger.info("recipe done in %.0f s: %s", timings["total"], rep["test"])
    return rep


@dataclass(frozen=True)
class CaptionLabels:
    """How the agent asks for a caption with the tagger's labels (``sounds.caption_labels``);
    the command line builds it from `agent.config`, which this room does not import.

    Attributes:
        instruction: the caption instruction (``prompts.caption``).
        with_labels: ``(instruction, heard) -> instruction with the labels``.
        min_score: least score of a group put in the prompt.
    """

    instruction: str
    with_labels: Callable[[str, Sequence[tuple[str, float]]], str]
    min_score: float


def tagged_captions(
    samples: list[Sample],
    manifest: Path,
    labels: CaptionLabels,
    *,
    loader: AudioLoader = read_wav_16k,
) -> list[Sample]:
    """Each ``audiocaption`` entry again as ``audiocaption_tagged``: the same caption, asked
    with the sound-event groups the tagger (its defaults) hears in the clip in front of the
    caption instruction, as ``labels`` says the agent asks. Written to ``manifest`` and read
    back from it when it exists (tagging is the slow part).
    """
    from model.sound_tagger import SoundTaggerConfig, load_sound_tagger
    from training.tagger_eval import heard_groups

    if manifest.is_file():
        return read_manifest(manifest)
    tagger = load_sound_tagger(SoundTaggerConfig())
    entries: list[dict[str, Any]] = []
    for s, pooled in _pooled_scores(tagger, samples, loader):
        heard = heard_groups(tagger, pooled, labels.min_score)
        entries.append(
            {
                "path": str(s.path),
                "text": s.text,
                "task": "audiocaption_tagged",
                "Q": labels.with_labels(labels.instruction, heard),
            }
        )
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, entries)
    logger.info("tagged %d captions -> %s", len(entries), manifest)
    return read_manifest(manifest)


def _pooled_scores(
    tagger: Any, samples: Sequence[Sample], loader: AudioLoader
) -> Iterator[tuple[Sample, Any]]:
    """Each sample with the tagger's scores pooled over its clip (its config's pooling),
    tagged 32 clips a call."""
    from model.sound_tagger import pool

    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        scores = tagger.scores_batch([load_sample_audio(s, loader) for s in chunk])
        for s, clip_scores in zip(chunk, scores, strict=True):
            yield s, pool(clip_scores, tagger.config.pooling)


def _class_init(
    model: Salmonn,
    cache: EncoderCache,
    train: list[Sample],
    corpus_dir: Path,
    out: Path,
    plan: RecipePlan,
    resume: bool,
) -> dict[str, Any]:
    from training.class_init import class_init, clip_classes

    done = out / "class_init" / "last"
    saved = (
        json.loads((done / "config.json").read_text()) if (done / "config.json").is_file() else {}
    )
    if resume and saved.get("class_init", {}).get("steps") == plan.class_init_steps:
        logger.info("class init already done: loading %s", done)
        model.load_checkpoint(done)
        return {"skipped": True, "steps": plan.class_init_steps}
    meta = json.loads((corpus_dir / "meta.json").read_text())
    return class_init(
        model, cache, train, clip_classes(meta), out / "class_init", steps=plan.class_init_steps
    )


def _run_stage(
    model: Salmonn,
    config: TrainConfig,
    samples: list[Sample],
    dev: list[Sample],
    out: Path,
    cache: EncoderCache,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    done = out / "last" / "config.json"
    if resume and done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("step") == config.steps:
            logger.info("%s already finished (%d steps): skipping", config.stage, config.steps)
            model.load_checkpoint(out / "last")
            return {"skipped": True, "step": config.steps}
    trainer = Trainer(model, config, samples, dev, out, cache, progress=progress)
    result = trainer.train(resume=resume)
    return {
        "steps": result.step,
        "last_loss": result.last_loss,
        "best_dev_token_accuracy": result.best_token_accuracy,
        "seconds": result.seconds,
        "step_seconds": result.step_seconds,
        "samples_per_s": result.samples_per_s,
        "history": result.history,
    }
