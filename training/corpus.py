"""The synthetic training corpus: espeak-ng speech and synthesized sound events, written as wavs
with manifests in the official SALMONN format (`{"annotation": [{"path", "text", "task", "Q"?}]}`).

Clips are of three kinds:

- ``speech``: one utterance (robot command, smart-home command, question or ordinary sentence)
  in one espeak-ng voice (accent + variant), speed and pitch, over background noise at a random
  SNR (or clean); annotated for ``asr``, ``command`` and sometimes ``QA`` / ``audiocaption``.
- ``sound``: one of the eight sound events of `training.scenes` over background noise;
  annotated for ``audiocaption`` and ``QA``.
- ``mix``: an utterance over a sound event (speech louder), over noise; all tasks.

The test split's voices AND phrases are held out: voices come from disjoint lists per split and
phrases are assigned to a split by a hash of their text, so no test phrase is ever trained on.

Sound synthesis and backgrounds are reused from `training.scenes`. Its `speak` has no pitch
control, so `speak_voice` here is a thin wrapper that calls espeak-ng with ``-p`` and reuses the
scenes module's trimming.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import soundfile

from agent.intents import format_intent
from streaming.errors import StreamingError
from streaming.pcm import SAMPLE_RATE_HZ
from streaming.resample import resample
from training.scenes import (
    BACKGROUND_NAMES,
    SOUND_EVENT_NAMES,
    SOUND_EVENTS,
    active_extent,
    background,
    espeak_available,
)

logger = logging.getLogger(__name__)

Split = Literal["train", "dev", "test"]
SPLITS: tuple[Split, ...] = ("train", "dev", "test")
CorpusSize = Literal["tiny", "small", "full"]

# -- sound classes ---------------------------------------------------------------------------

#: How each sound class is named in captions; eval's `sound_accuracy` looks for these words.
SOUND_CLASS_PHRASES: dict[str, str] = {
    "alarm_beeping": "an alarm beeping",
    "doorbell_chime": "a doorbell chime",
    "siren": "a siren",
    "knocking": "knocking on a door",
    "glass_breaking": "glass breaking",
    "phone_ringing": "a phone ringing",
    "clapping": "hands clapping",
    "running_water": "running water",
}
#: Word stems that name each class (matched at word starts, case-insensitively). Disjoint:
#: no stem of one class appears in another class's captions.
SOUND_CLASS_KEYWORDS: dict[str, tuple[str, ...]] = {
    "alarm_beeping": ("alarm", "beep"),
    "doorbell_chime": ("doorbell", "door bell", "chime", "ding"),
    "siren": ("siren",),
    "knocking": ("knock",),
    "glass_breaking": ("glass", "shatter"),
    "phone_ringing": ("phone", "telephone"),
    "clapping": ("clap", "applause"),
    "running_water": ("water", "faucet", "tap"),
}
_CLASS_RES = {
    name: re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keys) + ")", re.IGNORECASE)
    for name, keys in SOUND_CLASS_KEYWORDS.items()
}

SOUND_CAPTIONS: dict[str, tuple[str, ...]] = {
    "alarm_beeping": (
        "An alarm is beeping.",
        "A smoke alarm beeps several times.",
        "Repeated high pitched beeps of an alarm.",
    ),
    "doorbell_chime": (
        "A doorbell chimes.",
        "The doorbell rings with a ding dong chime.",
        "A two tone doorbell chime.",
    ),
    "siren": ("A siren wails.", "An emergency siren is sounding.", "A siren rises and falls."),
    "knocking": (
        "Someone is knocking on a door.",
        "Several knocks on a wooden door.",
        "A person knocks at the door.",
    ),
    "glass_breaking": (
        "Glass is breaking.",
        "A glass shatters into pieces.",
        "The sound of breaking glass.",
    ),
    "phone_ringing": ("A phone is ringing.", "A telephone rings twice.", "An old phone rings."),
    "clapping": ("Hands are clapping.", "A person claps several times.", "Slow clapping."),
    "running_water": (
        "Water is running from a tap.",
        "Running water flows steadily.",
        "A faucet is running.",
    ),
}


def sound_classes_named(text: str) -> set[str]:
    """The sound classes a caption names (by `SOUND_CLASS_KEYWORDS`).

    Args:
        text: a caption, e.g. ``"A siren wails while a man speaks."``.

    Returns:
        The class names found, e.g. ``{"siren"}``; empty when none is named.
    """
    return {name for name, pattern in _CLASS_RES.items() if pattern.search(text)}


# -- voices ----------------------------------------------------------------------------------

#: Voices (espeak-ng accent + variant) per split: disjoint, and the test split's variants are
#: never heard in training.
VOICES: dict[Split, tuple[str, ...]] = {
    "train": tuple(
        f"{accent}+{variant}"
        for accent in ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
        for variant in ("m1", "m2", "m3", "m4", "f1", "f2", "f3")
    ),
    "dev": ("en-us+m5", "en-gb+f4", "en-gb-x-gbclan+m2", "en-us-nyc+f1"),
    "test": (
        "en-us+m6",
        "en-gb+m7",
        "en-gb-scotland+f5",
        "en-us-nyc+m6",
        "en-gb-x-gbcwmd+f4",
        "en-029+f5",
    ),
}
SPEEDS_WPM = (130, 145, 160, 175, 190)
PITCHES = (30, 40, 50, 60, 70)


def voice_gender(voice: str) -> str:
    """``"woman"`` for espeak-ng's female variants (``+f1``..), else ``"man"``."""
    return "woman" if re.search(r"\+f\d", voice) else "man"


