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
#
# Each is built from how the real thing makes its sound (a struck door panel, ringing shards,
# bubbles) and the room it is heard in, so that a tagger trained on recordings (YAMNet on
# AudioSet) names it; docs/training.md, "The synthetic corpus", has how well it does.

Float64Array = npt.NDArray[np.float64]


def _t(seconds: float) -> Float64Array:
    return np.arange(int(seconds * SR)) / SR


def _env(n: int, attack_s: float, release_s: float) -> Float64Array:
    env = np.ones(n)
    a, r = max(1, int(attack_s * SR)), max(1, int(release_s * SR))
    env[:a] *= np.linspace(0, 1, a)
    env[-r:] *= np.linspace(1, 0, r)
    return env


def _lowpass(x: Float64Array, cutoff_hz: float) -> Float64Array:
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    spectrum[freqs > cutoff_hz] = 0
    return np.fft.irfft(spectrum, x.size)


def _bandpass(x: Float64Array, low_hz: float, high_hz: float) -> Float64Array:
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, x.size)


def _ring(
    rng: np.random.Generator, freq_hz: float, decay_s: float, t: Float64Array
) -> Float64Array:
    """One vibration mode struck at t = 0: a sinusoid of random phase decaying as exp(-t/decay)."""
    return np.sin(2 * np.pi * freq_hz * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t / decay_s)


def _add_at(out: Float64Array, clip: Float64Array, start_s: float) -> None:
    """Add ``clip`` into ``out`` from ``start_s`` on, cut at the end of ``out``."""
    start = int(start_s * SR)
    n = max(0, min(clip.size, out.size - start))
    out[start : start + n] += clip[:n]


def _room(rng: np.random.Generator, x: Float64Array, rt60_s: float, wet: float) -> Float64Array:
    """``x`` heard in a room: the direct sound plus a diffuse tail ``wet`` times as strong (in
    amplitude, for a steady sound).

    The tail is exponentially decaying noise (60 dB in ``rt60_s``), low-passed at 5 kHz as air
    and furnishings absorb the highs. The result keeps ``x``'s length.
    """
    t = _t(rt60_s)
    tail = _lowpass(rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60_s), 5000)
    tail *= wet / np.sqrt(np.sum(tail**2))
    size = 1 << (x.size + tail.size - 2).bit_length()
    wet_part = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(tail, size), size)[: x.size]
    return x + wet_part


