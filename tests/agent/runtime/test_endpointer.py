"""agent/runtime/endpointer.py: the early command decisions, driven directly with synthetic open
segments and answers (no asyncio, no model, no segmenter): when an early read is asked for,
when an answer is emitted early, held, given to its segment, or dropped."""

from __future__ import annotations

import itertools

import numpy as np

from agent.runtime.endpointer import Ask, Emit, Endpointer, Settled
from agent.runtime.worker import Final, Request, Window
from streaming.events import SegmentKind
from streaming.segmenter import OpenSegment

EARLY = 4000  # 250 ms: asked after 2000 samples of quiet, emitted after 4000
_numbers = itertools.count()


def seg(start: int, end: int, silence: int, kind: SegmentKind = SegmentKind.SPEECH) -> OpenSegment:
    return OpenSegment(start_sample=start, end_sample=end, silence_samples=silence, kind=kind)


def heard_up_to(segment: OpenSegment) -> int:
    """The stream clock when ``segment`` is seen: its end plus its silence."""
    return segment.end_sample + segment.silence_samples


def early_window() -> Window:
    wid = f"s:{next(_numbers)}"
    request = Request(f"{wid}/command", "command", "What is the command?", engine="whisper")
    return Window(
        id=wid,
        stream="s",
        kind="speech",
        audio=np.zeros(160, np.float32),
        start_s=0.0,
        end_s=1.0,
        captured=0.0,
        segment_end=0.0,
        requests=(request,),
        early=True,
    )


def answer(window: Window, text: str) -> Final:
    return Final(window, window.requests[0], text, model_start=0.0, first_token=None, tokens=0)


def ask(endpointer: Endpointer, segment: OpenSegment) -> Window:
    """Step a block that must ask, and send the early window."""
    step = endpointer.block(segment, heard_up_to(segment), busy=False)
    assert isinstance(step, Ask), step
    window = early_window()
    endpointer.asked(window, step.start_sample, step.end_sample)
    return window


def test_off_without_a_pause() -> None:
    assert not Endpointer(0).enabled and Endpointer(EARLY).enabled


def test_a_read_is_asked_for_halfway_through_the_pause_once_per_end_on_an_idle_worker() -> None:
    e = Endpointer(EARLY)
    assert e.block(None, 100, busy=False) is None
    assert e.block(seg(0, 16000, 1999), 17999, busy=False) is None  # not quiet long enough
    sound = seg(0, 16000, 2000, SegmentKind.SOUND)
    assert e.block(sound, heard_up_to(sound), busy=False) is None  # no speech, no command
    assert e.block(seg(0, 16000, 2000), 15000, busy=False) is None  # post-roll not heard yet
    quiet = seg(0, 16000, 2000)
    assert e.block(quiet, heard_up_to(quiet), busy=True) is None  # the worker is busy
    assert e.block(quiet, heard_up_to(quiet), busy=False) == Ask(0, 16000)
    # Not sent (say it overlapped a speaker): nothing new to ask about until the sound goes on.
    quieter = seg(0, 16000, 3000)
    assert e.block(quieter, heard_up_to(quieter), busy=False) is None
    longer = seg(0, 20000, 2000)
    assert e.block(longer, heard_up_to(longer), busy=False) == Ask(0, 20000)


def test_audio_shorter_than_the_minimum_is_never_read_early() -> None:
    e = Endpointer(EARLY)
    short = seg(0, 3199, 2000)  # 0.2 s is 3200 samples
    assert e.block(short, heard_up_to(short), busy=False) is None
    just = seg(0, 3200, 2000)
    assert e.block(just, heard_up_to(just), busy=False) == Ask(0, 3200)


def test_one_read_at_a_time_while_its_answer_is_awaited() -> None:
    e = Endpointer(EARLY)
    ask(e, seg(0, 16000, 2000))
    later = seg(0, 24000, 2000)
    assert e.block(later, heard_up_to(later), busy=False) is None


