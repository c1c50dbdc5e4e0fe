"""Training SALMONN's trainable parts: the Q-Former, query tokens, layer norms, projection and
LoRA, with the encoders and the LLM frozen (SALMONN.md section 7).

- Data: manifests in the official format (`read_manifest`); ``expand_wav`` clips are appended
  after 0.1 s of silence; one random prompt paraphrase per sample (`model.prompts`).
- `EncoderCache`: the frozen encoders' raw outputs (before the trainable `ln_speech` /
  `ln_audio`) are computed once per clip and stored as float16 safetensors keyed by the audio
  files' hash, the encoders' identity and the input mode, so later epochs and stages never run
  the encoders again.
- `Trainer`: AdamW (weight decay 0.05 except biases, norms and 1-D tensors), linear warmup then
  cosine decay (`lr_at`), gradient accumulation, fp32 or bf16 autocast, dev evaluation by
  teacher-forced token accuracy (as the official code) and loss, ``best`` and ``last``
  trainable-only checkpoints, and exact resumption (optimizer, schedule position, data order
  and RNG state saved beside ``last``).

Torch only: no sockets, no threads of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from model.errors import ModelError
from model.prompts import eval_prompt, sample_prompt
from model.salmonn import Salmonn
from streaming.pcm import SAMPLE_RATE_HZ

logger = logging.getLogger(__name__)


def _bar_off(progress: bool) -> bool:
    """Whether a tqdm bar is off: not asked for, or stderr is no terminal (a bar written to a
    pipe is noise, and one that fails to write can leave tqdm's lock held)."""
    return not progress or not sys.stderr.isatty()


Stage = Literal["pretrain", "instruct", "activation"]
STAGES: tuple[Stage, ...] = ("pretrain", "instruct", "activation")
DType = Literal["fp32", "bf16"]
AudioLoader = Callable[[Path], np.ndarray]
RawFeatures = tuple[torch.Tensor, torch.Tensor | None]

EXPAND_SILENCE_SAMPLES = 1600  # 0.1 s at 16 kHz between a clip and its `expand_wav` clips
_CACHE_VERSION = 1  # bump when what the cache stores changes
BUCKET_BATCHES = 16  # micro-batches per length-sorted chunk of the shuffled data
#: The share of the training samples (shortest answers first) a curriculum starts from.
CURRICULUM_START = 0.25


class TrainingError(ModelError):
    """A manifest, checkpoint or training option is unusable (the message says how to fix it)."""


# ---------------------------------------------------------------------------------------------
# Manifests and audio
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One manifest entry.

    Attributes:
        path: the audio file (resolved against the manifest's directory if relative).
        text: the target answer.
        task: official task key (``asr`` when the entry has none, as the official code).
        question: the ``Q`` field, for ``QA`` prompts ("" when absent).
        expand_wav: extra clips appended after 0.1 s of silence.
        manifest_path: the path exactly as the manifest wrote it (for reports).
    """

    path: Path
    text: str
    task: str = "asr"
    question: str = ""
    expand_wav: tuple[Path, ...] = ()
    manifest_path: str = ""


def read_manifest(path: str | Path) -> list[Sample]:
    """Read an official-format manifest: ``{"annotation": [{"path", "text", "task"?, "Q"?,
    "expand_wav"?}]}``.

    Raises:
        TrainingError: unreadable file, missing ``annotation`` list, or an entry without
            ``path`` and ``text`` strings.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"manifest {path} is not readable JSON: {exc}") from exc
    entries = data.get("annotation") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TrainingError(
            f'manifest {path}: expected {{"annotation": [...]}} (the official format), '
            f"got {type(data).__name__} without an annotation list"
        )
    root = path.parent
    samples = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("path", "text")
        ):
            raise TrainingError(f"manifest {path}: entry {i} needs string 'path' and 'text'")
        expand = entry.get("expand_wav") or []
        if isinstance(expand, str):
            expand = [expand]
        samples.append(
            Sample(
                path=root / entry["path"],
                text=entry["text"],
                task=str(entry.get("task") or "asr"),
                question=str(entry.get("Q") or ""),
                expand_wav=tuple(root / p for p in expand),
                manifest_path=entry["path"],
            )
        )
    return samples


