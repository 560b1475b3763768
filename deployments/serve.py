"""Serve the pipeline's deployments from one process: the single-machine default.

    python deployments/serve.py            # needs a Prefect API (PREFECT_API_URL or `prefect server start`)
    prefect deployment run 'transcribe-audio/transcribe-local' -p audio_file=tests/data/sample_2spk.wav

Every flow run executes in a subprocess of this one, in the repository root, so relative
paths (audio files, ``out/``) mean the same as for ``python -m flows.transcribe``. Work pools,
workers and Docker are not needed; for those see prefect.yaml and infra/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent

TAGS = ["whisperx", "transcription", "local"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python deployments/serve.py",
        description="Serve the WhisperX transcription deployments from this process "
        "(Prefect UI: Deployments -> transcribe-local -> Run).",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=1,
        metavar="N",
        help="most flow runs executing at once (default 1: each run loads its own Whisper model)",
    )
    return p


def build_deployments() -> list[Any]:
    """The deployments this process serves (imports Prefect and the flow: call lazily)."""
    import speech
    from flows.transcribe import transcribe_audio

    deployments = [
        transcribe_audio.to_deployment(
            name="transcribe-local",
            description=(
                "Transcribe one audio file (local path, http(s) URL or s3:// URI) with WhisperX and "
                "detect its language; writes <stem>.json, .segments.json, .srt and .vtt to "
                "download_dir (default ./out) or an S3 bucket."
            ),
            tags=TAGS,
            version=speech.__version__,
        ),
    ]
    from flows.batch import transcribe_batch
    from flows.sweep import sweep_inbox

    deployments.append(transcribe_batch.to_deployment(
        name="transcribe-batch-local", tags=TAGS, version=speech.__version__,
        description="Transcribe many files in one flow run, models loaded once (GPU throughput).",
    ))
    inbox = os.environ.get("SWEEP_SOURCE")
    if inbox and "://" not in inbox and not os.environ.get("ALLOW_LOCAL_PATHS"):
        # the runs the sweep triggers read files from the swept folder (and nothing else local)
        os.environ["ALLOW_LOCAL_PATHS"] = str(Path(inbox).expanduser().resolve())
    if inbox:  # e.g. SWEEP_SOURCE=./inbox or s3://bucket/incoming/ ; SWEEP_CRON defaults to every 5 minutes
        deployments.append(sweep_inbox.to_deployment(
            name="sweep-inbox-local", tags=TAGS, version=speech.__version__,
            cron=os.environ.get("SWEEP_CRON", "*/5 * * * *"),
            parameters={"source": inbox, "glob": os.environ.get("SWEEP_GLOB", "*"),
                        "target": "transcribe-audio/transcribe-local"},
            description="Sweep a folder or S3 prefix and transcribe each new file once.",
        ))
    return deployments


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit < 1:
        build_parser().error("--limit must be at least 1")

    # Flow runs are subprocesses loading their entrypoints (flows/*.py) by path: the repository
    # root as their cwd; the packages themselves come from the install (pip install -e .)
    os.chdir(ROOT)

    # flow runs beat every 30 s; a run this process was running when the machine went down is
    # set Crashed 2 min after its last beat by the automation (saved if the server has none yet)
    from deployments.automations import HEARTBEAT_S, ensure

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    from prefect import serve

    try:
        print(ensure(update=False), flush=True)
    except Exception as exc:  # noqa: BLE001 - serving matters more; say why and go on
        print(f"warning: the automation for lost runs was not saved ({type(exc).__name__}: {exc}); "
              "save it with python -m deployments.automations", file=sys.stderr, flush=True)

    serve(*build_deployments(), limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
