"""Forced word alignment with pocketsphinx 5 and the CMU en-us model it ships (English only).

Pure engine code: no Prefect, and pocketsphinx is imported lazily inside functions.

:func:`align_words_pocketsphinx` aligns one segment's text to its audio. Each whitespace token
of the text is normalised into zero or more dictionary words ("42" -> "forty two",
"well-worn" -> "well worn", "$5" -> "five dollars", punctuation stripped); words missing from
the CMU dictionary get a pronunciation from the dictionary itself where possible (possessives,
compounds) or else from a small rule-based letter-to-sound converter (pocketsphinx has no g2p),
and are added to the decoder's dictionary (:mod:`speech.align.text`, :mod:`speech.align.g2p`). Words with no usable pronunciation (non-Latin
script) are left out. The word sequence is aligned by an FSG search: the words in order with
optional silence between them (what ``Decoder.set_align_text`` builds), plus a heavily
penalised free phone loop before the first and after the last word, so that a neighbour's
speech inside loose segment bounds is not pulled into the edge words. If that pass leaves a
word unplaced, the plain ``set_align_text`` search is run instead. The word segmentation
(100 frames/s) is mapped back to the tokens: a token that expanded to several words spans
from the first word's start to the last word's end. Tokens that yield no words (a lone "—")
or that the search did not reach get ``None`` times; the caller interpolates. A segment
whose audio is silent gets ``None`` times for every token.

``score`` is a per-word goodness of fit in 0..1 derived from the alignment's acoustic score:
pocketsphinx reports each word's acoustic score relative to the best-scoring senone of every
frame, so ``exp(ln(ascore) / frames / SCORE_SCALE)`` is 1 when the word's phones explain the
audio as well as anything could, and falls towards 0 as the fit worsens (correctly aligned
words on clean speech: about 0.5-0.7; wrong words: below 0.2). For a multi-word token, the
lowest of its words. It is a relative confidence, not a calibrated probability.

The decoder (about 0.1 s to load) is built once per process and shared under a lock.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Optional

import numpy as np

from speech.align.g2p import oov_pron
from speech.align.text import normalize_token
from speech.align.words import fill_missing, refine, round_time
from speech.progress import ProgressCallback, report
from speech.contracts import Segment, TimedWord, Transcript
from speech.schema import SAMPLE_RATE

FRAME_RATE = 100  # the en-us model's frame rate (frames per second)
PAD_S = 0.2  # audio added either side of a segment so edge words are not cut
# Per-frame log-likelihood ratio (natural log) that maps to score = 1/e; see _score().
SCORE_SCALE = 2.0
# Beams. Wide state/phone beams keep synthetic or unusual voices from falling off the search;
# the word-exit beams stay at pocketsphinx's defaults: widening wbeam as well (1e-80) made
# the FSG search end before the last word on 2 of 20 fixture turns.
BEAMS = {"beam": 1e-80, "pbeam": 1e-80}
# Probability (per phone, before the language weight) of the free phone loop allowed before the
# first and after the last word; see _align_pass. 0 disables it.
EDGE_GARBAGE_PROB = 1e-12
# A segment whose loudest 10 ms frame is below this (dBFS) is treated as silence.
SILENCE_DBFS = -50.0
# Added to every time. Frame i's 25.6 ms window starts at i*10 ms, so a boundary between
# frames i-1 and i sits near i*10 + 7.8 ms (between their centres), not at i*10 ms; measured
# on the fixtures, +5 ms removes the bias (MAE changes by under 1 ms either way).
TIME_OFFSET = 0.005

_LOCK = threading.Lock()
_DECODER = None
_GARBAGE: list[str] = []  # the edge phone loop's words, once added to the shared decoder
_CI_PHONES = (
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH "
    "UH UW V W Y Z ZH"
).split()


# ----------------------------------------------------------------------------------
# decoders


def _model_paths() -> tuple[str, str]:
    from pocketsphinx import get_model_path

    return get_model_path("en-us/en-us"), get_model_path("en-us/cmudict-en-us.dict")


def _get_decoder():
    """The shared word-alignment decoder (call with _LOCK held)."""
    global _DECODER
    if _DECODER is None:
        from pocketsphinx import Decoder

        hmm, dic = _model_paths()
        _DECODER = Decoder(
            hmm=hmm, dict=dic, lm=None, samprate=SAMPLE_RATE, loglevel="FATAL", **BEAMS
        )
        _GARBAGE[:] = _garbage_words(_DECODER)
    return _DECODER


def _has_pron(decoder, word: str) -> bool:
    try:
        return bool(decoder.lookup_word(word))
    except (RuntimeError, UnicodeError, ValueError):
        return False


def _ensure_words(decoder, words: list[str], originals: list[str]) -> None:
    """Add a pronunciation for every word the dictionary lacks (where one can be made)."""
    for w, orig in zip(words, originals):
        try:
            if decoder.lookup_word(w):
                continue
            pron = oov_pron(decoder, w, orig)
            if pron:
                decoder.add_word(w, pron, True)
        except (RuntimeError, UnicodeError, ValueError):
            continue  # left out of the alignment; its token gets None times


# ----------------------------------------------------------------------------------
# alignment


def _is_silent(pcm: np.ndarray) -> bool:
    if pcm.size < SAMPLE_RATE // 100:
        return True
    n = pcm.size // 160 * 160
    frames = pcm[:n].astype(np.float64).reshape(-1, 160) / 32768.0
    rms = np.sqrt((frames**2).mean(axis=1)).max()
    return 20 * math.log10(max(rms, 1e-10)) < SILENCE_DBFS


def _decode(decoder, pcm: bytes) -> None:
    decoder.start_utt()
    decoder.process_raw(pcm, no_search=False, full_utt=True)
    decoder.end_utt()


def _score(ascore: float, n_frames: int) -> Optional[float]:
    """0..1 from a word's acoustic score: exp(per-frame log-likelihood ratio / SCORE_SCALE)."""
    if n_frames <= 0:
        return None
    ln = math.log(ascore) if ascore > 0 else -700.0
    return float(min(1.0, math.exp(ln / n_frames / SCORE_SCALE)))


