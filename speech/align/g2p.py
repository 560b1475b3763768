"""Pronunciations (ARPAbet) for words the CMU dictionary lacks; pocketsphinx has no g2p.

Built from the dictionary where possible (possessives and contractions, plural/-ed/-ing/-er/-ly
forms of a known word, compounds of two known words), acronyms spelled out, and otherwise a
small rule-based letter-to-sound converter. ``decoder`` is anything with pocketsphinx's
``lookup_word(word) -> pronunciation``.
"""
from __future__ import annotations

import re
from typing import Optional

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


def oov_pron(decoder, word: str, original: str) -> str:
    """A pronunciation for a word the dictionary lacks, built from the dictionary if possible."""
    if "'" in word:
        base, _, suffix = word.rpartition("'")
        bp = _base_pron(decoder, base) or oov_pron(decoder, base, base)
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
