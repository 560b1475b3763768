"""Word-level helpers every aligner shares: mapping an aligner's words onto the transcript's
tokens, filling the words it could not place, segment bounds from words, sentence splits (or
their undoing, for whisperx's chunk segment resolution)."""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from speech.contracts import Segment, TimedChar, TimedWord


def round_time(x: Any) -> Optional[float]:
    """A time or score rounded to the millisecond; None for a missing or NaN value."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return None
    return round(float(x), 3)


def _spans(tokens: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for tok in tokens:
        spans.append((pos, pos + len(tok)))
        pos += len(tok)
    return spans


def project_words(tokens: list[str], pieces: list[tuple[str, float, float, float]]) -> list[TimedWord]:
    """Map aligner words (text, start, end, score) onto our whitespace tokens by characters.

    Both sides spell the same text up to whitespace, so character offsets (spaces removed)
    line them up even when the aligner splits or merges words differently.
    """
    piece_spans = _spans([re.sub(r"\s+", "", p[0]) for p in pieces])
    out = []
    for (a, b), tok in zip(_spans(tokens), tokens):
        hit = [p for (pa, pb), p in zip(piece_spans, pieces) if pa < b and a < pb]
        if hit:
            score = float(np.mean([h[3] for h in hit])) if all(h[3] is not None for h in hit) else None
            out.append(TimedWord(word=tok, start=round(float(hit[0][1]), 3), end=round(float(hit[-1][2]), 3),
                                 score=None if score is None else round(score, 3)))
        else:
            out.append(TimedWord(word=tok))
    return out


def fill_missing(words: list[TimedWord], seg_start: float, seg_end: float) -> list[TimedWord]:
    """Give unaligned words times between their aligned neighbours (WhisperX's 'nearest')."""
    timed = [i for i, w in enumerate(words) if w.start is not None]
    if not timed:
        n = max(len(words), 1)
        step = (seg_end - seg_start) / n
        return [w.model_copy(update={"start": round(seg_start + i * step, 3), "end": round(seg_start + (i + 1) * step, 3)})
                for i, w in enumerate(words)]
    out = list(words)
    for i, w in enumerate(words):
        if w.start is None:
            prev = max((j for j in timed if j < i), default=None)
            nxt = min((j for j in timed if j > i), default=None)
            start = out[prev].end if prev is not None else seg_start
            end = out[nxt].start if nxt is not None else seg_end
            if end < start:
                end = start
            out[i] = w.model_copy(update={"start": round(start, 3), "end": round(end, 3)})
    return out


def refine(segment: Segment, words: list[TimedWord]) -> Segment:
    """Segment boundaries from its word times."""
    if words and words[0].start is not None:
        return segment.model_copy(update={"words": words, "start": words[0].start, "end": max(w.end for w in words)})
    return segment.model_copy(update={"words": words})


_SENTENCE_END = re.compile(r"[.!?。！？]['\")\]]*$")


def split_sentences(segment: Segment) -> list[Segment]:
    """One segment per sentence, cut at word boundaries (as WhisperX's aligner does); character
    times (``chars``), when present, go with their sentence."""
    words = segment.words or []
    if len(words) < 2:
        return [segment]
    groups, current = [], []
    for i, w in enumerate(words):
        current.append(w)
        if _SENTENCE_END.search(w.word) and i < len(words) - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    if len(groups) == 1:
        return [segment]
    chars = _chars_per_group(segment, groups)
    return [
        refine(Segment(start=g[0].start, end=g[-1].end, text=" ".join(w.word for w in g), chars=c), g)
        for g, c in zip(groups, chars)
    ]


def _chars_per_group(segment: Segment, groups: list[list[TimedWord]]) -> list[Optional[list[TimedChar]]]:
    """Cut ``segment.chars`` (one per character of its text) at the groups' last words."""
    chars, text = segment.chars, segment.text
    if not chars or len(chars) != len(text):
        return [None] * len(groups)
    out, pos = [], 0
    for group in groups:
        end = pos
        for w in group:  # each word's first occurrence from where the last one ended
            found = text.find(w.word, end)
            end = found + len(w.word) if found >= 0 else end
        start = pos
        while start < end and text[start] == " ":
            start += 1
        out.append(chars[start:end])
        pos = end
    return out


def merge_segments(parts: list[Segment], original: Segment) -> Segment:
    """Pieces an aligner split one transcript segment into, joined again (chunk resolution)."""
    if not parts:
        return original
    words = [w for p in parts for w in (p.words or [])]
    chars: Optional[list[TimedChar]] = None
    if all(p.chars is not None for p in parts):
        chars = []
        for p in parts:
            if chars:
                chars.append(TimedChar(char=" "))
            chars.extend(p.chars or [])
    text = " ".join(p.text.strip() for p in parts)
    merged = Segment(start=min(p.start for p in parts), end=max(p.end for p in parts), text=text, chars=chars)
    return refine(merged, words)
