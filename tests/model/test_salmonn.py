"""SALMONN core on tiny random weights in the official layouts (fast, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.errors import AudioTooLongError, ModelLoadError
from model.presets import resolve_model
from model.salmonn import Salmonn, count_parameters

SR = 16000


@pytest.fixture(scope="module")
def tiny() -> Salmonn:
    torch.manual_seed(0)
    model = Salmonn.from_config(resolve_model("tiny-random"))
    # LoRA B starts at zero, which would make every LoRA test pass trivially: give it weights.
    with torch.no_grad():
        for name, param in model.llama_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def _clips(seed: int, seconds: tuple[float, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(int(s * SR)) / SR
        out.append(
            (
                0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
                + 0.05 * rng.standard_normal(t.shape)
            ).astype(np.float32)
        )
    return out


# -- the official checkpoint layout (SALMONN.md section 6), written from the spec, not the code --

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


def official_state_dict(
    h: int, ffn: int, enc: int, speech: int, audio: int, llm: int, llm_layers: int, layers: int = 2
) -> dict[str, torch.Tensor]:
    dims = {"h": h, "ffn": ffn, "enc": enc}
    sd: dict[str, torch.Tensor] = {
        "speech_query_tokens": torch.randn(1, 1, h),
        "ln_speech.weight": torch.ones(speech),
        "ln_speech.bias": torch.zeros(speech),
        "ln_audio.weight": torch.ones(audio),
        "ln_audio.bias": torch.zeros(audio),
        "speech_llama_proj.weight": torch.randn(llm, h),
        "speech_llama_proj.bias": torch.randn(llm),
        "speech_Qformer.bert.embeddings.LayerNorm.weight": torch.ones(h),
        "speech_Qformer.bert.embeddings.LayerNorm.bias": torch.zeros(h),
        # Harmless extras the released files carry.
        "speech_Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        "beats.encoder.layers.1.self_attn.relative_attention_bias.weight": torch.zeros(320, 2),
    }
    for i in range(layers):
        prefix = f"speech_Qformer.bert.encoder.layer.{i}."
        for name, (out_dim, in_dim) in QFORMER_LAYER_KEYS.items():
            sd[prefix + name + ".weight"] = torch.randn(dims[out_dim], dims[in_dim])
            sd[prefix + name + ".bias"] = torch.randn(dims[out_dim])
        for name in LAYER_NORMS:
            sd[prefix + name + ".weight"] = torch.ones(h)
            sd[prefix + name + ".bias"] = torch.zeros(h)
    for i in range(llm_layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}."
            sd[prefix + "lora_A.default.weight"] = torch.randn(8, llm)
            sd[prefix + "lora_B.default.weight"] = torch.randn(llm, 8)
    return sd


def test_official_layout_checkpoint_loads_with_no_missing_or_unexpected_keys(
    tiny: Salmonn, tmp_path
) -> None:
    sd = official_state_dict(h=32, ffn=64, enc=32 + 32, speech=32, audio=32, llm=32, llm_layers=2)
    path = tmp_path / "salmonn_tiny.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    model = Salmonn.from_config(resolve_model("tiny-random"))
    report = model.load_checkpoint(path)
    assert report.missing == []
    assert report.unexpected == []
    assert sorted(report.ignored) == [
        "beats.encoder.layers.1.self_attn.relative_attention_bias.weight",
        "speech_Qformer.bert.embeddings.position_ids",
    ]
    assert len([k for k in report.loaded if k.startswith("speech_Qformer.")]) == 2 * 26 + 2
    key = "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"
    assert torch.equal(model.state_dict()[key], sd[key])


def test_wrong_llm_width_names_key_shapes_and_cause(tmp_path) -> None:
    sd = official_state_dict(h=32, ffn=64, enc=64, speech=32, audio=32, llm=48, llm_layers=2)
    path = tmp_path / "wrong.pth"
    torch.save({"model": sd}, path)
    model = Salmonn.from_config(resolve_model("tiny-random"))
    with pytest.raises(ModelLoadError) as err:
        model.load_checkpoint(path)
    message = str(err.value)
    assert "[48, 32]" in message and "[32, 32]" in message
    assert "speech_llama_proj.weight" in message or "lora" in message
    assert "Vicuna" in message


def test_truncated_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "cut.pth"
    torch.save({"model": {"speech_query_tokens": torch.zeros(1, 1, 32)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    model = Salmonn.from_config(resolve_model("tiny-random"))
    with pytest.raises(ModelLoadError, match="not a readable torch checkpoint"):
        model.load_checkpoint(path)


def test_official_mode_gives_88_windows_for_30_s(tiny: Salmonn) -> None:
    tokens = tiny.encode_audio(_clips(0, (30.0, 2.0)))
    assert tokens.counts == [88, 88]
    assert tokens.embeds.shape == (2, 88, 32)


def test_trimmed_mode_gives_floor_frames_over_17(tiny: Salmonn) -> None:
    model = tiny
    model.config = model.config.replace(input_mode="trimmed")
    try:
        clips = _clips(1, (5.0, 2.5, 0.4))
        tokens = model.encode_audio(clips)
        frames = [int(np.ceil(max(len(c), SR) / 320)) for c in clips]  # short clips padded to 1 s
        assert tokens.counts == [f // 17 for f in frames] == [14, 7, 2]
    finally:
        model.config = model.config.replace(input_mode="official")


def test_audio_over_30_s_is_refused(tiny: Salmonn) -> None:
    with pytest.raises(AudioTooLongError):
        tiny.encode_audio(_clips(2, (30.5,)))


def test_only_the_connection_modules_and_lora_are_trainable(tiny: Salmonn) -> None:
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    allowed = (
        "speech_Qformer.",
        "speech_query_tokens",
        "ln_speech.",
        "ln_audio.",
        "speech_llama_proj.",
    )
    for name in trainable:
        assert name.startswith(allowed) or ".lora_" in name, name
    assert any(".lora_A." in n for n in trainable) and any(
        n.startswith("speech_Qformer.") for n in trainable
    )
    assert not any(p.requires_grad for p in tiny.whisper.parameters())
    assert not any(p.requires_grad for p in tiny.beats.parameters())


@pytest.mark.parametrize(
    ("llm_hidden", "layers", "heads", "ffn", "expected"),
    [
        (5120, 40, 40, 13824, 33_332_992),  # salmonn-13b: Vicuna-13B v1.1
        (4096, 32, 32, 11008, 30_186_240),  # salmonn-7b: Vicuna-7B v1.5
    ],
)
def test_trainable_parameter_count_of_official_configs_on_meta(
    llm_hidden, layers, heads, ffn, expected
) -> None:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    from model.beats import Beats, BeatsConfig
    from model.presets import PRESETS

    large_v2 = WhisperConfig(
        d_model=1280,
        encoder_layers=32,
        decoder_layers=32,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
        num_mel_bins=80,
        vocab_size=51865,
    )
    vicuna = LlamaConfig(
        hidden_size=llm_hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        vocab_size=32000,
    )
    name = "salmonn-13b" if llm_hidden == 5120 else "salmonn-7b"
    with torch.device("meta"):
        model = Salmonn(
            PRESETS[name],
            whisper=WhisperForConditionalGeneration(large_v2),
            beats=Beats(BeatsConfig()),
            llm=LlamaForCausalLM(vicuna),
            tokenizer=None,
        )
    assert count_parameters(model) == expected


def test_lora_scale_zero_gives_the_base_llm(tiny: Salmonn) -> None:
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        with tiny.llama_model.disable_adapter():
            base = tiny.llama_model(input_ids=ids).logits
        with tiny.lora_scale(0.0):
            zero = tiny.llama_model(input_ids=ids).logits
        adapted = tiny.llama_model(input_ids=ids).logits
        with tiny.lora_scale(2.0):
            half = tiny.llama_model(input_ids=ids).logits
        again = tiny.llama_model(input_ids=ids).logits
    assert torch.allclose(zero, base, atol=1e-6)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert not torch.allclose(half, adapted, atol=1e-3)
    assert torch.equal(again, adapted)  # the scale is restored after the call


@pytest.mark.parametrize("mode", ["official", "trimmed"])
def test_batched_greedy_equals_each_clip_alone(tiny: Salmonn, mode: str) -> None:
    tiny.config = tiny.config.replace(input_mode=mode)
    try:
        clips = _clips(3, (1.2, 3.0, 2.1))
        instructions = [
            "Please describe the audio.",
            "Recognize the speech.",
            "What is the capital of France?",
        ]
        batched = tiny.generate(clips, instructions, max_new_tokens=6)
        alone = [
            tiny.generate([c], [q], max_new_tokens=6)[0]
            for c, q in zip(clips, instructions, strict=True)
        ]
    finally:
        tiny.config = tiny.config.replace(input_mode="official")
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) > 0 for g in batched)


def test_beam_search_runs_batched_and_streaming_callback_matches_result(tiny: Salmonn) -> None:
    clips = _clips(4, (1.0, 2.0))
    beams = tiny.generate(clips, "Please describe the audio.", num_beams=3, max_new_tokens=5)
    assert len(beams) == 2 and all(len(g.token_ids) <= 5 for g in beams)
    seen: dict[int, list[int]] = {0: [], 1: []}
    greedy = tiny.generate(
        clips,
        "Please describe the audio.",
        max_new_tokens=5,
        on_token=lambda r, t: seen[r].append(t),
    )
    assert [seen[0], seen[1]] == [g.token_ids for g in greedy]
    with pytest.raises(ValueError, match="num_beams=1"):
        tiny.generate(clips, "x", num_beams=2, on_token=lambda r, t: None)


def test_vicuna_prompt_is_bos_then_sentencepiece_pieces(tiny: Salmonn) -> None:
    before, after = tiny.prompt_pieces("Please describe the audio.")
    assert before == [tiny.tokenizer.bos_token_id, *tiny.sentencepiece.encode("USER: <Speech>")]
    assert after == tiny.sentencepiece.encode("</Speech> Please describe the audio.\nASSISTANT:")


def test_training_loss_falls_on_answer_tokens_only(tiny: Salmonn) -> None:
    tokens = tiny.encode_audio(_clips(5, (1.0,)))
    inputs = tiny.build_inputs(
        [tokens.row(0)], ["Please describe the audio."], ["a dog is barking"]
    )
    labels = inputs["labels"][0]
    answer = [*tiny._encode("a dog is barking"), tiny.tokenizer.eos_token_id]
    assert labels[labels != -100].tolist() == answer
    loss = tiny([tokens.row(0)], ["Please describe the audio."], ["a dog is barking"])
    loss.backward()
    try:
        # Gradients reach the connection modules and LoRA through the spliced audio tokens.
        assert tiny.speech_llama_proj.weight.grad is not None
        assert (
            tiny.speech_Qformer.bert.encoder.layer[0]
            .crossattention.self.key.weight.grad.abs()
            .sum()
            > 0
        )
        lora_a = next(p for n, p in tiny.llama_model.named_parameters() if "lora_A" in n)
        assert lora_a.grad is not None
    finally:
        tiny.zero_grad(set_to_none=True)


def test_own_checkpoint_round_trip(tiny: Salmonn, tmp_path) -> None:
    tiny.save_checkpoint(tmp_path / "ckpt")
    fresh = Salmonn.from_config(
        resolve_model(str(tmp_path / "ckpt")).replace(
            **{k: getattr(tiny.config, k) for k in ("whisper", "beats", "llm")}
        )
    )
    for key, value in tiny.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[key], value), key
