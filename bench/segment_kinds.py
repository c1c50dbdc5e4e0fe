"""`python -m bench.segment_kinds`: the segmenter's kind decision on natural speech and sounds.

Each clip is one utterance or one sound with background around it; the segmenter (default
`SegmenterConfig`) runs over it and every segment it ends is counted by kind. Groups:

- ``klettres``: Debian's ``klettres-data``, real people saying English letters and syllables
  (``/usr/share/klettres/en*``), 1 s of silence either side plus white noise at -60 dBFS;
- ``piper joe``: Piper's en_US joe voice (``training.piper``) saying the
  12 sentences of `training.scenes.SENTENCES` over each of the 4 backgrounds at 15, 20 and 25 dB
  SNR;
- ``espeak``: espeak-ng as `training.scenes.speak` makes it (the sentences in rotating voices
  and speeds) over the backgrounds at 10-30 dB SNR;
- ``synth sounds``: every synthesizer in `training.scenes.SOUND_EVENTS`, several seeds, over
  the backgrounds at 10-30 dB SNR;
- ``gcompris``: the real non-speech recordings of ``gcompris-qt-data`` (`training.gcompris`;
  the clips that hold a voice are left out, see `GCOMPRIS_VOICES`), padded like klettres.

A group whose data or program is missing is skipped with a note. Columns: clips, segments,
segments by kind, and the share of clips whose segments all have the expected kind (speech
for voices; for sounds, the share with no ``speech`` segment).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training import piper

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

KLETTRES_GLOB = "en*/**/*.ogg"
KLETTRES_DIR = Path("/usr/share/klettres")
PIPER_SNRS_DB = (15.0, 20.0, 25.0)
SOUND_SEEDS = (0, 1, 2, 3, 4)
#: GCompris clips that hold a voice: those YAMNet (`model.sound_tagger`, max over patches)
#: scores Speech >= 0.5 (spoken prompts, effects that are words), and the sung one (Italy:
#: Chant 0.91). Australia's didgeridoo (Speech 0.79 beside Music 1.00) is kept: an instrument.
GCOMPRIS_VOICES: frozenset[str] = frozenset(
    f"{bundle}:/gcompris/src/{path}"
    for bundle, path in (
        ("ballcatch", "activities/ballcatch/resource/tuxok.wav"),
        ("ballcatch", "activities/ballcatch/resource/youcannot.wav"),
        ("chronos", "activities/chronos/resource/sound/3.ogg"),
        ("core", "core/resource/sounds/bleep.wav"),
        ("core", "core/resource/sounds/bonus.wav"),
        ("erase", "activities/erase/resource/eraser2.wav"),
        ("gnumch-equality", "activities/gnumch-equality/resource/eat.wav"),
        ("explore_world_music", "activities/explore_world_music/resource/music/italy.ogg"),
    )
)
GROUPS = ("klettres", "piper joe", "espeak", "synth sounds", "gcompris")


@dataclass(frozen=True)
class Clip:
    """One evaluation clip.

    Attributes:
        group: One of `GROUPS`.
        name: What it is (file, sentence, synthesizer and seed).
        audio: 16 kHz mono float32, background included.
        speech: Whether a voice is what the clip holds.
    """

    group: str
    name: str
    audio: FloatArray = field(repr=False)
    speech: bool


def _pad(audio: FloatArray, rng: np.random.Generator, pad_s: float = 1.0) -> FloatArray:
    """``pad_s`` of silence either side, white noise at -60 dBFS over everything."""
    from streaming.pcm import SAMPLE_RATE_HZ

    pad = np.zeros(int(pad_s * SAMPLE_RATE_HZ), np.float32)
    out = np.concatenate([pad, audio.astype(np.float32), pad])
    return (out + rng.normal(0.0, 10 ** (-60 / 20), out.size)).astype(np.float32)


def _over_background(
    clip: npt.NDArray[np.float64], background_name: str, snr_db: float, rng: np.random.Generator
) -> FloatArray:
    """``clip`` 1 s into a background at -45 dBFS, its active part ``snr_db`` above it."""
    from training.scenes import SR, _active_rms, background

    noise_rms = 10 ** (-45 / 20)
    total_s = clip.size / SR + 2.0
    audio = background(background_name, total_s, rng).astype(np.float64) * noise_rms
    scaled = clip * (noise_rms * 10 ** (snr_db / 20) / _active_rms(clip))
    audio[SR : SR + clip.size] += scaled
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        audio *= 0.99 / peak
    return audio.astype(np.float32)


def klettres_clips(root: Path = KLETTRES_DIR) -> list[Clip]:
    """The English klettres recordings (empty when klettres-data is not installed)."""
    from streaming.audio_file import load_audio

    rng = np.random.default_rng(0)
    return [
        Clip("klettres", str(path.relative_to(root)), _pad(load_audio(path), rng), True)
        for path in sorted(root.glob(KLETTRES_GLOB))
    ]


def piper_available() -> bool:
    """Whether piper-tts and the joe voice are installed."""
    return piper.available()


def piper_speech(texts: Sequence[str]) -> list[FloatArray]:
    """``texts`` spoken by Piper's joe voice at its natural pace: 16 kHz, trimmed, peak 0.5."""
    from training.scenes import active_extent

    out = []
    # Piper draws its prosody noise: fix it, as the demo scene does.
    for audio in piper.speak(texts, seed=4):
        start, end = active_extent(audio)
        audio = audio[start:end]
        out.append((audio * (0.5 / np.abs(audio).max())).astype(np.float32))
    return out


