"""Synthetic acoustic scenes with exact ground truth, for tests, benchmarks and training data.

A scene is background noise (pink, mains hum, dishwasher, fan) with events placed on it:
espeak-ng utterances in several voices and speeds, and synthesized sound events (alarm
beeping, doorbell chime, siren, knocking, glass breaking, phone ringing, clapping, running
water). Each event is scaled so its active-part RMS sits ``snr_db`` above the noise RMS.

Ground truth is exact: every event's ``start_sample`` / ``end_sample`` on the scene clock is
where its clean signal is active (espeak-ng's leading and trailing silence is trimmed).

This module knows audio only. It calls the ``espeak-ng`` program (Debian package
``espeak-ng``) through :mod:`subprocess`; everything else is numpy.
"""

from __future__ import annotations

import functools
import io
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import soundfile

from streaming.errors import StreamingError
from streaming.pcm import SAMPLE_RATE_HZ as SR
from streaming.resample import resample

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: espeak-ng voices used for utterances (language + variant), male and female.
VOICES: tuple[str, ...] = (
    "en-us",
    "en-gb+f3",
    "en-gb-scotland+m3",
    "en-us+f2",
    "en+m5",
    "en-029+f4",
)
#: Speaking rates in words per minute.
SPEEDS_WPM: tuple[int, ...] = (130, 160, 190)
#: Short utterances of the kind the agent must catch.
SENTENCES: tuple[str, ...] = (
    "stop",
    "turn left and stop",
    "what was that noise",
    "hello robot, come here please",
    "is the kettle boiling yet",
    "switch off the kitchen lights",
    "go back to the charging station",
    "can you hear the doorbell",
    "remind me to call my mother tomorrow",
    "yes",
    "how loud is it in here",
    "open the window a little",
)
#: Names of the sound-event synthesizers (keys of :data:`SOUND_EVENTS`).
SOUND_EVENT_NAMES: tuple[str, ...] = (
    "alarm_beeping",
    "doorbell_chime",
    "siren",
    "knocking",
    "glass_breaking",
    "phone_ringing",
    "clapping",
    "running_water",
)
#: Names of the background-noise generators (keys of :data:`BACKGROUNDS`).
BACKGROUND_NAMES: tuple[str, ...] = ("pink", "hum", "dishwasher", "fan")


@dataclass(frozen=True)
class TruthEvent:
    """One ground-truth event in a scene.

    Attributes:
        start_sample: First active sample on the scene clock.
        end_sample: One past the last active sample.
        kind: ``"speech"`` or ``"sound"``.
        label: The sentence for speech, the synthesizer name for sounds.
        snr_db: Event RMS over the background RMS, in dB.
    """

    start_sample: int
    end_sample: int
    kind: str
    label: str
    snr_db: float

    @property
    def start_s(self) -> float:
        """Start time in seconds."""
        return self.start_sample / SR

    @property
    def end_s(self) -> float:
        """End time in seconds."""
        return self.end_sample / SR


@dataclass(frozen=True)
class Scene:
    """A generated scene.

    Attributes:
        audio: Mono float32 samples at :attr:`sample_rate_hz`.
        events: Ground truth, sorted by start.
        background: Name of the background noise.
        sample_rate_hz: Always 16 kHz.
    """

    audio: FloatArray = field(repr=False)
    events: tuple[TruthEvent, ...]
    background: str
    sample_rate_hz: int = SR

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.audio.size / self.sample_rate_hz


# ---------------------------------------------------------------------------------------------
# Speech


def espeak_available() -> bool:
    """True when the ``espeak-ng`` program is on ``PATH``."""
    return shutil.which("espeak-ng") is not None


@functools.lru_cache(maxsize=256)
def _speak_cached(text: str, voice: str, speed_wpm: int) -> bytes:
    if not espeak_available():
        raise StreamingError("espeak-ng not found; install the Debian package espeak-ng")
    try:
        result = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "--stdout", text],
            capture_output=True,
            check=True,
            timeout=30,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise StreamingError(f"espeak-ng failed for voice {voice!r}: {exc}") from exc
    return result.stdout


