"""Shared fixtures. Torch uses the machine's cores sparingly: tests run beside other work.

The report header names the CPU kernels this run uses (CI logs show which ran), and a kernel
request torch would ignore or could not honour stops the run before any test: `make test` runs
the model tests a second time on the portable kernels (see tests/README.md), and that run must
really use them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Environment variables that choose CPU kernels, read once per process by torch, oneDNN, MKL
#: and numpy: they must be set before the interpreter starts, not from a test.
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "NPY_DISABLE_CPU_FEATURES",
)

#: ATen's kernel sets on x86-64, weakest first; the values ATEN_CPU_CAPABILITY takes are their
#: lower-case names. torch warns about any other value and runs the best set instead.
ATEN_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def _cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", set()
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _best_capability(flags: set[str]) -> str | None:
    """The ATen kernel set torch picks on a CPU with these flags (its own test), None if unknown."""
    if not flags:
        return None
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT"


def _aten_capability() -> str:
    """The ATen kernel set of this process; a bad ATEN_CPU_CAPABILITY is a usage error."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capability = torch.backends.cpu.get_cpu_capability()
    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    if requested is None:
        return capability
    if requested.upper() != capability or caught:
        raise pytest.UsageError(
            f"ATEN_CPU_CAPABILITY={requested!r} but torch runs its {capability} kernels: torch "
            f"{torch.__version__} accepts only {', '.join(c.lower() for c in ATEN_CAPABILITIES)} "
            "on x86-64 and ignores anything else; set one of those or unset it"
        )
    best = _best_capability(_cpu_flags()[1])
    if best is not None and ATEN_CAPABILITIES.index(capability) > ATEN_CAPABILITIES.index(best):
        # torch does not check: the first such kernel would die of an illegal instruction.
        raise pytest.UsageError(
            f"ATEN_CPU_CAPABILITY={requested!r} asks for kernels this CPU lacks (best: "
            f"{best.lower()}); use default or a set up to {best.lower()}"
        )
    return capability


def _numpy_dispatch() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # pragma: no cover - numpy moved its private module
        return "unknown"
    enabled = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    return " ".join(enabled) or "baseline only"


_CAPABILITY_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Register the numerics marker; refuse a kernel request torch would silently ignore."""
    config.addinivalue_line(
        "markers",
        "numerics: asserts values that float kernels compute (goldens, tolerances, equal tokens "
        "from two computations); `make test` runs these again on the portable kernels",
    )
    config.stash[_CAPABILITY_KEY] = _aten_capability()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line: the kernels of this run, what the CPU could do best, and the variables set."""
    import torch

    model, flags = _cpu_flags()
    best = _best_capability(flags) or "unknown"
    settings = " ".join(f"{v}={os.environ[v]!r}" for v in KERNEL_VARIABLES if v in os.environ)
    return [
        f"kernels: torch {torch.__version__} ATen {config.stash[_CAPABILITY_KEY]} (best on this "
        f"CPU: {best}), numpy dispatch {_numpy_dispatch()}; {settings or 'no kernel variables set'}"
        f"; {model}, {os.cpu_count()} cores"
    ]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """With -q (as `make test` runs) pytest prints no header: repeat the kernels line here."""
    if config.get_verbosity() < 0:
        for line in pytest_report_header(config):
            terminalreporter.write_line(line)
