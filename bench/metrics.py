"""Accuracy metrics shared by the tests (which assert thresholds) and the benchmarks (which
print them): word error rate, word-time error, diarization error rate.

Pure functions of plain data; importing this module changes no environment variable.
"""
from __future__ import annotations

import re
from typing import Any, Iterable


def normalize_text(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after lower-casing and dropping punctuation (jiwer)."""
    import jiwer

    return jiwer.wer(normalize_text(reference), normalize_text(hypothesis))


def word_time_error(reference: list[dict], hypothesis: list[dict]) -> tuple[float, float, int]:
    """Mean |start| and |end| error over words matched by text (difflib on normalized tokens)."""
    import difflib

    ref = [normalize_text(w["word"]) for w in reference]
    hyp = [normalize_text(w["word"]) for w in hypothesis]
    starts, ends = [], []
    for block in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            r, h = reference[block.a + k], hypothesis[block.b + k]
            starts.append(abs(r["start"] - h["start"]))
            ends.append(abs(r["end"] - h["end"]))
    n = len(starts)
    return (sum(starts) / n if n else float("inf"), sum(ends) / n if n else float("inf"), n)


def der(reference: Iterable[Any], hypothesis: Iterable[Any], duration: float, collar: float = 0.0) -> float:
    """Diarization error rate (pyannote.metrics) over the whole file (uem 0..duration, so speech
    labelled in silence counts as false alarm). Turns are dicts or objects with start, end,
    speaker; ``collar`` is the total width around each reference boundary (NIST style)."""
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns: Iterable[Any]) -> Annotation:
        out = Annotation()
        for t in turns:
            get = t.get if isinstance(t, dict) else lambda k, t=t: getattr(t, k)
            out[Segment(get("start"), get("end"))] = get("speaker")
        return out

    uem = Timeline([Segment(0.0, duration)])
    return DiarizationErrorRate(collar=collar)(annotation(reference), annotation(hypothesis), uem=uem)
