"""agent/runtime/window_queue.py: the drop policy and the counts, driven directly (no asyncio,
no model): what is dropped, what a batch holds, when a stream has room."""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtime.window_queue import SHED_KINDS, Drop, WindowQueue, no_drops, shed_kind
from agent.runtime.worker import Request, Window

_numbers: dict[str, int] = {}


def window(stream: str = "s", kind: str = "speech", *, early: bool = False) -> Window:
    """A window of ``stream``, numbered in the order made."""
    n = _numbers.get(stream, 0)
    _numbers[stream] = n + 1
    wid = f"{stream}:{n}"
    return Window(
        id=wid,
        stream=stream,
        kind=kind,
        audio=np.zeros(160, np.float32),
        start_s=float(n),
        end_s=n + 0.5,
        captured=0.0,
        segment_end=0.0,
        requests=(Request(f"{wid}/command", "command", "What is the command?", engine="whisper"),),
        early=early,
    )


def ids(windows: tuple[Window, ...] | list[Window]) -> list[str]:
    return [w.id for w in windows]


def test_a_queue_under_its_bound_drops_nothing_and_says_when_a_batch_is_ready() -> None:
    queue = WindowQueue(bound=3, max_batch=4)
    queue.open("a", "drop_oldest")
    queue.open("b", "drop_oldest")
    offers = [queue.offer(w) for w in (window("a"), window("a"), window("b"), window("b"))]
    assert [o.dropped for o in offers] == [None] * 4
    assert [o.batch_ready for o in offers] == [False, False, False, True]  # 4 waiting, all streams
    assert queue.pending_total == 4 and queue.has_room("a") and queue.has_room("b")


def test_a_full_drop_oldest_stream_drops_its_oldest_ambient_window_first() -> None:
    queue = WindowQueue(bound=3, max_batch=8)
    queue.open("s", "drop_oldest")
    first, ambient, third = window("s"), window("s", "ambient"), window("s")
    for w in (first, ambient, third):
        assert queue.offer(w).dropped is None
    assert not queue.has_room("s")
    fourth = window("s")
    offer = queue.offer(fourth)
    assert offer.dropped == Drop(ambient, waiting=2)  # the two left, before the new one joined
    assert ids(queue.waiting("s")) == ids([first, third, fourth])
    # No ambient window left: the oldest goes.
    offer = queue.offer(fifth := window("s"))
    assert offer.dropped is not None and offer.dropped.window is first
    assert ids(queue.waiting("s")) == ids([third, fourth, fifth])


def test_an_early_command_read_is_never_dropped_even_if_the_queue_grows_past_its_bound() -> None:
    queue = WindowQueue(bound=1, max_batch=8)
    queue.open("s", "drop_oldest")
    early = window("s", early=True)
    queue.offer(early)
    late = window("s")
    assert queue.offer(late).dropped is None  # nothing droppable: one more than the bound
    assert ids(queue.waiting("s")) == ids([early, late])
    # Next time the older ordinary window goes, the early read stays.
    newest = window("s", "ambient")
    offer = queue.offer(newest)
    assert offer.dropped is not None and offer.dropped.window is late
    assert offer.dropped.waiting == 1
    assert ids(queue.waiting("s")) == ids([early, newest])


def test_a_backpressure_stream_drops_nothing_and_has_no_room_until_windows_are_taken() -> None:
    queue = WindowQueue(bound=2, max_batch=1)
    queue.open("file", "backpressure")
    for _ in range(3):
        assert queue.offer(window("file")).dropped is None
    assert queue.pending_total == 3 and not queue.has_room("file")
    taken = queue.take_batch()
    assert len(taken) == 1 and not queue.has_room("file")  # still 2 waiting
    queue.take_batch()
    assert queue.has_room("file") and queue.in_flight("file") == 2


def test_batches_take_the_oldest_windows_of_all_streams_and_count_them_in_flight() -> None:
    queue = WindowQueue(bound=8, max_batch=3)
    queue.open("a", "drop_oldest")
    queue.open("b", "drop_oldest")
    made = [window("a"), window("b"), window("a"), window("b"), window("b")]
    for w in made:
        queue.offer(w)
    first = queue.take_batch()
    assert ids(first) == ids(made[:3])
    assert (queue.in_flight("a"), queue.in_flight("b")) == (2, 1)
    assert ids(queue.take_batch()) == ids(made[3:])
    assert queue.take_batch() == [] and queue.pending_total == 0
    for w in first:
        queue.finished(w)
    assert (queue.in_flight("a"), queue.in_flight("b")) == (0, 2)


def test_a_fast_lane_window_is_in_flight_without_a_place_in_the_queue() -> None:
    queue = WindowQueue(bound=1, max_batch=8)
    queue.open("s", "drop_oldest")
    waiting = window("s")
    queue.offer(waiting)
    fast = window("s")
    queue.started(fast)
    assert queue.in_flight("s") == 1 and ids(queue.waiting("s")) == [waiting.id]
    queue.finished(fast)
    assert queue.in_flight("s") == 0