def test_a_command_answered_after_the_whole_pause_is_emitted_at_once() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    stop = answer(window, "stop")
    assert e.answer(stop, seg(0, 16000, EARLY)) == "early"
    # The segment then ends with nothing more said: its command was answered, and the read of
    # the whole segment is its transcript too.
    assert e.segment_ended(0, 16000, asks_command=True) == Settled(None, heard=stop)
    # The next segment starts afresh.
    assert e.segment_ended(20000, 30000, asks_command=True) == Settled(20000)


def test_a_command_answered_early_waits_for_the_pause_then_the_rest_is_the_next_command() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    stop = answer(window, "Stop.")
    assert e.answer(stop, seg(0, 16000, 2500)) is None  # not quiet long enough yet
    waiting = seg(0, 16000, EARLY - 1)
    assert e.block(waiting, heard_up_to(waiting), busy=False) is None
    quiet = seg(0, 16000, EARLY)
    assert e.block(quiet, heard_up_to(quiet), busy=False) == Emit(stop)
    # Speech goes on after it: the next read starts where the command ended ...
    more = seg(0, 30000, 2000)
    assert e.block(more, heard_up_to(more), busy=False) == Ask(16000, 30000)
    # ... and if the segment ends before that read is sent, its own command starts there too.
    assert e.segment_ended(0, 34000, asks_command=True) == Settled(16000)


def test_speech_resuming_before_the_pause_makes_an_early_command_stale() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    assert e.answer(answer(window, "stop"), seg(0, 16000, 2500)) is None
    resumed = seg(0, 20000, 2000)
    assert e.block(resumed, heard_up_to(resumed), busy=False) == Ask(0, 20000)  # all of it


def test_an_answer_that_is_no_command_is_held_and_becomes_the_segments_if_nothing_follows() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    chat = answer(window, "the weather is nice")
    assert e.answer(chat, seg(0, 16000, EARLY)) is None
    assert e.segment_ended(0, 16000, asks_command=True) == Settled(None, heard=chat, emit=chat)


def test_a_held_answer_is_dropped_when_more_is_said() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    question = answer(window, "what time is it?")  # a question never ends an utterance early
    assert e.answer(question, seg(0, 16000, EARLY)) is None
    assert e.segment_ended(0, 22000, asks_command=True) == Settled(0)


def test_a_read_still_running_at_the_segment_end_answers_for_it_if_nothing_new_was_said() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    assert e.segment_ended(0, 16000, asks_command=True) == Settled(None)
    assert e.answer(answer(window, "the weather is nice"), None) == "segment"
    assert e.answer(answer(window, "again"), None) is None  # decided once


def test_a_read_still_running_when_more_was_said_or_no_speech_came_is_not_emitted() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    assert e.segment_ended(0, 20000, asks_command=True) == Settled(0)
    assert e.answer(answer(window, "stop"), None) is None
    window = ask(e, seg(30000, 46000, 2000))
    assert e.segment_ended(30000, 46000, asks_command=False) == Settled(30000)
    assert e.answer(answer(window, "stop"), None) is None


def test_a_failed_read_is_forgotten_and_the_next_end_is_asked_again() -> None:
    e = Endpointer(EARLY)
    window = ask(e, seg(0, 16000, 2000))
    e.failed(window)
    assert e.answer(answer(window, "stop"), seg(0, 16000, EARLY)) is None
    again = ask(e, seg(0, 18000, 2000))  # not stuck waiting for the failed one
    # One that fails after its segment ended is forgotten too: its answer is never emitted.
    assert e.segment_ended(0, 18000, asks_command=True) == Settled(None)
    e.failed(again)
    assert e.answer(answer(again, "stop"), None) is None


def test_a_read_after_an_early_command_is_not_the_whole_segments_transcript() -> None:
    e = Endpointer(EARLY)
    first = ask(e, seg(0, 16000, 2000))
    assert e.answer(answer(first, "stop"), seg(0, 16000, EARLY)) == "early"
    second = ask(e, seg(0, 30000, 2000))
    left = answer(second, "turn left")
    assert e.answer(left, seg(0, 30000, EARLY)) == "early"
    assert e.segment_ended(0, 30000, asks_command=True) == Settled(None)  # heard only a part
