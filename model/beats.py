"""BEATs audio encoder (Chen et al. 2022, arXiv 2212.09058), feature-only, official key layout.

SALMONN's audio branch is the fine-tuned "BEATs_iter3+ (AS2M) (cpt2)" checkpoint from
microsoft/unilm ``beats/``. This module rebuilds that network so that ``Beats.state_dict()`` has
exactly the keys and shapes of the official file's ``model`` dict and the file loads with
``strict=True``. Module attribute names follow the official code for that reason:

- ``patch_embedding``: Conv2d(1, embed_dim, 16, stride 16) over the (frames, 128 mel) fbank;
  ``layer_norm`` (over ``embed_dim``); ``post_extract_proj`` (embed_dim -> encoder_embed_dim,
  present only when the two differ);
- ``encoder.pos_conv``: Sequential(weight-normed grouped Conv1d, SamePad, GELU). The official code
  uses the legacy ``torch.nn.utils.weight_norm(dim=2)``, so the file stores
  ``encoder.pos_conv.0.weight_g`` (1, 1, K) and ``encoder.pos_conv.0.weight_v`` (C, C/groups, K);
  `WeightNormConv1d` keeps those two parameters and rebuilds the weight in ``forward``;
- ``encoder.layer_norm`` and ``encoder.layers.{i}``: post-LN ("deep norm") transformer layers with
  ``self_attn.{q,k,v,out}_proj``, the gated relative position bias ``self_attn.grep_linear`` /
  ``self_attn.grep_a`` (``gru_rel_pos``), ``self_attn_layer_norm``, ``fc1``, ``fc2``,
  ``final_layer_norm``;
- ``encoder.layers.{i}.self_attn.relative_attention_bias``: ONE nn.Embedding(num_buckets, heads)
  created in layer 0 and registered again in every other layer. ``state_dict()`` therefore lists
  it once per layer (12 keys, one tensor) and ``parameters()`` once. This mirrors the official
  model, whose checkpoint carries all 12 keys, and explains the stray
  ``beats.encoder.layers.{1..11}.self_attn.relative_attention_bias.weight`` keys in SALMONN's .pth
  (its saver drops frozen keys found in ``named_parameters()``, which de-duplicates, so only
  layer 0's name was dropped);
- ``predictor``: Linear(encoder_embed_dim, 527), present for fine-tuned configs only so that the
  file loads; `Beats.extract_features` never uses it (SALMONN's ``feature_only=True``).

Only the forward path of the official model is reproduced (plus its dropout, layer drop and
layer-wise gradient decay in training mode); the pre-training tokenizer and losses are not. The one
numerical liberty: the attention's row-maximum shift is taken over unmasked keys only (the same
softmax, and no overflow from a huge score at a padded key).

Padding follows the official code, which does NOT make a right-padded row equal to the same audio
encoded alone: see `token_padding_mask`. Rows of a batch are independent, and tokens the mask
marks as padded never reach the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.audio import SAMPLE_RATE_HZ
from model.errors import ModelLoadError
from model.fbank import kaldi_fbank

logger = logging.getLogger(__name__)

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "OFFICIAL_CLASS_DEFAULTS",
    "Beats",
    "BeatsConfig",
    "beats_on_meta",
    "load_beats",
    "save_tiny_random_beats",
    "token_padding_mask",
]

# Global fbank statistics the official `extract_features` normalises with: (x - mean) / (2 std).
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
# BEATs feeds kaldi fbank 16-bit-range samples: waveform in [-1, 1] times 2**15.
_PCM16_SCALE = 2.0**15
_NUM_MEL_BINS = 128
# Constant of the official attention's fp16 stabilisation (q / alpha, then (s - max) * alpha).
_ATTENTION_ALPHA = 32.0

# Defaults of the official `BEATsConfig` class. `BeatsConfig.from_dict` fills keys missing from a
# checkpoint's cfg from these, as the official loader (`BEATsConfig(cfg)`) does.
OFFICIAL_CLASS_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}


def _gelu_float32(x: Tensor) -> Tensor:
    # The official FFN computes GELU in float32 whatever the input dtype (fp16 safety).
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _gelu_float32,
    "gelu_accurate": _gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@dataclass(frozen=True)
class BeatsConfig:
    """BEATs hyper-parameters, named as the keys of the official checkpoint's ``cfg`` dict.

    The defaults are the fine-tuned BEATs_iter3+ (AS2M) cpt2 checkpoint SALMONN uses (values as
    published by third-party loaders of that file; training-only values such as
    ``encoder_layerdrop`` do not affect inference). ``BeatsConfig()`` therefore describes the
    full-size 90.7M-parameter model; see `beats_on_meta`.
    """

    input_patch_size: int = 16  # square patch over (time frames, mel bins), stride = size
    embed_dim: int = 512  # patch-embedding width
    conv_bias: bool = False  # bias in patch_embedding
    encoder_layers: int = 12
    encoder_embed_dim: int = 768  # transformer width D: the width of the output features
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"  # FFN activation
    layer_wise_gradient_decay_ratio: float = 0.6  # gradient scale at each layer's input (training)
    layer_norm_first: bool = False  # pre-LN; BEATs is post-LN with deep norm
    deep_norm: bool = True  # residual scaled by (2 * layers) ** 0.25 (DeepNet)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05  # probability of skipping a layer (training only)
    dropout_input: float = 0.0
    conv_pos: int = 128  # kernel size of the convolutional position embedding (in tokens)
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True  # T5-style bucketed relative position bias
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True  # gate the relative position bias per query (WavLM's gated bias)
    finetuned_model: bool = True  # has the AudioSet `predictor` head
    predictor_dropout: float = 0.0
    predictor_class: int = 527  # AudioSet classes

    def __post_init__(self) -> None:
        if self.input_patch_size <= 0:
            raise ValueError(f"input_patch_size must be positive, got {self.input_patch_size}")
        if _NUM_MEL_BINS % self.input_patch_size:
            raise ValueError(
                f"input_patch_size must divide the {_NUM_MEL_BINS} mel bins, "
                f"got {self.input_patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"encoder_attention_heads ({self.encoder_attention_heads})"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"encoder_embed_dim ({self.encoder_embed_dim}) must be divisible by "
                f"conv_pos_groups ({self.conv_pos_groups})"
            )
        if self.activation_fn not in _ACTIVATIONS:
            # "glu" changes fc1's keys (GLU_Linear) and is used by no released checkpoint.
            raise ValueError(
                f"activation_fn must be one of {sorted(_ACTIVATIONS)}, got {self.activation_fn!r}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm and layer_norm_first cannot both be set (as in BEATs)")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BeatsConfig:
        """Build from an official checkpoint's ``cfg`` dict.

        Keys missing from ``cfg`` take the official ``BEATsConfig`` class defaults
        (`OFFICIAL_CLASS_DEFAULTS`), not this dataclass's, so a partial cfg builds the same network
        as the official loader would. Unknown keys are ignored with a debug log.

        Raises:
            ValueError: a value has the wrong type or the combination is invalid.
        """
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            logger.debug("BEATs cfg: ignoring unknown keys %s", unknown)
        missing = sorted(set(known) - set(cfg))
        if missing:
            logger.debug("BEATs cfg: keys %s missing, using the official class defaults", missing)
        values: dict[str, Any] = {}
        for name in known:
            raw = cfg.get(name, OFFICIAL_CLASS_DEFAULTS[name])
            values[name] = _coerce(name, raw, type(OFFICIAL_CLASS_DEFAULTS[name]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The official ``cfg`` dict (every key, plain Python values)."""
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, kind: type) -> Any:
    # Checkpoints are written by Python code, so values are already of the right kind; the only
    # tolerated conversion is int -> float (e.g. a ratio saved as 1).
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ValueError(f"BEATs cfg[{name!r}]: expected int, got bool {value!r}")
    if not isinstance(value, kind):
        raise ValueError(
            f"BEATs cfg[{name!r}]: expected {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dim 2, keeping the legacy ``weight_g``/``weight_v``.

    ``weight = weight_g * weight_v / ||weight_v||``, the norm taken over output and input channels
    for each kernel tap (legacy ``torch.nn.utils.weight_norm(conv, dim=2)``). We do it by hand so
    that the state-dict keys are the official ``weight_g``/``weight_v`` rather than
    ``parametrizations.weight.original0/1``.

    Args:
        channels: input and output channels C.
        kernel_size: K, in tokens; the input is zero-padded by K // 2 on both sides.
        groups: convolution groups.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))

    def weight(self) -> Tensor:
        """The effective convolution weight, (C, C/groups, K)."""
        norm = torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)  # (1, 1, K)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T) -> (B, C, T + 1 - K % 2)."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drops the one extra output step an even kernel with padding K // 2 produces."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T') -> (B, C, T' - remove)."""
        return x[:, :, : x.shape[-1] - self.remove]


