"""Flow runs whose machine is lost, on a production-like server: none stays Running, no file is lost.

    python bench/lost_runs.py [--files 8] [--window 45] [--json out.json]
    python bench/lost_runs.py --smoke     # 3 files, one lost run (CI: make bench-smoke)

In one invocation: PostgreSQL (a cluster of its own on a loopback port, deleted after) and
``prefect server start`` on it; the transcribe flow deployed to a process pool as
``transcribe-audio/lost-runs`` with this project's tag and heartbeat (every 30 s, as
prefect.yaml sets it); the automations of ``deployments/automations.py`` saved with
``--window`` (production: 120 s); two worker "hosts" (``prefect worker start``, ``--limit``
runs each). A sweep (``flows.sweep``, in this process) triggers one run per file. Once host A
runs ``--limit`` of them (a second after they started), A and every process it started are
killed with SIGKILL, as a lost machine: no worker is left to report those runs. Host C replaces
A. Each lost run must be set ``Crashed`` by the automation, and no other run: ``--long`` adds a
file whose run lasts longer than the window (CPU-bound decoding, beating all along); a second
sweep triggers the lost files again.

The last line is one JSON object:
* ``lost_runs``: runs killed with host A; ``crashed_after_s``: for each, seconds from the kill
  to ``Crashed`` (goal: under window + 15 s; a run is Crashed a window after its start or its
  last heartbeat, whichever came last);
* ``long_run_s``: how long the long file's run took (it should exceed the window);
* ``completed_files`` of ``files`` (goal: all), each with one completed run and its transcript
  (``wer`` per file against the fixture's text, ``wer_max`` goal <= 0.25: real transcripts, not
  garbled; the tests hold each fixture's own limit); ``retriggered``: files the second
  sweep sent again (goal: the lost ones);
* ``left_unfinished``: flow runs of the server not in a final state at the end (goal 0).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DATA, FIXTURES, apply_smoke, job_output, keep_option, report, scratch, smoke_option  # noqa: E402
from deployments.local_server import (  # noqa: E402
    deploy_to_process_pool,
    kill_host,
    local_postgres,
    local_prefect_server,
    start_process_worker,
    stop,
)

POOL = "lost-runs-pool"
TARGET = "transcribe-audio/lost-runs"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/lost_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8, help=f"fixtures swept (at most {len(FIXTURES)})")
    p.add_argument("--limit", type=int, default=2, help="runs each worker host runs at once (host A's are lost)")
    p.add_argument("--window", type=int, default=45,
                   help="seconds without a heartbeat before a run is set Crashed (production default 120)")
    p.add_argument("--long", type=float, default=900, metavar="SECONDS",
                   help="also sweep one file of this much speech (the fixtures end to end), whose run should "
                        "outlive the window and still complete (0: none)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for everything to finish")
    p.add_argument("--json", dest="json_path", type=Path, help="also write the measurements here")
    keep_option(p)
    smoke_option(p, files=3, limit=1, long=0)
    args = apply_smoke(p.parse_args(argv))
    if not 1 <= args.files <= len(FIXTURES) or args.limit < 1:
        p.error(f"--files must be 1-{len(FIXTURES)} and --limit at least 1")
    return args


LONG = "zz-long.wav"  # swept last: a host that is not killed runs it


def swept(args: argparse.Namespace) -> int:
    return args.files + bool(args.long)


def long_file(path: Path, seconds: float) -> None:
    """``seconds`` of speech: the fixtures end to end, again and again."""
    import numpy as np
    import soundfile as sf

    parts, total = [], 0
    while total < seconds * 16000:
        for name in FIXTURES:
            audio, _ = sf.read(str(DATA / name), dtype="float32")
            parts.append(audio)
            total += len(audio)
    sf.write(str(path), np.concatenate(parts)[: int(seconds * 16000)], 16000, subtype="PCM_16")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with scratch("bench-lost-runs-", args.keep) as tmp, local_postgres() as database, \
            local_prefect_server(tmp / "home", database_url=database) as server:
        print(f"Prefect server on PostgreSQL: {server.url} (up in {server.startup_seconds:.1f} s)", flush=True)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server.url}):
            return _with_server(args, tmp, server)


def _with_server(args: argparse.Namespace, tmp: Path, server: Any) -> dict[str, Any]:
    from deployments import automations
    from flows.transcribe import transcribe_audio

    inbox, out = tmp / "inbox", tmp / "out"
    inbox.mkdir()
    for name in FIXTURES[:args.files]:
        shutil.copy(DATA / name, inbox / name)
    if args.long:
        long_file(inbox / LONG, args.long)
    print(automations.ensure(args.window, args.window), flush=True)
    deploy_to_process_pool(server, POOL, transcribe_audio, name="lost-runs", tags=[automations.TAG],
                           env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(automations.HEARTBEAT_S)})
    env = {**server.env, "ALLOW_LOCAL_PATHS": f"{inbox}{os.pathsep}{out}", "HF_HUB_OFFLINE": "1",
           "WHISPERX_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "SPEECH_CACHE_DIR": str(tmp / "cache")}
    hosts: dict[str, Any] = {}
    try:
        hosts["A"] = start_process_worker(POOL, env, tmp / "host-A.log", limit=args.limit)
        return _drive(args, tmp, inbox, out, env, hosts)
    finally:
        for proc in hosts.values():
            stop(proc)


def _sweep(inbox: Path, out: Path) -> dict[str, int]:
    """One sweep run (in this process): how many files it triggered, skipped, ..."""
    from flows.sweep import sweep_inbox

    return sweep_inbox(source=str(inbox), glob="*.wav", target=TARGET, max_attempts=2, limit=len(FIXTURES) + 1,
                       request={"language": "en", "download_dir": str(out)})


def _drive(args: argparse.Namespace, tmp: Path, inbox: Path, out: Path, env: dict, hosts: dict) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    t0 = time.monotonic()
    print(f"sweep 1: {_sweep(inbox, out)}", flush=True)
    deadline = time.monotonic() + args.timeout
    with get_client(sync_client=True) as client:
        def runs() -> list[Any]:
            return [r for r in client.read_flow_runs(limit=200) if r.deployment_id and r.parameters.get("audio_file")]

        def unfinished_names() -> list[tuple[str, str]]:
            return [(r.name, r.state.name) for r in runs() if not r.state.is_final()]

        # host A (the only host yet) takes its --limit runs; it is killed once they all run
        while True:
            mine = [r for r in runs() if r.state.is_running()]
            if len(mine) >= min(args.limit, args.files + bool(args.long)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"host A never ran {args.limit} runs: {[(r.name, r.state.name) for r in runs()]}")
            time.sleep(0.2)
        time.sleep(1)
        lost = {r.id: r for r in mine}
        killed_processes = kill_host(hosts["A"])
        killed = time.monotonic()
        print(f"killed host A (SIGKILL, {killed_processes} processes) running {len(lost)} runs, "
              f"{killed - t0:.0f} s in", flush=True)
        hosts["C"] = start_process_worker(POOL, env, tmp / "host-C.log", limit=args.limit)

        crashed_after: dict[Any, float] = {}
        while len(crashed_after) < len(lost):
            for run_id in set(lost) - set(crashed_after):
                state = client.read_flow_run(run_id).state
                if state.is_final():
                    if state.type != StateType.CRASHED:
                        raise RuntimeError(f"lost run {run_id} ended {state.type.value}: {state.message}")
                    crashed_after[run_id] = time.monotonic() - killed
            if time.monotonic() > deadline:
                raise RuntimeError(f"lost runs not Crashed after {time.monotonic() - killed:.0f} s")
            time.sleep(1)
        print("lost runs Crashed after " + ", ".join(f"{s:.0f} s" for s in sorted(crashed_after.values())), flush=True)

        while not all(r.state.is_final() for r in runs()):  # the others, on host C
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs unfinished: {unfinished_names()}")
            time.sleep(1)
        before = {r.id for r in runs()}
        counts = _sweep(inbox, out)
        retriggered = sorted(Path(r.parameters["audio_file"]).name for r in runs() if r.id not in before)
        print(f"sweep 2: {counts}, triggered {retriggered}", flush=True)
        while not all(r.state.is_final() for r in runs()) or len(runs()) < swept(args) + len(retriggered):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs unfinished: {unfinished_names()}")
            time.sleep(1)
        wall = time.monotonic() - t0
        final = runs()
        unfinished = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(not_any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED,
                                                  StateType.CANCELLED]))))
    return _measure(args, out, final, lost, crashed_after, retriggered, unfinished, wall)


def _measure(args: argparse.Namespace, out: Path, final: list, lost: dict, crashed_after: dict,
             retriggered: list[str], unfinished: list, wall: float) -> dict[str, Any]:
    from bench.metrics import wer

    manifest = json.loads((DATA / "fixtures.json").read_text())
    lost_files = sorted(Path(r.parameters["audio_file"]).name for r in lost.values())
    completed, wers = [], {}
    for name in FIXTURES[:args.files]:
        done = [r for r in final if Path(r.parameters["audio_file"]).name == name and r.state.is_completed()]
        path = job_output(out, Path(name).stem)
        if len(done) == 1 and path.exists():
            completed.append(name)
            text = " ".join(s["text"] for s in json.loads(path.read_text())["segments"])
            wers[name] = round(wer(manifest[name]["text"], text), 3)
    long_run_s = None
    if args.long:
        done = [r for r in final if Path(r.parameters["audio_file"]).name == LONG and r.state.is_completed()]
        if len(done) == 1 and job_output(out, Path(LONG).stem).exists():
            completed.append(LONG)
            long_run_s = round(done[0].total_run_time.total_seconds(), 1)
    return {"files": swept(args), "window_s": args.window, "lost_runs": len(lost), "lost_files": lost_files,
            "long_audio_s": args.long, "long_run_s": long_run_s,
            "crashed_after_s": sorted(round(s, 1) for s in crashed_after.values()),
            "retriggered": retriggered, "completed_files": len(completed),
            "wer_max": max(wers.values()) if wers else None, "wer": wers,
            "left_unfinished": len(unfinished), "wall_s": round(wall, 1)}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['lost_runs']} runs lost with their host; Crashed {res['crashed_after_s']} s after the kill "
          f"(window {res['window_s']} s); sweep 2 triggered {len(res['retriggered'])} "
          f"(lost: {len(res['lost_files'])}); {res['completed_files']} of {res['files']} files completed "
          f"(WER max {res['wer_max']}); {res['left_unfinished']} runs left unfinished; {res['wall_s']} s")
    if res["long_audio_s"]:
        print(f"the {res['long_audio_s']:.0f} s file's run: {res['long_run_s']} s, "
              + ("longer than the window, never Crashed" if (res["long_run_s"] or 0) > res["window_s"]
                 else "not longer than the window: it tells nothing about live runs here"))
    print(json.dumps(res))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = report(args, run, print_table)
    ok = (res["completed_files"] == res["files"] and res["left_unfinished"] == 0
          and sorted(res["retriggered"]) == res["lost_files"]
          and all(s <= res["window_s"] + 15 for s in res["crashed_after_s"])
          and (res["wer_max"] or 0) <= 0.25)
    if not ok:
        print("FAILED: a goal was missed (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
