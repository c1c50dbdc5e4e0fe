"""`salmonn-live bench wyoming`: the Wyoming service as Home Assistant uses it.

The real `salmonn-live wyoming` runs as a subprocess on a free loopback port and is driven by
the `wyoming` package's own `AsyncTcpClient` (a client no one here wrote), sending 16 kHz mono
16-bit audio in 1024-frame chunks, as Home Assistant's speech-to-text does, at the speed it
is spoken (``--pace realtime``, the default) or as fast as the socket takes it (``fast``).

The audio: household commands of about 3 s (2.6 to 3.2 s) spoken by Piper's joe voice
(`training.piper`; espeak-ng when Piper is missing), and the real recordings of English words
that ``klettres-data`` ships (one word each, about 2 s with its silences) when it is installed.

Measured:

- **WER**: each clip's ``transcript`` against its text, beside the transcript of the same
  samples (the 16-bit audio the server decoded) through `run`'s Whisper path,
  `model.salmonn.Salmonn.transcribe_with_whisper` (the call the agent's worker makes for a
  transcript window), in this process on the same weights. The two should be equal: the
  count of identical transcripts is reported too.
- **Latency** at one client: from writing ``audio-stop`` to reading ``transcript``, for each
  command (after one warm-up), p50 / p95 / max.
- **Concurrency**: ``--clients`` clients at once (8 by default), each sending every command
  in its own order, started together: the errors (``error`` events, closed connections,
  time-outs), the transcripts that differ from the one-client ones, and the latency. One
  model thread serves every connection, so with several clients the latency includes the
  wait for the others' transcriptions.

With ``--in-run`` the service is `salmonn-live run` with ``[wyoming]`` on (``--wyoming``): the
transcripts come from the agent's own worker, the same that answers its streams; with
``--beside FILE`` too, that file plays as a looped real-time stream of the agent meanwhile, so
the Wyoming windows share the worker with its batches (answered in the fast lane, between
two tokens). The whole model (not Whisper alone) is loaded then.

The report is markdown, printed and (with ``--out``) written to a file; exit code 1 when a
client saw an error or the service did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.languages import word_error_rate
from streaming.pcm import SAMPLE_RATE_HZ as RATE_HZ

#: Household commands of 2.6 to 3.2 s in Piper joe's voice (its silences included).
COMMANDS = (
    "Please turn off all the lights in the living room.",
    "Set the thermostat in the hallway a little bit warmer.",
    "Open the garage door and switch on the porch light.",
    "What is the weather going to be like tomorrow morning in town?",
    "Play some quiet music in the bedroom for half an hour.",
    "Lock the front door and close the blinds in the kitchen.",
    "Remind me to water the plants in the garden this evening.",
    "Turn the kitchen lights down a little bit, it is too bright.",
    "Start the vacuum cleaner in the hallway and the office.",
    "Is the back door locked, or did somebody leave it open?",
)
KLETTRES_SYLLABLES = Path("/usr/share/klettres/en/syllab")
#: The klettres English recordings that are words (``aw``, ``ch`` and ``th`` are sounds).
KLETTRES_WORDS = (
    "car",
    "dog",
    "fix",
    "gas",
    "gem",
    "hot",
    "jet",
    "key",
    "me",
    "my",
    "no",
    "pet",
    "saw",
    "say",
    "sit",
    "sky",
)
CHUNK_FRAMES = 1024  # what Home Assistant's pipeline hands its speech-to-text per chunk
PIPER_SEED = 0
#: How long the subprocess may take to load Whisper and listen.
START_TIMEOUT_S = 300.0
#: The longest wait for one transcript (a stuck service is an error, not a hang).
TRANSCRIPT_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument(
        "--model", default="nano", help="the preset whose Whisper both paths use (default nano)"
    )
    parser.add_argument("--whisper", help="a Whisper source instead of the preset's")
    parser.add_argument(
        "--commands",
        type=int,
        default=len(COMMANDS),
        help=f"how many of the {len(COMMANDS)} commands to speak (default all)",
    )
    parser.add_argument(
        "--words",
        type=int,
        default=len(KLETTRES_WORDS),
        help="how many klettres words to send when klettres-data is installed (0: none)",
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="clients at once in the concurrency run (default 8)"
    )
    parser.add_argument(
        "--voice",
        choices=("auto", "piper", "espeak"),
        default="auto",
        help="who speaks the commands (auto: Piper joe when installed, else espeak-ng)",
    )
    parser.add_argument(
        "--pace",
        choices=("realtime", "fast"),
        default="realtime",
        help="send audio at the speed it is spoken (as a microphone does) or all at once",
    )
    parser.add_argument(
        "--in-run",
        action="store_true",
        help="serve through `salmonn-live run --wyoming` (the agent's worker) instead of "
        "`salmonn-live wyoming`",
    )
    parser.add_argument(
        "--beside",
        type=Path,
        metavar="FILE",
        help="with --in-run: an audio file the agent plays meanwhile as a looped real-time stream",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")


@dataclass(frozen=True)
class Clip:
    """One utterance to send: its text, its 16-bit PCM and those samples as float32."""

    kind: str  # "command" or "word"
    text: str
    pcm: bytes
    samples: np.ndarray

    @property
    def seconds(self) -> float:
        """Its length."""
        return self.samples.size / RATE_HZ


@dataclass
class Result:
    """What one client got for one clip."""

    clip: int
    text: str | None = None  # None: no transcript
    latency_s: float | None = None
    error: str | None = None
    streamed: bool = False  # transcript-start and transcript-stop came around it


@dataclass
class Report:
    """Everything the markdown report shows."""

    whisper: str
    voice: str
    pace: str
    clips: list[Clip]
    reference: list[str]
    single: list[Result]
    concurrent: list[Result]
    clients: int
    started_s: float
    stopped_cleanly: bool
    load: tuple[float, float]  # the 1-minute load average before and after
    service: str = "salmonn-live wyoming"
    server_problems: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Client-side errors over both runs (error events, closed connections, time-outs)."""
        return sum(r.error is not None for r in self.single + self.concurrent)