def _tilted_noise(
    rng: np.random.Generator, n: int, low_hz: float, high_hz: float, slope: float
) -> Float64Array:
    """Noise between ``low_hz`` and ``high_hz`` whose power falls as f**-slope (0 white, 1 pink)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    spectrum *= np.where(band, (np.maximum(freqs, low_hz) / low_hz) ** (-slope / 2), 0.0)
    return np.fft.irfft(spectrum, n)


def alarm_beeping(rng: np.random.Generator) -> Float64Array:
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


def _chime_note(freq_hz: float, decay_s: float, seconds: float, rolloff: float) -> Float64Array:
    """One note of an electronic chime: a square-like wave (odd harmonics falling as
    1/k**rolloff) switched on sharply, as a doorbell chip plays its recording of a struck tone
    bar: most of the sound dies away with the strike (in about 0.6 ``decay_s``), a fifth of it
    rings on for about 2 ``decay_s``, as the bar does."""
    t = _t(seconds)
    wave = np.zeros(t.size)
    for k in range(1, 30, 2):
        if k * freq_hz >= 0.49 * SR:
            break
        wave += np.sin(2 * np.pi * k * freq_hz * t) / k**rolloff
    envelope = 0.8 * np.exp(-t / (0.6 * decay_s)) + 0.2 * np.exp(-t / (2.2 * decay_s))
    return wave * envelope * _env(t.size, 0.001, 0.01)


def doorbell_chime(rng: np.random.Generator) -> Float64Array:
    """Ding-dong: an electronic chime's high note (680-900 Hz), then 0.3-0.45 s later one a
    third or a fourth below, through the chime's small loudspeaker into a hallway.

    The loudspeaker passes about 300 Hz-5.5 kHz. The chip's coarse sample playback and its
    amplifier add a hiss 16-22 dB below the tone that rises and falls with it. Struck tone bars
    and bells (inharmonic partials) were tried first: the tagger hears those as music ("Bell",
    "Chime"), as it does the chime without the hiss. Notes further apart than about half a
    second are heard as two beeps.
    """
    high_hz = rng.uniform(680, 900)
    low_hz = high_hz / rng.choice([1.25, 1.26, 1.33])
    decay_s = rng.uniform(0.5, 0.8)
    gap_s, ring_s = rng.uniform(0.3, 0.45), rng.uniform(1.5, 1.95)
    rolloff = rng.uniform(1.0, 1.5)
    t = _t(gap_s + ring_s)
    # The chime damps its first note to 40 % as it plays the second (within 10 ms): two notes
    # of equal strength a third apart read as a voice's harmonics to the segmenter.
    damping = 1 - 0.6 * np.clip((t - gap_s) / 0.01, 0.0, 1.0)
    out = _chime_note(high_hz, decay_s, gap_s + ring_s, rolloff) * damping
    _add_at(out, _chime_note(low_hz, decay_s, ring_s, rolloff), gap_s)
    out = _bandpass(out, 300, 5500)
    out /= np.sqrt(np.mean(out**2))
    # The hiss follows the tone's level (20 ms RMS): a steady hiss outlasting the decaying
    # tone would make its tail a noisy, voice-like harmonic sound to the segmenter.
    window = int(0.02 * SR)
    level = np.sqrt(np.convolve(out**2, np.ones(window) / window, mode="same"))
    hiss = _bandpass(rng.standard_normal(out.size), 300, 3000)
    hiss *= level / np.sqrt(np.mean(hiss**2) * np.mean(level**2))
    out += rng.uniform(0.08, 0.16) * hiss
    return _room(rng, out, 0.5, rng.uniform(0.0, 0.4))


def siren(rng: np.random.Generator) -> Float64Array:
    """A wailing siren for 1.5-3 s: a horn-like tone (with harmonics) whose pitch rises and
    falls once every 2-7 s between about 0.5 and 2 kHz, as a siren's rotor spins up and down."""
    seconds = rng.uniform(1.5, 3.0)
    t = _t(seconds)
    centre_hz, depth = rng.uniform(800, 1300), rng.uniform(0.25, 0.5)
    cycle = (rng.uniform(0.15, 0.5) * t + rng.uniform(0, 1)) % 1.0
    sweep = 1 - 2 * np.abs(2 * cycle - 1)  # -1..1 and back, once a cycle
    freq = centre_hz * (1 + depth * np.tanh(1.5 * sweep) / np.tanh(1.5))  # rounded at the turns
    phase = 2 * np.pi * np.cumsum(freq) / SR
    brightness, odd = rng.uniform(0.3, 1.0), rng.uniform(0.0, 1.0)
    wave = np.sin(phase)
    for k in range(2, 12):
        weight = brightness / k ** (1 + odd) * (0.3 if k % 2 == 0 and odd > 0.5 else 1.0)
        wave += weight * np.sin(k * phase) * (k * freq < 0.49 * SR)
    wave *= _env(t.size, 0.05, 0.05)
    return _room(rng, wave, 0.8, rng.uniform(0.0, 0.8))


def _door(rng: np.random.Generator, seconds: float) -> tuple[Float64Array, Float64Array]:
    """A wooden door panel's vibration modes, for knocks on it: each mode's complex
    trajectory exp((2 pi i f - 1/tau) t) over ``seconds`` (rows), and its level.

    300-400 modes spread evenly from 120-200 Hz up to 1.5-2.8 kHz (a plate's modes are evenly
    spaced in frequency; this many overlap within their bandwidths, as a real door's do, so no
    single mode stands out as a pitch), loudest near 300-450 Hz (the lowest modes radiate poorly,
    the highest are hardly excited by a knuckle). Modes up to 1.2 kHz all die out together in
    20-40 ms as the hinges, latch and frame take the energy; above that wood's own damping,
    which grows with frequency, shortens them as f**-1.5. (Letting the low modes ring longer
    than the rest made the tail read as a voice's pitch.)
    """
    t = _t(seconds)
    low_hz, high_hz = rng.uniform(120, 200), rng.uniform(1500, 2800)
    freqs = rng.uniform(low_hz, high_hz, int(rng.integers(300, 400)))
    corner_hz, slope = rng.uniform(300, 450), rng.uniform(0.8, 1.4)
    ratio = freqs / corner_hz
    level = ratio**0.5 / (1 + ratio ** (0.5 + slope))
    decay_s = rng.uniform(0.02, 0.04) * np.minimum(1.0, (freqs / 1200.0) ** -1.5)
    rate = 2j * np.pi * freqs - 1 / decay_s
    return np.exp(rate[:, None] * t[None, :]), level


