"""pocketsphinx forced alignment (speech.align.pocketsphinx) against flite ground-truth word times."""
from __future__ import annotations


import numpy as np
import pytest

from conftest import read_wav
from speech.align.pocketsphinx import align_words_pocketsphinx
from speech.align.text import normalize_token, number_words

ENGLISH = ("sample_2spk.wav", "heldout_3spk.wav", "align_3spk.wav")
MAE_LIMIT = 0.030  # seconds, word start and word end separately


@pytest.fixture(scope="module")
def aligned(manifest) -> dict:
    """Per fixture: (ground-truth words, aligned words) with each turn aligned on its own."""
    out = {}
    for name in ENGLISH:
        audio, entry = read_wav(name), manifest[name]
        got = []
        for turn in entry["turns"]:
            got += align_words_pocketsphinx(audio, turn["start"], turn["end"], turn["text"])
        out[name] = (entry["words"], got)
    return out


def _turn_of(manifest, name, text_start):
    return next(t for t in manifest[name]["turns"] if t["text"].startswith(text_start))


@pytest.mark.parametrize("name", ENGLISH)
def test_word_times_within_30ms(aligned, name):
    truth, got = aligned[name]
    assert [w["word"] for w in got] == [w["word"] for w in truth]  # punctuation kept, in order
    assert all(w["start"] is not None and w["end"] is not None for w in got)
    start_err = np.mean([abs(g["start"] - t["start"]) for g, t in zip(got, truth)])
    end_err = np.mean([abs(g["end"] - t["end"]) for g, t in zip(got, truth)])
    assert start_err <= MAE_LIMIT, f"{name}: word start MAE {start_err:.3f} s"
    assert end_err <= MAE_LIMIT, f"{name}: word end MAE {end_err:.3f} s"


@pytest.mark.parametrize("name", ENGLISH)
def test_word_times_monotonic_and_in_segment(aligned, manifest, name):
    _, got = aligned[name]
    i = 0
    for turn in manifest[name]["turns"]:
        words = got[i : i + len(turn["text"].split())]
        i += len(words)
        prev_end = turn["start"] - 0.2
        for w in words:
            assert turn["start"] - 0.2 <= w["start"] < w["end"] <= turn["end"] + 0.2
            assert w["start"] >= prev_end - 1e-6
            prev_end = w["end"]
            assert 0.0 <= w["score"] <= 1.0


def test_digits_words_are_aligned(aligned, manifest):
    truth, got = aligned["align_3spk.wav"]
    for token in ("2", "40", "12"):
        k = next(i for i, w in enumerate(truth) if w["word"] == token)
        assert got[k]["word"] == token
        assert abs(got[k]["start"] - truth[k]["start"]) <= 0.05
        assert abs(got[k]["end"] - truth[k]["end"]) <= 0.07


def test_single_word_segment(manifest):
    audio = read_wav("align_3spk.wav")
    turn = _turn_of(manifest, "align_3spk.wav", "Yes")
    (word,) = align_words_pocketsphinx(audio, turn["start"], turn["end"], turn["text"])
    assert word["word"] == "Yes."
    assert abs(word["start"] - turn["start"]) <= 0.03
    assert abs(word["end"] - turn["end"]) <= 0.05


def test_hyphenated_and_out_of_vocabulary_words(aligned):
    truth, got = aligned["align_3spk.wav"]
    for token in ("well-worn", "Zorvath's"):  # neither is in the CMU dictionary
        k = next(i for i, w in enumerate(truth) if w["word"] == token)
        assert got[k]["word"] == token
        assert abs(got[k]["start"] - truth[k]["start"]) <= 0.04
        assert abs(got[k]["end"] - truth[k]["end"]) <= 0.04


def test_loose_segment_bounds_do_not_pull_words(manifest):
    """Segment bounds reaching 0.8 s into the neighbouring turns (a loose ASR segment)."""
    audio = read_wav("heldout_3spk.wav")
    entry = manifest["heldout_3spk.wav"]
    turn = _turn_of(manifest, "heldout_3spk.wav", "A rod")
    first = sum(len(t["text"].split()) for t in entry["turns"][: entry["turns"].index(turn)])
    truth = entry["words"][first : first + len(turn["text"].split())]
    got = align_words_pocketsphinx(audio, turn["start"] - 0.8, turn["end"] + 0.8, turn["text"])
    assert np.mean([abs(g["start"] - t["start"]) for g, t in zip(got, truth)]) <= MAE_LIMIT
    assert np.mean([abs(g["end"] - t["end"]) for g, t in zip(got, truth)]) <= MAE_LIMIT


def test_silence_only_segment_gives_none_times():
    audio = np.zeros(16000 * 3, np.float32)
    got = align_words_pocketsphinx(audio, 0.5, 2.5, "Nothing was said here.")
    assert [w["word"] for w in got] == ["Nothing", "was", "said", "here."]
    assert all(w["start"] is None and w["end"] is None for w in got)


def test_degenerate_inputs():
    audio = read_wav("sample_2spk.wav")
    assert align_words_pocketsphinx(audio, 0.3, 2.5, "") == []
    # punctuation-only tokens cannot be placed: None times, the others still aligned
    got = align_words_pocketsphinx(audio, 0.3, 2.489, "The birch canoe — slid on the smooth planks.")
    assert got[3] == {"word": "—", "start": None, "end": None, "score": None}
    assert all(w["start"] is not None for k, w in enumerate(got) if k != 3)
    # a segment past the end of the audio and an inverted one do not crash
    assert align_words_pocketsphinx(audio, 100.0, 101.0, "gone")[0]["start"] is None
    assert len(align_words_pocketsphinx(audio, 2.0, 1.0, "odd")) == 1


def test_text_normalisation():
    assert number_words(42) == ["forty", "two"]
    assert number_words(1_000_305) == ["one", "million", "three", "hundred", "five"]
    assert normalize_token("40") == ["forty"]
    assert normalize_token("1999") == ["nineteen", "ninety", "nine"]
    assert normalize_token("$5") == ["five", "dollars"]
    assert normalize_token("3.5%") == ["three", "point", "five", "percent"]
    assert normalize_token("21st") == ["twenty", "first"]
    assert normalize_token("well-worn") == ["well", "worn"]
    assert normalize_token('"Planks,"') == ["planks"]
    assert normalize_token("it\u2019s") == ["it's"]
    assert normalize_token("&") == ["and"]
    assert normalize_token("—") == []
