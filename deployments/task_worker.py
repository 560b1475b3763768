"""A warm GPU task worker: serves the pipeline's GPU stages as Prefect background tasks.

    GPU_TASK_WORKERS=1 on the flow side; here:
    PREFECT_API_URL=http://<server>:4200/api RESULTS_STORAGE_BLOCK=whisperx-task-results \
        python -m deployments.task_worker [--limit 1] [--preload]

One long-lived process that loads each model once and keeps it (the process-wide model cache),
so a flow run that arrives one file at a time (UI, API, sweep) pays no import and no model
load. Flow runs only orchestrate: they ``.delay()`` transcribe, align, local diarization and
speaker embeddings to this process and never import torch or WhisperX themselves. Parameters,
results and cache records travel through the shared result storage (RESULTS_STORAGE or
RESULTS_STORAGE_BLOCK, the same for the flows and every task worker); the audio too, once per
content (``audio/<sha256>``), decoded here into SPEECH_CACHE_DIR. Tokens are the worker's own
(HF_TOKEN, SPEAKER_ENCODER_DIR ...): they never travel as task parameters.

Run one per GPU (``--limit 1``: GPU stages one at a time, in arrival order) and as many as you
have GPUs; any of them takes the next scheduled run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

log = logging.getLogger("deployments.task_worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.task_worker",
                                description="Serve the pipeline's GPU stages to flow runs with GPU_TASK_WORKERS=1.")
    p.add_argument("--limit", type=int, default=1, metavar="N",
                   help="stages running at once in this process (default 1: one GPU, one stage at a time)")
    p.add_argument("--preload", action="store_true",
                   help="load the Whisper and VAD models before taking work (the first file pays nothing)")
    return p


def served_tasks() -> list[Any]:
    """The GPU stages, with the shared result storage the flows use (parameters and results)."""
    from speech.errors import InvalidRequest
    from tasks.align import align_words
    from tasks.speakers import diarize, label_speakers
    from tasks.storage import task_result_storage
    from tasks.transcribe import transcribe

    storage = task_result_storage()
    if storage is None:
        raise InvalidRequest("a task worker needs the result storage its flows use: set RESULTS_STORAGE "
                             "(s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")
    return [t.with_options(result_storage=storage) for t in (transcribe, align_words, diarize, label_speakers)]


def preload(model: Optional[str] = None) -> None:
    from speech.asr.vad import get_vad
    from speech.asr.whisper import get_whisper, resolve_model
    from speech.models import resolve_device
    from speech.settings import get_settings

    settings = get_settings()
    device, compute = resolve_device(settings)
    get_whisper(resolve_model(model, settings), device, compute, settings)
    get_vad(device, settings)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit < 1:
        build_parser().error("--limit must be at least 1")
    from prefect.task_worker import serve

    from speech.errors import SpeechError

    try:
        tasks = served_tasks()
        if args.preload:
            preload()
    except SpeechError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {', '.join(t.name for t in tasks)} (limit {args.limit})", flush=True)
    serve(*tasks, limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
