"""WhisperX transcription, cached on the audio hash + the stage's parameters + the resolved model."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

import speech.asr
import speech.models
from speech.asr.transcribe import transcribe as engine_transcribe
from speech.asr.whisper import resolve_model
from tasks.audio import audio_samples
from speech.models import resolve_device
from speech.contracts import AudioRef, TranscribeParams, Transcript
from tasks.common import code_version, stage_key
from tasks.progress import stage_progress

VERSION = code_version(speech.asr, speech.models)


def transcribe_key(audio_sha256: str, params: TranscribeParams, context: Any = None) -> str:
    """The transcribe stage's cache key: audio, its own parameters, the resolved model (env vars
    included, not just the parameter), device and compute type, code version."""
    label = resolve_model(params.model, assemble=False).label
    device, compute = resolve_device(None, params.device, params.compute_type)
    return stage_key("transcribe", audio_sha256, [params.cache_fields(), label, device, compute], VERSION, context)


def transcribe_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return transcribe_key(parameters["audio"].sha256, parameters["params"], context)


@task(name="transcribe", cache_key_fn=transcribe_cache_key, persist_result=True)
def transcribe(audio: AudioRef, params: TranscribeParams) -> Transcript:
    """WhisperX batched transcription + language detection, cached on audio hash + params."""
    progress = stage_progress(f"Transcribing {audio.stem}")
    result = engine_transcribe(audio_samples(audio), params, progress=progress)
    get_run_logger().info(
        "transcribed %s: %d segments, language %s (p=%s, %d windows), %s",
        audio.stem, len(result.segments), result.language, result.language_probability,
        result.language_detection_tries, result.timings,
    )
    return result
