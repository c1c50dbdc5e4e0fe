"""`salmonn-live ask AUDIO "INSTRUCTION"`: one question about one clip, answered once."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load a model (shared by every command that loads one)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="nano",
        help="preset (nano; nano-dual: Whisper + YAMNet, trained on corpus v2; nano-dual-gemma,"
        " nano-dual-qwen: nano-dual with Gemma 3 270M or Qwen2.5-Coder-0.5B, `make llms`;"
        " salmonn: an"
        " official-layout checkpoint with any LLM; salmonn-13b,"
        " salmonn-7b: the released checkpoints with their Vicuna; tiny-random) or a checkpoint"
        " directory (default: nano)",
    )
    group.add_argument(
        "--whisper",
        help="Whisper weights: HF directory, OpenAI .pt, CTranslate2 directory or package:NAME",
    )
    group.add_argument("--beats", help="BEATs .pt (official {'cfg', 'model'} file)")
    group.add_argument("--llm", help="LLM: HF directory, .gguf file or package:NAME")
    group.add_argument(
        "--checkpoint",
        help="trained parts: official salmonn_*.pth or a salmonn-live checkpoint directory",
    )
    group.add_argument(
        "--input-mode",
        choices=("official", "trimmed"),
        help="official: pad to 30 s; trimmed: real length (default: the preset's)",
    )
    group.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu (default), cuda, cuda:N, or auto (CUDA when there is one)",
    )


def load_model_from_args(args: argparse.Namespace, *, trained_parts: bool = True) -> Any:
    """The model chosen by the `--model`, `--whisper`, ... options, loaded.

    With ``trained_parts=False`` the preset's own trained parts (nano's ``model/nano/``) are
    not loaded, so training starts from fresh ones; an explicit ``--checkpoint`` still is.
    """
    from model.presets import resolve_model
    from model.salmonn import Salmonn

    config = resolve_model(
        args.model,
        whisper=args.whisper,
        beats=args.beats,
        llm=args.llm,
        checkpoint=args.checkpoint,
        input_mode=args.input_mode,
    )
    if not trained_parts and args.checkpoint is None:
        config = config.replace(checkpoint=None)
    # `train` has a --dtype of its own (autocast), so the weights' dtype is `model_dtype`.
    dtype = getattr(args, "model_dtype", None)
    return Salmonn.from_config(config, device=args.device, dtype=dtype)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ask`` sub-command."""
    parser = subparsers.add_parser(
        "ask",
        help="ask the model one question about an audio file",
        description="Load a model, read AUDIO (any rate and channel count), answer INSTRUCTION.",
    )
    parser.add_argument("audio", help="audio file (wav, flac, ogg)")
    parser.add_argument(
        "instruction", help='e.g. "Recognize the speech and give me the transcription."'
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--dtype",
        dest="model_dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on the CPU, bfloat16 on a GPU that has it, else float16",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--lora-scale",
        type=float,
        help="LoRA scaling factor (trained: alpha/r = 4.0; lower it to follow new kinds"
        " of instruction)",
    )
    gen.add_argument(
        "--beams",
        type=int,
        default=1,
        help="beam search width (1: greedy; the official demo used 4)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument(
        "--with-transcript",
        action="store_true",
        help="ask with Whisper's transcript of the audio in front ('Speech heard: \"...\""
        " <instruction>', as `run` asks a standing question of a speech window)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print {text, token_ids, audio_tokens, timings_ms} as JSON",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.audio import SAMPLE_RATE_HZ
    from model.errors import AudioTooLongError
    from model.salmonn import MAX_AUDIO_S
    from streaming.audio_file import load_audio, open_sound_file

    if args.beams < 1 or args.max_new_tokens < 1:
        sys.stderr.write(
            "salmonn-live ask: error: --beams and --max-new-tokens must be at least 1\n"
        )
        return 2
    with open_sound_file(args.audio) as sound:  # the header's length: refuse before reading
        duration_s = sound.frames / sound.samplerate
    if duration_s <= MAX_AUDIO_S:
        audio = load_audio(args.audio, SAMPLE_RATE_HZ)
        duration_s = audio.shape[0] / SAMPLE_RATE_HZ
    if duration_s > MAX_AUDIO_S:
        raise AudioTooLongError(
            f"{args.audio} is {duration_s:.1f} s long; SALMONN hears at most "
            f"{MAX_AUDIO_S:.0f} s at once: "
            "cut it, or stream it with `salmonn-live run` to hear it segment by segment"
        )
    started = time.perf_counter()
    model = load_model_from_args(args)
    load_ms = (time.perf_counter() - started) * 1000
    instruction = args.instruction
    if args.with_transcript:
        from model.prompts import with_transcript

        if model.whisper_tokenizer is None:
            sys.stderr.write(
                "salmonn-live ask: error: --with-transcript needs Whisper's text, and this"
                " model's Whisper has no tokenizer\n"
            )
            return 2
        instruction = with_transcript(instruction, model.transcribe_with_whisper([audio])[0])
    result = model.generate(
        [audio],
        instruction,
        lora_scale=args.lora_scale,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
    )[0]
    if args.json:
        timings = {
            "load_ms": round(load_ms, 1),
            **{k: round(v, 1) for k, v in result.timings_ms.items()},
        }
        out = {
            "instruction": instruction,
            "text": result.text,
            "token_ids": result.token_ids,
            "audio_tokens": result.audio_tokens,
            "timings_ms": timings,
        }
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(result.text + "\n")
    return 0
