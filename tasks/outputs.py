from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from speech.align import AlignOutcome
from speech.formats import render
from speech.merge import build_result
from speech.report import summary_markdown
from speech.schema import AudioRef, ConfidenceLabels, OutputRef, SpeakerLabels, Transcript
from speech.settings import get_settings
from speech.storage import LocalStore, S3Store
from tasks.common import artifact_key
from tasks.storage import results_store


@task(name="write-outputs", cache_policy=NO_CACHE, persist_result=False)
def write_outputs(
    audio: AudioRef,
    transcript: Transcript,
    alignment: Optional[AlignOutcome] = None,
    speakers: Optional[SpeakerLabels] = None,
    confidence: Optional[ConfidenceLabels] = None,
    debug: bool = False,
    download_dir: Optional[str] = None,
    bucket: Optional[str] = None,
    prefix: Optional[str] = None,
    stage_seconds: Optional[dict[str, float]] = None,
    cached_stages: Optional[list[str]] = None,
    extra_files: Optional[dict[str, Any]] = None,
    s3_options: Optional[dict[str, Any]] = None,
    download_transcript: bool = False,
) -> tuple[dict, list[OutputRef]]:
    """Merge into the worker's JSON, render json/srt/vtt, store them, publish artifacts."""
    log = get_run_logger()
    result = build_result(audio, transcript, alignment, speakers, confidence, debug=debug, stage_seconds=stage_seconds, cached_stages=cached_stages)
    files = render(result, audio.stem, extra_files)
    store = results_store(download_dir, bucket, prefix, s3_options)
    refs = store.write(files)
    if download_transcript and isinstance(store, S3Store):  # the original script's --download-transcript
        local = LocalStore(Path(download_dir) if download_dir else get_settings().results_dir)
        refs += local.write(files)
    log.info("wrote %d outputs to %s", len(refs), store.describe())
    key = artifact_key(f"transcript-{audio.stem}")
    create_markdown_artifact(
        key=key,
        markdown=summary_markdown(audio, transcript, result, refs, stage_seconds or {}, store.describe(), cached_stages),
        description=f"Transcript summary for {audio.stem}",
    )
    create_table_artifact(
        key=f"{key}-outputs",
        table=[{"file": r.name, "uri": r.uri, "bytes": r.size_bytes} for r in refs],
        description="Output files",
    )
    return result.to_json(), refs
