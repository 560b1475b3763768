"""Forced word alignment with pocketsphinx 5 and the CMU en-us model it ships (English only).

Pure engine code: no Prefect, and pocketsphinx is imported lazily inside functions.

:func:`align_words_pocketsphinx` aligns one segment's text to its audio. Each whitespace token
of the text is normalised into zero or more dictionary words ("42" -> "forty two",
"well-worn" -> "well worn", "$5" -> "five dollars", punctuation stripped); words missing from
the CMU dictionary get a pronunciation from the dictionary itself where possible (possessives,
compounds) or else from a small rule-based letter-to-sound converter (pocketsphinx has no g2p),
and are added to the decoder's dictionary. Words with no usable pronunciation (non-Latin
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
import unicodedata
from typing import Optional

import numpy as np

SAMPLE_RATE = 16000
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
# text normalisation: numbers, symbols, punctuation

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [
    (10**12, "trillion"),
    (10**9, "billion"),
    (10**6, "million"),
    (1000, "thousand"),
    (100, "hundred"),
]
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}
_SYMBOLS = {"&": "and", "%": "percent", "+": "plus", "@": "at", "=": "equals", "#": "number"}
_CURRENCY = {"$": ("dollar", "dollars"), "£": ("pound", "pounds"), "€": ("euro", "euros")}


def number_words(n: int) -> list[str]:
    """Cardinal English words for a non-negative integer: 42 -> ['forty', 'two']."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        tens, ones = divmod(n, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return number_words(head) + [name] + (number_words(rest) if rest else [])
    raise AssertionError(n)  # pragma: no cover


def ordinal_words(n: int) -> list[str]:
    words = number_words(n)
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return words[:-1] + [last]


def year_words(n: int) -> list[str]:
    """How a 4-digit year is read: 1999 -> nineteen ninety nine, 1905 -> nineteen oh five."""
    if 2000 <= n <= 2009 or n % 1000 == 0:
        return number_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_words(hi) + ["hundred"]
    return number_words(hi) + (["oh"] if lo < 10 else []) + number_words(lo)


def _digits_words(s: str) -> list[str]:
    """Words for a digit string that may carry thousands commas and a decimal point."""
    s = s.replace(",", "")
    if not s:
        return []
    if "." in s:
        whole, _, frac = s.partition(".")
        out = number_words(int(whole)) if whole else []
        out.append("point")
        out += [_ONES[int(c)] for c in frac if c.isdigit()]
        return out
    if len(s) > 1 and s.startswith("0"):  # "007", a code: read digit by digit
        return ["oh" if c == "0" else _ONES[int(c)] for c in s]
    n = int(s)
    if len(s) == 4 and 1100 <= n <= 2099:
        return year_words(n)
    if len(s) > 15:
        return [_ONES[int(c)] for c in s]
    return number_words(n)


_NUM_RE = re.compile(r"^(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?$")
_ORD_RE = re.compile(r"^(\d+)(st|nd|rd|th)$")


def normalize_token(token: str) -> list[str]:
    """The lower-case words a text token is spoken as ([] if it is only punctuation)."""
    t = token.strip()
    # unify quotes/apostrophes and dashes
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("\u2013", "-").replace("\u2014", "-")
    # strip surrounding punctuation (keep currency signs, % and leading digits' signs)
    t = re.sub(r"^[^\w$£€#@&+]+", "", t)
    t = re.sub(r"[^\w%&+]+$", "", t)
    if not t or t in _SYMBOLS:
        return [_SYMBOLS[c] for c in token if c in _SYMBOLS][:1]
    out: list[str] = []
    currency = None
    if t[0] in _CURRENCY:
        currency, t = _CURRENCY[t[0]], t[1:]
    percent = t.endswith("%")
    if percent:
        t = t[:-1]
    m = _NUM_RE.match(t)
    mo = _ORD_RE.match(t.lower())
    if m:
        out = _digits_words(m.group(0))
        if currency:
            out.append(currency[0] if m.group(0).replace(",", "") in ("1", "1.0", "1.00") else currency[1])
    elif mo:
        out = ordinal_words(int(mo.group(1)))
    else:
        if currency:
            out.append(currency[1])
        # split on hyphens, slashes and other inner punctuation except apostrophes
        for part in re.split(r"[^\w']+|_", t.replace("&", " and ")):
            part = part.strip("'")
            if not part:
                continue
            # runs of digits and letters: "mp3" -> mp + three, "4x4" -> four x four
            for run in re.findall(r"\d+|[^\W\d_]+(?:'[^\W\d_]+)*", part):
                if run.isdigit():
                    out += _digits_words(run)
                else:
                    out.append(run)
    if percent:
        out.append("percent")
    return [_fold(w).lower() for w in out]


def _fold(word: str) -> str:
    """Latin letters without accents ("café" -> "cafe"); other scripts are kept as they are."""
    folded = unicodedata.normalize("NFKD", word.replace("ß", "ss")).encode("ascii", "ignore").decode("ascii")
    return folded if folded and len(folded) >= len(word) - 1 else word


# ----------------------------------------------------------------------------------
# pronunciations for out-of-vocabulary words

_LETTER_NAMES = {
    "a": "EY", "b": "B IY", "c": "S IY", "d": "D IY", "e": "IY", "f": "EH F", "g": "JH IY",
    "h": "EY CH", "i": "AY", "j": "JH EY", "k": "K EY", "l": "EH L", "m": "EH M", "n": "EH N",
    "o": "OW", "p": "P IY", "q": "K Y UW", "r": "AA R", "s": "EH S", "t": "T IY", "u": "Y UW",
    "v": "V IY", "w": "D AH B AH L Y UW", "x": "EH K S", "y": "W AY", "z": "Z IY",
}

