"""SALMONN core on tiny random weights in the official layouts (fast, CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import model.llm as llm_module
from model.errors import AudioTooLongError, ModelLoadError
from model.presets import PRESETS, resolve_model
from model.salmonn import Salmonn, SalmonnConfig, count_parameters
from tests.model.greedy import assert_decisive
from tests.model.official_layout import official_state_dict

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


@pytest.fixture(scope="module")
def sharp() -> Salmonn:
    return sharp_model()


def sharp_model() -> Salmonn:
    """A tiny model whose answers depend on the audio and the instruction.

    At initialisation scale (std 0.02) the tiny LLM's next token is decided by the last prompt
    token alone, so every row of a batch gives the same answer and a batch test passes however
    the rows are mixed up. Larger LLM, Q-Former and projection weights make the context count.
    """
    torch.manual_seed(0)
    model = Salmonn.from_config(resolve_model("tiny-random"))
    with torch.no_grad():
        for name, param in model.llama_model.get_base_model().named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(10)
        for module in (model.speech_Qformer, model.speech_llama_proj):
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear):
                    sub.weight.mul_(20)
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


@pytest.mark.numerics
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


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["official", "trimmed"])
def test_batched_greedy_equals_each_clip_alone(sharp: Salmonn, mode: str) -> None:
    sharp.config = sharp.config.replace(input_mode=mode)
    try:
        clips = _clips(3, (1.2, 3.0, 2.1))
        instructions = [
            "Please describe the audio.",
            "Recognize the speech.",
            "What is the capital of France?",
        ]
        batched = sharp.generate(clips, instructions, max_new_tokens=6)
        alone = [
            sharp.generate([c], [q], max_new_tokens=6)[0]
            for c, q in zip(clips, instructions, strict=True)
        ]
        # The same instruction for every clip: the answers differ by the audio alone.
        by_audio = sharp.generate(clips, instructions[0], max_new_tokens=6)
        # Equal tokens from two computations hold on any CPU only away from ties.
        alone_rows = [sharp.encode_audio([c]).row(0) for c in clips]
        answers = [g.token_ids for g in alone]
        assert_decisive(sharp, alone_rows, instructions, answers, max_new_tokens=6)
    finally:
        sharp.config = sharp.config.replace(input_mode="official")
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # rows that can be told apart
    assert len({tuple(g.token_ids) for g in by_audio}) > 1
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


@pytest.mark.numerics
def test_one_row_ending_early_does_not_change_the_others(sharp: Salmonn) -> None:
    """A row that reaches EOS early stops there while the others run on, and every row of the
    batch equals that row generated alone (also what the streaming callback reports)."""
    clips = _clips(6, (1.0, 2.0, 1.5))
    instructions = [
        "Please describe the audio.",
        "Recognize the speech.",
        "What is the capital of France?",
    ]
    tokens = sharp.encode_audio(clips)
    rows = [tokens.row(i) for i in range(len(clips))]
    new_tokens = 8

    def alone() -> list[list[int]]:
        return [
            sharp.generate_from_tokens([r], [q], max_new_tokens=new_tokens)[0].token_ids
            for r, q in zip(rows, instructions, strict=True)
        ]

    free = alone()
    assert all(len(ids) == new_tokens for ids in free), "the untouched tiny model hit EOS"
    # Pick a row and a token it emits at step k >= 1 that no other row emits, then make EOS the
    # argmax wherever that token was: that row alone now ends after k tokens.
    row, step = next(
        (i, k)
        for i, ids in enumerate(free)
        for k in range(1, new_tokens - 1)
        if ids[k] not in ids[:k] and all(ids[k] not in o for j, o in enumerate(free) if j != i)
    )
    eos = sharp.tokenizer.eos_token_id
    lm_head = sharp.llama_model.get_base_model().lm_head.weight
    saved = lm_head[eos].clone()
    try:
        with torch.no_grad():
            lm_head[eos] = lm_head[free[row][step]] * 1.05
        expected = alone()
        assert expected[row] == free[row][:step]  # ended early, after a non-empty answer
        assert max(len(ids) for ids in expected) == new_tokens  # while another ran to the end
        assert_decisive(sharp, rows, instructions, expected, max_new_tokens=new_tokens)
        streamed: dict[int, list[int]] = {i: [] for i in range(len(rows))}
        batched = sharp.generate_from_tokens(
            rows,
            instructions,
            max_new_tokens=new_tokens,
            on_token=lambda r, t: streamed[r].append(t),
        )
        beams_batched = sharp.generate_from_tokens(
            rows, instructions, max_new_tokens=new_tokens, num_beams=2
        )
        beams_alone = [
            sharp.generate_from_tokens([r], [q], max_new_tokens=new_tokens, num_beams=2)[0]
            for r, q in zip(rows, instructions, strict=True)
        ]
    finally:
        with torch.no_grad():
            lm_head[eos] = saved
    assert [g.token_ids for g in batched] == expected
    assert [streamed[i] for i in range(len(rows))] == expected
    assert [g.token_ids for g in beams_batched] == [g.token_ids for g in beams_alone]


# -- LLM sources without a sentencepiece model: a GGUF file and a package: source --


def _write_tiny_gguf(llm_dir: Path, out: Path) -> Path:
    """The tiny-random LLaMA (weights and sentencepiece vocabulary) as a float32 GGUF file."""
    import gguf
    import sentencepiece
    from safetensors.torch import load_file

    config = json.loads((llm_dir / "config.json").read_text())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    ids = range(sp.get_piece_size())
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    # GGUF token types: 1 normal, 2 unknown, 3 control, 6 byte.
    writer.add_token_types(
        [
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            for i in ids
        ]
    )
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, tensor in load_file(str(llm_dir / "model.safetensors")).items():
        if key in top:
            name = top[key]
        else:  # model.layers.{i}.{module}.weight
            parts = key.split(".")
            name = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("source", ["file", "package"])
def test_vicuna_prompt_with_a_gguf_llm_falls_back_to_the_tokenizer(
    source: str, tmp_path, monkeypatch, caplog
) -> None:
    """`--llm x.gguf` or `package:...` with the Vicuna prompt: the model loads (the converted
    directory has no tokenizer.model), warns that the prompt is not token-exact, and answers."""
    config = resolve_model("tiny-random")  # built in the real cache, before it is redirected
    gguf_path = _write_tiny_gguf(Path(config.llm), tmp_path / "tiny-vicuna.gguf")
    monkeypatch.setenv("SALMONN_LIVE_CACHE", str(tmp_path / "cache"))
    llm = str(gguf_path)
    if source == "package":
        # Shipped in three wheels, as Gemma's and Qwen's GGUFs are: joined on first load.
        data = gguf_path.read_bytes()
        cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
        parts = []
        for i in range(3):
            (tmp_path / f"tiny.part{i}").write_bytes(data[cuts[i] : cuts[i + 1]])
            parts.append((f"llm-tiny-vicuna-part{i}", f"tiny.part{i}"))
        packaged = llm_module.PackagedGGUF(gguf_path.name, tuple(parts))
        monkeypatch.setitem(llm_module.PACKAGED_GGUF, "llm-tiny-vicuna", packaged)
        monkeypatch.setattr(llm_module, "package_file", lambda dist, name: tmp_path / name)
        llm = "package:llm-tiny-vicuna"
    with caplog.at_level(logging.WARNING, logger="model.salmonn"):
        model = Salmonn.from_config(config.replace(llm=llm))
    assert model.sentencepiece is None
    assert Path(model.llama_model.get_base_model().name_or_path).parent == tmp_path / "cache/llm"
    assert any("not token-exact" in r.getMessage() for r in caplog.records)
    before, after = model.prompt_pieces("Please describe the audio.")
    tokenizer = model.tokenizer
    assert before == [tokenizer.bos_token_id, *tokenizer("USER: <Speech>").input_ids[1:]]
    assert (
        after
        == tokenizer(
            "</Speech> Please describe the audio.\nASSISTANT:", add_special_tokens=False
        ).input_ids
    )
    [answer] = model.generate(_clips(7, (1.0,)), "Please describe the audio.", max_new_tokens=2)
    assert 1 <= len(answer.token_ids) <= 2


# -- the official presets check their parts up front --


@pytest.mark.parametrize("name", ["salmonn-13b", "salmonn-7b"])
def test_official_preset_without_beats_is_refused_before_loading(name: str, tmp_path) -> None:
    # The Whisper and LLM paths do not exist: the BEATs check must come before any loading.
    config = resolve_model(name, whisper=str(tmp_path / "w"), llm=str(tmp_path / "l"))
    with pytest.raises(ModelLoadError, match="--beats") as err:
        Salmonn.from_config(config)
    assert name in str(err.value) and "768" in str(err.value)


def test_official_preset_checks_the_llm_width_before_loading_weights(tmp_path) -> None:
    tiny = resolve_model("tiny-random")
    config = resolve_model(
        "salmonn-7b", whisper=str(tmp_path / "no-whisper"), beats=tiny.beats, llm=tiny.llm
    )
    with pytest.raises(ModelLoadError) as err:
        Salmonn.from_config(config)
    message = str(err.value)
    assert "Vicuna-7B v1.5" in message and "4096" in message and "hidden size 32" in message


def test_official_preset_checks_the_whisper_width(tmp_path) -> None:
    from transformers import LlamaConfig

    # An LLM directory of the right width but without weights: the Whisper check (after the
    # Whisper load, before the LLM load) must fire first.
    vicuna = tmp_path / "vicuna-13b-v1.1"
    LlamaConfig(hidden_size=5120, num_hidden_layers=1, num_attention_heads=40).save_pretrained(
        vicuna
    )
    tiny = resolve_model("tiny-random")
    config = resolve_model("salmonn-13b", whisper=tiny.whisper, beats=tiny.beats, llm=str(vicuna))
    with pytest.raises(ModelLoadError, match="large-v2") as err:
        Salmonn.from_config(config)
    assert "d_model 1280" in str(err.value) and "d_model 32" in str(err.value)


def _official_parts_on_meta(
    whisper_width: int = 1280,
    beats_width: int | None = 768,
    llm_hidden: int = 5120,
    llm_positions: int = 2048,
) -> dict[str, object]:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    from model.beats import Beats, BeatsConfig

    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(
            WhisperConfig(
                d_model=whisper_width,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
            )
        )
        beats = (
            None
            if beats_width is None
            else Beats(
                BeatsConfig(
                    encoder_embed_dim=beats_width,
                    encoder_attention_heads=4,
                    encoder_layers=1,
                    encoder_ffn_embed_dim=64,
                )
            )
        )
        llm = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=llm_hidden,
                num_hidden_layers=1,
                num_attention_heads=8,
                intermediate_size=64,
                vocab_size=64,
                max_position_embeddings=llm_positions,
            )
        )
    return {"whisper": whisper, "beats": beats, "llm": llm, "tokenizer": None}


@pytest.mark.parametrize(
    ("name", "parts", "needle"),
    [
        ("salmonn-13b", {"llm_hidden": 4096}, "Vicuna-13B v1.1 (hidden size 5120)"),
        ("salmonn-7b", {"llm_hidden": 5120, "llm_positions": 4096}, "hidden size 4096"),
        ("salmonn-13b", {"beats_width": None}, "got no BEATs"),
        ("salmonn-7b", {"beats_width": 32, "llm_hidden": 4096}, "width 768"),
        ("salmonn-13b", {"whisper_width": 1024}, "d_model 1024"),
    ],
)
def test_official_presets_refuse_parts_of_the_wrong_size(name, parts, needle) -> None:
    with pytest.raises(ModelLoadError) as err:
        Salmonn(PRESETS[name], **_official_parts_on_meta(**parts))
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("name", "llm_hidden", "positions", "warned"),
    [
        ("salmonn-13b", 5120, 4096, True),  # Vicuna-13B v1.5: the empty-output pitfall
        ("salmonn-13b", 5120, 2048, False),  # v1.1
        ("salmonn-7b", 4096, 4096, False),  # v1.5
    ],
)
def test_llama_generation_mismatch_is_warned(name, llm_hidden, positions, warned, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="model.salmonn"):
        Salmonn(
            PRESETS[name], **_official_parts_on_meta(llm_hidden=llm_hidden, llm_positions=positions)
        )
    assert any("LLaMA generation" in r.getMessage() for r in caplog.records) == warned


def test_required_parts_survive_a_saved_config() -> None:
    for name in ("salmonn-13b", "salmonn-7b", "tiny-random"):
        data = json.loads(json.dumps(PRESETS[name].to_dict()))
        assert SalmonnConfig.from_dict(data) == PRESETS[name]
    assert PRESETS["salmonn-13b"].requires != PRESETS["salmonn-7b"].requires
    with pytest.raises(ModelLoadError, match="requires"):
        SalmonnConfig.from_dict({"requires": {"llm_hidden": 5120, "colour": "blue"}})


# -- the salmonn preset: the official layout with whatever parts are given --


def test_salmonn_preset_is_the_official_layout_with_no_part_checks() -> None:
    config = PRESETS["salmonn"]
    official = {
        "qformer_hidden": 768,
        "qformer_layers": 2,
        "qformer_heads": 12,
        "qformer_intermediate": 3072,
        "speech_query_tokens": 1,
        "window_frames": 17,
        "stride_frames": 17,
        "lora_r": 8,
        "lora_alpha": 32,
        "prompt_style": "vicuna",
        "input_mode": "official",
    }
    assert {key: getattr(config, key) for key in official} == official
    assert config.requires is None and config.beats is None and config.checkpoint is None
    # The same modules as the released models' presets, without their checks.
    for name in ("salmonn-13b", "salmonn-7b"):
        assert PRESETS[name].replace(name="salmonn", requires=None) == config


@pytest.mark.parametrize(
    ("parts", "fused"),
    [
        ({"whisper_width": 1280, "beats_width": 768, "llm_hidden": 5120}, 2048),  # salmonn_v1
        ({"whisper_width": 1024, "beats_width": None, "llm_hidden": 1008}, 1024),  # Whisper only
        ({"whisper_width": 384, "beats_width": 32, "llm_hidden": 2064}, 416),
    ],
)
def test_salmonn_preset_reads_every_width_from_the_parts(parts, fused) -> None:
    model = Salmonn(PRESETS["salmonn"], **_official_parts_on_meta(**parts))
    layer = model.speech_Qformer.bert.encoder.layer[0]
    assert layer.crossattention.self.key.weight.shape == (768, fused)
    assert model.ln_speech.weight.shape == (parts["whisper_width"],)
    assert (model.ln_audio is None) == (parts["beats_width"] is None)
    assert model.speech_llama_proj.weight.shape == (parts["llm_hidden"], 768)
    assert model.speech_query_tokens.shape == (1, 1, 768)


def test_salmonn_preset_takes_an_llm_of_a_size_the_vicuna_presets_refuse() -> None:
    # Whisper large-v2 and BEATs as released, an LLM of hidden size 1008 (no Vicuna).
    for name in ("salmonn-13b", "salmonn-7b"):
        with pytest.raises(ModelLoadError, match="hidden size 1008"):
            Salmonn(PRESETS[name], **_official_parts_on_meta(llm_hidden=1008))
    model = Salmonn(PRESETS["salmonn"], **_official_parts_on_meta(llm_hidden=1008))
    assert model.speech_llama_proj.out_features == 1008


@pytest.mark.parametrize("beats", [True, False], ids=["whisper+beats", "whisper-only"])
def test_salmonn_preset_loads_an_official_layout_checkpoint_of_a_small_llama(
    beats: bool, tmp_path
) -> None:
    """An official-layout checkpoint trained on a 48-wide LLaMA: every trainable tensor loads,
    nothing is missing or unexpected, and the model answers."""
    from tests.model.official_layout import official_parts

    parts = official_parts(tmp_path, llm_hidden=48, beats=beats)
    model = Salmonn.from_config(resolve_model("salmonn", **parts))
    assert (model.beats is None) != beats
    report = model.load_checkpoint(parts["checkpoint"])
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(model.trainable_state_dict())
    qformer, query, norms, proj, lora = 2 * 26 + 2, 1, 4 if beats else 2, 2, 2 * 2 * 2
    assert len(report.loaded) == qformer + query + norms + proj + lora
    state = torch.load(parts["checkpoint"], weights_only=True)["model"]
    key = "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"
    assert model.state_dict()[key].shape == (768, 64 if beats else 32)
    assert torch.equal(model.state_dict()[key], state[key])
    [answer] = model.generate(_clips(8, (1.5,)), "Please describe the audio.", max_new_tokens=3)
    assert answer.audio_tokens == 88 and 1 <= len(answer.token_ids) <= 3


@pytest.mark.parametrize(
    ("preset", "beats", "llm_hidden", "needles"),
    [
        # The case: an official checkpoint with a preset of other Q-Former sizes.
        ("tiny-random", True, 32, ["speech_query_tokens", "[1, 1, 768]", "[1, 1, 32]", "salmonn"]),
        # The checkpoint's LLM is 48 wide, the --llm given 32.
        ("salmonn", True, 32, ["speech_llama_proj.weight", "[48, 768]", "[32, 768]", "48"]),
        # Trained with BEATs, loaded without: the fused width differs.
        (
            "salmonn",
            False,
            48,
            [
                "speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "[768, 64]",
                "[768, 32]",
            ],
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_names_the_key_both_shapes_and_the_fix(
    preset, beats, llm_hidden, needles, tmp_path
) -> None:
    from tests.model.official_layout import official_parts

    parts = official_parts(tmp_path, llm_hidden=48)  # trained with BEATs on a 48-wide LLaMA
    if preset == "tiny-random":
        config = resolve_model(preset)  # its own tiny parts, its 32-wide Q-Former
    else:
        llm = parts["llm"] if llm_hidden == 48 else resolve_model("tiny-random").llm
        given = {"whisper": parts["whisper"], "llm": llm}
        if beats:
            given["beats"] = parts["beats"]
        config = resolve_model(preset, **given)
    model = Salmonn.from_config(config)
    with pytest.raises(ModelLoadError) as err:
        model.load_checkpoint(parts["checkpoint"])
    message = str(err.value)
    assert message.startswith(f"{parts['checkpoint']}: tensor {needles[0]!r} has shape")
    for needle in needles:
        assert needle in message
    assert "--model salmonn" in message or "--beats" in message
