"""Batch flow: transcribe many files in ONE flow run, so models load once per process.

Python:  ``from flows.batch import transcribe_batch; transcribe_batch(["a.wav", "b.wav"], {"language": "en"})``

Every file goes through the same DAG as ``transcribe-audio`` (:func:`flows.pipeline.run_pipeline`:
the same tasks, cache keys, outputs and per-file artifacts); the Whisper/VAD models live in the
process-wide :data:`speech.models.CACHE`, so only the first file pays the load. A file that
fails (missing, corrupt, ...) is recorded and the batch goes on; a bad ``request`` (invalid
parameters) fails the whole run up front, since every file would fail the same way.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from flows.pipeline import run_pipeline
from flows.local_api import record_run_process
from flows.runtime import apply_runtime_switches, redact_stored_secrets
from speech.io.audio import distinct_output_names, stem_of
from speech.schema import TranscriptionRequest, check_one_file_fields
from tasks.common import artifact_key


@flow(name="transcribe-batch", validate_parameters=False, log_prints=False)
def transcribe_batch(audio_files: list[str], request: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Transcribe many audio files in one flow run (models load once); a failed file does not stop the batch.

    Args:
        audio_files: Local paths, http(s) URLs or s3:// URIs of the audio files.
        request: Transcription settings shared by every file: any parameter of transcribe-audio except
            audio_file (e.g. {"language": "en", "align_output": true}). Pass tokens as env vars or Secret
            blocks; a token given here is used but redacted from the stored run.
    """
    log = get_run_logger()
    request = dict(request or {})
    record_run_process()
    redact_stored_secrets(nested="request")
    apply_runtime_switches()
    request.pop("audio_file", None)
    # a bad request would fail every file the same way: fail the run now, clearly
    TranscriptionRequest.parse({**request, "audio_file": audio_files[0] if audio_files else "placeholder.wav"})
    check_one_file_fields(request, len(audio_files))
    output_names = distinct_output_names(audio_files)

    succeeded: list[str] = []
    failed: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    for i, audio_file in enumerate(audio_files, 1):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"file": audio_file, "output_name": output_names[i - 1] or stem_of(audio_file),
                               "status": "succeeded", "language": None, "segments": None, "result": None,
                               "error": None}
        try:
            out = run_pipeline(TranscriptionRequest.parse(
                {**request, "audio_file": audio_file, "output_name": output_names[i - 1]}))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            row["status"] = "failed"
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("[%d/%d] %s failed: %s", i, len(audio_files), audio_file, row["error"])
            failed.append({"audio_file": audio_file, "error": row["error"]})
        else:
            log.info("[%d/%d] %s done in %.1f s", i, len(audio_files), audio_file, time.perf_counter() - t0)
            succeeded.append(audio_file)
            row.update(language=out.result.get("detected_language"), segments=len(out.result.get("segments") or []),
                       result=next((o.uri for o in out.outputs if o.name == f"{row['output_name']}.json"), None))
        rows.append({**row, "seconds": round(time.perf_counter() - t0, 2)})

    create_table_artifact(
        key=artifact_key(f"batch-{len(audio_files)}-files"),
        table=rows,
        description=f"Batch: {len(succeeded)} succeeded, {len(failed)} failed of {len(audio_files)}",
    )
    log.info("batch: %d succeeded, %d failed", len(succeeded), len(failed))
    return {"succeeded": succeeded, "failed": failed}
