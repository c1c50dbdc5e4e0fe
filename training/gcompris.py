"""Real recordings for testing the sound tagger: the audio inside Debian's ``gcompris-qt-data``.

GCompris (an educational suite, GPL-3+ with some CC-BY / CC-BY-SA files, see
``/usr/share/doc/gcompris-qt-data/copyright``) ships its activities as Qt resource bundles
(``/usr/share/gcompris-qt/rcc/*.rcc``). 136 of the files inside are ogg or wav clips; the ones
whose file name names what is heard (dog barks, applause, rain, a car engine, farm animals,
26 instruments, world music, ...) are labelled here with a sound class and the AudioSet label
groups of `model.sound_tagger` that a correct tagger should answer. Interface effects (clicks,
bonus jingles), the clips named ``Weird_*`` and the rest are listed with no class and never
scored.

**The split** is by file and fixed (it depends on nothing but the resource paths): within each
first expected group, clips are ordered by the SHA-1 of ``"<bundle>:<resource path>"``; the 1st,
3rd, 5th, ... go to ``test`` and the others to ``dev``. Test therefore holds every group (a group
with one clip is test-only). Tune pooling or thresholds on ``dev``; never train on ``test``.

The format of a bundle (Qt's rcc, format versions 1-3, as written by Qt's ``rcc`` tool), all
integers big-endian:

- header: the magic ``qres``, u32 format version, u32 offset of the tree, u32 offset of the data,
  u32 offset of the names; version 3 adds u32 overall flags;
- the tree: entries of 14 bytes (version 1) or 22 (versions 2, 3: plus a u64 modification time
  in ms), entry 0 is the root: u32 name offset, u16 flags (0x01 zlib, 0x02 directory, 0x04 zstd),
  then for a directory u32 child count and u32 index of the first child, for a file u16 territory,
  u16 language and u32 data offset;
- a name: u16 length in UTF-16 code units, u32 hash, the UTF-16BE text;
- a data entry: u32 length and the bytes. A zlib entry's bytes are Qt's ``qCompress`` format:
  u32 uncompressed length, then a zlib stream.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import soundfile

from model.audio import SAMPLE_RATE_HZ

RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
"""Where Debian's ``gcompris-qt-data`` installs the bundles (`dpkg -L gcompris-qt-data`)."""

AUDIO_SUFFIXES = (".ogg", ".wav")

FLAG_ZLIB = 0x01
FLAG_DIRECTORY = 0x02
FLAG_ZSTD = 0x04

Split = Literal["dev", "test"]


class RccError(ValueError):
    """A Qt resource bundle could not be read: not an rcc file, truncated, or unsupported."""


class GcomprisDataError(RuntimeError):
    """The ``gcompris-qt-data`` package is not installed, or a clip cannot be decoded."""


@dataclass(frozen=True)
class RccEntry:
    """One file inside a bundle.

    Attributes:
        path: its resource path, e.g. ``/gcompris/src/activities/instruments/resource/harp.ogg``.
        flags: the tree entry's flags (`FLAG_ZLIB`, `FLAG_ZSTD`).
        data_start: byte offset of its stored bytes in the bundle (after the u32 length).
        stored_bytes: how many bytes are stored (compressed size for a compressed entry).
    """

    path: str
    flags: int
    data_start: int
    stored_bytes: int


