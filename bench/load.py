"""Many files at once on warm task workers, on a production-like server, with a worker killed.

    python bench/load.py [--jobs 100] [--files 100] [--json out.json]
    python bench/load.py --smoke          # the same path with 6 jobs (CI: make bench-smoke)

In one invocation: PostgreSQL (Debian's ``postgresql``, a cluster of its own on a loopback
port, deleted after, as ``infra/docker-compose.yml`` runs Prefect's database), ``prefect server
start`` on it, two ``deployments.task_worker`` processes (``--preload``, ``--limit 2`` as shipped,
their own caches; a shared RESULTS_STORAGE folder), one process worker for the sweep's flow
run, and the RunPod-compatible endpoint in ``--task-workers`` mode. Then, at once: ``--jobs``
POSTs to the endpoint's ``/run`` and ``--files`` files dropped in a folder that a
``sweep-inbox`` run (``via: task-workers``) sends to the workers. When half of all files are
done, one task worker is killed with SIGKILL; its file runs again on the other.

Audio: real and synthesized speech of 5-30 s (tests/data, cut to 30 s; pyannote's sample call;
with the full run, AMI excerpts and council clips from bench/realdata.py), each job a copy with
bytes of its own (a RIFF comment chunk: same samples, another sha256, so nothing is a cache
hit or a sweep duplicate). Every output is compared with the inline result of its clip (one
``transcribe-batch`` run in this process, same request and threads).

The last line is one JSON object:
* ``completed`` / ``failed`` / ``lost`` (never finished) - goal 200 / 0 / 0; ``mismatched``:
  completed outputs that differ from the inline result (goal 0);
* ``model_loads_per_worker``: Whisper loads in each worker's log (goal 1: at start);
* ``overhead_per_file_s``: per file, a worker's time that is not compute: its task run's wall
  time minus compute and minus any wait for another file's GPU unit (``--worker-limit 2``): fetch,
  Prefect's task engine, outputs, API calls; plus the gap before the worker started it while
  files were waiting (dispatch) (goal <= 1.0 s);
* ``busy_fraction``: compute seconds / worker-seconds available (each worker from ready to its
  death or the last file) (goal >= 0.9);
* ``p50_s`` / ``p95_s``: submitted (task run created) to finished, queueing included;
* ``peak_rss_mb``: the largest task worker's peak RSS;
* ``foreign_reads_answered``: the endpoint's jobs are sent by two callers in turn, each with its own
  key (``ENDPOINT_API_KEYS``); each job's status is read by the other caller too, which must get
  404 (goal 0 answered).

Compute = VAD + language id + decoding seconds as the transcribe stage reports them
(``debug.transcribe_timings``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, FIXTURES, job_output, keep_option, scratch  # noqa: E402
from deployments.local_server import (  # noqa: E402
    deploy_to_process_pool,
    local_postgres,
    local_prefect_server,
    start_endpoint,
    start_process_worker,
    start_task_worker,
    stop,
    wait_for_task_workers,
)

KEYS = {"alice": "load-bench-key-alice", "bob": "load-bench-key-bob"}  # two callers: jobs alternate
POOL = "load-pool"
SR = 16000


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100, help="jobs POSTed to the endpoint at once")
    p.add_argument("--files", type=int, default=100, help="files dropped in the swept folder")
    p.add_argument("--smoke", action="store_true", help="3 + 3 files of the fixtures only (CI)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for everything to finish")
    p.add_argument("--json", dest="json_path", type=Path, help="also write the measurements here")
    keep_option(p)
    p.add_argument("--model", default="bundled:base", help="the model the workers serve (WORKER_MODELS) and the "
                   "references use (default bundled:base)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="WHISPERX_DEVICE (default cpu)")
    p.add_argument("--compute-type", default=None, help="compute type (default: float16 on CUDA, int8 on CPU)")
    p.add_argument("--worker-limit", type=int, default=2, help="files each task worker takes at once (--limit, "
                   "default 2 as deployments.task_worker: its GPU units take turns, so one file's I/O and "
                   "bookkeeping overlap another's compute)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (WHISPERX_CPU_THREADS; default 1: "
                   "two workers on two cores)")
    args = p.parse_args(argv)
    if args.smoke:
        args.jobs, args.files, args.timeout = 3, 3, min(args.timeout, 600)
    if args.jobs < 1 or args.files < 1:
        p.error("--jobs and --files must be at least 1")
    return args


# --- audio ---------------------------------------------------------------------------------


def clips(folder: Path, smoke: bool) -> list[Path]:
    """Distinct speech clips of 5-30 s as 16-bit WAVs in ``folder``."""
    import numpy as np
    import soundfile as sf

    sources = [DATA / name for name in (FIXTURES[:3] if smoke else FIXTURES + ["de_espeak.wav", "es_espeak.wav"])]
    if not smoke:
        from bench import realdata

        recs = realdata.recordings(["sample", "ami"])
        sources += [r.path for r in recs if r.dataset == "sample"] + [r.path for r in recs if r.dataset == "ami"][:5]
        sources += [c.path for c in realdata.council_clips() if 5 <= c.duration <= 30][:4]
    out = []
    for i, src in enumerate(sources):
        audio, rate = sf.read(str(src), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)[: 30 * rate]
        if len(audio) < 5 * rate:
            continue
        path = folder / f"clip{i:02d}.wav"
        sf.write(str(path), np.clip(audio, -1, 1), rate, subtype="PCM_16")
        out.append(path)
    return out


def tagged_copy(src: Path, dst: Path, tag: str) -> None:
    """``src`` with a RIFF LIST/INFO comment chunk appended: the same samples, other bytes."""
    data = src.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", src
    text = tag.encode() + b"\0"
    text += b"\0" * (len(text) % 2)
    info = b"INFOICMT" + struct.pack("<I", len(text)) + text
    body = data[12:] + b"\0" * (len(data[12:]) % 2)
    chunk = b"LIST" + struct.pack("<I", len(info)) + info
    dst.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body) + len(chunk)) + b"WAVE" + body + chunk)


# --- processes -----------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _post(url: str, body: Optional[dict] = None, method: str = "POST", caller: str = "alice") -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     method=method, headers={"Authorization": f"Bearer {KEYS[caller]}",
                                                             "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def _caller(i: int) -> str:
    """Who sends endpoint job ``i``: the callers take turns."""
    return sorted(KEYS)[i % len(KEYS)]


def _foreign_read(url: str, caller: str) -> bool:
    """Whether ``caller`` got anything but 404 reading ``url`` (another caller's job)."""
    try:
        _post(url, method="GET", caller=caller)
    except urllib.error.HTTPError as exc:
        return exc.code != 404
    return True


def worker_log_runs(log: Path) -> list[str]:
    """Task run ids a worker took, in order (its log)."""
    return re.findall(r"took task run ([0-9a-f-]{36})", log.read_text(errors="replace"))


# --- the run ---------------------------------------------------------------------------------


def model_env(args: argparse.Namespace) -> dict[str, str]:
    """What the workers serve and run on (and the references, in this process)."""
    env = {"WORKER_MODELS": args.model + (f":{args.compute_type}" if args.compute_type else ""),
           "WHISPERX_MODEL": args.model, "WHISPERX_DEVICE": args.device, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "WHISPERX_CPU_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    if args.compute_type:
        env["WHISPERX_COMPUTE_TYPE"] = args.compute_type
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(model_env(args))  # the references run with the workers' model, device and threads
    with scratch("bench-load-", args.keep) as tmp:
        return _run(args, tmp)


def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    for name in ("clips", "jobs", "inbox", "out", "swept", "refs"):
        (tmp / name).mkdir()
    pool = clips(tmp / "clips", args.smoke)
    print(f"{len(pool)} distinct clips of 5-30 s; {args.jobs} endpoint jobs + {args.files} swept files", flush=True)
    with local_postgres() as database, local_prefect_server(tmp / "home", database_url=database) as server:
        print(f"Prefect server on PostgreSQL: {server.url} (up in {server.startup_seconds:.1f} s)", flush=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server.url}):
            return _with_server(args, tmp, pool, server)


def _with_server(args: argparse.Namespace, tmp: Path, pool: list[Path], server: Any) -> dict[str, Any]:
    common = {**server.env, **model_env(args), "RESULTS_STORAGE": str(tmp / "shared"),
              "ALLOW_LOCAL_PATHS": str(tmp), "GPU_TASK_PICKUP_TIMEOUT": "120"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("A", "B"):
            procs[name] = start_task_worker({**common, "SPEECH_CACHE_DIR": str(tmp / f"cache-{name}")},
                                            tmp / f"worker-{name}.log", limit=args.worker_limit, preload=True)
        from flows.sweep import sweep_inbox

        deploy_to_process_pool(server, POOL, sweep_inbox, name="load")
        procs["process-worker"] = start_process_worker(POOL, {**common, "SPEECH_CACHE_DIR": str(tmp / "cache-sweep")},
                                                       tmp / "process-worker.log")
        procs["endpoint"], base = start_endpoint({**common, "SPEECH_CACHE_DIR": str(tmp / "cache-endpoint")},
                                                 tmp / "endpoint.log", KEYS, "--task-workers", endpoint_id="load")
        refs = references(pool, tmp)
        workers = wait_for_task_workers(server.url, 2, procs=(procs["A"], procs["B"]), timeout=300)
        ready = time.time()
        print(f"task workers ready: {', '.join(sorted(workers))}", flush=True)
        return drive(args, tmp, pool, refs, procs, base, server, ready)
    finally:
        for proc in procs.values():
            stop(proc)


def references(pool: list[Path], tmp: Path) -> dict[str, dict]:
    """The inline result of each clip: one transcribe-batch run in this process."""
    from flows.batch import transcribe_batch

    t0 = time.perf_counter()
    out = transcribe_batch([str(p) for p in pool], request={"download_dir": str(tmp / "refs"), "debug": True})
    if out["failed"]:
        raise RuntimeError(f"inline references failed: {out['failed']}")
    print(f"inline references: {len(pool)} clips in {time.perf_counter() - t0:.1f} s", flush=True)
    return {p.stem: json.loads((tmp / "refs" / f"{p.stem}.json").read_text()) for p in pool}


def drive(args: argparse.Namespace, tmp: Path, pool: list[Path], refs: dict, procs: dict, base: str, server: Any,
          ready: float) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.jobs import job_filter

    origin: dict[str, str] = {}  # output name -> clip stem
    for i in range(args.jobs):
        clip = pool[i % len(pool)]
        tagged_copy(clip, tmp / "jobs" / f"job-{i:03d}.wav", f"job {i}")
        origin[f"job-{i:03d}"] = clip.stem
    for i in range(args.files):
        clip = pool[(i * 7 + 3) % len(pool)]
        tagged_copy(clip, tmp / "inbox" / f"file-{i:03d}.wav", f"file {i}")
        origin[f"file-{i:03d}"] = clip.stem
    total = args.jobs + args.files

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool_exec:
        ids = list(pool_exec.map(lambda i: _post(f"{base}/run", {"input": {
            "audio_file": str(tmp / "jobs" / f"job-{i:03d}.wav"), "download_dir": str(tmp / "out"),
            "debug": True}}, caller=_caller(i))["id"], range(args.jobs)))
    sweep = run_deployment("sweep-inbox/load", timeout=0, parameters={
        "source": str(tmp / "inbox"), "glob": "*.wav", "via": "task-workers", "limit": total,
        "request": {"download_dir": str(tmp / "swept"), "debug": True}})
    print(f"submitted {args.jobs} jobs in {time.time() - t0:.1f} s; sweep run {sweep.name}", flush=True)

    killed: dict[str, Any] = {}
    jobs_filter = job_filter("transcribe-job")
    deadline = time.monotonic() + args.timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = _all_task_runs(client, jobs_filter)
            finished = [r for r in runs if r.state is not None and r.state.is_final()]
            sweep_run = client.read_flow_run(sweep.id)
            if not killed and len([r for r in finished if r.state.is_completed()]) >= total // 2:
                killed = {"worker": "A", "peak_rss_mb": _peak_rss_mb(procs["A"].pid), "at": time.time()}
                os.killpg(procs["A"].pid, signal.SIGKILL)
                print(f"killed task worker A (SIGKILL) after {len(finished)} of {total} files", flush=True)
            if len(runs) >= total and len(finished) == len(runs) and sweep_run.state.is_final():
                break
            if time.monotonic() > deadline:
                print(f"timed out: {len(finished)} of {total} finished; sweep {sweep_run.state.name}; unfinished: "
                      + ", ".join(f"{r.name} {r.state.name if r.state else None}" for r in runs
                                  if r.state is None or not r.state.is_final()), flush=True)
                break
            time.sleep(1)
        end = time.time()
        rss = {"A": killed.get("peak_rss_mb") or _peak_rss_mb(procs["A"].pid), "B": _peak_rss_mb(procs["B"].pid)}
        runs = {str(r.id): r for r in _all_task_runs(client, jobs_filter)}
    if args.keep:
        for r in runs.values():
            print(r.name, r.state.name if r.state else None, r.run_count, r.created, r.start_time, r.end_time, r.tags)
    return measure(args, tmp, base, refs, origin, ids, runs, killed, rss, ready, t0, end, sweep_run)


def _all_task_runs(client: Any, task_run_filter: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = client.read_task_runs(task_run_filter=task_run_filter, limit=200, offset=len(out))
        out.extend(page)
        if len(page) < 200:
            return out


def measure(args: argparse.Namespace, tmp: Path, base: str, refs: dict, origin: dict, ids: list[str], runs: dict,
            killed: dict, rss: dict, ready: float, t0: float, end: float, sweep_run: Any) -> dict:
    results: dict[str, Optional[dict]] = {}
    states: dict[str, str] = {}
    foreign = 0  # reads of a job by the caller who did not send it that got anything but 404
    for i, job_id in enumerate(ids):
        view = _post(f"{base}/status/{job_id}", method="GET", caller=_caller(i))
        states[f"job-{i:03d}"] = view["status"]
        results[f"job-{i:03d}"] = view.get("output")
        foreign += _foreign_read(f"{base}/status/{job_id}", _caller(i + 1))
    for i in range(args.files):
        name = f"file-{i:03d}"
        path = job_output(tmp / "swept", name)  # under the job's own key
        results[name] = json.loads(path.read_text()) if path.exists() else None
        states[name] = "COMPLETED" if results[name] else "FAILED"
    completed = [n for n, s in states.items() if s == "COMPLETED" and results[n]]
    failed = [n for n, s in states.items() if s in ("FAILED", "CANCELLED")]
    lost = [n for n in states if n not in completed and n not in failed]
    mismatched = [n for n in completed if _transcript(results[n]) != _transcript(refs[origin[n]])]
    compute = {n: _compute(results[n]) for n in completed}
    waits = {n: ((results[n].get("debug") or {}).get("stage_seconds") or {}).get("gpu-wait", 0.0) for n in completed}

    finished = [r for r in runs.values() if r.state is not None and r.state.is_completed() and r.end_time]
    latencies = sorted((r.end_time - r.created).total_seconds() for r in finished)
    worker_runs = {name: worker_log_runs(tmp / f"worker-{name}.log") for name in ("A", "B")}
    taken_twice = set(worker_runs["A"]) & set(worker_runs["B"])  # the killed worker's: rerun on the other
    walls = {str(r.id): (r.end_time - r.start_time).total_seconds() for r in finished
             if r.start_time and r.run_count == 1 and str(r.id) not in taken_twice}
    gaps = []
    for name, taken in worker_runs.items():
        done = [runs[t] for t in taken if t in runs and runs[t].start_time and runs[t].end_time]
        for before, after in zip(done, done[1:]):
            if {str(before.id), str(after.id)} & taken_twice:  # waited for the loss to be noticed
                continue
            if after.created < before.end_time:  # it was waiting: the gap is dispatch, not an empty queue
                gaps.append(max(0.0, (after.start_time - before.end_time).total_seconds()))
    alive = sum(max(0.0, min(end, killed["at"] if killed and name == "A" else end) - ready) for name in ("A", "B"))
    total_compute = sum(compute.values())
    engine = sum(walls.values()) / len(walls) if walls else 0.0
    engine -= sum(waits.values()) / max(1, len(waits))  # waiting for another file's GPU unit is not overhead
    res = {
        "completed": len(completed), "failed": len(failed), "lost": len(lost), "mismatched": len(mismatched),
        "model_loads_per_worker": {n: (tmp / f"worker-{n}.log").read_text(errors="replace").count("loaded Whisper")
                                   for n in ("A", "B")},
        "overhead_per_file_s": round(max(0.0, engine - total_compute / max(1, len(compute)))
                                     + (sum(gaps) / len(gaps) if gaps else 0.0), 3),
        "busy_fraction": round(total_compute / alive, 3) if alive else None,
        "p50_s": round(_percentile(latencies, 50), 2), "p95_s": round(_percentile(latencies, 95), 2),
        "peak_rss_mb": round(max(rss.values()), 1),
        "compute_per_file_s": round(total_compute / max(1, len(compute)), 3),
        "task_wall_per_file_s": round(engine, 3), "worker_limit": args.worker_limit, "dispatch_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "wall_s": round(end - t0, 1), "files_per_hour": round(3600 * len(completed) / max(1e-9, end - t0)),
        "killed": bool(killed), "sweep": sweep_run.state.name if sweep_run.state else None,
        "rerun_after_kill": len(taken_twice), "foreign_reads_answered": foreign,
    }
    if failed or lost or mismatched:
        res["examples"] = {n: states[n] for n in (failed + lost + mismatched)[:5]}
    return res


def _transcript(result: dict) -> Any:
    return result.get("detected_language"), [(s["start"], s["end"], s["text"]) for s in result["segments"]]


def _compute(result: dict) -> float:
    timings = (result.get("debug") or {}).get("transcribe_timings") or {}
    return sum(v for k, v in timings.items() if k not in ("import", "model_load"))


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    k = (len(values) - 1) * pct / 100
    lo = int(k)
    return values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (k - lo)


def print_table(res: dict) -> None:
    print()
    for key in ("completed", "failed", "lost", "mismatched", "model_loads_per_worker", "overhead_per_file_s",
                "busy_fraction", "p50_s", "p95_s", "peak_rss_mb", "compute_per_file_s", "task_wall_per_file_s",
                "dispatch_gap_s", "wall_s", "files_per_hour", "rerun_after_kill", "foreign_reads_answered"):
        print(f"{key:28} {res.get(key)}")


def main(argv: Optional[list[str]] = None) -> int:
    from bench.common import report

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: clean up (servers, workers, database)
    res = report(args, run, print_table)
    print(json.dumps(res))  # the last line: one JSON object
    ok = not res["failed"] and not res["lost"] and not res["mismatched"] and not res["foreign_reads_answered"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
