"""Music for the corpus: short pieces composed in code, written as MIDI and rendered by FluidSynth
with the FluidR3 General MIDI soundfont (Debian ``fluidsynth`` and ``fluid-soundfont-gm``).

Everything a caption or an answer says about a piece comes from its `MusicSpec`, so it is exact:
the instrument (one General MIDI program plays every note), its family, the tempo and its word
(slow, moderate, fast), the key and mode, the mood (a fixed function of tempo word and mode) and
the pattern (waltz, march, ballad, arpeggio, chords). `compose` turns a spec into notes with a
generator seeded by the spec's seed; `midi_bytes` writes them as a standard MIDI file (format 0,
one track: tempo, time signature, program change, note on/off); `render_music` runs
``fluidsynth -ni -F out.wav -r 16000 SOUNDFONT in.mid`` and returns 16 kHz mono float32.
`parse_midi` reads such a file back (for tests, and to check what was rendered).

The test split's instruments are held out by program (`TEST_PROGRAMS`: one or two per family),
so "which instrument family" is tested on instruments never heard in training.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import soundfile

from streaming.errors import StreamingError
from streaming.pcm import SAMPLE_RATE_HZ

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
"""Where Debian's ``fluid-soundfont-gm`` installs the soundfont (MIT licence)."""

TICKS_PER_BEAT = 480

Mode = Literal["major", "minor"]
Pattern = Literal["waltz", "march", "ballad", "arpeggio", "chords"]
PATTERNS: tuple[Pattern, ...] = ("waltz", "march", "ballad", "arpeggio", "chords")
MODES: tuple[Mode, ...] = ("major", "minor")


@dataclass(frozen=True)
class Instrument:
    """One General MIDI program.

    Attributes:
        program: the GM program number, 0-127.
        name: how captions name it (``"church organ"``).
        family: its family (``"organ"``), a key of `FAMILY_NAMES`.
        low: the lowest MIDI note its melody uses.
        high: the highest.
        chords: whether it plays chords (a flute or a trumpet plays one line).
    """

    program: int
    name: str
    family: str
    low: int
    high: int
    chords: bool


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument(0, "piano", "piano", 60, 84, True),
    Instrument(1, "bright piano", "piano", 60, 84, True),
    Instrument(2, "electric grand piano", "piano", 60, 84, True),
    Instrument(4, "electric piano", "piano", 57, 81, True),
    Instrument(16, "drawbar organ", "organ", 55, 79, True),
    Instrument(17, "percussive organ", "organ", 55, 79, True),
    Instrument(19, "church organ", "organ", 55, 79, True),
    Instrument(20, "reed organ", "organ", 55, 79, True),
    Instrument(21, "accordion", "free reed", 55, 79, True),
    Instrument(22, "harmonica", "free reed", 60, 84, False),
    Instrument(23, "bandoneon", "free reed", 55, 79, True),
    Instrument(24, "nylon guitar", "guitar", 52, 76, True),
    Instrument(25, "steel guitar", "guitar", 52, 76, True),
    Instrument(26, "jazz guitar", "guitar", 52, 76, True),
    Instrument(27, "electric guitar", "guitar", 52, 76, True),
    Instrument(40, "violin", "strings", 62, 88, False),
    Instrument(41, "viola", "strings", 55, 79, False),
    Instrument(42, "cello", "strings", 43, 67, False),
    Instrument(48, "string ensemble", "strings", 55, 79, True),
    Instrument(56, "trumpet", "brass", 58, 82, False),
    Instrument(57, "trombone", "brass", 43, 67, False),
    Instrument(60, "french horn", "brass", 48, 72, False),
    Instrument(61, "brass section", "brass", 55, 77, True),
    Instrument(65, "alto saxophone", "woodwinds", 52, 76, False),
    Instrument(68, "oboe", "woodwinds", 60, 84, False),
    Instrument(71, "clarinet", "woodwinds", 52, 79, False),
    Instrument(73, "flute", "woodwinds", 64, 91, False),
    Instrument(74, "recorder", "woodwinds", 64, 88, False),
    Instrument(75, "pan flute", "woodwinds", 62, 86, False),
    Instrument(8, "celesta", "mallets", 64, 88, True),
    Instrument(11, "vibraphone", "mallets", 60, 84, True),
    Instrument(12, "marimba", "mallets", 55, 79, True),
    Instrument(13, "xylophone", "mallets", 67, 91, True),
)
INSTRUMENT_BY_PROGRAM: dict[int, Instrument] = {i.program: i for i in INSTRUMENTS}