class RccBundle:
    """A Qt resource bundle read into memory (the largest GCompris one is 8 MB).

    Args:
        path: the ``.rcc`` file.

    Raises:
        RccError: the file is not an rcc bundle, or its tree points outside the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._blob = self.path.read_bytes()
        if len(self._blob) < 20 or self._blob[:4] != b"qres":
            raise RccError(f"{self.path}: expected the magic b'qres', got {self._blob[:4]!r}")
        self.version, self._tree, self._data, self._names = struct.unpack_from(
            ">IIII", self._blob, 4
        )
        if self.version not in (1, 2, 3):
            raise RccError(f"{self.path}: rcc format version {self.version}, expected 1, 2 or 3")
        self._entry_size = 14 if self.version == 1 else 22
        self.entries: list[RccEntry] = list(self._walk(0, ""))

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        try:
            return struct.unpack_from(fmt, self._blob, offset)
        except struct.error as exc:
            raise RccError(f"{self.path}: truncated at byte {offset} ({exc})") from exc

    def _name(self, offset: int) -> str:
        start = self._names + offset
        (length,) = self._unpack(">H", start)
        raw = self._blob[start + 6 : start + 6 + 2 * length]  # after u16 length and u32 hash
        if len(raw) != 2 * length:
            raise RccError(f"{self.path}: name at byte {start} runs past the end of the file")
        return raw.decode("utf-16-be")

    def _walk(self, index: int, prefix: str) -> Iterator[RccEntry]:
        at = self._tree + index * self._entry_size
        name_offset, flags = self._unpack(">IH", at)
        # The root (entry 0) has no name of its own: its children sit at "/".
        path = prefix + "/" + self._name(name_offset) if index else ""
        if flags & FLAG_DIRECTORY:
            count, first = self._unpack(">II", at + 6)
            for child in range(first, first + count):
                yield from self._walk(child, path)
            return
        (data_offset,) = self._unpack(">I", at + 10)
        (stored,) = self._unpack(">I", self._data + data_offset)
        yield RccEntry(path, flags, self._data + data_offset + 4, stored)

    def read(self, entry: RccEntry) -> bytes:
        """The file's bytes, decompressed.

        Raises:
            RccError: the data runs past the end, is a bad zlib stream, or is zstd-compressed
                (no zstd decoder here; GCompris 3.1 uses none).
        """
        raw = self._blob[entry.data_start : entry.data_start + entry.stored_bytes]
        if len(raw) != entry.stored_bytes:
            raise RccError(f"{self.path}: {entry.path} runs past the end of the file")
        if entry.flags & FLAG_ZSTD:
            raise RccError(
                f"{self.path}: {entry.path} is zstd-compressed; only plain and zlib data are read"
            )
        if not entry.flags & FLAG_ZLIB:
            return raw
        (expected,) = struct.unpack_from(">I", raw, 0)
        try:
            data = zlib.decompress(raw[4:])
        except zlib.error as exc:
            raise RccError(f"{self.path}: {entry.path}: bad zlib data ({exc})") from exc
        if len(data) != expected:
            raise RccError(
                f"{self.path}: {entry.path}: expected {expected} bytes after zlib, got {len(data)}"
            )
        return data


# -- labels --------------------------------------------------------------------------------
# (bundle, file-name pattern matched at the start of the name, sound class, expected groups).
# The class is what the file name
# names; the groups are those of model.sound_tagger.LABEL_GROUPS a correct answer falls in
# (the first is the one the split stratifies on). More than one group only where the name
# names more than one thing (frogs in a pond during a storm) or where AudioSet files the sound
# in two places (a car engine: "Vehicle" or "Engine").
_LABELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("memory-sound", r"LRBark_\d", "dog bark", ("dog",)),
    ("memory-sound", r"LRApplauses", "applause", ("applause",)),
    ("memory-sound", r"LRRain_in_garden", "rain", ("rain",)),
    ("memory-sound", r"LRStartAndStopCarEngine", "car engine", ("vehicle", "engine")),
    ("memory-sound", r"LRRing_01", "ringing", ("telephone", "alarm")),
    ("memory-sound", r"LRDoor_Open", "door", ("door",)),
    ("memory-sound", r"LRHeart_beat", "heartbeat", ("heartbeat",)),
    ("memory-sound", r"LRTrain_slowing_down", "train", ("train",)),
    ("memory-sound", r"LRFrogsInPond", "frogs", ("frog", "rain", "thunderstorm")),
    ("memory-sound", r"LRBuddhist_gong", "gong", ("music",)),
    ("memory-sound", r"LRObject_falling", "object falling", ("impact",)),
    ("memory-sound", r"LRHits_01", "hits", ("impact",)),
    ("memory-sound", r"guitar_(melody|son\d)", "guitar", ("music",)),
    ("explore_farm_animals", r"dog", "dog", ("dog",)),
    ("explore_farm_animals", r"cat", "cat", ("cat",)),
    ("explore_farm_animals", r"(cow|horse|pig|sheep)", "livestock", ("livestock",)),
    ("explore_farm_animals", r"(chickens|duck)", "fowl", ("fowl",)),
    ("explore_farm_animals", r"owl", "owl", ("bird",)),
    ("instruments", r".*", "instrument", ("music",)),
    ("explore_world_music", r".*", "world music", ("music",)),
    ("melody", r"xylofon_son\d", "xylophone", ("music",)),
    ("melody", r"knock", "knock", ("knock",)),
    ("canal_lock", r"door_(open|close)", "door", ("door",)),
    ("canal_lock", r"water_fill", "water", ("water",)),
    ("core", r"water", "water", ("water",)),
    ("clickgame", r"drip", "water", ("water",)),
    ("railroad", r"train", "train", ("train",)),
    ("traffic", r"car", "car", ("vehicle", "engine")),
    ("guessnumber", r"helicopter", "helicopter", ("aircraft",)),
)

MUSIC_GROUP = "music"

RECORDING_BUNDLES = ("memory-sound", "explore_farm_animals", "instruments", "explore_world_music")
"""The activities built from recordings (the issue's material); the other labelled clips are
game sound effects whose names say what they depict (a door, a helicopter, a train)."""


@dataclass(frozen=True)
class GcomprisClip:
    """One audio file of the package, with its label and split.

    Attributes:
        bundle: the bundle's file name without ``.rcc``, e.g. ``"instruments"``.
        path: the resource path inside the bundle.
        sound_class: what the file name names (``"dog bark"``), or None for an unlabelled clip.
        expected_groups: the label groups a correct answer falls in (empty when unlabelled).
        split: ``"dev"`` or ``"test"``; None for an unlabelled clip.
    """

    bundle: str
    path: str
    sound_class: str | None
    expected_groups: tuple[str, ...]
    split: Split | None

    @property
    def name(self) -> str:
        """The file name without its suffix, e.g. ``"harp"``."""
        return Path(self.path).stem

    @property
    def key(self) -> str:
        """``"<bundle>:<resource path>"``: unique, and what the split hashes."""
        return f"{self.bundle}:{self.path}"

    @property
    def is_music(self) -> bool:
        """Whether a correct answer is the ``music`` group."""
        return self.expected_groups[:1] == (MUSIC_GROUP,)


def label_for(bundle: str, path: str) -> tuple[str, tuple[str, ...]] | None:
    """The sound class and expected groups of one file, from `_LABELS`; None if unlabelled."""
    stem = Path(path).stem
    for label_bundle, pattern, sound_class, groups in _LABELS:
        if label_bundle == bundle and re.match(pattern, stem):
            return sound_class, groups
    return None


def _split_rank(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def list_clips(rcc_dir: Path = RCC_DIR) -> list[GcomprisClip]:
    """Every ogg/wav file in the bundles under ``rcc_dir``, labelled and split.

    Returns:
        The clips sorted by bundle and path; unlabelled ones have ``sound_class`` None.

    Raises:
        GcomprisDataError: ``rcc_dir`` holds no bundles (the package is not installed).
        RccError: a bundle is malformed.
    """
    bundles = sorted(Path(rcc_dir).glob("*.rcc"))
    if not bundles:
        raise GcomprisDataError(
            f"no .rcc bundles in {rcc_dir}: install them with `apt-get install gcompris-qt-data`"
        )
    found: list[tuple[str, str, tuple[str, tuple[str, ...]] | None]] = []
    for bundle_path in bundles:
        for entry in RccBundle(bundle_path).entries:
            if entry.path.lower().endswith(AUDIO_SUFFIXES):
                found.append(
                    (bundle_path.stem, entry.path, label_for(bundle_path.stem, entry.path))
                )
    by_group: dict[str, list[str]] = {}
    for bundle, path, label in found:
        if label is not None:
            by_group.setdefault(label[1][0], []).append(f"{bundle}:{path}")
    split_of: dict[str, Split] = {}
    for keys in by_group.values():
        for i, key in enumerate(sorted(keys, key=_split_rank)):
            split_of[key] = "test" if i % 2 == 0 else "dev"
    clips = [
        GcomprisClip(
            bundle=bundle,
            path=path,
            sound_class=label[0] if label else None,
            expected_groups=label[1] if label else (),
            split=split_of.get(f"{bundle}:{path}"),
        )
        for bundle, path, label in found
    ]
    return sorted(clips, key=lambda clip: (clip.bundle, clip.path))


def clips_of(split: Split, rcc_dir: Path = RCC_DIR) -> list[GcomprisClip]:
    """The labelled clips of one split (see the module docstring for how it is drawn)."""
    return [clip for clip in list_clips(rcc_dir) if clip.split == split]


def read_clip_bytes(clip: GcomprisClip, rcc_dir: Path = RCC_DIR) -> bytes:
    """The clip's file (ogg or wav bytes) as stored in its bundle.

    Raises:
        GcomprisDataError: the bundle no longer holds that path.
    """
    bundle = RccBundle(Path(rcc_dir) / f"{clip.bundle}.rcc")
    for entry in bundle.entries:
        if entry.path == clip.path:
            return bundle.read(entry)
    raise GcomprisDataError(f"{bundle.path} holds no {clip.path}")


def load_clip(clip: GcomprisClip, rcc_dir: Path = RCC_DIR) -> npt.NDArray[np.float32]:
    """The clip decoded to mono float32 at `SAMPLE_RATE_HZ` (16 kHz).

    Channels are averaged; other rates are resampled with `resample_fft`.

    Raises:
        GcomprisDataError: soundfile cannot decode it.
    """
    data = read_clip_bytes(clip, rcc_dir)
    try:
        audio, rate_hz = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise GcomprisDataError(f"cannot decode {clip.key}: {exc}") from exc
    mono = np.asarray(audio, dtype=np.float32).mean(axis=1)
    return resample_fft(mono, int(rate_hz), SAMPLE_RATE_HZ)


def resample_fft(
    audio: npt.NDArray[np.float32], in_rate_hz: int, out_rate_hz: int
) -> npt.NDArray[np.float32]:
    """Resample a whole clip by cutting (or zero-extending) its spectrum.

    Band-limited and exact for a periodic signal; for a clip the ends wrap around, so the clip is
    zero-padded by about 10 % of its length (at least 1,024 samples) on each side first and that
    padding is cut off after. Meant for whole recordings offline, not streams.

    Args:
        audio: mono samples, shape (n,).
        in_rate_hz: their rate.
        out_rate_hz: the rate wanted.

    Returns:
        Shape (round(n * out_rate_hz / in_rate_hz),), float32.
    """
    if in_rate_hz == out_rate_hz:
        return audio.astype(np.float32, copy=False)
    # Pad to a length whose resampled length is a whole number and whose FFT is fast (a
    # product of small primes): an arbitrary length can be prime, and slow to transform.
    step = in_rate_hz // math.gcd(in_rate_hz, out_rate_hz)
    # A whole number of steps, so the clip starts on an output sample too.
    pad = step * -(-max(1024, audio.shape[0] // 10) // step)
    n_in = step * _smooth_at_least(-(-(audio.shape[0] + 2 * pad) // step))
    padded = np.zeros(n_in)
    padded[pad : pad + audio.shape[0]] = audio
    n_out = n_in * out_rate_hz // in_rate_hz
    spectrum = np.fft.rfft(padded)
    bins_out = n_out // 2 + 1
    if bins_out <= spectrum.shape[0]:
        kept = spectrum[:bins_out].copy()
        if n_out % 2 == 0:
            kept[-1] = kept[-1].real  # the new Nyquist bin of a real signal is real
    else:
        kept = np.zeros(bins_out, dtype=spectrum.dtype)
        kept[: spectrum.shape[0]] = spectrum
    out = np.fft.irfft(kept, n_out) * (n_out / n_in)
    start = pad * out_rate_hz // in_rate_hz
    length = round(audio.shape[0] * out_rate_hz / in_rate_hz)
    return out[start : start + length].astype(np.float32)


def _smooth_at_least(n: int) -> int:
    """The smallest product of powers of 2, 3, 5 and 7 that is at least ``n``."""
    best = 1
    while best < n:
        best *= 2
    for p3 in (1, 3, 9, 27, 81):
        for p5 in (1, 5, 25, 125):
            for p7 in (1, 7, 49):
                base = p3 * p5 * p7
                if base > best:
                    continue
                value = base
                while value < n:
                    value *= 2
                best = min(best, value)
    return best