def _pcm(samples: np.ndarray) -> tuple[bytes, np.ndarray]:
    """16-bit PCM of float samples, and the float32 samples the server decodes from it."""
    from streaming.resample import to_mono_float32

    ints = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    return ints.tobytes(), to_mono_float32(ints.astype(np.int16))


def speak_commands(texts: Sequence[str], voice: str) -> tuple[list[np.ndarray], str]:
    """The commands as 16 kHz float32, and which voice said them (``voice``: ``piper``,
    ``espeak``, or ``auto`` for Piper when it is installed)."""
    from training import piper

    if voice == "piper" or (voice == "auto" and piper.available()):
        return piper.speak(texts, seed=PIPER_SEED), piper.VOICE_NAME
    from bench.languages import espeak

    return [espeak(text, "en-us") for text in texts], "espeak-ng en-us"


def klettres_words(count: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``count`` of klettres' English word recordings (none when not installed)."""
    from streaming.audio_file import load_audio

    found = []
    for word in KLETTRES_WORDS[:count]:
        path = KLETTRES_SYLLABLES / f"{word}.ogg"
        if path.is_file():
            found.append((word, load_audio(path)))
    return found


def reference_transcripts(source: str, clips: Sequence[Clip]) -> list[str]:
    """Each clip through `run`'s Whisper path, one clip per call as the service transcribes.

    `Salmonn.transcribe_with_whisper` only reads the model's ``whisper`` and
    ``whisper_tokenizer``, so it is called on those alone: the same function on the same
    weights, without loading the language model the transcripts never touch.
    """
    from model.salmonn import Salmonn
    from model.whisper import load_whisper

    whisper, tokenizer = load_whisper(source)
    holder: Any = SimpleNamespace(whisper=whisper, whisper_tokenizer=tokenizer)
    # .strip(): as the worker does with what transcribe_with_whisper returns.
    return [Salmonn.transcribe_with_whisper(holder, [c.samples])[0].strip() for c in clips]


class Service:
    """`salmonn-live wyoming` as a subprocess on a free loopback port.

    Its stderr is read on a thread: the port comes from its "listening on" line, and its
    warnings and errors are kept for the report.
    """

    def __init__(
        self, model: str, whisper: str | None, in_run: bool = False, beside: Path | None = None
    ) -> None:
        command = [sys.executable, "-m", "agent.cli"]
        if in_run:  # the agent, its console quiet; its stderr log has the same listening line
            command += ["run", "--wyoming", "--wyoming-uri", "tcp://127.0.0.1:0", "--ws", "off"]
            command += ["--no-mqtt", "--print", "none"]
            if beside is not None:
                command += ["--source", f"file:{beside}", "--loop", "--realtime"]
        else:
            command += ["wyoming", "--uri", "tcp://127.0.0.1:0"]
        command += ["--model", model] + (["--whisper", whisper] if whisper else [])
        self.command = command[3:]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"wyoming: listening on tcp://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._listening.set()
        self._listening.set()  # it exited: stop waiting

    def wait_listening(self) -> float:
        """Wait for the port; the seconds it took to start.

        Raises:
            RuntimeError: It exited or did not listen within `START_TIMEOUT_S`.
        """
        if not self._listening.wait(START_TIMEOUT_S) or not self.port:
            self.stop()
            tail = "\n".join(self.lines[-15:])
            what = " ".join(self.command[:1])
            raise RuntimeError(f"salmonn-live {what} did not start; its stderr ends:\n{tail}")
        return time.monotonic() - self.started

    def stop(self) -> bool:
        """SIGTERM, then wait; True when it exited 0 with no traceback."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        return code == 0 and not any("Traceback" in line for line in self.lines)

    def problems(self) -> list[str]:
        """Its WARNING and ERROR lines."""
        return [line for line in self.lines if " WARNING " in line or " ERROR " in line]


async def transcribe_once(port: int, clip: Clip, index: int, pace: str) -> Result:
    """One connection: ``transcribe``, the clip's audio, ``audio-stop``, then the transcript."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    result = Result(index)
    seen: list[str] = []
    try:
        async with asyncio.timeout(TRANSCRIPT_TIMEOUT_S + 2 * clip.seconds):
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Transcribe(language="en").event())
                await client.write_event(AudioStart(rate=RATE_HZ, width=2, channels=1).event())
                step = CHUNK_FRAMES * 2
                begun = time.monotonic()
                for i in range(0, len(clip.pcm), step):
                    chunk = AudioChunk(
                        rate=RATE_HZ, width=2, channels=1, audio=clip.pcm[i : i + step]
                    )
                    await client.write_event(chunk.event())
                    if pace == "realtime":  # on a schedule from the start: no drift
                        due = begun + (i + step) / 2 / RATE_HZ
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
                stop_at = time.monotonic()
                await client.write_event(AudioStop().event())
                while True:
                    event = await client.read_event()
                    if event is None:
                        result.error = f"closed after {seen or 'nothing'}"
                        break
                    seen.append(event.type)
                    if event.type == "error":
                        result.error = f"error event: {event.data}"
                        break
                    if event.type == "transcript":
                        result.latency_s = time.monotonic() - stop_at
                        result.text = str((event.data or {}).get("text", ""))
                    if event.type == "transcript-stop":
                        break
    except TimeoutError:
        result.error = f"no transcript within the time-out (got {seen})"
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.streamed = "transcript-start" in seen and "transcript-stop" in seen
    if result.error is None and result.text is None:
        result.error = f"no transcript (got {seen})"
    return result


