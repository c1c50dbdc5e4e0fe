"""Shared fixtures: generated scenes are cached per session (espeak-ng runs once per phrase)."""

from __future__ import annotations

import shutil

import pytest

requires_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs the espeak-ng program (apt install espeak-ng)"
)
