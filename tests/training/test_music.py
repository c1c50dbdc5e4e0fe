"""Music composed in code: the MIDI bytes parse back to the notes, FluidSynth renders them at
their pitches, renders repeat exactly, and the facts captions use are what was rendered."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import numpy.typing as npt
import pytest

from streaming.pcm import SAMPLE_RATE_HZ
from training.music import (
    FAMILY_NAMES,
    INSTRUMENT_BY_PROGRAM,
    INSTRUMENTS,
    METER,
    PATTERNS,
    TEST_PROGRAMS,
    TICKS_PER_BEAT,
    MusicSpec,
    Note,
    compose,
    fluidsynth_available,
    midi_bytes,
    music_caption,
    music_qa,
    parse_midi,
    programs_for,
    random_music_spec,
    render_midi,
    render_music,
)

needs_fluidsynth = pytest.mark.skipif(
    not fluidsynth_available(), reason="needs the Debian packages fluidsynth, fluid-soundfont-gm"
)


def _hz(pitch: int) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def _band_power(audio: npt.NDArray[np.float32], hz: float, cents: float = 30.0) -> float:
    """Power of the audio's spectrum within ``cents`` of ``hz``, per bin."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size))) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE_HZ)
    ratio = 2 ** (cents / 1200)
    band = (freqs >= hz / ratio) & (freqs <= hz * ratio)
    return float(spectrum[band].mean())


def test_midi_bytes_parse_back_to_the_notes_tempo_meter_and_program() -> None:
    spec = MusicSpec(program=19, tempo_bpm=96, tonic=2, mode="minor", pattern="waltz", seed=5)
    notes = compose(spec)
    data = midi_bytes(notes, spec.program, spec.tempo_bpm, spec.beats_per_bar)
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    (track_len,) = struct.unpack(">I", data[18:22])
    assert len(data) == 22 + track_len  # one track, nothing after it
    midi = parse_midi(data)
    assert (midi.format, midi.tracks, midi.division) == (0, 1, TICKS_PER_BEAT)
    assert midi.programs == (19,)
    assert midi.beats_per_bar == 3
    assert midi.tempo_bpm == pytest.approx(96, abs=0.01)
    assert list(midi.notes) == notes


def test_parse_midi_reads_running_status_and_velocity_zero_note_offs() -> None:
    # Hand-written: note-on C4, then (running status) note-on C4 velocity 0 = its note-off.
    track = bytes([0x00, 0xC0, 5, 0x00, 0x90, 60, 80, 0x83, 0x60, 60, 0, 0x00, 0xFF, 0x2F, 0])
    data = b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk"
    data += struct.pack(">I", len(track)) + track
    midi = parse_midi(data)
    assert midi.programs == (5,)
    assert midi.notes == (Note(0, 480, 60, 80),)  # 0x83 0x60 is the VLQ of 480
    with pytest.raises(ValueError, match="not a MIDI file"):
        parse_midi(b"RIFF" + data[4:])


def test_midi_bytes_refuses_the_drum_channel_and_bad_notes() -> None:
    with pytest.raises(ValueError, match="channel"):
        midi_bytes([Note(0, 10, 60, 90)], 0, 120, channel=9)
    with pytest.raises(ValueError, match="bad note"):
        midi_bytes([Note(0, 10, 130, 90)], 0, 120)


def test_composition_follows_the_spec() -> None:
    for pattern in PATTERNS:
        for program in (0, 73):  # a chord instrument and a one-line one
            spec = MusicSpec(program, 100, 7, "major", pattern, seed=11)
            notes = compose(spec)
            inst = INSTRUMENT_BY_PROGRAM[program]
            bar = METER[pattern] * TICKS_PER_BEAT
            assert notes and max(n.start + n.length for n in notes) <= spec.bars * bar
            scale = {(7 + s) % 12 for s in (0, 2, 4, 5, 7, 9, 11)}  # G major
            assert {n.pitch % 12 for n in notes} <= scale
            # No two notes of one pitch at once (a note-off would end both).
            for pitch in {n.pitch for n in notes}:
                same = [n for n in notes if n.pitch == pitch]
                assert all(a.start + a.length <= b.start for a, b in itertools.pairwise(same))
            if not inst.chords:
                # One line: never two notes sounding at once, all within the range.
                assert all(inst.low <= n.pitch <= inst.high for n in notes)
                ends = [n.start + n.length for n in notes]
                assert all(e <= n.start for e, n in zip(ends, notes[1:], strict=False))
    # A minor key's dominant chord has the raised leading tone (F sharp in G minor).
    minor = compose(MusicSpec(0, 100, 7, "minor", "chords", seed=3, seconds=20))
    assert {n.pitch % 12 for n in minor} <= {7, 9, 10, 0, 2, 3, 5, 6}


