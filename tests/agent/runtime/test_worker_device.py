"""The inference worker on the model's device and dtype (issue 19).

On the CPU: the tiny-random model loaded in bfloat16 from an `AgentConfig`'s ``model.device`` /
``model.dtype`` answers batches from several streams; packing and the command recogniser
follow the model's placement. A GPU is simulated where a test checks a decision (skip packing,
load the recogniser on cuda); the tests that need a real one are marked `gpu`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest
import torch

from agent.cli.run import _model_loader
from agent.runtime.worker import (
    CommandRecogniser,
    Final,
    InferenceWorker,
    Partial,
    Request,
    Window,
    model_placement,
)
from tests.agent.conftest import make_config

SR = 16000
CUDA0 = torch.device("cuda", 0)


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.shape)).astype(
        np.float32
    )


def _window(stream: str, seconds: float, seed: int, *tasks: str) -> Window:
    wid = f"{stream}:1"
    requests = tuple(Request(f"{wid}/{task}", task, "Describe the audio.") for task in tasks)
    return Window(wid, stream, "mixed", _clip(seconds, seed), 0.0, seconds, 0.0, 0.0, requests)


def _loader(device: str, dtype: str | None, mode: str = "trimmed") -> Any:
    """The loader `salmonn-live run` builds from its config (`agent.cli.run`)."""
    config = make_config(model={"device": device, "dtype": dtype, "input_mode": mode})
    assert (config.model.device, config.model.dtype) == (device, dtype)
    return _model_loader(config.model)


@pytest.fixture(scope="module")
def bf16_model() -> Any:
    torch.manual_seed(0)
    return _loader("cpu", "bfloat16")()


def test_config_device_and_dtype_reach_the_loaded_model(bf16_model: Any) -> None:
    assert model_placement(bf16_model) == (torch.device("cpu"), torch.bfloat16)
    base = {p.dtype for n, p in bf16_model.llama_model.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16}
    assert {p.dtype for p in bf16_model.whisper.parameters()} == {torch.bfloat16}
    assert bf16_model.config.input_mode == "trimmed"


def test_the_default_is_float32_on_the_cpu() -> None:
    config = make_config()
    assert (config.model.device, config.model.dtype) == ("cpu", None)


async def test_bf16_worker_answers_every_stream_in_one_batch(bf16_model: Any) -> None:
    calls: list[int] = []
    real_encode = bf16_model.encode_audio

    def encode_spy(audio: list[np.ndarray]) -> Any:
        calls.append(len(audio))
        return real_encode(audio)

    windows = [
        _window("a", 2.0, 1, "caption", "transcript"),
        _window("b", 1.3, 2, "caption"),
        _window("c", 3.1, 3, "transcript"),
    ]
    outputs: list[Any] = []
    async with InferenceWorker(lambda: bf16_model, max_new_tokens=4, warm_up=True) as worker:
        assert (worker.device, worker.dtype) == (torch.device("cpu"), torch.bfloat16)
        bf16_model.encode_audio = encode_spy
        try:
            report = await worker.run(windows, outputs.append)
        finally:
            del bf16_model.encode_audio
    assert report.error is None and not report.cancelled
    keys = {r.key for w in windows for r in w.requests}
    assert report.finished == keys
    finals = [o for o in outputs if isinstance(o, Final)]
    assert sorted(f.request.key for f in finals) == sorted(keys)
    assert all(0 < f.tokens <= 4 for f in finals)
    assert all(isinstance(o, Final | Partial) for o in outputs)
    # On a CPU the windows are encoded one at a time (the fast lane may run between them);
    # the three streams' answers still came from one batch.
    assert worker.runner is not None and worker.runner.encode_one_by_one
    assert calls == [1, 1, 1]


def test_off_the_cpu_a_batch_goes_through_the_encoders_together(bf16_model: Any) -> None:
    from agent.runtime.worker import BatchRunner

    calls: list[int] = []
    real_encode = bf16_model.encode_audio

    def encode_spy(audio: list[np.ndarray]) -> Any:
        calls.append(len(audio))
        return real_encode(audio)

    windows = [_window("a", 2.0, 1, "caption"), _window("b", 1.3, 2, "caption")]
    runner = BatchRunner(bf16_model, 2)  # encode_one_by_one is off unless the worker sets it
    bf16_model.encode_audio = encode_spy
    try:
        report = runner.run(windows, lambda output: None, threading.Event())
    finally:
        del bf16_model.encode_audio
    assert report.error is None and calls == [2]


class _PlacedModel:
    """A model double that says where it runs and records packing."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.packed = 0

    def placement(self) -> tuple[torch.device, torch.dtype]:
        return self.device, self.dtype

    def pack_for_inference(self) -> int:
        self.packed += 1
        return 1


