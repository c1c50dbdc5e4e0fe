"""The corpus v2: Piper and espeak-ng speech, real GCompris recordings, synthesized sound events
and music rendered from MIDI, each alone, speech over a sound and speech over music, over
background noise at a varied SNR. Manifests in the official format, as v1's
(`training.corpus`), whose phrases, voices, espeak-ng wrapper and manifest writer are reused.

Clip kinds: ``speech``, ``sound`` (a GCompris recording or one of v1's eight synthesizers),
``music`` (a piece from `training.music`, or a GCompris instrument or world-music recording),
``speech_sound`` and ``speech_music`` (the speech louder by 3-15 dB).

**Held out** in the test split: the espeak-ng voices and the phrases (v1's splits), the GCompris
files of `training.gcompris`'s ``test`` split (train and dev use its other labelled files), and
the music programs of `training.music.TEST_PROGRAMS`. **Piper's joe voice is in every split**:
it is the one natural voice there is; its clips are marked ``-piper`` in their file names
(``espeak`` clips ``-espeak``), so every figure can be given per engine.

Tasks: ``asr``, ``command``, ``audiocaption`` and ``QA`` (about speech, sounds and music: what
was said, man or woman, what the person is doing, which sound, which instrument and family, is
there music, tempo, key, mood, and speech-over-sound questions "what did the man say while a
dog was barking?") in ``train.json``, ``dev.json`` and ``test.json``; the paper's activation
tasks (``audio_story_telling`` stories and QA descriptions written from what was rendered) in
``activation.json``, kept out of ``train.json``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile

from agent.intents import format_intent
from streaming.errors import StreamingError
from streaming.pcm import SAMPLE_RATE_HZ
from training import gcompris, music, piper
from training.corpus import (
    PITCHES,
    SOUND_CAPTIONS,
    SOUND_CLASS_KEYWORDS,
    SOUND_CLASS_PHRASES,
    SPEEDS_WPM,
    SPLITS,
    VOICES,
    CorpusSize,
    CorpusSummary,
    Phrase,
    Split,
    finish_corpus,
    phrases_by_split,
    speak_voice,
    voice_gender,
    write_manifest,
    write_split_manifests,
)
from training.scenes import (
    BACKGROUND_NAMES,
    SOUND_EVENT_NAMES,
    SOUND_EVENTS,
    active_extent,
    background,
)

logger = logging.getLogger(__name__)

PIPER_VOICE = "piper:joe"
"""The ``voice`` of Piper clips: en_US joe, a man, in every split."""

KINDS = ("speech", "sound", "music", "speech_sound", "speech_music")

#: Clips per split and kind (`KINDS` order) for each size.
SIZES: dict[str, dict[Split, tuple[int, int, int, int, int]]] = {
    "tiny": {"train": (10, 8, 6, 4, 4), "dev": (3, 3, 3, 2, 2), "test": (6, 6, 6, 3, 3)},
    "small": {
        "train": (160, 80, 60, 40, 40),
        "dev": (24, 16, 12, 8, 8),
        "test": (48, 32, 24, 16, 16),
    },
    "full": {
        "train": (3000, 1400, 1000, 800, 800),
        "dev": (120, 64, 48, 32, 32),
        "test": (300, 160, 120, 80, 80),
    },
}  # fmt: skip
PIPER_SHARE = 0.5  # of speech clips; the rest espeak-ng
REAL_SOUND_SHARE = 0.6  # of sound clips (GCompris); the rest v1's synthesizers
REAL_MUSIC_SHARE = 0.25  # of music clips (GCompris instruments); the rest rendered
MAX_SECONDS = 9.5
MAX_BED_SECONDS = 8.0  # a recording or piece is cut to this before mixing

# -- the GCompris recordings, as classes and words ------------------------------------------

# sound class of training.gcompris -> (corpus class, phrase) for non-music recordings. Classes
# that v1 synthesizes too share its name (applause is v1's clapping, the ringing its phone).
_REAL_SOUNDS: dict[str, tuple[str, str]] = {
    "dog bark": ("dog", "a dog barking"),
    "dog": ("dog", "a dog barking"),
    "applause": ("clapping", "applause"),
    "rain": ("rain", "rain falling"),
    "car engine": ("car", "a car engine starting and stopping"),
    "car": ("car", "a car driving past"),
    "ringing": ("phone_ringing", "a phone ringing"),
    "door": ("door", "a door opening or closing"),
    "heartbeat": ("heartbeat", "a heartbeat"),
    "train": ("train", "a train"),
    "frogs": ("frogs", "frogs croaking during a storm"),
    "object falling": ("impact", "an object falling"),
    "hits": ("impact", "something being hit"),
    "knock": ("knocking", "knocking"),
    "water": ("running_water", "water"),
    "cat": ("cat", "a cat meowing"),
    "livestock": ("livestock", "farm animals"),
    "fowl": ("fowl", "birds of a farmyard"),
    "owl": ("owl", "an owl hooting"),
    "helicopter": ("helicopter", "a helicopter"),
}
# Finer words by file name where the name says more (all of them true of the recording).
_NAME_PHRASES: dict[str, str] = {
    "door_close": "a door closing",
    "door_open": "a door opening",
    "LRDoor_Open_2_LA": "a door opening",
    "cow": "a cow mooing",
    "horse": "a horse neighing",
    "pig": "a pig grunting",
    "sheep": "a sheep bleating",
    "chickens": "chickens clucking",
    "duck": "a duck quacking",
    "drip": "water dripping",
    "water_fill": "water filling a lock",
    "LRTrain_slowing_down_01_LA_cut": "a train slowing down",
}
#: Word stems naming each class in v2 captions, v1's stems included (`sound_classes_named`).
SOUND_KEYWORDS: dict[str, tuple[str, ...]] = {
    **SOUND_CLASS_KEYWORDS,
    "running_water": (*SOUND_CLASS_KEYWORDS["running_water"], "drip"),
    "dog": ("dog", "bark"),
    "rain": ("rain",),
    "car": ("car engine", "car driving", "engine"),
    # Not "door" alone: v1's knocking captions knock on a door.
    "door": ("door open", "door clos"),
    "heartbeat": ("heartbeat",),
    "train": ("train",),
    "frogs": ("frog", "croak"),
    "impact": ("object falling", "being hit"),
    "cat": ("meow",),
    "livestock": ("farm animal", "cow", "horse", "pig", "sheep"),
    "fowl": ("farmyard", "chicken", "duck"),
    "owl": ("owl",),
    "helicopter": ("helicopter",),
}
_CLASS_RES = {
    name: re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keys) + ")", re.IGNORECASE)
    for name, keys in SOUND_KEYWORDS.items()
}


def sound_classes_named(text: str) -> set[str]:
    """The v2 sound classes a caption names (by `SOUND_KEYWORDS`), e.g. ``{"dog"}``."""
    return {name for name, pattern in _CLASS_RES.items() if pattern.search(text)}


# GCompris instrument recordings (the `instruments` bundle), by file name: phrase, family.
_REAL_INSTRUMENTS: dict[str, tuple[str, str]] = {
    "accordion": ("an accordion", "free reed"),
    "banjo": ("a banjo", "guitar"),
    "bongo": ("bongo drums", "percussion"),
    "castanets": ("castanets", "percussion"),
    "cello": ("a cello", "strings"),
    "clarinet": ("a clarinet", "woodwinds"),
    "cymbal": ("a cymbal", "percussion"),
    "drum_kit": ("a drum kit", "percussion"),
    "electric_guitar": ("an electric guitar", "guitar"),
    "flute_traversiere": ("a flute", "woodwinds"),
    "guitar": ("a guitar", "guitar"),
    "harmonica": ("a harmonica", "free reed"),
    "harp": ("a harp", "strings"),
    "horn": ("a horn", "brass"),
    "maracas": ("maracas", "percussion"),
    "organ": ("an organ", "organ"),
    "piano": ("a piano", "piano"),
    "saxophone": ("a saxophone", "woodwinds"),
    "snare_drum": ("a snare drum", "percussion"),
    "tambourine": ("a tambourine", "percussion"),
    "timpani": ("timpani", "percussion"),
    "triangle": ("a triangle", "percussion"),
    "trombone": ("a trombone", "brass"),
    "trumpet": ("a trumpet", "brass"),
    "tuba": ("a tuba", "brass"),
    "violin": ("a violin", "strings"),
}
# Melodies in other bundles, by training.gcompris sound class.
_REAL_MELODIES: dict[str, tuple[str, str]] = {
    "guitar": ("a guitar", "guitar"),
    "xylophone": ("a xylophone", "mallets"),
    "gong": ("a gong", "percussion"),
}
_WORLD_MUSIC: dict[str, str] = {
    "africa": "African music",
    "america": "American music",
    "australia": "Australian music",
    "beethoven": "classical music by Beethoven",
    "ireland": "Irish music",
    "italy": "Italian music",
    "japan": "Japanese music",
    "mexico": "Mexican music",
    "middleeast": "Middle Eastern music",
}


@dataclass(frozen=True)
class RealLabel:
    """What a GCompris recording is, in the corpus's words.

    Attributes:
        key: the clip's ``bundle:path``.
        cls: the corpus sound class (``"dog"``), or ``"music"``.
        phrase: how captions name it (``"a dog barking"``, ``"a harp"``).
        family: the instrument family for an instrument recording, else ``""``.
    """

    key: str
    cls: str
    phrase: str
    family: str = ""

    @property
    def is_music(self) -> bool:
        """Whether it is music (an instrument, a melody or world music)."""
        return self.cls == "music"


def real_label(clip: gcompris.GcomprisClip) -> RealLabel | None:
    """The corpus label of a labelled GCompris clip; None for one the corpus does not use."""
    if clip.sound_class is None:
        return None
    if clip.bundle == "instruments" and clip.name in _REAL_INSTRUMENTS:
        phrase, family = _REAL_INSTRUMENTS[clip.name]
        return RealLabel(clip.key, "music", phrase, family)
    if clip.bundle == "explore_world_music" and clip.name in _WORLD_MUSIC:
        return RealLabel(clip.key, "music", _WORLD_MUSIC[clip.name])
    if clip.sound_class in _REAL_MELODIES:
        phrase, family = _REAL_MELODIES[clip.sound_class]
        return RealLabel(clip.key, "music", phrase, family)
    if clip.sound_class in _REAL_SOUNDS:
        cls, phrase = _REAL_SOUNDS[clip.sound_class]
        return RealLabel(clip.key, cls, _NAME_PHRASES.get(clip.name, phrase))
    return None


@functools.cache
def real_labels() -> dict[str, list[RealLabel]]:
    """The GCompris recordings the corpus uses, per corpus split: ``test`` gets
    `training.gcompris`'s test files, ``train`` and ``dev`` its other (dev) files.

    Raises:
        GcomprisDataError: ``gcompris-qt-data`` is not installed.
    """
    out: dict[str, list[RealLabel]] = {"train": [], "dev": [], "test": []}
    for clip in gcompris.list_clips():
        label = real_label(clip)
        if label is None or clip.split is None:
            continue
        for split in ("test",) if clip.split == "test" else ("train", "dev"):
            out[split].append(label)
    return out


@functools.cache
def _real_audio(key: str) -> npt.NDArray[np.float32]:
    by_key = {clip.key: clip for clip in gcompris.list_clips()}
    return gcompris.load_clip(by_key[key])


# -- clip specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpecV2:
    """Everything needed to render one v2 clip deterministically (picklable for workers).

    ``engine`` is ``piper`` or ``espeak`` for a clip with speech; ``real`` a `RealLabel` for a
    GCompris recording; ``synth`` one of v1's sound classes; ``piece`` a rendered piece.
    """

    clip_id: str
    split: Split
    kind: str
    seed: int
    phrase: Phrase | None = None
    engine: str = ""
    voice: str = ""
    speed_wpm: int = 160
    pitch: int = 50
    real: RealLabel | None = None
    synth: str = ""
    piece: music.MusicSpec | None = None
    background: str = "pink"
    noise_snr_db: float | None = None
    speech_over_bed_db: float = 0.0

    @property
    def has_music(self) -> bool:
        """Whether music is heard."""
        return self.piece is not None or (self.real is not None and self.real.is_music)

    @property
    def bed_phrase(self) -> str:
        """How captions name the sound or music under or instead of the speech ("" if none)."""
        if self.piece is not None:
            p = self.piece
            return f"{_a(p.tempo)} {p.instrument.name} {music.PATTERN_NOUNS[p.pattern]}"
        if self.real is not None:
            return self.real.phrase
        return SOUND_CLASS_PHRASES[self.synth] if self.synth else ""

    @property
    def sound_class(self) -> str:
        """The sound class heard (``""`` for none or for music)."""
        if self.synth:
            return self.synth
        return self.real.cls if self.real is not None and not self.real.is_music else ""


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _speech_fields(
    rng: np.random.Generator, pools: dict[str, list[Phrase]], split: Split
) -> dict[str, Any]:
    domains = [d for d in ("robot", "home", "question", "sentence") if pools.get(d)]
    weights = np.array([{"robot": 0.4, "home": 0.3}.get(d, 0.15) for d in domains])
    domain = domains[int(rng.choice(len(domains), p=weights / weights.sum()))]
    pool = pools[domain]
    fields: dict[str, Any] = {"phrase": pool[int(rng.integers(len(pool)))]}
    if rng.random() < PIPER_SHARE:
        fields.update(engine="piper", voice=PIPER_VOICE)
    else:
        voices = VOICES[split]
        fields.update(
            engine="espeak",
            voice=voices[int(rng.integers(len(voices)))],
            speed_wpm=int(rng.choice(SPEEDS_WPM)),
            pitch=int(rng.choice(PITCHES)),
        )
    return fields


def _noise_fields(rng: np.random.Generator) -> dict[str, Any]:
    clean = rng.random() < 0.15
    return {
        "background": str(rng.choice(BACKGROUND_NAMES)),
        "noise_snr_db": None if clean else round(float(rng.uniform(0.0, 30.0)), 1),
    }


def _sound_fields(rng: np.random.Generator, reals: list[RealLabel], i: int) -> dict[str, Any]:
    if reals and rng.random() < REAL_SOUND_SHARE:
        return {"real": reals[int(rng.integers(len(reals)))]}
    return {"synth": SOUND_EVENT_NAMES[i % len(SOUND_EVENT_NAMES)]}


def _music_fields(
    rng: np.random.Generator, reals: list[RealLabel], split: Split, real_share: float
) -> dict[str, Any]:
    if reals and rng.random() < real_share:
        return {"real": reals[int(rng.integers(len(reals)))]}
    return {"piece": music.random_music_spec(rng, music.programs_for(split))}


def make_specs(size: CorpusSize, seed: int) -> list[ClipSpecV2]:
    """The corpus's clips, deterministically from ``seed`` (and the installed GCompris data).

    Raises:
        ValueError: unknown size.
        StreamingError: ``gcompris-qt-data`` is not installed.
    """
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {sorted(SIZES)}")
    phrases = phrases_by_split()
    try:
        labels = real_labels()
    except gcompris.GcomprisDataError as exc:
        # A StreamingError is what the CLI reports as one line with exit code 2.
        raise StreamingError(str(exc)) from exc
    specs: list[ClipSpecV2] = []
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index, 2])
        sounds = [r for r in labels[split] if not r.is_music]
        musics = [r for r in labels[split] if r.is_music]
        counts = dict(zip(KINDS, SIZES[size][split], strict=True))
        for kind in KINDS:
            for i in range(counts[kind]):
                fields: dict[str, Any] = {}
                if kind.startswith("speech"):
                    fields.update(_speech_fields(rng, phrases[split], split))
                    if kind != "speech":
                        fields["speech_over_bed_db"] = round(float(rng.uniform(3.0, 15.0)), 1)
                if kind in ("sound", "speech_sound"):
                    fields.update(_sound_fields(rng, sounds, i))
                if kind == "music":
                    fields.update(_music_fields(rng, musics, split, REAL_MUSIC_SHARE))
                if kind == "speech_music":
                    # Background music under speech: rendered pieces only (a recording of
                    # a single drum hit is no bed).
                    fields.update(_music_fields(rng, musics, split, 0.0))
                fields.update(_noise_fields(rng))
                engine = f"-{fields['engine']}" if "engine" in fields else ""
                specs.append(
                    ClipSpecV2(
                        f"{split}-{kind}-{i:05d}{engine}",
                        split,
                        kind,
                        int(rng.integers(2**31)),
                        **fields,
                    )
                )
    return specs


# -- rendering -------------------------------------------------------------------------------


def _rms(x: npt.NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def _trimmed(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    start, end = active_extent(audio)
    return audio[start:end].astype(np.float64)


def piper_path(root: Path, text: str) -> Path:
    """Where `synthesize_corpus` keeps Piper's rendering of ``text`` (``piper/<sha1>.wav``)."""
    return root / "piper" / f"{hashlib.sha1(text.encode()).hexdigest()[:20]}.wav"


