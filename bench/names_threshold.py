"""Enrolled names when not everyone is enrolled: what ``speaker_threshold`` trades.

    python bench/names_threshold.py [--sets council,ami] [--bands 16k,8k] [--thresholds 0.45,...,0.7]
    python bench/names_threshold.py --smoke     # one AMI excerpt, 16 kHz, two thresholds (CI)

For every recording whose people all appear in other recordings of its set (bench/realdata.py:
the council meetings, training material; AMI dev00, held out and only reported), in each band:
the segmented diarizer as shipped, everyone enrolled from the other recordings
(bench/speakers.py's enrolment clips), then for each threshold (CAM++, its margin):

- ``named``: the share of single-speaker speech time whose turn carries the right name, everyone
  enrolled (as bench/speakers.py ``--names``);
- ``left_out_named``: with each person in turn left out of the enrolment, the share of that
  person's speech whose turn carries some enrolled name (wrongly: they are not enrolled).

Embeddings are computed once per clip and reused across thresholds and enrolments (they do not
depend on either). Mean per set, split and band in the summary; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import apply_smoke, report, smoke_option  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/names_threshold.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="council,ami", help="bench/realdata.py sets (default council,ami)")
    p.add_argument("--bands", default="16k,8k", help="16k, 8k (mu-law telephone copy), 8k-lp (default 16k,8k)")
    p.add_argument("--thresholds", default="0.45,0.5,0.55,0.6,0.65,0.7", help="speaker_threshold values")
    p.add_argument("--limit", type=int, default=0, help="at most this many scorable recordings per set")
    p.add_argument("--json", dest="json_path", help="also write the numbers here")
    smoke_option(p, sets="ami", bands="16k", thresholds="0.45,0.65", limit=1)  # a short excerpt: 31 s, a meeting 187
    return apply_smoke(p.parse_args(argv))


class _Remembered:
    """An encoder that embeds each distinct clip once (the same windows recur for every threshold
    and every enrolment)."""

    def __init__(self, encoder: Any) -> None:
        import numpy as np

        self._np, self._encoder, self._seen = np, encoder, {}
        self.name, self.threshold, self.margin = encoder.name, encoder.threshold, encoder.margin

    def embed(self, audio: Any) -> Any:
        clip = self._np.ascontiguousarray(audio, dtype=self._np.float32).reshape(-1)
        key = (clip.size, hash(clip.tobytes()))
        if key not in self._seen:
            self._seen[key] = self._encoder.embed(clip)
        return self._seen[key]


def _any_name_share(reference: list[dict], spans: list[tuple[float, float, str]], mapping: dict[str, str],
                    person: str, step: float = 0.01) -> Optional[float]:
    """Share of ``person``'s single-speaker time whose diarized turn carries some name."""
    import numpy as np

    hits = total = 0
    for t in np.arange(0.0, max(r["end"] for r in reference), step):
        if {r["speaker"] for r in reference if r["start"] <= t < r["end"]} != {person}:
            continue
        total += 1
        hits += any(s <= t < e and label in mapping for s, e, label in spans)
    return hits / total if total else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np

    from bench import realdata
    from bench.common import quiet_libraries
    from bench.speakers import band_audio, enrolment_clips, named_share, vad_regions

    quiet_libraries(False)
    from speech.contracts import DiarizeParams, Segment
    from speech.speakers import verify
    from speech.speakers.diarize import diarize
    from speech.speakers.encoders import get_encoder

    thresholds = [float(t) for t in args.thresholds.split(",")]
    encoder = _Remembered(get_encoder("campplus"))
    rows: list[dict[str, Any]] = []
    for band in args.bands.split(","):
        for name in args.sets.split(","):
            recs = realdata.recordings((name,))
            audio: dict[str, Any] = {}

            def audio_of(r: Any) -> Any:
                if r.id not in audio:
                    audio[r.id] = band_audio(r, band)
                return audio[r.id]

            scored = 0
            for rec in recs:
                if args.limit and scored >= args.limit:
                    break
                people = sorted({t["speaker"] for t in rec.turns})
                with tempfile.TemporaryDirectory() as tmp:
                    clips = enrolment_clips(rec, [r for r in recs if r is not rec], audio_of, Path(tmp))
                    if set(clips) != set(people):
                        continue  # someone of it is in no other recording: cannot be enrolled
                    enrolled = verify.enroll([c for cs in clips.values() for c in cs], encoder)
                scored += 1
                t0 = time.perf_counter()
                samples = audio_of(rec)
                regions = [Segment(start=round(s, 3), end=round(e, 3), text="") for s, e in vad_regions(samples)]
                hyp = [(t.start, t.end, t.speaker) for t in diarize(samples, regions, DiarizeParams(backend="segmented"),
                                                                     stem=rec.id).turns]
                for threshold in thresholds:
                    naming = verify.name_speakers(samples, hyp, enrolled, encoder, threshold, encoder.margin)
                    named = named_share(rec.turns, [{"start": s, "end": e, "speaker": lb} for s, e, lb in naming.turns],
                                        naming.mapping)
                    left_out = []
                    for person in people:
                        part = verify.name_speakers(samples, hyp, {k: v for k, v in enrolled.items() if k != person},
                                                    encoder, threshold, encoder.margin)
                        share = _any_name_share(rec.turns, part.turns, part.mapping, person)
                        if share is not None:
                            left_out.append(share)
                    rows.append({"recording": rec.id, "set": name, "split": rec.split, "band": band,
                                 "threshold": threshold, "named": round(named, 4),
                                 "left_out_named": round(float(np.mean(left_out)), 4) if left_out else None})
                print(f"{rec.id} ({rec.split}, {band}) {time.perf_counter() - t0:.0f} s: " + ", ".join(
                    f"{r['threshold']:.2f} {r['named']:.1%}/{r['left_out_named'] or 0:.1%}" for r in rows[-len(thresholds):]),
                    flush=True)
    summary: dict[str, Any] = {}
    for r in rows:
        summary.setdefault(f"{r['set']} {r['split']} {r['band']}", {}).setdefault(f"{r['threshold']:.2f}", []).append(r)
    for group, by_threshold in summary.items():
        for threshold, members in by_threshold.items():
            shares = [m["left_out_named"] for m in members if m["left_out_named"] is not None]
            by_threshold[threshold] = {"n": len(members), "named": round(float(np.mean([m["named"] for m in members])), 4),
                                       "left_out_named": round(float(np.mean(shares)), 4) if shares else None}
    return {"rows": rows, "summary": summary, "encoder": "campplus", "margin": encoder.margin}


def print_table(res: dict[str, Any]) -> None:
    print("\nset split band: threshold named (everyone enrolled) / a left-out person's speech named")
    for group, by_threshold in res["summary"].items():
        print(f"{group}: " + "; ".join(f"{t} {v['named']:.1%} / "
                                       f"{'-' if v['left_out_named'] is None else format(v['left_out_named'], '.1%')}"
                                       for t, v in by_threshold.items()))
    print(json.dumps(res["summary"]))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = report(args, run, print_table)
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