def piper_clips(snrs_db: Sequence[float] = PIPER_SNRS_DB) -> list[Clip]:
    """Piper joe sentences over every background at every SNR (empty without Piper)."""
    from training.scenes import BACKGROUND_NAMES, SENTENCES

    if not piper_available():
        return []
    rng = np.random.default_rng(1)
    clips = []
    for text, audio in zip(SENTENCES, piper_speech(SENTENCES), strict=True):
        for bg in BACKGROUND_NAMES:
            for snr in snrs_db:
                mixed = _over_background(audio.astype(np.float64), bg, snr, rng)
                clips.append(Clip("piper joe", f"{text} / {bg} {snr:g} dB", mixed, True))
    return clips


def espeak_clips() -> list[Clip]:
    """espeak-ng sentences, rotating voices, speeds and backgrounds (empty without espeak-ng)."""
    from training.scenes import BACKGROUND_NAMES, SENTENCES, SPEEDS_WPM, VOICES, speak

    if shutil.which("espeak-ng") is None:
        return []
    rng = np.random.default_rng(2)
    clips = []
    for i, text in enumerate(SENTENCES):
        for j in range(3):
            voice = VOICES[(i + 2 * j) % len(VOICES)]
            speed = SPEEDS_WPM[(i + j) % len(SPEEDS_WPM)]
            bg = BACKGROUND_NAMES[(i + j) % len(BACKGROUND_NAMES)]
            snr = float(rng.uniform(10.0, 30.0))
            audio = speak(text, voice, speed).astype(np.float64)
            clips.append(
                Clip(
                    "espeak",
                    f"{text} / {voice} {speed} / {bg} {snr:.0f} dB",
                    _over_background(audio, bg, snr, rng),
                    True,
                )
            )
    return clips


def synth_sound_clips(seeds: Sequence[int] = SOUND_SEEDS) -> list[Clip]:
    """Every `training.scenes.SOUND_EVENTS` synthesizer with each seed, over a background."""
    from training.scenes import BACKGROUND_NAMES, SOUND_EVENTS

    clips = []
    for name, synth in SOUND_EVENTS.items():
        for seed in seeds:
            rng = np.random.default_rng(seed)
            bg = BACKGROUND_NAMES[seed % len(BACKGROUND_NAMES)]
            snr = float(rng.uniform(10.0, 30.0))
            audio = _over_background(synth(rng), bg, snr, rng)
            clips.append(Clip("synth sounds", f"{name} {seed} / {bg} {snr:.0f} dB", audio, False))
    return clips


def gcompris_clips() -> list[Clip]:
    """GCompris's recordings without voices, padded (empty when gcompris-qt-data is missing)."""
    from training.gcompris import GcomprisDataError, list_clips, load_clip

    try:
        found = list_clips()
    except GcomprisDataError:
        return []
    rng = np.random.default_rng(3)
    clips = []
    for clip in found:
        if clip.key in GCOMPRIS_VOICES:
            continue
        audio = load_clip(clip)
        if audio.size == 0 or float(np.abs(audio).max()) == 0.0:
            continue
        clips.append(Clip("gcompris", clip.key, _pad(audio, rng), False))
    return clips


BUILDERS: dict[str, Callable[[], list[Clip]]] = {
    "klettres": klettres_clips,
    "piper joe": piper_clips,
    "espeak": espeak_clips,
    "synth sounds": synth_sound_clips,
    "gcompris": gcompris_clips,
}


def segment_kinds(clip: Clip, config: object | None = None) -> list[str]:
    """The kinds of the segments the segmenter ends on ``clip``, in order."""
    from streaming.events import SegmentEnded
    from streaming.segmenter import Segmenter, SegmenterConfig

    cfg = config if isinstance(config, SegmenterConfig) else SegmenterConfig()
    segmenter = Segmenter(cfg)
    events = segmenter.push(clip.audio) + segmenter.flush()
    return [e.kind.value for e in events if isinstance(e, SegmentEnded)]


@dataclass
class GroupResult:
    """Counts for one group."""

    group: str
    clips: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    right: int = 0
    wrong: list[str] = field(default_factory=list)

    def add(self, clip: Clip, kinds: list[str]) -> None:
        """Count one clip's segment kinds."""
        self.clips += 1
        self.kinds.update(kinds)
        ok = (
            bool(kinds) and all(k == "speech" for k in kinds)
            if clip.speech
            else ("speech" not in kinds)
        )
        self.right += ok
        if not ok:
            self.wrong.append(f"{clip.name}: {','.join(kinds) or 'none'}")


def evaluate(groups: Sequence[str] = GROUPS) -> Iterator[GroupResult]:
    """Build each group's clips and run the segmenter over them."""
    for group in groups:
        clips = BUILDERS[group]()
        result = GroupResult(group)
        for clip in clips:
            result.add(clip, segment_kinds(clip))
        yield result


def _row(result: GroupResult, speech: bool) -> str:
    segments = sum(result.kinds.values())
    share = result.right / result.clips if result.clips else 0.0
    what = "all speech" if speech else "no speech"
    return (
        f"| {result.group} | {result.clips} | {segments} | {result.kinds['speech']} |"
        f" {result.kinds['mixed']} | {result.kinds['sound']} | {what} {100 * share:.1f} % |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table. Returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--groups", nargs="*", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--verbose", action="store_true", help="list the clips judged wrong")
    args = parser.parse_args(argv)
    lines = [
        "| group | clips | segments | speech | mixed | sound | clips right |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for result in evaluate(args.groups):
        if result.clips == 0:
            notes.append(f"{result.group}: skipped (its data or program is not installed)")
            continue
        lines.append(_row(result, result.group in ("klettres", "piper joe", "espeak")))
        if args.verbose:
            notes += [f"{result.group}: {w}" for w in result.wrong]
    for line in lines + notes:
        print(line, flush=True)  # noqa: T201 (benchmark output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
