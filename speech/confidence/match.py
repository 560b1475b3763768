"""Deepgram's word confidences onto Whisper's words (pure Python).

Each Whisper word gets at most one Deepgram word (one-to-one, by time) and its ``confidence``;
segments get the average and a ``low``/``high`` flag; runs of low-confidence words of one
speaker become ``unclear_intervals``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from speech.contracts import ConfidenceThresholds, Segment

MATCH_TOLERANCE = 0.12  # s: a Deepgram word overlapping the Whisper word widened by this much is a candidate
MIDPOINT_MAX_DIST = 1.0  # s: the nearest-midpoint fallback never reaches further than this


def match_words(
    whisper: list[tuple[float, float]],
    dg: list[tuple[float, float]],
    *,
    tolerance: float = MATCH_TOLERANCE,
    max_mid_dist: float = MIDPOINT_MAX_DIST,
) -> list[Optional[int]]:
    """One-to-one matching of Whisper word intervals to Deepgram word intervals.

    Pass 1: pairs whose intervals overlap once the Whisper word is widened by ``tolerance`` on
    each side, best first (largest real overlap, then nearest midpoints). Pass 2 (the
    fallback, for Whisper words still unmatched): the nearest midpoint among the Deepgram words
    still free, up to ``max_mid_dist`` seconds away. Greedy over all pairs, so each Deepgram
    word is used at most once. Returns, per Whisper word, the Deepgram index or None.
    """
    result: list[Optional[int]] = [None] * len(whisper)
    used: set[int] = set()
    mids = [(s + e) / 2 for s, e in dg]
    pairs = []
    for i, (ws, we) in enumerate(whisper):
        wm = (ws + we) / 2
        for j, (ds, de) in enumerate(dg):
            if ds < we + tolerance and de > ws - tolerance:
                overlap = min(we, de) - max(ws, ds)  # negative: a gap within the tolerance
                pairs.append((-overlap, abs(wm - mids[j]), i, j))
    for _, _, i, j in sorted(pairs):
        if result[i] is None and j not in used:
            result[i] = j
            used.add(j)
    pairs = []
    for i, (ws, we) in enumerate(whisper):
        if result[i] is not None:
            continue
        wm = (ws + we) / 2
        for j in range(len(dg)):
            if j not in used and abs(wm - mids[j]) <= max_mid_dist:
                pairs.append((abs(wm - mids[j]), i, j))
    for _, i, j in sorted(pairs):
        if result[i] is None and j not in used:
            result[i] = j
            used.add(j)
    return result


def _runs(items: list[tuple[float, float, bool, Any]], join_gap: float) -> list[list[int]]:
    """Indices of runs of low items (flag True) of one key, consecutive gaps <= join_gap.

    ``items`` are (start, end, is_low, key) in time order, matched words only: a matched
    word that is not low ends a run.
    """
    runs: list[list[int]] = []
    cur: list[int] = []
    for k, (start, end, low, key) in enumerate(items):
        if not low:
            if cur:
                runs.append(cur)
            cur = []
            continue
        if cur:
            prev = items[cur[-1]]
            if key != prev[3] or start - prev[1] > join_gap + 1e-9:
                runs.append(cur)
                cur = []
        cur.append(k)
    if cur:
        runs.append(cur)
    return runs


def annotate(
    segments: list[Segment],
    dg_words: list[dict],
    thresholds: Optional[ConfidenceThresholds] = None,
    *,
    model: Optional[str] = None,
) -> tuple[list[Segment], dict, list[dict]]:
    """Set each Whisper word's ``confidence`` from its Deepgram match, each segment's
    ``confidence`` (average of its matched words) and ``confidence_flag``:

    * ``"low"`` if the average < ``low``, or a run of contiguous low-confidence (< ``low``)
      words of at least ``min_low_dur`` seconds (first start to last end; consecutive low words
      at most ``join_gap`` apart; a matched word at or above ``low`` ends the run, an unmatched
      word does not);
    * ``"high"`` if the average >= ``high``;
    * ``None`` otherwise (between the thresholds), and for a segment with no matched word.

    Returns copies of the segments, a summary ``{mean, low_words, matched, unmatched,
    whisper_words, deepgram_words, low_segments, high_segments, thresholds, model?}`` and
    ``unclear_intervals`` ``[{start, end, speaker?, text}]``: runs of low-confidence words of
    one speaker (the word's, else its segment's) with gaps <= ``join_gap``, across segments.
    """
    th = thresholds or ConfidenceThresholds()
    segs = [s.model_copy(deep=True) for s in segments]
    n_words = _set_word_confidence(segs, dg_words)
    flags = [_flag(seg, th) for seg in segs]
    confs = [w.confidence for s in segs for w in s.words or [] if w.confidence is not None]
    matched = len(confs)
    summary: dict[str, Any] = {
        "mean": round(sum(confs) / matched, 4) if matched else None,
        "low_words": sum(1 for c in confs if c < th.low),
        "matched": matched,
        "unmatched": n_words - matched,
        "whisper_words": n_words,
        "deepgram_words": len(dg_words),
        "low_segments": flags.count("low"),
        "high_segments": flags.count("high"),
        "thresholds": th.model_dump(),
    }
    if model:
        summary["model"] = model
    return segs, summary, _unclear_intervals(segs, th)


def _set_word_confidence(segs: list[Segment], dg_words: list[dict]) -> int:
    """Each timed word's ``confidence`` from its Deepgram match (in place); returns the word count."""
    refs: list[tuple[int, int]] = []  # (segment index, word index) of timed Whisper words
    intervals: list[tuple[float, float]] = []
    n_words = 0
    for si, seg in enumerate(segs):
        for wi, w in enumerate(seg.words or []):
            n_words += 1
            w.confidence = None
            if w.start is not None and w.end is not None and math.isfinite(w.start) and math.isfinite(w.end):
                refs.append((si, wi))
                intervals.append((w.start, max(w.end, w.start)))
    dg = [(float(d["start"]), float(d["end"])) for d in dg_words]
    for (si, wi), j in zip(refs, match_words(intervals, dg)):
        if j is not None:
            segs[si].words[wi].confidence = round(float(dg_words[j]["confidence"]), 4)
    return n_words