#: How answers name each family ("Which instrument family is playing?" -> "Brass.").
FAMILY_NAMES: dict[str, str] = {
    "piano": "piano",
    "organ": "organ",
    "free reed": "free reed (accordion or harmonica)",
    "guitar": "guitar",
    "strings": "strings",
    "brass": "brass",
    "woodwinds": "woodwinds",
    "mallets": "mallet percussion",
    "percussion": "percussion",
}

#: Programs only the test split plays: one per family, two of the six woodwinds. Every family
#: keeps at least two programs for training.
TEST_PROGRAMS: frozenset[int] = frozenset({1, 20, 22, 26, 41, 60, 71, 74, 12})


def programs_for(split: str) -> tuple[int, ...]:
    """The GM programs a split plays: the test split `TEST_PROGRAMS`, the others the rest."""
    test = split == "test"
    return tuple(i.program for i in INSTRUMENTS if (i.program in TEST_PROGRAMS) == test)


KEY_NAMES = ("C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B")
_SCALES: dict[Mode, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
}
# Chord roots as scale degrees (0 = tonic), one chord per bar, repeated as needed.
_PROGRESSIONS: dict[Mode, tuple[tuple[int, ...], ...]] = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (0, 3, 0, 4)),
    "minor": ((0, 3, 4, 0), (0, 5, 2, 6), (0, 6, 5, 4), (0, 3, 6, 4)),
}
#: Beats per bar of each pattern.
METER: dict[Pattern, int] = {"waltz": 3, "march": 2, "ballad": 4, "arpeggio": 4, "chords": 4}
#: Tempo range (beats per minute) each pattern is drawn from; a ballad is always slow.
TEMPO_RANGE: dict[Pattern, tuple[int, int]] = {
    "waltz": (72, 168),
    "march": (96, 132),
    "ballad": (52, 84),
    "arpeggio": (60, 150),
    "chords": (60, 150),
}
#: The mood a piece is described with: a fixed function of its tempo word and mode.
MOODS: dict[tuple[str, Mode], str] = {
    ("slow", "major"): "calm",
    ("slow", "minor"): "sad",
    ("moderate", "major"): "happy",
    ("moderate", "minor"): "melancholic",
    ("fast", "major"): "cheerful",
    ("fast", "minor"): "tense",
}


def tempo_word(bpm: int) -> str:
    """``"slow"`` under 90 beats per minute, ``"moderate"`` under 120, else ``"fast"``."""
    return "slow" if bpm < 90 else "moderate" if bpm < 120 else "fast"


@dataclass(frozen=True)
class MusicSpec:
    """One piece, everything about it that captions may say.

    Attributes:
        program: the GM program (a key of `INSTRUMENT_BY_PROGRAM`).
        tempo_bpm: beats per minute.
        tonic: the key's pitch class, 0 (C) to 11 (B).
        mode: ``major`` or ``minor``.
        pattern: the accompaniment and rhythm (`PATTERNS`).
        seed: the melody's and progression's random seed.
        seconds: about how long the piece is (whole bars, at least two).
    """

    program: int
    tempo_bpm: int
    tonic: int
    mode: Mode
    pattern: Pattern
    seed: int
    seconds: float = 6.0

    @property
    def instrument(self) -> Instrument:
        """The instrument playing."""
        return INSTRUMENT_BY_PROGRAM[self.program]

    @property
    def family(self) -> str:
        """The instrument's family."""
        return self.instrument.family

    @property
    def tempo(self) -> str:
        """``slow``, ``moderate`` or ``fast`` (`tempo_word`)."""
        return tempo_word(self.tempo_bpm)

    @property
    def mood(self) -> str:
        """The mood of the tempo word and mode (`MOODS`)."""
        return MOODS[(self.tempo, self.mode)]

    @property
    def key(self) -> str:
        """The key in words, e.g. ``"E flat minor"``."""
        return f"{KEY_NAMES[self.tonic]} {self.mode}"

    @property
    def beats_per_bar(self) -> int:
        """The meter's beats per bar."""
        return METER[self.pattern]

    @property
    def bars(self) -> int:
        """Whole bars closest to `seconds`, at least 2."""
        bar_s = self.beats_per_bar * 60.0 / self.tempo_bpm
        return max(2, round(self.seconds / bar_s))


