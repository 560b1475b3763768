"""The transcription DAG: fetch -> transcribe -> merge/write, as one Prefect flow.

Python:  ``from flows.transcribe import transcribe_audio; transcribe_audio(audio_file="x.wav")``
CLI:     ``python -m flows.transcribe AUDIO [flags]``  (see ``--help``)

The flow's keyword arguments are exactly the fields of
:class:`speech.schema.TranscriptionRequest` (a test keeps the two in step), so the Prefect
UI shows a typed form and Python callers pass the worker's inputs by name.
"""
from __future__ import annotations

if __name__ == "__main__":  # CLI first, before the heavy imports: keeps --help instant
    from flows.cli import main

    raise SystemExit(main())

import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import SecretStr

from speech.align import AlignParams
from speech.confidence import DeepgramOptions
from speech.diarize import DiarizeParams
from speech.errors import InvalidRequest
from speech.settings import get_settings
from speech.schema import (
    SECRET_FIELDS,
    AlignBackend,
    DiarizationBackend,
    PyannoteModel,
    SpeakerEncoder,
    TranscribeParams,
    TranscriptionRequest,
)
from tasks.common import SECRET_BLOCKS, secret_block
from tasks.align import align_words
from tasks.confidence import deepgram, word_confidence
from tasks.upload import upload
from tasks.speakers import diarize, enroll_speakers, label_speakers
from tasks.fetch import fetch_audio
from tasks.outputs import write_outputs
from tasks.transcribe import transcribe


