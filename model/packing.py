"""Faster CPU inference for the decoders' linear layers: weights pre-packed for oneDNN.

Token-by-token decoding multiplies a few rows (one per batch row) by every weight matrix of the
model, once per token. On x86 CPUs torch sends those small products to MKL's sgemm, which is
slow at that shape on some CPUs (on the 2-core AMD EPYC VM of BENCHMARKS.md, 8 rows x the
576 x 1536 SmolLM2 projection took 318 us in MKL and 189 us from a pre-packed oneDNN weight;
the 49k-row output head 22 ms against 8 ms). `pack_linears` swaps a module's `torch.nn.Linear`
layers for `PackedLinear`, which keeps the original weight (state dicts, tied embeddings and
training see no change) plus a oneDNN-packed copy used for inference with few rows. The math
is the same float32 product; only the order of the additions differs.

It is an inference-time step (`Salmonn.pack_for_inference`, the agent's worker, ``eval``), never
part of a checkpoint. LoRA matrices are left alone so ``load_checkpoint`` and the LoRA scale
keep working.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Inputs with more rows than this (a prefill, an encoder pass) keep the plain product: the
#: packed weight only pays off for the few rows of a decoding step.
PACKED_MAX_ROWS = 32


def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops `PackedLinear` needs."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(torch.nn.Module):
    """A `torch.nn.Linear` whose weight also lives pre-packed for oneDNN.

    The original ``weight`` and ``bias`` stay registered (same parameters, same state-dict
    keys). The packed copy is used only without autograd and for at most `PACKED_MAX_ROWS`
    rows; anything else takes `torch.nn.functional.linear` on the original weight.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach().float().contiguous(), 8
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            rows > PACKED_MAX_ROWS
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return torch.nn.functional.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self._packed, bias, "none", [], ""
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=True"


def pack_linears(module: torch.nn.Module, *, skip: tuple[str, ...] = ("lora_",)) -> int:
    """Replace every float32 CPU `torch.nn.Linear` under ``module`` by a `PackedLinear`.

    Args:
        module: the module to change in place.
        skip: layers whose dotted name contains one of these strings stay as they are (LoRA
            matrices by default: they are trained and reloaded).

    Returns:
        How many layers were packed (0 when `packing_available` is false).
    """
    if not packing_available():
        logger.info("oneDNN packing unavailable in this torch build: linear layers unchanged")
        return 0
    targets = [
        name
        for name, child in module.named_modules()
        if type(child) is torch.nn.Linear
        and child.weight.dtype == torch.float32
        and child.weight.device.type == "cpu"
        and not any(s in name for s in skip)
    ]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, PackedLinear(getattr(parent, attr)))
    return len(targets)