def test_every_waiting_window_in_stream_order_then_cleared_at_shutdown() -> None:
    queue = WindowQueue(bound=8, max_batch=8)
    queue.open("b", "drop_oldest")
    queue.open("a", "drop_oldest")
    a0, b0, a1 = window("a"), window("b"), window("a")
    for w in (a0, b0, a1):
        queue.offer(w)
    assert ids(queue.waiting()) == ids([b0, a0, a1])  # streams in the order they opened
    queue.clear()
    assert queue.waiting() == () and queue.pending_total == 0 and queue.has_room("a")


def test_a_stream_opens_once_and_is_forgotten_on_close() -> None:
    queue = WindowQueue(bound=2, max_batch=2)
    queue.open("s", "drop_oldest")
    with pytest.raises(ValueError, match="already"):
        queue.open("s", "backpressure")
    queue.close("s")
    assert queue.in_flight("s") == 0 and queue.waiting("s") == () and queue.has_room("s")
    queue.open("s", "backpressure")  # a new stream of the same id
    with pytest.raises(KeyError):
        queue.offer(window("unknown"))


def tasked(*tasks: str, stream: str = "s", kind: str = "sound") -> Window:
    """A window asking for ``tasks`` (``caption``, ``answer``, ``transcript``, ``command``)."""
    base = window(stream, kind)
    requests = tuple(Request(f"{base.id}/{t}", t, "?") for t in tasks)
    return Window(**{**base.__dict__, "requests": requests})


def test_overload_sheds_captions_first_then_transcripts_and_commands_last() -> None:
    queue = WindowQueue(bound=3, max_batch=8)
    queue.open("s", "drop_oldest")
    command = tasked("transcript", "command", kind="speech")
    transcript = tasked("transcript", "caption", kind="mixed")
    caption = tasked("caption")
    for w in (command, transcript, caption):
        assert queue.offer(w).dropped is None
    # Full: a new command sheds the caption, though it is the newest waiting window.
    second = tasked("transcript", "command", kind="speech")
    assert queue.offer(second).dropped.window is caption  # type: ignore[union-attr]
    # Then the transcript, not the older command.
    third = tasked("transcript", "command", kind="speech")
    assert queue.offer(third).dropped.window is transcript  # type: ignore[union-attr]
    # Only commands wait: a caption arriving is itself shed and never joins the queue.
    late = tasked("caption", "answer")
    offer = queue.offer(late)
    assert offer.dropped is not None and offer.dropped.window is late
    assert ids(queue.waiting("s")) == ids([command, second, third])
    # A command arriving at a queue of commands sheds the oldest one.
    fourth = tasked("command", kind="speech")
    assert queue.offer(fourth).dropped.window is command  # type: ignore[union-attr]
    assert ids(queue.waiting("s")) == ids([second, third, fourth])


def test_a_shed_window_counts_as_its_best_task() -> None:
    assert shed_kind(tasked("transcript", "command", kind="speech")) == "command"
    assert shed_kind(tasked("caption", "transcript", kind="mixed")) == "transcript"
    assert shed_kind(tasked("answer", "caption")) == "caption"
    assert shed_kind(tasked("answer", kind="ambient")) == "answer"
    assert shed_kind(tasked()) == "answer"  # nothing asked: worth the least
    assert list(no_drops()) == list(SHED_KINDS) and set(no_drops().values()) == {0}


def test_drops_counted_per_kind_and_stream_leave_commands_at_zero_while_others_wait() -> None:
    """Two full streams offered a steady mix: each drop's kind, tallied per stream, has no
    command while a caption or transcript could go, and the queue keeps every command."""
    queue = WindowQueue(bound=2, max_batch=8)
    counts = {s: no_drops() for s in ("a", "b")}
    commands: dict[str, list[Window]] = {"a": [], "b": []}
    for stream in counts:
        queue.open(stream, "drop_oldest")
    for _ in range(2):
        for stream in counts:
            for made in (
                tasked("caption", "answer", stream=stream),
                tasked("transcript", stream=stream, kind="speech"),
                tasked("transcript", "command", stream=stream, kind="speech"),
            ):
                if "command" in {r.task for r in made.requests}:
                    commands[stream].append(made)
                offer = queue.offer(made)
                if offer.dropped is not None:
                    counts[offer.dropped.window.stream][offer.dropped.kind] += 1
    # Each stream: 6 offered, 2 kept (its two commands), 4 shed: 2 captions, 2 transcripts.
    expected = {"command": 0, "transcript": 2, "caption": 2, "answer": 0}
    assert counts == {"a": expected, "b": expected}
    for stream, made in commands.items():
        assert ids(queue.waiting(stream)) == ids(made)
