"""The scores `bench languages` reports."""

from __future__ import annotations

import pytest

from bench.languages import SENTENCES, word_error_rate, word_overlap


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
