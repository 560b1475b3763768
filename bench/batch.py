"""Per-file overhead: the batch flow (one flow run, models loaded once) vs one flow run per file.

    python bench/batch.py [--files 8] [--model bundled:base] [--json out.json]

Both ways run as in production, measured in one invocation on the same files:

* a ``prefect server start`` (SQLite) on 127.0.0.1 and a process work pool with one
  ``prefect worker start`` (polling every second), working directory this checkout;
* (a) per file: ``run_deployment`` of a transcribe-audio deployment, one file after another;
  every flow run is a new process that imports WhisperX and loads the models;
* (b) batch: ``run_deployment`` of a transcribe-batch deployment with all the files at once.

Every run uses ``force`` (no cache hits) and the decode cache is emptied between (a) and (b).
A warm-up run (not timed) first brings the libraries into the page cache.

Per-file overhead = (wall time - processing) / files, where processing is what scales with
audio (VAD + language detection + decoding, from each result's ``debug.transcribe_timings``).
Printed: wall and overhead per file for (a) and (b), and the ratios (a)/(b).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, FIXTURES, apply_smoke, job_output, keep_option, scratch, smoke_option  # noqa: E402
from deployments.local_server import (  # noqa: E402
    deploy_to_process_pool,
    local_prefect_server,
    start_process_worker,
    stop,
)

WARMUP = "enrol_slt.wav"
POOL = "bench-batch-pool"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8, help=f"how many fixtures to transcribe (1..{len(FIXTURES)})")
    p.add_argument("--model", default=None, help="Whisper model (default: the pipeline's, WHISPERX_MODEL)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one flow run")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    keep_option(p)
    smoke_option(p, files=1)
    args = apply_smoke(p.parse_args(argv))
    if not 1 <= args.files <= len(FIXTURES):
        p.error(f"--files must be 1..{len(FIXTURES)}")
    return args


def processing_seconds(result_json: Path) -> float:
    timings = json.loads(result_json.read_text())["debug"]["transcribe_timings"]
    return sum(v for k, v in timings.items() if k not in ("import", "model_load"))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    files = [str(DATA / name) for name in FIXTURES[: args.files]]
    request: dict[str, Any] = {"force": True, "debug": True}
    if args.model:
        request["model"] = args.model
    res: dict[str, Any] = {"files": len(files), "audio_seconds": None, "seconds": {}, "per_file": {}, "ratios": {}}
    with scratch("bench-batch-", args.keep) as tmp:
        cache = tmp / "speech-cache"
        with local_prefect_server(tmp / "prefect-home") as server:
            print(f"Prefect server {server.url} (up in {server.startup_seconds:.1f} s)")
            from prefect.deployments import run_deployment
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from flows.batch import transcribe_batch
            from flows.transcribe import transcribe_audio

            deploy_to_process_pool(server, POOL, transcribe_audio, transcribe_batch)
            worker_log = tmp / "worker.log"
            worker = start_process_worker(POOL, {**server.env, "SPEECH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
                                                 "ALLOW_LOCAL_PATHS": f"{DATA}:{tmp}"},
                                          worker_log)
            try:
                with temporary_settings({PREFECT_API_URL: server.url}):
                    def run(name: str, parameters: dict[str, Any]) -> float:
                        t = time.perf_counter()
                        flow_run = run_deployment(name, parameters=parameters, timeout=args.timeout, poll_interval=0.5)
                        wall = time.perf_counter() - t
                        if not flow_run.state.is_completed():
                            raise RuntimeError(f"{name} run {flow_run.name} ended {flow_run.state.name}; worker log "
                                               f"tail:\n{worker_log.read_text()[-3000:]}")
                        return wall

                    if not args.smoke:  # the first run of a fresh pool pays its cold start (smoke: only the path)
                        wall = run("transcribe-audio/bench", {"audio_file": str(DATA / WARMUP),
                                                              "download_dir": str(tmp / "warmup"), **request})
                        print(f"warm-up run: {wall:.1f} s (not counted)")

                    shutil.rmtree(cache, ignore_errors=True)
                    out_a = tmp / "per-file"
                    walls = []
                    for i, f in enumerate(files, 1):
                        walls.append(run("transcribe-audio/bench", {"audio_file": f, "download_dir": str(out_a),
                                                                     **request}))
                        print(f"(a) per-file run {i}/{len(files)}: {walls[-1]:.1f} s  {Path(f).name}")
                    wall_a = sum(walls)

                    shutil.rmtree(cache, ignore_errors=True)
                    out_b = tmp / "batch"
                    wall_b = run("transcribe-batch/bench", {"audio_files": files,
                                                            "request": {**request, "download_dir": str(out_b)}})
                    print(f"(b) one batch run of {len(files)} files: {wall_b:.1f} s")
            finally:
                stop(worker)

        stems = [Path(f).stem for f in files]
        proc_a = sum(processing_seconds(job_output(out_a, s)) for s in stems)  # each run's own key
        proc_b = sum(processing_seconds(job_output(out_b, s)) for s in stems)
        n = len(files)
        import soundfile

        res["audio_seconds"] = round(sum(soundfile.info(f).duration for f in files), 1)
        res["seconds"] = {"a_wall": round(wall_a, 2), "b_wall": round(wall_b, 2),
                          "a_processing": round(proc_a, 2), "b_processing": round(proc_b, 2)}
        res["per_file"] = {"a_wall": round(wall_a / n, 2), "b_wall": round(wall_b / n, 2),
                           "a_overhead": round((wall_a - proc_a) / n, 2), "b_overhead": round((wall_b - proc_b) / n, 2)}
        pf = res["per_file"]
        res["ratios"] = {"wall_a_over_b": round(wall_a / wall_b, 2),
                         "overhead_a_over_b": round(pf["a_overhead"] / pf["b_overhead"], 1)}

    pf, r = res["per_file"], res["ratios"]
    print(f"\n{n} files, {res['audio_seconds']} s of audio, one process worker")
    print(f"{'':28}{'wall/file':>11}{'overhead/file':>15}")
    print(f"{'(a) one flow run per file':28}{pf['a_wall']:>10.2f}s{pf['a_overhead']:>14.2f}s")
    print(f"{'(b) batch flow':28}{pf['b_wall']:>10.2f}s{pf['b_overhead']:>14.2f}s")
    print(f"ratio (a)/(b): wall {r['wall_a_over_b']}x, per-file overhead {r['overhead_a_over_b']}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
