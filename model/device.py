"""Where a model runs and in which dtype: parsing the options, checking them, memory figures.

`resolve_device_dtype` is the one place that turns the user's strings (``--device``,
``--dtype``, TOML ``model.device`` / ``model.dtype``) into a `torch.device` and a `torch.dtype`,
and refuses what cannot work with a message that names the fix:

- ``device``: ``auto`` (the first CUDA GPU when torch sees one, else the CPU), ``cpu``,
  ``cuda`` (``cuda:0``) or ``cuda:N``;
- ``dtype``: ``float32``, ``bfloat16`` or ``float16`` (also ``fp32``, ``bf16``, ``fp16``), or
  None / ``auto`` for the device's default: float32 on the CPU (as before this option existed),
  bfloat16 on a GPU that supports it, float16 on one that does not.

Memory: `peak_host_bytes` (the process's peak resident set, from ``getrusage``) and
`memory_summary` (that, plus the CUDA allocator's peak and the device's free memory) are what
loading logs. `out_of_memory_as_error` and `check_fits` turn a load that cannot fit into a
`DeviceMemoryError` that says how much was needed against how much was free.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import sys
from collections.abc import Iterator

import torch
from torch import nn

from model.errors import DeviceError, DeviceMemoryError

logger = logging.getLogger(__name__)

GIB = 1024**3

#: Accepted dtype names (lower case) -> dtype. The first name of each dtype is its canonical one.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical option name of a dtype: ``float32``, ``bfloat16`` or ``float16``."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def _torch_build() -> str:
    """How messages name this torch build: its version, and its CUDA version if any."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__}" + (f" (CUDA {cuda})" if cuda else "")


def parse_device(spec: str | torch.device) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a `torch.device` that exists here.

    Raises:
        DeviceError: an unknown name, CUDA asked for where torch sees no GPU (a CPU build of
            torch, a missing driver or hidden devices), or a GPU index past the last one.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_INDEX.match(text)
    if text != "cuda" and match is None:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {str(spec)!r}")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise DeviceError(
                f"no CUDA device: {_torch_build()} is a CPU build; use --device cpu (or install "
                "a CUDA build of torch on a machine with an NVIDIA GPU)"
            )
        raise DeviceError(
            f"no CUDA device: {_torch_build()} sees no GPU (no driver, or CUDA_VISIBLE_DEVICES "
            "hides them); use --device cpu, or check nvidia-smi"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if match is None else int(match.group(1))
    if index >= count:
        raise DeviceError(
            f"device {text} asked for, but torch sees {count} GPU(s) (cuda:0"
            + (f" to cuda:{count - 1}" if count > 1 else "")
            + f"); use --device cuda:{count - 1} or lower"
        )
    return torch.device("cuda", index)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; on a GPU bfloat16 where it has bfloat16 units, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bf16_supported(device) else torch.float16
    return torch.float32


def _cuda_bf16_supported(device: torch.device) -> bool:
    # Emulated bf16 (pre-Ampere GPUs) runs through float32 units: slower than float16, so it
    # does not count as support here.
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the argument
            return bool(torch.cuda.is_bf16_supported())


def parse_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name (or None / ``auto`` for `default_dtype`) -> a dtype usable on ``device``.

    Raises:
        DeviceError: an unknown name, or a dtype the device cannot compute in (bfloat16 on a
            GPU without bfloat16 units; a dtype whose matrix product fails on the CPU).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return default_dtype(device)
    if isinstance(spec, torch.dtype):
        dtype = spec
        if dtype not in DTYPES.values():
            raise DeviceError(
                f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype_name(dtype)}"
            )
    else:
        key = spec.strip().lower()
        if key not in DTYPES:
            raise DeviceError(
                f"dtype must be one of {', '.join(DTYPE_CHOICES)} (or auto), not {spec!r}"
            )
        dtype = DTYPES[key]
    check_dtype(device, dtype)
    return dtype


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot run; warn about one that runs slowly.

    Raises:
        DeviceError: bfloat16 on a GPU without bfloat16 units, or a dtype whose matrix product
            or layer norm this torch build cannot run on the CPU.
    """
    if dtype == torch.float32:
        return
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not _cuda_bf16_supported(device):
            name = torch.cuda.get_device_name(device)
            major, minor = torch.cuda.get_device_capability(device)
            raise DeviceError(
                f"GPU {name} (compute capability {major}.{minor}) has no bfloat16 units "
                "(they start with 8.0, Ampere); use --dtype float16 (or float32)"
            )
        return
    if device.type == "cpu":
        try:
            _probe(device, dtype)
        except RuntimeError as exc:
            raise DeviceError(
                f"{dtype_name(dtype)} does not run on the CPU with {_torch_build()} ({exc}); "
                "use --dtype float32 (or bfloat16)"
            ) from exc
        if dtype == torch.float16:
            logger.warning(
                "float16 on the CPU: most CPUs have no float16 arithmetic, so torch converts "
                "every product and it runs slowly; bfloat16 or float32 is faster"
            )


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """The operations every part of the model needs, tried once in ``dtype``."""
    x = torch.ones(2, 8, device=device, dtype=dtype)
    _ = x @ x.T
    _ = nn.functional.layer_norm(x, (8,))
    _ = nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])


def resolve_device_dtype(
    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Parse and check the device and dtype options, once, before anything loads.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a `torch.device`).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (aliases ``fp32``, ``bf16``,
            ``fp16``; or a `torch.dtype`); None or ``auto``: float32 on the CPU, bfloat16 on a
            GPU with bfloat16 units, else float16.

    Returns:
        ``(device, dtype)``; a CUDA device always carries its index (``cuda:0``).

    Raises:
        DeviceError: the option is unknown or cannot work here; the message names the fix.
    """
    resolved = parse_device(device)
    return resolved, parse_dtype(dtype, resolved)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def format_bytes(size: int) -> str:
    """``1.23 GiB`` from 1 GiB up, ``12.3 MiB`` below."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def peak_host_bytes() -> int:
    """The process's peak resident set so far, in bytes (``getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB


