"""`[model] command = "whisper"`: command intents read from Whisper's transcript."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.runtime.app import Agent
from agent.runtime.worker import BatchReport, Final, InferenceWorker, Request, Window
from tests.agent.conftest import (
    TIMING,
    FakeText,
    FakeTokenizer,
    FakeTokens,
    HeardModel,
    events_to_end,
    make_config,
)


async def test_whisper_commands_share_one_transcription_per_window(
    tiny_model: Any, clip_path: Path
) -> None:
    heard = HeardModel(tiny_model, "Turn left 90 degrees.")
    config = make_config(
        # Without early reads: each window is transcribed once, at its end.
        model={"transcript": "whisper", "command": "whisper", "early_command_ms": 0},
        streams=[{"id": "s", "source": f"file:{clip_path}"}],
        agent={"exit_at_end": True},
        ws={"listen": "off"},
    )
    events = await events_to_end(Agent(config, lambda: heard))
    commands = [e for e in events if e["kind"] == "command" and not e["partial"]]
    transcripts = [e for e in events if e["kind"] == "transcript" and not e["partial"]]
    assert commands and len(commands) == len(transcripts)
    for command in commands:
        assert command["source"] == "whisper"
        assert command["text"] == "Turn left 90 degrees."
        assert command["intent"] == {"intent": "turn", "direction": "left", "angle": 90}
    # One transcription per speech window serves both of its requests.
    assert sum(heard.calls) == len({c["window"] for c in commands})


class SlowLlmModel:
    """An LLM that pauses after its second token until the test lets it go on."""

    tokenizer = FakeTokenizer()

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.go_on = threading.Event()
        self.whisper_calls: list[int] = []

    def encode_audio(self, audio: list[np.ndarray]) -> FakeTokens:
        return FakeTokens()

    def generate_from_tokens(
        self,
        rows: list[Any],
        instructions: list[str],
        *,
        on_token: Any,
        max_new_tokens: int,
        **_: Any,
    ) -> list[FakeText]:
        for step in range(max_new_tokens):
            for row in range(len(rows)):
                on_token(row, 7)
            if step == 1:
                self.paused.set()
                assert self.go_on.wait(30)
        return [FakeText("x" * max_new_tokens) for _ in rows]

    def transcribe_with_whisper(self, audio: list[np.ndarray]) -> list[str]:
        self.whisper_calls.append(len(audio))
        return ["stop"] * len(audio)


def _window(n: int, engine: str) -> Window:
    task = "command" if engine == "whisper" else "caption"
    request = Request(key=f"s:{n}/{task}", task=task, instruction="?", engine=engine)  # type: ignore[arg-type]
    now = time.monotonic()
    return Window(
        id=f"s:{n}",
        stream="s",
        kind="speech" if engine == "whisper" else "sound",
        audio=np.zeros(16000, np.float32),
        start_s=float(n),
        end_s=n + 1.0,
        captured=now,
        segment_end=now,
        requests=(request,),
    )


@dataclass
class FastLaneRun:
    model: SlowLlmModel
    outputs: list[Any]
    done: list[BatchReport]
    report: BatchReport
    done_when_run_returned: int
    fast_windows: int

    @property
    def final_keys(self) -> list[str]:
        return [o.request.key for o in self.outputs if isinstance(o, Final)]


async def fast_lane_run(max_new_tokens: int, fast: list[int]) -> FastLaneRun:
    """An LLM batch for window 1 that pauses after its second token; meanwhile each window
    of ``fast`` is submitted to the fast lane on its own; then the batch goes on."""
    model = SlowLlmModel()
    outputs: list[Any] = []
    done: list[BatchReport] = []
    async with InferenceWorker(lambda: model, max_new_tokens=max_new_tokens, warm_up=False) as w:
        batch = asyncio.create_task(w.run([_window(1, "llm")], outputs.append))
        assert await asyncio.to_thread(model.paused.wait, 30 * TIMING)
        for n in fast:
            w.submit_fast([_window(n, "whisper")], outputs.append, done.append)
        model.go_on.set()
        report = await asyncio.wait_for(batch, 30 * TIMING)
        return FastLaneRun(model, outputs, done, report, len(done), w.fast_windows)


async def test_fast_lane_answers_whisper_work_between_tokens_of_a_running_batch() -> None:
    run = await fast_lane_run(6, [2])
    # The command came in after the caption's second token and was answered before its end.
    assert run.final_keys == ["s:2/command", "s:1/caption"]
    finals = [o for o in run.outputs if isinstance(o, Final)]
    assert [f.text for f in finals] == ["stop", "xxxxxx"]
    assert run.report.finished == {"s:1/caption"}
    assert [d.finished for d in run.done] == [{"s:2/command"}]
    assert run.fast_windows == 1


async def test_fast_lane_work_submitted_after_the_last_token_still_runs() -> None:
    # Two tokens: the model pauses after its last one, so no token hook runs after the submit.
    run = await fast_lane_run(2, [2])
    assert run.done_when_run_returned == 1  # run() returned only after the fast-lane item
    assert sorted(run.final_keys) == ["s:1/caption", "s:2/command"]


async def test_fast_lane_items_waiting_together_share_one_transcription() -> None:
    run = await fast_lane_run(6, [2, 3, 4])  # three streams' commands, submitted separately
    assert run.model.whisper_calls == [3]
    # Each submitter hears only about its own window.
    assert [d.finished for d in run.done] == [{"s:2/command"}, {"s:3/command"}, {"s:4/command"}]
    assert run.final_keys[:3] == ["s:2/command", "s:3/command", "s:4/command"]
    finals = [o for o in run.outputs if isinstance(o, Final)]
    assert [f.text for f in finals] == ["stop"] * 3 + ["xxxxxx"]


def test_command_requests_go_to_the_command_recogniser() -> None:
    from agent.runtime.worker import BatchRunner

    model = SlowLlmModel()  # its own Whisper hears "stop"
    heard_by_recogniser: list[int] = []

    def recogniser(audio: list[np.ndarray]) -> list[str]:
        heard_by_recogniser.append(len(audio))
        return ["turn left"] * len(audio)

    own = _window(1, "whisper")
    other = _window(2, "whisper")
    other = Window(
        **{**other.__dict__, "requests": (replace(other.requests[0], recogniser="command"),)}
    )
    outputs: list[Any] = []
    runner = BatchRunner(model, 4, hear_commands=recogniser)
    report = runner.run([own, other], outputs.append, threading.Event())
    assert report.error is None
    assert {o.window.id: o.text for o in outputs} == {"s:1": "stop", "s:2": "turn left"}
    assert model.whisper_calls == [1] and heard_by_recogniser == [1]
    # Without a recogniser, the model's own Whisper hears both windows in one call.
    model.whisper_calls.clear()
    outputs.clear()
    BatchRunner(model, 4).run([own, other], outputs.append, threading.Event())
    assert [o.text for o in outputs] == ["stop", "stop"] and model.whisper_calls == [2]


@pytest.mark.parametrize("pack", [True, False])
async def test_worker_packs_the_model_only_when_asked(pack: bool) -> None:
    calls: list[str] = []

    class PackableModel(SlowLlmModel):
        def pack_for_inference(self) -> int:
            calls.append("packed")
            return 1

    model = PackableModel()
    async with InferenceWorker(
        lambda: model, max_new_tokens=2, warm_up=False, pack_weights=pack
    ) as worker:
        assert worker.model is model
    assert calls == (["packed"] if pack else [])


def _transcript_window(n: int) -> Window:
    window = _window(n, "whisper")
    request = replace(window.requests[0], key=f"s:{n}/transcript", task="transcript")
    return replace(window, requests=(request,))


def test_a_command_is_decoded_before_other_windows_transcripts() -> None:
    """In one batch, the way of hearing that answers a command decodes first, and its
    answer goes out before the transcripts' decode starts."""
    from agent.runtime.worker import BatchRunner

    model = SlowLlmModel()
    order: list[str] = []

    def recogniser(audio: list[np.ndarray]) -> list[str]:
        order.append("command recogniser")
        return ["stop"] * len(audio)

    def own(audio: list[np.ndarray]) -> list[str]:
        order.append("own whisper")
        return ["hello there"] * len(audio)

    model.transcribe_with_whisper = own  # type: ignore[method-assign]
    command = _window(2, "whisper")
    command = replace(command, requests=(replace(command.requests[0], recogniser="command"),))
    outputs: list[Any] = []

    def emit(output: Any) -> None:
        order.append(f"final {output.request.key}")
        outputs.append(output)

    report = BatchRunner(model, 4, hear_commands=recogniser).run(
        [_transcript_window(1), command], emit, threading.Event()
    )
    assert report.error is None
    assert order == [
        "command recogniser",
        "final s:2/command",
        "own whisper",
        "final s:1/transcript",
    ]


async def test_the_fast_lane_answers_commands_before_transcripts() -> None:
    model = SlowLlmModel()
    outputs: list[Any] = []
    done: list[BatchReport] = []
    async with InferenceWorker(lambda: model, max_new_tokens=6, warm_up=False) as w:
        batch = asyncio.create_task(w.run([_window(1, "llm")], outputs.append))
        assert await asyncio.to_thread(model.paused.wait, 30 * TIMING)
        w.submit_fast([_transcript_window(2)], outputs.append, done.append)  # first in
        w.submit_fast([_window(3, "whisper")], outputs.append, done.append)
        model.go_on.set()
        await asyncio.wait_for(batch, 30 * TIMING)
    finals = [o.request.key for o in outputs if isinstance(o, Final)]
    assert finals[:2] == ["s:3/command", "s:2/transcript"]
    assert model.whisper_calls == [1, 1]  # two decodes: the command's did not wait
    assert [d.finished for d in done] == [{"s:3/command"}, {"s:2/transcript"}]
