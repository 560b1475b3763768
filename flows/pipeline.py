"""The DAG body of one transcription, inside a flow run: which tasks run, in what order, on
what. Used by the ``transcribe-audio`` flow and, per file, by ``transcribe-batch``.

    fetch ─┬─ upload (optional: presigned URL for Deepgram)
           ├─ enrol speakers (verification: a bad sample fails before any work)
           └─ transcribe ── align (words: asked for, or needed by speakers / confidence)
                              ├─ diarize ── label speakers (+ enrolled names)
                              └─ Deepgram ── word confidence
                                               └─ write outputs (+ artifacts)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from prefect import tags
from prefect.logging import get_run_logger
from pydantic import BaseModel

from speech.errors import InvalidRequest
from speech.io.audio import release
from speech.io.store import OutputTarget
from speech.models import CACHE
from speech.output.result import PipelineResults
from speech.schema import (
    SECRET_REF_PREFIX,
    AlignParams,
    AudioRef,
    ConfidenceLabels,
    ConfidenceThresholds,
    DeepgramOptions,
    DiarizationOutcome,
    DiarizeParams,
    OutputRef,
    S3Options,
    SpeakerLabels,
    TranscribeParams,
    TranscriptionRequest,
)
from speech.redact import secret_value
from speech.settings import SECRETS, get_settings
from flows.runtime import refuse_untrusted_parameters
from tasks.align import align_words
from tasks.audio import share_audio
from tasks.common import REFRESH_TAG, secret_block
from tasks.confidence import deepgram, word_confidence
from tasks.fetch import fetch_audio
from tasks.outputs import write_outputs
from tasks.speakers import diarize, diarize_hosted, enroll_speakers, label_speakers
from tasks.storage import task_result_storage
from tasks.transcribe import transcribe
from tasks.upload import upload


class PipelineOutput(BaseModel):
    result: dict[str, Any]  # the worker's JSON
    outputs: list[OutputRef]  # where each output file landed


@dataclass
class StageClock:
    """Seconds per stage and which stages were cache hits (the debug block, the summary artifact)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    storage: Any = None  # where task results and cache records live (None: Prefect's default)
    workers: bool = False  # GPU stages go to warm task workers (GPU_TASK_WORKERS)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)

    def run(self, stage: str, task: Any, *args: Any, force: bool = False, gpu: bool = False) -> Any:
        """Run a cached task (``force`` refreshes its cache), timed; note a cache hit. A ``gpu``
        stage goes to a warm task worker when :attr:`workers` is on."""
        result, error = self.attempt(stage, task, *args, force=force, gpu=gpu)
        if error is not None:
            raise error
        return result

    def attempt(self, stage: str, task: Any, *args: Any, force: bool = False,
                gpu: bool = False) -> tuple[Any, Optional[BaseException]]:
        """Like :meth:`run`, but a failed task gives ``(None, its exception)`` instead of raising."""
        with self.time(stage):
            if gpu and self.workers:
                # the worker runs its own copy of the task: the flow's options do not travel, a tag does
                with tags(*([REFRESH_TAG] if force else [])):
                    future = self._task(task, force).delay(*args)
                future.wait()
                state = future.state
            else:
                state = self._task(task, force)(*args, return_state=True)
        return self._settle(stage, state)

    def submit(self, stage: str, task: Any, *args: Any, force: bool = False) -> "Running":
        """Start a task in the background (the flow's thread pool); its seconds run from now
        until it finishes. Arguments may be other :class:`Running` stages' futures."""
        args = tuple(a.future if isinstance(a, Running) else a for a in args)
        return Running(self, stage, self._task(task, force).submit(*args), time.perf_counter())

    def _task(self, task: Any, force: bool) -> Any:
        options: dict[str, Any] = {"refresh_cache": force}
        if self.storage is not None:
            options["result_storage"] = self.storage
        return task.with_options(**options)

    def _settle(self, stage: str, state: Any) -> tuple[Any, Optional[BaseException]]:
        result = state.result(raise_on_failure=False)
        if not state.is_completed():
            return None, result if isinstance(result, BaseException) else RuntimeError(state.message or state.name)
        if state.name == "Cached":
            self.cached.append(stage)
        return result, None


@dataclass
class Running:
    """A stage running in the background."""

    clock: StageClock
    stage: str
    future: Any  # PrefectFuture
    started: float
    finished: Optional[float] = None

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _f: setattr(self, "finished", time.perf_counter()))

    def outcome(self) -> tuple[Any, Optional[BaseException]]:
        """Wait; ``(result, None)`` or ``(None, the task's exception)``."""
        self.future.wait()
        seconds = (self.finished or time.perf_counter()) - self.started
        self.clock.seconds[self.stage] = round(self.clock.seconds.get(self.stage, 0.0) + seconds, 3)
        return self.clock._settle(self.stage, self.future.state)

    def result(self) -> Any:
        result, error = self.outcome()
        if error is not None:
            raise error
        return result


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


