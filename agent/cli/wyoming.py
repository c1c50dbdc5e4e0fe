"""`salmonn-live wyoming`: a Wyoming speech-to-text (and sound detection) service.

Home Assistant's Wyoming integration connects to it (docs/homeassistant.md). Speech-to-text is
Whisper's own decoder on the whole utterance the client sends (the client finds the end of the
command); with ``--sounds``, ``detect`` reports the sound tagger's label groups as they are
heard. One model thread serves every connection in turn, so the event loop never blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
from collections.abc import AsyncIterator, Sequence
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


class TaggerDetector:
    """The sound tagger as a Wyoming `SoundDetector`: each label group once per stream.

    Audio is cut into the tagger's 0.96 s patches at its 0.48 s hop as it arrives; every
    patch's group scores are checked against the threshold.

    Args:
        tagger: A loaded `model.sound_tagger.SoundTagger`.
        threshold: The score (0..1) that reports a group.
        run: Runs a blocking call off the event loop (the model thread).
    """

    def __init__(self, tagger: Any, threshold: float, run: Any) -> None:
        if not 0.0 < threshold < 1.0:
            from agent.errors import ConfigError

            raise ConfigError(f"--sound-threshold must lie in (0, 1), got {threshold}")
        self.tagger = tagger
        self.threshold = threshold
        self._run = run

    @property
    def names(self) -> Sequence[str]:
        """The tagger's label groups."""
        return tuple(self.tagger.groups)

    async def detect(
        self, audio: AsyncIterator[FloatArray], names: frozenset[str]
    ) -> AsyncIterator[Any]:
        """Yield a `SoundDetection` the first time each asked-for group is heard."""
        from agent.protocols.wyoming import SoundDetection

        patch = self.tagger.config.patch_samples
        hop = self.tagger.config.patch_hop_samples
        buffer = np.zeros(0, np.float32)
        consumed = 0  # samples dropped from the front of `buffer`
        covered = 0  # the end of the last patch scored, in samples since audio-start
        heard: set[str] = set()

        async def score(windows: list[FloatArray], ends: list[int]) -> AsyncIterator[Any]:
            for end, groups in zip(ends, await self._run(self._group_scores, windows), strict=True):
                for name, value in groups.items():
                    if name in names and name not in heard and value >= self.threshold:
                        heard.add(name)
                        yield SoundDetection(name, end)

        async for chunk in audio:
            buffer = np.concatenate([buffer, chunk])
            if buffer.size < patch:
                continue
            count = (buffer.size - patch) // hop + 1
            windows = [buffer[i * hop : i * hop + patch] for i in range(count)]
            ends = [consumed + i * hop + patch for i in range(count)]
            async for detection in score(windows, ends):
                yield detection
            covered = ends[-1]
            buffer = buffer[count * hop :]
            consumed += count * hop
        # A short sound, or the end of a long one, that no whole patch covered: its last patch
        # (the tagger pads a short one), unless it is under a tenth of a second.
        end = consumed + buffer.size
        if end - covered >= patch // 10:
            async for detection in score([buffer[-patch:]], [end]):
                yield detection

    def _group_scores(self, windows: list[FloatArray]) -> list[dict[str, float]]:
        # Each window is one patch long; max covers the tagger padding it into two.
        return [self.tagger.group_scores(s.max(axis=0)) for s in self.tagger.scores_batch(windows)]


def _main(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.protocols.wyoming import WyomingDescription, WyomingServer
    from model.presets import resolve_model
    from model.whisper import check_language, load_whisper, transcripts

    source = args.whisper or resolve_model(args.model).whisper
    whisper, tokenizer = load_whisper(source)
    if tokenizer is None:
        raise ConfigError(f"the Whisper of {source!r} has no tokenizer: it cannot transcribe")
    check_language(whisper, tokenizer, args.language)
    # One thread: the models are called one at a time, whichever connection asks.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wyoming-model")

    async def run_blocking(function: Any, *arguments: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *arguments)

    def transcribe_blocking(samples: FloatArray) -> str:
        [found] = transcripts(
            whisper, tokenizer, [samples], language=args.language, short_context=True
        )
        return found.text

    async def transcribe(samples: FloatArray) -> str:
        return str(await run_blocking(transcribe_blocking, samples))

    detector = None
    if args.sounds:
        from model.sound_tagger import load_sound_tagger

        detector = TaggerDetector(load_sound_tagger(), args.sound_threshold, run_blocking)
    description = WyomingDescription(
        model=source.removeprefix("package:"), languages=(args.language,)
    )
    server = WyomingServer(
        transcribe, description, uri=args.uri, detector=detector, zeroconf=args.zeroconf
    )
    try:
        asyncio.run(_serve(server))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return 0


async def _serve(server: Any) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP, then close every connection."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # A line tools and tests can wait for: where the service listens, the bound port included.
    logger.info("wyoming: listening on %s", server.uri)
    try:
        await stop.wait()
    finally:
        logger.info("wyoming: stopping")
        await server.close()