def active_extent(audio: FloatArray, threshold_db: float = -45.0) -> tuple[int, int]:
    """First and one-past-last sample of the part louder than ``threshold_db`` below the peak.

    Measured on 5 ms frames (so the result is exact to 5 ms).

    Args:
        audio: Clean mono signal.
        threshold_db: Level relative to the loudest frame, in dB.

    Returns:
        ``(start_sample, end_sample)``; ``(0, 0)`` for silence.
    """
    hop = SR // 200
    n = audio.size // hop
    if n == 0:
        return 0, 0
    energy = (audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(axis=1)
    peak = energy.max()
    if peak <= 0:
        return 0, 0
    active = np.flatnonzero(energy >= peak * 10 ** (threshold_db / 10))
    return int(active[0] * hop), int((active[-1] + 1) * hop)


def speak(text: str, voice: str = "en-us", speed_wpm: int = 160) -> FloatArray:
    """Synthesize ``text`` with espeak-ng, trimmed to its active part, at 16 kHz.

    Args:
        text: What to say.
        voice: espeak-ng voice name, optionally ``+variant``.
        speed_wpm: Speaking rate in words per minute.

    Returns:
        Mono float32 at 16 kHz, peak-normalised to 0.5, without leading/trailing silence.

    Raises:
        StreamingError: espeak-ng missing or failing.
    """
    wav = _speak_cached(text, voice, speed_wpm)
    data, rate_hz = soundfile.read(io.BytesIO(wav), dtype="float32")
    audio = resample(data, rate_hz, SR)
    start, end = active_extent(audio)
    audio = audio[start:end]
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return (audio * (0.5 / peak)).astype(np.float32) if peak > 0 else audio


# ---------------------------------------------------------------------------------------------
# Sound events. Each takes a generator and returns a clip that is active from its first to its
# last sample (short internal gaps, e.g. between beeps, are part of the event).


def _t(seconds: float) -> npt.NDArray[np.float64]:
    return np.arange(int(seconds * SR)) / SR


def _env(n: int, attack_s: float, release_s: float) -> npt.NDArray[np.float64]:
    env = np.ones(n)
    a, r = max(1, int(attack_s * SR)), max(1, int(release_s * SR))
    env[:a] *= np.linspace(0, 1, a)
    env[-r:] *= np.linspace(1, 0, r)
    return env


def _lowpass(x: npt.NDArray[np.float64], cutoff_hz: float) -> npt.NDArray[np.float64]:
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    spectrum[freqs > cutoff_hz] = 0
    return np.fft.irfft(spectrum, x.size)


def _bandpass(x: npt.NDArray[np.float64], low_hz: float, high_hz: float) -> npt.NDArray[np.float64]:
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, x.size)