@flow(name="transcribe-audio", validate_parameters=False, log_prints=False)
def transcribe_audio(
    audio_file: str,
    language: Optional[str] = None,
    language_detection_min_prob: float = 0,
    language_detection_max_tries: int = 5,
    initial_prompt: Optional[str] = None,
    batch_size: int = 64,
    temperature: float = 0,
    vad_onset: float = 0.500,
    vad_offset: float = 0.363,
    align_output: bool = False,
    diarization: bool = False,
    huggingface_access_token: Optional[SecretStr] = None,
    min_speakers: Optional[int] = None,
    max_speakers: Optional[int] = None,
    debug: bool = False,
    speaker_verification: bool = False,
    speaker_samples: Optional[list[dict[str, Any]]] = None,
    align_backend: AlignBackend = "auto",
    align_model: Optional[str] = None,
    diarization_backend: DiarizationBackend = "auto",
    diarization_model: Optional[str] = None,
    pyannote_api_key: Optional[SecretStr] = None,
    pyannote_model: PyannoteModel = "precision-2",
    pyannote_exclusive: bool = False,
    pyannote_poll_interval: float = 5.0,
    pyannote_timeout: float = 1800.0,
    pyannote_json_in: Optional[str] = None,
    deepgram_api_key: Optional[SecretStr] = None,
    deepgram_json_in: Optional[str] = None,
    deepgram_model: str = "nova-3",
    deepgram_tier: Optional[str] = None,
    deepgram_version: Optional[str] = None,
    word_confidence_low_threshold: float = 0.6,
    word_confidence_high_threshold: float = 0.85,
    low_confidence_min_dur: float = 0.5,
    s3_endpoint: Optional[str] = None,
    access_key: Optional[SecretStr] = None,
    secret_key: Optional[SecretStr] = None,
    upload: bool = False,
    prefix_audio: Optional[str] = None,
    url_expiry: int = 3600,
    download_transcript: bool = False,
    speaker_encoder: SpeakerEncoder = "auto",
    model: Optional[str] = None,
    beam_size: Optional[int] = None,
    num_speakers: Optional[int] = None,
    download_dir: Optional[str] = None,
    bucket: Optional[str] = None,
    prefix_transcripts: Optional[str] = None,
    output_name: Optional[str] = None,
    force: bool = False,
) -> dict[str, Any]:
    """Transcribe one audio file with WhisperX and store JSON, SRT and VTT outputs.

    Args:
        audio_file: Local path, http(s) URL or s3://bucket/key of the audio.
        language: ISO code of the spoken language (e.g. 'en'); leave empty to detect it.
        language_detection_min_prob: Detect on successive 30 s windows of speech until one reaches this probability.
        language_detection_max_tries: At most this many detection windows; then the most probable language wins.
        initial_prompt: Text to prompt the first decoding window with.
        batch_size: Parallel decoding batch size.
        temperature: Sampling temperature (0 = deterministic).
        vad_onset: VAD onset threshold, in (0, 1).
        vad_offset: VAD offset threshold, in (0, 1).
        align_output: Align words for accurate word-level timestamps.
        diarization: Label segments and words with speakers.
        huggingface_access_token: Hugging Face token for gated models (prefer the HF_TOKEN env var or the hf-token Secret block).
        min_speakers: Minimum number of speakers.
        max_speakers: Maximum number of speakers.
        debug: Add stage timings, model load time and peak memory to the result.
        speaker_verification: Relabel speakers with enrolled names.
        speaker_samples: Enrolment clips, a list of {name?, url}.
        align_backend: Word aligner: auto, wav2vec2 (WhisperX), pocketsphinx (English, offline) or whisper.
        align_model: wav2vec2 align model name or local directory (default: the language's WhisperX model).
        diarization_backend: Diarizer: auto, pyannote (local pipeline), pyannote-api (hosted pyannoteAI) or builtin (offline).
        diarization_model: Local pyannote pipeline, hub name or directory (default WhisperX's community-1).
        pyannote_api_key: pyannoteAI API key (prefer the PYANNOTE_API_KEY env var or the pyannote-api-key Secret block).
        pyannote_model: pyannoteAI model, precision-2 or community-1.
        pyannote_exclusive: Use pyannoteAI's exclusive (non-overlapping) diarization.
        pyannote_poll_interval: Seconds between pyannoteAI job polls.
        pyannote_timeout: Give up on a pyannoteAI job after this many seconds.
        pyannote_json_in: Reuse a saved <stem>.pyannote.job.json instead of calling the API.
        deepgram_api_key: Deepgram key for word confidence (prefer the DEEPGRAM_API_KEY env var or the deepgram-api-key Secret block).
        deepgram_json_in: Reuse a saved <stem>.deepgram.json instead of calling Deepgram.
        deepgram_model: Deepgram model (default nova-3).
        deepgram_tier: Deepgram tier (older models only).
        deepgram_version: Deepgram model version.
        word_confidence_low_threshold: A segment is flagged low below this average word confidence.
        word_confidence_high_threshold: A segment is flagged high at or above this average word confidence.
        low_confidence_min_dur: Seconds of contiguous low-confidence speech that flag a segment low.
        s3_endpoint: S3-compatible endpoint URL (MinIO, R2); default from the environment.
        access_key: S3 access key id (prefer AWS_ACCESS_KEY_ID or an AwsCredentials block).
        secret_key: S3 secret key (prefer AWS_SECRET_ACCESS_KEY or an AwsCredentials block).
        upload: Upload the audio to the bucket under prefix_audio (skipped when already there) and presign it.
        prefix_audio: Key prefix for uploaded audio (default audio/).
        url_expiry: Presigned URL lifetime in seconds.
        download_transcript: With a bucket, also write the outputs to download_dir.
        speaker_encoder: Speaker-verification encoder: auto, ecapa (SpeechBrain) or builtin (offline).
        model: Whisper model name (large-v3, ...), model directory, or bundled:base / bundled:tiny.en.
        beam_size: Beam size (default 5).
        num_speakers: Exact number of speakers, when known.
        download_dir: Local folder for the outputs (default RESULTS_DIR or ./out).
        bucket: S3 bucket for the outputs (default RESULTS_BUCKET).
        prefix_transcripts: Key prefix for outputs in the bucket.
        output_name: Stem of the output files (default: the audio file's stem).
        force: Recompute every stage even when a cached result exists.
    """
    args = dict(locals())
    args["speaker_samples"] = args["speaker_samples"] or []
    _redact_stored_secrets(args)
    apply_runtime_switches()
    req = TranscriptionRequest.parse(args)
    return run_pipeline(req)


