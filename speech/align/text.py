"""How English text is spoken, for forced alignment: numbers, ordinals, years, currency,
symbols and punctuation become the dictionary words a speaker says ("42" -> "forty two",
"well-worn" -> "well worn", "$5" -> "five dollars", "café" -> "cafe")."""
from __future__ import annotations

import re
import unicodedata

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