def _piper_chunk(args: tuple[list[str], int, str]) -> int:
    texts, seed, root = args
    for text, audio in zip(texts, piper.speak(texts, seed), strict=True):
        soundfile.write(piper_path(Path(root), text), audio, SAMPLE_RATE_HZ, subtype="FLOAT")
    return len(texts)


def render_piper(specs: list[ClipSpecV2], root: Path, seed: int, workers: int) -> int:
    """Speak every distinct Piper text of ``specs`` once, into ``root/piper/``.

    Piper loads its voice once per chunk of 24 texts (about a second) and draws its prosody
    noise from onnxruntime's seed, so texts are chunked in a fixed order (by hash) with a seed
    per chunk: the same corpus is spoken the same way on one machine.

    Returns:
        How many texts were spoken (those already there are skipped).

    Raises:
        StreamingError: Piper or its voice is not installed.
    """
    texts = sorted(
        {s.phrase.text for s in specs if s.engine == "piper" and s.phrase is not None},
        key=lambda t: hashlib.sha1(t.encode()).hexdigest(),
    )
    if not texts:
        return 0
    if not piper.available():
        raise StreamingError(f"the corpus v2 speaks with Piper; install it: {piper.PIP_INSTALL}")
    (root / "piper").mkdir(parents=True, exist_ok=True)
    chunks = [texts[i : i + 24] for i in range(0, len(texts), 24)]
    jobs = [
        (chunk, seed * 100_003 + n, str(root))
        for n, chunk in enumerate(chunks)
        if not all(piper_path(root, t).is_file() for t in chunk)
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return sum(pool.map(_piper_chunk, jobs))
    return sum(_piper_chunk(job) for job in jobs)


def _speech(spec: ClipSpecV2, root: Path) -> npt.NDArray[np.float64]:
    assert spec.phrase is not None
    if spec.engine == "piper":
        path = piper_path(root, spec.phrase.text)
        if not path.is_file():
            raise StreamingError(f"{path} is missing: run render_piper first")
        audio, _ = soundfile.read(str(path), dtype="float32")
        return _trimmed(np.asarray(audio, dtype=np.float32))
    return speak_voice(spec.phrase.text, spec.voice, spec.speed_wpm, spec.pitch).astype(np.float64)


def _bed(spec: ClipSpecV2, rng: np.random.Generator) -> npt.NDArray[np.float64] | None:
    """The sound or music of the clip, cut to `MAX_BED_SECONDS`."""
    if spec.piece is not None:
        bed = music.render_music(spec.piece).astype(np.float64)
    elif spec.real is not None:
        bed = _trimmed(_real_audio(spec.real.key))
    elif spec.synth:
        bed = SOUND_EVENTS[spec.synth](rng)
    else:
        return None
    return bed[: int(MAX_BED_SECONDS * SAMPLE_RATE_HZ)]


def render(spec: ClipSpecV2, root: Path) -> npt.NDArray[np.float32]:
    """The clip's samples (16 kHz mono float32), deterministic for the spec.

    Args:
        spec: the clip.
        root: the corpus directory (Piper's renderings are read from ``root/piper``).

    Raises:
        StreamingError: espeak-ng or fluidsynth fails, or a Piper rendering is missing.
        GcomprisDataError: a GCompris recording cannot be read.
    """
    rng = np.random.default_rng(spec.seed)
    speech = _speech(spec, root) if spec.phrase is not None else None
    bed = _bed(spec, rng)
    if speech is not None:
        speech = speech / max(_rms(speech), 1e-9) * 0.1
    if bed is not None:
        bed = bed / max(_rms(bed), 1e-9) * 0.1
    fg: npt.NDArray[np.float64]
    if speech is not None and bed is not None:
        bed = bed * 10 ** (-spec.speech_over_bed_db / 20)
        if spec.piece is not None:
            # Music under speech starts first and plays on under all of it.
            start_speech, start_bed = int(rng.uniform(0.3, 1.0) * SAMPLE_RATE_HZ), 0
            while bed.size < start_speech + speech.size:
                bed = np.concatenate([bed, bed])
        else:
            shift = int(rng.uniform(-0.5, 0.5) * SAMPLE_RATE_HZ)
            start_speech, start_bed = max(0, shift), max(0, -shift)
        length = max(start_speech + speech.size, start_bed + bed.size)
        if spec.piece is not None:
            length = start_speech + speech.size + int(0.3 * SAMPLE_RATE_HZ)
        fg = np.zeros(length)
        fg[start_speech : start_speech + speech.size] += speech
        part = bed[: length - start_bed]
        fg[start_bed : start_bed + part.size] += part
    else:
        only = speech if speech is not None else bed
        assert only is not None
        fg = only
    lead = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE_HZ)
    tail = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE_HZ)
    fg = np.pad(fg, (lead, tail))[: int(MAX_SECONDS * SAMPLE_RATE_HZ)]
    if spec.noise_snr_db is not None:
        noise = background(spec.background, fg.size / SAMPLE_RATE_HZ + 0.01, rng)[: fg.size]
        noise = np.pad(noise.astype(np.float64), (0, fg.size - noise.size))
        fg = fg + noise * (0.1 * 10 ** (-spec.noise_snr_db / 20))
    peak = float(np.abs(fg).max())
    target = float(rng.uniform(0.3, 0.9))
    out: npt.NDArray[np.float32] = (fg * (target / max(peak, 1e-9))).astype(np.float32)
    return out