def _relative_position_bucket(
    relative_position: Tensor, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bidirectional log-bucketing of ``key - query`` offsets, as BEATs computes it.

    Half the buckets hold positive offsets; within each half, offsets below a quarter of
    ``num_buckets`` get their own bucket and larger ones share log-spaced buckets up to
    ``max_distance``.

    Args:
        relative_position: int64 offsets ``key - query``, any shape.

    Returns:
        int64 bucket indices in [0, num_buckets), same shape.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    # float32 like the official code, so that truncation lands in the same buckets; the clamp to 1
    # only avoids log(0) where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (half - max_exact)).to(torch.long)
    large = large.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class MultiheadAttention(nn.Module):
    """Self-attention with BEATs' gated relative position bias (official ``self_attn``).

    Args:
        embed_dim: model width D.
        num_heads: H; the head width is D / H.
        dropout: dropout on the attention probabilities.
        has_relative_attention_bias: whether the layer references a relative position table.
        num_buckets, max_distance: relative position bucketing.
        gru_rel_pos: gate the relative position bias with a function of the query.
    """

    relative_attention_bias: nn.Embedding | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float,
        has_relative_attention_bias: bool,
        num_buckets: int,
        max_distance: int,
        gru_rel_pos: bool,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.dropout_module = nn.Dropout(dropout)
        # Created here for layer 0 only; TransformerEncoder registers that same module in the
        # other layers (shared table, one state-dict key per layer).
        # `_weight` skips Embedding's own normal_ init, which on the meta device costs seconds of
        # one-off imports; Beats.reset_parameters initialises the table.
        self.relative_attention_bias = (
            nn.Embedding(num_buckets, num_heads, _weight=torch.empty(num_buckets, num_heads))
            if has_relative_attention_bias
            else None
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            # Per head and query: 8 outputs summed in two groups of 4 give the gates a and b.
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def compute_bias(self, query_length: int, key_length: int) -> Tensor:
        """Relative position bias from the (shared) table.

        Returns:
            Tensor (H, T, S).
        """
        assert self.relative_attention_bias is not None
        device = self.relative_attention_bias.weight.device
        # The bias depends only on the offset key - query, so bucket the T + S - 1 distinct offsets
        # once and spread them over the (T, S) grid by indexing (30 s: 3k logs instead of 2.2M).
        offsets = torch.arange(1 - query_length, key_length, dtype=torch.long, device=device)
        per_offset = self.relative_attention_bias(
            _relative_position_bucket(offsets, self.num_buckets, self.max_distance)
        )  # (T + S - 1, H)
        query_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        key_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        grid = key_position - query_position + (query_length - 1)  # (T, S) index into offsets
        return per_offset[grid].permute(2, 0, 1)  # (T, S, H) -> (H, T, S)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend over the sequence.

        Args:
            x: Tensor (B, T, D).
            key_padding_mask: Tensor (B, T) bool, True on padded tokens (never attended to);
                None when nothing is padded.
            position_bias: Tensor (H, T, T), the ungated relative bias computed by an earlier
                layer; None makes this layer compute it (if it has a table).

        Returns:
            (Tensor (B, T, D), the ungated position bias (H, T, T) or None) — the bias is handed to
            the next layer, which gates it with its own ``grep_linear``.
        """
        batch, length, _ = x.shape
        if self.relative_attention_bias is not None and position_bias is None:
            position_bias = self.compute_bias(length, length)

        def heads(t: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q_unscaled = heads(self.q_proj(x))
        k = heads(self.k_proj(x))
        v = heads(self.v_proj(x))

        # The official order of operations keeps fp16 logits small: scores are computed on
        # q * scaling / alpha, shifted by the row maximum and only then multiplied back by alpha.
        # We take the maximum over unmasked keys only (mathematically the same softmax).
        scores = (q_unscaled * (self.scaling / _ATTENTION_ALPHA)) @ k.transpose(-1, -2)  # (B,H,T,T)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * _ATTENTION_ALPHA

        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # (1, H, T, T)
            if self.gru_rel_pos:
                # Gate per (batch, head, query) from the unscaled query: a * (b * grep_a - 1) + 2.
                gates = self.grep_linear(q_unscaled).view(batch, self.num_heads, length, 2, 4)
                gate_a, gate_b = torch.sigmoid(gates.sum(-1)).chunk(2, dim=-1)  # (B, H, T, 1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias

        probs = self.dropout_module(torch.softmax(scores, dim=-1).type_as(scores))
        attended = (probs @ v).transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(attended), position_bias


class TransformerSentenceEncoderLayer(nn.Module):
    """One BEATs transformer layer (official ``encoder.layers.{i}``), post-LN or pre-LN.

    With ``deep_norm`` the residual branch is scaled by ``(2 * encoder_layers) ** 0.25``.
    """

    def __init__(self, cfg: BeatsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.activation_fn = _ACTIVATIONS[cfg.activation_fn]
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = MultiheadAttention(
            dim,
            cfg.encoder_attention_heads,
            dropout=cfg.attention_dropout,
            has_relative_attention_bias=has_relative_attention_bias,
            num_buckets=cfg.num_buckets,
            max_distance=cfg.max_distance,
            gru_rel_pos=cfg.gru_rel_pos,
        )
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.deep_norm_alpha = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def _feed_forward(self, x: Tensor) -> Tensor:
        x = self.dropout2(self.activation_fn(self.fc1(x)))
        return self.dropout3(self.fc2(x))

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T, D) -> (B, T, D), plus the ungated position bias (H, T, T) for the next layer."""
        if self.layer_norm_first:
            attended, position_bias = self.self_attn(
                self.self_attn_layer_norm(x), padding_mask, position_bias
            )
            x = x + self.dropout1(attended)
            x = x + self._feed_forward(self.final_layer_norm(x))
        else:
            attended, position_bias = self.self_attn(x, padding_mask, position_bias)
            x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.dropout1(attended))
            x = self.final_layer_norm(x * self.deep_norm_alpha + self._feed_forward(x))
        return x, position_bias


class TransformerEncoder(nn.Module):
    """Convolutional position embedding followed by the layer stack (official ``encoder``)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.layerdrop = cfg.encoder_layerdrop
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_wise_gradient_decay_ratio = cfg.layer_wise_gradient_decay_ratio
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups),
            SamePad(cfg.conv_pos),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(
                cfg, has_relative_attention_bias=cfg.relative_position_embedding and i == 0
            )
            for i in range(cfg.encoder_layers)
        )
        if cfg.relative_position_embedding:
            # One table for the whole stack, registered under every layer as in the official model:
            # every layer's state-dict key exists and loads into the same tensor.
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Encode tokens.

        Args:
            x: Tensor (B, T, D).
            padding_mask: Tensor (B, T) bool, True on padded tokens; None if none.

        Returns:
            Tensor (B, T, D): last hidden states (values at padded tokens are meaningless).
        """
        if padding_mask is not None:
            # Padded tokens must not leak into valid ones through the position convolution.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x_conv = self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + x_conv
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)

        position_bias: Tensor | None = None
        for layer in self.layers:
            if self.layer_wise_gradient_decay_ratio != 1.0 and torch.is_grad_enabled():
                x = _GradMultiply.apply(x, self.layer_wise_gradient_decay_ratio)
            if self.training and self.layerdrop > 0.0 and torch.rand(()).item() < self.layerdrop:
                continue  # LayerDrop; the next layer that runs computes the bias if needed
            x, position_bias = layer(x, padding_mask, position_bias)

        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


