#!/usr/bin/env python
"""Benchmark: the align stage's backends, accuracy and speed, in one run (offline, CPU).

    python bench/align.py [--json PATH] [--seconds 120] [--repeats 1]

For each backend (``pocketsphinx``, ``whisper``, ``wav2vec2``; a backend whose model does not
load is reported "unavailable" with the one-line reason from ``AlignOutcome.error``):

  1. word-time error vs the ground truth in tests/data/fixtures.json (sample_2spk.wav,
     heldout_3spk.wav, align_3spk.wav): mean |start| and mean |end| error in ms over the words
     matched by text (``bench.metrics.word_time_error``). The segments come from the real
     pipeline: ``speech.asr.transcribe.transcribe(audio, TranscribeParams(language="en"))`` once per
     file, that transcript reused for every backend, then
     ``speech.align.align(audio, transcript, AlignParams(backend=B))``.
  2. speed: alignment seconds per audio minute on a >= 2 minute clip made by concatenating the
     three fixtures (repeated as needed), after one untimed warm-up ``align`` call per backend
     (on heldout_3spk.wav, which also loads its model); the transcribe stage's time on the same
     clip is measured too, so the alignment cost reads as a fraction of transcription.

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

from bench.common import DATA, report, apply_smoke, smoke_option  # noqa: E402 - light: paths and a JSON writer

FIXTURES = ["sample_2spk.wav", "heldout_3spk.wav", "align_3spk.wav"]
WARMUP_FIXTURE = "heldout_3spk.wav"  # the shortest
BACKENDS = ["pocketsphinx", "whisper", "wav2vec2"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/align.py",
        description="Align-stage backends (pocketsphinx, whisper, wav2vec2 if its model loads): word-time "
        "error vs the fixtures' ground truth, and alignment seconds per audio minute on a >= 2 min clip "
        "next to the transcribe stage's time on the same clip.",
    )
    p.add_argument("--seconds", type=float, default=120.0,
                   help="minimum length of the speed clip, built by repeating the three fixtures (default 120)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per backend (and of transcribe) on the speed clip; the min is kept (default 3)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated backends to measure (default {','.join(BACKENDS)})")
    p.add_argument("--verbose", action="store_true", help="keep library warnings and log output")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every number to this JSON file")
    smoke_option(p, seconds=20.0, repeats=1, backends="pocketsphinx,whisper")
    return apply_smoke(p.parse_args(argv))


def _ms(x: float) -> Optional[float]:
    return None if x == float("inf") else round(x * 1000, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # wav2vec2: cache only, fail fast
    from bench.common import quiet_libraries

    quiet_libraries(args.verbose)

    import numpy as np

    from bench.metrics import word_time_error
    from speech import models
    from speech.align.stage import align
    from speech.asr.transcribe import transcribe
    from speech.asr.whisper import resolve_model
    from speech.io.audio import load_audio, read_samples
    from speech.contracts import AlignParams, TranscribeParams
    from speech.schema import SAMPLE_RATE
    from speech.settings import get_settings

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    settings = get_settings()
    spec = resolve_model(None, settings)
    device, compute_type = models.resolve_device(settings)
    manifest = json.loads((DATA / "fixtures.json").read_text())
    res: dict[str, Any] = {
        "config": {"model": spec.label, "device": device, "compute_type": compute_type,
                   "cpu_threads": settings.cpu_threads or os.cpu_count(), "cpu_count": os.cpu_count(),
                   "transcribe_params": {"language": "en"}, "repeats": args.repeats},
        "files": {}, "backends": {}, "clip": {},
    }
    t_all = time.perf_counter()

    # --- transcripts: the real transcribe stage, once per file ------------------------
    audio: dict[str, np.ndarray] = {}
    transcripts: dict[str, Any] = {}
    for name in FIXTURES:
        audio[name] = np.asarray(read_samples(load_audio(str(DATA / name))))
        t = time.perf_counter()
        transcripts[name] = transcribe(audio[name], TranscribeParams(language="en"))
        res["files"][name] = {"duration_s": round(len(audio[name]) / SAMPLE_RATE, 3),
                              "ref_words": len(manifest[name]["words"]),
                              "segments": len(transcripts[name].segments),
                              "transcribe_s": round(time.perf_counter() - t, 3)}
        print(f"transcribed {name}: {len(transcripts[name].segments)} segments in "
              f"{res['files'][name]['transcribe_s']:.1f} s", flush=True)

    # --- the speed clip: the fixtures concatenated (repeated) to >= args.seconds -----------
    parts, total, i = [], 0, 0
    while total < args.seconds * SAMPLE_RATE:
        parts.append(audio[FIXTURES[i % len(FIXTURES)]])
        total += len(parts[-1])
        i += 1
    clip = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    clip_s = len(clip) / SAMPLE_RATE
    tr_times, clip_tr = [], None
    for _ in range(max(args.repeats, 1)):
        t = time.perf_counter()
        tr = transcribe(clip, TranscribeParams(language="en"))
        tr_times.append(time.perf_counter() - t)
        if tr_times[-1] == min(tr_times):
            clip_tr = tr  # the fastest run's transcript (and its stage timings)
    tr_s = min(tr_times)
    res["clip"] = {"duration_s": round(clip_s, 3), "pieces": len(parts), "segments": len(clip_tr.segments),
                   "transcribe_s": round(tr_s, 3), "transcribe_runs_s": [round(x, 3) for x in tr_times],
                   "transcribe_s_per_audio_min": round(tr_s / (clip_s / 60), 3),
                   "transcribe_timings": clip_tr.timings}
    print(f"transcribed the {clip_s:.1f} s clip: {len(clip_tr.segments)} segments in {tr_s:.1f} s", flush=True)

    # --- per backend: warm-up, accuracy on the fixtures, speed on the clip --------------
    for backend in backends:
        params = AlignParams(backend=backend)
        entry: dict[str, Any] = {"status": "ok", "error": None, "files": {}}
        res["backends"][backend] = entry
        t = time.perf_counter()
        warm = align(audio[WARMUP_FIXTURE], transcripts[WARMUP_FIXTURE], params)
        entry["warmup_s"] = round(time.perf_counter() - t, 3)
        if warm.backend != backend:
            entry.update(status="unavailable", error=(warm.error or "no word times").splitlines()[0])
            print(f"{backend}: unavailable ({entry['error']})", flush=True)
            continue
        for name in FIXTURES:
            t = time.perf_counter()
            out = align(audio[name], transcripts[name], params)
            dt = time.perf_counter() - t
            if out.backend != backend:
                entry["files"][name] = {"error": out.error}
                continue
            hyp = [w.model_dump() for s in out.segments for w in (s.words or [])]
            start_err, end_err, matched = word_time_error(manifest[name]["words"], hyp)
            entry["files"][name] = {"start_ms": _ms(start_err), "end_ms": _ms(end_err), "matched": matched,
                                    "ref_words": len(manifest[name]["words"]), "hyp_words": len(hyp),
                                    "align_s": round(dt, 3)}
        runs = []
        for _ in range(max(args.repeats, 1)):
            t = time.perf_counter()
            out = align(clip, clip_tr, params)
            runs.append(time.perf_counter() - t)
            if out.backend != backend:
                entry.update(status="failed on clip", error=out.error)
                break
        if entry["status"] == "ok":
            a = min(runs)
            entry["speed"] = {"align_s": round(a, 3), "runs_s": [round(x, 3) for x in runs],
                              "s_per_audio_min": round(a / (clip_s / 60), 3),
                              "align_over_transcribe": round(a / tr_s, 3)}
        print(f"{backend}: done", flush=True)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return res


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any]) -> None:
    cfg, clip = res["config"], res["clip"]
    print()
    print(f"model {cfg['model']} on {cfg['device']}/{cfg['compute_type']}, {cfg['cpu_count']} CPUs; "
          f"transcripts: TranscribeParams(language='en')")
    print()
    print("word-time error vs ground truth: mean |start| / mean |end| in ms (matched / reference words)")
    names = FIXTURES
    head = f"{'backend':<13}" + "".join(f"{n:>26}" for n in names)
    print(head)
    print("-" * len(head))
    for b, e in res["backends"].items():
        if e["status"] == "unavailable":
            print(f"{b:<13}  unavailable: {e['error']}")
            continue
        cells = []
        for n in names:
            f = e["files"].get(n, {})
            if "start_ms" not in f:
                cells.append(f"{'failed':>26}")
            else:
                cells.append(f"{_fmt(f['start_ms']):>6} / {_fmt(f['end_ms']):>6} ({f['matched']:>2}/{f['ref_words']:>2})"
                             .rjust(26))
        print(f"{b:<13}" + "".join(cells))
    print()
    print(f"speed on a {clip['duration_s']:.1f} s clip ({clip['pieces']} fixtures concatenated, "
          f"{clip['segments']} segments), after one warm-up call per backend:")
    print(f"  transcribe stage: {clip['transcribe_s']:.2f} s = {clip['transcribe_s_per_audio_min']:.2f} s per audio min")
    head = f"{'backend':<13}{'align s':>10}{'s / audio min':>16}{'align / transcribe':>21}{'warm-up s':>12}"
    print(head)
    print("-" * len(head))
    for b, e in res["backends"].items():
        if e["status"] != "ok" or "speed" not in e:
            print(f"{b:<13}{'-':>10}{'-':>16}{'-':>21}{_fmt(e.get('warmup_s'), '.2f'):>12}  ({e['status']})")
            continue
        s = e["speed"]
        print(f"{b:<13}{s['align_s']:>10.2f}{s['s_per_audio_min']:>16.2f}{s['align_over_transcribe']:>20.1%}"
              f" {e['warmup_s']:>11.2f}")
    print()
    print(f"total {res['total_s']:.0f} s, load average {res['loadavg_1m']}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report(args, run, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