def _render_to(args: tuple[ClipSpecV2, str, str]) -> str:
    spec, path, root = args
    soundfile.write(path, render(spec, Path(root)), SAMPLE_RATE_HZ, subtype="PCM_16")
    return path


# -- annotations -----------------------------------------------------------------------------


def _who(spec: ClipSpecV2) -> str:
    return voice_gender(spec.voice)


def _doing(spec: ClipSpecV2) -> str:
    """What the person is doing, in an answer's words."""
    assert spec.phrase is not None
    if spec.phrase.domain in ("robot", "home"):
        act = "giving a command"
    elif spec.phrase.domain == "question":
        act = "asking a question"
    else:
        act = "talking"
    if spec.kind == "speech_music":
        act += " while music plays"
    elif spec.kind == "speech_sound":
        act += f" while {spec.bed_phrase} can be heard"
    return f"The {_who(spec)} is {act}."


def caption(spec: ClipSpecV2, variant: int) -> str:
    """The clip's caption; says only what was rendered (``variant`` picks a phrasing)."""
    bed = spec.bed_phrase
    if spec.kind == "speech":
        assert spec.phrase is not None
        verb = {"question": "asks a question", "sentence": "speaks"}.get(
            spec.phrase.domain, "gives a command"
        )
        return f"A {_who(spec)} {verb}."
    if spec.kind == "speech_sound":
        return f"A {_who(spec)} speaks while {bed} can be heard."
    if spec.kind == "speech_music":
        return f"A {_who(spec)} speaks over {bed} playing in the background."
    if spec.piece is not None:
        return music.music_caption(spec.piece, variant)
    if spec.synth:
        options = SOUND_CAPTIONS[spec.synth]
        return options[variant % len(options)]
    assert spec.real is not None
    if spec.real.is_music:
        return (f"{_cap(bed)} is playing.", f"Music: {bed}.")[variant % 2]
    return (f"{_cap(bed)} can be heard.", f"The sound of {bed}.")[variant % 2]