def random_music_spec(
    rng: np.random.Generator, programs: tuple[int, ...], seconds: float = 6.0
) -> MusicSpec:
    """A piece with every attribute drawn from ``rng`` (the program from ``programs``)."""
    pattern: Pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    low, high = TEMPO_RANGE[pattern]
    return MusicSpec(
        program=int(programs[int(rng.integers(len(programs)))]),
        tempo_bpm=int(rng.integers(low, high + 1)),
        tonic=int(rng.integers(12)),
        mode=MODES[int(rng.integers(2))],
        pattern=pattern,
        seed=int(rng.integers(2**31)),
        seconds=seconds,
    )


# -- composing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """One note: start and length in ticks (`TICKS_PER_BEAT` per beat), MIDI pitch, velocity."""

    start: int
    length: int
    pitch: int
    velocity: int


def _pitch(tonic: int, mode: Mode, degree: int, base_octave: int) -> int:
    """The MIDI pitch of a scale degree (may be negative or above 6) above C of an octave."""
    octave, step = divmod(degree, 7)
    return 12 * (base_octave + octave) + tonic + _SCALES[mode][step]


def _chord(spec: MusicSpec, root: int, octave: int) -> list[int]:
    """The triad on scale degree ``root``; minor keys raise the dominant's third (the leading
    tone of harmonic minor), so their V is major and the cadence is heard as minor."""
    notes = [_pitch(spec.tonic, spec.mode, root + k, octave) for k in (0, 2, 4)]
    if spec.mode == "minor" and root % 7 == 4:
        notes[1] += 1
    return notes


def _in_range(pitch: int, low: int, high: int) -> int:
    while pitch < low:
        pitch += 12
    while pitch > high:
        pitch -= 12
    return pitch


# Melody rhythms per pattern, in beats: one bar's note lengths.
_RHYTHMS: dict[Pattern, tuple[tuple[float, ...], ...]] = {
    "waltz": ((2.0, 1.0), (1.0, 1.0, 1.0), (3.0,)),
    "march": ((0.75, 0.25, 1.0), (1.0, 1.0), (0.5, 0.5, 1.0)),
    "ballad": ((2.0, 2.0), (3.0, 1.0), (4.0,), (1.0, 1.0, 2.0)),
    "arpeggio": ((2.0, 2.0), (4.0,)),
    "chords": ((1.0, 1.0, 2.0), (2.0, 2.0), (1.0, 1.0, 1.0, 1.0)),
}