async def one_client(port: int, clips: Sequence[Clip], pace: str) -> list[Result]:
    """Every clip in turn on one client (a fresh connection per clip, as Home Assistant
    opens one per speech-to-text request), after one warm-up that is not counted."""
    await transcribe_once(port, clips[0], 0, pace)
    return [await transcribe_once(port, clip, i, pace) for i, clip in enumerate(clips)]


async def many_clients(port: int, clips: Sequence[Clip], clients: int, pace: str) -> list[Result]:
    """``clients`` clients at once, each sending every command, client k starting at the
    k-th (so different commands end together)."""

    async def client(k: int) -> list[Result]:
        order = [(k + j) % len(clips) for j in range(len(clips))]
        return [await transcribe_once(port, clips[i], i, pace) for i in order]

    per_client = await asyncio.gather(*(client(k) for k in range(clients)))
    return [r for results in per_client for r in results]


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with few samples, p95 is the slowest)."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _latency_cells(results: Sequence[Result]) -> list[str]:
    times = [r.latency_s for r in results if r.latency_s is not None]
    if not times:
        return ["-", "-", "-"]
    return [f"{1000 * _percentile(times, q):.0f} ms" for q in (50, 95, 100)]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: Report) -> str:
    """The report as markdown: a heading, the WER table, the latency table, notes."""
    clips, reference, single = report.clips, report.reference, report.single
    wer_rows = []
    for kind, label in (("command", f"commands ({report.voice})"), ("word", "klettres words")):
        idx = [i for i, c in enumerate(clips) if c.kind == kind]
        if not idx:
            wer_rows.append([label, 0, "-", "-", "-", "-"])
            continue
        wyoming_wer = np.mean([word_error_rate(clips[i].text, single[i].text or "") for i in idx])
        run_wer = np.mean([word_error_rate(clips[i].text, reference[i]) for i in idx])
        same = sum(single[i].text == reference[i] for i in idx)
        seconds = np.mean([clips[i].seconds for i in idx])
        wer_rows.append(
            [
                label,
                len(idx),
                f"{seconds:.1f} s",
                f"{100 * wyoming_wer:.1f} %",
                f"{100 * run_wer:.1f} %",
                f"{same}/{len(idx)}",
            ]
        )
    commands = [i for i, c in enumerate(clips) if c.kind == "command"]
    one = [single[i] for i in commands]
    by_clip = {r.clip: r.text for r in single}
    lat_rows = []
    for label, results in (
        ("1 client", one),
        (f"{report.clients} clients at once", report.concurrent),
    ):
        failed = sum(r.error is not None for r in results)
        differs = sum(r.text is not None and r.text != by_clip.get(r.clip) for r in results)
        streamed = sum(r.streamed for r in results)
        lat_rows.append(
            [
                label,
                len(results),
                failed,
                differs,
                f"{streamed}/{len(results)}",
                *_latency_cells(results),
            ]
        )
    errors = [r.error for r in single + report.concurrent if r.error is not None]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count() or 0
    lines = [
        f"## bench wyoming: {report.whisper}, {report.voice}, {report.pace} pace, "
        f"served by {report.service}",
        "",
        f"{when}; {platform.machine()}, {cores} cores, Python {platform.python_version()};"
        f" the service took {report.started_s:.1f} s to load and listen; 1-minute load"
        f" average {report.load[0]:.1f} before, {report.load[1]:.1f} after.",
        "",
        "### Transcripts: Wyoming vs run's Whisper path (transcribe_with_whisper)",
        "",
        _table(
            wer_rows,
            ["audio", "clips", "mean length", "WER (Wyoming)", "WER (run)", "identical"],
        ),
        "",
        "### Latency: audio-stop to transcript",
        "",
        _table(
            lat_rows,
            [
                "clients",
                "transcripts",
                "errors",
                "differ from 1 client",
                "streamed",
                "p50",
                "p95",
                "max",
            ],
        ),
        "",
        f"Service stopped cleanly on SIGTERM: {'yes' if report.stopped_cleanly else 'NO'};"
        f" its warnings and errors: {len(report.server_problems)}.",
    ]
    lines += [f"- client error: {e}" for e in errors[:10]]
    lines += [f"- service: {p}" for p in report.server_problems[:10]]
    return "\n".join(lines) + "\n"


