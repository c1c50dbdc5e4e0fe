"""The scores `bench languages` reports."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench.languages import (
    ASTERISK_SOUNDS,
    G722_BYTES_PER_S,
    MORE_SENTENCES,
    SENTENCES,
    asterisk_audio,
    bleu,
    bucket_of,
    folded,
    join_clips,
    joined_utterances,
    parse_core_sounds,
    parse_fillets_dialogs,
    pick_prompts,
    word_error_rate,
    word_overlap,
)


def test_word_error_rate_counts_edits_over_the_reference_words() -> None:
    assert word_error_rate("Die Kinder spielen im Garten.", "die kinder spielen im garten") == 0
    # One substitution, one deletion over five words.
    assert word_error_rate("die kinder spielen im garten", "die kinder spielten garten") == 0.4
    assert word_error_rate("Дети играют в саду.", "дети играют") == pytest.approx(0.5)


def test_word_overlap_is_the_f1_of_the_words() -> None:
    assert word_overlap("The front door is still open.", "the front door is still open") == 1
    assert word_overlap("the front door is open", "the door") == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert word_overlap("the front door", "") == 0


def test_every_language_has_five_sentences_with_english_references() -> None:
    assert len(SENTENCES) == 8
    for code, pairs in SENTENCES.items():
        assert len(pairs) == 5
        assert all(reference for _, reference in pairs) or code == "en"


def test_every_language_has_five_more_sentences_for_the_joined_utterances() -> None:
    assert set(MORE_SENTENCES) == set(SENTENCES)
    for code, pairs in MORE_SENTENCES.items():
        assert len(pairs) == 5
        # No sentence twice: a joined utterance must not repeat one.
        assert len({text for text, _ in SENTENCES[code] + pairs}) == 10
        assert all(reference for _, reference in pairs) or code == "en"


def test_bucket_of_names_the_half_open_bucket() -> None:
    assert bucket_of(1.99) is None
    assert bucket_of(2.0) == "2-4 s"
    assert bucket_of(3.99) == "2-4 s"
    assert bucket_of(4.0) == "4-8 s"
    assert bucket_of(8.0) is None


def test_joined_utterances_fall_in_their_bucket_and_repeat_no_sentence() -> None:
    lengths = [1.4, 1.6, 1.9, 2.2, 2.7, 1.5, 1.8, 2.0, 1.7, 2.5]
    chosen = joined_utterances(lengths, per_bucket=10, gap_s=0.3)
    assert set(chosen) == {"2-4 s", "4-8 s"}
    for bucket, combos in chosen.items():
        assert len(combos) == 10
        assert len(set(combos)) == 10
        for combo in combos:
            assert len(set(combo)) == len(combo)
            total = sum(lengths[i] for i in combo) + 0.3 * (len(combo) - 1)
            assert bucket_of(total) == bucket
    # Seeded: the same lengths give the same utterances.
    assert joined_utterances(lengths, per_bucket=10, gap_s=0.3) == chosen


def test_joined_utterances_take_fewer_when_too_few_combinations_fit() -> None:
    # Two sentences: singles of 1 s fit no bucket, the pair (2.3 s) fits 2-4 s only.
    assert joined_utterances([1.0, 1.0], per_bucket=10, gap_s=0.3) == {
        "2-4 s": [(0, 1)],
        "4-8 s": [],
    }


def test_join_clips_puts_the_gap_between_clips_only() -> None:
    a, b = np.ones(1600, np.float32), np.full(800, 2, np.float32)
    joined = join_clips([a, b], gap_s=0.1)
    assert joined.size == 1600 + 1600 + 800
    assert joined.dtype == np.float32
    assert np.all(joined[1600:3200] == 0) and joined[-1] == 2


def test_parse_core_sounds_keeps_spoken_prompts_only() -> None:
    text = "\n".join(
        [
            "; Core Asterisk Sounds in Spanish",
            "",
            "agent-loginok: Agente conectado",
            "beep: [tono simple]",
            "conf-adminmenu: Por favor marque 1 para habilitar",
            "digits/1: uno",
            "vm-goodbye: Hasta pronto.",
            "empty:",
        ]
    )
    assert parse_core_sounds(text) == {
        "agent-loginok": "Agente conectado",
        "vm-goodbye": "Hasta pronto.",
    }


def test_parse_fillets_dialogs_pairs_each_line_with_its_english_original() -> None:
    dutch = "\n".join(
        [
            'dialogId("bot-m-vidis", "font_small", "Can you see that seahorse?")',
            'dialogStr("Zie je dat zeepaardje?")',
            "",
            'dialogId("x-v-quote", "font_big", "He said \\"no\\".")',
            'dialogStr("Hij zei \\"nee\\".")',
            'dialogId("x-v-count", "font_big", "Only 3 left.")',
            'dialogStr("Nog 3 over.")',
            'dialogId("x-v-sigh", "font_big", "...")',
            'dialogStr("...")',
        ]
    )
    assert parse_fillets_dialogs(dutch) == {
        "bot-m-vidis": ("Can you see that seahorse?", "Zie je dat zeepaardje?"),
        "x-v-quote": ('He said "no".', 'Hij zei "nee".'),
    }
    english = 'dialogId("bot-m-vidis", "font_small", "Can you see that seahorse?")'
    assert parse_fillets_dialogs(english) == {
        "bot-m-vidis": ("Can you see that seahorse?", "Can you see that seahorse?")
    }


def test_pick_prompts_buckets_by_length_up_to_the_count() -> None:
    lengths = {f"p{i}": 1.0 + 0.5 * i for i in range(16)}  # 1.0 .. 8.5 s
    chosen = pick_prompts(lengths, per_bucket=3)
    assert [len(v) for v in chosen.values()] == [3, 3]
    assert all(2 <= lengths[n] < 4 for n in chosen["2-4 s"])
    assert all(4 <= lengths[n] < 8 for n in chosen["4-8 s"])
    assert pick_prompts(lengths, per_bucket=3) == chosen


def test_folded_drops_diacritics_for_the_wer() -> None:
    assert folded("Número inválido, ёлка") == "Numero invalido, елка"
    assert word_error_rate(folded("Contraseña incorrecta"), folded("contrasena incorrecta")) == 0


def test_bleu_scores_a_perfect_and_a_wrong_translation() -> None:
    pytest.importorskip("sacrebleu")
    same = ["The front door is still open.", "The children are playing in the garden."]
    assert bleu(same, same) == pytest.approx(100)
    assert bleu(same, ["Nothing alike here at all.", "Quite different words."]) < 10


@pytest.mark.skipif(
    importlib.util.find_spec("G722") is None
    or not (ASTERISK_SOUNDS / "es" / "agent-loginok.g722").is_file(),
    reason="needs the g722 package and asterisk-core-sounds-es-g722",
)
def test_asterisk_audio_decodes_g722_at_its_byte_rate() -> None:
    audio = asterisk_audio("es", "agent-loginok")
    size = (ASTERISK_SOUNDS / "es" / "agent-loginok.g722").stat().st_size
    assert audio.dtype == np.float32
    assert audio.size / 16000 == pytest.approx(size / G722_BYTES_PER_S, abs=0.01)
    assert 0.05 < float(np.abs(audio).max()) <= 1.0
    assert abs(float(audio.mean())) < 1e-4