def device_free_total(device: torch.device) -> tuple[int, int] | None:
    """Free and total bytes of a CUDA device (whatever holds them); None for the CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def memory_summary(device: torch.device) -> str:
    """One line: peak host memory and, on CUDA, the allocator's peak and the device's free."""
    parts = [f"peak host memory {format_bytes(peak_host_bytes())} (resident set)"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        free_total = device_free_total(device)
        parts.append(f"{device} peak {format_bytes(peak)} allocated")
        if free_total is not None:
            free, total = free_total
            parts.append(f"{free / GIB:.2f} GiB free of {total / GIB:.2f} GiB")
    return ", ".join(parts)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on the meta device)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_fits(device: torch.device, what: str, needed_bytes: int) -> None:
    """Before a load: refuse one whose weights alone exceed the device's free memory.

    Raises:
        DeviceMemoryError: on CUDA, ``needed_bytes`` is more than is free.
    """
    free_total = device_free_total(device)
    if free_total is None:
        return
    free, total = free_total
    if needed_bytes > free:
        raise DeviceMemoryError(_memory_message(device, what, needed_bytes, free, total))


@contextlib.contextmanager
def out_of_memory_as_error(
    device: torch.device, what: str, needed_bytes: int | None = None
) -> Iterator[None]:
    """Turn CUDA running out of memory inside the block into a `DeviceMemoryError`.

    Args:
        device: where the block allocates.
        what: what is being loaded, for the message ("the LLM /models/vicuna-13b").
        needed_bytes: the weights' size if known, for the message.

    Raises:
        DeviceMemoryError: the block raised `torch.cuda.OutOfMemoryError`.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        free, total = 0, 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free_total = device_free_total(device)
            if free_total is not None:
                free, total = free_total
        raise DeviceMemoryError(
            _memory_message(device, what, needed_bytes, free, total) + f" (torch: {exc})"
        ) from exc


def _memory_message(
    device: torch.device, what: str, needed: int | None, free: int, total: int
) -> str:
    need = f"about {needed / GIB:.1f} GiB" if needed is not None else "more than is free"
    return (
        f"not enough memory on {device} for {what}: it needs {need}, {free / GIB:.1f} GiB of "
        f"{total / GIB:.1f} GiB is free; free the GPU from other processes, use a smaller "
        "dtype (--dtype bfloat16 or float16), a smaller model (salmonn-7b), a GPU with more "
        "memory, or --device cpu"
    )