def _clips(args: argparse.Namespace) -> tuple[list[Clip], str]:
    texts = COMMANDS[: max(1, args.commands)]
    spoken, voice = speak_commands(texts, args.voice)
    clips = [Clip("command", t, *_pcm(s)) for t, s in zip(texts, spoken, strict=True)]
    clips += [Clip("word", w, *_pcm(s)) for w, s in klettres_words(max(0, args.words))]
    return clips, voice


def run(args: argparse.Namespace) -> int:
    """Measure and print the markdown report; 1 on client errors or an unclean stop, 2 when
    the voice asked for is missing."""
    from model.presets import resolve_model
    from training import piper

    if args.clients < 1 or args.commands < 1:
        print("bench wyoming: --clients and --commands must be at least 1")  # noqa: T201
        return 2
    if args.voice == "piper" and not piper.available():
        print(f"bench wyoming: Piper is not installed; run: {piper.PIP_INSTALL}")  # noqa: T201
        return 2
    if args.voice != "piper" and not piper.available() and shutil.which("espeak-ng") is None:
        print("bench wyoming: needs Piper or espeak-ng (Debian package espeak-ng)")  # noqa: T201
        return 2
    source = args.whisper or resolve_model(args.model).whisper
    load_before = os.getloadavg()[0]  # other work on the machine shows in the timings
    if args.beside is not None and not (args.in_run and args.beside.is_file()):
        print("bench wyoming: --beside needs --in-run and an audio file")  # noqa: T201
        return 2
    service = Service(args.model, args.whisper, args.in_run, args.beside)
    stopped = False
    try:
        clips, voice = _clips(args)
        reference = reference_transcripts(source, clips)  # while the service loads
        started_s = service.wait_listening()
        single = asyncio.run(one_client(service.port, clips, args.pace))
        commands = [c for c in clips if c.kind == "command"]
        concurrent = asyncio.run(many_clients(service.port, commands, args.clients, args.pace))
    finally:
        stopped = service.stop()
    report = Report(
        whisper=source.removeprefix("package:"),
        voice=voice,
        pace=args.pace,
        clips=clips,
        reference=reference,
        single=single,
        concurrent=concurrent,
        clients=args.clients,
        started_s=started_s,
        stopped_cleanly=stopped,
        load=(load_before, os.getloadavg()[0]),
        server_problems=service.problems(),
        service=" ".join(["salmonn-live", *service.command]).replace(" --print none", ""),
    )
    text = render(report)
    print(text, end="")  # noqa: T201
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0 if report.errors == 0 and stopped else 1