def read_wav_16k(path: Path) -> np.ndarray:
    """Read a 16 kHz file as mono float32 (channels averaged).

    Raises:
        TrainingError: unreadable file or another sample rate (pass a resampling loader, such
            as `streaming.audio_file.load_audio`, to accept any rate).
    """
    import soundfile

    data: npt.NDArray[np.float32]
    try:
        data, rate_hz = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise TrainingError(f"cannot read audio {path}: {exc}") from exc
    if rate_hz != SAMPLE_RATE_HZ:
        raise TrainingError(f"{path} is at {rate_hz} Hz; expected {SAMPLE_RATE_HZ} Hz")
    mono: npt.NDArray[np.float32] = data.mean(axis=1)
    return mono


def load_sample_audio(sample: Sample, loader: AudioLoader = read_wav_16k) -> np.ndarray:
    """The sample's clip, with each ``expand_wav`` clip appended after 0.1 s of silence."""
    parts = [loader(sample.path)]
    for extra in sample.expand_wav:
        parts += [np.zeros(EXPAND_SILENCE_SAMPLES, dtype=np.float32), loader(extra)]
    return np.concatenate(parts).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Encoder-output cache
# ---------------------------------------------------------------------------------------------


class EncoderCache:
    """Raw frozen-encoder outputs per clip, on disk as float16 safetensors.

    Key: SHA-256 of the audio files' bytes (the clip and its ``expand_wav`` clips), under a
    directory named by the encoders' identity (Whisper and BEATs sources, widths, input mode),
    so a changed encoder or mode never reads stale features.

    Args:
        model: the model whose encoders fill the cache.
        directory: the cache root (created).
        loader: reads one audio file as 16 kHz mono float32.
        batch_size: clips per encoder call when filling.
    """

    def __init__(
        self,
        model: Salmonn,
        directory: str | Path,
        *,
        loader: AudioLoader = read_wav_16k,
        batch_size: int = 8,
    ) -> None:
        self.model = model
        self.loader = loader
        self.batch_size = batch_size
        identity = {
            "version": _CACHE_VERSION,
            "whisper": model.config.whisper,
            "beats": model.config.beats,
            "input_mode": model.config.input_mode,
            "speech_width": int(model.ln_speech.normalized_shape[0]),
            "audio_width": int(model.ln_audio.normalized_shape[0]) if model.ln_audio else 0,
        }
        if model.config.audio_encoder == "yamnet":  # keys only then: older caches stay valid
            identity["yamnet"] = model.config.yamnet
            identity["yamnet_hop_frames"] = model.config.yamnet_hop_frames
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self.root = Path(directory) / digest[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "identity.json").write_text(json.dumps(identity, indent=2) + "\n")
        self.encoder_calls = 0  # clips run through the encoders by this object
        self.hits = 0
        self._file_hashes: dict[tuple[str, int, int], str] = {}

    def _file_hash(self, path: Path) -> str:
        try:
            stat = path.stat()
        except OSError as exc:
            raise TrainingError(f"audio file {path} is missing: {exc}") from exc
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._file_hashes:
            self._file_hashes[memo] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._file_hashes[memo]

    def key(self, sample: Sample) -> str:
        """The cache key of a sample's audio (its files' contents, not their names)."""
        hashes = [self._file_hash(p) for p in (sample.path, *sample.expand_wav)]
        return hashlib.sha256("+".join(hashes).encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, samples: Sequence[Sample]) -> list[RawFeatures]:
        """Raw encoder outputs for each sample; the encoders run only for missing clips.

        Returns:
            Per sample, ``(speech (T, width), audio (T_b, width) or None)`` in float16.
        """
        from safetensors.torch import load_file

        keys = [self.key(s) for s in samples]
        out: dict[str, RawFeatures] = {}
        missing: dict[str, Sample] = {}
        for key, sample in zip(keys, samples, strict=True):
            if key in out or key in missing:
                continue
            path = self._file(key)
            if path.is_file():
                tensors = load_file(str(path))
                out[key] = (tensors["speech"], tensors.get("audio"))
                self.hits += 1
            else:
                missing[key] = sample
        items = list(missing.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            audio = [load_sample_audio(s, self.loader) for _, s in chunk]
            raw = self.model.raw_encoder_outputs(audio)
            self.encoder_calls += len(chunk)
            for (key, _), (speech, extra) in zip(chunk, raw, strict=True):
                out[key] = self._store(key, speech, extra)
        return [out[k] for k in keys]

    def _store(self, key: str, speech: torch.Tensor, audio: torch.Tensor | None) -> RawFeatures:
        from safetensors.torch import save_file

        tensors = {"speech": speech.detach().to("cpu", torch.float16).contiguous()}
        if audio is not None:
            tensors["audio"] = audio.detach().to("cpu", torch.float16).contiguous()
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # atomic: a reader never sees half a file
        return tensors["speech"], tensors.get("audio")

    def warm(self, samples: Sequence[Sample], *, progress: bool = False) -> int:
        """Fill the cache for every distinct clip of `samples`.

        Returns:
            How many clips the encoders ran on (0 when everything was cached).
        """
        from tqdm import tqdm

        distinct = list({self.key(s): s for s in samples}.values())
        before = self.encoder_calls
        step = self.batch_size * 4
        with tqdm(
            total=len(distinct), desc="encoder cache", unit="clip", disable=_bar_off(progress)
        ) as bar:
            for start in range(0, len(distinct), step):
                self.get(distinct[start : start + step])
                bar.update(min(step, len(distinct) - start))
        return self.encoder_calls - before


def audio_rows_from_cache(model: Salmonn, raw: Sequence[RawFeatures]) -> list[torch.Tensor]:
    """Cached raw features -> per-sample (n_tokens, llm_hidden) audio embeddings, through the
    trainable parts (gradients flow when grad is enabled)."""
    embeds, counts = model.audio_tokens_from_raw([r[0] for r in raw], [r[1] for r in raw])
    return [embeds[i, : counts[i]] for i in range(len(raw))]


def answer_loss(
    model: Salmonn,
    audio_rows: Sequence[torch.Tensor],
    instructions: Sequence[str],
    targets: Sequence[str],
) -> tuple[torch.Tensor, int, int]:
    """Teacher-forced cross-entropy over the answer tokens only, as `Salmonn.forward`, but the
    LLM's output head runs on the answer positions only.

    Rows are left-padded, so every answer sits at the end of its row: the logits of the last
    ``longest answer + 1`` positions (`logits_to_keep`) cover every label, and the 49k-wide
    output projection is skipped for the prompt and audio positions (about a fifth of a
    SmolLM2 step).

    Returns:
        ``(mean loss, correctly predicted answer tokens, answer tokens)``.
    """
    inputs = model.build_inputs(audio_rows, instructions, targets)
    labels = inputs.pop("labels")  # (B, S), -100 except on answer tokens
    answer = labels != -100
    first = int(answer.float().argmax(dim=1).min()) if bool(answer.any()) else labels.shape[1]
    keep = labels.shape[1] - first + 1  # answer positions plus the one predicting the first
    logits = model.llama_model(**inputs, logits_to_keep=keep).logits  # (B, keep, vocab)
    gold = labels[:, -keep + 1 :] if keep > 1 else labels[:, :0]
    logits = logits[:, :-1].float()
    mask = gold != -100
    picked, gold = logits[mask], gold[mask]
    loss = torch.nn.functional.cross_entropy(picked, gold)
    hits = int((picked.detach().argmax(-1) == gold).sum())
    return loss, hits, int(gold.numel())


# ---------------------------------------------------------------------------------------------
# Configuration and schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """One stage's training options (saved beside its checkpoints)."""

    stage: Stage = "pretrain"
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # samples per micro-batch
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (the official 13B run: 3e-5)
    warmup_steps: int = 100  # linear warmup from warmup_start_lr to lr
    warmup_start_lr: float = 1e-6
    min_lr: float = 1e-5  # the cosine decays to this at the last step
    weight_decay: float = 0.05  # not on biases, norms and 1-D tensors
    max_grad_norm: float | None = 1.0  # None: no clipping (the official code clips nothing)
    eval_every: int = 200  # steps between dev evaluations (0: only at the end)
    dev_limit: int | None = 256  # dev samples per evaluation (None: all)
    dtype: DType = "fp32"  # bf16: autocast the forward pass; weights and AdamW stay fp32
    seed: int = 42
    lora_only: bool = False  # train the LoRA matrices only (the paper's activation tuning)
    #: Short answers first: over the first this many steps the samples are drawn from the
    #: shortest answers, from `CURRICULUM_START` of them to all (0: no curriculum).
    curriculum_steps: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainingError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        if self.dtype not in ("fp32", "bf16"):
            raise TrainingError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        for name in ("steps", "batch_size", "accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.curriculum_steps < 0:
            raise TrainingError("warmup_steps, eval_every and curriculum_steps must be >= 0")
        if not 0 < self.min_lr <= self.lr:
            raise TrainingError(f"need 0 < min_lr <= lr, got min_lr {self.min_lr}, lr {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**data)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup from ``warmup_start_lr`` (step 0) towards ``lr`` (reached at step
    ``warmup_steps``), then a half cosine from ``lr`` to ``min_lr`` at the last step.
    """
    if step < config.warmup_steps:
        return config.warmup_start_lr + (config.lr - config.warmup_start_lr) * (
            step / config.warmup_steps
        )
    span = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, param: torch.Tensor) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered or "ln_" in lowered


def optimizer_groups(
    model: Salmonn, weight_decay: float, *, lora_only: bool = False
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on matrices, none on biases, norms and 1-D tensors."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad or (lora_only and ".lora_" not in name):
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise TrainingError("nothing to train: no parameter requires grad")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class DevMetrics:
    """Teacher-forced metrics on the dev split (answer tokens only)."""

    loss: float
    token_accuracy: float
    tokens: int


@dataclass
class TrainResult:
    """What a `Trainer.train` call did."""

    step: int  # optimizer steps done in total (after resuming, counts the earlier ones)
    last_loss: float
    best_token_accuracy: float | None
    seconds: float
    samples_per_s: float
    step_seconds: float  # mean wall time per optimizer step in this call
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains a model's trainable parts on a manifest, with a cache of encoder outputs.

    Layout of ``out_dir``: ``train_config.json``; ``last/`` (``model.safetensors``,
    ``config.json``, ``trainer_state.pt``), ``best/`` (by dev token accuracy; equals ``last``
    without a dev split) and ``log.jsonl`` (one line per evaluation).

    Args:
        model: the model; trained in place.
        config: the stage's options.
        train: training samples.
        dev: dev samples (may be empty).
        out_dir: where checkpoints go.
        cache: the encoder-output cache.
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        model: Salmonn,
        config: TrainConfig,
        train: Sequence[Sample],
        dev: Sequence[Sample],
        out_dir: str | Path,
        cache: EncoderCache,
        *,
        progress: bool = True,
    ) -> None:
        if not train:
            raise TrainingError("the training manifest has no entries")
        from model.prompts import PROMPTS

        unknown = sorted({s.task for s in [*train, *dev]} - set(PROMPTS))
        if unknown:
            raise TrainingError(
                f"no prompts for tasks {unknown}; model/prompts.py knows {sorted(PROMPTS)}"
            )
        self.model = model
        self.config = config
        self.train_samples = list(train)
        self.dev_samples = list(dev)[: config.dev_limit] if config.dev_limit else list(dev)
        self.out_dir = Path(out_dir)
        self.cache = cache
        self.progress = progress
        self.step = 0
        self.epoch = 0
        self.chunk = 0  # chunk of the epoch's permutation being consumed
        self.batch_index = 0  # next micro-batch within the chunk
        self._batch_memo: dict[tuple[int, int], list[list[tuple[Sample, str]]]] = {}
        self._file_sizes: dict[str, int] = {}
        # Sample indices by answer length in characters, shortest first (for the curriculum).
        self._by_answer_length = np.argsort(
            [len(s.text) for s in self.train_samples], kind="stable"
        )
        self.best: float | None = None
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(model, config.weight_decay, lora_only=config.lora_only),
            lr=lr_at(0, config),
            betas=(0.9, 0.999),
        )

    # -- data -----------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_samples))

    def _size_hint(self, sample: Sample, prompt: str) -> float:
        """A rough token count: text at ~4 characters per token, audio at one token per
        5120 bytes of 16-bit 16 kHz audio (a 0.16 s window); only used to group batches."""
        key = str(sample.path)
        if key not in self._file_sizes:
            self._file_sizes[key] = sample.path.stat().st_size if sample.path.exists() else 0
        return (len(prompt) + len(sample.text)) / 4 + self._file_sizes[key] / 5120

    def _chunk_batches(self, epoch: int, chunk: int) -> list[list[tuple[Sample, str]]]:
        """The micro-batches of one chunk (`BUCKET_BATCHES` micro-batches' worth of samples of
        the epoch's permutation): samples get their prompt paraphrase, are sorted by size so a
        micro-batch pads little, and the micro-batches are shuffled. Deterministic in (seed,
        epoch, chunk), so a resumed run sees exactly the same batches."""
        if (epoch, chunk) in self._batch_memo:
            return self._batch_memo[(epoch, chunk)]
        order = self._order(epoch)
        width = self.config.batch_size * BUCKET_BATCHES
        indices = order[chunk * width : (chunk + 1) * width]
        share = self._curriculum_share(epoch, chunk)
        if share < 1:
            # Drawn afresh from the shortest answers for each chunk (samples may repeat
            # across chunks); the epoch's permutation takes over once the pool is everything.
            pool = self._by_answer_length[: max(1, math.ceil(share * len(order)))]
            indices = np.random.default_rng([self.config.seed, epoch, chunk, 2]).choice(
                pool, size=min(width, pool.size), replace=False
            )
        picked = []
        for offset, index in enumerate(indices):
            sample = self.train_samples[int(index)]
            rng = np.random.default_rng([self.config.seed, epoch, chunk * width + offset])
            picked.append((sample, sample_prompt(sample.task, rng, sample.question)))
        picked.sort(key=lambda item: self._size_hint(*item))
        size = self.config.batch_size
        batches = [picked[i : i + size] for i in range(0, len(picked), size)]
        shuffle = np.random.default_rng([self.config.seed, epoch, chunk, 1]).permutation(
            len(batches)
        )
        self._batch_memo = {(epoch, chunk): [batches[i] for i in shuffle]}
        return self._batch_memo[(epoch, chunk)]

    def _curriculum_share(self, epoch: int, chunk: int) -> float:
        """The share of the shortest answers a chunk draws from: `CURRICULUM_START` at the
        first step, growing linearly to 1 at ``curriculum_steps`` (1 without a curriculum)."""
        if not self.config.curriculum_steps:
            return 1.0
        chunks = math.ceil(len(self.train_samples) / (self.config.batch_size * BUCKET_BATCHES))
        step = (epoch * chunks + chunk) * BUCKET_BATCHES / self.config.accum
        grown = step / self.config.curriculum_steps
        return min(1.0, CURRICULUM_START + (1 - CURRICULUM_START) * grown)

    def _next_batch(self) -> tuple[list[Sample], list[str]]:
        """The next micro-batch and its prompts."""
        width = self.config.batch_size * BUCKET_BATCHES
        chunks = math.ceil(len(self.train_samples) / width)
        batches = self._chunk_batches(self.epoch, self.chunk)
        if self.batch_index >= len(batches):
            self.chunk, self.batch_index = self.chunk + 1, 0
            if self.chunk >= chunks:
                self.epoch, self.chunk = self.epoch + 1, 0
            batches = self._chunk_batches(self.epoch, self.chunk)
        batch = batches[self.batch_index]
        self.batch_index += 1
        return [b[0] for b in batch], [b[1] for b in batch]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, samples: Sequence[Sample], prompts: Sequence[str]) -> torch.Tensor:
        raw = self.cache.get(samples)
        with self._autocast():
            rows = audio_rows_from_cache(self.model, raw)
            return answer_loss(self.model, rows, prompts, [s.text for s in samples])[0]

    # -- the loop -------------------------------------------------------------------------

    def train(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run (or continue) the stage to ``config.steps`` optimizer steps.

        Args:
            resume: continue from ``out_dir/last`` (weights, optimizer, schedule position, data
                order, RNG state); a fresh start when there is no ``last`` yet.
            stop_after: stop after this many steps in this call (a time budget; ``last`` is
                saved, so ``resume`` continues).

        Returns:
            A summary; checkpoints are in ``out_dir``.

        Raises:
            TrainingError: a resume checkpoint that does not match the model or options.
        """
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.out_dir / "last" / "trainer_state.pt").is_file():
            self._restore()
        else:
            torch.manual_seed(self.config.seed)
        (self.out_dir / "train_config.json").write_text(
            json.dumps(self.config.to_dict(), indent=2) + "\n"
        )
        logger.info("training %s: %s", self.config.stage, self.config)
        self.model.train()
        end = self.config.steps if stop_after is None else min(
            self.config.steps, self.step + stop_after
        )  # fmt: skip
        started, samples_done, steps_done = time.perf_counter(), 0, 0
        loss_value = float("nan")
        history: list[dict[str, Any]] = []
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=self.config.stage,
            unit="step",
            disable=_bar_off(self.progress),
        )
        try:
            while self.step < end:
                lr = lr_at(self.step, self.config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(self.config.accum):
                    samples, prompts = self._next_batch()
                    loss = self._loss(samples, prompts)
                    # Tensor.backward carries no annotations in torch 2.x.
                    (loss / self.config.accum).backward()  # type: ignore[no-untyped-call]
                    total += float(loss.detach()) / self.config.accum
                    samples_done += len(samples)
                if not math.isfinite(total):
                    raise TrainingError(
                        f"loss became {total} at step {self.step}; lower --lr or use fp32"
                    )
                if self.config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                self.optimizer.step()
                self.step += 1
                steps_done += 1
                loss_value = total
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(
                    loss=f"{total:.3f}", lr=f"{lr:.2e}", sps=f"{samples_done / elapsed:.1f}"
                )
                at_eval = self.config.eval_every and self.step % self.config.eval_every == 0
                if at_eval or self.step == self.config.steps:
                    history.append(self._evaluate_and_save(loss_value, lr, elapsed))
            if self.step < self.config.steps:  # stopped early: keep `last` for --resume
                self._save("last")
        finally:
            bar.close()
            self.model.eval()
        seconds = time.perf_counter() - started
        return TrainResult(
            step=self.step,
            last_loss=loss_value,
            best_token_accuracy=self.best,
            seconds=seconds,
            samples_per_s=samples_done / seconds if seconds else 0.0,
            step_seconds=seconds / max(1, steps_done),
            history=history,
        )

    def _evaluate_and_save(self, loss: float, lr: float, elapsed: float) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lr, "elapsed_s": elapsed}
        improved = True
        if self.dev_samples:
            metrics = self.evaluate(self.dev_samples)
            record.update(dev_loss=metrics.loss, dev_token_accuracy=metrics.token_accuracy)
            improved = self.best is None or metrics.token_accuracy > self.best
            if improved:
                self.best = metrics.token_accuracy
            logger.info(
                "step %d: loss %.4f, dev loss %.4f, dev token accuracy %.4f%s",
                self.step,
                loss,
                metrics.loss,
                metrics.token_accuracy,
                " (best)" if improved else "",
            )
        self._save("last", record)
        if improved:
            self._save("best", record)
        with (self.out_dir / "log.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        return record

    # -- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, samples: Sequence[Sample]) -> DevMetrics:
        """Teacher-forced loss and next-token accuracy over the answer tokens, with each
        task's evaluation prompt; token-weighted over all samples."""
        was_training = self.model.training
        self.model.eval()
        total_loss, correct, count = 0.0, 0, 0
        try:
            for start in range(0, len(samples), self.config.batch_size):
                chunk = samples[start : start + self.config.batch_size]
                raw = self.cache.get(chunk)
                with self._autocast():
                    rows = audio_rows_from_cache(self.model, raw)
                    loss, hits, tokens = answer_loss(
                        self.model,
                        rows,
                        [eval_prompt(s.task, s.question) for s in chunk],
                        [s.text for s in chunk],
                    )
                total_loss += float(loss) * tokens
                correct += hits
                count += tokens
        finally:
            self.model.train(was_training)
        return DevMetrics(
            loss=total_loss / max(1, count), token_accuracy=correct / max(1, count), tokens=count
        )

    # -- checkpoints ----------------------------------------------------------------------

    def _save(self, kind: str, record: dict[str, Any] | None = None) -> Path:
        directory = self.out_dir / kind
        extra = {"train": self.config.to_dict(), "step": self.step, "metrics": record or {}}
        self.model.save_checkpoint(directory, extra=extra)
        if kind == "last":
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "chunk": self.chunk,
                "batch_index": self.batch_index,
                "best": self.best,
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "config": self.config.to_dict(),
            }
            tmp = directory / "trainer_state.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(directory / "trainer_state.pt")
        return directory

    def _restore(self) -> None:
        directory = self.out_dir / "last"
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
        saved = state["config"]
        for key in ("stage", "batch_size", "accum", "seed", "lora_only"):
            if saved.get(key) != getattr(self.config, key):
                raise TrainingError(
                    f"cannot resume {directory}: it was trained with {key}={saved.get(key)!r}, "
                    f"now {key}={getattr(self.config, key)!r}; use the same options or a new --out"
                )
        report = self.model.load_checkpoint(directory)
        if report.missing or report.unexpected:
            raise TrainingError(f"cannot resume from {directory}: {report.summary()}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.chunk, self.batch_index = state["chunk"], state["batch_index"]
        self.best = state["best"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed %s at step %d (epoch %d)", directory, self.step, self.epoch)


# ---------------------------------------------------------------------------------------------
# Generation from cached features (activation data, evaluation)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(
    model: Salmonn,
    cache: EncoderCache,
    samples: Sequence[Sample],
    instructions: Sequence[str],
    *,
    batch_size: int = 8,
    lora_scale: float | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    top_p: float = 0.9,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Answer one instruction per sample, batched, from cached encoder outputs.

    Args:
        model: the model (put in eval mode here).
        cache: the encoder-output cache.
        samples: the clips.
        instructions: one instruction per sample.
        batch_size: rows per `generate` call.
        lora_scale: LoRA scaling for these answers (None: alpha / r).
        max_new_tokens: token budget per answer.
        do_sample: sample (nucleus) instead of greedy decoding.
        seed: torch seed for sampling.
        progress: show a tqdm bar.

    Returns:
        One answer per sample.
    """
    from tqdm import tqdm

    if len(samples) != len(instructions):
        raise ValueError(f"got {len(samples)} samples but {len(instructions)} instructions")
    model.eval()
    torch.manual_seed(seed)
    answers: list[str] = []
    for start in tqdm(
        range(0, len(samples), batch_size),
        desc="generate",
        unit="batch",
        disable=_bar_off(progress),
    ):
        chunk = list(samples[start : start + batch_size])
        rows = audio_rows_from_cache(model, cache.get(chunk))
        results = model.generate_from_tokens(
            rows,
            list(instructions[start : start + batch_size]),
            lora_scale=lora_scale,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            top_p=top_p,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
        )
        answers.extend(r.text for r in results)
    return answers


def iter_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
