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
from tasks.audio import audio_samples
from speech.redact import secret_value
from speech.contracts import AudioRef, DiarizationOutcome, DiarizeParams, Segment, SpeakerLabels, Turn
from speech.schema import SpeakerSample
from speech.speakers import encoders, verify
from speech.speakers.assign import assign_speakers, speech_regions
from speech.errors import DiarizationError
from speech.speakers.diarize import diarize as engine_diarize
from speech.settings import get_settings
from speech.speakers.pyannote_api import diarize_hosted as engine_diarize_hosted
from tasks.common import (
    NETWORK_BACKOFF,
    NETWORK_RETRIES,
    code_version,
    file_digest,
    keep_out_of_cache,
    retry_transient,
    stage_key,
)

VERSION = code_version(speech.speakers, speech.backends)


def _settings_key(params: DiarizeParams, *fields: str) -> dict[str, Any]:
    """The parameters that shape a diarization result; a saved job by its content, not its path."""
    out = params.model_dump(include=set(fields) or None)
    if "pyannote_json_in" in out:
        out["pyannote_json_in"] = file_digest(params.pyannote_json_in)
    return out


def diarize_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    params: DiarizeParams = parameters["params"]
    key = _settings_key(params, "backend", "num_speakers", "min_speakers", "max_speakers", "model")
    return stage_key("diarize", audio.sha256, [key, speech_regions(parameters["segments"])], VERSION, context)


def hosted_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    key = _settings_key(parameters["params"], "num_speakers", "min_speakers", "max_speakers", "pyannote_model",
                        "pyannote_exclusive", "pyannote_json_in")
    return stage_key("diarize-hosted", audio.sha256, key, VERSION)


@task(name="diarize", cache_key_fn=diarize_cache_key, persist_result=True)
def diarize(audio: AudioRef, segments: list[Segment], params: DiarizeParams,
            hf_token: Optional[SecretStr]) -> DiarizationOutcome:
    """Who spoke when, on this machine (local pyannote, builtin); cached on audio hash + speech
    regions + diarization settings, only when it settled (never a token)."""
    log = get_run_logger()
    token = secret_value(hf_token) or secret_value(get_settings().hf_token) or None  # a task worker's own
    outcome = engine_diarize(np.asarray(audio_samples(audio)), segments, params, hf_token=token, stem=audio.stem,
                             hosted=False)
    if outcome.backend:
        log.info("diarized with %s: %d turns, %d speakers", outcome.backend, len(outcome.turns),
                 len({t.speaker for t in outcome.turns}))
    else:
        log.warning("diarization failed; the transcript keeps no speaker labels: %s", outcome.error)
    if not outcome.settled:
        keep_out_of_cache(f"diarization did not settle ({outcome.error})")
    return outcome


@task(name="diarize-hosted", cache_key_fn=hosted_cache_key, persist_result=True, retries=NETWORK_RETRIES,
      retry_delay_seconds=NETWORK_BACKOFF, retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def diarize_hosted(audio: AudioRef, params: DiarizeParams, api_key: Optional[SecretStr]) -> DiarizationOutcome:
    """Hosted pyannoteAI diarization (or a saved job), cached on audio hash + API options; network
    trouble and 5xx are retried, anything else fails the task at once (the flow falls back)."""
    samples = None if params.pyannote_json_in else np.asarray(audio_samples(audio))  # a saved job needs none
    outcome = engine_diarize_hosted(samples, params, api_key, audio.stem)
    if not outcome.turns:
        raise DiarizationError("pyannoteAI found no speaker turns")
    get_run_logger().info("diarized with pyannoteAI: %d turns, %d speakers", len(outcome.turns),
                          len({t.speaker for t in outcome.turns}))
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
                   enrolled: Optional[dict[str, list[float]]], encoder_kind: str,
                   threshold: Optional[float] = None) -> SpeakerLabels:
    """Speakers on words and segments (split at word boundaries), then enrolled names (at
    ``threshold``, else the encoder's own)."""
    summary: dict[str, Any] = {"backend": outcome.backend}
    if outcome.band:
        summary["band"] = outcome.band
    if outcome.error:
        summary["error"] = outcome.error
    if not outcome.turns:
        return SpeakerLabels(segments=segments, speakers={}, summary=summary)
    turns = list(outcome.turns)
    naming = None
    if enrolled:
        encoder = encoders.get_encoder(encoder_kind)
        own, margin = encoders.encoder_defaults(encoder)
        threshold = own if threshold is None else threshold
        naming = verify.name_speakers(np.asarray(audio_samples(audio)), [(t.start, t.end, t.speaker) for t in turns],
                                      {k: np.asarray(v) for k, v in enrolled.items()}, encoder, threshold, margin)
        turns = [Turn(start=s, end=e, speaker=label) for s, e, label in naming.turns]
    labelled, speakers = assign_speakers(segments, turns)
    if naming is not None:
        labelled, speakers = verify.relabel(labelled, speakers, naming.mapping, naming.scores)
        summary["names"] = naming.mapping
        summary["verification"] = {"encoder": encoder.name, **naming.explanation}
        get_run_logger().info("matched enrolled names: %s", json.dumps(naming.mapping))
    return SpeakerLabels(segments=labelled, speakers=speakers, summary=summary)