def run_pipeline(req: TranscriptionRequest) -> PipelineOutput:
    """The DAG body, inside a flow run: the worker's JSON result and where the outputs went."""
    log = get_run_logger()
    req = with_block_secrets(req)
    refuse_untrusted_parameters(req)
    settings = get_settings()
    log.info("request: %s", {k: v for k, v in req.public_dict().items() if v not in (None, [], False)})
    clock = StageClock(storage=task_result_storage(), workers=settings.gpu_task_workers)
    if clock.workers and clock.storage is None:
        raise InvalidRequest("GPU_TASK_WORKERS=1 needs a result storage the task workers share: "
                             "set RESULTS_STORAGE (s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")

    with clock.time("fetch"):
        audio = fetch_audio(req.audio_file, req.output_name, keep_bytes=clock.workers)
        if clock.workers:
            audio = share_audio(audio, clock.storage)  # task workers elsewhere decode their own copy
    try:
        return _run_stages(req, audio, clock, settings)
    finally:
        release(audio)  # a download kept for decoding, if no stage needed the samples


def _run_stages(req: TranscriptionRequest, audio: AudioRef, clock: StageClock, settings: Any) -> PipelineOutput:
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
                 if req.speaker_verification else None)
    hosted = _hosted_diarization(req, audio, clock) if wants_speakers else None
    asking = _ask_deepgram(req, audio, clock, deepgram_key, uploading, req.language) if (
        wants_confidence and req.language) else None
    enrolled = enrolling.result() if enrolling else None  # a bad sample fails the run before any GPU work

    # GPU stages, one after another in this process
    transcript = clock.run("transcribe", transcribe, audio, TranscribeParams.from_request(req), force=req.force,
                           gpu=True)
    if wants_confidence and asking is None:  # the language is known now
        asking = _ask_deepgram(req, audio, clock, deepgram_key, uploading, transcript.language)
    run = PipelineResults(audio=audio, transcript=transcript, debug=req.debug or settings.debug)
    if req.align_output or wants_speakers or wants_confidence:
        if not req.align_output:
            log.info("speakers and confidence are matched per word: aligning words")
        run.alignment = clock.run("align", align_words, audio, transcript, AlignParams.from_request(req),
                                  force=req.force, gpu=True)
    if wants_speakers:
        run.speakers = _speakers(req, run, clock, enrolled, hosted)
    if asking is not None:
        run.confidence = _confidence(req, run, clock, asking)
    if uploading is not None:
        uploading.result()  # an upload that failed fails the run, even when nothing used its URL

    run.stage_seconds, run.cached_stages = clock.seconds, clock.cached
    run.model_loads = CACHE.load_count - loads_before
    result, refs = write_outputs(run, OutputTarget.from_request(req))
    return PipelineOutput(result=result, outputs=refs)


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


def _speakers(req: TranscriptionRequest, run: PipelineResults, clock: StageClock,
              enrolled: Optional[dict[str, list[float]]], hosted: Optional[Running]) -> SpeakerLabels:
    """The hosted job's speakers, else (not asked, or failed) this machine's; then speakers and
    enrolled names on the words."""
    settings = get_settings()
    segments = run.final_segments()
    params = DiarizeParams.from_request(req)
    outcome, api_error = None, None
    if hosted is not None:
        outcome, error = hosted.outcome()
        if error is not None:
            api_error = f"pyannote-api: {type(error).__name__}: {error}".splitlines()[0][:300]
            get_run_logger().warning("hosted diarization failed%s: %s", "" if params.backend == "pyannote-api"
                                     else "; diarizing on this machine", api_error)
    if outcome is None and params.backend == "pyannote-api":
        outcome = DiarizationOutcome(turns=[], backend=None, error=api_error, settled=False)
    elif outcome is None:
        # a task worker uses its own HF token: tokens never go into stored task parameters
        token = None if clock.workers else req.huggingface_access_token or settings.hf_token
        outcome = clock.run("diarize", diarize, run.audio, segments, params, token, force=req.force, gpu=True)
        if api_error:
            outcome = outcome.model_copy(update={"error": "; ".join(filter(None, [api_error, outcome.error]))})
    speakers = clock.run("diarize", label_speakers, run.audio, segments, outcome, enrolled, req.speaker_encoder,
                         gpu=enrolled is not None)  # speaker embeddings: GPU work
    if outcome.job is not None:
        run.extra_files[f"{run.audio.stem}.pyannote.job.json"] = outcome.job
    return speakers


def _confidence(req: TranscriptionRequest, run: PipelineResults, clock: StageClock,
                asking: Running) -> ConfidenceLabels:
    response = asking.result()
    with clock.time("deepgram"):
        confidence = word_confidence(run.final_segments(), response, ConfidenceThresholds.from_request(req))
    run.extra_files[f"{run.audio.stem}.deepgram.json"] = response
    return confidence
