"""Two callers on one work pool through the endpoint's ``--deployment`` mode: turns vs first come, first served.

    python bench/turns.py [--jobs 6] [--smoke]      # make bench-turns

A local Prefect server (on PostgreSQL, as in production), ``transcribe-audio`` deployed to a
process pool with one worker (one run at a time), and the RunPod-compatible endpoint with two
callers' keys. alice sends ``--jobs`` jobs
at once, then bob sends one. With ``--turns-ahead 1`` (the callers take turns,
``deployments/turns.py``) bob's job starts after at most the run in progress and the one released
ahead (second, or third when the worker took alice's first before her second was sent); with
``--turns-ahead 0`` (first come, first served, the pool's own order) it starts last. Prints, for
each, where bob's job started among all, how long it waited (its flow run's created -> start) and
the wall time of the whole lot (turns should cost no throughput). Exit code 1 when bob's job
starts later than third with turns. ``--smoke`` (CI): three jobs of alice's, turns only, SQLite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, apply_smoke, keep_option, report, scratch, smoke_option  # noqa: E402
from deployments.local_server import (  # noqa: E402
    deploy_to_process_pool, local_postgres, local_prefect_server, start_endpoint, start_process_worker, stop)

POOL = "turns-pool"
KEYS = {"alice": "alice-bench-key-0123", "bob": "bob-bench-key-4567"}
AUDIO = "enrol_slt.wav"  # a short fixture: the order is measured, not the transcription


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/turns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=6, help="alice's jobs, sent before bob's one (default 6)")
    p.add_argument("--modes", default="turns,fifo", help="turns (--turns-ahead 1), fifo (--turns-ahead 0)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the jobs of one mode may take in all")
    p.add_argument("--json", dest="json_path", help="also write the numbers here")
    keep_option(p)
    p.add_argument("--sqlite", action="store_true", help="the server on SQLite instead of PostgreSQL")
    smoke_option(p, jobs=3, modes="turns", sqlite=True)
    return apply_smoke(p.parse_args(argv))


def _post(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def one_mode(args: argparse.Namespace, env: dict[str, str], tmp: Path, ahead: int, client: Any) -> dict[str, Any]:
    """alice's jobs then bob's through an endpoint with ``--turns-ahead ahead``: bob's start position."""
    import uuid

    proc, base = start_endpoint(env, tmp / f"endpoint-{ahead}.log", KEYS, "--deployment", "transcribe-audio/bench",
                                "--turns-ahead", str(ahead))
    try:
        body = {"input": {"audio_file": str(DATA / AUDIO), "language": "en", "force": True}}  # each transcribes
        started = time.monotonic()
        jobs = [("alice", _post(f"{base}/run", KEYS["alice"], body)["id"]) for _ in range(args.jobs)]
        jobs.append(("bob", _post(f"{base}/run", KEYS["bob"], body)["id"]))
        while True:
            runs = [client.read_flow_run(uuid.UUID(job_id)) for _, job_id in jobs]
            if all(r.state.is_final() for r in runs):
                break
            if time.monotonic() - started > args.timeout:
                raise RuntimeError(f"jobs not done in {args.timeout:g} s: {[r.state.name for r in runs]}")
            time.sleep(1)
        wall = time.monotonic() - started
    finally:
        stop(proc)
    failed = [r.state.name for r in runs if not r.state.is_completed()]
    if failed:
        raise RuntimeError(f"runs did not complete: {failed}")
    order = sorted(range(len(runs)), key=lambda i: runs[i].start_time)
    bob = len(jobs) - 1
    return {"bob_started": order.index(bob) + 1, "of": len(jobs), "wall_s": round(wall, 1),
            "bob_wait_s": round((runs[bob].start_time - runs[bob].created).total_seconds(), 1),
            "order": [jobs[i][0] for i in order]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = {"turns": 1, "fifo": 0}
    wanted = [m for m in args.modes.split(",") if m]
    unknown = set(wanted) - set(modes)
    if unknown:
        raise SystemExit(f"unknown mode(s): {', '.join(sorted(unknown))}")
    res: dict[str, Any] = {"jobs_alice": args.jobs, "modes": {}}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(scratch("bench-turns-", args.keep))
        database = None if args.sqlite else stack.enter_context(local_postgres())
        server = stack.enter_context(local_prefect_server(tmp / "home", database_url=database))
        res["database"] = "sqlite" if database is None else "postgresql"
        from prefect.client.orchestration import SyncPrefectClient

        from flows.transcribe import transcribe_audio

        deploy_to_process_pool(server, POOL, transcribe_audio)
        env = {**server.env, "ALLOW_LOCAL_PATHS": str(DATA), "SPEECH_CACHE_DIR": str(tmp / "cache"),
               "RESULTS_STORAGE": str(tmp / "results"), "RESULTS_DIR": str(tmp / "out"), "HF_HUB_OFFLINE": "1",
               "LOCAL_PREFECT_SERVER": "off", "PYTHONDONTWRITEBYTECODE": "1"}
        worker = start_process_worker(POOL, env, tmp / "worker.log")
        try:
            if not args.smoke:  # the pool's first run pays the cold start: not in the first mode's wall time
                from prefect.deployments import run_deployment
                from prefect.settings import PREFECT_API_URL, temporary_settings

                with temporary_settings({PREFECT_API_URL: server.url}):
                    warm = run_deployment("transcribe-audio/bench", timeout=300, poll_interval=1,
                                          parameters={"audio_file": str(DATA / AUDIO), "language": "en", "force": True})
                if not warm.state.is_completed():
                    raise RuntimeError(f"the warm-up run ended {warm.state.name}: {warm.state.message}")
            with SyncPrefectClient(server.url) as client:
                for mode in wanted:
                    res["modes"][mode] = one_mode(args, env, tmp, modes[mode], client)
                    print(f"{mode}: {res['modes'][mode]}", flush=True)
        finally:
            stop(worker)
    turns = res["modes"].get("turns")
    res["goal_met"] = turns is None or turns["bob_started"] <= 3  # the run in progress, the one released ahead
    return res


def print_table(res: dict[str, Any]) -> None:
    print(f"alice sends {res['jobs_alice']} jobs, then bob 1; one worker, one run at a time; server on {res['database']}")
    for mode, m in res["modes"].items():
        print(f"  {mode:6} bob's job started {m['bob_started']} of {m['of']} after waiting {m['bob_wait_s']:6.1f} s; "
              f"all done in {m['wall_s']:6.1f} s  (order {' '.join(m['order'])})")
    print(json.dumps({mode: {k: m[k] for k in ("bob_started", "bob_wait_s", "wall_s")} for mode, m in res["modes"].items()}))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = report(args, run, print_table)
    return 0 if res["goal_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