def set_console_level(level: str | int) -> None:
    """Level of Prefect's console handlers (on the root logger in Prefect's default logging
    config, on prefect loggers in custom ones); the API handlers are left alone."""
    import logging

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.setLevel(level)


def apply_runtime_switches() -> None:
    """The original worker's env switches, once per flow run: CONSOLE_LOG_LEVEL (the console
    handler's level only; the Prefect API still receives every log) and PRINT_MOUNTS."""
    settings = get_settings()
    if settings.console_log_level:
        set_console_level(settings.console_log_level)
    if settings.print_mounts:
        from speech.report import mounted_volumes

        get_run_logger().info("mounts:\n%s", "\n".join(mounted_volumes()))


SECRET_PARAMETERS = SECRET_FIELDS


def _redact_stored_secrets(args: dict[str, Any]) -> None:
    """A token passed as a plain parameter is used, but erased from the stored flow run.

    (Passed as ``SecretStr`` it is stored masked from the start; the CLI does that.)
    """
    if not any(isinstance(args.get(k), str) and args.get(k) for k in SECRET_PARAMETERS):
        return
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    stored = dict(ctx.flow_run.parameters)
    for k in SECRET_PARAMETERS:
        if stored.get(k):
            stored[k] = "**********"
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, parameters=stored)


def with_block_secrets(req: TranscriptionRequest) -> TranscriptionRequest:
    """Tokens the run needs that are neither parameters nor env vars come from the Prefect
    Secret blocks in :data:`tasks.common.SECRET_BLOCKS` (deepgram-api-key, pyannote-api-key,
    hf-token), when saved. Looked up only for the stages that can use them."""
    settings = get_settings()
    env = {"deepgram_api_key": settings.deepgram_api_key, "pyannote_api_key": settings.pyannote_api_key,
           "huggingface_access_token": settings.hf_token}
    wanted = ["deepgram_api_key"]
    if req.diarization or req.speaker_verification:
        wanted += ["pyannote_api_key", "huggingface_access_token"]
    found = {}
    for field in wanted:
        if getattr(req, field) is None and env[field] is None:
            value = secret_block(SECRET_BLOCKS[field])
            if value is not None:
                found[field] = value
    if found:
        get_run_logger().info("tokens from Secret blocks: %s", ", ".join(SECRET_BLOCKS[f] for f in found))
    return req.model_copy(update=found) if found else req


