"""Overload on purpose: the real agent on the tiny model, made slow by a gate the test holds,
with streams of commands, transcripts and captions far faster than it answers. The drop order
holds at every drop (no command shed while a caption or transcript waits in its stream; no
transcript while a caption does), no command window is ever lost, and the per-kind counts of
the stats match the ``window_dropped`` events one for one."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import Any

import numpy as np
import soundfile

from agent.config import PromptConfig, StreamConfig
from agent.runtime.app import run_agent
from agent.runtime.fanout import Published
from agent.runtime.window_queue import SHED_KINDS, shed_kind
from agent.runtime.window_sink import LocalWindows
from tests.agent.conftest import DEMO_WAV, TIMING, make_config

#: How much a kind is worth keeping (`agent.runtime.window_queue.shed_rank` by kind).
RANK = {"command": 2, "transcript": 1, "caption": 0, "answer": 0}
GATE_TIMEOUT_S = 60.0 * TIMING


class GatedModel:
    """The tiny model, except that while ``holding`` each batch waits at a gate until the
    test lets it through (`let_one_through`): the model is as slow as the test says."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.holding = False  # off during the worker's warm-up
        self._arrived = threading.Semaphore(0)  # a batch waits at the gate
        self._passes = threading.Semaphore(0)  # batches allowed through

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_audio(self, audio: Any) -> Any:
        """Every batch with LLM work starts here (`agent.runtime.worker.BatchRunner`)."""
        if self.holding:
            self._arrived.release()
            if not self._passes.acquire(timeout=GATE_TIMEOUT_S):
                raise TimeoutError("the test never let this batch through")
        return self._model.encode_audio(audio)

    async def let_one_through(self) -> None:
        """Wait until a batch is at the gate, then let it (only it) go on."""
        arrived = await asyncio.to_thread(self._arrived.acquire, True, GATE_TIMEOUT_S)
        assert arrived, "no batch reached the model"
        self._passes.release()

    def open(self) -> None:
        """Stop holding batches (and let one already waiting go)."""
        self.holding = False
        self._passes.release()


def settings(stream_id: str, **tasks: tuple[str, ...]) -> StreamConfig:
    """A ws stream asking ``tasks`` per window kind, with an ambient window every 4 s."""
    base = make_config().stream_settings(stream_id)
    return dataclasses.replace(
        base,
        prompts=dataclasses.replace(PromptConfig(), **tasks),
        vad=dataclasses.replace(base.vad, ambient_every_s=4.0),
    )


async def test_overload_sheds_captions_then_transcripts_and_never_a_command(
    tiny_model: Any,
) -> None:
    model = GatedModel(tiny_model)
    config = make_config(ws={"listen": "off"}, worker={"max_pending_windows": 2, "max_batch": 1})
    streams = [
        # Speech asks transcript and command (a command window), sounds a caption.
        settings("robot", speech=("transcript", "command"), sound=("caption",)),
        settings("notes", speech=("transcript",), sound=("caption",)),
        # Sounds ask for a transcript here only to put all three kinds in one queue.
        settings("all3", speech=("command",), sound=("transcript",), mixed=("transcript",)),
    ]
    audio, rate = soundfile.read(DEMO_WAV, dtype="float32")
    assert rate == 16000
    blocks = np.array_split(audio, int(audio.size / rate))  # about 1 s each

    async with run_agent(config, lambda: model) as agent:
        pipeline = agent.pipeline
        assert pipeline is not None and isinstance(pipeline.sink, LocalWindows)
        queue = pipeline.sink.queue
        sub = agent.bus.subscribe("test", 100_000)
        violations: list[str] = []

        def at_drop(item: Published) -> None:
            """On the publisher's stack, so the queue is as the drop left it."""
            data = item.data
            if data.get("status") != "window_dropped":
                return
            detail = data["detail"]
            for waiting in queue.waiting(data["stream"]):
                if not waiting.early and RANK[shed_kind(waiting)] < RANK[detail["kind"]]:
                    violations.append(
                        f"{detail['window']} ({detail['kind']}) shed before {waiting.id}"
                    )

        agent.bus.add_listener(at_drop)
        model.holding = True
        handles = [pipeline.open_stream(s, origin="test") for s in streams]
        for n, block in enumerate(blocks):
            for handle in handles:
                handle.push(block)
            # One batch per two seconds of three streams: far behind. (A window waiting is
            # a batch that will reach the gate: it has not been let through yet.)
            if n % 2 and queue.pending_total:
                await model.let_one_through()
        for handle in handles:
            handle.end()
        model.open()

        closed: dict[str, dict[str, Any]] = {}
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(120 * TIMING):
            async for item in sub:
                events.append(item.data)
                if item.data.get("status") == "stream_closed":
                    closed[item.data["stream"]] = item.data["detail"]
                    if len(closed) == len(streams):
                        break
        stats = pipeline.stats()

    assert violations == []
    statuses = collections.Counter(e.get("status") for e in events)
    assert statuses["window_failed"] == 0 and statuses["window_unfinished"] == 0
    drops = [e for e in events if e.get("status") == "window_dropped"]
    for stream, detail in closed.items():
        mine = [d["detail"] for d in drops if d["stream"] == stream]
        counted = collections.Counter(d["kind"] for d in mine)
        assert detail["dropped_by_kind"] == {k: counted[k] for k in SHED_KINDS}, stream
        assert detail["dropped"] == len(mine)
        assert detail["answered"] + detail["dropped"] == detail["windows"]
        for d in mine:  # the kind named is the best task among the requests that will not come
            tasks = {key.rsplit("/", 1)[1] for key in d["requests"]}
            assert d["kind"] == next(k for k in SHED_KINDS if k in tasks), d
        assert detail["dropped_by_kind"]["command"] == 0, stream
    # Others were shed, in every queue: the overload was real and the order was tested.
    assert all(closed[s]["dropped"] > 0 for s in closed)
    assert closed["all3"]["dropped_by_kind"]["caption"] > 0
    assert sum(closed[s]["dropped_by_kind"]["transcript"] for s in ("notes", "all3")) > 0
    totals = {k: sum(closed[s]["dropped_by_kind"][k] for s in closed) for k in SHED_KINDS}
    assert stats["dropped_by_kind"] == totals
    # Every command asked was answered: one final per speech segment of the streams asking
    # commands of speech.
    speech = [
        e
        for e in events
        if e.get("status") == "segment_ended"
        and e["stream"] in ("robot", "all3")
        and e["detail"]["segment"] == "speech"
    ]
    command_finals = [e for e in events if e.get("kind") == "command" and not e["partial"]]
    assert len(command_finals) == len({e["window"] for e in command_finals}) == len(speech) > 0