def speak_voice(text: str, voice: str, speed_wpm: int, pitch: int) -> npt.NDArray[np.float32]:
    """espeak-ng speech with a pitch, trimmed to its active part, peak 0.5, at 16 kHz.

    A thin wrapper beside `training.scenes.speak`, which has no pitch control.

    Raises:
        StreamingError: espeak-ng is missing or fails.
    """
    if not espeak_available():
        raise StreamingError("espeak-ng not found; install the Debian package espeak-ng")
    try:
        result = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), "--stdout", text],
            capture_output=True,
            check=True,
            timeout=30,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise StreamingError(f"espeak-ng failed for voice {voice!r}: {exc}") from exc
    data, rate_hz = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    audio = resample(data, rate_hz, SAMPLE_RATE_HZ)
    start, end = active_extent(audio)
    audio = audio[start:end]
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak == 0.0:
        raise StreamingError(f"espeak-ng produced silence for {text!r} in voice {voice!r}")
    return (audio * (0.5 / peak)).astype(np.float32)


# -- phrases ---------------------------------------------------------------------------------

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
_ONES += "fifteen sixteen seventeen eighteen nineteen"
_ONES_WORDS = _ONES.split()
_TENS_WORDS = [
    "_",
    "_",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 145 -> ``"one hundred forty five"``."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words: expected 0..999, got {n}")
    if n < 20:
        return _ONES_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS_WORDS[tens] + (f" {_ONES_WORDS[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES_WORDS[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


@dataclass(frozen=True)
class Phrase:
    """One utterance and what it means.

    Attributes:
        text: lower-case words as spoken (numbers as words, no punctuation).
        domain: ``robot``, ``home``, ``question`` or ``sentence``.
        intent: the intent JSON object (docs/intents.md).
    """

    text: str
    domain: str
    intent: dict[str, Any]

    @property
    def transcript(self) -> str:
        """The ASR target, official style: first letter capitalised, no punctuation."""
        return self.text[:1].upper() + self.text[1:]


OBJECTS = (
    "cup", "red ball", "book", "bottle", "remote", "blue box", "apple", "keys", "phone",
    "toy car", "plate", "spoon",
)  # fmt: skip
LOCATIONS = ("table", "shelf", "kitchen counter", "sofa", "desk", "floor", "basket", "chair")
ROOMS = (
    "kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage",
    "dining room",
)  # fmt: skip
QUESTIONS = (
    "what time is it", "what is the weather like today", "how are you today",
    "what day is it tomorrow", "where are my keys", "who is at the door",
    "how far is the station", "what is the capital of france", "can you tell me a joke",
    "when does the shop close", "is it going to rain today", "what is your name",
    "how old are you", "what should i cook for dinner", "where is the nearest pharmacy",
    "how many people live here", "what song is playing", "why is the sky blue",
    "which bus goes to the city centre", "do we have any milk left", "what is on my calendar",
    "how do you make tea", "is the battery full", "what was that noise",
)  # fmt: skip
SENTENCES = (
    "the cat is sleeping on the sofa", "i had a long day at work", "the weather was lovely",
    "my sister is coming over tonight", "we went to the park yesterday",
    "this soup tastes really good", "the train was late again this morning",
    "i think i left the window open", "she reads a book every week",
    "the children are playing in the garden", "he forgot his umbrella at home",
    "the meeting starts in ten minutes", "i love the smell of fresh bread",
    "our neighbours have a new dog", "the film was better than the book",
    "it is very quiet here today", "they painted the fence green",
    "the coffee machine is broken", "my phone battery is almost empty",
    "we should plant more flowers", "the library opens at nine",
    "i am learning to play the piano", "the river looks high after the rain",
    "thank you for your help",
)  # fmt: skip


def _robot_phrases() -> Iterable[Phrase]:
    for verb in ("move", "go", "drive"):
        for direction in ("forward", "backward", "left", "right"):
            yield Phrase(f"{verb} {direction}", "robot", {"intent": "move", "direction": direction})
            for metres in range(1, 11):
                unit = "meter" if metres == 1 else "meters"
                yield Phrase(
                    f"{verb} {direction} {number_words(metres)} {unit}",
                    "robot",
                    {"intent": "move", "direction": direction, "distance": metres},
                )
    for verb in ("turn", "rotate"):
        for direction in ("left", "right"):
            yield Phrase(f"{verb} {direction}", "robot", {"intent": "turn", "direction": direction})
            for angle in (30, 45, 60, 90, 120, 180):
                yield Phrase(
                    f"{verb} {direction} {number_words(angle)} degrees",
                    "robot",
                    {"intent": "turn", "direction": direction, "angle": angle},
                )
    yield Phrase("turn around", "robot", {"intent": "turn", "direction": "around"})
    yield Phrase("please turn around", "robot", {"intent": "turn", "direction": "around"})
    for text in ("stop", "stop now", "please stop", "halt", "stop right there", "freeze"):
        yield Phrase(text, "robot", {"intent": "stop"})
    for text in (
        "go back to the charging station",
        "return to your dock",
        "go and charge yourself",
        "dock now",
        "go to your charger",
        "please go back to your base",
    ):
        yield Phrase(text, "robot", {"intent": "dock"})
    for obj in OBJECTS:
        for verb in ("pick up the", "grab the", "take the"):
            yield Phrase(f"{verb} {obj}", "robot", {"intent": "pick", "object": obj})
        for location in LOCATIONS:
            prep = "in" if location == "basket" else "on"
            for verb in ("put the", "place the"):
                yield Phrase(
                    f"{verb} {obj} {prep} the {location}",
                    "robot",
                    {"intent": "place", "object": obj, "location": location},
                )


def _home_phrases() -> Iterable[Phrase]:
    for room in ROOMS:
        for state in ("on", "off"):
            intent: dict[str, Any] = {"intent": f"lights_{state}", "room": room}
            yield Phrase(f"turn {state} the lights in the {room}", "home", intent)
            yield Phrase(f"switch {state} the {room} lights", "home", intent)
            yield Phrase(f"lights {state} in the {room}", "home", intent)
        for degrees in range(16, 27):
            intent = {"intent": "set_temperature", "room": room, "value": degrees}
            yield Phrase(
                f"set the {room} temperature to {number_words(degrees)} degrees", "home", intent
            )
            yield Phrase(f"make the {room} {number_words(degrees)} degrees", "home", intent)
    for state in ("on", "off"):
        yield Phrase(f"turn {state} the lights", "home", {"intent": f"lights_{state}"})
    for degrees in range(16, 27):
        yield Phrase(
            f"set the temperature to {number_words(degrees)} degrees",
            "home",
            {"intent": "set_temperature", "value": degrees},
        )


def all_phrases() -> list[Phrase]:
    """Every phrase the corpus can speak, in a fixed order."""
    phrases = list(_robot_phrases()) + list(_home_phrases())
    for text in QUESTIONS:
        phrase = Phrase(text, "question", {})
        phrases.append(Phrase(text, "question", {"intent": "question", "text": phrase.transcript}))
    phrases.extend(Phrase(text, "sentence", {"intent": "none"}) for text in SENTENCES)
    return phrases


def _phrase_rank(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def phrases_by_split() -> dict[Split, dict[str, list[Phrase]]]:
    """Phrases per split and domain; every phrase is in exactly one split.

    Within each (domain, intent) group, phrases are ordered by a stable hash of their text and
    cut into about 80 % train, 8 % dev and 12 % test (a group of 3 or more gives the test split
    at least one, of 5 or more the dev split too). Deterministic across runs and machines, so
    test phrases are never trained on, and every intent with a few phrasings is tested.
    """
    groups: dict[tuple[str, str], list[Phrase]] = {}
    for phrase in all_phrases():
        groups.setdefault((phrase.domain, phrase.intent["intent"]), []).append(phrase)
    out: dict[Split, dict[str, list[Phrase]]] = {s: {} for s in SPLITS}
    for (domain, _), group in groups.items():
        group = sorted(group, key=lambda p: _phrase_rank(p.text))
        n = len(group)
        n_test = max(1, round(0.12 * n)) if n >= 3 else 0
        n_dev = max(1, round(0.08 * n)) if n >= 5 else 0
        cuts: dict[Split, list[Phrase]] = {
            "test": group[:n_test],
            "dev": group[n_test : n_test + n_dev],
            "train": group[n_test + n_dev :],
        }
        for split, members in cuts.items():
            if members:
                out[split].setdefault(domain, []).extend(members)
    return out


# -- clip specs ------------------------------------------------------------------------------

#: Clips per split and kind (speech, sound, mix) for each corpus size.
SIZES: dict[str, dict[Split, tuple[int, int, int]]] = {
    "tiny": {"train": (16, 16, 8), "dev": (4, 8, 2), "test": (8, 8, 4)},
    "small": {"train": (160, 80, 40), "dev": (24, 16, 8), "test": (48, 32, 16)},
    "full": {"train": (4000, 1600, 1200), "dev": (120, 64, 32), "test": (300, 160, 80)},
}
# Domain weights for speech clips: commands dominate (the agent's job), then questions/chatter.
_DOMAIN_WEIGHTS = {"robot": 0.4, "home": 0.3, "question": 0.15, "sentence": 0.15}


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip deterministically (picklable for workers)."""

    clip_id: str
    split: Split
    kind: str  # speech | sound | mix
    seed: int
    phrase: Phrase | None = None
    voice: str = ""
    speed_wpm: int = 160
    pitch: int = 50
    sound: str = ""
    background: str = "pink"
    noise_snr_db: float | None = None  # foreground over background; None: clean
    speech_over_sound_db: float = 0.0


def _speech_fields(
    rng: np.random.Generator,
    pools: dict[str, list[Phrase]],
    domains: list[str],
    weights: npt.NDArray[np.float64],
    voices: tuple[str, ...],
) -> dict[str, Any]:
    domain = domains[int(rng.choice(len(domains), p=weights))]
    pool = pools[domain]
    return {
        "phrase": pool[int(rng.integers(len(pool)))],
        "voice": voices[int(rng.integers(len(voices)))],
        "speed_wpm": int(rng.choice(SPEEDS_WPM)),
        "pitch": int(rng.choice(PITCHES)),
    }


def _noise_fields(rng: np.random.Generator) -> dict[str, Any]:
    clean = rng.random() < 0.15
    return {
        "background": str(rng.choice(BACKGROUND_NAMES)),
        "noise_snr_db": None if clean else round(float(rng.uniform(5.0, 30.0)), 1),
    }


def make_specs(size: CorpusSize, seed: int) -> list[ClipSpec]:
    """The corpus's clips, deterministically from ``seed``.

    Raises:
        ValueError: unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {sorted(SIZES)}")
    phrases = phrases_by_split()
    specs: list[ClipSpec] = []
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index])
        n_speech, n_sound, n_mix = SIZES[size][split]
        domains = [d for d in _DOMAIN_WEIGHTS if phrases[split].get(d)]
        weights = np.array([_DOMAIN_WEIGHTS[d] for d in domains])
        weights /= weights.sum()
        voices = VOICES[split]

        for i in range(n_speech):
            specs.append(
                ClipSpec(
                    f"{split}-speech-{i:05d}",
                    split,
                    "speech",
                    int(rng.integers(2**31)),
                    **_speech_fields(rng, phrases[split], domains, weights, voices),
                    **_noise_fields(rng),
                )
            )
        for i in range(n_sound):
            specs.append(
                ClipSpec(
                    f"{split}-sound-{i:05d}",
                    split,
                    "sound",
                    int(rng.integers(2**31)),
                    sound=SOUND_EVENT_NAMES[i % len(SOUND_EVENT_NAMES)],
                    **_noise_fields(rng),
                )
            )
        for i in range(n_mix):
            specs.append(
                ClipSpec(
                    f"{split}-mix-{i:05d}",
                    split,
                    "mix",
                    int(rng.integers(2**31)),
                    sound=SOUND_EVENT_NAMES[i % len(SOUND_EVENT_NAMES)],
                    speech_over_sound_db=round(float(rng.uniform(3.0, 15.0)), 1),
                    **_speech_fields(rng, phrases[split], domains, weights, voices),
                    **_noise_fields(rng),
                )
            )
    return specs