def compose(spec: MusicSpec) -> list[Note]:
    """The piece's notes, sorted by start; deterministic for the spec.

    One chord per bar from a progression of the mode; a melody walking the scale within the
    instrument's range, on a chord tone at each bar's start and on the tonic at the end; an
    accompaniment by pattern (waltz: bass then two chords; march: bass and off-beat chords;
    ballad: held chords; arpeggio: broken chords in eighths; chords: a block chord every beat).
    A one-line instrument (a flute) plays the melody only, or the arpeggio as its line.
    """
    rng = np.random.default_rng(spec.seed)
    inst = spec.instrument
    beat = TICKS_PER_BEAT
    bar_ticks = spec.beats_per_bar * beat
    progressions = _PROGRESSIONS[spec.mode]
    progression = progressions[int(rng.integers(len(progressions)))]
    roots = [progression[b % len(progression)] for b in range(spec.bars)]
    roots[-1] = 0  # end on the tonic chord
    centre = (inst.low + inst.high) // 2
    octave = (centre - spec.tonic) // 12
    # Chords sit just below the melody's range and the bass an octave under them.
    accomp_octave = -(-(inst.low - 12 - spec.tonic) // 12)
    notes: list[Note] = []
    solo_arpeggio = spec.pattern == "arpeggio" and not inst.chords
    degree = 0
    for bar, root in enumerate(roots):
        t0 = bar * bar_ticks
        chord = _chord(spec, root, accomp_octave)
        bass = chord[0] - 12
        if solo_arpeggio:
            line = [_in_range(p, inst.low, inst.high) for p in _chord(spec, root, octave)]
            order = [0, 1, 2, 1] * spec.beats_per_bar
            for k in range(2 * spec.beats_per_bar):
                notes.append(Note(t0 + k * beat // 2, beat // 2, line[order[k]], 84))
            continue
        rhythms = _RHYTHMS[spec.pattern]
        rhythm = rhythms[int(rng.integers(len(rhythms)))]
        scale_sum = sum(rhythm)
        t = t0
        for k, beats in enumerate(rhythm):
            if k == 0:
                # A chord tone on the bar's first beat keeps the melody on the harmony.
                degree = root + 2 * int(rng.integers(3))
            else:
                degree += int(rng.choice([-2, -1, -1, 1, 1, 2]))
            if bar == len(roots) - 1 and k == len(rhythm) - 1:
                degree = 7 * round(degree / 7)
            pitch = _in_range(_pitch(spec.tonic, spec.mode, degree, octave), inst.low, inst.high)
            length = round(beats * bar_ticks / scale_sum)
            notes.append(Note(t, max(1, length - 20), pitch, 100))
            t += length
        if not inst.chords:
            continue
        notes += _accompaniment(spec.pattern, t0, bar_ticks, chord, bass)
    return _one_voice_per_pitch(notes)


def _one_voice_per_pitch(notes: list[Note]) -> list[Note]:
    """The notes with no two of one pitch sounding at once, sorted by start and pitch.

    On one MIDI channel a note-off ends every sounding note of its pitch, so an accompaniment
    note under a melody note of the same pitch would be cut short or left hanging: a note
    starting with a louder one of its pitch is dropped, and one still sounding when its pitch
    starts again ends there.
    """
    kept: dict[int, int] = {}  # pitch -> index in out of its latest note
    out: list[Note] = []
    for note in sorted(notes, key=lambda n: (n.start, -n.velocity, n.pitch)):
        last = kept.get(note.pitch)
        if last is not None:
            prev = out[last]
            if prev.start == note.start:
                continue
            if prev.start + prev.length > note.start:
                out[last] = Note(prev.start, note.start - prev.start, prev.pitch, prev.velocity)
        kept[note.pitch] = len(out)
        out.append(note)
    return sorted(out, key=lambda n: (n.start, n.pitch))


def _accompaniment(
    pattern: Pattern, t0: int, bar_ticks: int, chord: list[int], bass: int
) -> list[Note]:
    beat = TICKS_PER_BEAT
    out: list[Note] = []
    soft, softer = 70, 60

    def block(start: int, length: int, velocity: int) -> None:
        out.extend(Note(start, length, p, velocity) for p in chord)

    if pattern == "waltz":
        out.append(Note(t0, beat - 20, bass, soft))
        block(t0 + beat, beat - 40, softer)
        block(t0 + 2 * beat, beat - 40, softer)
    elif pattern == "march":
        out.append(Note(t0, beat // 2, bass, soft))
        block(t0 + beat, beat // 2, softer)
    elif pattern == "ballad":
        out.append(Note(t0, bar_ticks - 20, bass, softer))
        block(t0, bar_ticks - 20, softer)
    elif pattern == "arpeggio":
        order = [0, 1, 2, 1]
        for k in range(bar_ticks // (beat // 2)):
            out.append(Note(t0 + k * beat // 2, beat // 2, chord[order[k % 4]], softer))
    else:  # chords
        out.append(Note(t0, bar_ticks // 2 - 20, bass, soft))
        for k in range(bar_ticks // beat):
            block(t0 + k * beat, beat - 60, softer)
    return out


# -- MIDI files ------------------------------------------------------------------------------


def _vlq(value: int) -> bytes:
    """A MIDI variable-length quantity: 7 bits per byte, most significant first."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def midi_bytes(
    notes: list[Note], program: int, tempo_bpm: int, beats_per_bar: int = 4, channel: int = 0
) -> bytes:
    """A standard MIDI file (format 0, one track, `TICKS_PER_BEAT` ticks per quarter note).

    The track holds the tempo and time signature (meta events), one program change, the
    notes as note-on/note-off pairs on ``channel`` (never 9, General MIDI's drums) and the end
    of track.

    Raises:
        ValueError: a program, pitch, velocity or channel out of range.
    """
    if not 0 <= program <= 127 or not 0 <= channel <= 15 or channel == 9:
        raise ValueError(f"program {program} / channel {channel} out of range (channel 9: drums)")
    events: list[tuple[int, int, bytes]] = []  # (tick, order, bytes); note-offs sort first
    for note in notes:
        if not (0 <= note.pitch <= 127 and 1 <= note.velocity <= 127 and note.length > 0):
            raise ValueError(f"bad note {note}")
        events.append((note.start, 1, bytes([0x90 | channel, note.pitch, note.velocity])))
        events.append((note.start + note.length, 0, bytes([0x80 | channel, note.pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    micros = round(60_000_000 / tempo_bpm)
    track = bytearray()
    track += _vlq(0) + b"\xff\x51\x03" + micros.to_bytes(3, "big")
    # Time signature: numerator, denominator as a power of 2, clocks per click, 32nds per beat.
    track += _vlq(0) + b"\xff\x58\x04" + bytes([beats_per_bar, 2, 24, 8])
    track += _vlq(0) + bytes([0xC0 | channel, program])
    now = 0
    for tick, _, data in events:
        track += _vlq(tick - now) + data
        now = tick
    track += _vlq(0) + b"\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_BEAT)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def _read_vlq(data: bytes, i: int, end: int) -> tuple[int, int]:
    """A variable-length quantity at ``data[i]`` and the index after it."""
    value = 0
    while True:
        if i >= end:
            raise ValueError("truncated variable-length quantity")
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i


@dataclass(frozen=True)
class MidiFile:
    """What `parse_midi` read: the header, the first tempo and program, and the notes."""

    format: int
    tracks: int
    division: int
    tempo_bpm: float | None
    beats_per_bar: int | None
    programs: tuple[int, ...]
    notes: tuple[Note, ...]


def parse_midi(data: bytes) -> MidiFile:
    """Read a standard MIDI file (any format; running status, meta and sysex events).

    Notes are paired note-on/note-off per channel and pitch (a note-on of velocity 0 is a
    note-off).

    Raises:
        ValueError: not a MIDI file, truncated, or a note-off without its note-on.
    """
    if data[:4] != b"MThd":
        raise ValueError(f"not a MIDI file: starts with {data[:4]!r}")
    try:
        length, fmt, ntracks, division = struct.unpack_from(">IHHH", data, 4)
    except struct.error as exc:
        raise ValueError("truncated MIDI header") from exc
    pos = 8 + length
    tempo: float | None = None
    meter: int | None = None
    programs: list[int] = []
    notes: list[Note] = []
    for _ in range(ntracks):
        if data[pos : pos + 4] != b"MTrk":
            raise ValueError(f"expected MTrk at byte {pos}, got {data[pos : pos + 4]!r}")
        (size,) = struct.unpack_from(">I", data, pos + 4)
        end = pos + 8 + size
        if end > len(data):
            raise ValueError("truncated MIDI track")
        i, tick, status = pos + 8, 0, 0

        open_notes: dict[tuple[int, int], tuple[int, int]] = {}

        while i < end:
            delta, i = _read_vlq(data, i, end)
            tick += delta
            if data[i] & 0x80:
                status = data[i]
                i += 1
            if status == 0xFF:
                kind = data[i]
                i += 1
                n, i = _read_vlq(data, i, end)
                payload = data[i : i + n]
                i += n
                if kind == 0x51 and tempo is None:
                    tempo = 60_000_000 / int.from_bytes(payload, "big")
                elif kind == 0x58 and meter is None:
                    meter = payload[0]
                elif kind == 0x2F:
                    break
                continue
            if status in (0xF0, 0xF7):
                n, i = _read_vlq(data, i, end)
                i += n
                continue
            kind, channel = status & 0xF0, status & 0x0F
            width = 1 if kind in (0xC0, 0xD0) else 2
            args = data[i : i + width]
            i += width
            if kind == 0xC0:
                programs.append(args[0])
            elif kind == 0x90 and args[1] > 0:
                open_notes[(channel, args[0])] = (tick, args[1])
            elif kind == 0x80 or kind == 0x90:
                start = open_notes.pop((channel, args[0]), None)
                if start is None:
                    raise ValueError(f"note-off of pitch {args[0]} at tick {tick} never started")
                notes.append(Note(start[0], tick - start[0], args[0], start[1]))
        pos = end
    notes.sort(key=lambda n: (n.start, n.pitch))
    return MidiFile(fmt, ntracks, division, tempo, meter, tuple(programs), tuple(notes))


# -- rendering -------------------------------------------------------------------------------


def fluidsynth_available(soundfont: Path = SOUNDFONT) -> bool:
    """Whether the ``fluidsynth`` program and the soundfont are installed."""
    return shutil.which("fluidsynth") is not None and Path(soundfont).is_file()


def render_midi(
    data: bytes, soundfont: Path = SOUNDFONT, tail_s: float = 0.6
) -> npt.NDArray[np.float32]:
    """Render MIDI bytes with the ``fluidsynth`` CLI at 16 kHz; mono float32, peak 0.5.

    FluidSynth renders until every voice and its reverb has died away; the output is cut
    ``tail_s`` after the last note's end (fading out over that tail) so pieces end alike.

    Raises:
        StreamingError: fluidsynth or the soundfont is missing, fails, or renders silence.
    """
    if not fluidsynth_available(soundfont):
        raise StreamingError(
            f"fluidsynth or {soundfont} not found; install the Debian packages fluidsynth and"
            " fluid-soundfont-gm"
        )
    midi = parse_midi(data)
    last_tick = max((n.start + n.length for n in midi.notes), default=0)
    seconds = last_tick / midi.division * 60.0 / (midi.tempo_bpm or 120.0) + tail_s
    with tempfile.TemporaryDirectory(prefix="salmonn-music-") as tmp:
        mid, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        mid.write_bytes(data)
        cmd = ["fluidsynth", "-ni", "-q", "-o", "synth.dynamic-sample-loading=1"]
        cmd += ["-T", "wav", "-O", "float", "-F", str(wav), "-r", str(SAMPLE_RATE_HZ)]
        try:
            subprocess.run(
                [*cmd, str(soundfont), str(mid)], capture_output=True, check=True, timeout=120
            )
            audio, rate_hz = soundfile.read(str(wav), dtype="float32", always_2d=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise StreamingError(f"fluidsynth failed: {exc}") from exc
    if rate_hz != SAMPLE_RATE_HZ:
        raise StreamingError(f"fluidsynth wrote {rate_hz} Hz, asked for {SAMPLE_RATE_HZ}")
    mono = audio.mean(axis=1)[: int(seconds * SAMPLE_RATE_HZ)].astype(np.float64)
    fade = min(int(tail_s * SAMPLE_RATE_HZ), mono.size)
    if fade:
        mono[-fade:] *= np.linspace(1.0, 0.0, fade)
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if peak == 0.0:
        raise StreamingError("fluidsynth rendered silence")
    out: npt.NDArray[np.float32] = (mono * (0.5 / peak)).astype(np.float32)
    return out


def render_music(spec: MusicSpec, soundfont: Path = SOUNDFONT) -> npt.NDArray[np.float32]:
    """The piece rendered: `compose`, `midi_bytes`, `render_midi`. Same spec, same samples.

    Raises:
        StreamingError: fluidsynth or the soundfont is missing or fails.
    """
    data = midi_bytes(compose(spec), spec.program, spec.tempo_bpm, spec.beats_per_bar)
    return render_midi(data, soundfont)


# -- words -----------------------------------------------------------------------------------


#: How captions name each pattern.
PATTERN_NOUNS: dict[Pattern, str] = {
    "waltz": "waltz",
    "march": "march",
    "ballad": "ballad",
    "arpeggio": "arpeggio piece",
    "chords": "chord piece",
}


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: ``"an oboe"``, ``"a flute"``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def music_caption(spec: MusicSpec, variant: int) -> str:
    """A caption that says only what was rendered; ``variant`` picks one of four phrasings."""
    inst = spec.instrument.name
    piece = PATTERN_NOUNS[spec.pattern]
    options = (
        f"{_cap(_a(spec.tempo))} {inst} {piece} in {spec.key}.",
        f"{_cap(_a(inst))} plays {_a(spec.mood)} {piece} in a {spec.mode} key.",
        f"{_cap(_a(spec.mood))}, {spec.tempo} melody on {_a(inst)}, in a {spec.mode} key.",
        f"Music: {_a(inst)} playing {_a(spec.tempo)} {piece} in {spec.key}.",
    )
    return options[variant % len(options)]


def music_qa(spec: MusicSpec) -> list[tuple[str, str]]:
    """(question, answer) pairs about the piece, every answer exact."""
    return [
        ("What instrument is playing?", _cap(_a(spec.instrument.name)) + "."),
        ("Which instrument family is playing?", _cap(FAMILY_NAMES[spec.family]) + "."),
        ("Is the music fast or slow?", _cap(spec.tempo) + "."),
        ("Is the music in a major or a minor key?", f"A {spec.mode} key."),
        ("What is the mood of the music?", _cap(spec.mood) + "."),
        ("What kind of piece is it?", _cap(_a(PATTERN_NOUNS[spec.pattern])) + "."),
        ("Is there music?", "Yes."),
    ]
