"""One file's GPU work as one unit: transcribe -> align -> diarize -> speaker embeddings / names.

:func:`run_gpu_stages` runs the stage tasks one after another (each a Prefect task run, cached on
its own, so a rerun with only diarization changed reuses the transcript and alignment). Inline it
runs in the flow run's process; with warm task workers (``GPU_TASK_WORKERS=1``) the flow hands
the whole unit to one worker as the background task :func:`gpu_stages`, so one file decodes
once, on one worker that holds the models, instead of scattering its stages over workers. Both
call the same function: inline and task-worker runs give the same result.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from speech.models import CACHE
from speech.contracts import (
    AlignOutcome,
    AlignParams,
    AudioRef,
    DiarizationOutcome,
    DiarizeParams,
    Segment,
    SpeakerLabels,
    TranscribeParams,
    Transcript,
)
from speech.schema import SpeakerSample
from flows.stages import StageClock
from tasks.align import align_words
from tasks.progress import checkpoint
from tasks.speakers import diarize, enroll_speakers, label_speakers
from tasks.transcribe import transcribe


# whisperx's batched pipeline keeps per-call state on the shared model object, and a GPU runs one
# file's kernels best at a time: a process's GPU units take turns (a task worker with --limit 2 then
# overlaps one file's downloads, uploads and API waits with another's GPU work)
GPU_LOCK = threading.Lock()


class GpuPlan(BaseModel):
    """What one file's GPU unit does (its task parameters: no token, no samples, small)."""

    transcribe: TranscribeParams
    align: Optional[AlignParams] = Field(None, description="word alignment (None: segment times only)")
    speakers: bool = Field(False, description="label words and segments with speakers")
    diarize: Optional[DiarizeParams] = Field(None, description="diarize here when no turns are given")
    turns: Optional[DiarizationOutcome] = Field(None, description="turns found elsewhere (pyannoteAI)")
    hosted_error: Optional[str] = Field(None, description="why the hosted diarization failed, kept in the summary")
    samples: list[SpeakerSample] = Field(default_factory=list, description="enrolment clips, embedded here")
    enrolled: Optional[dict[str, list[float]]] = Field(None, description="enrolled voices, embedded already")
    encoder: str = "auto"
    threshold: Optional[float] = Field(None, description="the naming threshold (None: the encoder's own)")
    segments: Optional[list[Segment]] = Field(None, description="speakers only: the (aligned) segments to label")
    force: bool = False
    deadline: float = Field(0.0, description="seconds this unit may run on a worker (0: no deadline)")
    others: bool = Field(False, description="a request from someone else: the local files it names (samples) are "
                         "checked where the worker opens them (speech.policy.request_from_others)")


class GpuOutcome(BaseModel):
    transcript: Optional[Transcript] = None
    alignment: Optional[AlignOutcome] = None
    speakers: Optional[SpeakerLabels] = None
    diarization_job: Optional[dict[str, Any]] = None
    enrolled: Optional[dict[str, list[float]]] = None  # voices enrolled here (for a later speakers-only unit)
    seconds: dict[str, float] = Field(default_factory=dict)
    cached: list[str] = Field(default_factory=list)
    model_loads: int = 0


def run_gpu_stages(audio: AudioRef, plan: GpuPlan, clock: StageClock, hf_token: Any = None,
                   on_transcript: Optional[Callable[[Transcript], None]] = None) -> GpuOutcome:
    """The unit's stages in order, each through ``clock`` (timed, cached); ``on_transcript`` is
    told as soon as the transcript exists (the flow starts Deepgram then)."""
    loads = CACHE.load_count
    out = GpuOutcome()
    enrolled = plan.enrolled
    if plan.samples and enrolled is None:  # a bad sample fails the unit before any transcription
        enrolled = out.enrolled = clock.run("enroll", enroll_speakers, plan.samples, plan.encoder)
    waiting = time.perf_counter()
    with GPU_LOCK:  # one file's GPU work at a time per process; others fetch, upload, wait on APIs meanwhile
        waited = time.perf_counter() - waiting
        if waited >= 0.01:
            clock.add("gpu-wait", waited)  # behind another file's GPU unit in this process
        _run_locked(audio, plan, clock, out, enrolled, hf_token, on_transcript)
    out.seconds, out.cached, out.model_loads = dict(clock.seconds), list(clock.cached), CACHE.load_count - loads
    return out


def _run_locked(audio: AudioRef, plan: GpuPlan, clock: StageClock, out: GpuOutcome, enrolled: Any, hf_token: Any,
                on_transcript: Optional[Callable[[Transcript], None]]) -> None:
    segments = plan.segments
    if segments is None:
        checkpoint()
        out.transcript = clock.run("transcribe", transcribe, audio, plan.transcribe, force=plan.force)
        if on_transcript is not None:
            on_transcript(out.transcript)
        segments = out.transcript.segments
        if plan.align is not None:
            checkpoint()
            out.alignment = clock.run("align", align_words, audio, out.transcript, plan.align, force=plan.force)
            segments = out.alignment.segments
    if plan.speakers:
        outcome = plan.turns
        if outcome is None:
            checkpoint()
            outcome = clock.run("diarize", diarize, audio, segments, plan.diarize, hf_token, force=plan.force)
            if plan.hosted_error:
                outcome = outcome.model_copy(update={"error": "; ".join(filter(None, [plan.hosted_error,
                                                                                    outcome.error]))})
        checkpoint()
        out.speakers = clock.run("diarize", label_speakers, audio, segments, outcome, enrolled, plan.encoder,
                                    plan.threshold)
        out.diarization_job = outcome.job


def _unit_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters or {}
    audio = params.get("audio")
    return f"gpu-stages {getattr(audio, 'stem', '')}".strip()


@task(name="gpu-stages", cache_policy=NO_CACHE, persist_result=True, task_run_name=_unit_name)
def gpu_stages(audio: AudioRef, plan: GpuPlan) -> GpuOutcome:
    """One file's GPU work on a warm task worker: only the models this worker serves
    (``WORKER_MODELS``), stopped at its deadline or when its run is cancelled."""
    from prefect.context import TaskRunContext

    from flows.runguard import RunGuard
    from speech.asr.serving import check_served
    from speech.policy import request_from_others
    from tasks.progress import checkpointing
    from tasks.storage import task_result_storage

    plan = plan.model_copy(update={"transcribe": check_served(plan.transcribe)})
    ctx = TaskRunContext.get()
    guard = RunGuard(ctx.task_run.id if ctx else "local", plan.deadline or float("inf"), f"gpu-stages of {audio.stem}")
    with guard, checkpointing(guard.check), request_from_others() if plan.others else contextlib.nullcontext():
        return run_gpu_stages(audio, plan, StageClock(storage=task_result_storage()))
