"""Deepgram word confidence: one cached call per audio + model options, then the merge."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.logging import get_run_logger
from pydantic import SecretStr

import speech.confidence
from speech.confidence.deepgram import deepgram_for, deepgram_words
from speech.confidence.match import annotate
from tasks.audio import audio_samples
from speech.io.upload import UploadResult
from speech.contracts import AudioRef, ConfidenceLabels, ConfidenceThresholds, DeepgramOptions, Segment
from tasks.common import code_version, file_digest, stage_key

VERSION = code_version(speech.confidence)


def deepgram_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    # the presigned URL changes every run and the key is secret: neither is part of the identity
    saved = file_digest(parameters["json_in"])
    return stage_key("deepgram", audio.sha256, [parameters["options"].model_dump(), saved], VERSION)


@task(name="deepgram", cache_key_fn=deepgram_cache_key, persist_result=True)
def deepgram(audio: AudioRef, options: DeepgramOptions, api_key: Optional[SecretStr],
             uploaded: Optional[UploadResult], source_url: Optional[str], json_in: Optional[str]) -> dict:
    """Deepgram's pre-recorded response on the uploaded audio's presigned URL, else the source URL,
    else the samples (retries on 429/5xx happen in the SDK, not here)."""
    log = get_run_logger()
    if json_in:
        log.info("using the saved Deepgram response %s", Path(json_in).name)
    url = uploaded.presigned_url if uploaded is not None else source_url
    samples = None if (url or json_in) else audio_samples(audio)  # decode only when the bytes go up
    response = deepgram_for(samples, audio.stem, options, api_key, url=url, json_in=json_in)
    log.info("Deepgram %s returned %d words", options.model, len(deepgram_words(response)))
    return response


@task(name="word-confidence")
def word_confidence(segments: list[Segment], response: dict, thresholds: ConfidenceThresholds) -> ConfidenceLabels:
    """Whisper words get Deepgram's confidence; segments get an average and a low/high flag."""
    labelled, summary, unclear = annotate(segments, deepgram_words(response), thresholds)
    get_run_logger().info("word confidence: %s; %d unclear interval(s)", summary, len(unclear))
    return ConfidenceLabels(segments=labelled, summary=summary, unclear_intervals=unclear)
