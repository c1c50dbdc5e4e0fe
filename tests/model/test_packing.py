"""oneDNN-packed linear layers for CPU decoding: same numbers, same answers, training intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.packing import PACKED_MAX_ROWS, PackedLinear, pack_linears, packing_available
from model.presets import resolve_model
from model.salmonn import Salmonn
from tests.model.greedy import assert_decisive
from tests.model.test_salmonn import sharp_model

pytestmark = [
    pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN"),
    pytest.mark.numerics,  # oneDNN against MKL: run on two kernel sets (tests/README.md)
]

SR = 16000


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 48), (2, 5, 48), (1, 1, 48), (PACKED_MAX_ROWS + 4, 48)])
def test_packed_linear_matches_the_plain_product(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40, bias=bias)
    packed = PackedLinear(plain)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
        # a non-contiguous view (a slice along the sequence) as well
        if x.dim() == 3 and x.shape[1] > 2:
            view = x[:, 1:3]
            torch.testing.assert_close(packed(view), plain(view), rtol=1e-5, atol=1e-5)


def test_packed_linear_still_trains() -> None:
    """With autograd on, the original weight is used: gradients reach input and weight."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 8)
    packed = PackedLinear(plain)
    x = torch.randn(4, 16, requires_grad=True)
    packed(x).square().sum().backward()
    assert packed.weight is plain.weight
    assert plain.weight.grad is not None and x.grad is not None
    expected = torch.autograd.grad(plain(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_pack_linears_skips_lora_and_keeps_the_state_dict() -> None:
    model = Salmonn.from_config(resolve_model("tiny-random"))
    before = {k: v.clone() for k, v in model.llama_model.state_dict().items()}
    packed = pack_linears(model.llama_model)
    assert packed > 0
    names = {n for n, m in model.llama_model.named_modules() if isinstance(m, PackedLinear)}
    assert names and not any("lora_" in n for n in names)
    assert any(isinstance(m, torch.nn.Linear) for n, m in model.llama_model.named_modules()
               if "lora_A" in n)  # fmt: skip
    after = model.llama_model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert pack_linears(model.llama_model) == 0  # already packed: nothing left to do


def _sharp_model() -> Salmonn:
    """test_salmonn's audio-dependent tiny model, with LoRA B non-zero so the scale matters."""
    model = sharp_model()
    with torch.no_grad():
        for name, param in model.llama_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    t = np.arange(2 * SR) / SR
    return [
        (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        for f in (220.0, 660.0, 1500.0)
    ]


def test_packed_model_answers_exactly_as_before_and_lora_stays_live() -> None:
    model = _sharp_model()
    clips = _clips()

    def answers(scale: float | None = None) -> list[list[int]]:
        tokens = model.encode_audio(clips)
        rows = [tokens.row(i) for i in range(len(clips))]
        out = model.generate_from_tokens(
            rows, ["Describe the audio."] * len(rows), max_new_tokens=8, lora_scale=scale
        )
        return [g.token_ids for g in out]

    plain, plain_half = answers(), answers(0.5)
    assert len({tuple(a) for a in plain}) > 1, "fixture too weak: every clip answered alike"
    assert plain != plain_half, "fixture too weak: the LoRA scale changes nothing"
    # oneDNN's packed product rounds differently from the plain one: equal answers need leads.
    tokens = model.encode_audio(clips)
    rows = [tokens.row(i) for i in range(len(clips))]
    instructions = ["Describe the audio."] * len(rows)
    assert_decisive(model, rows, instructions, plain, max_new_tokens=8)
    assert_decisive(model, rows, instructions, plain_half, max_new_tokens=8, lora_scale=0.5)

    assert model.pack_for_inference() > 0
    assert isinstance(model.whisper.proj_out, PackedLinear)  # the Whisper decoder's head too
    assert not any(isinstance(m, PackedLinear) for m in model.whisper.model.encoder.modules())
    assert answers() == plain
    assert answers(0.5) == plain_half
