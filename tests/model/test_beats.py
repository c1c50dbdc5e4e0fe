"""`model/beats.py`: official key layout, strict loading, errors, shapes and padding behaviour."""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import beats as beats_module
from model.beats import (
    OFFICIAL_CLASS_DEFAULTS,
    Beats,
    BeatsConfig,
    beats_on_meta,
    load_beats,
    save_tiny_random_beats,
)
from model.errors import ModelLoadError
from model.fbank import kaldi_fbank

SAMPLE_RATE_HZ = 16000
TINY_DIM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread hand-offs
    cost 30x the arithmetic; restore the setting for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# cfg of BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt as published by third-party loaders of
# that file (the official repository documents only the class defaults).
OFFICIAL_ITER3_PLUS_CPT2_CFG = {
    "input_patch_size": 16,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6,
    "layer_norm_first": False,
    "deep_norm": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "finetuned_model": True,
    "predictor_dropout": 0.0,
    "predictor_class": 527,
}

# Key layout read from the official unilm beats/ code (BEATs.py, backbone.py): top-level modules,
# then the same 20 tensors under every encoder.layers.{i}.
TOP_LEVEL_KEYS = {
    "patch_embedding.weight",  # conv_bias=False: no bias
    "layer_norm.weight",
    "layer_norm.bias",
    "post_extract_proj.weight",
    "post_extract_proj.bias",
    "encoder.pos_conv.0.weight_g",  # legacy weight_norm(dim=2) on the Conv1d at index 0
    "encoder.pos_conv.0.weight_v",
    "encoder.pos_conv.0.bias",
    "encoder.layer_norm.weight",
    "encoder.layer_norm.bias",
    "predictor.weight",
    "predictor.bias",
}
PER_LAYER_SUFFIXES = [
    *(f"self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")),
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "self_attn.relative_attention_bias.weight",  # one shared table, listed under every layer
    "self_attn.grep_linear.weight",
    "self_attn.grep_linear.bias",
    "self_attn.grep_a",
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
]


def _official_keys(layers: int) -> set[str]:
    per_layer = {f"encoder.layers.{i}.{s}" for i in range(layers) for s in PER_LAYER_SUFFIXES}
    return TOP_LEVEL_KEYS | per_layer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("beats") / "tiny_beats.pt"
    save_tiny_random_beats(path, seed=0, embed_dim=TINY_DIM, layers=2, heads=2)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Beats:
    return load_beats(tiny_path)


def _save(tmp_path: Path, checkpoint: object) -> Path:
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    return path


def _tiny_checkpoint(tiny_path: Path) -> dict:
    return torch.load(tiny_path, weights_only=True)


# --- layout and loading ---------------------------------------------------------------------