# -- rendering -------------------------------------------------------------------------------


def _rms(x: npt.NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def render(spec: ClipSpec) -> npt.NDArray[np.float32]:
    """The clip's samples (16 kHz mono float32), deterministic for the spec.

    Raises:
        StreamingError: espeak-ng fails.
    """
    rng = np.random.default_rng(spec.seed)
    speech = sound = None
    if spec.phrase is not None:
        speech = speak_voice(spec.phrase.text, spec.voice, spec.speed_wpm, spec.pitch).astype(
            np.float64
        )
    if spec.sound:
        sound = SOUND_EVENTS[spec.sound](rng)
        sound = sound / max(_rms(sound), 1e-9) * 0.1
    if speech is not None:
        speech = speech / max(_rms(speech), 1e-9) * 0.1
    fg: npt.NDArray[np.float64]
    if speech is not None and sound is not None:
        # The sound starts somewhere from 0.5 s before to 0.5 s after the speech, and the
        # speech is louder by `speech_over_sound_db`.
        sound *= 10 ** (-spec.speech_over_sound_db / 20)
        shift = int(rng.uniform(-0.5, 0.5) * SAMPLE_RATE_HZ)
        start_speech, start_sound = max(0, shift), max(0, -shift)
        length = max(start_speech + speech.size, start_sound + sound.size)
        fg = np.zeros(length)
        fg[start_speech : start_speech + speech.size] += speech
        fg[start_sound : start_sound + sound.size] += sound
    else:
        only = speech if speech is not None else sound
        assert only is not None
        fg = only
    lead = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE_HZ)
    tail = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE_HZ)
    fg = np.pad(fg, (lead, tail))
    fg = fg[: int(9.5 * SAMPLE_RATE_HZ)]
    if spec.noise_snr_db is not None:
        noise = background(spec.background, fg.size / SAMPLE_RATE_HZ + 0.01, rng)[: fg.size]
        noise = np.pad(noise.astype(np.float64), (0, fg.size - noise.size))
        fg = fg + noise * (0.1 * 10 ** (-spec.noise_snr_db / 20))
    peak = float(np.abs(fg).max())
    target = float(rng.uniform(0.3, 0.9))
    return (fg * (target / max(peak, 1e-9))).astype(np.float32)


