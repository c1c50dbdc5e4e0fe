"""`Agent`: the whole running agent (worker, pipeline, protocols, local sources, sinks).

`Agent` is an async context manager. Entering it enters, into one exit stack and in this
order: the MQTT publisher when ``[mqtt]`` is on (so bad credentials fail before the model
loads; its events go through a sink, its `[[rules]]` fire as `trigger` events), the model on
the worker thread (the pipeline's `LocalWindows`; an edge enters its `RemoteWindows` instead),
the pipeline, the WebSocket server when ``ws.listen`` is set, the Wyoming server when
``[wyoming]`` is on (its transcripts go through the same worker: `WorkerTranscriber`), then
one feeding task per local stream (microphone or file). The protocol modules never know the
agent: each gets what it serves (the bus, the pipeline, a control callback, a transcriber).
`Agent.run` waits for a shutdown request, the end of the local files (``exit_at_end``), or a
pipeline failure. Leaving it shuts down in order:

1. stop intake: local sources stop, the server stops listening and closes `/audio` clients
   (1001), the Wyoming server stops listening and ends its connections (a transcription in
   flight is abandoned: its client sees the connection close); every stream's open segment
   becomes a last window;
2. flush the pipeline: waiting windows are answered within ``worker.drain_timeout_s``, the rest
   are reported in the ``stopped`` status event;
3. close the sinks: each drains its queue; `/events` clients are then closed with 1001 and a
   reason;
4. wait for the tasks with a timeout, cancel what remains (with a message), then leave the
   exit stack: the worker stops, and last the MQTT publisher delivers what it can of its
   outbox and says `offline`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt

from agent.config import AgentConfig, StreamConfig
from agent.errors import ControlError
from agent.events import AGENT_STREAM, ModelEvent, Published, TriggerEvent, WallClock
from agent.protocols.mqtt import MqttPublisher, status_line
from agent.protocols.rules import Rule, RuleAction, RuleEngine
from agent.protocols.ws import WsServer
from agent.runtime.fanout import EventBus, EventFilter, Subscription
from agent.runtime.pipeline import Pipeline, StreamHandle
from agent.runtime.window_sink import LocalWindows, WindowSink
from agent.runtime.worker import (
    BatchReport,
    Final,
    InferenceWorker,
    Output,
    Request,
    TagResult,
    Window,
    check_whisper_text,
)

if TYPE_CHECKING:
    from agent.protocols.wyoming import PatchDetector, WyomingServer

logger = logging.getLogger(__name__)

_SINK_CLOSE_TIMEOUT_S = 5.0
_EARLY_STATUS_MAX = 16
_FILE_BLOCK_MS = 50


class Agent:
    """The running agent (see the module docstring).

    Args:
        config: The validated configuration.
        load_model: Loads the model; called once, on the worker thread.

    Attributes:
        pipeline: The pipeline (for `control` and `emit_status`), once entered.
        bus: The event fan-out (for extra sinks), once entered.
        ws: The WebSocket server, or None when `ws.listen` is ``off``.
        wyoming: The Wyoming server, or None when ``[wyoming]`` is off.
        mqtt: The MQTT publisher, or None when ``[mqtt]`` is off.
        rules: The smart-home rule engine (per-rule counters in its `stats()`), once
            `add_rules` was called; None before.
        stop_reason: Why `run` returned.
    """

    def __init__(self, config: AgentConfig, load_model: Callable[[], Any]) -> None:
        self.config = config
        self._load_model = load_model
        self.clock = WallClock()
        self.bus = EventBus(self.clock)
        self.worker: InferenceWorker | None = None
        self.pipeline: Pipeline | None = None
        self.ws: WsServer | None = None
        self.wyoming: WyomingServer | None = None
        self.mqtt: MqttPublisher | None = None
        self.rules: RuleEngine | None = None
        self.stop_reason = ""
        self._stack = contextlib.AsyncExitStack()
        self._feeds: set[asyncio.Task[None]] = set()
        self._sinks: set[asyncio.Task[None]] = set()
        self._shutdown: asyncio.Event | None = None
        self._closed = False
        self.source_errors: list[str] = []
        # Status reports of the protocols from before the pipeline is up (bounded: a broker
        # that keeps failing during a long model load reports its last changes only).
        self._early_status: collections.deque[tuple[str, str, dict[str, Any]]] = collections.deque(
            maxlen=_EARLY_STATUS_MAX
        )
        self._reporting = False  # True once the pipeline takes status reports directly

    async def __aenter__(self) -> Self:
        self._shutdown = asyncio.Event()
        try:
            if self.config.mqtt.enabled:
                self.mqtt = await self._stack.enter_async_context(
                    MqttPublisher(
                        self.config.mqtt,
                        on_control=self.control,
                        on_status=self._mqtt_status,
                        **self._sound_entities(),
                    )
                )
                if self.config.rules and self.rules is None:
                    self.add_rules(self.config.rules)
                self.add_sink("mqtt", self.mqtt.submit)  # `started` goes out too
            sink = await self._open_sink()
            self.pipeline = await self._stack.enter_async_context(
                Pipeline(self.config, sink, self.bus, self.clock, tagging=self._tagging())
            )
            if self.config.ws.enabled:
                self.ws = await self._stack.enter_async_context(
                    WsServer(self.config, self.pipeline, self.bus, self.clock)
                )
            if self.config.wyoming.enabled:
                self.wyoming = await self._stack.enter_async_context(self._wyoming_server(sink))
                self._wyoming_listening(self.wyoming)
            while self._early_status:  # in order, after `started` and `listening`
                word, message, detail = self._early_status.popleft()
                self.pipeline.emit_status(word, message, detail=detail)
            self._reporting = True
            for stream in self.config.streams:
                if stream.kind in ("mic", "file"):
                    self._start_feed(stream)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open_sink(self) -> WindowSink:
        """Where the pipeline's windows go: the model, loaded on the worker thread and entered
        into the exit stack (`agent.cluster.edge.Edge` puts the worker pool here instead)."""
        model = self.config.model
        self.worker = await self._stack.enter_async_context(
            InferenceWorker(
                self._load_model,
                max_new_tokens=model.max_new_tokens,
                partials=self.config.worker.partials,
                threads=model.threads,
                command_whisper=model.command_recogniser,
                pack_weights=model.pack_weights,
                load_tagger=self._tagger_loader(),
            )
        )
        check_whisper_text(self.worker.model, model)
        return LocalWindows(self.config.worker, self.worker)

    # -- the sound tagger ([sounds]) ---------------------------------------------------------

    def _tagger_loader(self) -> Callable[[], Any] | None:
        """Loads the sound tagger on its own thread (with the effective label groups), when
        ``[sounds]`` is on; a missing or corrupt model is a `ModelLoadError` naming it."""
        sounds = self.config.sounds
        if not sounds.enabled:
            return None

        def load() -> Any:
            from model.sound_tagger import SoundTaggerConfig, load_sound_tagger

            tagger_config = SoundTaggerConfig(sounds.tagger, sounds.class_map, intra_op_threads=1)
            groups = sounds.label_groups(sounds.class_names())
            return load_sound_tagger(tagger_config, dict(groups))

        return load

    def _tagging(self) -> InferenceWorker | None:
        """The worker as the pipeline's tagger, when it loaded one (an edge has none: its
        windows go to the pool, and sound events are not made there)."""
        if self.config.sounds.enabled and (self.worker is None or not self.worker.sound_tagger):
            logger.warning("[sounds] is on but no sound tagger is loaded here: no sound events")
            return None
        return self.worker if self.config.sounds.enabled else None

    def _sound_entities(self) -> dict[str, Any]:
        """Home Assistant's sound group entities (`MqttPublisher`'s ``sound_groups`` and
        ``sustained_groups``) when ``[sounds]`` is on; the class map is read, not the model."""
        sounds = self.config.sounds
        if not sounds.enabled:
            return {}
        from agent.runtime.sound_events import entity_groups

        groups, sustained = entity_groups(sounds, sounds.label_groups(sounds.class_names()))
        return {"sound_groups": groups, "sustained_groups": sustained}

    async def _close_pipeline(self, pipeline: Pipeline) -> None:
        """Step 2 of the shutdown (`Pipeline.close`; the edge waits for its pool first)."""
        await pipeline.close()

    def _wyoming_server(self, sink: WindowSink) -> WyomingServer:
        """The ``[wyoming]`` service on this agent's worker (entered after the pipeline).

        Raises:
            ConfigError: no local worker (an edge), or the model's Whisper cannot write
                text (no tokenizer: the model that needs ``--transcript llm``).
        """
        from agent.errors import ConfigError
        from agent.protocols.wyoming import WyomingDescription, WyomingServer

        settings = self.config.wyoming
        worker = self.worker
        if worker is None:
            raise ConfigError(
                "[wyoming] needs the model in this process, and this agent sends its windows "
                "to a worker pool; turn wyoming.enabled off here and run `salmonn-live "
                "wyoming` (or `run` with [wyoming]) where a model is loaded"
            )
        if getattr(worker.model, "whisper_tokenizer", True) is None:
            raise ConfigError(
                f"[wyoming]: model {self.config.model.name!r} has no Whisper decoder (its "
                "Whisper has no tokenizer, which is why it runs with --transcript llm), and "
                "Wyoming transcribes with Whisper's own decoder; load a model whose Whisper "
                "has one (e.g. --model nano) or turn [wyoming] off (wyoming.enabled = false)"
            )
        detector = None
        if settings.sounds:
            detector = self._wyoming_detector(worker)
        # What Home Assistant shows as the model: the package, or the directory's name.
        whisper = getattr(getattr(worker.model, "config", None), "whisper", None)
        name = str(whisper).removeprefix("package:").rstrip("/").rsplit("/", 1)[-1]
        description = WyomingDescription(
            model=name if whisper else worker.model_name, languages=(settings.language,)
        )
        return WyomingServer(
            WorkerTranscriber(worker, lambda: sink.busy),
            description,
            uri=settings.uri,
            limits=settings.limits(),
            detector=detector,
            zeroconf=settings.zeroconf,
            zeroconf_name=settings.zeroconf_name,
        )

    def _wyoming_detector(self, worker: InferenceWorker) -> PatchDetector:
        """``detect`` on the worker's sound tagger (`worker_patch_scorer`)."""
        from agent.errors import ConfigError
        from agent.protocols.wyoming import PatchDetector

        tagger = worker.sound_tagger
        if tagger is None:
            raise ConfigError(
                "wyoming.sounds serves the sound tagger, which the agent loads with [sounds]: "
                "set sounds.enabled = true (--sounds) too, or wyoming.sounds = false"
            )
        return PatchDetector(
            tuple(tagger.groups),
            worker_patch_scorer(worker),
            patch_samples=tagger.config.patch_samples,
            hop_samples=tagger.config.patch_hop_samples,
            threshold=self.config.wyoming.sound_threshold,
        )

    def _wyoming_listening(self, server: WyomingServer) -> None:
        assert self.pipeline is not None
        # The same line as `salmonn-live wyoming`: tools wait for it (the bound port in it).
        logger.info("wyoming: listening on %s", server.uri)
        self.pipeline.emit_status(
            "wyoming_listening",
            f"Wyoming speech-to-text on {server.uri}",
            detail={
                "uri": server.uri,
                "languages": list(server.description.languages),
                "sounds": list(server.sound_names),
                "zeroconf": server.zeroconf,
            },
        )

    # -- what the protocols report and ask ---------------------------------------------------

    def control(self, stream: str, command: dict[str, Any]) -> None:
        """Apply a control command (`Pipeline.control`) to one open stream, or to every open
        stream when ``stream`` is ``"*"`` (all or nothing: the first stream rejects it or none).

        Raises:
            ControlError: the agent is still starting, no stream is open, or the command is
                invalid (nothing is changed).
        """
        pipeline = self.pipeline
        if pipeline is None:
            raise ControlError("the agent is still starting; try again")
        if stream != AGENT_STREAM:
            pipeline.control(stream, command)
            return
        streams = sorted(pipeline.streams)
        if not streams:
            raise ControlError("no open stream to control")
        for stream_id in streams:
            pipeline.control(stream_id, command)

    def _mqtt_status(self, info: dict[str, Any]) -> None:
        word, message = status_line(info)
        if not self._reporting or self.pipeline is None:
            self._early_status.append((word, message, info))
        else:
            self.pipeline.emit_status(word, message, detail=info)

    # -- sinks ---------------------------------------------------------------------------------

    def add_sink(
        self,
        name: str,
        deliver: Callable[[Published], None],
        *,
        maxsize: int = 1024,
        accept: EventFilter | None = None,
    ) -> Subscription:
        """Deliver every event to ``deliver`` from a task of its own, through a bounded queue
        (drop oldest). ``deliver`` must not block (e.g. `MqttPublisher.submit`); if it raises,
        the error is logged and delivery goes on."""
        sub = self.bus.subscribe(name, maxsize, accept)

        async def pump() -> None:
            async for event in sub:
                try:
                    deliver(event)
                except Exception:
                    logger.error("sink %s failed on event %s", name, event.event.id, exc_info=True)

        task = asyncio.get_running_loop().create_task(pump(), name=f"sink-{name}")
        self._sinks.add(task)
        task.add_done_callback(self._sinks.discard)
        return sub

    # -- smart-home rules ----------------------------------------------------------------------

    def add_rules(self, rules: Sequence[Rule]) -> RuleEngine:
        """Run smart-home rules on every event as it is emitted (`agent.protocols.rules`: final
        events only, never on `trigger` events). Each firing becomes a `trigger` event
        (`agent.events.TriggerEvent`) published right after the event that fired it, so
        every sink sees it: `/events`, the console, and MQTT, which publishes the rule's own
        message from it (`MqttPublisher.submit`). Entering the agent with ``[mqtt]`` on adds
        ``config.rules`` itself; call it before entering the agent.

        Args:
            rules: The validated rules (`AgentConfig.rules`).

        Returns:
            The rule engine (also `self.rules`).

        Raises:
            RuntimeError: rules were already added.
        """
        if self.rules is not None:
            raise RuntimeError("Agent.add_rules() called twice")
        self.rules = RuleEngine(list(rules))
        self.bus.add_listener(self._fire_rules)
        return self.rules

    def _fire_rules(self, item: Published) -> None:
        assert self.rules is not None
        if isinstance(item.event, TriggerEvent):  # rules never fire on their own triggers
            return
        for action in self.rules.evaluate(item.data):
            self._emit_trigger(item, action)

    def _emit_trigger(self, item: Published, action: RuleAction) -> None:
        pipeline = self.pipeline
        if pipeline is None:  # events come from the pipeline: cannot happen
            return
        source = item.event
        seq = pipeline.next_seq()  # one `seq` order over every event of the agent
        trigger = TriggerEvent(
            id=f"trigger:{seq}",
            seq=seq,
            stream=source.stream,
            rule=action.rule,
            topic=action.topic,
            payload=action.payload,
            qos=action.qos,
            retain=action.retain,
            source_id=source.id,
            source_kind=str(source.kind),
            text=source.text if isinstance(source, ModelEvent) else "",
            emitted=time.monotonic(),
            source_timing=item.data["timing"],
        )
        logger.info(
            "rule %s fired on %s: %s %s",
            action.rule,
            trigger.source_id,
            action.topic,
            action.payload[:200],
        )
        self.bus.publish(trigger)

    # -- local sources -------------------------------------------------------------------------

    def _start_feed(self, stream: StreamConfig) -> None:
        task = asyncio.get_running_loop().create_task(self._feed(stream), name=f"feed-{stream.id}")
        self._feeds.add(task)

    async def _feed(self, stream: StreamConfig) -> None:
        from streaming.errors import StreamingError
        from streaming.sources import FileSource, MicSource

        assert self.pipeline is not None
        agent = self.config.agent
        realtime = agent.realtime if stream.realtime is None else stream.realtime
        repeat = agent.loop if stream.loop is None else stream.loop
        is_file = stream.kind == "file"
        handle = self.pipeline.open_stream(
            stream,
            origin=stream.kind,
            overload="backpressure" if is_file and not realtime else "drop_oldest",
        )
        try:
            while True:
                source: FileSource | MicSource
                if is_file:
                    source = FileSource(
                        stream.argument or "", block_ms=_FILE_BLOCK_MS, realtime=realtime
                    )
                else:
                    device = stream.argument
                    source = MicSource(int(device) if device and device.isdigit() else device)
                async with source:
                    async for block in source:
                        handle.push(block.samples, block.captured_at)
                        if handle.overload == "backpressure":
                            await handle.wait_room()
                if not (is_file and repeat):
                    break
        except StreamingError as exc:
            self.source_errors.append(f"{stream.id}: {exc}")
            logger.error("stream %s: source failed: %s", stream.id, exc)
            self.pipeline.emit_status(
                "source_error", str(exc), stream=stream.id, detail={"source": stream.source}
            )
        finally:
            handle.end()
        await handle.wait_done()

    @property
    def local_streams(self) -> Mapping[str, StreamHandle]:
        """Open streams fed by this process (not by `/audio` clients)."""
        assert self.pipeline is not None
        return {k: v for k, v in self.pipeline.streams.items() if not v.origin.startswith("ws:")}

    # -- running -------------------------------------------------------------------------------

    def request_shutdown(self, reason: str = "requested") -> None:
        """Ask `run` to return (safe to call from a signal handler on the loop)."""
        if self._shutdown is not None and not self._shutdown.is_set():
            self.stop_reason = reason
            logger.info("shutdown requested: %s", reason)
            self._shutdown.set()

    async def run(self) -> str:
        """Run until a shutdown request, the end of every local file (``agent.exit_at_end``),
        or a pipeline failure.

        Returns:
            Why it stopped: the shutdown reason, ``end of input`` or ``pipeline failed: ...``.
        """
        assert self._shutdown is not None and self.pipeline is not None
        waiters: dict[asyncio.Task[Any], str] = {
            asyncio.ensure_future(self._shutdown.wait()): "shutdown",
            asyncio.ensure_future(self.pipeline.wait_failed()): "failed",
        }
        if self.config.agent.exit_at_end and self._feeds:
            waiters[asyncio.ensure_future(asyncio.wait(self._feeds))] = (
                "end"  # wait() never cancels them
            )
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        what = waiters[next(iter(done))]
        if what == "end":
            self.stop_reason = "end of input"
        elif what == "failed":
            self.stop_reason = f"pipeline failed: {self.pipeline.failure!r}"
        return self.stop_reason

    async def close(self) -> None:
        """Shut down in order (see the module docstring); idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._feeds:
            task.cancel("agent shutting down: intake stops")
        await asyncio.gather(*self._feeds, return_exceptions=True)
        if self.ws is not None:
            await self.ws.stop_intake()
        if self.wyoming is not None:
            await self.wyoming.close()
        if self.pipeline is not None:
            await self._close_pipeline(self.pipeline)
        self.bus.close()
        if self.ws is not None:
            await self.ws.close()
        if self._sinks:
            _, pending = await asyncio.wait(self._sinks, timeout=_SINK_CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel(f"sink did not finish within {_SINK_CLOSE_TIMEOUT_S} s of shutdown")
            await asyncio.gather(*pending, return_exceptions=True)
        await self._stack.aclose()


class WorkerTranscriber:
    """A Wyoming transcriber (`agent.protocols.wyoming.Transcriber`) on an `InferenceWorker`:
    each utterance becomes a window of one Whisper transcript request, ``wyoming:<n>``, so
    the text is what the worker writes for a stream's transcript window (the same call on
    the same weights) and the model is loaded once.

    While the agent's batch runs, the window goes to the worker's fast lane and is answered
    between two of its tokens (`InferenceWorker.submit_fast`); when the worker is idle it is
    a batch of its own (`InferenceWorker.run`). Several utterances in the fast lane share
    Whisper's decoder steps with each other and with the streams' command windows.

    Args:
        worker: A started worker whose model's Whisper has a tokenizer.
        busy: True while the worker has a batch running or about to run (the pipeline's
            `WindowSink.busy`); None: never (a worker of its own, as `salmonn-live wyoming`).
        stream: The stream name of the windows (never a configured stream: ids have no ':').
    """

    def __init__(
        self,
        worker: InferenceWorker,
        busy: Callable[[], bool] | None = None,
        stream: str = "wyoming",
    ) -> None:
        self.worker = worker
        self.busy = busy
        self.stream = stream
        self._ids = itertools.count()
        self.fast = 0  # answered in the fast lane
        self.alone = 0  # answered in a batch of their own

    def window(self, samples: npt.NDArray[np.float32]) -> Window:
        """The window one utterance becomes."""
        window_id = f"{self.stream}:{next(self._ids)}"
        now = time.monotonic()
        request = Request(
            key=f"{window_id}/transcript", task="transcript", instruction="", engine="whisper"
        )
        return Window(
            id=window_id,
            stream=self.stream,
            kind="speech",
            audio=samples,
            start_s=0.0,
            end_s=samples.size / 16000,
            captured=now,
            segment_end=now,
            requests=(request,),
        )

    async def __call__(self, samples: npt.NDArray[np.float32]) -> str:
        """The transcript of 16 kHz mono float32 samples.

        Raises:
            AgentError: the worker failed, was cancelled or is closed.
        """
        from agent.errors import AgentError

        window = self.window(samples)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_output(output: Output) -> None:
            if isinstance(output, Final) and not answer.done():
                answer.set_result(output.text)

        def on_done(report: BatchReport) -> None:
            if not answer.done():
                why = report.error or ("cancelled" if report.cancelled else "no answer")
                answer.set_exception(AgentError(f"the worker did not transcribe: {why}"))

        try:
            if self.busy is not None and self.busy():
                self.fast += 1
                self.worker.submit_fast([window], on_output, on_done)
            else:
                self.alone += 1
                on_done(await self.worker.run([window], on_output))
            return await answer
        finally:
            # Abandoned (the client went away, shutdown): a late answer is dropped.
            if not answer.done():
                answer.cancel()


def worker_patch_scorer(
    worker: InferenceWorker,
) -> Callable[[list[npt.NDArray[np.float32]]], Any]:
    """A Wyoming `agent.protocols.wyoming.PatchScorer` on the worker's sound tagger: the
    patches are tagged on the tagger's own thread with the streams' tagging
    (`InferenceWorker.submit_tags`), never behind the model's work.
    """

    async def score(windows: list[npt.NDArray[np.float32]]) -> list[dict[str, float]]:
        from agent.errors import AgentError

        done: asyncio.Future[TagResult] = asyncio.get_running_loop().create_future()

        def on_done(result: TagResult) -> None:
            if not done.done():
                done.set_result(result)

        worker.submit_tags(windows, on_done)
        try:
            result = await done
        finally:
            if not done.done():  # abandoned: a late result is dropped
                done.cancel()
        if result.error is not None:
            raise AgentError(f"the sound tagger failed: {result.error}")
        # A window one patch long may come back as two (the tagger pads): the best of each.
        return [
            {group: max(p.groups[group] for p in patches) for group in patches[0].groups}
            for patches in result.clips
        ]

    return score


@contextlib.asynccontextmanager
async def run_agent(config: AgentConfig, load_model: Callable[[], Any]) -> AsyncIterator[Agent]:
    """An entered `Agent` that always shuts down (for tests and embedding)."""
    async with Agent(config, load_model) as agent:
        yield agent
