"""Several files through the CLI's remote mode: one remote job at a time against jobs in flight at once.

    python bench/remote.py [--files 6] [--workers 2] [--json out.json]
    python bench/remote.py --smoke          # two short files (CI: make bench-smoke)

In one invocation: a Prefect server (SQLite), this project's RunPod-compatible endpoint in its
in-process mode running ``--workers`` jobs at once (a stand-in for a pool of warm workers), and
the fixtures served over HTTP on 127.0.0.1. After a warm-up job (the model loads), the same files
go through ``whisperx-prefect URL... --endpoint ... --force`` twice, each command in its own
process: with ``--remote-jobs 1`` (one job after another, as the command did before) and with
``--remote-jobs`` = ``--workers``. ``--force``: every stage is recomputed in both. Each job
computes with ``--threads`` CPU threads (the endpoint's WHISPERX_CPU_THREADS) (default: the cores / ``--workers``), as a pool of
workers with a device each would: one job at a time then leaves the other workers' share idle.

Reported: both walls, their ratio, and whether both wrote the same transcripts. The ratio is
bounded by min(files, workers) and by what does not overlap (the command's start, the last job).
With ``--threads`` = all cores for every job, the jobs share the cores and the ratio only shows
what is not arithmetic (fetching, Prefect's bookkeeping, the command's polling). Exit code 1 when
a command failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, FIXTURES, apply_smoke, keep_option, report, scratch, serve_folder, smoke_option  # noqa: E402
from deployments.local_server import local_prefect_server, start_endpoint, stop  # noqa: E402

KEY = "remote-bench-key"
WARM_UP = "enrol_kal16.wav"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/remote.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=6, help="fixtures sent (the longest first; default 6)")
    p.add_argument("--workers", type=int, default=2, help="jobs the endpoint runs at once, and --remote-jobs (default 2)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each job (default: cores / --workers)")
    p.add_argument("--fixtures", default="", help="comma-separated fixture names instead of the first --files")
    p.add_argument("--json", dest="json_path", help="also write the numbers here")
    keep_option(p)
    smoke_option(p, fixtures="enrol_slt.wav,enrol_awb.wav", workers=2)
    return apply_smoke(p.parse_args(argv))


def _command(env: dict[str, str], endpoint: str, urls: list[str], jobs: int, out: Path) -> tuple[float, dict[str, str]]:
    """One ``whisperx-prefect`` process: its wall time and each output's words (stem -> text)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.transcribe", "--endpoint", endpoint, *urls, "--language", "en",
                           "--force", "--remote-jobs", str(jobs), "--download-dir", str(out)],
                          cwd=REPO, env={**env, "RUNPOD_API_KEY": KEY}, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"whisperx-prefect --remote-jobs {jobs} exited {done.returncode}:\n{done.stderr[-3000:]}")
    texts = {p.name[:-5]: " ".join(s["text"].strip() for s in json.loads(p.read_text())["segments"])
             for p in out.glob("*.json") if not p.name.endswith(".segments.json")}
    return wall, texts


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in args.fixtures.split(",") if n] or FIXTURES[: args.files]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    base, http_server = serve_folder(DATA)
    urls = [f"{base}/{name}" for name in names]
    with ExitStack() as stack:
        tmp = stack.enter_context(scratch("bench-remote-", args.keep))
        stack.callback(http_server.shutdown)
        server = stack.enter_context(local_prefect_server(tmp / "home"))
        env = {**server.env, "FETCH_ALLOW_HOSTS": "127.0.0.1", "SPEECH_CACHE_DIR": str(tmp / "cache"),
               "RESULTS_STORAGE": str(tmp / "results"), "RESULTS_DIR": str(tmp / "endpoint-out"),
               "LOCAL_PREFECT_SERVER": "off", "PYTHONDONTWRITEBYTECODE": "1"}
        proc, endpoint = start_endpoint({**env, "WHISPERX_CPU_THREADS": str(threads)}, tmp / "endpoint.log", KEY,
                                        "--workers", str(args.workers))
        stack.callback(stop, proc)
        print(f"endpoint {endpoint} ({args.workers} jobs at once, {threads} threads each); {len(names)} files", flush=True)
        warm, _ = _command(env, endpoint, [f"{base}/{WARM_UP}"], 1, tmp / "warm-up")
        print(f"warm-up (model load): {warm:.1f} s", flush=True)
        one, texts_one = _command(env, endpoint, urls, 1, tmp / "one-at-a-time")
        print(f"--remote-jobs 1: {one:.1f} s", flush=True)
        many, texts_many = _command(env, endpoint, urls, args.workers, tmp / "at-once")
        print(f"--remote-jobs {args.workers}: {many:.1f} s", flush=True)
    return {"files": len(names), "audio_s": round(sum(_seconds(DATA / n) for n in names), 1), "workers": args.workers,
            "threads_per_job": threads, "cores": os.cpu_count(), "one_at_a_time_s": round(one, 2), "at_once_s": round(many, 2),
            "speedup": round(one / many, 2), "outputs": len(texts_many),
            "same_transcripts": texts_one == texts_many and len(texts_one) == len(names)}


def _seconds(path: Path) -> float:
    import wave

    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def print_table(res: dict[str, Any]) -> None:
    print(f"{res['files']} files ({res['audio_s']} s of audio), endpoint with {res['workers']} workers of "
          f"{res['threads_per_job']} threads on {res['cores']} cores: one at a time {res['one_at_a_time_s']} s, {res['workers']} at once "
          f"{res['at_once_s']} s, speedup {res['speedup']}x; same transcripts: {res['same_transcripts']}")
    print(json.dumps(res))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        res = report(args, run, print_table)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0 if res["outputs"] == res["files"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
