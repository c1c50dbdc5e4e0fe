"""A private PulseAudio server with a virtual device, for testing the real PortAudio capture path.

Route: ``paplay --device=virt`` -> PulseAudio null sink ``virt`` -> its monitor source
``virt.monitor`` (the server's default source) -> ALSA ``pulse`` plugin (libasound2-plugins) ->
PortAudio's ALSA host API (libportaudio2) -> sounddevice -> :class:`streaming.sources.MicSource`.

Debian's ``pulseaudio`` package already makes ALSA's ``default`` PCM the ``pulse`` plugin whenever
a server is reachable (``/etc/alsa/conf.d/99-pulse.conf``), and libasound2-plugins defines the
named ``pulse`` PCM, so no ALSA configuration is written: children only need ``PULSE_SERVER``.
The server is started with ``-n`` (no system default script), its own socket, runtime, state and
home directories under a temporary folder, and autospawn disabled for the clients, so nothing
outside that folder is touched and no other server is used.

The capture itself runs in a child process (``python -m tests.streaming.pulse_fixture``): PortAudio
and ALSA read their configuration once per process, so a fresh process is the only reliable way
to see the server, and it leaves the test process's PortAudio state alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes.util
import glob
import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SINK_NAME = "virt"
SINK_RATE_HZ = 48000
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_READY_LINE = "Daemon startup complete."

# (what is needed, the Debian package that provides it)
_PROGRAMS = (
    ("pulseaudio", "pulseaudio"),
    ("pactl", "pulseaudio-utils"),
    ("paplay", "pulseaudio-utils"),
)
_ALSA_PULSE_PLUGIN = "/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so"


def missing_packages() -> list[str]:
    """Debian packages this harness needs that are not installed (empty when all are)."""
    missing = [package for program, package in _PROGRAMS if shutil.which(program) is None]
    if not glob.glob(_ALSA_PULSE_PLUGIN):
        missing.append("libasound2-plugins")
    if ctypes.util.find_library("portaudio") is None:
        missing.append("libportaudio2")
    return sorted(set(missing))


@dataclass(frozen=True)
class PulseServer:
    """A running private server.

    Attributes:
        server: The ``PULSE_SERVER`` address (``unix:<socket>``).
        env: Environment for client processes: the server address, private home and runtime
            directories, autospawn off.
        log: The server's log lines so far (appended to by a reader thread).
    """

    server: str
    env: dict[str, str]
    log: list[str]


@contextlib.contextmanager
def pulse_server(root: Path) -> Iterator[PulseServer]:
    """Start ``pulseaudio`` with a null sink ``virt`` whose monitor is the default source.

    Waits for the daemon's own "startup complete" log line (not a fixed sleep), and stops the
    daemon on exit (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`).

    Args:
        root: An empty private directory for the socket, runtime, state and home folders.

    Yields:
        The server.

    Raises:
        RuntimeError: The daemon exited or did not report readiness within
            :data:`STARTUP_TIMEOUT_S`; the message includes its log.
    """
    runtime = root / "runtime"
    for folder in (runtime, root / "state", root / "home"):
        folder.mkdir(mode=0o700, parents=True)
    socket = root / "native"
    script = root / "virt.pa"
    script.write_text(
        f"load-module module-native-protocol-unix socket={socket} auth-anonymous=1\n"
        f"load-module module-null-sink sink_name={SINK_NAME} rate={SINK_RATE_HZ} channels=1\n"
        f"set-default-sink {SINK_NAME}\n"
        f"set-default-source {SINK_NAME}.monitor\n"
    )
    client_conf = root / "client.conf"
    client_conf.write_text("autospawn = no\n")
    env = dict(os.environ)
    env.update(
        HOME=str(root / "home"),
        XDG_RUNTIME_DIR=str(runtime),
        PULSE_RUNTIME_PATH=str(runtime),
        PULSE_STATE_PATH=str(root / "state"),
        PULSE_CLIENTCONFIG=str(client_conf),
    )
    env.pop("PULSE_SERVER", None)
    # As root pulseaudio warns ("not intended to be run as root") but runs in per-user mode.
    daemon = subprocess.Popen(
        [
            "pulseaudio",
            "--daemonize=no",
            "--system=false",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--disable-shm=yes",
            "--log-target=stderr",
            "--log-level=info",
            "-n",
            "-F",
            str(script),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            log.append(line.rstrip("\n"))
            if _READY_LINE in line:
                ready.set()
        ready.set()  # EOF: the daemon exited; the waiter checks returncode

    reader = threading.Thread(target=drain, name="pulseaudio-log", daemon=True)
    reader.start()
    try:
        if not ready.wait(STARTUP_TIMEOUT_S) or daemon.poll() is not None:
            raise RuntimeError(
                f"pulseaudio did not start within {STARTUP_TIMEOUT_S} s"
                f" (exit code {daemon.poll()}); log:\n" + "\n".join(log)
            )
        env["PULSE_SERVER"] = f"unix:{socket}"
        yield PulseServer(server=env["PULSE_SERVER"], env=env, log=log)
    finally:
        daemon.terminate()
        try:
            daemon.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(STOP_TIMEOUT_S)
        reader.join(STOP_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# The capture child


async def _capture(seconds: float, out: Path, device: str | None) -> None:
    from streaming.sources import MicSource, resolve_input_device

    info = resolve_input_device(device)
    blocks = []
    async with MicSource(device=device) as mic:
        async for block in mic:
            if not blocks:
                ready = {
                    "event": "ready",
                    "device": info.name,
                    "host_api": info.host_api,
                    "device_rate_hz": info.default_sample_rate_hz,
                    "first_block_samples": int(block.samples.size),
                }
                print(json.dumps(ready), flush=True)
            blocks.append(block)
            if block.end_sample >= seconds * block.sample_rate_hz:
                break
        dropped, status_flags = mic.dropped_blocks, mic.status_flags
    contiguous = all(a.end_sample == b.start_sample for a, b in itertools.pairwise(blocks))
    audio = np.concatenate([b.samples for b in blocks])
    np.save(out, audio)
    done = {
        "event": "done",
        "blocks": len(blocks),
        "first_sample": blocks[0].start_sample,
        "samples": int(audio.size),
        "sample_rate_hz": blocks[0].sample_rate_hz,
        "contiguous": contiguous,
        "dropped_blocks": dropped,
        "status_flags": status_flags,
    }
    print(json.dumps(done), flush=True)


def main() -> None:
    """Child: capture ``--seconds`` from the default input with MicSource into a .npy file.

    Prints one JSON line ``{"event": "ready", ...}`` when the first block arrives and one
    ``{"event": "done", ...}`` line at the end.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    asyncio.run(_capture(args.seconds, args.out, args.device))


if __name__ == "__main__":
    main()