def _render_to(args: tuple[ClipSpec, str]) -> str:
    spec, path = args
    soundfile.write(path, render(spec), SAMPLE_RATE_HZ, subtype="PCM_16")
    return path


# -- annotations -----------------------------------------------------------------------------


def _speech_caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    assert spec.phrase is not None
    who = voice_gender(spec.voice)
    verb = "asks a question" if spec.phrase.domain == "question" else "speaks"
    if spec.phrase.domain in ("robot", "home"):
        verb = str(rng.choice(["gives a command", "speaks"]))
    return f"A {who} {verb}."


def manifest_entries(spec: ClipSpec, path: str) -> list[dict[str, Any]]:
    """The manifest entries for one clip (several tasks share the wav).

    Args:
        spec: the clip.
        path: its path as written in the manifest.

    Returns:
        Official-format entries: ``{"path", "text", "task"}`` plus ``"Q"`` for QA.
    """
    rng = np.random.default_rng([spec.seed, 1])
    out: list[dict[str, Any]] = []

    def add(task: str, text: str, question: str | None = None) -> None:
        entry: dict[str, Any] = {"path": path, "text": text, "task": task}
        if question is not None:
            entry["Q"] = question
        out.append(entry)

    phrase = spec.phrase
    if phrase is not None:
        add("asr", phrase.transcript)
        add("command", format_intent(phrase.intent))
    if spec.kind == "sound":
        options = SOUND_CAPTIONS[spec.sound]
        add("audiocaption", options[int(rng.integers(len(options)))])
    elif spec.kind == "mix":
        assert phrase is not None
        sound_phrase = SOUND_CLASS_PHRASES[spec.sound]
        who = voice_gender(spec.voice)
        add("audiocaption", f"A {who} speaks while {sound_phrase} can be heard.")
    elif rng.random() < 0.3 and spec.split != "test":
        # Speech-only captions teach the model not to invent sounds; the test split keeps
        # captions of clips with a sound event only, so `sound_accuracy` measures sounds.
        add("audiocaption", _speech_caption(spec, rng))
    # One question-answer pair for most clips.
    if rng.random() < 0.7:
        add("QA", *_qa_pair(spec, rng)[::-1])
    return out


