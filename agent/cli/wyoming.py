"""`salmonn-live wyoming`: a Wyoming speech-to-text (and sound detection) service.

Home Assistant's Wyoming integration connects to it (docs/homeassistant.md). Speech-to-text is
Whisper's own decoder on the whole utterance the client sends (the client finds the end of the
command); with ``--sounds``, ``detect`` reports the sound tagger's label groups as they are
heard. Whisper runs on an `InferenceWorker` of this command's own, through the transcriber
`run` uses for ``[wyoming]`` (`agent.runtime.app.WorkerTranscriber`: the same windows and the
same Whisper call), one utterance after another; the tagger runs on a thread of its own. The
event loop never blocks. To serve Wyoming beside streams, on one model, use ``[wyoming]`` in
`run` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: A sound is reported once its label group scores this (YAMNet's sigmoid) on one patch.
DEFAULT_SOUND_THRESHOLD = 0.5


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``wyoming`` sub-command."""
    from agent.protocols.wyoming import DEFAULT_URI

    parser = subparsers.add_parser(
        "wyoming",
        help="serve speech-to-text (and sound detection) over the Wyoming protocol",
        description="Serve Whisper speech-to-text, and with --sounds sound-event detection, "
        "to Home Assistant or any Wyoming client. Wyoming has no authentication: it listens on "
        "loopback unless --uri names another address.",
    )
    parser.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=f"tcp://HOST:PORT (port 0: any free port) or unix://PATH (default {DEFAULT_URI})",
    )
    parser.add_argument(
        "--model",
        default="nano",
        help="the preset whose Whisper transcribes (default nano: Whisper base, multilingual)",
    )
    parser.add_argument("--whisper", help="a Whisper source instead of the preset's")
    parser.add_argument(
        "--language",
        default="en",
        help="the language transcribed (a Whisper code such as en, de, fr; default en)",
    )
    parser.add_argument(
        "--sounds",
        action="store_true",
        help="also serve `detect`: the sound tagger's label groups as Wyoming wake models",
    )
    parser.add_argument(
        "--sound-threshold",
        type=float,
        default=DEFAULT_SOUND_THRESHOLD,
        help=f"score that reports a sound group (default {DEFAULT_SOUND_THRESHOLD})",
    )
    parser.add_argument(
        "--zeroconf", action="store_true", help="announce the service over mDNS (TCP only)"
    )
    parser.set_defaults(func=_main)


def tagger_detector(tagger: Any, threshold: float, run: Any) -> Any:
    """The sound tagger as a Wyoming `SoundDetector` (`agent.protocols.wyoming.PatchDetector`
    on the tagger's 0.96 s patches at its 0.48 s hop).

    Args:
        tagger: A loaded `model.sound_tagger.SoundTagger`.
        threshold: The score (0..1] that reports a group.
        run: Awaits a blocking call off the event loop (the tagger's thread).
    """
    from agent.protocols.wyoming import PatchDetector

    def group_scores(windows: list[FloatArray]) -> list[dict[str, float]]:
        # Each window is one patch long; max covers the tagger padding it into two.
        return [tagger.group_scores(s.max(axis=0)) for s in tagger.scores_batch(windows)]

    async def score(windows: list[FloatArray]) -> list[dict[str, float]]:
        return list(await run(group_scores, windows))

    return PatchDetector(
        tuple(tagger.groups),
        score,
        patch_samples=tagger.config.patch_samples,
        hop_samples=tagger.config.patch_hop_samples,
        threshold=threshold,
    )


class WhisperOnly:
    """Whisper alone as the worker's model: `transcribe_with_whisper` is `Salmonn`'s call on
    these weights, in ``language``; the worker asks nothing else of it (no warm-up)."""

    def __init__(self, whisper: Any, tokenizer: Any, language: str) -> None:
        self.whisper = whisper
        self.whisper_tokenizer = tokenizer
        self.language = language

    def transcribe_with_whisper(self, audio: Sequence[FloatArray], **kwargs: Any) -> list[str]:
        """`model.salmonn.Salmonn.transcribe_with_whisper` with this service's language."""
        from model.salmonn import Salmonn

        return Salmonn.transcribe_with_whisper(self, audio, language=self.language, **kwargs)  # type: ignore[arg-type]


def _main(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.protocols.wyoming import WyomingDescription
    from model.presets import resolve_model
    from model.whisper import check_language, load_whisper

    source = args.whisper or resolve_model(args.model).whisper
    whisper, tokenizer = load_whisper(source)
    if tokenizer is None:
        raise ConfigError(f"the Whisper of {source!r} has no tokenizer: it cannot transcribe")
    check_language(whisper, tokenizer, args.language)
    tagger = None
    if args.sounds:
        from model.sound_tagger import load_sound_tagger

        tagger = load_sound_tagger()
    description = WyomingDescription(
        model=source.removeprefix("package:"), languages=(args.language,)
    )
    asyncio.run(_serve(WhisperOnly(whisper, tokenizer, args.language), tagger, description, args))
    return 0


async def _serve(
    model: WhisperOnly, tagger: Any, description: Any, args: argparse.Namespace
) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP, then close every connection.

    Transcripts go through an `InferenceWorker` of this command's own, as `run`'s do
    (`agent.runtime.app.WorkerTranscriber`: the same windows, the same Whisper call); the sound
    tagger, when asked for, runs on a thread of its own.
    """
    from agent.protocols.wyoming import WyomingServer
    from agent.runtime.app import WorkerTranscriber
    from agent.runtime.worker import InferenceWorker

    # One thread for the tagger: its calls come one at a time, whichever connection asks.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wyoming-tagger")

    async def run_blocking(function: Any, *arguments: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *arguments)

    detector = None
    if tagger is not None:
        detector = tagger_detector(tagger, args.sound_threshold, run_blocking)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with InferenceWorker(lambda: model, max_new_tokens=1, warm_up=False) as worker:
            server = WyomingServer(
                WorkerTranscriber(worker),
                description,
                uri=args.uri,
                detector=detector,
                zeroconf=args.zeroconf,
            )
            await server.start()
            # A line tools and tests can wait for: where it listens, the bound port included.
            logger.info("wyoming: listening on %s", server.uri)
            try:
                await stop.wait()
            finally:
                logger.info("wyoming: stopping")
                await server.close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
