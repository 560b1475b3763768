"""Word alignment, cached on the audio hash + the transcript + the align settings."""
from __future__ import annotations

import hashlib
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

import speech.align
import speech.backends
from speech.align.stage import align
from tasks.audio import audio_samples
from speech.contracts import AlignOutcome, AlignParams, AudioRef, Transcript
from tasks.common import code_version, keep_out_of_cache, stage_key
from tasks.progress import stage_progress

VERSION = code_version(speech.align, speech.backends)


def align_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    transcript: Transcript = parameters["transcript"]
    params: AlignParams = parameters["params"]
    words = hashlib.sha256(transcript.model_dump_json(include={"segments", "language"}).encode()).hexdigest()
    return stage_key("align", audio.sha256, [params.model_dump(), words], VERSION, context)


@task(name="align", cache_key_fn=align_cache_key, persist_result=True)
def align_words(audio: AudioRef, transcript: Transcript, params: AlignParams) -> AlignOutcome:
    """Word timestamps; cached on audio hash + transcript + align settings (successes only)."""
    outcome = align(audio_samples(audio), transcript, params, progress=stage_progress())
    log = get_run_logger()
    if outcome.backend:
        log.info("aligned %d segments with %s in %.2f s", len(outcome.segments), outcome.backend, outcome.seconds)
    else:
        log.warning("alignment failed, keeping segment-level times: %s", outcome.error)
    if not outcome.settled:
        keep_out_of_cache(f"alignment did not settle ({outcome.error})")
    return outcome
