"""SALMONN-7B- and 13B-shaped serving on one GPU, from random weights (issue 19).

A prepared script for a session that is lent a GPU. For each size it builds the paper's shapes,
Whisper large-v2 + BEATs iter3+ + the window-level Q-Former + Vicuna-7B v1.5 or Vicuna-13B
v1.1 with LoRA, on the meta device, allocates them on the GPU in the chosen dtype (`to_empty`)
and fills them with random weights there: nothing is downloaded or saved, and no real weights
are needed, since the cost of a forward pass does not depend on the values. Measured per size:

* one stream: first-token latency (audio in -> first answer token: both encoders, the
  Q-Former, the prefill and one decoding step) and end-to-end latency for a 2 s command
  (``examples/turn_left_and_stop.wav``) answered with ``--new-tokens`` tokens, p50 / p95 over
  ``--repeats`` runs after two warm-ups;
* streams sustained: B commands from B streams answered as one batch, for B = 1, 2, 4, ...;
  B streams are sustained when the batch's p95 end-to-end time stays within the command's
  length (each stream hands the model at most one 2 s command per 2 s, so the answers keep up
  and no window is dropped). A model-level bound: the agent's pipeline (`bench pipeline`) adds
  the segmenter and the worker's scheduling;
* device memory: the weights, and the allocator's peak over all runs of the size.

The figures come out as a Markdown section for BENCHMARKS.md (stdout, and ``--out FILE``).

``--pipeline-streams 1,2,4,...`` then drives the real agent pipeline (the segmenter, the
window queue, the batching worker: `bench pipeline`'s measurement, ``bench.pipeline``) with the
``--pipeline-size`` shapes in trimmed mode, one generated scene per stream at real-time pace,
and reports dropped windows and end-of-utterance latency per stream count. The scenes are
rendered beforehand where espeak-ng is installed (``--write-scenes FILE``) and read from
``--scenes FILE``, as the GPU machine has no espeak-ng.

``--dry-run`` builds the shapes on the meta device only and prints their parameter counts: it
runs anywhere (the tests run it on the CPU). ``--sizes tiny --device cpu`` runs the whole
measurement on tiny shapes on the CPU (also tested). The command for the device tool is in
docs/model.md ("On a GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
import wave
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
COMMAND_CLIP = REPO / "examples" / "turn_left_and_stop.wav"
INSTRUCTION = "Recognize the speech and give me the transcription."
GIB = 1024**3


@dataclass(frozen=True)
class Shapes:
    """The sizes of one SALMONN build: transformers/BEATs config arguments and the preset."""

    name: str
    preset: str  # model.presets.PRESETS key (Q-Former sizes, LoRA, required widths)
    whisper: dict[str, Any]
    beats: dict[str, Any]
    llm: dict[str, Any]
    label: str = ""


# Whisper large-v2 (SALMONN.md section 1): d_model 1280, 32 + 32 layers, 20 heads, 80 mel bins.
WHISPER_LARGE_V2: dict[str, Any] = {
    "d_model": 1280,
    "encoder_layers": 32,
    "decoder_layers": 32,
    "encoder_attention_heads": 20,
    "decoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120,
    "num_mel_bins": 80,
    "vocab_size": 51865,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}

SIZES: dict[str, Shapes] = {
    "7b": Shapes(
        name="7b",
        preset="salmonn-7b",
        label="SALMONN-7B shapes (Whisper large-v2 + BEATs + Vicuna-7B v1.5)",
        whisper=WHISPER_LARGE_V2,
        beats={},  # BeatsConfig() is the full-size iter3+ AS2M cpt2 model
        llm={  # Llama-2 7B
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 11008,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    ),
    "13b": Shapes(
        name="13b",
        preset="salmonn-13b",
        label="SALMONN-13B shapes (Whisper large-v2 + BEATs + Vicuna-13B v1.1)",
        whisper=WHISPER_LARGE_V2,
        beats={},
        llm={  # LLaMA-1 13B
            "hidden_size": 5120,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
            "intermediate_size": 13824,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
    # The measuring code on shapes a CPU runs in seconds (tests): the tiny-random preset's sizes.
    "tiny": Shapes(
        name="tiny",
        preset="tiny-random",
        label="tiny shapes (code check only)",
        whisper={
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "num_mel_bins": 80,
            "vocab_size": 51865,
            "max_source_positions": 1500,
            "max_target_positions": 64,
        },
        beats={
            "embed_dim": 16,
            "encoder_layers": 1,
            "encoder_embed_dim": 32,
            "encoder_ffn_embed_dim": 64,
            "encoder_attention_heads": 2,
            "conv_pos": 16,
            "conv_pos_groups": 4,
        },
        llm={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 400,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
    ),
}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_on_meta(
    shapes: Shapes,
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer: Any = None,
    sentencepiece: Any = None,
    input_mode: str = "official",
) -> Any:
    """The whole SALMONN model of these shapes on the meta device (no memory, no init).

    The frozen parts are cast to ``dtype`` there (free on meta), so `to_empty` later allocates
    each part once, in the dtype it runs in; `Salmonn.place` then sets the connection parts.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers import WhisperForConditionalGeneration as Whisper

    from model.beats import Beats, BeatsConfig
    from model.presets import PRESETS
    from model.salmonn import Salmonn

    config = PRESETS[shapes.preset].replace(input_mode=input_mode)
    with torch.device("meta"), _default_dtype(dtype):
        # Built under the default dtype, as transformers' from_pretrained(dtype=) does, so
        # buffers that the modules compute in float32 on purpose (rotary frequencies) stay so.
        whisper = Whisper(WhisperConfig(**shapes.whisper))
        beats = Beats(BeatsConfig(**shapes.beats) if shapes.beats else BeatsConfig())
        llm = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, **shapes.llm))
    with torch.device("meta"):
        model = Salmonn(
            config,
            whisper=whisper,
            beats=beats,
            llm=llm,
            tokenizer=tokenizer,
            sentencepiece=sentencepiece,
        )
    return model.place("meta", dtype)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters per part of a SALMONN model (meta or real): Whisper's encoder and all of
    Whisper (the decoder serves plain transcription), BEATs, the connection parts (Q-Former,
    query tokens, layer norms, projection), LoRA, the LLM without LoRA, and the total."""

    def count(params: Any) -> int:
        return sum(p.numel() for p in params)

    llm_named = list(model.llama_model.named_parameters())
    connection = [
        model.ln_speech,
        model.ln_audio,
        model.speech_Qformer,
        model.speech_llama_proj,
    ]
    counts = {
        "whisper_encoder": count(model.speech_encoder.parameters()),
        "whisper": count(model.whisper.parameters()),
        "beats": count(model.beats.parameters()) if model.beats is not None else 0,
        "connection": count(p for m in connection if m is not None for p in m.parameters())
        + model.speech_query_tokens.numel(),
        "lora": count(p for n, p in llm_named if "lora_" in n),
        "llm": count(p for n, p in llm_named if "lora_" not in n),
    }
    counts["total"] = count(model.parameters())
    return counts


@torch.no_grad()
def randomize_(model: nn.Module, *, seed: int = 0) -> None:
    """Fill every parameter of a model that `to_empty` allocated: matrices N(0, 0.02), norm
    weights 1, biases 0; and recompute the buffers (rotary frequencies) from a CPU twin of
    their module, since `to_empty` leaves them unset."""
    generator: torch.Generator | None = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if param.dim() >= 2:
            param.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("weight") and ("norm" in name.lower() or name.startswith("ln_")):
            param.fill_(1.0)
        else:
            param.zero_()
    for module in model.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot rebuild the buffers {sorted(own)} of {type(module)}")
        twin = type(module)(config)  # built on the CPU: its buffers are computed, not random
        for key, buffer in own.items():
            buffer.copy_(getattr(twin, key).to(buffer.dtype))


def build_random(
    shapes: Shapes,
    device: torch.device,
    dtype: torch.dtype,
    *,
    input_mode: str = "official",
    seed: int = 0,
) -> Any:
    """A SALMONN model of these shapes with random weights, allocated on ``device``."""
    from transformers import AutoTokenizer

    from model.llm import sentencepiece_model
    from model.tiny import tiny_random_sources

    # Any LLaMA sentencepiece tokenizer will do for timing: the tiny one is built locally (its
    # ids, below 400, are valid in a 32000-token vocabulary).
    llm_dir = tiny_random_sources()["llm"]
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = build_on_meta(
        shapes,
        dtype,
        tokenizer=tokenizer,
        sentencepiece=sentencepiece_model(llm_dir),
        input_mode=input_mode,
    )
    model.to_empty(device=device)
    model.place(device, dtype)
    randomize_(model, seed=seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def load_command(path: Path = COMMAND_CLIP) -> np.ndarray:
    """The 2 s example command as 16 kHz float32 (read with the standard library's `wave`)."""
    with wave.open(str(path)) as reader:
        if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    if rate != 16000:
        raise ValueError(f"{path}: expected 16 kHz, got {rate} Hz")
    return (pcm.astype(np.float32) / 32768.0).copy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with few runs, p95 is the slowest of them."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Run:
    """One timed answer of a batch: seconds from the call to the first token and to the end."""

    first_token_s: float
    end_to_end_s: float
    tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def answer_once(
    model: Any, clips: Sequence[np.ndarray], new_tokens: int, device: torch.device
) -> Run:
    """Answer one batch of commands, greedy, streaming tokens; time it from the call."""
    first: list[float] = []

    def on_token(row: int, token: int) -> None:
        if not first:
            first.append(time.perf_counter())

    _sync(device)
    started = time.perf_counter()
    results = model.generate(list(clips), INSTRUCTION, max_new_tokens=new_tokens, on_token=on_token)
    _sync(device)
    ended = time.perf_counter()
    return Run(
        first_token_s=(first[0] if first else ended) - started,
        end_to_end_s=ended - started,
        tokens=max(len(r.token_ids) for r in results),
        timings_ms=results[0].timings_ms,
    )


def measure_size(
    shapes: Shapes,
    device: torch.device,
    dtype: torch.dtype,
    *,
    input_mode: str,
    new_tokens: int,
    repeats: int,
    streams: Sequence[int],
    deadline: float,
    log: Callable[[str], None],
    max_p95_s: float | None = None,
) -> dict[str, Any]:
    """Build one size, time one stream and the batch sweep; the figures as a dict."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    built = time.perf_counter()
    model = build_random(shapes, device, dtype, input_mode=input_mode)
    _sync(device)
    build_s = time.perf_counter() - built
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    counts = parameter_counts(model)
    log(
        f"{shapes.name} {input_mode}: built in {build_s:.1f} s, {counts['total'] / 1e9:.2f} B "
        f"parameters, {weights / GIB:.2f} GiB"
    )
    clip = load_command()
    period_s = clip.shape[0] / 16000
    limit_s = period_s if max_p95_s is None else max_p95_s
    for _ in range(2):  # warm-up: kernel selection, allocator growth, lazy initialisation
        answer_once(model, [clip], new_tokens, device)
    single = [answer_once(model, [clip], new_tokens, device) for _ in range(repeats)]
    out: dict[str, Any] = {
        "size": shapes.name,
        "label": shapes.label,
        "input_mode": input_mode,
        "parameters": counts,
        "weights_gib": weights / GIB,
        "build_s": build_s,
        "command_s": period_s,
        "max_p95_s": limit_s,
        "new_tokens": new_tokens,
        "one_stream": {
            "first_token_p50_s": statistics.median(r.first_token_s for r in single),
            "first_token_p95_s": _percentile([r.first_token_s for r in single], 95),
            "end_to_end_p50_s": statistics.median(r.end_to_end_s for r in single),
            "end_to_end_p95_s": _percentile([r.end_to_end_s for r in single], 95),
            "tokens": single[-1].tokens,
            "timings_ms": single[-1].timings_ms,
        },
        "sweep": [],
        "sustained_streams": 0,
        "sweep_stopped": "",
    }
    log(f"  one stream: {json.dumps(out['one_stream'])}")
    for batch in streams:
        if time.perf_counter() > deadline:
            out["sweep_stopped"] = f"time budget reached before {batch} streams"
            break
        try:
            runs = [
                answer_once(model, [clip] * batch, new_tokens, device)
                for _ in range(max(2, repeats // 3))
            ]
        except torch.cuda.OutOfMemoryError:
            out["sweep_stopped"] = f"out of device memory at {batch} streams"
            torch.cuda.empty_cache()
            break
        p95 = _percentile([r.end_to_end_s for r in runs], 95)
        row = {
            "streams": batch,
            "end_to_end_p50_s": statistics.median(r.end_to_end_s for r in runs),
            "end_to_end_p95_s": p95,
            "first_token_p95_s": _percentile([r.first_token_s for r in runs], 95),
            "timings_ms": runs[-1].timings_ms,
        }
        out["sweep"].append(row)
        log(f"  {batch} streams: {json.dumps(row)}")
        if p95 <= limit_s:
            out["sustained_streams"] = batch
        elif p95 > 2 * limit_s:
            out["sweep_stopped"] = f"{batch} streams take {p95:.2f} s per {period_s:.1f} s"
            break
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def shapes_table(dtype: torch.dtype, sizes: Sequence[str]) -> str:
    """Markdown: parameter counts and weight sizes of each size, built on the meta device."""
    from model.device import dtype_name

    lines = [
        f"| shapes | Whisper (encoder) | BEATs | Q-Former + proj | LoRA | LLM | total | "
        f"{dtype_name(dtype)} weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sizes:
        model = build_on_meta(SIZES[name], dtype)
        c = parameter_counts(model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        lines.append(
            f"| {name} | {c['whisper'] / 1e6:,.1f} M ({c['whisper_encoder'] / 1e6:,.1f} M) "
            f"| {c['beats'] / 1e6:,.1f} M | {c['connection'] / 1e6:,.2f} M "
            f"| {c['lora'] / 1e6:,.2f} M | {c['llm'] / 1e9:,.3f} B | {c['total'] / 1e9:,.3f} B "
            f"| {weights / GIB:,.2f} GiB |"
        )
    return "\n".join(lines)


def markdown(results: Sequence[dict[str, Any]], header: dict[str, str]) -> str:
    """The BENCHMARKS.md section for the measured sizes."""
    lines = [
        "## SALMONN-7B/13B shapes on a GPU (random weights, `bench/gpu_check.py`)",
        "",
        "; ".join(f"{k}: {v}" for k, v in header.items()) + ".",
        "",
        "| shapes | input | weights | first token p50 / p95 | end to end p50 / p95 | "
        "streams sustained | device peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        one = r["one_stream"]
        peak = f"{r['device_peak_gib']:.1f} GiB" if "device_peak_gib" in r else "-"
        lines.append(
            f"| {r['size']} | {r['input_mode']} | {r['weights_gib']:.1f} GiB "
            f"| {one['first_token_p50_s']:.3f} / {one['first_token_p95_s']:.3f} s "
            f"| {one['end_to_end_p50_s']:.3f} / {one['end_to_end_p95_s']:.3f} s "
            f"| {r['sustained_streams']} | {peak} |"
        )
    lines += [
        "",
        "Streams sustained: the most streams whose batch of 2 s commands (one per stream) is "
        "answered with p95 end to end within the command's length (or `--max-p95-s`), so "
        "answers keep up with the audio; a model-level bound (no segmenter, no scheduling).",
        "",
        "Batch sweep:",
        "",
    ]
    lines += [
        "| shapes | input | streams | p50 | p95 | encoders / Q-Former ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["sweep"]:
            t = row["timings_ms"]
            lines.append(
                f"| {r['size']} | {r['input_mode']} | {row['streams']} "
                f"| {row['end_to_end_p50_s']:.3f} s | {row['end_to_end_p95_s']:.3f} s "
                f"| {t.get('encoder_ms', 0):.0f} / {t.get('qformer_ms', 0):.0f} |"
            )
        if r["sweep_stopped"]:
            lines.append(
                f"| {r['size']} | {r['input_mode']} | stopped: {r['sweep_stopped']} | | | |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The agent pipeline on the GPU
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneAudio:
    """What `bench.pipeline`'s measurement reads of a scene: its samples."""

    audio: np.ndarray


def write_scenes(path: Path, count: int, seconds: float) -> None:
    """Render `bench pipeline`'s scenes (espeak-ng speech, synthetic sounds) into an ``.npz``
    of 16-bit samples (half the size to carry; what a microphone gives anyway)."""
    from bench.pipeline import _scenes

    pcm = [(np.clip(s.audio, -1.0, 1.0) * 32767).astype(np.int16) for s in _scenes(count, seconds)]
    np.savez_compressed(path, *pcm)


def read_scenes(path: Path) -> list[SceneAudio]:
    """The scenes `write_scenes` saved, in order."""
    with np.load(path) as data:
        pcm = [data[f"arr_{i}"] for i in range(len(data.files))]
    return [SceneAudio(samples.astype(np.float32) / 32768.0) for samples in pcm]


def measure_pipeline(
    shapes: Shapes,
    device: torch.device,
    dtype: torch.dtype,
    scenes: Sequence[SceneAudio],
    *,
    counts: Sequence[int],
    new_tokens: int,
    max_batch: int,
    max_p95_s: float,
    deadline: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The agent pipeline (`bench.pipeline`'s real-time run) on a random model of ``shapes``:
    one row per stream count, as `bench pipeline` reports them. LLM answers only (a random
    model's Whisper has no tokenizer), each run to ``new_tokens`` (random weights never stop)."""
    import asyncio

    from agent.config import ModelSettings
    from bench import pipeline

    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            shapes.preset,
            "--transcript",
            "llm",
            "--command",
            "llm",
            "--max-new-tokens",
            str(new_tokens),
            "--max-batch",
            str(max_batch),
            "--device",
            str(device),
        ]
    )
    settings = ModelSettings(command=args.command, early_command_ms=args.early_command_ms)
    args.early_command_ms = settings.early_ms  # resolved as `bench pipeline` resolves them
    args.command_whisper = settings.command_recogniser
    model = build_random(shapes, device, dtype, input_mode="trimmed")
    rows: list[dict[str, Any]] = []
    for count in counts:
        if count > len(scenes):
            log(f"pipeline: {count} streams need {count} scenes, {len(scenes)} written")
            break
        if time.perf_counter() > deadline:
            log(f"pipeline: time budget reached before {count} streams")
            break
        started = time.perf_counter()
        row = asyncio.run(pipeline._realtime(model, list(scenes[:count]), args))
        row["wall_s"] = round(time.perf_counter() - started, 1)
        row["sustained"] = row["dropped"] == 0 and row["eou_p95"] <= max_p95_s
        log(f"pipeline {shapes.name}: {row}")
        rows.append(row)
        if row["dropped"]:
            break  # more streams drop more
    del model
    gc.collect()
    return rows


def pipeline_markdown(
    size: str, rows: Sequence[dict[str, Any]], scene_s: float, max_p95_s: float
) -> str:
    """The pipeline rows as a Markdown table."""
    lines = [
        "",
        f"Agent pipeline (`bench.pipeline`'s real-time run, trimmed input), {size} shapes, "
        f"one {scene_s:g} s scene per stream (2 commands, 2 sound events), LLM answers only. "
        "Latency: end of utterance (500 ms hangover included) to the final `command` event; "
        f"sustained: nothing dropped and p95 <= {max_p95_s:g} s.",
        "",
        "| streams | windows | dropped | p50 | p95 | windows / worker-s | sustained |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']} | {r['windows']} | {r['dropped']} | {r['eou_p50']:.2f} s "
            f"| {r['eou_p95']:.2f} s | {r['windows_per_busy_s']:.2f} "
            f"| {'yes' if r['sustained'] else 'no'} |"
        )
    return "\n".join(lines)


def _header(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, str]:
    from model.device import dtype_name

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "Date": time.strftime("%Y-%m-%d"),
        "Device": f"{device} ({gpu})",
        "dtype": dtype_name(dtype),
        "torch": torch.__version__ + (f" CUDA {torch.version.cuda}" if torch.version.cuda else ""),
        "answer": f"{args.new_tokens} tokens, greedy",
        "command": "python3 -m bench.gpu_check " + " ".join(args.argv),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: auto)"
    )
    parser.add_argument("--sizes", default="7b,13b", help="comma-separated: 7b, 13b, tiny")
    parser.add_argument(
        "--input-modes", default="official,trimmed", help="comma-separated: official, trimmed"
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=10, help="timed one-stream runs")
    parser.add_argument(
        "--streams", default="1,2,4,8,16,32,64,128", help="batch sizes of the sweep"
    )
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="stop starting new measurements after this"
    )
    parser.add_argument(
        "--pipeline-budget-s",
        type=float,
        default=180.0,
        help="more seconds, after --budget-s, in which pipeline runs may still start",
    )
    parser.add_argument(
        "--max-p95-s",
        type=float,
        default=None,
        help="batch p95 under which its streams count as sustained (default: the command's length)",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown here (and .json)")
    parser.add_argument(
        "--pipeline-streams",
        default="",
        help="stream counts for the agent pipeline run, e.g. 1,4,16,32 ('' = none)",
    )
    parser.add_argument("--pipeline-size", default="7b", help="shapes of the pipeline run")
    parser.add_argument(
        "--pipeline-max-batch", type=int, default=32, help="worker.max_batch of the pipeline run"
    )
    parser.add_argument(
        "--pipeline-max-p95-s",
        type=float,
        default=2.0,
        help="p95 under which the pipeline's streams count as sustained (bench pipeline's)",
    )
    parser.add_argument("--scenes", type=Path, help="scenes for the pipeline run (.npz)")
    parser.add_argument(
        "--write-scenes",
        type=Path,
        metavar="FILE",
        help="render --scene-count scenes of --scene-s into FILE (.npz; needs espeak-ng), exit",
    )
    parser.add_argument("--scene-count", type=int, default=32, help="scenes --write-scenes makes")
    parser.add_argument("--scene-s", type=float, default=20.0, help="length of each scene, s")
    parser.add_argument(
        "--dry-run",
        "--shapes-only",
        action="store_true",
        help="build the shapes on the meta device and print parameter counts only",
    )
    return parser


def _emit(text: str, stream: Any = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (2 for a device or dtype that cannot be used)."""
    from model.device import resolve_device_dtype
    from model.errors import ModelError

    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    args.argv = raw
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        _emit(f"unknown sizes {unknown}; known: {sorted(SIZES)}", sys.stderr)
        return 2
    if args.write_scenes is not None:
        write_scenes(args.write_scenes, args.scene_count, args.scene_s)
        _emit(f"{args.scene_count} scenes of {args.scene_s:g} s written to {args.write_scenes}")
        return 0
    if args.dry_run:
        dtype = torch.float32 if args.dtype is None else resolve_device_dtype("cpu", args.dtype)[1]
        _emit(shapes_table(dtype, sizes))
        return 0
    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    except ModelError as exc:
        _emit(f"error: {exc}", sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget_s
    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    modes = [m.strip() for m in args.input_modes.split(",") if m.strip()]

    def log(line: str) -> None:
        _emit(line, sys.stderr)

    results: list[dict[str, Any]] = []
    failures = 0
    for size in sizes:
        for mode in modes:
            if time.perf_counter() > deadline:
                log(f"time budget reached: {size} {mode} not measured")
                continue
            try:
                results.append(
                    measure_size(
                        SIZES[size],
                        device,
                        dtype,
                        input_mode=mode,
                        new_tokens=args.new_tokens,
                        repeats=args.repeats,
                        streams=streams,
                        deadline=deadline,
                        log=log,
                        max_p95_s=args.max_p95_s,
                    )
                )
            except Exception:  # one broken size must not cost the rest of a GPU lease
                failures += 1
                log(f"{size} {mode} failed:\n{traceback.format_exc()}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    text = markdown(results, _header(device, dtype, args))
    counts = [int(c) for c in args.pipeline_streams.split(",") if c.strip()]
    if counts:
        try:
            if args.scenes is None:
                raise ValueError("--pipeline-streams needs --scenes (from --write-scenes)")
            scenes = read_scenes(args.scenes)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows = measure_pipeline(
                SIZES[args.pipeline_size],
                device,
                dtype,
                scenes,
                counts=counts,
                new_tokens=args.new_tokens,
                max_batch=args.pipeline_max_batch,
                max_p95_s=args.pipeline_max_p95_s,
                deadline=deadline + args.pipeline_budget_s,
                log=log,
            )
            scene_s = len(scenes[0].audio) / 16000 if scenes else 0.0
            text += "\n" + pipeline_markdown(
                args.pipeline_size, rows, scene_s, args.pipeline_max_p95_s
            )
            results.append({"pipeline": rows, "size": args.pipeline_size})
        except Exception:  # the model-level figures above still come back
            failures += 1
            log(f"pipeline failed:\n{traceback.format_exc()}")
    _emit(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
