"""Peak memory of a long real run: the CLI on N minutes of real recorded speech (default 60)
against the same CLI on 30 s of it, each in a fresh process, measured with ``wait4`` (the
child's own peak RSS). The difference is what the length of the audio costs; the target is at
most 1.0 GB for an hour (issue 13).

    .venv/bin/python bench/memory.py [--minutes 60] [--align] [--json PATH]

The long file is the real recordings of ``bench/realdata.py`` (council meetings, AMI excerpts,
the telephone call) played one after another until N minutes, written as FLAC.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, report, apply_smoke, smoke_option  # noqa: E402


def long_audio(minutes: float, into: Path) -> tuple[Path, Path]:
    """``minutes`` of real speech as FLAC, and its first 30 s."""
    import numpy as np
    import soundfile as sf

    from bench.realdata import recordings

    pieces, total, want = [], 0, int(minutes * 60 * 16000)
    recs = recordings()
    while total < want:
        for rec in recs:
            audio, rate = sf.read(str(rec.path), dtype="float32")
            assert rate == 16000, rec.path
            audio = audio.mean(axis=1) if audio.ndim == 2 else audio
            pieces.append(audio[: want - total])
            total += len(pieces[-1])
            if total >= want:
                break
    audio = np.concatenate(pieces)
    long, short = into / "real-speech.flac", into / "real-speech-30s.flac"
    sf.write(str(long), audio, 16000, format="FLAC")
    sf.write(str(short), audio[: 30 * 16000], 16000, format="FLAC")
    return long, short


def peak_rss_mb(audio: Path, out: Path, extra: list[str], home: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one CLI process on ``audio``, with its own caches."""
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "SPEECH_CACHE_DIR": str(home / "cache"),
           "LOCAL_PREFECT_SERVER": "off"}
    cmd = [sys.executable, "-m", "flows.transcribe", str(audio), "--language", "en", "--download-dir", str(out),
           "--force", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the CLI failed on {audio.name} ({proc.returncode}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # KiB on Linux


def run(args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--align-output", "--align-backend", "pocketsphinx"] if args.align else []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        long, short = long_audio(args.minutes, work)
        (work / "home").mkdir()
        short_mb, short_s = peak_rss_mb(short, work / "out", extra, work / "home")  # warms the model cache too
        long_mb, long_s = peak_rss_mb(long, work / "out", extra, work / "home")
    return {"minutes": args.minutes, "align": args.align, "short_peak_mb": round(short_mb),
            "long_peak_mb": round(long_mb), "extra_mb": round(long_mb - short_mb),
            "short_seconds": round(short_s, 1), "long_seconds": round(long_s, 1),
            "long_real_time_factor": round(long_s / (args.minutes * 60), 3), "target_extra_mb": 1024}


def print_table(res: dict[str, Any]) -> None:
    print(f"CLI peak RSS, transcribe{' + align (pocketsphinx)' if res['align'] else ''}, real speech:")
    print(f"  30 s              {res['short_peak_mb']:>6} MB   ({res['short_seconds']} s)")
    print(f"  {res['minutes']:g} min          {res['long_peak_mb']:>6} MB   ({res['long_seconds']} s, "
          f"RTF {res['long_real_time_factor']})")
    verdict = "within" if res["extra_mb"] <= res["target_extra_mb"] else "OVER"
    print(f"  length costs      {res['extra_mb']:>6} MB   ({verdict} the {res['target_extra_mb']} MB target)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--align", action="store_true", help="also align words (pocketsphinx, offline)")
    p.add_argument("--json", dest="json_path", help="also write the numbers here")
    smoke_option(p, minutes=0.5)
    report(apply_smoke(p.parse_args(argv)), run, print_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