def test_tiny_file_has_the_official_layout(tiny_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    assert set(checkpoint) == {"cfg", "model"}
    assert set(checkpoint["cfg"]) == set(OFFICIAL_CLASS_DEFAULTS)
    assert set(checkpoint["model"]) == _official_keys(layers=2)


def test_tiny_checkpoint_round_trips_strictly(tiny_path: Path, tiny: Beats) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    fresh = Beats(BeatsConfig.from_dict(checkpoint["cfg"]))
    result = fresh.load_state_dict(checkpoint["model"], strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    loaded = tiny.state_dict()
    assert loaded.keys() == checkpoint["model"].keys()
    for key, value in checkpoint["model"].items():
        assert torch.equal(loaded[key], value), key
    assert not any(p.is_meta for p in tiny.parameters())


def test_relative_position_table_is_shared(tiny: Beats) -> None:
    tables = [layer.self_attn.relative_attention_bias for layer in tiny.encoder.layers]
    assert all(table is tables[0] for table in tables)
    state = tiny.state_dict()
    assert state["encoder.layers.1.self_attn.relative_attention_bias.weight"].data_ptr() == (
        state["encoder.layers.0.self_attn.relative_attention_bias.weight"].data_ptr()
    )
    # parameters() de-duplicates: that is why SALMONN's .pth kept layers 1..11's copies.
    names = [n for n, _ in tiny.named_parameters() if "relative_attention_bias" in n]
    assert names == ["encoder.layers.0.self_attn.relative_attention_bias.weight"]


def test_full_size_on_meta_has_the_official_keys_and_parameter_count() -> None:
    model = beats_on_meta()
    state = model.state_dict()
    assert set(state) == _official_keys(layers=12)
    assert len(state) == 12 + 12 * 20
    assert all(t.is_meta for t in state.values())
    shapes = {
        "patch_embedding.weight": (512, 1, 16, 16),
        "post_extract_proj.weight": (768, 512),
        "encoder.pos_conv.0.weight_g": (1, 1, 128),
        "encoder.pos_conv.0.weight_v": (768, 48, 128),
        "encoder.layers.0.self_attn.relative_attention_bias.weight": (320, 12),
        "encoder.layers.11.self_attn.grep_linear.weight": (8, 64),
        "encoder.layers.11.self_attn.grep_a": (1, 12, 1, 1),
        "encoder.layers.5.fc1.weight": (3072, 768),
        "predictor.weight": (527, 768),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key

    # Derived by hand from the official module definitions (BEATs paper: "90M parameters").
    d, ffn, heads, head_dim, k, groups, layers = 768, 3072, 12, 64, 128, 16, 12
    per_layer = (
        4 * (d * d + d)  # q, k, v, out projections
        + (head_dim * 8 + 8)  # grep_linear
        + heads  # grep_a
        + (d * ffn + ffn)
        + (ffn * d + d)  # fc1, fc2
        + 2 * 2 * d  # two layer norms
    )
    expected = (
        512 * 16 * 16  # patch_embedding, no bias
        + 2 * 512  # layer_norm
        + (512 * d + d)  # post_extract_proj
        + (k + d * (d // groups) * k + d)  # pos_conv weight_g, weight_v, bias
        + 2 * d  # encoder.layer_norm
        + layers * per_layer
        + 320 * heads  # the shared relative position table, once
        + (d * 527 + 527)  # predictor
    )
    assert expected == 90_717_055
    assert sum(p.numel() for p in model.parameters()) == expected


# --- config ---------------------------------------------------------------------------------


def test_config_defaults_are_the_iter3_plus_cpt2_cfg() -> None:
    assert BeatsConfig() == BeatsConfig.from_dict(OFFICIAL_ITER3_PLUS_CPT2_CFG)
    assert BeatsConfig().to_dict() == OFFICIAL_ITER3_PLUS_CPT2_CFG


def test_from_dict_ignores_unknown_keys_with_a_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="model.beats"):
        cfg = BeatsConfig.from_dict({**OFFICIAL_ITER3_PLUS_CPT2_CFG, "some_new_flag": 3})
    assert cfg == BeatsConfig()
    assert "some_new_flag" in caplog.text


def test_from_dict_fills_missing_keys_from_the_official_class_defaults() -> None:
    partial = {k: v for k, v in OFFICIAL_ITER3_PLUS_CPT2_CFG.items() if k != "max_distance"}
    assert BeatsConfig.from_dict(partial).max_distance == OFFICIAL_CLASS_DEFAULTS["max_distance"]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("encoder_layers", "12", "expected int"),
        ("deep_norm", 1, "expected bool"),
        ("activation_fn", "glu", "activation_fn"),
        ("encoder_attention_heads", 5, "divisible"),
    ],
)
def test_from_dict_rejects_bad_values(key: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BeatsConfig.from_dict({**OFFICIAL_ITER3_PLUS_CPT2_CFG, key: value})


# --- load errors ----------------------------------------------------------------------------


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_path: Path, tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    checkpoint["model"]["encoder.layers.1.fc1.weight"] = torch.zeros(7, TINY_DIM)
    with pytest.raises(ModelLoadError) as caught:
        load_beats(_save(tmp_path, checkpoint))
    message = str(caught.value)
    assert "encoder.layers.1.fc1.weight" in message
    assert f"(7, {TINY_DIM})" in message and f"({4 * TINY_DIM}, {TINY_DIM})" in message


def test_missing_and_unexpected_keys_are_named(tiny_path: Path, tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    del checkpoint["model"]["encoder.pos_conv.0.weight_g"]
    checkpoint["model"]["encoder.pos_conv.0.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"1 missing key.*weight_g.*1 unexpected.*0\.weight'"):
        load_beats(_save(tmp_path, checkpoint))


def test_pretrained_cfg_against_fine_tuned_weights_fails(tiny_path: Path, tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    checkpoint["cfg"]["finetuned_model"] = False
    with pytest.raises(ModelLoadError, match=r"unexpected key.*predictor"):
        load_beats(_save(tmp_path, checkpoint))


def test_disagreeing_shared_table_copies_are_refused(tiny_path: Path, tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    checkpoint["model"][key] = checkpoint["model"][key] + 1.0
    with pytest.raises(ModelLoadError, match="identical"):
        load_beats(_save(tmp_path, checkpoint))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_beats(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content",
    [{"model": {}}, {"cfg": {}, "model": torch.zeros(1)}, torch.zeros(3)],
    ids=["no-cfg", "model-not-a-dict", "bare-tensor"],
)
def test_wrong_layout(tmp_path: Path, content: object) -> None:
    with pytest.raises(ModelLoadError, match="'cfg' and 'model'"):
        load_beats(_save(tmp_path, content))


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_beats(path)


def test_invalid_cfg_becomes_model_load_error(tiny_path: Path, tmp_path: Path) -> None:
    checkpoint = _tiny_checkpoint(tiny_path)
    checkpoint["cfg"]["activation_fn"] = "glu"
    with pytest.raises(ModelLoadError, match="invalid cfg"):
        load_beats(_save(tmp_path, checkpoint))


# --- forward --------------------------------------------------------------------------------


def test_thirty_seconds_give_1496_tokens(tiny: Beats) -> None:
    waveform = 0.1 * torch.randn(1, 30 * SAMPLE_RATE_HZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, mask = tiny.extract_features(waveform)
    assert features.shape == (1, 1496, TINY_DIM)  # 2998 frames -> 187 patches x 8 bands
    assert mask is None
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("num_samples", [2800, 5360, 16000, 40000])
def test_token_count(tiny: Beats, num_samples: int) -> None:
    frames = 1 + (num_samples - 400) // 160
    with torch.no_grad():
        features, _ = tiny.extract_features(torch.zeros(1, num_samples))
    assert features.shape[1] == 8 * (frames // 16)


def test_too_short_input_raises(tiny: Beats) -> None:
    with pytest.raises(ValueError, match="at least 2800 samples"):
        tiny.extract_features(torch.zeros(1, 2799))


def test_eval_mode_is_deterministic(tiny_path: Path, tiny: Beats) -> None:
    waveform = 0.1 * torch.randn(2, 20000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, _ = tiny.extract_features(waveform)
        second, _ = tiny.extract_features(waveform)
        reloaded, _ = load_beats(tiny_path).extract_features(waveform)
    assert torch.equal(first, second)
    assert torch.equal(first, reloaded)


def test_tiny_weights_depend_only_on_the_seed(tmp_path: Path) -> None:
    save_tiny_random_beats(tmp_path / "a.pt", seed=3)
    torch.manual_seed(123)  # the global stream must not matter
    save_tiny_random_beats(tmp_path / "b.pt", seed=3)
    save_tiny_random_beats(tmp_path / "c.pt", seed=4)
    a, b, c = (
        torch.load(tmp_path / n, weights_only=True)["model"] for n in ("a.pt", "b.pt", "c.pt")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.layers.0.fc1.weight"], c["encoder.layers.0.fc1.weight"])


@pytest.mark.numerics
def test_pos_conv_weight_norm_keeps_g_as_per_tap_norm(tiny: Beats) -> None:
    conv = tiny.encoder.pos_conv[0]
    weight = conv.weight()
    taps = torch.linalg.vector_norm(weight, dim=(0, 1))
    torch.testing.assert_close(taps, conv.weight_g.abs().flatten())


def test_relative_position_buckets_follow_the_t5_formula(tiny: Beats) -> None:
    """320 buckets: 160 per direction, offsets < 80 exact, then 80 log-spaced up to 800."""
    table = tiny.encoder.layers[0].self_attn.relative_attention_bias
    bias = tiny.encoder.layers[0].self_attn.compute_bias(1, 1601)  # query 0, keys 0..1600
    expected = {
        0: 0,
        1: 161,  # positive offsets live in the upper half
        79: 160 + 79,
        80: 160 + 80,
        200: 160 + 80 + math.floor(math.log(200 / 80) / math.log(10) * 80),  # 111 + 160
        799: 160 + 159,
        1600: 160 + 159,  # beyond max_distance: clamped
    }
    for offset, bucket in expected.items():
        torch.testing.assert_close(bias[:, 0, offset], table.weight[bucket], rtol=0, atol=0)
    backwards = tiny.encoder.layers[0].self_attn.compute_bias(201, 1)  # queries 0..200, key 0
    torch.testing.assert_close(backwards[:, 200, 0], table.weight[111], rtol=0, atol=0)


# --- padding --------------------------------------------------------------------------------
# What the official model guarantees, and what it does not:
# * rows of a batch are independent, and tokens the token mask marks as padded never influence
#   the others (zeroed before the position convolution, excluded as attention keys);
# * it does NOT make a right-padded row equal to the same audio encoded alone: the official mask
#   maps samples -> frames -> tokens as if tokens were uniform in time (they are 8 frequency bands
#   per 160 ms patch), so a few tokens of the last, partly padded patch stay unmasked.


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    batch = 0.2 * torch.randn(2, 64000, generator=generator)
    batch[1, 40000:] = 0.0
    padding_mask = torch.zeros(2, 64000, dtype=torch.bool)
    padding_mask[1, 40000:] = True
    return batch, padding_mask


def test_token_mask_follows_the_official_downsampling(tiny: Beats) -> None:
    batch, padding_mask = _padded_batch()
    with torch.no_grad():
        features, token_mask = tiny.extract_features(batch, padding_mask)
        alone, _ = tiny.extract_features(batch[1:, :40000])
    assert features.shape[1] == 192
    assert token_mask is not None and token_mask.shape == (2, 192)
    assert not token_mask[0].any()
    # 64000 samples -> 398 frames (runs of 160 samples); frame f is padded iff f >= 250.
    # 398 frames -> 192 tokens (runs of 2 frames); token j is padded iff j >= 125.
    assert token_mask[1].tolist() == [False] * 125 + [True] * 67
    # The same audio alone gives 248 frames -> 15 whole patches -> 120 tokens: 5 fewer.
    assert alone.shape[1] == 120


@pytest.mark.numerics
def test_rows_of_a_batch_are_independent(tiny: Beats) -> None:
    batch, padding_mask = _padded_batch()
    with torch.no_grad():
        together, token_mask = tiny.extract_features(batch, padding_mask)
        first, _ = tiny.extract_features(batch[:1])
        second, _ = tiny.extract_features(batch[1:], padding_mask[1:])
    assert token_mask is not None
    torch.testing.assert_close(together[0], first[0], rtol=1e-5, atol=1e-5)
    valid = ~token_mask[1]
    torch.testing.assert_close(together[1, valid], second[0, valid], rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_masked_tokens_do_not_leak_into_valid_ones(tiny: Beats) -> None:
    batch, padding_mask = _padded_batch()
    # Samples from 41200 on only reach frames >= 256 (frame 255 ends at sample 41199), i.e. time
    # patches >= 16 = tokens >= 128, all of which the mask covers.
    noisy = batch.clone()
    noisy[1, 41200:] = torch.randn(64000 - 41200, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean_out, token_mask = tiny.extract_features(batch, padding_mask)
        noisy_out, _ = tiny.extract_features(noisy, padding_mask)
        unmasked_clean, _ = tiny.extract_features(batch)
        unmasked_noisy, _ = tiny.extract_features(noisy)
    assert token_mask is not None
    valid = ~token_mask[1]
    torch.testing.assert_close(noisy_out[1, valid], clean_out[1, valid], rtol=1e-5, atol=1e-5)
    # Without the mask the noise does reach the valid tokens (so the check above can fail).
    assert (unmasked_noisy[1, valid] - unmasked_clean[1, valid]).abs().max() > 1e-2


def test_mask_shape_must_match(tiny: Beats) -> None:
    with pytest.raises(ValueError, match="padding_mask"):
        tiny.extract_features(torch.zeros(1, 4000), torch.zeros(1, 3999, dtype=torch.bool))


def test_freeze(tiny_path: Path) -> None:
    model = load_beats(tiny_path).train().freeze()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_tiny_config_keeps_the_full_structure(tiny_path: Path) -> None:
    cfg = BeatsConfig.from_dict(_tiny_checkpoint(tiny_path)["cfg"])
    full = BeatsConfig()
    structural = ("deep_norm", "gru_rel_pos", "relative_position_embedding", "finetuned_model")
    assert all(getattr(cfg, name) == getattr(full, name) for name in structural)
    assert cfg.embed_dim != cfg.encoder_embed_dim  # so post_extract_proj exists
    assert dataclasses.replace(cfg, encoder_layers=12).encoder_layers == 12


# --- values ---------------------------------------------------------------------------------


def _deterministic_beats() -> Beats:
    """A tiny BEATs whose every weight is a fixed function of its name (no RNG involved)."""
    cfg = dataclasses.replace(
        BeatsConfig(),
        embed_dim=16,
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=2,
        conv_pos=16,
        conv_pos_groups=4,
    )
    model = Beats(cfg).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            index = torch.arange(parameter.numel(), dtype=torch.float64)
            phase = zlib.crc32(name.encode()) % 1000 / 100
            offset = 1.0 if name.endswith(("layer_norm.weight", "grep_a")) else 0.0
            values = 0.5 * torch.sin(0.37 * index + phase) / math.sqrt(parameter.shape[-1])
            parameter.copy_((values + offset).reshape(parameter.shape))
    return model


def _chirp_and_tone() -> torch.Tensor:
    """1 s of a 200 -> 6200 Hz chirp plus a 3.1 kHz tone, float32 (1, 16000)."""
    t = torch.arange(SAMPLE_RATE_HZ, dtype=torch.float64) / SAMPLE_RATE_HZ
    chirp = 0.3 * torch.sin(2 * math.pi * (200 * t + 3000 * t**2))
    return (chirp + 0.1 * torch.sin(2 * math.pi * 3100 * t)).float()[None]


def _features_from_exact_fbank(
    waveform: torch.Tensor, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    """`_deterministic_beats` features, (1, T, 32), with the fbank computed in float64.

    Only the fbank itself is swapped (for the float64 one, rounded to ``dtype``); the model's own
    scaling, normalisation and every later step run as written, in ``dtype``. In float64 the
    FFN's GELU is the exact erf GELU without the official float32 cast of its input.
    """
    monkeypatch.setattr(
        beats_module,
        "kaldi_fbank",
        lambda samples, **kwargs: kaldi_fbank(samples.double(), **kwargs).to(dtype),
    )
    model = _deterministic_beats().to(dtype)
    if dtype == torch.float64:
        for layer in model.encoder.layers:
            layer.activation_fn = F.gelu
    with torch.no_grad():
        features, _ = model.extract_features(waveform)
    return features


@pytest.mark.numerics
def test_forward_values_match_the_official_operation_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The float64 run of the operation order of the official backbone.py, pinned to 1e-8.

    Provenance: a separate, throwaway re-implementation following backbone.py step by step
    ((T, B, C) layout, B*H bmm with the alpha=32 max shift, per-batch repeated bias, gate from
    q * alpha / scaling) gave 5-digit float32 values on an AVX2 CPU; `Beats` in float32 with
    ATEN_CPU_CAPABILITY=avx2 still reproduces them to 5e-6. Those float32 values were no
    reference: the chirp leaves fbank bins far below float32 FFT rounding noise, which moves the
    float32 output by up to 0.05 and differently on every kernel set (at these 16 values, 1e-2
    from the float64 run; 5e-4 between AVX-512 and AVX2, 1.5e-3 between the default kernels and
    AVX2). The values below are the float64 run (fbank included), recorded with 12 digits.

    Tolerance: float64 rounds to 1.1e-16; the same run under the default, AVX2 and AVX-512 kernels
    (and oneDNN SSE4.1, MKL's compatible path) spreads by 1e-12 (float64 FFT rounding in the
    quietest bins). 1e-8 leaves 10^4 of margin; every real change tried moves these values by
    4e-6 or more (grep_a + 1e-3: 4e-6; pos-conv bias + 1e-4: 3e-5; pre-emphasis 0.97 -> 0.971:
    1.6e-3; no gate: 1.2e-2; patch kernel transposed: 0.9), while a mathematically neutral change
    (alpha 32 -> 16) moves nothing.
    """
    features = _features_from_exact_fbank(_chirp_and_tone(), torch.float64, monkeypatch)
    assert features.shape == (1, 48, 32)
    expected = torch.tensor(
        [
            [-1.150416758065, -1.843747658804, -1.384678807783, -1.496995519207],
            [-1.466513547058, -1.368312222011, -1.001738392392, -0.561704483917],
            [-0.590695369117, -1.789327327765, -1.234229236639, -1.673611588164],
            [-0.979099899025, -1.798028567729, -1.363297735196, -1.580539890920],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(features[0, [0, 7, 25, 47], :4], expected, rtol=0, atol=1e-8)


@pytest.mark.numerics
def test_float32_forward_is_within_float32_error_of_the_float64_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The float32 model, from the same fbank, stays within float32 rounding of the float64 run.

    Tolerance: float32 rounds each operation to u = 2^-24 = 6e-8, and kernel sets differ only in
    the order and fusion of those operations. A dot product of K terms errs by about sqrt(K) u in
    a typical order (rounding errors of random sign) and by at most K u in the worst one, so any
    kernel is at most sqrt(K) = 16 times off the typical error here (K <= 256, the 16 x 16
    patch). Measured over all 48 x 32 layer-normed outputs (|x| <= 2): 1.6e-6 (AVX-512), 1.8e-6
    (AVX2), 1.7e-6 (default), 2.1e-6 (default with oneDNN SSE4.1 and MKL's compatible path);
    16 x 2.1e-6 = 3.4e-5, hence 5e-5. What it catches is lost precision in the float32 path:
    the FFN's GELU taken in float16 moves the output by 3e-4, in bfloat16 by 2.7e-3 (changes of
    the computation itself move both runs alike: the test above catches those).

    The float32 fbank is left out on purpose: bins 60 dB or more below a frame's peak are float32
    FFT rounding noise (`tests/model/test_fbank.py` checks the fbank above that floor), and on this
    chirp they move the output by up to 0.05, whatever the kernels.
    """
    waveform = _chirp_and_tone()
    reference = _features_from_exact_fbank(waveform, torch.float64, monkeypatch)
    features = _features_from_exact_fbank(waveform, torch.float32, monkeypatch)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features.double(), reference, rtol=0, atol=5e-5)
