"""Deepgram word confidence: one cached call per audio + model options, then the merge."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from prefect import task
from prefect.logging import get_run_logger

import speech.confidence as engine
from speech.audio import read_samples, write_wav
from speech.confidence import DeepgramOptions
from speech.schema import AudioRef, ConfidenceLabels, Segment
from tasks.common import code_version, stage_key

VERSION = code_version(engine)


def deepgram_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    json_in: Optional[str] = parameters["json_in"]
    saved = hashlib.sha256(Path(json_in).read_bytes()).hexdigest() if json_in and Path(json_in).is_file() else None
    # the presigned URL changes every run and the key is secret: neither is part of the identity
    return stage_key("deepgram", audio.sha256, [parameters["options"].model_dump(), saved], VERSION)


@task(name="deepgram", cache_key_fn=deepgram_cache_key, persist_result=True)
def deepgram(audio: AudioRef, options: DeepgramOptions, api_key: Optional[str], url: Optional[str],
             json_in: Optional[str]) -> dict:
    """Deepgram's pre-recorded response (retries on 429/5xx happen in the engine, not here)."""
    log = get_run_logger()
    if json_in:
        log.info("using the saved Deepgram response %s", Path(json_in).name)
        return engine.deepgram_transcribe(api_key=api_key or "", options=options, json_in=json_in)
    if url:
        response = engine.deepgram_transcribe(api_key=api_key or "", url=url, options=options)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / f"{audio.stem}.wav"
            write_wav(np.asarray(read_samples(audio)), wav)
            response = engine.deepgram_transcribe(api_key=api_key or "", audio_path=str(wav), options=options)
    log.info("Deepgram %s returned %d words", options.model, len(engine.deepgram_words(response)))
    return response


@task(name="word-confidence")
def word_confidence(segments: list[Segment], response: dict, low: float, high: float, min_low_dur: float) -> ConfidenceLabels:
    """Whisper words get Deepgram's confidence; segments get an average and a low/high flag."""
    labelled, summary, unclear = engine.annotate(segments, engine.deepgram_words(response), low=low, high=high,
                                                 min_low_dur=min_low_dur)
    get_run_logger().info("word confidence: %s; %d unclear interval(s)", summary, len(unclear))
    return ConfidenceLabels(segments=labelled, summary=summary, unclear_intervals=unclear)
