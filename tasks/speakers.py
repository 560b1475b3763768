"""Speaker stages: enrolment (early, fails fast on bad samples), diarization (cached), naming."""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from prefect import task
from prefect.logging import get_run_logger

import speech.diarize as engine
import speech.diarize_api as api_engine
import speech.speakers as verification
from speech.audio import read_samples, write_wav
from speech.diarize import DiarizationOutcome, DiarizeParams, Turn
from speech.schema import AudioRef, Segment, SpeakerLabels, SpeakerSample
from speech.settings import get_settings
from tasks.common import NETWORK_BACKOFF, code_version, retry_transient, stage_key

VERSION = code_version(engine, api_engine)


def diarize_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    audio: AudioRef = parameters["audio"]
    regions = engine.speech_regions(parameters["segments"])
    api_opts = {k: v for k, v in parameters["api_options"].items() if k not in ("api_key", "hf_token")}
    if api_opts.get("json_in") and Path(api_opts["json_in"]).is_file():  # the saved job's content, not its path
        api_opts["json_in"] = hashlib.sha256(Path(api_opts["json_in"]).read_bytes()).hexdigest()
    return stage_key("diarize", audio.sha256, [parameters["params"].model_dump(), api_opts, regions], VERSION)


@task(name="diarize", cache_key_fn=diarize_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=NETWORK_BACKOFF, retry_condition_fn=retry_transient)
def diarize(audio: AudioRef, segments: list[Segment], params: DiarizeParams, api_options: dict[str, Any]) -> DiarizationOutcome:
    """Who spoke when; cached on audio hash + speech regions + diarization settings (never the key)."""
    log = get_run_logger()
    settings = get_settings()
    samples = np.asarray(read_samples(audio))
    hf = settings.hf_token.get_secret_value() if settings.hf_token else None
    hf = api_options.get("hf_token") or hf

    def hosted() -> DiarizationOutcome:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / f"{audio.stem}.wav"
            if not api_options.get("json_in"):
                write_wav(samples, wav)  # compact 16 kHz PCM upload, whatever the source format
            result = api_engine.diarize_pyannote_api(
                str(wav), api_options.get("api_key") or "", model=api_options["model"],
                exclusive=api_options["exclusive"], num_speakers=params.num_speakers,
                min_speakers=params.min_speakers, max_speakers=params.max_speakers,
                poll_interval=api_options["poll_interval"], timeout=api_options["timeout"],
                json_in=api_options.get("json_in"),
            )
        turns = [Turn(start=t.start, end=t.end, speaker=t.speaker) for t in result.turns]
        return DiarizationOutcome(turns=turns, backend="pyannote-api", job=result.job)

    outcome = engine.diarize(samples, segments, params, settings=settings, hf_token=hf, api=hosted)
    if outcome.backend:
        log.info("diarized with %s: %d turns, %d speakers", outcome.backend, len(outcome.turns),
                 len({t.speaker for t in outcome.turns}))
    else:
        log.warning("diarization failed; the transcript keeps no speaker labels: %s", outcome.error)
    return outcome


@task(name="enroll-speakers", retries=3, retry_delay_seconds=NETWORK_BACKOFF, retry_condition_fn=retry_transient)
def enroll_speakers(samples: list[SpeakerSample], encoder_kind: str) -> dict[str, list[float]]:
    """Fetch and embed the enrolment clips; a bad sample fails the run before any work."""
    encoder = verification.get_encoder(encoder_kind)
    enrolled = verification.enroll(samples, encoder)
    get_run_logger().info("enrolled %d speaker(s) with the %s encoder: %s", len(enrolled), encoder.name,
                          ", ".join(sorted(enrolled)))
    return {name: vec.tolist() for name, vec in enrolled.items()}


@task(name="label-speakers")
def label_speakers(audio: AudioRef, segments: list[Segment], outcome: DiarizationOutcome,
                   enrolled: Optional[dict[str, list[float]]], encoder_kind: str) -> SpeakerLabels:
    """Speakers on words and segments (split at word boundaries), then enrolled names."""
    log = get_run_logger()
    summary: dict[str, Any] = {"backend": outcome.backend}
    if outcome.error:
        summary["error"] = outcome.error
    if not outcome.turns:
        return SpeakerLabels(segments=segments, speakers={}, summary=summary)
    labelled, speakers = engine.assign_speakers(segments, outcome.turns)
    if enrolled:
        encoder = verification.get_encoder(encoder_kind)
        samples = np.asarray(read_samples(audio))
        turns = [(t.start, t.end, t.speaker) for t in outcome.turns]
        centroids = verification.speaker_embeddings(samples, turns, encoder)
        threshold, margin = verification.encoder_defaults(encoder)
        mapping = verification.match_names(centroids, {k: np.asarray(v) for k, v in enrolled.items()},
                                           threshold=threshold, margin=margin)
        labelled, speakers = verification.relabel(labelled, speakers, mapping)
        summary["names"] = mapping
        log.info("matched enrolled names: %s", json.dumps(mapping))
    return SpeakerLabels(segments=labelled, speakers=speakers, summary=summary)