def _flag(seg: Segment, th: ConfidenceThresholds) -> Optional[str]:
    """Set (in place) and return the segment's average confidence flag."""
    items = [(w.start, w.end, w.confidence < th.low, None) for w in seg.words or [] if w.confidence is not None]
    seg.confidence = seg.confidence_flag = None
    if not items:
        return None
    items.sort(key=lambda t: (t[0], t[1]))
    avg = sum(w.confidence for w in seg.words if w.confidence is not None) / len(items)
    seg.confidence = round(avg, 4)
    longest = max((items[r[-1]][1] - items[r[0]][0] for r in _runs(items, th.join_gap)), default=0.0)
    if avg < th.low or longest >= th.min_low_dur - 1e-9:
        seg.confidence_flag = "low"
    elif avg >= th.high:
        seg.confidence_flag = "high"
    return seg.confidence_flag


def _unclear_intervals(segs: list[Segment], th: ConfidenceThresholds) -> list[dict]:
    """Runs of low-confidence words of one speaker, across segments, in time order."""
    words = []
    for seg in segs:
        for w in seg.words or []:
            if w.confidence is not None:
                words.append((w.start, w.end, w.confidence < th.low, w.speaker or seg.speaker, w.word))
    words.sort(key=lambda t: (t[0], t[1]))
    unclear: list[dict] = []
    for run in _runs([t[:4] for t in words], th.join_gap):
        first, last = words[run[0]], words[run[-1]]
        item: dict[str, Any] = {"start": round(first[0], 3), "end": round(last[1], 3)}
        if first[3] is not None:
            item["speaker"] = first[3]
        item["text"] = " ".join(words[k][4].strip() for k in run).strip()
        unclear.append(item)
    return unclear