def _qa_pair(spec: ClipSpec, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) about the clip."""
    options: list[tuple[str, str]] = []
    if spec.sound:
        name = SOUND_CLASS_PHRASES[spec.sound]
        other = SOUND_EVENT_NAMES[int(rng.integers(len(SOUND_EVENT_NAMES)))]
        yes = "Yes." if other == spec.sound else "No."
        where = "in the background" if spec.kind == "mix" else "in the audio"
        options += [
            (f"What sound is {where}?", name[0].upper() + name[1:] + "."),
            (f"Is there {SOUND_CLASS_PHRASES[other]} in the audio?", yes),
        ]
    if spec.phrase is not None:
        phrase = spec.phrase
        command = phrase.intent["intent"] not in ("none", "question")
        options += [
            ("What did the speaker say?", phrase.transcript + "."),
            ("Is the speaker a man or a woman?", f"A {voice_gender(spec.voice)}."),
            ("Is the speaker giving a command?", "Yes." if command else "No."),
        ]
        if "room" in phrase.intent:
            options.append(("Which room is mentioned?", f"The {phrase.intent['room']}."))
        if "object" in phrase.intent:
            options.append(("Which object is mentioned?", f"The {phrase.intent['object']}."))
    options.append(("Is anyone speaking?", "Yes." if spec.phrase is not None else "No."))
    return options[int(rng.integers(len(options)))]


# -- the corpus ------------------------------------------------------------------------------


@dataclass
class CorpusSummary:
    """What `synthesize_corpus` wrote.

    Attributes:
        directory: the corpus root.
        manifests: manifest name (``train``, ``pretrain``, ``dev``, ``test``) -> path.
        clips: clips per split.
        entries: manifest entries per split.
        seconds: wall time of the generation.
    """

    directory: Path
    manifests: dict[str, Path]
    clips: dict[str, int]
    entries: dict[str, int]
    seconds: float


def write_manifest(path: Path, entries: list[dict[str, Any]]) -> None:
    """Write an official-format manifest (``{"annotation": [...]}``)."""
    path.write_text(json.dumps({"annotation": entries}, indent=1) + "\n")


def synthesize_corpus(
    directory: str | Path,
    *,
    size: CorpusSize = "small",
    seed: int = 0,
    workers: int = 2,
) -> CorpusSummary:
    """Render the corpus's wavs and write its manifests and `meta.json`.

    Layout: ``wavs/{split}/{clip_id}.wav``; manifests ``train.json`` (every task),
    ``pretrain.json`` (its asr and audiocaption entries, for stage 1), ``dev.json`` and
    ``test.json``; paths in them are relative to the corpus directory. Existing wavs are
    rewritten (rendering is deterministic).

    Args:
        directory: where to write (created).
        size: ``tiny`` (tests), ``small`` (smoke runs, about 400 clips) or ``full`` (nano).
        seed: seed of every random choice.
        workers: processes rendering clips (1: in this process).

    Returns:
        A summary with the manifest paths and counts.

    Raises:
        StreamingError: espeak-ng is missing or fails.
    """
    started = time.perf_counter()
    root = Path(directory)
    specs = make_specs(size, seed)
    jobs = []
    for split in SPLITS:
        (root / "wavs" / split).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        jobs.append((spec, str(root / "wavs" / spec.split / f"{spec.clip_id}.wav")))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_to, jobs, chunksize=16))
    else:
        for job in jobs:
            _render_to(job)
    entries: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for spec in specs:
        entries[spec.split] += manifest_entries(spec, f"wavs/{spec.split}/{spec.clip_id}.wav")
    manifests = write_split_manifests(root, entries)
    clips: Counter[str] = Counter(spec.split for spec in specs)
    meta = {
        "size": size,
        "seed": seed,
        "voices": {split: sorted({s.voice for s in specs if s.split == split and s.voice})
                   for split in SPLITS},
        "phrases": {split: sorted({s.phrase.text for s in specs if s.split == split and s.phrase})
                    for split in SPLITS},
        "sound_classes": list(SOUND_EVENT_NAMES),
        "clips": dict(clips),
        "entries": {split: dict(Counter(e["task"] for e in entries[split])) for split in SPLITS},
        "specs": [asdict(s) for s in specs],
    }  # fmt: skip
    return finish_corpus(root, meta, manifests, entries, clips, started)


def write_split_manifests(root: Path, entries: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Write ``<split>.json`` for every split and ``pretrain.json`` (the train split's asr and
    audiocaption entries, for stage 1); returns their paths by name."""
    manifests: dict[str, Path] = {}
    for split in SPLITS:
        manifests[split] = root / f"{split}.json"
        write_manifest(manifests[split], entries[split])
    manifests["pretrain"] = root / "pretrain.json"
    write_manifest(
        manifests["pretrain"],
        [e for e in entries["train"] if e["task"] in ("asr", "audiocaption")],
    )
    return manifests


def finish_corpus(
    root: Path,
    meta: dict[str, Any],
    manifests: dict[str, Path],
    entries: dict[str, list[dict[str, Any]]],
    clips: Counter[str],
    started: float,
) -> CorpusSummary:
    """Write ``meta.json`` and log and return the summary of a corpus written since
    ``started`` (``time.perf_counter()``)."""
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    seconds = time.perf_counter() - started
    logger.info("wrote %d clips to %s in %.1f s", sum(clips.values()), root, seconds)
    return CorpusSummary(
        directory=root,
        manifests=manifests,
        clips=dict(clips),
        entries={split: len(entries[split]) for split in SPLITS},
        seconds=seconds,
    )
