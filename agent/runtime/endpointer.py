"""`Endpointer`: early command endpointing for one stream (``model.early_command_ms``), Sans-I/O.

A robot told "stop" should not wait the segmenter's whole ``vad.end_silence_ms`` of silence to
be sure the speaker has finished. So while a speech segment is still open, once it has been
quiet for half of ``early_command_ms`` its command is read early (a command-only window; not
while other windows wait for the worker, behind which it would only queue: a batch that is
merely running answers it between two of its tokens), and once it has been quiet for the
whole pause an answer that is a command is emitted at once. Speech resuming first makes the
answer stale; the segment's own window then reads it all. An answer that is no command is
held: it becomes the segment's command if nothing more is said.

The class only decides. The stream (`agent.runtime.pipeline.StreamHandle`) feeds it what
happened and acts on what it returns, in the manner of a Sans-I/O protocol:

* after each block, `block(open_segment, ...)` returns `Ask` (make an early window of these
  samples, then `asked`), `Emit` (emit this answer now as an early command) or None;
* each answer of an early window goes to `answer`, which returns ``"early"`` (emit it now as an
  early command), ``"segment"`` (emit it as the command of its segment, which has ended since)
  or None (do not emit it);
* at each segment end, `segment_ended` returns a `Settled`: where the segment's own command
  audio starts, an early read of the whole segment (its transcript), an answer to emit now;
* an early window that got no answer goes to `failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.intents import intent_from_transcript
from agent.runtime.worker import Final, Window
from streaming.events import SegmentKind
from streaming.pcm import SAMPLE_RATE_HZ

if TYPE_CHECKING:
    from streaming.segmenter import OpenSegment

#: Intents that never end an utterance early: the speaker may still be talking.
NOT_A_COMMAND = ("none", "question")
#: Shortest audio an early command is read from, seconds.
MIN_EARLY_S = 0.2

Verdict = Literal["early", "segment"] | None


@dataclass(frozen=True)
class Ask:
    """Read the command of samples ``[start_sample, end_sample)`` of the stream early: make
    a command-only window of them and hand it to `Endpointer.asked` (or make none)."""

    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class Emit:
    """Emit ``answer`` now as an early command: its segment has been quiet long enough."""

    answer: Final


@dataclass(frozen=True)
class Settled:
    """What became of the early reads at a segment's end.

    Attributes:
        command_from: Where the segment's own command audio starts; None: its command was,
            or is being, answered early (the segment's window asks for none).
        heard: An early read of exactly the whole segment, if there is one (its text is the
            segment's transcript).
        emit: An early answer to emit now as the segment's command (not early), or None.
    """

    command_from: int | None
    heard: Final | None = None
    emit: Final | None = None


class _Speculation:
    """An early command window about the open segment: running, or answered (``result``).
    An answer that is a command waits for the whole pause (``is_command``); one that is not
    is held: it becomes the segment's command if nothing more is said."""

    def __init__(self, window: Window, start_sample: int, end_sample: int) -> None:
        self.window = window
        self.start_sample = start_sample
        self.end_sample = end_sample
        self.result: Final | None = None
        self.is_command = False


class Endpointer:
    """The early-command state of one stream (see the module docstring).

    Args:
        early_samples: The pause after which a command is emitted, in samples
            (``model.early_command_ms`` on the stream clock); 0 turns early reads off.
    """

    def __init__(self, early_samples: int) -> None:
        self.early_samples = early_samples
        # Whisper is asked halfway through the pause, so its answer is ready when the pause
        # is long enough; speech resuming before then makes the answer stale.
        self.ask_samples = early_samples // 2
        self._min_samples = MIN_EARLY_S * SAMPLE_RATE_HZ
        self._early: _Speculation | None = None
        self._committed: _Speculation | None = None  # the open segment's latest early command
        # What to do with the answers of early windows whose segment ended while they ran
        # (window id -> emit it as the segment's command).
        self._fate: dict[str, bool] = {}
        self._command_from = 0  # where the next command's audio starts (after an early one)
        self._asked_end = -1  # how far the open segment was asked about

    @property
    def enabled(self) -> bool:
        """True when early reads are on (a pause is set and the stream asks for commands)."""
        return self.early_samples > 0

    def block(
        self, segment: OpenSegment | None, samples_pushed: int, *, busy: bool
    ) -> Ask | Emit | None:
        """After a block: what to do about the open segment.

        Args:
            segment: The segmenter's open segment (`Segmenter.open_segment`), or None.
            samples_pushed: The stream clock (`Segmenter.samples_pushed`).
            busy: Windows wait for the worker, not yet answered (no early read then: it would
                queue behind them; a running batch alone answers one in its fast lane).
        """
        early = self._early
        if early is not None and early.result is None:
            return None  # one at a time: its answer decides where the next one starts
        if early is not None and early.is_command:
            if segment is not None and segment.end_sample == early.end_sample:
                if segment.silence_samples >= self.early_samples:
                    return Emit(self._commit(early))
                return None
            self._early = None  # speech went on: the segment's own window reads it all
        if (
            segment is None
            or segment.kind != SegmentKind.SPEECH
            or segment.silence_samples < self.ask_samples
            or segment.end_sample > samples_pushed  # post-roll not heard yet
            or segment.end_sample <= self._asked_end  # nothing new since the last ask
        ):
            return None
        if busy:
            return None  # asked again at the next block
        self._asked_end = segment.end_sample
        start = max(segment.start_sample, self._command_from)
        if segment.end_sample - start < self._min_samples:
            return None
        return Ask(start, segment.end_sample)

    def asked(self, window: Window, start_sample: int, end_sample: int) -> None:
        """The early window made for an `Ask` goes to the worker; its answer comes to `answer`."""
        self._early = _Speculation(window, start_sample, end_sample)

    def answer(self, output: Final, segment: OpenSegment | None) -> Verdict:
        """The answer of an early window: ``"early"`` (a command, to emit now as early; it is
        counted as committed), ``"segment"`` (the command of a segment that has since ended
        with nothing more said) or None (not to emit).

        Args:
            output: The answer.
            segment: The segmenter's open segment now.
        """
        window = output.window
        if window.id in self._fate:
            return "segment" if self._fate.pop(window.id) else None
        early = self._early
        if early is None or early.window is not window:
            return None
        early.result = output
        # A command said in another language is read from its English translation.
        heard = output.english or output.text
        early.is_command = intent_from_transcript(heard).get("intent") not in NOT_A_COMMAND
        if (
            early.is_command
            and segment is not None
            and segment.end_sample == early.end_sample
            and segment.silence_samples >= self.early_samples
        ):
            self._commit(early)
            return "early"
        # A command not quiet long enough yet: `block` emits it when it is, unless speech
        # resumes first. Nor is an answer that is no command emitted yet: the speaker may go
        # on; it becomes the segment's command if nothing more is said.
        return None

    def _commit(self, early: _Speculation) -> Final:
        """An early command is emitted: the segment's speech after it is the next command."""
        assert early.result is not None
        self._command_from = early.end_sample
        self._early = None
        self._committed = early
        return early.result

    def segment_ended(self, start_sample: int, end_sample: int, *, asks_command: bool) -> Settled:
        """A segment ``[start_sample, end_sample)`` ended: settle the early reads about it.

        Args:
            start_sample: Its start on the stream clock.
            end_sample: Its end.
            asks_command: Its kind is asked for a command (it is speech).
        """
        early, self._early = self._early, None
        committed, self._committed = self._committed, None
        command_from = max(start_sample, self._command_from)
        committed_all = self._command_from >= end_sample
        self._command_from = 0
        nothing_new = early is not None and end_sample <= early.end_sample
        if not asks_command:
            # The segment turned out not to be speech: no command, no transcript from a read.
            if early is not None and early.result is None:
                self._fate[early.window.id] = False
            return Settled(command_from)
        if early is not None and early.result is None:  # still running: decide its fate
            self._fate[early.window.id] = nothing_new
            return Settled(None if nothing_new else command_from)
        if early is not None and early.result is not None and nothing_new:
            # Its answer is the segment's command.
            whole = early.start_sample <= start_sample
            return Settled(None, early.result if whole else None, emit=early.result)
        if committed_all:
            whole = committed is not None and committed.start_sample <= start_sample
            return Settled(None, committed.result if whole and committed is not None else None)
        return Settled(command_from)

    def failed(self, window: Window) -> None:
        """An early window got no answer (the model failed, or shutdown cut it)."""
        self._fate.pop(window.id, None)
        if self._early is not None and self._early.window is window:
            self._early = None