def qa_pairs(spec: ClipSpecV2) -> list[tuple[str, str]]:
    """Every (question, answer) pair the clip answers exactly."""
    out: list[tuple[str, str]] = [
        ("Is there music?", "Yes." if spec.has_music else "No."),
        ("Is anyone speaking?", "Yes." if spec.phrase is not None else "No."),
    ]
    if spec.phrase is not None:
        phrase = spec.phrase
        who = _who(spec)
        command = phrase.intent["intent"] not in ("none", "question")
        out += [
            ("What did the speaker say?", phrase.transcript + "."),
            ("Is the speaker a man or a woman?", f"A {who}."),
            ("Is the speaker giving a command?", "Yes." if command else "No."),
            ("What is the person doing?", _doing(spec)),
        ]
        if "room" in phrase.intent:
            out.append(("Which room is mentioned?", f"The {phrase.intent['room']}."))
        if "object" in phrase.intent:
            out.append(("Which object is mentioned?", f"The {phrase.intent['object']}."))
        if spec.kind == "speech_sound":
            out.append(
                (f"What did the {who} say while {spec.bed_phrase} could be heard?",
                 phrase.transcript + ".")
            )  # fmt: skip
        if spec.kind == "speech_music":
            out.append((f"What did the {who} say over the music?", phrase.transcript + "."))
    if spec.sound_class:
        where = "in the background" if spec.phrase is not None else "in the audio"
        out.append((f"What sound can be heard {where}?", _cap(spec.bed_phrase) + "."))
    if spec.piece is not None:
        out += music.music_qa(spec.piece)
    elif spec.real is not None and spec.real.is_music and spec.real.family:
        out.append(("What instrument is playing?", _cap(spec.real.phrase) + "."))
        family = music.FAMILY_NAMES[spec.real.family]
        out.append(("Which instrument family is playing?", _cap(family) + "."))
    return out