def test_splits_hold_out_programs_and_keep_every_family_in_training() -> None:
    train, test = set(programs_for("train")), set(programs_for("test"))
    assert test == set(TEST_PROGRAMS) and not train & test
    assert set(programs_for("dev")) == train
    families = {i.family for i in INSTRUMENTS}
    assert families <= set(FAMILY_NAMES)
    for family in families:
        members = {i.program for i in INSTRUMENTS if i.family == family}
        assert len(members & train) >= 2, family
        assert members & test, family
    rng = np.random.default_rng(0)
    drawn = {random_music_spec(rng, programs_for("test")).program for _ in range(200)}
    assert drawn <= test


def test_words_say_what_the_spec_is() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        spec = random_music_spec(rng, programs_for("train"))
        if spec.pattern == "ballad":
            assert spec.tempo == "slow"
        for variant in range(4):
            caption = music_caption(spec, variant)
            assert spec.instrument.name in caption
            assert spec.mode in caption
        answers = dict(music_qa(spec))
        assert answers["Is there music?"] == "Yes."
        assert spec.instrument.name in answers["What instrument is playing?"].lower()
        assert answers["What is the mood of the music?"].lower().rstrip(".") == spec.mood
    slow_minor = MusicSpec(0, 70, 9, "minor", "ballad", seed=1)
    assert (slow_minor.tempo, slow_minor.mood, slow_minor.key) == ("slow", "sad", "A minor")
    assert music_caption(slow_minor, 0) == "A slow piano ballad in A minor."


@needs_fluidsynth
def test_a_rendered_note_has_energy_at_its_fundamental() -> None:
    for program, pitch in ((19, 69), (73, 72), (0, 64)):
        audio = render_midi(midi_bytes([Note(0, 2 * TICKS_PER_BEAT, pitch, 100)], program, 60))
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert 2.0 <= audio.size / SAMPLE_RATE_HZ <= 3.0  # two beats at 60 bpm plus the tail
        assert float(np.sqrt(np.mean(audio**2))) > 0.02
        body = audio[: 2 * SAMPLE_RATE_HZ]
        at_note = _band_power(body, _hz(pitch))
        # A semitone either side holds far less: the note is at its pitch, not a neighbour's.
        assert at_note > 10 * _band_power(body, _hz(pitch + 1)), program
        assert at_note > 10 * _band_power(body, _hz(pitch - 1)), program


@needs_fluidsynth
def test_a_rendered_piece_sounds_its_notes_and_repeats_exactly() -> None:
    spec = MusicSpec(73, 90, 0, "major", "ballad", seed=4)  # a flute: one line, clear pitches
    audio = render_music(spec)
    notes = compose(spec)
    assert np.abs(audio).max() == pytest.approx(0.5, abs=1e-3)
    played = {n.pitch for n in notes}
    for pitch in played:
        # Each played pitch holds more energy than the quarter tones around it.
        at = _band_power(audio, _hz(pitch), cents=20)
        off = max(_band_power(audio, _hz(pitch) * 2 ** (s / 24), cents=20) for s in (-1, 1))
        assert at > 3 * off, pitch
    again = render_music(spec)
    assert np.array_equal(audio, again)
    other = render_music(MusicSpec(73, 90, 0, "major", "ballad", seed=5))
    assert other.shape != audio.shape or not np.array_equal(other, audio)