# Letter-to-sound rules, longest match first: (graphemes, phones). Context-free apart from the
# few handled in _letter_to_sound (soft c/g, final e, initial kn/wr, y as vowel).
_LTS_RULES = sorted(
    {
        "tch": "CH", "sch": "S K", "igh": "AY", "ough": "AO", "augh": "AO", "tion": "SH AH N",
        "sion": "ZH AH N", "ture": "CH ER", "eau": "OW", "dge": "JH", "que": "K",
        "ch": "CH", "sh": "SH", "th": "TH", "ph": "F", "wh": "W", "ck": "K", "ng": "NG",
        "qu": "K W", "gh": "G", "kn": "N", "wr": "R", "gn": "N", "ps": "S", "mb": "M",
        "ee": "IY", "ea": "IY", "oo": "UW", "ou": "AW", "ow": "OW", "oi": "OY", "oy": "OY",
        "ai": "EY", "ay": "EY", "au": "AO", "aw": "AO", "ie": "IY", "ei": "EY", "ey": "EY",
        "ue": "UW", "ew": "UW", "oa": "OW", "ar": "AA R", "er": "ER", "ir": "ER", "ur": "ER",
        "or": "AO R", "yr": "ER",
        "a": "AE", "b": "B", "c": "K", "d": "D", "e": "EH", "f": "F", "g": "G", "h": "HH",
        "i": "IH", "j": "JH", "k": "K", "l": "L", "m": "M", "n": "N", "o": "AA", "p": "P",
        "q": "K", "r": "R", "s": "S", "t": "T", "u": "AH", "v": "V", "w": "W", "x": "K S",
        "y": "Y", "z": "Z",
    }.items(),
    key=lambda kv: -len(kv[0]),
)
_VOWELS = set("aeiouy")


def _letter_to_sound(word: str) -> str:
    """A rough ARPAbet pronunciation for a word made of letters (and apostrophes)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return ""
    if len(w) <= 1 or not (_VOWELS & set(w)):
        # no vowel letter ("nth", "mp"): spell it
        return " ".join(_LETTER_NAMES[c] for c in w)
    phones: list[str] = []
    i = 0
    while i < len(w):
        rest = w[i:]
        nxt = w[i + 1] if i + 1 < len(w) else ""
        c = w[i]
        # silent final e after a consonant ("style", "zorvane")
        if c == "e" and i == len(w) - 1 and i >= 2 and w[i - 1] not in _VOWELS:
            break
        if c in "cg" and nxt in ("e", "i", "y"):
            phones.append("S" if c == "c" else "JH")
            i += 1
            continue
        if c == "y" and i > 0:  # y after the first letter is a vowel
            phones.append("IY" if i == len(w) - 1 else "IH")
            i += 1
            continue
        if i > 0 and c == w[i - 1] and c not in _VOWELS:  # double consonant
            i += 1
            continue
        for g, ph in _LTS_RULES:
            if rest.startswith(g) and not (g in ("kn", "wr", "gn", "ps") and i > 0):
                phones.append(ph)
                i += len(g)
                break
        else:
            i += 1  # a letter outside a-z cannot get here; be safe
    return " ".join(phones)


def _spell(word: str) -> str:
    return " ".join(_LETTER_NAMES[c] for c in word.lower() if c in _LETTER_NAMES)


def _base_pron(decoder, word: str) -> Optional[str]:
    pron = decoder.lookup_word(word)
    return pron or None


def _oov_pron(decoder, word: str, original: str) -> str:
    """A pronunciation for a word the dictionary lacks, built from the dictionary if possible."""
    if "'" in word:
        base, _, suffix = word.rpartition("'")
        bp = _base_pron(decoder, base) or _oov_pron(decoder, base, base)
        if suffix == "s":
            last = bp.split()[-1] if bp else ""
            if last in ("S", "Z", "SH", "ZH", "CH", "JH"):
                return f"{bp} IH Z"
            if last in ("P", "T", "K", "F", "TH"):
                return f"{bp} S"
            return f"{bp} Z"
        if suffix in ("ll", "d", "ve", "re", "t", "m"):
            extra = {"ll": "L", "d": "D", "ve": "V", "re": "R", "t": "T", "m": "M"}[suffix]
            return f"{bp} {extra}"
        word = base + suffix
    # acronyms: an unknown all-capitals word of up to 3 letters, or one without a vowel
    # letter, is spelled out ("FBI", "XQZ"); longer ones are read as words ("COVID")
    letters = re.sub(r"[^A-Za-z]", "", original)
    if letters.isupper() and len(letters) > 1 and (len(letters) <= 3 or not _VOWELS & set(letters.lower())):
        return _spell(letters)
    # plural / possessive-like suffix of a dictionary word ("zorvaths" won't, "gizmos" may)
    for suf, tail in (("s", None), ("es", None), ("ed", "D"), ("ing", "IH NG"), ("er", "ER"), ("ly", "L IY")):
        if word.endswith(suf) and len(word) > len(suf) + 2:
            bp = _base_pron(decoder, word[: -len(suf)])
            if bp:
                if tail is None:
                    last = bp.split()[-1]
                    tail = "IH Z" if last in ("S", "Z", "SH", "ZH", "CH", "JH") else (
                        "S" if last in ("P", "T", "K", "F", "TH") else "Z")
                return f"{bp} {tail}"
    # compound of two dictionary words ("zebrafish", "backyardish")
    for k in range(len(word) - 3, 2, -1):
        left, right = _base_pron(decoder, word[:k]), _base_pron(decoder, word[k:])
        if left and right and len(word) - k >= 3:
            return f"{left} {right}"
    return _letter_to_sound(word)


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
            pron = _oov_pron(decoder, w, orig)
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