def knocking(rng: np.random.Generator) -> Float64Array:
    """Knuckles on a wooden door: 4-6 knocks, 0.13-0.25 s apart with a human's jitter, each
    the same door's modes plus the knuckle's short click.

    The knuckle lands a little off the last spot each time, and a mode is excited in proportion
    to its shape there, so each knock weights the door's modes afresh (a knuckle covers a patch,
    not a point, so none drops out). Repeating one knock exactly sounds like a drum machine.
    Fewer than four knocks gave the tagger too little to go on over a noisy background.
    """
    seconds = 0.2  # the door's ring is 40 dB down or more by then
    modes, level = _door(rng, seconds)
    t = _t(seconds)
    knocks, gap_s = int(rng.integers(4, 7)), rng.uniform(0.13, 0.25)
    times = np.cumsum([0.0] + [gap_s * rng.uniform(0.85, 1.15) for _ in range(knocks - 1)])
    out = np.zeros(int((times[-1] + seconds) * SR))
    click_level = rng.uniform(0.0, 0.6)
    for start in times:
        shape = 0.4 + 0.84 * np.abs(np.sin(rng.uniform(0, np.pi, level.size)))
        amplitude = level * shape * np.exp(1j * rng.uniform(0, 2 * np.pi, level.size))
        door = (amplitude @ modes).imag
        door /= float(np.abs(door).max())
        click = _bandpass(rng.standard_normal(t.size), 500, 4000) * np.exp(-t / 0.0015)
        _add_at(out, rng.uniform(0.7, 1.0) * (door + click_level * click), start)
    return _room(rng, out, 0.4, rng.uniform(0.0, 0.15))


def glass_breaking(rng: np.random.Generator) -> Float64Array:
    """A pane or glass breaking: the crack (broadband noise dying out in 60-250 ms), then
    20-150 shards landing over the next 0.8-1.3 s, mostly early. Each shard clicks sharply on
    impact and rings at 3-4 modes spread at random over 1.7-7.9 kHz, for 15-35 ms."""
    # The pieces keep falling for about a second; under 0.75 s the few rings read as tones.
    seconds = rng.uniform(0.8, 1.3)
    out = np.zeros(int(seconds * SR))
    t = _t(0.5)
    crack = _bandpass(rng.standard_normal(t.size), rng.uniform(300, 1100), 7900)
    _add_at(out, rng.uniform(0.4, 1.2) * crack * np.exp(-t / rng.uniform(0.06, 0.25)), 0.0)
    low_hz = rng.uniform(1700, 2100)
    decay_s, spread = rng.uniform(0.015, 0.035), rng.uniform(0.1, 0.45)
    # Glass on a hard floor: the impact click is about as loud as the ring it starts; with
    # weak clicks the rings alone were heard as chimes and beeps.
    modes, click_level = int(rng.integers(3, 5)), rng.uniform(0.9, 1.5)
    scattered = rng.uniform(0.1, 0.3)  # share of shards that land at any time, not early
    for _ in range(int(rng.integers(20, 150))):
        start = (
            rng.uniform(0, seconds)
            if rng.random() < scattered
            else rng.exponential(spread * seconds)
        )
        if start > seconds - 0.01:
            continue
        shard_decay_s = decay_s * rng.uniform(0.5, 1.5)
        tt = _t(min(6 * shard_decay_s, 0.3))
        # A shard is an irregular fragment: its modes keep no fixed ratio to one another, so
        # they fall anywhere in the band rather than stacked above one pitch (a chime).
        shard = np.zeros(tt.size)
        for k in range(modes):
            freq = rng.uniform(low_hz, 7900)
            shard += rng.uniform(0.3, 1.0) * _ring(rng, freq, shard_decay_s / (1 + k), tt)
        shard += (
            click_level * _bandpass(rng.standard_normal(tt.size), 2000, 7900) * np.exp(-tt / 0.001)
        )
        _add_at(out, rng.uniform(0.1, 1.0) * shard, start)
    out = _room(rng, out, 0.4, rng.uniform(0.35, 0.6))
    # End with the last shard heard, and fade out after it, not over it: a lone late shard
    # faded away would leave the clip's last 0.1 s silent.
    out = out[: active_extent(out.astype(np.float32))[1] + int(0.02 * SR)]
    return out * _env(out.size, 0.0005, 0.02)


