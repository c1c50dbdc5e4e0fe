"""MicSource through real PortAudio capture, from a virtual PulseAudio device.

A private ``pulseaudio`` daemon plays the role of the sound card: ``paplay`` writes a tone into
its null sink, and a child process captures the sink's monitor with :class:`MicSource` through
PortAudio's ALSA host API and the ALSA ``pulse`` plugin (see ``pulse_fixture.py``). Skipped only
when the Debian packages are missing (``make apt`` installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.streaming.pulse_fixture import (
    SINK_NAME,
    SINK_RATE_HZ,
    PulseServer,
    missing_packages,
    pulse_server,
)

REPO = Path(__file__).resolve().parents[2]
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.5
TONE_S = 1.0
CAPTURE_S = 2.0
STEP_TIMEOUT_S = 10.0
_DEVICE_ROW = re.compile(r"(?P<default>\*?)\s*\d+\s+(?P<name>.+?)\s+\((?P<api>[^,]+), .*\)")

pytestmark = pytest.mark.skipif(
    bool(missing_packages()),
    reason=f"needs Debian packages {' '.join(missing_packages())} (make apt)",
)


@pytest.fixture(scope="module")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    with pulse_server(tmp_path_factory.mktemp("pulse")) as server:
        yield server


def _tone_file(path: Path) -> Path:
    t = np.arange(int(TONE_S * SINK_RATE_HZ)) / SINK_RATE_HZ
    tone = TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)
    ramp = int(0.005 * SINK_RATE_HZ)  # 5 ms fades: no clicks at the edges
    tone[:ramp] *= np.linspace(0.0, 1.0, ramp)
    tone[-ramp:] *= np.linspace(1.0, 0.0, ramp)
    soundfile.write(path, tone.astype(np.float32), SINK_RATE_HZ, subtype="FLOAT")
    return path


def _read(log: Path) -> str:
    """The capture child's stderr so far (small; read only to explain a failure)."""
    return log.read_text(errors="replace")


async def _json_line(child: asyncio.subprocess.Process, what: str, log: Path) -> dict[str, Any]:
    """The capture child's next stdout line, which must be the JSON ``what`` event."""
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), STEP_TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"capture child: no {what!r} line within {STEP_TIMEOUT_S} s:\n{_read(log)}")
    assert line, f"capture child exited before its {what!r} line:\n{_read(log)}"
    message: dict[str, Any] = json.loads(line)
    assert message["event"] == what
    return message


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def test_devices_lists_the_virtual_device(pulse: PulseServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "devices"],
        env=pulse.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=STEP_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    rows = [_DEVICE_ROW.fullmatch(line) for line in result.stdout.splitlines()]
    assert all(rows), result.stdout
    devices = {row["name"]: (row["default"] == "*", row["api"]) for row in rows if row}
    # Debian's ALSA config points 'default' at the pulse plugin while a server is reachable.
    assert devices.get("default") == (True, "ALSA"), result.stdout
    assert devices.get("pulse") == (False, "ALSA"), result.stdout


async def test_mic_source_captures_a_tone_played_into_the_virtual_device(
    pulse: PulseServer, tmp_path: Path
) -> None:
    """MicSource hears paplay's tone unbroken, at the right pitch, level and length."""
    tone = _tone_file(tmp_path / "tone.wav")
    out, log = tmp_path / "captured.npy", tmp_path / "child.log"
    with log.open("wb") as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.streaming.pulse_fixture",
            str(out),
            "--seconds",
            str(CAPTURE_S),
            env=pulse.env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    player: asyncio.subprocess.Process | None = None
    try:
        ready = await _json_line(child, "ready", log)
        player = await asyncio.create_subprocess_exec(
            "paplay", f"--device={SINK_NAME}", str(tone), env=pulse.env
        )
        assert await asyncio.wait_for(player.wait(), TONE_S + STEP_TIMEOUT_S) == 0
        done = await _json_line(child, "done", log)
        assert await asyncio.wait_for(child.wait(), STEP_TIMEOUT_S) == 0
    finally:
        if player is not None:
            await _stop(player)
        await _stop(child)

    assert (ready["device"], ready["host_api"]) == ("default", "ALSA")
    assert done["contiguous"] and done["first_sample"] == 0
    assert done["dropped_blocks"] == 0 and done["status_flags"] == {}
    rate = done["sample_rate_hz"]
    assert rate == 16000
    audio = np.load(out)
    assert audio.size >= CAPTURE_S * rate

    loud = np.flatnonzero(np.abs(audio) > TONE_AMPLITUDE / 4)
    assert loud.size, f"no tone captured; peak {np.abs(audio).max():.2e}"
    onset, offset = int(loud[0]), int(loud[-1]) + 1
    # paplay started after the first block arrived, so that block is silent; the tone is over
    # well before the capture ends, and nothing but the tone is heard.
    assert onset >= ready["first_block_samples"]
    assert audio.size - offset >= 0.5 * rate
    margin = int(0.01 * rate)  # the 5 ms fades
    quiet = np.r_[audio[: max(0, onset - margin)], audio[offset + margin :]]
    assert np.abs(quiet).max() < 1e-3, f"noise outside the tone: peak {np.abs(quiet).max():.2e}"
    # PulseAudio itself trims a few ms at the edges of a played stream (parec, which bypasses
    # PortAudio, hears 0.975-0.99 s of this 1 s file), so the length is checked loosely here and
    # continuity exactly below.
    assert TONE_S - 0.05 < (offset - onset) / rate <= TONE_S + 0.005, (offset - onset) / rate

    # Demodulate the steady part at 440 Hz in 25 ms windows (exactly 11 periods): a pure,
    # unbroken tone at the right rate has the same amplitude and phase in every window. A lost
    # or repeated 20 ms block shifts the phase by 0.8 period; a wrong rate makes it drift.
    body = audio[onset + margin : offset - margin].astype(np.float64)
    window = int(0.025 * rate)
    count = body.size // window
    t = np.arange(count * window) / rate
    phasors = 2 * (body[: t.size] * np.exp(-2j * np.pi * TONE_HZ * t)).reshape(count, window)
    phasors = phasors.mean(axis=1)
    amplitude, phase = np.abs(phasors), np.unwrap(np.angle(phasors))
    assert np.allclose(amplitude, TONE_AMPLITUDE, rtol=0.02), (amplitude.min(), amplitude.max())
    assert np.abs(np.diff(phase)).max() < 0.01, "discontinuity: a block was lost or repeated"
    drift_hz = (phase[-1] - phase[0]) / (2 * np.pi * (count - 1) * window / rate)
    assert abs(drift_hz) < 0.01, f"tone heard {drift_hz:+.3f} Hz off: sample rate conversion"