def manifest_entries(spec: ClipSpecV2, path: str) -> list[dict[str, Any]]:
    """The train/dev/test manifest entries of one clip (v1's format and tasks).

    Every clip gets a caption, except speech-only clips, captioned in about 30 % of train and
    dev clips only (they teach the model not to invent sounds; test captions all have a sound
    or music); speech gets ``asr`` and ``command``; every clip gets two QA pairs, one of them
    the speech-over-sound question where there is one.
    """
    rng = np.random.default_rng([spec.seed, 1])
    out: list[dict[str, Any]] = []

    def add(task: str, text: str, question: str | None = None) -> None:
        entry: dict[str, Any] = {"path": path, "text": text, "task": task}
        if question is not None:
            entry["Q"] = question
        out.append(entry)

    if spec.phrase is not None:
        add("asr", spec.phrase.transcript)
        add("command", format_intent(spec.phrase.intent))
    if spec.kind != "speech" or (spec.split != "test" and rng.random() < 0.3):
        add("audiocaption", caption(spec, int(rng.integers(4))))
    pairs = qa_pairs(spec)
    over = [p for p in pairs if p[0].startswith("What did the ") and " say " in p[0]]
    first = over[0] if over and rng.random() < 0.5 else pairs[int(rng.integers(len(pairs)))]
    rest = [p for p in pairs if p != first]
    for question, answer in (first, rest[int(rng.integers(len(rest)))]):
        add("QA", answer, question)
    return out


