"""Speaker stages: enrolment (early, fails fast on bad samples), diarization (cached), naming."""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
from prefect import task
from prefect.logging import get_run_logger
from pydantic import SecretStr

import speech.backends
import speech.speakers
from speech.io.audio import read_samples
from speech.redact import secret_value
from speech.schema import AudioRef, DiarizationOutcome, DiarizeParams, Segment, SpeakerLabels, SpeakerSample
from speech.speakers import encoders, verify
from speech.speakers.assign import assign_speakers, speech_regions
from speech.speakers.diarize import diarize as engine_diarize
from tasks.common import NETWORK_BACKOFF, code_version, file_digest, retry_transient, stage_key

VERSION = code_version(speech.speakers, speech.backends)


def diarize_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    params: DiarizeParams = parameters["params"]
    # a saved job's content, not its path; tokens never
    settings = params.model_dump() | {"pyannote_json_in": file_digest(params.pyannote_json_in)}
    return stage_key("diarize", audio.sha256, [settings, speech_regions(parameters["segments"])], VERSION)


@task(name="diarize", cache_key_fn=diarize_cache_key, persist_result=True)
def diarize(audio: AudioRef, segments: list[Segment], params: DiarizeParams,
            hf_token: Optional[SecretStr], api_key: Optional[SecretStr]) -> DiarizationOutcome:
    """Who spoke when; cached on audio hash + speech regions + diarization settings (never a token)."""
    log = get_run_logger()
    outcome = engine_diarize(np.asarray(read_samples(audio)), segments, params,
                             hf_token=secret_value(hf_token) or None, api_key=secret_value(api_key) or None,
                             stem=audio.stem)
    if outcome.backend:
        log.info("diarized with %s: %d turns, %d speakers", outcome.backend, len(outcome.turns),
                 len({t.speaker for t in outcome.turns}))
    else:
        log.warning("diarization failed; the transcript keeps no speaker labels: %s", outcome.error)
    return outcome


@task(name="enroll-speakers", retries=3, retry_delay_seconds=NETWORK_BACKOFF, retry_condition_fn=retry_transient)
def enroll_speakers(samples: list[SpeakerSample], encoder_kind: str) -> dict[str, list[float]]:
    """Fetch and embed the enrolment clips; a bad sample fails the run before any work."""
    encoder = encoders.get_encoder(encoder_kind)
    enrolled = verify.enroll(samples, encoder)
    get_run_logger().info("enrolled %d speaker(s) with the %s encoder: %s", len(enrolled), encoder.name,
                          ", ".join(sorted(enrolled)))
    return {name: vec.tolist() for name, vec in enrolled.items()}


@task(name="label-speakers")
def label_speakers(audio: AudioRef, segments: list[Segment], outcome: DiarizationOutcome,
                   enrolled: Optional[dict[str, list[float]]], encoder_kind: str) -> SpeakerLabels:
    """Speakers on words and segments (split at word boundaries), then enrolled names."""
    summary: dict[str, Any] = {"backend": outcome.backend}
    if outcome.error:
        summary["error"] = outcome.error
    if not outcome.turns:
        return SpeakerLabels(segments=segments, speakers={}, summary=summary)
    labelled, speakers = assign_speakers(segments, outcome.turns)
    if enrolled:
        encoder = encoders.get_encoder(encoder_kind)
        turns = [(t.start, t.end, t.speaker) for t in outcome.turns]
        centroids = verify.speaker_embeddings(np.asarray(read_samples(audio)), turns, encoder)
        threshold, margin = encoders.encoder_defaults(encoder)
        mapping = verify.match_names(centroids, {k: np.asarray(v) for k, v in enrolled.items()},
                                     threshold=threshold, margin=margin)
        labelled, speakers = verify.relabel(labelled, speakers, mapping)
        summary["names"] = mapping
        get_run_logger().info("matched enrolled names: %s", json.dumps(mapping))
    return SpeakerLabels(segments=labelled, speakers=speakers, summary=summary)