@pytest.mark.parametrize(("device", "packed"), [(torch.device("cpu"), 1), (CUDA0, 0)])
async def test_weights_are_packed_on_the_cpu_only(
    caplog: pytest.LogCaptureFixture, device: torch.device, packed: int
) -> None:
    model = _PlacedModel(device, torch.float32)
    with caplog.at_level(logging.INFO, logger="agent.runtime.worker"):
        async with InferenceWorker(lambda: model, max_new_tokens=2, warm_up=False) as worker:
            assert worker.device == device
    assert model.packed == packed
    skipped = "weight packing skipped: the model runs on cuda:0" in caplog.text
    assert skipped == (device.type == "cuda")


def test_a_model_that_does_not_say_runs_on_the_cpu_in_float32() -> None:
    assert model_placement(object()) == (torch.device("cpu"), torch.float32)


async def test_the_command_recogniser_loads_in_the_models_dtype() -> None:
    from model.packing import PackedLinear
    from model.tiny import tiny_random_sources

    source = tiny_random_sources()["whisper"]
    model = _PlacedModel(torch.device("cpu"), torch.bfloat16)
    async with InferenceWorker(
        lambda: model, max_new_tokens=2, warm_up=False, command_whisper=source
    ) as worker:
        recogniser = worker._hear_commands
        assert isinstance(recogniser, CommandRecogniser)
        assert {p.dtype for p in recogniser.whisper.parameters()} == {torch.bfloat16}
        assert {p.device for p in recogniser.whisper.parameters()} == {torch.device("cpu")}
        # Packing asked for, but only float32 layers pack: a bf16 Whisper stays as it is.
        assert not any(isinstance(m, PackedLinear) for m in recogniser.whisper.modules())


def test_the_command_recogniser_goes_to_the_models_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import model.whisper

    seen: dict[str, Any] = {}

    def fake_load(source: str, **kwargs: Any) -> tuple[Any, Any]:
        seen.update(kwargs, source=source)
        return torch.nn.Linear(2, 2), None

    monkeypatch.setattr(model.whisper, "load_whisper", fake_load)
    with caplog.at_level(logging.INFO, logger="agent.runtime.worker"):
        CommandRecogniser("tiny.en", device=CUDA0, dtype=torch.float16, pack=True)
    assert seen == {"source": "tiny.en", "device": CUDA0, "dtype": torch.float16}
    assert "weight packing skipped on cuda:0" in caplog.text
    assert "Whisper from tiny.en on cuda:0 in float16" in caplog.text


# -- on a GPU (opt-in: pytest -m gpu) -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["trimmed", "official"])
def test_worker_on_cuda_answers_every_stream(mode: str) -> None:
    # Synchronous (asyncio.run): the GPU machine runs these without pytest-asyncio.
    import asyncio

    model = _loader("cuda", None, mode)()
    device, dtype = model_placement(model)
    assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    windows = [_window("a", 2.0, 1, "caption"), _window("b", 1.3, 2, "caption", "transcript")]
    outputs: list[Any] = []

    async def answer() -> Any:
        async with InferenceWorker(lambda: model, max_new_tokens=4) as worker:
            return await worker.run(windows, outputs.append)

    report = asyncio.run(answer())
    assert report.error is None
    assert report.finished == {r.key for w in windows for r in w.requests}
    tokens = model.encode_audio([w.audio for w in windows])
    assert tokens.embeds.device == device and tokens.embeds.dtype == dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whispers_fast_path_decodes_on_cuda() -> None:
    from model.tiny import tiny_random_sources
    from model.whisper import _greedy_decode, encode, load_whisper, whisper_features

    whisper, _ = load_whisper(tiny_random_sources()["whisper"], dtype=torch.float16, device="cuda")
    features, valid = whisper_features([_clip(1.5, 4), _clip(2.5, 5)], trimmed=True)
    hidden = encode(whisper.model.encoder, features, valid_frames=valid)
    assert hidden.device.type == "cuda" and hidden.dtype == torch.float16
    found = _greedy_decode(whisper, hidden, [50257, 50362], [3, 3])
    assert len(found) == 2 and all(len(ids) <= 3 for ids in found)
