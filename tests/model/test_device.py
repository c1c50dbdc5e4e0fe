"""Device and dtype choice (`model/device.py`, `Salmonn.from_config(device=, dtype=)`) and the
GPU check script's CPU modes (`bench/gpu_check.py`).

CUDA is simulated with monkeypatch where a test checks a decision (which dtype, which
message); the tests that need a real GPU are marked `gpu` and skipped without one.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import model.device as device_module
from model.device import (
    GIB,
    check_fits,
    out_of_memory_as_error,
    resolve_device_dtype,
)
from model.errors import DeviceError, DeviceMemoryError, ModelError
from model.presets import resolve_model
from model.salmonn import Salmonn

SR = 16000
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _clip(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(
        np.float32
    )


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """torch sees one GPU (nothing is allocated on it by the code under test)."""
    state: dict[str, object] = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(device_module, "_cuda_bf16_supported", lambda device: state["bf16"])
    return state


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "dtype", "want"),
    [
        ("cpu", None, torch.float32),
        ("cpu", "auto", torch.float32),
        ("cpu", "float32", torch.float32),
        ("CPU", "FP32", torch.float32),
        ("cpu", "bfloat16", torch.bfloat16),
        ("cpu", "bf16", torch.bfloat16),
        (" cpu ", torch.bfloat16, torch.bfloat16),
        (torch.device("cpu"), None, torch.float32),
    ],
)
def test_cpu_options_parse(device, dtype, want) -> None:
    assert resolve_device_dtype(device, dtype) == (CPU, want)


def test_the_default_is_float32_on_the_cpu() -> None:
    assert resolve_device_dtype() == (CPU, torch.float32)


@pytest.mark.parametrize(
    ("device", "dtype", "needle"),
    [
        ("gpu", None, "auto, cpu, cuda, cuda:N"),
        ("cuda:x", None, "not 'cuda:x'"),
        ("cpu", "int8", "float32, bfloat16, float16"),
        ("cpu", "float64", "not 'float64'"),
        ("cpu", torch.float64, "not float64"),
    ],
)
def test_unknown_options_name_the_choices(device, dtype, needle) -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype(device, dtype)
    assert needle in str(err.value)


def test_device_errors_are_model_errors_so_the_command_line_reports_them() -> None:
    assert issubclass(DeviceError, ModelError) and issubclass(DeviceMemoryError, DeviceError)


def test_auto_is_the_cpu_without_cuda(no_cuda) -> None:
    assert resolve_device_dtype("auto", None) == (CPU, torch.float32)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_cpu_build_names_the_build_and_the_fix(no_cuda, monkeypatch, device) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype(device, None)
    message = str(err.value)
    assert message.startswith("no CUDA device:")
    assert f"torch {torch.__version__} is a CPU build" in message
    assert "use --device cpu" in message


def test_cuda_build_without_a_visible_gpu_says_so(no_cuda, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype("cuda", "bfloat16")
    assert "(CUDA 12.4) sees no GPU" in str(err.value)
    assert "CUDA_VISIBLE_DEVICES" in str(err.value) and "--device cpu" in str(err.value)


def test_a_gpu_index_past_the_last_names_the_ones_there(fake_gpu) -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype("cuda:3", None)
    assert "torch sees 1 GPU(s) (cuda:0)" in str(err.value)
    assert "--device cuda:0" in str(err.value)


@pytest.mark.parametrize(("bf16", "want"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_defaults_to_bf16_where_supported_else_fp16(fake_gpu, bf16, want) -> None:
    fake_gpu["bf16"] = bf16
    for spec in ("auto", "cuda", "cuda:0"):
        assert resolve_device_dtype(spec, None) == (torch.device("cuda", 0), want)
        assert resolve_device_dtype(spec, "auto") == (torch.device("cuda", 0), want)


def test_bf16_on_a_gpu_without_bf16_names_the_gpu_and_float16(fake_gpu) -> None:
    fake_gpu["bf16"] = False
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype("cuda", "bfloat16")
    message = str(err.value)
    assert "Tesla V100-SXM2 (compute capability 7.0) has no bfloat16" in message
    assert "--dtype float16" in message
    assert resolve_device_dtype("cuda", "float16")[1] == torch.float16
    assert resolve_device_dtype("cuda", "float32")[1] == torch.float32


def test_a_dtype_the_cpu_cannot_run_is_refused_with_the_fix(monkeypatch) -> None:
    def refuse(device: torch.device, dtype: torch.dtype) -> None:
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(device_module, "_probe", refuse)
    with pytest.raises(DeviceError) as err:
        resolve_device_dtype("cpu", "float16")
    assert "float16 does not run on the CPU" in str(err.value)
    assert "not implemented for 'Half'" in str(err.value)
    assert "--dtype float32" in str(err.value)


def test_float16_on_the_cpu_runs_but_warns_that_it_is_slow(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="model.device"):
        assert resolve_device_dtype("cpu", "fp16") == (CPU, torch.float16)
    assert "runs slowly" in caplog.text


# -- memory -------------------------------------------------------------------------------


def test_out_of_memory_at_load_says_needed_against_free(monkeypatch) -> None:
    monkeypatch.setattr(device_module, "device_free_total", lambda device: (2 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gpu = torch.device("cuda", 0)
    guard = out_of_memory_as_error(gpu, "the LLM /models/vicuna-13b", 26 * GIB)
    with pytest.raises(DeviceMemoryError) as err, guard:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 250 MiB")
    message = str(err.value)
    assert "not enough memory on cuda:0 for the LLM /models/vicuna-13b" in message
    assert "needs about 26.0 GiB, 2.0 GiB of 80.0 GiB is free" in message
    assert "salmonn-7b" in message and "--dtype" in message
    assert "Tried to allocate 250 MiB" in message


def test_other_errors_pass_through_the_memory_guard() -> None:
    with pytest.raises(ValueError, match="not memory"), out_of_memory_as_error(CPU, "x"):
        raise ValueError("not memory")


def test_a_load_larger_than_the_free_memory_is_refused_before_it_starts(monkeypatch) -> None:
    check_fits(CPU, "the LLM", 10**15)  # host memory is not checked ahead
    monkeypatch.setattr(device_module, "device_free_total", lambda device: (10 * GIB, 24 * GIB))
    gpu = torch.device("cuda", 0)
    check_fits(gpu, "the LLM", 9 * GIB)  # fits
    with pytest.raises(DeviceMemoryError, match=r"needs about 26\.0 GiB, 10\.0 GiB of 24\.0"):
        check_fits(gpu, "the LLM", 26 * GIB)


def test_peak_host_memory_is_the_resident_set_in_bytes() -> None:
    # This process has at least imported torch: more than 50 MB, less than a terabyte.
    assert 50 * 2**20 < device_module.peak_host_bytes() < 2**40


# -- loading ------------------------------------------------------------------------------


def test_cuda_asked_for_without_cuda_fails_before_anything_loads(no_cuda, monkeypatch) -> None:
    import model.whisper

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("Whisper was loaded before the device was checked")

    monkeypatch.setattr(model.whisper, "load_whisper", must_not_load)
    with pytest.raises(DeviceError, match="no CUDA device"):
        Salmonn.from_config(resolve_model("tiny-random"), device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16_model() -> Salmonn:
    torch.manual_seed(0)
    return Salmonn.from_config(resolve_model("tiny-random"), device="cpu", dtype="bfloat16")


def test_bf16_parts_are_in_the_dtypes_they_run_in(bf16_model: Salmonn) -> None:
    m = bf16_model
    low = torch.bfloat16
    assert {p.dtype for p in m.whisper.parameters()} == {low}
    assert m.beats is not None and {p.dtype for p in m.beats.parameters()} == {low}
    assert {p.dtype for p in m.speech_Qformer.parameters()} == {low}
    assert m.speech_query_tokens.dtype == low and m.speech_llama_proj.weight.dtype == low
    assert m.ln_audio is not None
    assert {p.dtype for p in (*m.ln_speech.parameters(), *m.ln_audio.parameters())} == {
        torch.float32
    }
    base = {p.dtype for n, p in m.llama_model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in m.llama_model.named_parameters() if "lora_" in n}
    assert base == {low} and lora == {torch.float32}
    # The trainable parts are still the trainable parts.
    assert (
        m.speech_query_tokens.requires_grad
        and m.speech_Qformer.bert.embeddings.LayerNorm.weight.requires_grad
    )


@pytest.mark.parametrize("mode", ["official", "trimmed"])
def test_bf16_features_stay_float32_and_layer_norms_run_in_float32(
    bf16_model: Salmonn, monkeypatch, mode: str
) -> None:
    import model.whisper

    seen: dict[str, torch.dtype] = {}
    real_encode = model.whisper.encode

    def spy(encoder, features, *args, **kwargs):
        seen["features"] = features.dtype
        return real_encode(encoder, features, *args, **kwargs)

    monkeypatch.setattr(model.whisper, "encode", spy)
    m = bf16_model
    hooks = [
        m.beats.patch_embedding.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("beats_in", args[0].dtype)
        ),
        m.ln_speech.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("ln_speech", out.dtype)
        ),
        m.ln_audio.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("ln_audio", out.dtype)
        ),
        m.speech_Qformer.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("qformer_in", args[1].dtype)
        ),
    ]
    monkeypatch.setattr(m, "config", m.config.replace(input_mode=mode))
    try:
        tokens = m.encode_audio([_clip()])
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {
        "features": torch.float32,  # the log-mel features, up to Whisper's first conv
        "beats_in": torch.bfloat16,  # BEATs' fbank is float32, cast at its patch embedding
        "ln_speech": torch.float32,
        "ln_audio": torch.float32,
        "qformer_in": torch.bfloat16,
    }
    assert tokens.embeds.dtype == torch.bfloat16
    assert torch.isfinite(tokens.embeds.float()).all()


def test_bf16_model_generates(bf16_model: Salmonn) -> None:
    streamed: list[int] = []
    results = bf16_model.generate(
        [_clip(2.0, 1), _clip(1.5, 2)],
        "Recognize the speech and give me the transcription.",
        max_new_tokens=5,
        on_token=lambda row, token: streamed.append(token) if row == 0 else None,
    )
    assert len(results) == 2
    assert all(0 < len(r.token_ids) <= 5 for r in results)
    assert streamed == results[0].token_ids
    assert results[0].audio_tokens == 88  # official mode: 30 s padding, 88 windows


@pytest.mark.numerics
def test_bf16_audio_embeddings_follow_float32_ones(bf16_model: Salmonn) -> None:
    torch.manual_seed(0)  # the same random Q-Former and projection as the bf16 fixture
    full = Salmonn.from_config(resolve_model("tiny-random"))
    clip = [_clip(2.0, 3)]
    want = full.encode_audio(clip).embeds
    got = bf16_model.encode_audio(clip).embeds.float()
    relative = (got - want).norm() / want.norm()
    assert relative < 0.05, f"bf16 audio embeddings differ from float32 by {relative:.3f}"


def test_loading_logs_peak_host_memory(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="model.salmonn"):
        Salmonn.from_config(resolve_model("tiny-random"), dtype="float32")
    assert "loading model 'tiny-random' on cpu in float32" in caplog.text
    assert "peak host memory" in caplog.text and "(resident set)" in caplog.text


def test_placement_is_the_device_and_compute_dtype(bf16_model: Salmonn) -> None:
    assert bf16_model.placement() == (CPU, torch.bfloat16)


def test_trimmed_batches_in_one_masked_pass_off_the_cpu_as_each_clip_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import model.salmonn
    import model.whisper

    torch.manual_seed(0)
    m = Salmonn.from_config(resolve_model("tiny-random", input_mode="trimmed"))
    clips = [_clip(2.0, 5), _clip(1.2, 6), _clip(3.3, 7)]
    alone = m.encode_audio(clips)
    passes: list[int] = []
    real_encode = model.whisper.encode

    def spy(encoder, features, *args, **kwargs):
        passes.append(features.shape[0])
        return real_encode(encoder, features, *args, **kwargs)

    monkeypatch.setattr(model.whisper, "encode", spy)
    monkeypatch.setattr(model.salmonn, "_batch_trimmed", lambda device, clips: True)
    batched = m.encode_audio(clips)
    assert passes == [3]  # what a GPU gets: one Whisper pass for the batch
    assert batched.counts == alone.counts
    torch.testing.assert_close(batched.embeds, alone.embeds, rtol=1e-4, atol=1e-5)


def test_packing_is_skipped_off_the_cpu(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    torch.manual_seed(0)
    m = Salmonn.from_config(resolve_model("tiny-random"))
    monkeypatch.setattr(m, "_device", lambda: torch.device("cuda", 0))
    with caplog.at_level(logging.INFO, logger="model.salmonn"):
        assert m.pack_for_inference() == 0
    assert "weight packing skipped: the model runs on cuda:0" in caplog.text
    from model.packing import PackedLinear

    assert not any(isinstance(module, PackedLinear) for module in m.modules())


# -- on a GPU (opt-in: pytest -m gpu) -----------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_tiny_model_on_cuda_in_the_default_dtype(caplog) -> None:
    gpu, dtype = resolve_device_dtype("cuda", None)
    with caplog.at_level(logging.INFO, logger="model.salmonn"):
        m = Salmonn.from_config(resolve_model("tiny-random"), device="cuda")
    assert dtype in (torch.bfloat16, torch.float16)
    assert {p.device for p in m.parameters()} == {gpu}
    assert m.speech_llama_proj.weight.dtype == dtype and m.ln_speech.weight.dtype == torch.float32
    assert f"{gpu} peak" in caplog.text
    results = m.generate([_clip()], "Describe the audio.", max_new_tokens=4)
    assert 0 < len(results[0].token_ids) <= 4


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_runs_its_tiny_shapes_on_cuda(capsys) -> None:
    from bench import gpu_check

    status = gpu_check.main(
        ["--sizes", "tiny", "--device", "cuda", "--repeats", "2", "--streams", "1,2"]
    )
    assert status == 0
    assert "| tiny | official |" in capsys.readouterr().out


# -- bench/gpu_check.py on the CPU ----------------------------------------------------------


def test_gpu_check_shapes_are_the_papers() -> None:
    from bench.gpu_check import SIZES, build_on_meta, parameter_counts

    seven = parameter_counts(build_on_meta(SIZES["7b"], torch.bfloat16))
    assert seven["llm"] == pytest.approx(6.74e9, rel=0.01)  # Llama-2 7B
    assert seven["whisper_encoder"] == pytest.approx(0.637e9, rel=0.01)  # large-v2's encoder
    assert seven["beats"] == 90_717_055
    # SALMONN.md section 5: 30,186,240 trainable parameters for 7B.
    assert seven["connection"] + seven["lora"] == 30_186_240
    thirteen = parameter_counts(build_on_meta(SIZES["13b"], torch.bfloat16))
    assert thirteen["llm"] == pytest.approx(13.0e9, rel=0.01)
    assert thirteen["connection"] + thirteen["lora"] == 33_332_992


def test_gpu_check_dry_run_prints_the_parameter_counts(capsys) -> None:
    from bench import gpu_check

    assert gpu_check.main(["--dry-run", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "| 7b |" in out and "| 13b |" in out and "6.738 B" in out
    assert "bfloat16 weights" in out


def test_gpu_check_measures_tiny_shapes_on_the_cpu(capsys, tmp_path) -> None:
    from bench import gpu_check

    out_file = tmp_path / "gpu.md"
    status = gpu_check.main(
        [
            "--sizes",
            "tiny",
            "--device",
            "cpu",
            "--repeats",
            "2",
            "--streams",
            "1,2",
            "--new-tokens",
            "3",
            "--out",
            str(out_file),
        ]
    )
    assert status == 0
    text = out_file.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    for mode in ("official", "trimmed"):
        assert f"| tiny | {mode} | 0.0 GiB |" in text
        assert f"| tiny | {mode} | 2 |" in text  # the sweep reached two streams
    import json

    results = json.loads(out_file.with_suffix(".json").read_text())
    assert [r["input_mode"] for r in results] == ["official", "trimmed"]
    for r in results:
        one = r["one_stream"]
        assert 0 < one["first_token_p50_s"] <= one["end_to_end_p50_s"]
        assert one["tokens"] <= 3


def test_gpu_check_scenes_round_trip_as_16_bit(monkeypatch, tmp_path) -> None:
    import bench.pipeline
    from bench import gpu_check

    rendered = [
        type("Scene", (), {"audio": _clip(1.0, i)})() for i in range(3)
    ]  # what bench.pipeline._scenes gives (espeak-ng not needed here)
    monkeypatch.setattr(bench.pipeline, "_scenes", lambda count, seconds: rendered[:count])
    path = tmp_path / "scenes.npz"
    assert gpu_check.main(["--write-scenes", str(path), "--scene-count", "3"]) == 0
    scenes = gpu_check.read_scenes(path)
    assert len(scenes) == 3
    for scene, want in zip(scenes, rendered, strict=True):
        assert scene.audio.dtype == np.float32
        np.testing.assert_allclose(scene.audio, want.audio, atol=1 / 16000)


def test_gpu_check_pipeline_without_scenes_fails_but_keeps_the_figures(capsys) -> None:
    from bench import gpu_check

    tiny = ["--sizes", "tiny", "--device", "cpu", "--repeats", "1", "--streams", "1"]
    status = gpu_check.main(
        [*tiny, "--input-modes", "trimmed", "--new-tokens", "2", "--pipeline-streams", "1"]
    )
    captured = capsys.readouterr()
    assert status == 1 and "--pipeline-streams needs --scenes" in captured.err
    assert "| tiny | trimmed |" in captured.out


@pytest.mark.parametrize("bench_name", ["pipeline", "load", "model"])
def test_bench_commands_take_device_and_dtype(bench_name: str) -> None:
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"bench.{bench_name}").add_arguments(parser)
    args = parser.parse_args(["--device", "cuda:1", "--dtype", "bfloat16"])
    assert args.device == "cuda:1"
    assert getattr(args, "model_dtype" if bench_name == "model" else "dtype") == "bfloat16"
    defaults = parser.parse_args([])
    assert defaults.device == "cpu"


def test_bench_pipeline_loads_its_model_on_the_device(monkeypatch) -> None:
    import argparse

    import bench.pipeline

    seen: dict[str, object] = {}

    class Loaded(Exception):
        pass

    def fake_from_config(config, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(bench.pipeline, "_scenes", lambda count, seconds: [])
    monkeypatch.setattr(Salmonn, "from_config", fake_from_config)
    parser = argparse.ArgumentParser()
    bench.pipeline.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-random", "--streams", "1", "--dtype", "bf16"])
    with pytest.raises(Loaded):
        bench.pipeline.run(args)
    assert seen == {"device": "cpu", "dtype": "bf16"}


def test_gpu_check_refuses_cuda_without_cuda(no_cuda, monkeypatch, capsys) -> None:
    from bench import gpu_check

    monkeypatch.setattr(torch.version, "cuda", None)
    assert gpu_check.main(["--device", "cuda", "--sizes", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
