"""The DAG body of one transcription: which tasks run, in what order, on what. Used by the
``transcribe-audio`` flow, per file by ``transcribe-batch``, and by a task worker's whole-file
job (:mod:`flows.jobs`, the throughput path).

    fetch ─┬─ upload (optional: presigned URL for Deepgram)
           ├─ enrol speakers (verification: a bad sample fails before any work)
           ├─ pyannoteAI job (hosted diarization, when chosen)
           └─ GPU unit (flows.gpu: one task on a warm worker, or here):
                transcribe ── align ── diarize ── label speakers (+ enrolled names)
                    └─ Deepgram (once the language is known) ── word confidence
                                                                   └─ write outputs (+ artifacts)
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

from prefect.logging import get_run_logger
from pydantic import BaseModel

from speech.errors import InvalidRequest
from speech.io.audio import release
from speech.io.store import OutputTarget
from speech.models import CACHE
from speech.policy import from_others
from speech.output.result import PipelineResults
from speech.contracts import (
    AlignParams,
    AudioRef,
    ConfidenceLabels,
    ConfidenceThresholds,
    DeepgramOptions,
    DiarizationOutcome,
    DiarizeParams,
    OutputRef,
    S3Options,
    TranscribeParams,
)
from speech.schema import SECRET_REF_PREFIX, TranscriptionRequest
from speech.redact import secret_value
from speech.settings import SECRETS, get_settings
from flows.dispatch import run_deadline, run_on_worker
from flows.gpu import GpuOutcome, GpuPlan, gpu_stages, run_gpu_stages
from flows.runtime import admit_deployment_run, taken_back
from flows.stages import Running, StageClock
from tasks.audio import share_audio
from tasks.common import secret_block
from tasks.confidence import deepgram, word_confidence
from tasks.fetch import fetch_audio
from tasks.outputs import write_outputs
from tasks.progress import checkpoint, checkpointing, guarded
from tasks.speakers import diarize_hosted, enroll_speakers
from tasks.storage import task_result_storage
from tasks.upload import upload


class PipelineOutput(BaseModel):
    result: dict[str, Any]  # the worker's JSON
    outputs: list[OutputRef]  # where each output file landed


def with_block_secrets(req: TranscriptionRequest) -> TranscriptionRequest:
    """A token parameter given as ``prefect-secret:<block name>`` is read from that Secret block
    (so the token itself never travels through the API or lands in its database); tokens the
    run needs that are neither parameters nor env vars come from the Prefect Secret blocks named
    in :data:`speech.settings.SECRETS` (deepgram-api-key, pyannote-api-key, hf-token), when
    saved. Looked up only for the stages that can use them."""
    import re

    settings = get_settings()
    speakers = req.diarization or req.speaker_verification
    found, names = {}, {}
    for spec in SECRETS:
        given = secret_value(getattr(req, spec.request_field))
        if given.startswith(SECRET_REF_PREFIX):
            name = given[len(SECRET_REF_PREFIX):].strip()
            value = secret_block(name) if re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) else None
            if value is None:
                raise InvalidRequest(f"{spec.request_field}: no Secret block named {name!r} "
                                     f"(save one in the Prefect UI or with `prefect block create secret`)")
            found[spec.request_field], names[spec.request_field] = value, name
    for spec in SECRETS:
        if spec.block is None or (spec.speakers_only and not speakers):
            continue
        if getattr(req, spec.request_field) is None and getattr(settings, spec.setting) is None:
            value = secret_block(spec.block)
            if value is not None:
                found[spec.request_field], names[spec.request_field] = value, spec.block
    if found:
        get_run_logger().info("tokens from Secret blocks: %s", ", ".join(names.values()))
    return req.model_copy(update=found) if found else req


def run_pipeline(req: TranscriptionRequest, runner: Any = None, on_audio: Any = None) -> PipelineOutput:
    """The DAG body, inside a flow run (or a task worker's job, ``runner`` its thread pool for
    background stages; ``on_audio`` is told the fetched audio): the worker's JSON result and where
    the outputs went."""
    from prefect.runtime import deployment

    from speech.policy import request_from_others

    # a deployment run is a request from someone else: its local files are checked again as opened
    with request_from_others() if deployment.id else contextlib.nullcontext():
        return _run_pipeline(req, runner, on_audio)


def _run_pipeline(req: TranscriptionRequest, runner: Any, on_audio: Any) -> PipelineOutput:
    log = get_run_logger()
    req = admit_deployment_run(taken_back(req))  # the policy sees the request's own secret references
    req = with_block_secrets(req)
    settings = get_settings()
    log.info("request: %s", {k: v for k, v in req.public_dict().items() if v not in (None, [], False)})
    clock = StageClock(storage=task_result_storage(), runner=runner)
    workers = settings.gpu_task_workers and runner is None  # a task worker's own job runs its GPU stages itself
    if workers and clock.storage is None:
        raise InvalidRequest("GPU_TASK_WORKERS=1 needs a result storage the task workers share: "
                             "set RESULTS_STORAGE (s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")

    with clock.time("fetch"):
        audio = fetch_audio(req.audio_file, req.output_name, keep_bytes=workers, sha256=req.audio_sha256)
        if workers:
            audio = share_audio(audio, clock.storage)  # task workers elsewhere decode their own copy
    if on_audio is not None:
        on_audio(audio)
    try:
        with _deadline(req, audio, settings, workers):
            return _run_stages(req, audio, clock, settings, workers)
    finally:
        release(audio)  # a download kept for decoding, if no stage needed the samples


@contextlib.contextmanager
def _deadline(req: TranscriptionRequest, audio: AudioRef, settings: Any, workers: bool) -> Iterator[None]:
    """A run of the service (a deployment run, an endpoint's or the handler's job) that works here
    stops at its deadline (``GPU_TASK_TIMEOUT``, by default scaled to the audio; plus the hosted
    job's ``pyannote_timeout`` when it may wait on one) or once its flow run is cancelled, at the
    next stage or progress report; a deployment run, its process its own, is also ended by the
    watchdog when a stage never returns. The CLI's and Python's own runs, runs that wait on task
    workers (each wait has its deadline) and a task worker's job (its guard is already set) have
    none here."""
    from prefect.runtime import deployment, flow_run

    if workers or guarded() or not flow_run.id or not from_others():  # from_others: set by each entry point
        yield
        return
    from flows.runguard import fail_stuck_flow_runs, flow_run_guard, start_watchdog

    seconds = run_deadline(audio.duration, settings)
    has_key = (req.pyannote_api_key or settings.pyannote_api_key) is not None
    if (req.diarization or req.speaker_verification) and DiarizeParams.from_request(req).hosted_first(has_key=has_key):
        seconds += req.pyannote_timeout
    guard = flow_run_guard(flow_run.id, seconds, f"{flow_run.flow_name} of {audio.stem}")
    if deployment.id:
        start_watchdog(before_exit=fail_stuck_flow_runs)
    with guard, checkpointing(guard.check):
        yield


def _run_stages(req: TranscriptionRequest, audio: AudioRef, clock: StageClock, settings: Any,
                workers: bool) -> PipelineOutput:
    log = get_run_logger()
    loads_before = CACHE.load_count
    wants_speakers = req.diarization or req.speaker_verification
    deepgram_key = req.deepgram_api_key or settings.deepgram_api_key
    wants_confidence = bool(deepgram_key or req.deepgram_json_in)
    if not wants_confidence:
        log.info("Deepgram confidence skipped: no deepgram_api_key, DEEPGRAM_API_KEY, "
                 "deepgram-api-key Secret block or deepgram_json_in")

    # network stages start at once and overlap the GPU stages below
    uploading = _upload(req, audio, clock)
    enrolling = (clock.submit("enroll", enroll_speakers, req.speaker_samples, req.speaker_encoder)
                 if req.speaker_verification and not workers else None)  # task workers enrol on the GPU
    hosted = _hosted_diarization(req, audio, clock) if wants_speakers else None
    asking = [_ask_deepgram(req, audio, clock, deepgram_key, uploading, req.language)] if (
        wants_confidence and req.language) else []
    enrolled = enrolling.result() if enrolling else None  # a bad sample fails the run before any GPU work

    def on_transcript(transcript: Any) -> None:  # the language is known now
        if wants_confidence and not asking:
            asking.append(_ask_deepgram(req, audio, clock, deepgram_key, uploading, transcript.language))

    if (req.align_output or wants_speakers or wants_confidence) and not req.align_output:
        log.info("speakers and confidence are matched per word: aligning words")
    plan = GpuPlan(
        transcribe=TranscribeParams.from_request(req),
        align=AlignParams.from_request(req) if req.align_output or wants_speakers or wants_confidence else None,
        speakers=wants_speakers and hosted is None, diarize=DiarizeParams.from_request(req),
        samples=req.speaker_samples if req.speaker_verification and workers else [], enrolled=enrolled,
        encoder=req.speaker_encoder, threshold=req.speaker_threshold, force=req.force,
        deadline=run_deadline(audio.duration, settings), others=from_others())
    hf_token = req.huggingface_access_token or settings.hf_token
    gpu = _gpu(audio, plan, clock, workers, hf_token, on_transcript)
    on_transcript(gpu.transcript)
    run = PipelineResults(audio=audio, transcript=gpu.transcript, alignment=gpu.alignment, speakers=gpu.speakers,
                          debug=req.debug or settings.debug)
    model_loads = gpu.model_loads
    if hosted is not None:  # a second, small unit: the hosted turns (or this machine's) on the words
        speakers = _gpu(audio, _speakers_plan(req, run, plan, hosted, gpu), clock, workers, hf_token)
        run.speakers, model_loads = speakers.speakers, model_loads + speakers.model_loads
        gpu.diarization_job = speakers.diarization_job
    if gpu.diarization_job is not None:
        run.extra_files[f"{audio.stem}.pyannote.job.json"] = gpu.diarization_job
    if asking:
        run.confidence = _confidence(req, run, clock, asking[0])
    if uploading is not None:
        uploading.result()  # an upload that failed fails the run, even when nothing used its URL

    run.stage_seconds, run.cached_stages = clock.seconds, clock.cached
    run.model_loads = model_loads if workers else CACHE.load_count - loads_before
    checkpoint()  # a job cancelled or out of time while hosted stages ran writes nothing
    result, refs = write_outputs(run, OutputTarget.from_request(req))
    return PipelineOutput(result=result, outputs=refs)


def _gpu(audio: AudioRef, plan: GpuPlan, clock: StageClock, workers: bool, hf_token: Any,
         on_transcript: Any = None) -> GpuOutcome:
    """The GPU unit here, or on a warm task worker (a token never travels: workers use their own)."""
    if not workers:
        return run_gpu_stages(audio, plan, clock, hf_token=hf_token, on_transcript=on_transcript)
    from prefect.runtime import flow_run

    with clock.time("gpu-task"):  # tagged with its flow run: Prefect does not link background tasks to one
        out = run_on_worker(gpu_stages, audio, plan, label=f"gpu-stages of {audio.stem}", deadline=plan.deadline,
                            storage=clock.storage, tags=(f"flow-run:{flow_run.id}",) if flow_run.id else ())
    clock.merge(out.seconds, out.cached)
    return out


def _upload(req: TranscriptionRequest, audio: AudioRef, clock: StageClock) -> Optional[Running]:
    """The original pipeline's first step: the local audio to the bucket, presigned."""
    if not req.upload:
        return None
    bucket = req.bucket or get_settings().s3_bucket
    if not bucket:
        raise InvalidRequest("upload needs a bucket: pass bucket (--bucket) or set RESULTS_BUCKET")
    if not Path(req.audio_file).is_file():
        get_run_logger().info("upload skipped: %s is not a local file", audio.source)
        return None
    return clock.submit("upload", upload, req.audio_file, audio, bucket, req.prefix_audio or get_settings().prefix_audio,
                        req.force, req.url_expiry, S3Options.from_request(req))


def _hosted_diarization(req: TranscriptionRequest, audio: AudioRef, clock: StageClock) -> Optional[Running]:
    """The hosted pyannoteAI job, when chosen or at hand: it needs only the audio, so it starts now."""
    params = DiarizeParams.from_request(req)
    api_key = req.pyannote_api_key or get_settings().pyannote_api_key
    if not params.hosted_first(has_key=api_key is not None):
        return None
    return clock.submit("diarize", diarize_hosted, audio, params, api_key, force=req.force)


def _ask_deepgram(req: TranscriptionRequest, audio: AudioRef, clock: StageClock, key: Any,
                  uploading: Optional[Running], language: Optional[str]) -> Running:
    """Deepgram's response, started as soon as the language is known (on the presigned URL once
    the upload is done, else the source URL, else the decoded samples)."""
    source_url = req.audio_file if req.audio_file.startswith(("http://", "https://")) else None
    options = DeepgramOptions.from_request(req, language=language)
    return clock.submit("deepgram", deepgram, audio, options, key, uploading, source_url, req.deepgram_json_in,
                        force=req.force)


def _speakers_plan(req: TranscriptionRequest, run: PipelineResults, plan: GpuPlan, hosted: Running,
                   first: GpuOutcome) -> GpuPlan:
    """Speakers from the hosted job's turns; when it failed, this machine's diarizer (unless
    pyannote-api was asked for by name: then no speakers, and the error in the summary)."""
    outcome, error = hosted.outcome()
    api_error = None
    if error is not None:
        api_error = f"pyannote-api: {type(error).__name__}: {error}".splitlines()[0][:300]
        get_run_logger().warning("hosted diarization failed%s: %s", "" if plan.diarize.backend == "pyannote-api"
                                 else "; diarizing on this machine", api_error)
    if outcome is None and plan.diarize.backend == "pyannote-api":
        outcome = DiarizationOutcome(turns=[], backend=None, error=api_error, settled=False)
    return plan.model_copy(update={"segments": run.final_segments(), "speakers": True, "turns": outcome,
                                   "hosted_error": api_error if outcome is None else None, "samples": [],
                                   "enrolled": plan.enrolled or first.enrolled})


def _confidence(req: TranscriptionRequest, run: PipelineResults, clock: StageClock,
                asking: Running) -> ConfidenceLabels:
    response = asking.result()
    with clock.time("deepgram"):
        confidence = word_confidence(run.final_segments(), response, ConfidenceThresholds.from_request(req))
    run.extra_files[f"{run.audio.stem}.deepgram.json"] = response
    return confidence