def token_padding_mask(padding_mask: Tensor, num_steps: int) -> Tensor:
    """Downsample a padding mask the way the official ``forward_padding_mask`` does.

    The last ``N % num_steps`` entries are dropped, the rest split into ``num_steps`` equal runs,
    and a step is padded only if its whole run is. Applied twice (samples -> fbank frames ->
    tokens), this treats the time-major token sequence (8 frequency patches per 160 ms patch) as if
    it were uniform in time, so the token mask is only approximately aligned with the real patches;
    kept as is because SALMONN was trained with it.

    Args:
        padding_mask: Tensor (B, N) bool, True where padded.
        num_steps: target length T (must be <= N).

    Returns:
        Tensor (B, T) bool.
    """
    batch, length = padding_mask.shape
    usable = length - length % num_steps
    return padding_mask[:, :usable].reshape(batch, num_steps, -1).all(dim=-1)


class Beats(nn.Module):
    """BEATs encoder returning last hidden states (SALMONN's ``feature_only=True``).

    Args:
        cfg: hyper-parameters; `BeatsConfig()` is the full-size iter3+ AS2M cpt2 model.
    """

    def __init__(self, cfg: BeatsConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else BeatsConfig()
        self.cfg = cfg
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
            if cfg.embed_dim != cfg.encoder_embed_dim
            else None
        )
        self.patch_embedding = nn.Conv2d(
            1,
            cfg.embed_dim,
            kernel_size=cfg.input_patch_size,
            stride=cfg.input_patch_size,
            bias=cfg.conv_bias,
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TransformerEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.finetuned_model:
            # Kept so that fine-tuned checkpoints load strictly; features never go through it.
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor: nn.Linear | None = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None
        if not self.patch_embedding.weight.is_meta:
            # On meta there is nothing to initialise, and normal_ there costs seconds of imports.
            self.reset_parameters()

    @property
    def output_dim(self) -> int:
        """Width D of the features `extract_features` returns."""
        return self.cfg.encoder_embed_dim

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation following the official recipe (used for tiny random models).

        Linear and embedding weights N(0, 0.02) with zero biases inside the encoder, deep-norm
        Xavier gains on the projections, pos-conv weight N(0, sqrt(4 / (K D))) with ``weight_g``
        set to its per-tap norm; PyTorch defaults elsewhere.
        """
        cfg = self.cfg
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, MultiheadAttention) and module.gru_rel_pos:
                nn.init.ones_(module.grep_a)
        if cfg.deep_norm:
            beta = (8.0 * cfg.encoder_layers) ** -0.25
            for layer in self.encoder.layers:
                attn = layer.self_attn
                for linear, gain in (
                    (attn.k_proj, 1.0),
                    (attn.v_proj, beta),
                    (attn.q_proj, 1.0),
                    (attn.out_proj, beta),
                    (layer.fc1, beta),
                    (layer.fc2, beta),
                ):
                    nn.init.xavier_normal_(linear.weight, gain=gain)
        conv = self.encoder.pos_conv[0]
        nn.init.normal_(conv.weight_v, std=math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim)))
        conv.weight_g.copy_(torch.linalg.vector_norm(conv.weight_v, dim=(0, 1), keepdim=True))
        nn.init.zeros_(conv.bias)
        outside_encoder = (self.patch_embedding, self.layer_norm, self.post_extract_proj)
        for module in (*outside_encoder, self.predictor):
            if module is not None:
                module.reset_parameters()

    def freeze(self) -> Beats:
        """Stop gradients to all parameters and switch to eval mode (SALMONN keeps BEATs frozen)."""
        self.requires_grad_(False)
        return self.eval()

    def preprocess(self, waveform: Tensor) -> Tensor:
        """Normalised log mel filter banks, one per sample.

        Args:
            waveform: Tensor (B, N), 16 kHz samples in [-1, 1].

        Returns:
            Tensor (B, F, 128) float32, F = 1 + (N - 400) // 160, ``(fbank - 15.41663) / 13.11164``.
        """
        fbanks = [
            kaldi_fbank(
                row.float() * _PCM16_SCALE,
                num_mel_bins=_NUM_MEL_BINS,
                sample_frequency_hz=float(SAMPLE_RATE_HZ),
            )
            for row in waveform
        ]
        return (torch.stack(fbanks) - FBANK_MEAN) / (2.0 * FBANK_STD)

    def min_num_samples(self) -> int:
        """Shortest input (in samples) that yields one token: ``input_patch_size`` fbank frames."""
        return 400 + 160 * (self.cfg.input_patch_size - 1)

    def extract_features(
        self, waveform: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Encode audio into BEATs tokens (last hidden states, no classifier).

        Tokens come time-major: each 16-frame (160 ms) time patch gives 128 / 16 = 8 consecutive
        tokens, one per frequency band; the time patches cover ``F // 16`` whole patches of the
        ``F`` fbank frames (30 s: 2998 frames -> 187 patches -> 1496 tokens).

        Args:
            waveform: Tensor (B, N), 16 kHz samples in [-1, 1] (any float dtype).
            padding_mask: Tensor (B, N) bool, True on right-padded samples; None if none.

        Returns:
            features: Tensor (B, T, D) in the model's dtype, T = 8 * ((1 + (N - 400) // 160) // 16).
            token_mask: Tensor (B, T) bool, True on padded tokens (downsampled as the official code
                does, see `token_padding_mask`); None if ``padding_mask`` is None.

        Raises:
            ValueError: the input is not (B, N), the mask's shape differs, or N is shorter than
                `min_num_samples` (175 ms).
        """
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (batch, samples), got {tuple(waveform.shape)}")
        if waveform.shape[1] < self.min_num_samples():
            raise ValueError(
                f"BEATs needs at least {self.min_num_samples()} samples "
                f"({self.cfg.input_patch_size} fbank frames), got {waveform.shape[1]}; "
                "pad the audio"
            )
        if padding_mask is not None and padding_mask.shape != waveform.shape:
            raise ValueError(
                f"padding_mask must have the waveform's shape {tuple(waveform.shape)}, "
                f"got {tuple(padding_mask.shape)}"
            )
        fbank = self.preprocess(waveform)  # (B, F, 128)
        if padding_mask is not None:
            padding_mask = token_padding_mask(padding_mask.bool(), fbank.shape[1])  # (B, F)

        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(fbank.unsqueeze(1).to(dtype))  # (B, E, F/16, 128/16)
        features = patches.flatten(2).transpose(1, 2)  # (B, T, E), time-major, frequency-minor
        features = self.layer_norm(features)
        if padding_mask is not None:
            padding_mask = token_padding_mask(padding_mask, features.shape[1])  # (B, T)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)  # (B, T, D)
        features = self.dropout_input(features)
        return self.encoder(features, padding_mask), padding_mask

    def forward(
        self, waveform: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Same as `extract_features`."""
        return self.extract_features(waveform, padding_mask)


def beats_on_meta(cfg: BeatsConfig | None = None) -> Beats:
    """Build BEATs on the meta device: shapes and keys without memory or initialisation cost.

    Args:
        cfg: hyper-parameters; None is the full-size official config (`BeatsConfig()`).

    Returns:
        A `Beats` whose tensors live on ``torch.device("meta")``. ``sum(p.numel() for p in
        model.parameters())`` is 90,717,055 for the full-size config.
    """
    with torch.device("meta"):
        return Beats(cfg)


def _check_state_dict(model: Beats, state: Mapping[str, Any], path: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        raise ModelLoadError(
            f"BEATs checkpoint {path} does not match its own cfg: {'; '.join(parts)}. "
            "Expected the official unilm BEATs layout "
            "(e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)"
        )
    for key, target in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ModelLoadError(
                f"BEATs checkpoint {path}: {key} is a {type(value).__name__}, expected a tensor"
            )
        if value.shape != target.shape:
            raise ModelLoadError(
                f"BEATs checkpoint {path}: shape mismatch for {key}: checkpoint has "
                f"{tuple(value.shape)}, model built from its cfg expects {tuple(target.shape)}"
            )
    # The shared relative position table is stored once per layer; copies that disagree would be
    # silently overwritten by the last one, so refuse them.
    table_keys = [k for k in expected if k.endswith("self_attn.relative_attention_bias.weight")]
    for key in table_keys[1:]:
        if not torch.equal(state[key], state[table_keys[0]]):
            raise ModelLoadError(
                f"BEATs checkpoint {path}: {key} differs from {table_keys[0]}; BEATs shares one "
                "relative position table across layers, so these copies must be identical"
            )


def load_beats(path: str | Path, *, trust_pickle: bool = False) -> Beats:
    """Load an official BEATs checkpoint (``{'cfg': dict, 'model': state_dict, ...}``).

    The result is a float32 model in eval mode with gradients enabled (call `Beats.freeze`).
    Extra top-level entries (the fine-tuned files' ``label_dict``) are ignored.

    Args:
        path: the ``.pt`` file.
        trust_pickle: allow arbitrary pickled objects (``torch.load(weights_only=False)``). Only
            for files from a trusted source; the official files need no such objects.

    Raises:
        ModelLoadError: the file is missing or unreadable, is not in the official layout, its cfg
            is invalid, or its tensors do not match the network the cfg describes (missing or
            unexpected keys, or a shape mismatch, named with both shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"BEATs checkpoint not found: {path}. Download "
            "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt from microsoft/unilm "
            "(beats/README.md) and pass its path"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        # Raised both for corrupt files and for pickled objects that weights_only refuses.
        raise ModelLoadError(
            f"cannot read BEATs checkpoint {path}: {exc}. If it is a trusted checkpoint that "
            "pickles custom objects, load it with trust_pickle=True"
        ) from exc
    except Exception as exc:
        # torch.load reports a damaged or foreign file with whatever its unpickler trips over
        # (RuntimeError, EOFError, IndexError, ...); all of them mean "unreadable" here.
        raise ModelLoadError(
            f"cannot read BEATs checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from exc

    if not isinstance(checkpoint, Mapping) or "cfg" not in checkpoint or "model" not in checkpoint:
        got = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise ModelLoadError(
            f"BEATs checkpoint {path}: expected a dict with 'cfg' and 'model' (the official unilm "
            f"layout), got {got}"
        )
    cfg_dict, state = checkpoint["cfg"], checkpoint["model"]
    if not isinstance(cfg_dict, Mapping) or not isinstance(state, Mapping):
        raise ModelLoadError(
            f"BEATs checkpoint {path}: 'cfg' and 'model' must be dicts, got "
            f"{type(cfg_dict).__name__} and {type(state).__name__}"
        )
    try:
        cfg = BeatsConfig.from_dict(cfg_dict)
    except ValueError as exc:
        raise ModelLoadError(f"BEATs checkpoint {path}: invalid cfg: {exc}") from exc

    model = beats_on_meta(cfg)
    _check_state_dict(model, state, path)
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    # assign=True swaps the meta tensors for the loaded ones, so no random initialisation is paid.
    model.load_state_dict(floats, strict=True, assign=True)
    logger.info(
        "loaded BEATs from %s: %d layers, width %d, %d parameters",
        path,
        cfg.encoder_layers,
        cfg.encoder_embed_dim,
        sum(p.numel() for p in model.parameters()),
    )
    return model.eval()


def save_tiny_random_beats(
    path: str | Path, *, seed: int = 0, embed_dim: int = 32, layers: int = 2, heads: int = 2
) -> None:
    """Write a tiny randomly initialised BEATs file in the official layout.

    The file is ``{'cfg': <every official cfg key>, 'model': <state dict>}`` with the full-size
    model's structure (deep norm, gated relative bias, shared table, weight-normed pos conv,
    ``post_extract_proj``, ``predictor`` with 527 classes); only the sizes shrink. Same seed, same
    bytes of weights.

    Args:
        path: destination ``.pt``; parent directories are created.
        seed: seed of the weights.
        embed_dim: transformer width D (cfg ``encoder_embed_dim``, the feature width). The patch
            embedding width (cfg ``embed_dim``) is D / 2, so ``post_extract_proj`` exists as in
            the official 512 -> 768 model.
        layers: number of transformer layers.
        heads: attention heads (must divide ``embed_dim``).

    Raises:
        ValueError: ``embed_dim`` is not divisible by ``heads`` and by 4 (the pos-conv groups).
    """
    cfg = dataclasses.replace(
        BeatsConfig(),
        embed_dim=max(1, embed_dim // 2),
        encoder_layers=layers,
        encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=4 * embed_dim,
        encoder_attention_heads=heads,
        conv_pos=16,  # even, like the official 128, so SamePad is exercised
        conv_pos_groups=4,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Beats(cfg)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's random stream alone
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": cfg.to_dict(), "model": model.state_dict()}, path)
