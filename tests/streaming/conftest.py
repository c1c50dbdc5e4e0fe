"""Shared fixtures: generated scenes are cached per session (espeak-ng runs once per phrase)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

requires_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (apt install espeak-ng)"
)


def truncated_copy(path: Path, keep_fraction: float) -> Path:
    """A copy of ``path`` cut after ``keep_fraction`` of its bytes (``cut<suffix>`` beside it)."""
    data = path.read_bytes()
    out = path.with_name("cut" + path.suffix)
    out.write_bytes(data[: int(len(data) * keep_fraction)])
    return out
