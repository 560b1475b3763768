"""Merge, render, store (all files or none) and publish the run's artifacts."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from speech.errors import StorageError
from speech.io.store import OutputTarget, S3Store, kept_folder, local_store
from speech.output.formats import render
from speech.output.report import summary_markdown
from speech.output.result import PipelineResults, build_result
from speech.contracts import OutputRef, TranscriptionResult
from tasks.common import artifact_key
from tasks.progress import outputs_written
from tasks.storage import results_store


@task(name="write-outputs", cache_policy=NO_CACHE, persist_result=False)
def write_outputs(run: PipelineResults, target: OutputTarget) -> tuple[dict, list[OutputRef]]:
    """Merge into the worker's JSON, render json/srt/vtt, store them, publish artifacts."""
    result = build_result(run)
    files = render(result, run.audio.stem, run.extra_files, target.options)
    store = results_store(target)
    try:
        refs = store.write(files)
    except StorageError as exc:
        if not isinstance(store, S3Store):
            raise
        kept = local_store(str(kept_folder(target.download_dir, store.prefix)))  # nothing rendered is lost
        kept.write(files)
        raise type(exc)(f"{exc}; the outputs were kept in {kept.describe()}") from None
    if target.download_transcript and isinstance(store, S3Store):  # the original script's --download-transcript
        refs += local_store(target.download_dir).write(files)
    get_run_logger().info("wrote %d outputs to %s", len(refs), store.describe())
    outputs_written(refs, store.describe())
    key = artifact_key(f"transcript-{run.audio.stem}")
    create_markdown_artifact(
        key=key,
        markdown=summary_markdown(run, result, refs, store.describe()),
        description=f"Transcript summary for {run.audio.stem}",
    )
    create_table_artifact(
        key=f"{key}-outputs",
        table=[{"file": r.name, "uri": r.uri, "url": r.url, "bytes": r.size_bytes} for r in refs],
        description="Output files",
    )
    _announce(run, result, refs)
    return result.to_json(), refs


TRANSCRIPT_COMPLETED = "whisperx.transcript.completed"


def _announce(run: PipelineResults, result: TranscriptionResult, refs: list[OutputRef]) -> None:
    """A Prefect event per finished transcript, for automations to chain on (resource: the audio's
    sha256; payload: output URIs, language, duration, speakers)."""
    from prefect.events import emit_event

    emit_event(
        event=TRANSCRIPT_COMPLETED,
        resource={"prefect.resource.id": f"whisperx.audio.{run.audio.sha256}",
                  "prefect.resource.name": run.audio.stem},
        payload={"outputs": [r.uri for r in refs], "language": result.detected_language,
                 "language_probability": result.language_probability, "duration": run.audio.duration,
                 "segments": len(result.segments), "speakers": sorted(result.speakers or {}),
                 "source": run.audio.source},
    )


def bucket_keys(refs: list[OutputRef], store: Any) -> dict[str, str]:
    """The RunPod worker's ``transcript_key/url`` and ``segments_key/url`` for outputs written to a
    bucket (``<stem>.json``, ``<stem>.segments.json``); URLs presigned with ``store``'s client
    (``URL_EXPIRY`` / ``PRESIGN_TTL``) when it is a bucket."""
    jsons = [r for r in refs if r.uri.startswith("s3://") and r.name.endswith(".json")]
    if not jsons:
        return {}
    picked = {
        "segments": next((r for r in jsons if r.name.endswith(".segments.json")), None),
        # <stem>.json: the shortest (not <stem>.deepgram.json or <stem>.pyannote.job.json)
        "transcript": min((r for r in jsons if not r.name.endswith(".segments.json")), key=lambda r: len(r.name),
                          default=None),
    }
    return keys_and_urls(store, {kind: ref.uri for kind, ref in picked.items() if ref is not None})


def keys_and_urls(store: Any, uris: dict[str, str]) -> dict[str, str]:
    """``<kind>_key`` per s3:// URI, and ``<kind>_url`` presigned when ``store`` is a bucket."""
    from speech.io.upload import presign
    from speech.settings import get_settings

    out: dict[str, str] = {}
    for kind, uri in uris.items():
        bucket, _, key = uri[len("s3://"):].partition("/")
        out[f"{kind}_key"] = key
        if isinstance(store, S3Store):
            out[f"{kind}_url"] = presign(store.client, bucket, key, get_settings().url_expiry)
    return out