def alarm_beeping(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A smoke-alarm style beep train: 3-6 beeps of a 2.5-3.5 kHz tone."""
    freq = rng.uniform(2500, 3500)
    beep_s, gap_s = rng.uniform(0.15, 0.4), rng.uniform(0.1, 0.3)
    beeps = int(rng.integers(3, 7))
    out = np.zeros(int((beeps * (beep_s + gap_s) - gap_s) * SR) + 1)
    beep = np.sin(2 * np.pi * freq * _t(beep_s)) * _env(int(beep_s * SR), 0.005, 0.005)
    for i in range(beeps):
        s = int(i * (beep_s + gap_s) * SR)
        out[s : s + beep.size] += beep
    return out


def doorbell_chime(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Ding-dong: two decaying bell tones with inharmonic partials."""
    f1 = rng.uniform(600, 800)
    f2 = f1 * rng.choice([0.8, 0.75, 0.84])
    note_s = rng.uniform(0.6, 0.9)
    out = np.zeros(int(note_s * 2 * SR))
    for i, f in enumerate((f1, f2)):
        t = _t(note_s + (note_s if i == 0 else 0.0))
        partials = sum(
            a * np.sin(2 * np.pi * f * m * t) for m, a in ((1, 1.0), (2.76, 0.4), (5.4, 0.2))
        )
        tone = partials * np.exp(-t / (note_s * 0.45)) * _env(t.size, 0.003, 0.02)
        s = int(i * note_s * SR)
        out[s : s + tone.size] += tone[: out.size - s]
    return out


def siren(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A wailing siren sweeping between about 700 Hz and 1.6 kHz."""
    seconds = rng.uniform(1.5, 3.0)
    t = _t(seconds)
    rate_hz = rng.uniform(0.8, 2.5)
    freq = 1100 + 450 * np.sin(2 * np.pi * rate_hz * t)
    phase = 2 * np.pi * np.cumsum(freq) / SR
    wave = np.sin(phase) + 0.3 * np.sin(2 * phase)
    return wave * _env(t.size, 0.05, 0.05)


def _knock(rng: np.random.Generator, freq_hz: float) -> npt.NDArray[np.float64]:
    t = _t(0.12)
    body = np.sin(2 * np.pi * freq_hz * t) * np.exp(-t / 0.015)
    click = _lowpass(rng.standard_normal(t.size), 3000) * np.exp(-t / 0.004)
    return body + 0.6 * click


def knocking(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """3-5 knocks on a wooden door, 0.15-0.3 s apart."""
    knocks = int(rng.integers(3, 6))
    gap_s = rng.uniform(0.15, 0.3)
    out = np.zeros(int(((knocks - 1) * gap_s + 0.12) * SR) + 1)
    for i in range(knocks):
        k = _knock(rng, rng.uniform(150, 250))
        s = int(i * gap_s * SR)
        out[s : s + k.size] += k
    return out


def glass_breaking(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A crash (broadband burst) followed by tinkling high resonances."""
    seconds = rng.uniform(0.8, 1.4)
    t = _t(seconds)
    crash = _bandpass(rng.standard_normal(t.size), 1500, 7500) * np.exp(-t / 0.08)
    tinkle = np.zeros(t.size)
    for _ in range(int(rng.integers(12, 25))):
        s = int(rng.uniform(0.02, seconds - 0.1) * SR)
        f = rng.uniform(3000, 7000)
        tt = _t(0.08)
        ping = np.sin(2 * np.pi * f * tt) * np.exp(-tt / 0.02)
        n = min(ping.size, t.size - s)
        tinkle[s : s + n] += rng.uniform(0.2, 0.6) * ping[:n]
    return (crash + tinkle) * _env(t.size, 0.001, 0.05)


def phone_ringing(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Two rings of a dual-tone (440 + 480 Hz) ringer with a fast warble."""
    ring_s = rng.uniform(0.8, 1.2)
    gap_s = rng.uniform(0.3, 0.5)
    t = _t(ring_s)
    warble = 0.5 * (1 + np.sign(np.sin(2 * np.pi * 20 * t)))
    ring = (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t)) * (0.4 + 0.6 * warble)
    ring *= _env(t.size, 0.01, 0.01)
    out = np.zeros(int((2 * ring_s + gap_s) * SR))
    out[: ring.size] += ring
    s = int((ring_s + gap_s) * SR)
    out[s : s + ring.size] += ring[: out.size - s]
    return out


def clapping(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """4-8 hand claps, 0.25-0.45 s apart."""
    claps = int(rng.integers(4, 9))
    gap_s = rng.uniform(0.25, 0.45)
    out = np.zeros(int(((claps - 1) * gap_s + 0.08) * SR) + 1)
    t = _t(0.08)
    for i in range(claps):
        clap = _bandpass(rng.standard_normal(t.size), 800, 5000) * np.exp(-t / 0.012)
        s = int(i * gap_s * SR)
        out[s : s + clap.size] += clap
    return out


def running_water(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A tap running for 1.5-3 s: band-limited noise with bubbly amplitude modulation."""
    seconds = rng.uniform(1.5, 3.0)
    n = int(seconds * SR)
    noise = _bandpass(rng.standard_normal(n), 400, 6000)
    bubbles = 1 + 0.5 * _lowpass(rng.standard_normal(n), 30) / 0.05
    return noise * np.clip(bubbles, 0.2, 2.0) * _env(n, 0.1, 0.1)


SOUND_EVENTS: dict[str, Callable[[np.random.Generator], npt.NDArray[np.float64]]] = {
    "alarm_beeping": alarm_beeping,
    "doorbell_chime": doorbell_chime,
    "siren": siren,
    "knocking": knocking,
    "glass_breaking": glass_breaking,
    "phone_ringing": phone_ringing,
    "clapping": clapping,
    "running_water": running_water,
}


# ---------------------------------------------------------------------------------------------
# Backgrounds (unit RMS before scaling).


def _pink(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum /= np.sqrt(np.maximum(freqs, 20.0))
    return np.fft.irfft(spectrum, n)


def _hum(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    t = np.arange(n) / SR
    mains = rng.choice([50.0, 60.0])
    tones: npt.NDArray[np.float64] = sum(
        a * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3))
        for k, a in ((1, 1.0), (2, 0.6), (3, 0.3), (4, 0.15))
    )
    return tones + 0.05 * _pink(rng, n) / np.std(_pink(rng, n))


def _dishwasher(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    water = _bandpass(rng.standard_normal(n), 200, 4000)
    slosh = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * np.arange(n) / SR)
    motor = np.sin(2 * np.pi * rng.uniform(90, 130) * np.arange(n) / SR)
    return water / np.std(water) * slosh + 0.5 * motor + 0.5 * _pink(rng, n) / np.std(_pink(rng, n))


def _fan(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    return _lowpass(rng.standard_normal(n), 1200) + 0.3 * _pink(rng, n) / 30


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int], npt.NDArray[np.float64]]] = {
    "pink": _pink,
    "hum": _hum,
    "dishwasher": _dishwasher,
    "fan": _fan,
}


def background(name: str, duration_s: float, rng: np.random.Generator) -> FloatArray:
    """Background noise of ``duration_s`` seconds with unit RMS.

    Raises:
        StreamingError: Unknown background name.
    """
    if name not in BACKGROUNDS:
        raise StreamingError(f"unknown background {name!r}; expected one of {BACKGROUND_NAMES}")
    noise = BACKGROUNDS[name](rng, int(duration_s * SR))
    unit: npt.NDArray[np.float64] = noise / np.sqrt(np.mean(noise**2))
    return unit.astype(np.float32)


def _active_rms(clip: npt.NDArray[np.float64]) -> float:
    """RMS over the clip's 20 ms frames within 30 dB of its loudest frame."""
    hop = SR // 50
    n = max(1, clip.size // hop)
    frames = np.resize(clip, n * hop).reshape(n, hop)
    energy = (frames**2).mean(axis=1)
    loud = energy[energy >= energy.max() * 1e-3]
    return float(np.sqrt(loud.mean()))


# ---------------------------------------------------------------------------------------------
# Scenes


def make_scene(
    seed: int,
    duration_s: float = 30.0,
    *,
    n_speech: int = 4,
    n_sounds: int = 4,
    background_name: str | None = None,
    snr_db_range: tuple[float, float] = (10.0, 30.0),
    noise_level_dbfs: float = -45.0,
    min_gap_s: float = 1.5,
    sound_names: Sequence[str] | None = None,
) -> Scene:
    """Generate a reproducible scene with ``n_speech`` utterances and ``n_sounds`` sound events.

    Events never overlap; at least ``min_gap_s`` of background separates them, and the first
    starts after at least 1 s of background (for noise-floor adaptation).

    Args:
        seed: Seed for every random choice (voice, speed, sentence, event, placement, SNR).
        duration_s: Scene length in seconds.
        n_speech: Number of utterances.
        n_sounds: Number of sound events (cycling through ``sound_names``).
        background_name: One of :data:`BACKGROUND_NAMES`; chosen by the seed if None.
        snr_db_range: Each event's SNR is drawn uniformly from this range (dB).
        noise_level_dbfs: Background RMS level in dB relative to full scale.
        min_gap_s: Minimum background between events, in seconds.
        sound_names: Sound synthesizers to use; all of :data:`SOUND_EVENT_NAMES` if None.

    Returns:
        The scene.

    Raises:
        StreamingError: If the events do not fit in ``duration_s``, or espeak-ng fails.
    """
    rng = np.random.default_rng(seed)
    bg_name = background_name or str(rng.choice(BACKGROUND_NAMES))
    names = list(sound_names or SOUND_EVENT_NAMES)
    offset = int(rng.integers(0, len(names)))
    clips: list[tuple[str, str, npt.NDArray[np.float64]]] = []
    for _ in range(n_speech):
        text = str(rng.choice(SENTENCES))
        voice = str(rng.choice(VOICES))
        speed = int(rng.choice(SPEEDS_WPM))
        clips.append(("speech", text, speak(text, voice, speed).astype(np.float64)))
    for i in range(n_sounds):
        name = names[(offset + i) % len(names)]
        clips.append(("sound", name, SOUND_EVENTS[name](rng)))
    order = rng.permutation(len(clips))
    clips = [clips[i] for i in order]

    total = int(duration_s * SR)
    busy = sum(c[2].size for c in clips)
    lead = SR
    slack = total - busy - lead - int(min_gap_s * SR) * len(clips)
    if slack < 0:
        raise StreamingError(
            f"{len(clips)} events ({busy / SR:.1f} s) do not fit in a {duration_s} s scene"
        )
    # Spread the slack randomly over the gaps (Dirichlet split).
    shares = rng.dirichlet(np.ones(len(clips) + 1)) * slack
    noise_rms = 10 ** (noise_level_dbfs / 20)
    audio = background(bg_name, duration_s, rng).astype(np.float64) * noise_rms
    events: list[TruthEvent] = []
    position = lead
    for (kind, label, clip), share in zip(clips, shares[:-1], strict=True):
        position += int(share) + int(min_gap_s * SR)
        snr_db = float(rng.uniform(*snr_db_range))
        scaled = clip * (noise_rms * 10 ** (snr_db / 20) / _active_rms(clip))
        audio[position : position + scaled.size] += scaled
        start, end = active_extent(scaled.astype(np.float32))
        events.append(TruthEvent(position + start, position + end, kind, label, round(snr_db, 1)))
        position += clip.size
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        audio *= 0.99 / peak
    return Scene(audio.astype(np.float32), tuple(events), bg_name)


def make_noise_only(
    seed: int,
    duration_s: float = 60.0,
    background_name: str = "dishwasher",
    noise_level_dbfs: float = -45.0,
) -> Scene:
    """A scene of background noise alone (for the false-segment rate).

    Args:
        seed: Random seed.
        duration_s: Length in seconds.
        background_name: One of :data:`BACKGROUND_NAMES`.
        noise_level_dbfs: Background RMS level in dB relative to full scale.

    Returns:
        A scene with no events.
    """
    rng = np.random.default_rng(seed)
    noise = background(background_name, duration_s, rng) * np.float32(10 ** (noise_level_dbfs / 20))
    return Scene(noise.astype(np.float32), (), background_name)