def _ringer(
    rng: np.random.Generator, seconds: float, gong_hz: float, strike_hz: float, spread: float
) -> Float64Array:
    """An electromechanical ringer: a clapper strikes two gongs in turn ``strike_hz`` times a
    second each; every strike rings the gong's bell modes (1, 2.76, 5.40, 8.93) for 20-200 ms."""
    out = np.zeros(int(seconds * SR))
    decay_s = rng.uniform(0.02, 0.2)
    for j, start in enumerate(np.arange(0.0, seconds, 0.5 / strike_hz)):
        gong = gong_hz if j % 2 == 0 else gong_hz * spread
        t = _t(min(0.3, seconds - start))
        strike = sum(
            a * _ring(rng, gong * m, decay_s / np.sqrt(m), t)
            for m, a in ((1.0, 1.0), (2.76, 0.5), (5.40, 0.3), (8.93, 0.15))
            if gong * m < 0.49 * SR
        )
        _add_at(out, np.asarray(strike), start)
    return out


def _trill(seconds: float, tone_hz: float, switch_hz: float, spread: float) -> Float64Array:
    """An electronic ringer: two tones a few semitones apart, alternating ``switch_hz`` times a
    second, with a little of their third harmonic."""
    t = _t(seconds)
    freq = np.where(np.sin(2 * np.pi * switch_hz * t) >= 0, tone_hz, tone_hz * spread)
    phase = 2 * np.pi * np.cumsum(freq) / SR
    return np.sin(phase) + 0.3 * np.sin(3 * phase)


def phone_ringing(rng: np.random.Generator) -> Float64Array:
    """A telephone ringing twice: rings of 0.8-1.2 s, 1.2-1.8 s apart, from a bell ringer or
    an electronic one at 1.1-1.5 kHz, heard in a room."""
    ring_s, gap_s = rng.uniform(0.8, 1.2), rng.uniform(1.2, 1.8)
    tone_hz, rate_hz = rng.uniform(1100, 1500), rng.uniform(11, 17)
    spread = rng.uniform(1.15, 1.37)
    bell = rng.random() < 0.5
    out = np.zeros(int((2 * ring_s + gap_s) * SR))
    for start in (0.0, ring_s + gap_s):
        ring = (
            _ringer(rng, ring_s, tone_hz, rate_hz, spread)
            if bell
            else _trill(ring_s, tone_hz, rate_hz, spread)
        )
        _add_at(out, ring * _env(ring.size, 0.005, 0.02), start)
    return _room(rng, out, 0.5, rng.uniform(0.35, 0.6))


def _clap(
    rng: np.random.Generator,
    resonance_hz: float,
    q: float,
    low_hz: float,
    high_hz: float,
    tone: float,
) -> Float64Array:
    """One hand clap: the air pushed out between the palms, a burst of noise lasting about a
    millisecond, and the cavity between the palms ringing at ``resonance_hz`` for a few cycles
    (Q about 1-3)."""
    t = _t(0.05)
    cavity = np.sin(2 * np.pi * resonance_hz * t) * np.exp(-t * resonance_hz / q)
    burst = _bandpass(rng.standard_normal(t.size), low_hz, high_hz) * np.exp(-t / 0.001)
    return tone * cavity + (1 - tone) * burst / (float(np.abs(burst).max()) + 1e-12)