#: Questions that ask for a description (activation data; none is an `UNSEEN_INSTRUCTIONS`).
DESCRIBE_QUESTIONS = (
    "Describe everything you can hear in this recording.",
    "Give a description of this audio clip.",
)


def describe(spec: ClipSpecV2) -> str:
    """A few sentences on what was rendered: speech, sound or music, and the background."""
    parts: list[str] = []
    if spec.phrase is not None:
        voice = "a natural voice" if spec.engine == "piper" else "a synthetic voice"
        parts.append(f'A {_who(spec)} speaks in {voice} and says: "{spec.phrase.transcript}."')
    if spec.piece is not None:
        p = spec.piece
        parts.append(
            f"{_cap(_a(p.instrument.name))} plays {_a(p.mood)} {music.PATTERN_NOUNS[p.pattern]}"
            f" at {_a(p.tempo)} tempo, in {p.key}."
        )
    elif spec.bed_phrase:
        parts.append(f"{_cap(spec.bed_phrase)} can be heard.")
    if spec.noise_snr_db is None:
        parts.append("There is no background noise.")
    else:
        loud = "faint" if spec.noise_snr_db >= 15 else "clearly audible"
        parts.append(f"Behind it there is a {loud} background noise.")
    return " ".join(parts)


def story(spec: ClipSpecV2) -> str:
    """A short story built on what was rendered (the paper's story-telling task)."""
    scene = "It was a quiet afternoon at home."
    if spec.has_music:
        scene = f"Somewhere in the house, {spec.bed_phrase} was playing."
    elif spec.bed_phrase:
        scene = f"It was an ordinary day until {spec.bed_phrase} could be heard."
    if spec.phrase is None:
        return (
            f"{scene} Nobody said a word. Everyone stopped for a moment to listen, and then"
            " went back to what they were doing."
        )
    who = _who(spec)
    pronoun = "she" if who == "woman" else "he"
    return (
        f'{scene} A {who} looked up and said, "{spec.phrase.transcript}." After a short'
        f" pause {pronoun} waited to see what would happen next."
    )


