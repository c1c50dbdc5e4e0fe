"""Console streams that never raise or block, and progress bars only on a terminal.

Why: a reader of stderr or stdout can go away at any time (a supervisor restarting, an ssh
session closing, ``2>&1 | head -1``). A write then fails with `BrokenPipeError` (or `OSError`
EIO on a hung-up terminal), and the writer may not survive it: tqdm, for one, leaves its global
write lock held when a bar's write raises, and the next bar's ``__del__`` (during garbage
collection, on any thread) waits for that lock forever.

`install` replaces ``sys.stdout`` and ``sys.stderr`` with `GuardedStream`s. The first failed
write marks the stream broken, points its file descriptor at ``/dev/null`` (so C-level writes
and the interpreter's final flush succeed too) and drops every later write. A broken stdout
logs one warning (to stderr); a broken stderr logs nothing (there is nowhere left to say it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO, cast

logger = logging.getLogger(__name__)


class GuardedStream:
    """A text stream whose ``write`` and ``flush`` never raise.

    Args:
        stream: The stream to write to (``sys.stdout`` or ``sys.stderr``).
        name: ``stdout`` or ``stderr``, for the one warning a break gives.
        warn: Log a warning when the stream breaks (False for stderr: logs go there).

    Attributes:
        broken: True once a write or flush failed; every later write is dropped.
    """

    def __init__(self, stream: TextIO, name: str, *, warn: bool) -> None:
        self.stream = stream
        self.name = name
        self.warn = warn
        self.broken = False

    def write(self, text: str) -> int:
        """Write ``text``; returns its length even when it was dropped."""
        if not self.broken:
            try:
                self.stream.write(text)
            except BlockingIOError:
                pass  # a non-blocking pipe that is full: drop this write, never wait
            except (OSError, ValueError) as exc:  # ValueError: the file object was closed
                self._break(exc)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """Write each of ``lines``."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush, unless broken."""
        if not self.broken:
            try:
                self.stream.flush()
            except BlockingIOError:
                pass
            except (OSError, ValueError) as exc:
                self._break(exc)

    def isatty(self) -> bool:
        """Whether the stream is a terminal (False once broken)."""
        if self.broken:
            return False
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        # fileno, encoding, errors, buffer, ...: what faulthandler, tqdm and logging look up.
        return getattr(self.stream, name)

    def _break(self, exc: BaseException) -> None:
        # Set first: the warning below must not come back here (no loop, no recursion).
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = self.stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        if self.warn:
            logger.warning(
                "%s is closed (%s: its reader went away): console output stops",
                self.name,
                type(exc).__name__,
            )


def stream_broken(stream: object) -> bool:
    """Whether ``stream`` is a `GuardedStream` whose reader went away."""
    return isinstance(stream, GuardedStream) and stream.broken


def install() -> None:
    """Guard ``sys.stdout`` and ``sys.stderr`` (idempotent), and turn library progress bars
    off unless stderr is a terminal.

    Call before the first import of tqdm, transformers or huggingface_hub: their switches are
    environment variables read at import (already imported ones are switched off directly).
    """
    if not isinstance(sys.stderr, GuardedStream):
        sys.stderr = cast(TextIO, GuardedStream(sys.stderr, "stderr", warn=False))
    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = cast(TextIO, GuardedStream(sys.stdout, "stdout", warn=True))
    if sys.stderr.isatty():
        return
    # tqdm reads TQDM_* overrides of its defaults (here: disable=True), and huggingface_hub
    # (transformers' weight-loading bars go through it) HF_HUB_DISABLE_PROGRESS_BARS.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
