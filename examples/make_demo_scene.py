"""Regenerate the demo scene: `python examples/make_demo_scene.py` (needs espeak-ng).

Writes `examples/demo_scene.wav` (26 s, 16 kHz mono, 16-bit) with three spoken commands and
three sound events over dishwasher noise, and `examples/demo_scene.json`, its ground truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile

from training.scenes import make_scene

SEED = 4
DURATION_S = 26.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "demo_scene"), help="path stem"
    )
    args = parser.parse_args()
    scene = make_scene(SEED, DURATION_S, n_speech=3, n_sounds=3, snr_db_range=(15.0, 25.0))
    soundfile.write(f"{args.out}.wav", scene.audio, scene.sample_rate_hz, subtype="PCM_16")
    truth = {
        "seed": SEED,
        "duration_s": DURATION_S,
        "background": scene.background,
        "sample_rate": scene.sample_rate_hz,
        "events": [
            {
                "kind": e.kind,
                "label": e.label,
                "start": round(e.start_s, 3),
                "end": round(e.end_s, 3),
                "snr_db": e.snr_db,
            }
            for e in scene.events
        ],
    }
    Path(f"{args.out}.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(f"wrote {args.out}.wav and {args.out}.json")  # noqa: T201 (a CLI script)


if __name__ == "__main__":
    main()
