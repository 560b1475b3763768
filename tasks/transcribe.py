from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

import speech.transcribe as engine
from speech import models, progress
from speech.audio import read_samples
from speech.schema import AudioRef, TranscribeParams, Transcript
from tasks.common import code_version, stage_key

VERSION = code_version(engine, models)


def transcribe_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    params: TranscribeParams = parameters["params"]
    # the resolved model (env vars included) is part of the key, not just the parameter
    label = models.resolve_model(params.model, assemble=False).label
    device, compute = models.resolve_device()
    return stage_key("transcribe", audio.sha256, [params.model_dump(), label, device, compute], VERSION)


@task(name="transcribe", cache_key_fn=transcribe_cache_key, persist_result=True)
def transcribe(audio: AudioRef, params: TranscribeParams) -> Transcript:
    """WhisperX batched transcription + language detection, cached on audio hash + params."""
    log = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, description=f"Transcribing {audio.stem}")
    last = [0.0]

    def on_progress(stage: str, fraction: float, _msg: str) -> None:
        pct = round(fraction * 100, 1)
        if stage == "transcribe" and (pct - last[0] >= 5 or pct >= 100):
            last[0] = pct
            update_progress_artifact(artifact_id=artifact_id, progress=pct)

    with progress.subscribe(on_progress):
        result = engine.transcribe(read_samples(audio), params)
    log.info(
        "transcribed %s: %d segments, language %s (p=%s, %d windows), %s",
        audio.stem, len(result.segments), result.language, result.language_probability,
        result.language_detection_tries, result.timings,
    )
    return result