def _garbage_words(decoder) -> list[str]:
    """One dictionary word per context-independent phone: the edge phone loop's vocabulary."""
    names = []
    for k, ph in enumerate(_CI_PHONES):
        name = f"__g_{ph.lower()}"
        if not decoder.lookup_word(name):
            decoder.add_word(name, ph, k == len(_CI_PHONES) - 1)  # update once, at the end
        names.append(name)
    return names


def _align_pass(decoder, words: list[str], pcm: bytes, garbage: float):
    """Align ``words`` to ``pcm``; per word (start_frame, end_frame, ascore) or None if unplaced.

    ``garbage`` > 0 lets a free phone loop (that probability per phone) absorb speech before the
    first and after the last word (a neighbour's speech inside loose segment bounds); 0 is
    pocketsphinx's plain ``set_align_text`` search. Returns None when the search fails.
    """
    n = len(words)
    try:
        if garbage > 0:
            g = _GARBAGE
            trans = []
            for w in g:
                trans.append((0, 0, garbage / len(g), w))
                trans.append((n + 1, n + 1, garbage / len(g), w))
            trans.append((0, 1, 1.0 - garbage))
            trans += [(k + 1, k + 2, 1.0, w) for k, w in enumerate(words)]
            trans.append((n + 1, n + 2, 1.0 - garbage))
            fsg = decoder.create_fsg("align_edges", 0, n + 2, trans)
            decoder.add_fsg("align_edges", fsg)
            decoder.activate_search("align_edges")
        else:
            decoder.set_align_text(" ".join(words))
        _decode(decoder, pcm)
        segs = decoder.seg()
        segs = [(s.word, s.start_frame, s.end_frame, s.ascore) for s in segs] if segs else []
    except (RuntimeError, ValueError, KeyError):
        return None
    # map the segmentation back to words in order (alternates look like "the(2)")
    spans: list[Optional[tuple[int, int, float]]] = [None] * n
    k = 0
    for name, sf, ef, ascore in segs:
        base = re.sub(r"\(\d+\)$", "", name)
        j = k
        while j < n and words[j] != base:
            j += 1
        if j < n:
            spans[j] = (sf, ef, ascore)
            k = j + 1
    return spans


