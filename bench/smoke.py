"""Every benchmark with ``--smoke`` (the same path, small inputs), so a change that breaks one fails CI.

    python bench/smoke.py [--lanes 2] [--only load,warm]      # make bench-smoke; .ci/run

The benches run ``--lanes`` at a time (default 2), the longest first: most of a smoke run is waiting
(Prefect servers starting, workers polling, processes importing torch), so two lanes use two
cores better than one and finish in about two thirds of the time. Each bench's output goes to
``out/bench-smoke-<name>.log``; a failure prints its log's tail, and the exit code is 1 when any
bench failed. Smoke numbers are not measurements (two benches share the CPU): the full benches are.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out"

# (name, arguments after bench/<name>.py); the longest first: a free lane takes the next one
BENCHES: list[tuple[str, list[str]]] = [  # seconds each took, two at a time on 2 cores (2026-12-06)
    ("lost_runs", ["--smoke"]),  # 79
    ("turns", ["--smoke"]),  # 77
    ("load", ["--smoke"]),  # 70
    ("canaries", ["--smoke"]),  # 49
    ("batch", ["--smoke"]),  # 44
    ("names_threshold", ["--smoke"]),  # 43
    ("gpu", ["--device", "cpu", "--model", "bundled:base", "--smoke", "--no-load"]),  # 41
    ("distill_telephone", ["--smoke"]),  # 39
    ("remote", ["--smoke"]),  # 39
    ("warm", ["--smoke"]),  # 37
    ("memory", ["--smoke"]),  # 30
    ("overlap", ["--smoke"]),  # 30
    ("speakers", ["--smoke"]),  # 24
    ("align", ["--smoke"]),  # 21
    ("transcribe_vs_whisperx", ["--smoke"]),  # 19
]


def run_one(name: str, args: list[str], lock: threading.Lock, failed: list[str]) -> None:
    log = OUT / f"bench-smoke-{name}.log"
    start = time.monotonic()
    with log.open("wb") as out:
        rc = subprocess.call([sys.executable, str(REPO / "bench" / f"{name}.py"), *args], cwd=REPO,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = log.read_text(errors="replace").splitlines()
    with lock:
        if rc == 0:  # its result: the last JSON line (a library's shutdown noise may follow it), else the last line
            shown = next((line for line in reversed(lines) if line.startswith("{")), (lines or [""])[-1])
            print(f"ok   bench/{name}.py in {time.monotonic() - start:.0f} s: {shown[:150]}", flush=True)
        else:
            failed.append(name)
            tail = "\n".join(lines[-40:])
            print(f"FAIL bench/{name}.py (exit {rc}, {time.monotonic() - start:.0f} s; log {log}):\n{tail}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/smoke.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lanes", type=int, default=2, help="benches running at once (default 2)")
    p.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    args = p.parse_args(argv)
    wanted = [b for b in BENCHES if not args.only or b[0] in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b[0] for b in BENCHES}
    if unknown or args.lanes < 1:
        p.error(f"unknown bench(es): {', '.join(sorted(unknown))}" if unknown else "--lanes must be at least 1")
    OUT.mkdir(exist_ok=True)
    lock, failed = threading.Lock(), []
    queue = list(wanted)

    def lane() -> None:
        while True:
            with lock:
                if not queue:
                    return
                name, bench_args = queue.pop(0)
            run_one(name, bench_args, lock, failed)

    start = time.monotonic()
    threads = [threading.Thread(target=lane) for _ in range(min(args.lanes, len(wanted)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(wanted) - len(failed)} of {len(wanted)} benches ok in {time.monotonic() - start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