def run_pipeline(req: TranscriptionRequest) -> dict[str, Any]:
    """The DAG body, inside a flow run. Returns the worker's JSON result."""
    log = get_run_logger()
    req = with_block_secrets(req)
    log.info("request: %s", {k: v for k, v in req.public_dict().items() if v not in (None, [], False)})
    stage_seconds: dict[str, float] = {}
    cached: list[str] = []

    t = time.perf_counter()
    audio = fetch_audio(req.audio_file, req.output_name)
    stage_seconds["fetch"] = round(time.perf_counter() - t, 3)

    s3_options = {"endpoint": req.s3_endpoint,
                  "access_key": req.access_key.get_secret_value() if req.access_key else None,
                  "secret_key": req.secret_key.get_secret_value() if req.secret_key else None}
    uploaded = None
    if req.upload:
        bucket = req.bucket or get_settings().s3_bucket
        if not bucket:
            raise InvalidRequest("upload needs a bucket: pass bucket (--bucket) or set RESULTS_BUCKET")
        if not Path(req.audio_file).is_file():
            log.info("upload skipped: %s is not a local file", audio.source)
        else:
            uploaded = upload(req.audio_file, audio, bucket, req.prefix_audio or get_settings().prefix_audio,
                              req.force, req.url_expiry, s3_options)

    enrolled = None
    if req.speaker_verification:  # fetch + embed the samples first: a bad sample fails fast
        t = time.perf_counter()
        enrolled = enroll_speakers(req.speaker_samples, req.speaker_encoder)
        stage_seconds["enroll"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    state = transcribe.with_options(refresh_cache=req.force)(
        audio, TranscribeParams.from_request(req), return_state=True
    )
    transcript = state.result()
    if state.name == "Cached":
        cached.append("transcribe")
    stage_seconds["transcribe"] = round(time.perf_counter() - t, 3)

    extra_files: dict[str, Any] = {}
    alignment = None
    wants_speakers = req.diarization or req.speaker_verification
    settings = get_settings()
    dg_key = req.deepgram_api_key or settings.deepgram_api_key
    wants_confidence = bool(dg_key or req.deepgram_json_in)
    if not wants_confidence:
        log.info("Deepgram confidence skipped: no deepgram_api_key, DEEPGRAM_API_KEY, "
                 "deepgram-api-key Secret block or deepgram_json_in")
    if req.align_output or wants_speakers or wants_confidence:
        if not req.align_output:
            log.info("speakers and confidence are matched per word: aligning words")
        t = time.perf_counter()
        state = align_words.with_options(refresh_cache=req.force)(
            audio, transcript, AlignParams(backend=req.align_backend, align_model=req.align_model), return_state=True
        )
        alignment = state.result()
        if state.name == "Cached":
            cached.append("align")
        stage_seconds["align"] = round(time.perf_counter() - t, 3)
    speakers = None
    if wants_speakers:
        segments = alignment.segments if alignment is not None else transcript.segments
        t = time.perf_counter()
        state = diarize.with_options(refresh_cache=req.force)(
            audio, segments, DiarizeParams.from_request(req), _api_options(req), return_state=True
        )
        outcome = state.result()
        if state.name == "Cached":
            cached.append("diarize")
        speakers = label_speakers(audio, segments, outcome, enrolled, req.speaker_encoder)
        stage_seconds["diarize"] = round(time.perf_counter() - t, 3)
        if outcome.job is not None:
            extra_files[f"{audio.stem}.pyannote.job.json"] = outcome.job

    confidence = None
    if wants_confidence:
        final = speakers.segments if speakers is not None and speakers.speakers else (
            alignment.segments if alignment is not None else transcript.segments)
        url = uploaded.presigned_url if uploaded else (req.audio_file if req.audio_file.startswith(("http://", "https://")) else None)
        t = time.perf_counter()
        options = DeepgramOptions(model=req.deepgram_model, tier=req.deepgram_tier, version=req.deepgram_version,
                                  language=transcript.language)
        state = deepgram.with_options(refresh_cache=req.force)(
            audio, options, dg_key.get_secret_value() if dg_key else None, url, req.deepgram_json_in, return_state=True
        )
        response = state.result()
        if state.name == "Cached":
            cached.append("deepgram")
        confidence = word_confidence(final, response, req.word_confidence_low_threshold,
                                     req.word_confidence_high_threshold, req.low_confidence_min_dur)
        extra_files[f"{audio.stem}.deepgram.json"] = response
        stage_seconds["deepgram"] = round(time.perf_counter() - t, 3)

    result, _refs = write_outputs(
        audio,
        transcript,
        alignment,
        speakers,
        confidence,
        debug=req.debug or settings.debug,
        download_dir=req.download_dir,
        bucket=req.bucket,
        prefix=req.prefix_transcripts,
        stage_seconds=stage_seconds,
        cached_stages=cached,
        extra_files=extra_files,
        s3_options=s3_options,
        download_transcript=req.download_transcript,
    )
    return result


def _api_options(req: TranscriptionRequest) -> dict[str, Any]:
    """Options of the hosted diarization call; the key stays out of cache keys and logs."""
    from speech.settings import get_settings

    settings = get_settings()
    key = req.pyannote_api_key or settings.pyannote_api_key
    hf = req.huggingface_access_token
    return {
        "api_key": key.get_secret_value() if key else None,
        "hf_token": hf.get_secret_value() if hf else None,
        "model": req.pyannote_model,
        "exclusive": req.pyannote_exclusive,
        "poll_interval": req.pyannote_poll_interval,
        "timeout": req.pyannote_timeout,
        "json_in": req.pyannote_json_in,
    }
