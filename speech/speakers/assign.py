"""Speakers onto words and segments: each word takes the speaker whose turns overlap it most
(WhisperX's ``assign_word_speakers``), and a segment spanning several speakers is split at the
word boundary."""
from __future__ import annotations

import bisect
from typing import Optional

from speech.contracts import Segment, SpeakerInfo, TimedWord, Turn


def speech_regions(segments: list[Segment]) -> list[tuple[float, float]]:
    """Where people speak: aligned word spans when there are words, else segment spans."""
    regions = []
    for seg in segments:
        if seg.words and all(w.start is not None for w in seg.words):
            regions += [(w.start, w.end) for w in seg.words if w.end > w.start]
        else:
            regions.append((seg.start, seg.end))
    return regions


class TurnIndex:
    """Turns sorted by start, for overlap and nearest-turn queries in O(log n + hits)."""

    def __init__(self, turns: list[Turn]):
        self.turns = sorted(turns, key=lambda t: (t.start, t.end))
        self.starts = [t.start for t in self.turns]
        self.max_end: list[float] = []  # running max of ends, and where it occurs
        self.max_at: list[int] = []
        for i, t in enumerate(self.turns):
            if not self.max_end or t.end > self.max_end[-1]:
                self.max_end.append(t.end)
                self.max_at.append(i)
            else:
                self.max_end.append(self.max_end[-1])
                self.max_at.append(self.max_at[-1])
        self.first = {}
        for t in self.turns:
            self.first.setdefault(t.speaker, t.start)

    def speaker_at(self, start: float, end: float) -> str:
        """The speaker with the most overlap (ties: the one heard first); else the nearest turn's."""
        hi = bisect.bisect_right(self.starts, end)  # turns starting before the span ends
        overlap: dict[str, float] = {}
        touching: set[str] = set()  # turns holding a zero-length span
        k = hi - 1
        while k >= 0 and self.max_end[k] >= start:
            t = self.turns[k]
            ov = min(end, t.end) - max(start, t.start)
            if ov > 0:
                overlap[t.speaker] = overlap.get(t.speaker, 0.0) + ov
            elif ov == 0 and t.start <= start and end <= t.end:
                touching.add(t.speaker)
            k -= 1
        if overlap:
            return max(sorted(overlap.items()), key=lambda kv: (kv[1], -self.first[kv[0]]))[0]
        if touching:
            return min(sorted(touching), key=lambda spk: self.first[spk])
        mid = (start + end) / 2
        after = bisect.bisect_left(self.starts, mid)
        candidates = []
        if after < len(self.turns):
            candidates.append((self.turns[after].start - mid, self.turns[after]))
        if after > 0:
            before = self.turns[self.max_at[after - 1]]
            candidates.append((max(mid - before.end, 0.0), before))
        return min(candidates, key=lambda c: (c[0], c[1].start))[1].speaker


def talk_time(turns: list[Turn]) -> dict[str, SpeakerInfo]:
    """``speakers``: {label: {name: label, time: talk seconds}} from the turns, labels sorted."""
    totals: dict[str, float] = {}
    for t in turns:
        totals[t.speaker] = totals.get(t.speaker, 0.0) + max(0.0, t.end - t.start)
    return {k: SpeakerInfo(name=k, time=round(v, 2)) for k, v in sorted(totals.items())}


def assign_speakers(segments: list[Segment], turns: list[Turn]) -> tuple[list[Segment], dict[str, SpeakerInfo]]:
    """Label words and segments with speakers by time overlap (WhisperX's
    ``assign_word_speakers``, plus splitting): a segment whose words belong to several speakers
    becomes one segment per run of words (text re-joined from the words, times from the words).

    Each word takes the speaker with the most overlap, else the nearest turn's; a word without
    times takes its run's speaker (the previous timed word's, else the next's). A segment
    without words takes the speaker with the most overlap (nearest turn when none).
    """
    if not turns:
        return list(segments), {}
    index = TurnIndex(turns)
    out: list[Segment] = []
    for seg in segments:
        words = seg.words or []
        timed = [w.start is not None and w.end is not None for w in words]
        if not any(timed):
            speaker = index.speaker_at(seg.start, seg.end)
            new_words = [w.model_copy(update={"speaker": speaker}) for w in words] if words else seg.words
            out.append(seg.model_copy(update={"speaker": speaker, "words": new_words}))
            continue
        spk: list[Optional[str]] = [index.speaker_at(w.start, w.end) if ok else None for w, ok in zip(words, timed)]
        last = next(s for s in spk if s is not None)
        for i, s in enumerate(spk):  # untimed words follow the previous timed word
            if s is None:
                spk[i] = last
            else:
                last = s
        labelled = [w.model_copy(update={"speaker": s}) for w, s in zip(words, spk)]
        runs: list[list[TimedWord]] = []
        for w in labelled:
            if runs and runs[-1][0].speaker == w.speaker:
                runs[-1].append(w)
            else:
                runs.append([w])
        if len(runs) == 1:
            out.append(seg.model_copy(update={"speaker": runs[0][0].speaker, "words": labelled}))
            continue
        for run in runs:
            starts = [w.start for w in run if w.start is not None]
            ends = [w.end for w in run if w.end is not None]
            out.append(Segment(
                start=min(starts) if starts else seg.start,
                end=max(ends) if ends else seg.end,
                text=" ".join(w.word.strip() for w in run),
                words=run,
                speaker=run[0].speaker,
            ))
    return out, talk_time(turns)