def _clappers(rng: np.random.Generator, people: int, seconds: float, near: bool) -> Float64Array:
    """``people`` clapping for ``seconds``, dry: each at their own 2.2-4.7 claps a second with a
    human's jitter and their own hand shape (palm cavity at 1.1-2.7 kHz, Q 0.8-2.8).

    Up close (``near``) every clap sounds a little different; from across the hall those
    differences blur, so one clap a person, repeated, stands for all of theirs.
    """
    out = np.zeros(int((seconds + 0.05) * SR))
    low_hz, high_hz = rng.uniform(490, 640), rng.uniform(5250, 6250)
    for person in range(people):
        resonance_hz = float(np.exp(rng.uniform(np.log(1100), np.log(2700))))
        q, rate_hz = rng.uniform(0.8, 2.8), rng.uniform(2.2, 4.7)
        level = rng.uniform(0.3, 1.0)
        clap = _clap(rng, resonance_hz, q, low_hz, high_hz, 0.8)
        start = rng.uniform(0, 1 / rate_hz) if person else 0.0  # the first starts it
        while start < seconds:
            if near:
                clap = _clap(rng, resonance_hz * rng.uniform(0.97, 1.03), q, low_hz, high_hz, 0.8)
            _add_at(out, level * rng.uniform(0.7, 1.0) * clap, start)
            start += (1 + 0.17 * rng.standard_normal()) / rate_hz
    return out


def clapping(rng: np.random.Generator) -> Float64Array:
    """An audience of 40-80 applauding for 2-3.2 s in a hall (RT60 1.2-1.9 s), heard from
    among it: the 2-4 people nearest the listener stand out, each clap distinct and mostly
    direct sound, over the diffuse wash of the rest, which reaches the listener as much
    reverberation as direct sound.

    Tried before: 1-2 people are heard as "Hands" (finger snapping and claps) or a knock;
    6-8 in a hall as "Hands" about half the time; a crowd alone as rain, fireworks or a vehicle.
    The near few give the claps' shape, the crowd makes it applause.
    """
    seconds = rng.uniform(2.0, 3.2)
    rt60_s = rng.uniform(1.2, 1.9)
    near = _clappers(rng, int(rng.integers(2, 5)), seconds, near=True)
    near = _room(rng, near, rt60_s, rng.uniform(0.2, 0.4))
    crowd = _clappers(rng, int(rng.integers(40, 81)), seconds, near=False)
    crowd = _room(rng, crowd, rt60_s, rng.uniform(0.8, 1.2))
    # The crowd at about 0.8 of the near few's level (RMS); the air and the audience soak up
    # the highs above 7 kHz (left in, that hiss is heard as rain).
    mix = near + 0.8 * float(np.std(near) / np.std(crowd)) * crowd
    return _lowpass(mix, 7000)


def _bubble(rng: np.random.Generator, freq_hz: float, decay_s: float, chirp: float) -> Float64Array:
    """A bubble's Minnaert resonance: a sinusoid whose pitch rises as the bubble nears the
    surface (by ``chirp`` per decay time), dying away in ``decay_s``."""
    t = _t(min(5 * decay_s, 0.15))
    freq = freq_hz * (1 + chirp * t / decay_s)
    return np.sin(2 * np.pi * np.cumsum(freq) / SR + rng.uniform(0, 2 * np.pi)) * np.exp(
        -t / decay_s
    )


def running_water(rng: np.random.Generator) -> Float64Array:
    """A tap running for 1.5-3 s: 500-2,500 bubbles a second (Minnaert resonances from 150-400
    Hz up to 0.8-2.5 kHz, larger bubbles ringing longer) over the steady hiss of the jet hitting
    the basin (a falling spectrum up to 5-8 kHz)."""
    seconds = rng.uniform(1.5, 3.0)
    n = int(seconds * SR)
    low_hz, high_hz = rng.uniform(150, 400), rng.uniform(800, 2500)
    decay_s, chirp = rng.uniform(0.003, 0.015), rng.uniform(0.1, 0.3)
    tilt = rng.uniform(0.0, 0.6)
    bubbles = np.zeros(n)
    for _ in range(int(rng.uniform(500, 2500) * seconds)):
        freq = float(np.exp(rng.uniform(np.log(low_hz), np.log(high_hz))))  # radius log-uniform
        size = 1000 / freq  # a bubble's radius is inversely proportional to its pitch
        clip = _bubble(rng, freq, decay_s * rng.uniform(0.5, 1.5) * np.sqrt(size), chirp)
        _add_at(bubbles, rng.uniform(0.2, 1.0) * size**tilt * clip, rng.uniform(0, seconds))
    splash = _tilted_noise(
        rng, n, rng.uniform(100, 700), rng.uniform(5000, 8000), rng.uniform(0, 1.5)
    )
    mix = bubbles / np.std(bubbles) + rng.uniform(0.3, 2.5) * splash / np.std(splash)
    return mix * _env(n, 0.1, 0.1)


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