def activation_entries(spec: ClipSpecV2, path: str) -> list[dict[str, Any]]:
    """The clip's ``audio_story_telling`` story and description (for the activation stage)."""
    rng = np.random.default_rng([spec.seed, 2])
    question = DESCRIBE_QUESTIONS[int(rng.integers(len(DESCRIBE_QUESTIONS)))]
    return [
        {"path": path, "text": story(spec), "task": "audio_story_telling"},
        {"path": path, "text": describe(spec), "task": "QA", "Q": question},
    ]


# -- the corpus ------------------------------------------------------------------------------


def synthesize_corpus(
    directory: str | Path,
    *,
    size: CorpusSize = "small",
    seed: int = 0,
    workers: int = 2,
) -> CorpusSummary:
    """Render the v2 corpus's wavs and write its manifests and `meta.json`.

    Layout as v1's (``wavs/{split}/{clip_id}.wav``, ``train.json``, ``pretrain.json``,
    ``dev.json``, ``test.json``) plus ``activation.json`` (stories and descriptions of train
    clips) and ``piper/`` (Piper's rendering of each text, spoken first).

    Raises:
        StreamingError: Piper, espeak-ng, fluidsynth or ``gcompris-qt-data`` is missing, or
            one of them fails.
    """
    started = time.perf_counter()
    root = Path(directory)
    specs = make_specs(size, seed)
    for split in SPLITS:
        (root / "wavs" / split).mkdir(parents=True, exist_ok=True)
    spoken = render_piper(specs, root, seed, workers)
    jobs = [(s, str(root / "wavs" / s.split / f"{s.clip_id}.wav"), str(root)) for s in specs]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_to, jobs, chunksize=8))
    else:
        for job in jobs:
            _render_to(job)
    entries: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    activation: list[dict[str, Any]] = []
    for spec in specs:
        path = f"wavs/{spec.split}/{spec.clip_id}.wav"
        entries[spec.split] += manifest_entries(spec, path)
        if spec.split == "train":
            activation += activation_entries(spec, path)
    manifests = write_split_manifests(root, entries)
    manifests["activation"] = root / "activation.json"
    write_manifest(manifests["activation"], activation)
    clips: Counter[str] = Counter(spec.split for spec in specs)

    def per_split(values: Any) -> dict[str, list[Any]]:
        return {split: sorted({v for s in specs if s.split == split for v in values(s)})
                for split in SPLITS}  # fmt: skip

    meta = {
        "corpus": "v2",
        "size": size,
        "seed": seed,
        "piper_voice": PIPER_VOICE,
        "piper_texts": spoken,
        "voices": per_split(lambda s: [s.voice] if s.voice else []),
        "phrases": per_split(lambda s: [s.phrase.text] if s.phrase else []),
        "gcompris_files": per_split(lambda s: [s.real.key] if s.real else []),
        "music_programs": per_split(lambda s: [s.piece.program] if s.piece else []),
        "clips": dict(clips),
        "kinds": {split: dict(Counter(s.kind for s in specs if s.split == split))
                  for split in SPLITS},
        "entries": {split: dict(Counter(e["task"] for e in entries[split])) for split in SPLITS},
        "specs": [asdict(s) for s in specs],
    }  # fmt: skip
    return finish_corpus(root, meta, manifests, entries, clips, started)
