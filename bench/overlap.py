"""How much of the hosted APIs' waiting does a run hide behind its own work?

    python bench/overlap.py [--seconds 30] [--deepgram-delay 8] [--pyannote-job 10] [--json out.json]

One in-process flow run per scenario on a ~30 s clip (language en, word alignment, diarization
through pyannoteAI, Deepgram word confidence), against two loopback servers speaking the real
APIs (tests/deepgram_stub.py, tests/pyannote_stub.py): Deepgram answering after
``--deepgram-delay`` seconds and a pyannoteAI job that runs ``--pyannote-job`` seconds ("slow"),
and the same servers answering at once ("instant"). Every run uses ``force`` (nothing cached)
after a warm-up run (Prefect's server and the models are loaded once, before measuring).

Reported: wall time of each scenario (best of ``--repeats``) and their difference. A DAG that
waits for each API in turn pays the sum of the two waits (18 s by default); the goal is that the
difference stays within 3 s. It cannot go below the longest single wait minus the local work it
overlaps (a run cannot end before its slowest API answers), so also reported: how long the slow
run took beyond its longest wait.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import wave
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the loopback API servers

from bench.common import apply_smoke, keep_option, scratch, smoke_option  # noqa: E402

GOAL_SECONDS = 3.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/overlap.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="clip length (from diar_2spk.wav + diar_3spk.wav)")
    p.add_argument("--deepgram-delay", type=float, default=8.0, help="seconds Deepgram takes to answer")
    p.add_argument("--pyannote-job", type=float, default=10.0, help="seconds a pyannoteAI job runs")
    p.add_argument("--repeats", type=int, default=2, help="runs per scenario; the fastest counts")
    p.add_argument("--json", dest="json_path", help="also write the numbers here")
    keep_option(p)
    smoke_option(p, seconds=10.0, deepgram_delay=1.0, pyannote_job=2.0, repeats=1)
    return apply_smoke(p.parse_args(argv))


def build_clip(path: Path, seconds: float) -> float:
    """The first ``seconds`` of two fixture conversations back to back, as one 16 kHz WAV."""
    frames = b""
    for name in ("diar_2spk.wav", "diar_3spk.wav"):
        with wave.open(str(REPO / "tests" / "data" / name)) as w:
            frames += w.readframes(w.getnframes())
    frames = frames[: int(seconds * 16000) * 2]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(frames)
    return len(frames) / 2 / 16000


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sys.dont_write_bytecode = True
    with scratch("bench-overlap-", args.keep) as work:
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> int:
    os.environ.update(PREFECT_HOME=str(work / "prefect"), SPEECH_CACHE_DIR=str(work / "cache"),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
                      PREFECT_LOGGING_LEVEL="WARNING")
    clip = work / "clip.wav"
    duration = build_clip(clip, args.seconds)

    from deepgram_stub import KEY as DEEPGRAM_KEY, DeepgramServer
    from pyannote_stub import KEY as PYANNOTE_KEY, PyannoteServer

    res: dict[str, Any] = {"config": {"clip_seconds": round(duration, 2), "deepgram_delay_s": args.deepgram_delay,
                                      "pyannote_job_s": args.pyannote_job, "repeats": args.repeats,
                                      "cpu_count": os.cpu_count()}, "seconds": {}}
    with PyannoteServer() as pyannote, DeepgramServer(["ok"]) as deepgram:
        os.environ.update(PYANNOTE_API_KEY=PYANNOTE_KEY, PYANNOTE_API_URL=pyannote.url,
                          DEEPGRAM_API_KEY=DEEPGRAM_KEY, DEEPGRAM_BASE_URL=deepgram.url)
        from flows.transcribe import transcribe_audio

        def run(deepgram_delay: float, job_seconds: float) -> tuple[float, dict]:
            deepgram.delay = deepgram_delay
            pyannote.reset().job_seconds = job_seconds
            t0 = time.perf_counter()
            result = transcribe_audio(audio_file=str(clip), language="en", align_output=True, diarization=True,
                                      pyannote_poll_interval=0.2, force=True, debug=True,
                                      download_dir=str(work / "out"))
            return time.perf_counter() - t0, result

        seconds, _ = run(0.0, 0.0)
        res["seconds"]["warmup"] = round(seconds, 2)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, delays in (("instant", (0.0, 0.0)), ("slow", (args.deepgram_delay, args.pyannote_job))):
                seconds, result = run(*delays)
                assert result["debug"]["diarization"]["backend"] == "pyannote-api", result["debug"]["diarization"]
                assert result.get("confidence"), "no Deepgram confidence in the result"
                best[name] = min(best.get(name, float("inf")), seconds)
                res.setdefault("stage_seconds", {})[name] = result["debug"]["stage_seconds"]
    res["seconds"].update({k: round(v, 2) for k, v in best.items()})
    difference = best["slow"] - best["instant"]
    res["difference_s"] = round(difference, 2)
    res["waits_sum_s"] = args.deepgram_delay + args.pyannote_job
    longest = max(args.deepgram_delay, args.pyannote_job)
    res["beyond_longest_wait_s"] = round(best["slow"] - longest, 2)
    res["goal_met"] = difference <= GOAL_SECONDS

    print(f"clip {duration:.1f} s, Deepgram answering after {args.deepgram_delay:g} s, "
          f"pyannoteAI job of {args.pyannote_job:g} s (best of {args.repeats})")
    print(f"  instant APIs       {best['instant']:7.2f} s")
    print(f"  slow APIs          {best['slow']:7.2f} s")
    print(f"  difference         {difference:7.2f} s   (the waits add up to {res['waits_sum_s']:g} s; "
          f"goal <= {GOAL_SECONDS:g} s: {'met' if res['goal_met'] else 'missed'})")
    print(f"  slow run beyond its longest wait ({longest:g} s): {res['beyond_longest_wait_s']:.2f} s "
          f"(the floor of the difference is that wait minus the local work it hides)")
    print(f"  stage seconds, slow: {res['stage_seconds']['slow']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"difference_s": res["difference_s"], "instant_s": res["seconds"]["instant"],
                      "slow_s": res["seconds"]["slow"], "beyond_longest_wait_s": res["beyond_longest_wait_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
