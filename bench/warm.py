"""One flow run per file, with the GPU stages in a warm task worker (GPU_TASK_WORKERS=1).

    python bench/warm.py [--files 8] [--json out.json]

As in production, in one invocation: a ``prefect server start`` (SQLite) on 127.0.0.1, a
process work pool with one ``prefect worker start`` (its flow runs are new processes that only
orchestrate), and one ``python -m deployments.task_worker`` that serves the GPU stages and keeps
its models; both share a result storage folder (RESULTS_STORAGE) and have caches of their own.
Then ``--files`` fixtures go through ``run_deployment`` of a transcribe-audio deployment one after
another (UI, API and sweeps send files one at a time), each with ``force`` (nothing cached).

Reported (goals from the issue that asked for task workers):
* ``model_loads``: transcribe stages that had to load a model (goal: 1, the first);
* ``worker_overhead_s``: per file, the flow's wait for its GPU unit (one ``gpu-stages`` task:
  dispatch, the worker's task engine, the stage runs) minus its compute (VAD + language id +
  decoding) (goal: <= 0.3 s);
* ``flow_overhead_s``: per file, the flow run's wall time (trigger to completion) minus that
  compute (goal: <= 5 s; one flow run per file that loads its own models: 14.5 s, bench/batch.py).
The last line printed is one JSON object with these numbers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, FIXTURES, apply_smoke, keep_option, scratch, smoke_option  # noqa: E402
from deployments.local_server import (  # noqa: E402
    deploy_to_process_pool,
    local_prefect_server,
    start_process_worker,
    stop,
)

POOL = "bench-warm-pool"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/warm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8, help=f"how many fixtures, one flow run each (1..{len(FIXTURES)})")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for one flow run")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    keep_option(p)
    smoke_option(p, files=2)
    args = apply_smoke(p.parse_args(argv))
    if not 1 <= args.files <= len(FIXTURES):
        p.error(f"--files must be 1..{len(FIXTURES)}")
    return args


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} never said {text!r}:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    files = [DATA / name for name in FIXTURES[: args.files]]
    res: dict[str, Any] = {"files": len(files)}
    with scratch("bench-warm-", args.keep) as tmp:
        shared = tmp / "shared-results"
        with local_prefect_server(tmp / "prefect-home") as server:
            print(f"Prefect server {server.url} (up in {server.startup_seconds:.1f} s)")
            from prefect.client.orchestration import SyncPrefectClient
            from prefect.deployments import run_deployment
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from flows.transcribe import transcribe_audio

            deploy_to_process_pool(server, POOL, transcribe_audio)
            # deployment runs read local files only under ALLOW_LOCAL_PATHS (the fixtures, the outputs)
            common = {**server.env, "RESULTS_STORAGE": str(shared), "HF_HUB_OFFLINE": "1",
                      "ALLOW_LOCAL_PATHS": f"{DATA}:{tmp}"}
            worker_log, task_log = tmp / "worker.log", tmp / "task-worker.log"
            with task_log.open("w") as log:
                task_worker = subprocess.Popen(
                    [sys.executable, "-m", "deployments.task_worker", "--limit", "1"], cwd=REPO,
                    env={**common, "SPEECH_CACHE_DIR": str(tmp / "task-worker-cache")}, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            worker = start_process_worker(POOL, {**common, "GPU_TASK_WORKERS": "1",
                                                 "SPEECH_CACHE_DIR": str(tmp / "flow-cache")}, worker_log)
            try:
                _wait_for(task_log, "serving", task_worker)
                rows = []
                with temporary_settings({PREFECT_API_URL: server.url}), SyncPrefectClient(server.url) as client:
                    for i, audio in enumerate(files, 1):
                        t = time.perf_counter()
                        flow_run = run_deployment("transcribe-audio/bench", timeout=args.timeout, poll_interval=0.5,
                                                  parameters={"audio_file": str(audio), "language": "en",
                                                              "force": True, "debug": True,
                                                              "download_dir": str(tmp / "out")})
                        wall = time.perf_counter() - t
                        if not flow_run.state.is_completed():
                            raise RuntimeError(f"run {i} ended {flow_run.state.name}:\n"
                                               f"{worker_log.read_text()[-2000:]}\n{task_log.read_text()[-2000:]}")
                        result = json.loads((tmp / "out" / audio.stem / str(flow_run.id) / f"{audio.stem}.json").read_text())
                        timings = result["debug"]["transcribe_timings"]
                        compute = sum(v for k, v in timings.items() if k not in ("import", "model_load"))
                        # the flow's wait for the GPU unit: dispatch, the worker's engine, the stage runs
                        task_seconds = result["debug"]["stage_seconds"]["gpu-task"]
                        run_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
                        rows.append({"file": audio.name, "wall": round(wall, 2), "flow_run": round(run_seconds, 2),
                                     "task": round(task_seconds, 3), "compute": round(compute, 3),
                                     "loaded": "model_load" in timings})
                        print(f"run {i}/{len(files)} {audio.name:18} wall {wall:6.2f} s (flow run {run_seconds:5.2f} s), "
                              f"transcribe task "
                              f"{task_seconds:5.2f} s, compute {compute:5.2f} s"
                              + ("  (loaded the model)" if rows[-1]["loaded"] else ""))
            finally:
                stop(worker)
                stop(task_worker)
            whisper_loads = task_log.read_text().count("loaded Whisper")

    n = len(rows)
    warm = rows[1:] or rows  # the first run loads the models: overheads are for the warm ones
    res.update(
        rows=rows,
        model_loads=sum(r["loaded"] for r in rows),
        whisper_loads_logged=whisper_loads,
        worker_overhead_s=round(sum(r["task"] - r["compute"] for r in warm) / len(warm), 3),
        flow_overhead_s=round(sum(r["wall"] - r["compute"] for r in warm) / len(warm), 2),
        first_run_wall_s=rows[0]["wall"],
    )
    print(f"\n{n} flow runs, one process worker, one task worker")
    print(f"model loads (transcribe stages that loaded one)  {res['model_loads']}   (goal 1)")
    print(f"task-worker overhead per file (warm runs)        {res['worker_overhead_s']:.3f} s   (goal <= 0.3 s)")
    print(f"flow overhead per file (warm runs)               {res['flow_overhead_s']:.2f} s   (goal <= 5 s; "
          "14.5 s when every flow run loads its models)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("model_loads", "worker_overhead_s", "flow_overhead_s", "first_run_wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
