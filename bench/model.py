"""`salmonn-live bench model`: where a single answer's time goes, and how much memory it takes.

Measures, on one machine in one run: model load time, encoder time in official (30 s padded)
and trimmed (real length) modes, Q-Former time, LLM prefill time, decode tokens per second and
peak resident memory (and, on a GPU, the device's peak). Timings are medians over `--repeats`
runs after one warm-up. ``--device`` / ``--dtype`` place the model (`model.device`); on a GPU
every timing waits for the device to finish (`torch.cuda.synchronize`), so it counts the work,
not only its launch.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

EXAMPLE_CLIP = Path(__file__).resolve().parent.parent / "examples" / "turn_left_and_stop.wav"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agent.cli.ask import add_model_arguments

    add_model_arguments(parser)  # --model ... --device
    parser.add_argument(
        "--dtype",
        dest="model_dtype",  # the name `load_model_from_args` reads, as `ask`'s --dtype
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on the CPU, bfloat16 on a GPU that has it, else float16",
    )
    parser.add_argument(
        "--audio",
        default=str(EXAMPLE_CLIP),
        help="clip to measure on (default: the bundled 2 s command)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per figure (median reported)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="tokens to decode for the tokens/s figure"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def _sync(device) -> None:
    """Wait for the GPU's queued work, so a timing covers it (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, repeats: int, device=None) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    samples = []
    for _ in range(repeats):
        if device is not None:
            _sync(device)
        started = time.perf_counter()
        fn()
        if device is not None:
            _sync(device)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> int:
    import torch

    from agent.cli.ask import load_model_from_args
    from model.device import dtype_name
    from streaming.audio_file import load_audio
    from streaming.pcm import SAMPLE_RATE_HZ

    if args.threads:
        torch.set_num_threads(args.threads)
    audio = load_audio(args.audio)
    started = time.perf_counter()
    model = load_model_from_args(args)
    load_s = time.perf_counter() - started
    device, dtype = model.placement()
    base_config = model.config
    figures: dict[str, float | str | int] = {
        "model": base_config.name,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "audio_s": round(len(audio) / SAMPLE_RATE_HZ, 2),
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
    }
    for mode in ("official", "trimmed"):
        model.config = base_config.replace(input_mode=mode)
        tokens = model.encode_audio([audio])
        figures[f"{mode}_audio_tokens"] = tokens.counts[0]
        encoder, qformer = [], []
        for _ in range(args.repeats + 1):
            # The two stages of `encode_audio`, each timed to its end on the device.
            _sync(device)
            t0 = time.perf_counter()
            raw = model.raw_encoder_outputs([audio])
            _sync(device)
            t1 = time.perf_counter()
            model.audio_tokens_from_raw([r[0] for r in raw], [r[1] for r in raw])
            _sync(device)
            encoder.append((t1 - t0) * 1000)
            qformer.append((time.perf_counter() - t1) * 1000)
        figures[f"{mode}_encoder_ms"] = round(statistics.median(encoder[1:]), 1)
        figures[f"{mode}_qformer_ms"] = round(statistics.median(qformer[1:]), 1)
    model.config = base_config
    row = model.encode_audio([audio]).row(0).detach()
    instruction = "Recognize the speech and give me the transcription."
    inputs = model.build_inputs([row], [instruction])
    with torch.no_grad():
        figures["prefill_tokens"] = int(inputs["attention_mask"].sum())
        figures["prefill_ms"] = round(
            _median_ms(lambda: model.llama_model(**inputs), args.repeats, device), 1
        )

    stamps: list[float] = []
    _sync(device)
    started = time.perf_counter()
    # Suppress EOS for a fixed-length decode, so tokens/s does not depend on the answer.
    with torch.no_grad():
        model.llama_model.generate(
            **{k: v for k, v in inputs.items() if k != "position_ids"},
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.eos_token_id,
            streamer=_Stamps(stamps),
        )
    total = time.perf_counter() - started
    if len(stamps) >= 2:
        figures["first_token_ms"] = round((stamps[0] - started) * 1000, 1)
        figures["decode_tokens_per_s"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1)
    figures["generate_s"] = round(total, 2)
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        figures["device_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        figures["gpu"] = torch.cuda.get_device_name(device)
    figures["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            sys.stdout.write(f"{key:<{width}}  {value}\n")
    return 0


class _Stamps:
    """A transformers streamer that records when each decoded token arrives."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def put(self, value) -> None:
        if value.dim() == 1:  # the first call carries the (empty) prompt ids as a 2-D tensor
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass
