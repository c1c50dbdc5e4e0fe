"""The official checkpoint layout (SALMONN.md section 6), written from the spec, not the code.

Shared by the model and command-line tests, which write official-layout `.pth` files with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

QFORMER_LAYER_KEYS = {
    "attention.self.query": ("h", "h"),
    "attention.self.key": ("h", "h"),
    "attention.self.value": ("h", "h"),
    "attention.output.dense": ("h", "h"),
    "crossattention.self.query": ("h", "h"),
    "crossattention.self.key": ("h", "enc"),
    "crossattention.self.value": ("h", "enc"),
    "crossattention.output.dense": ("h", "h"),
    "intermediate_query.dense": ("ffn", "h"),
    "output_query.dense": ("h", "ffn"),
}
LAYER_NORMS = (
    "attention.output.LayerNorm",
    "crossattention.output.LayerNorm",
    "output_query.LayerNorm",
)
# The released Q-Former: bert-base sizes, 2 layers.
OFFICIAL_QFORMER = {"h": 768, "ffn": 3072}


def official_state_dict(
    h: int,
    ffn: int,
    enc: int,
    speech: int,
    audio: int | None,
    llm: int,
    llm_layers: int,
    layers: int = 2,
    std: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A `model` state dict in the official layout, random values from torch's global seed.

    Args:
        h: Q-Former width (768 officially); ffn: its intermediate width (3072).
        enc: the fused encoder width the cross-attention reads (speech + audio, 2048 officially).
        speech: Whisper's width (`ln_speech`); audio: BEATs' width (`ln_audio`), None for a
            checkpoint trained without BEATs (no `ln_audio` keys).
        llm: the LLM's hidden size (`speech_llama_proj` output, LoRA width).
        llm_layers: LLM layers (one q_proj and one v_proj LoRA pair each).
        layers: Q-Former layers (2 officially).
        std: scale of the random weight matrices.
    """
    dims = {"h": h, "ffn": ffn, "enc": enc}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) * std

    sd: dict[str, torch.Tensor] = {
        "speech_query_tokens": randn(1, 1, h),
        "ln_speech.weight": torch.ones(speech),
        "ln_speech.bias": torch.zeros(speech),
        "speech_llama_proj.weight": randn(llm, h),
        "speech_llama_proj.bias": randn(llm),
        "speech_Qformer.bert.embeddings.LayerNorm.weight": torch.ones(h),
        "speech_Qformer.bert.embeddings.LayerNorm.bias": torch.zeros(h),
        # Harmless extras the released files carry.
        "speech_Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        "beats.encoder.layers.1.self_attn.relative_attention_bias.weight": torch.zeros(320, 2),
    }
    if audio is not None:
        sd["ln_audio.weight"] = torch.ones(audio)
        sd["ln_audio.bias"] = torch.zeros(audio)
    for i in range(layers):
        prefix = f"speech_Qformer.bert.encoder.layer.{i}."
        for name, (out_dim, in_dim) in QFORMER_LAYER_KEYS.items():
            sd[prefix + name + ".weight"] = randn(dims[out_dim], dims[in_dim])
            sd[prefix + name + ".bias"] = randn(dims[out_dim])
        for name in LAYER_NORMS:
            sd[prefix + name + ".weight"] = torch.ones(h)
            sd[prefix + name + ".bias"] = torch.zeros(h)
    for i in range(llm_layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}."
            sd[prefix + "lora_A.default.weight"] = randn(8, llm)
            sd[prefix + "lora_B.default.weight"] = randn(llm, 8)
    return sd


def official_parts(
    directory: Path, *, llm_hidden: int = 48, beats: bool = True, seed: int = 0
) -> dict[str, str]:
    """Tiny parts and an official-layout checkpoint that fits them, for `--model salmonn`.

    Whisper and BEATs are the tiny-random ones (32 wide each); the LLM is a 2-layer random
    LLaMA `llm_hidden` wide, a size no Vicuna has; the checkpoint has the official Q-Former
    (768 wide, 2 layers) and, with ``beats=False``, no `ln_audio` (trained Whisper-only).

    Returns:
        ``--whisper``, ``--beats`` (absent with ``beats=False``), ``--llm`` and
        ``--checkpoint`` paths, keyed without the dashes.
    """
    from model.tiny import tiny_random_sources, write_tiny_llama

    tiny = tiny_random_sources()
    llm = directory / f"llama-{llm_hidden}"
    if not (llm / "config.json").is_file():
        write_tiny_llama(llm, seed=seed, hidden=llm_hidden)
    speech, audio = 32, (32 if beats else None)
    torch.manual_seed(seed)
    state = official_state_dict(
        **OFFICIAL_QFORMER,
        enc=speech + (audio or 0),
        speech=speech,
        audio=audio,
        llm=llm_hidden,
        llm_layers=2,
        std=0.02,  # BERT's initialisation scale, as a trained checkpoint's order of magnitude
    )
    checkpoint = (
        directory / f"salmonn_official_layout_{llm_hidden}{'' if beats else '_no_beats'}.pth"
    )
    torch.save({"model": state, "epoch": 1}, checkpoint)
    parts = {"whisper": tiny["whisper"], "llm": str(llm), "checkpoint": str(checkpoint)}
    if beats:
        parts["beats"] = tiny["beats"]
    return parts
