"""The throughput path: a whole file as ONE background task on a warm task worker.

UI runs and the Python API get a flow run per file (:mod:`flows.transcribe`). For many files from
services, a flow run per file costs a process and seconds of orchestration each; the
RunPod-compatible endpoint (``--task-workers``) and sweeps (``via: task-workers``) instead hand
each file to :func:`transcribe_job`, which a task worker runs start to finish: fetch, the GPU
stages (its own models, no second hop), hosted APIs, outputs. Its task run is the job: its state
is the job's status, its persisted result the output, and it shows in the Prefect UI. Waiting on
it, and noticing a dead worker, is :mod:`flows.dispatch`'s.

The request comes from someone else, so it meets the request policy here
(:func:`speech.policy.admit`): tokens are refused (they would be stored with the task's
parameters; workers use their env vars and Secret blocks) and the model must be one this worker
serves.
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

JOB_TAG = "transcribe-job"


def _job_name() -> str:
    from prefect.runtime import task_run

    from speech.io.audio import stem_of

    request = (task_run.parameters or {}).get("request") or {}
    return f"transcribe-job {stem_of(str(request.get('audio_file') or ''))}"


def job_filter(*tags: str, states: tuple[str, ...] = ()) -> Any:
    """A task-run filter for the ``transcribe-job`` runs carrying ``tags`` (not their stage runs,
    which inherit the tags), in ``states`` when given."""
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterName, TaskRunFilterState,
                                                TaskRunFilterStateType, TaskRunFilterTags)

    return TaskRunFilter(tags=TaskRunFilterTags(all_=list(tags)), name=TaskRunFilterName(like_="transcribe-job"),
                         state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(states))) if states else None)


def check_job_request(request: dict[str, Any], serving: bool = False) -> Any:
    """The request as the worker will run it, or a :class:`speech.errors.SpeechError` saying why
    not: invalid, a plain token, outside the trust policy (:func:`speech.policy.admit`). Checked
    by the submitter too (``serving=False``: the models are the worker's business), so a bad job
    fails before it queues."""
    from speech.policy import admit

    return admit(request, stored=True, serving=serving)


@task(name="transcribe-job", cache_policy=NO_CACHE, persist_result=True, task_run_name=_job_name)
def transcribe_job(request: dict[str, Any]) -> dict[str, Any]:
    """One whole file on this task worker: ``{"result": the worker's JSON, "outputs": [where each
    file went]}``. Stopped at its deadline (scaled to the audio once fetched) or when cancelled."""
    from prefect.context import TaskRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.dispatch import run_deadline
    from flows.runguard import RunGuard
    from flows.pipeline import run_pipeline
    from speech.policy import request_from_others
    from tasks.progress import checkpointing

    from tasks.storage import job_outputs

    ctx = TaskRunContext.get()
    req = job_outputs(check_job_request(request, serving=True), str(ctx.task_run.id) if ctx else "local")
    guard = RunGuard(ctx.task_run.id if ctx else "local", run_deadline(0.0), f"transcribe-job of {req.audio_file}")

    def on_audio(audio: Any) -> None:  # the deadline, now that the audio's length is known
        guard.extend(run_deadline(audio.duration))

    # the guard outermost: the runner's exit waits for background stages (hosted APIs, uploads),
    # and the worker's watchdog must still see this run's deadline while it does
    with guard, ThreadPoolTaskRunner(max_workers=4) as runner, checkpointing(guard.check), request_from_others():
        out = run_pipeline(req, runner=runner, on_audio=on_audio)
    return {"result": out.result, "outputs": [ref.model_dump() for ref in out.outputs]}