def align_words_pocketsphinx(audio: np.ndarray, start: float, end: float, text: str) -> list[dict]:
    """Force-align `text` to audio[start:end] (16 kHz mono float32, times in seconds, absolute).

    Returns one dict per whitespace token of `text`, in order: {"word": token (original,
    punctuation kept), "start": float|None, "end": float|None, "score": float|None} with
    absolute times. Tokens that cannot be aligned get None times (the caller interpolates).
    """
    tokens = text.split()
    out = [{"word": tok, "start": None, "end": None, "score": None} for tok in tokens]
    if not tokens:
        return out
    total = len(audio) / SAMPLE_RATE
    s0 = max(0.0, min(start, total) - PAD_S)
    s1 = min(total, max(end, start) + PAD_S)
    i0, i1 = int(round(s0 * SAMPLE_RATE)), int(round(s1 * SAMPLE_RATE))
    x = np.asarray(audio[i0:i1], dtype=np.float32)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    if _is_silent(pcm):
        return out

    # token -> dictionary words (a token may give 0..n words)
    words: list[str] = []
    originals: list[str] = []
    owner: list[int] = []
    for ti, tok in enumerate(tokens):
        for w in normalize_token(tok):
            words.append(w)
            originals.append(re.sub(r"[^\w']", "", tok))
            owner.append(ti)
    if not words:
        return out

    with _LOCK:
        decoder = _get_decoder()
        _ensure_words(decoder, words, originals)
        # leave out words that still have no pronunciation
        keep = [k for k, w in enumerate(words) if _has_pron(decoder, w)]
        words = [words[k] for k in keep]
        owner = [owner[k] for k in keep]
        if not words:
            return out
        raw = pcm.tobytes()
        spans = _align_pass(decoder, words, raw, EDGE_GARBAGE_PROB) if EDGE_GARBAGE_PROB else None
        if spans is None or any(sp is None for sp in spans):
            # the edge garbage won over a real word (or the search did not finish): align the
            # plain word sequence, keeping whichever pass placed more words
            plain = _align_pass(decoder, words, raw, 0.0)
            if spans is None or (
                plain is not None
                and sum(sp is not None for sp in plain) >= sum(sp is not None for sp in spans)
            ):
                spans = plain
        if spans is None:
            return out

    for ti in range(len(tokens)):
        idx = [j for j, o in enumerate(owner) if o == ti and spans[j] is not None]
        if not idx:
            continue
        sf, ef = spans[idx[0]][0], spans[idx[-1]][1]
        out[ti]["start"] = round(s0 + sf / FRAME_RATE + TIME_OFFSET, 3)
        out[ti]["end"] = round(s0 + (ef + 1) / FRAME_RATE + TIME_OFFSET, 3)
        scores = [_score(spans[j][2], spans[j][1] - spans[j][0] + 1) for j in idx]
        scores = [x for x in scores if x is not None]
        out[ti]["score"] = round(min(scores), 3) if scores else None
    return out


def align_pocketsphinx(audio: np.ndarray, transcript: Transcript,
                       progress: Optional[ProgressCallback] = None) -> list[Segment]:
    """Every segment of an English transcript, aligned on its own audio span."""
    if (transcript.language or "en") != "en":
        raise ValueError(f"pocketsphinx aligns English only, not {transcript.language!r}")
    out = []
    for i, seg in enumerate(transcript.segments):
        raw = align_words_pocketsphinx(audio, seg.start, seg.end, seg.text)
        words = [TimedWord(word=w["word"], start=round_time(w.get("start")), end=round_time(w.get("end")),
                           score=round_time(w.get("score"))) for w in raw]
        out.append(refine(seg, fill_missing(words, seg.start, seg.end)))
        report(progress, "align", (i + 1) / len(transcript.segments), "pocketsphinx")
    return out
