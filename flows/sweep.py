"""Sweep flow: trigger one transcription run per NEW audio file in a folder or S3 prefix.

Python:  ``from flows.sweep import sweep_inbox; sweep_inbox("inbox/", glob="*.wav")``

Each file gets an identity (sha256 of its bytes for local files, streamed; the ETag for S3
objects, no download) and a ledger key ``<target>:<pipeline version>:<identity>``.

"New" = no flow run carries that ledger key yet. The sweep asks the API once per sweep
(``read_flow_runs`` filtered by idempotency key, and by the per-file tag that batch runs
carry) and triggers only the rest, through ``run_deployment(..., idempotency_key=key,
timeout=0)``. The idempotency key also makes the trigger itself safe against a concurrent
sweep: Prefect returns the existing run instead of creating a second one, which the sweep
notices (the run is older than the trigger) and reports as ``already-done``.

A file whose runs all FAILED or CRASHED is triggered again by the next sweep, with the key
``<ledger key>:attempt-<n>``, until ``max_attempts`` runs have failed; after that it is reported
as failed (with the last run's state) until those runs are deleted. A cancelled run counts as
done: cancelling is deliberate; so does a completed batch run for all its files, including one
that failed inside it (listed in the batch run's table artifact).

Renaming or copying a file does not retrigger it (same bytes); changing its bytes or
bumping ``speech.__version__`` does. Unreadable/empty files and failed triggers are counted
as failed and listed in the sweep's table artifact; they never stop the sweep.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Literal, Optional
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

import speech
from flows.local_api import record_run_process
from speech.errors import InvalidRequest
from speech.schema import TranscriptionRequest, plain_secrets
from speech.io.inbox import Candidate, list_local, list_s3, local_identity
from tasks.common import artifact_key

RETRYABLE = {"FAILED", "CRASHED"}
TASK_WORKERS = "task-workers"  # the ledger's target for files sent to warm task workers


def _existing_runs(keys_to_candidates: dict[str, Candidate]) -> dict[str, list[Any]]:
    """Ledger key -> the flow runs that carry it (as idempotency key, or as the per-file tag that
    batch runs and retries carry) and the task-worker jobs tagged with it, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterIdempotencyKey,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterTags,
    )

    found: dict[str, dict[Any, Any]] = {}
    keys = list(keys_to_candidates)
    by_tag = {c.tag: k for k, c in keys_to_candidates.items()}

    def all_runs(client: Any, flow_run_filter: Any = None, task_run_filter: Any = None) -> list[Any]:
        out: list[Any] = []  # every page, not the API's first 200
        while True:
            if task_run_filter is not None:
                page = client.read_task_runs(task_run_filter=task_run_filter, limit=200, offset=len(out))
            else:
                page = client.read_flow_runs(flow_run_filter=flow_run_filter, limit=200, offset=len(out))
            out.extend(page)
            if len(page) < 200:
                return out

    with get_client(sync_client=True) as client:
        for i in range(0, len(keys), 200):
            chunk = keys[i:i + 200]
            for run in all_runs(client, FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=chunk))):
                found.setdefault(run.idempotency_key, {})[run.id] = run
            tags = [keys_to_candidates[k].tag for k in chunk]
            for run in (all_runs(client, FlowRunFilter(tags=FlowRunFilterTags(any_=tags)))
                        + all_runs(client, task_run_filter=TaskRunFilter(  # the jobs, not their stage runs
                            tags=TaskRunFilterTags(any_=tags), name=TaskRunFilterName(like_="transcribe-job")))):
                for t in run.tags:
                    if t in by_tag:
                        found.setdefault(by_tag[t], {})[run.id] = run
    return {k: sorted(runs.values(), key=lambda r: r.created, reverse=True) for k, runs in found.items()}


def _state_type(run: Any) -> Optional[str]:
    return run.state.type.value if run.state is not None else None


def _retry_unless_missing(task: Any, task_run: Any, state: Any) -> bool:
    """Retry API hiccups, not a deployment that does not exist."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__ != "ObjectNotFound"
    return False


@task(name="trigger-run", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=_retry_unless_missing,
      persist_result=False,
      task_run_name="trigger {idempotency_key}")
def trigger_run(target: str, parameters: dict[str, Any], idempotency_key: str, tags: list[str]) -> dict[str, Any]:
    """Create (not wait for) a run of ``target``; an existing run with the key comes back instead."""
    from prefect.deployments import run_deployment

    before = datetime.now(timezone.utc)
    run = run_deployment(name=target, parameters=parameters, idempotency_key=idempotency_key, timeout=0,
                         tags=tags)
    created = run.created
    existed = created is not None and created < before
    return {"flow_run_id": str(run.id), "existed": existed, "state": run.state.name if run.state else None}


def _no_secrets(request: dict[str, Any]) -> None:
    given = plain_secrets(request)
    if given:
        raise InvalidRequest(
            f"sweep request must not carry secrets ({', '.join(given)}): they would be stored in every triggered "
            "run's parameters; set them as env vars (HF_TOKEN, DEEPGRAM_API_KEY, PYANNOTE_API_KEY, AWS_*) or "
            "Secret/AwsCredentials blocks on the worker instead, or pass 'prefect-secret:<block name>'")


def _refuse_untrusted_source(source: str, request: dict[str, Any]) -> None:
    """A sweep started as a deployment run (UI, API, schedule) lists only folders under the
    ``ALLOW_LOCAL_PATHS`` roots, and its request meets the request policy
    (:func:`speech.policy.admit`); one run from Python by the machine's own user is not limited."""
    from prefect.runtime import deployment

    if not deployment.id:
        return
    from speech.policy import admit, check_source

    check_source(source)
    admit({**request, "audio_file": "https://example.com/placeholder.wav"}, stored=True, serving=False)


@flow(name="sweep-inbox", validate_parameters=True, log_prints=False)
def sweep_inbox(
    source: str,
    glob: str = "*",
    target: str = "transcribe-audio/transcribe-local",
    request: Optional[dict[str, Any]] = None,
    limit: int = 100,
    concurrency: int = 4,
    batch_size: int = 0,
    max_attempts: int = 3,
    via: Literal["deployment", "task-workers"] = "deployment",
) -> dict[str, int]:
    """Trigger one transcription run per new audio file in a folder or S3 prefix (each file once).

    Args:
        source: A local folder or s3://bucket/prefix to sweep.
        glob: Pattern on the file name (e.g. '*.wav'; '*' = every file).
        target: Deployment to trigger, 'flow-name/deployment-name' (a transcribe-batch deployment when batch_size > 0).
        request: Transcription settings for every run (transcribe-audio parameters except audio_file); no secrets.
        limit: Trigger at most this many new files per sweep; the rest wait for the next sweep.
        concurrency: Runs created at once.
        batch_size: 0 = one run per file; N > 0 = one transcribe-batch run per N files.
        max_attempts: Trigger a file again while fewer than this many of its runs have failed or crashed.
        via: deployment = one run of target per file (or batch); task-workers = one background job per file on
            warm task workers (no flow run per file: the throughput path; target and batch_size are not used),
            watched until done.
    """
    log = get_run_logger()
    record_run_process()
    request = {k: v for k, v in (request or {}).items() if k != "audio_file"}
    _no_secrets(request)
    TranscriptionRequest.parse({**request, "audio_file": "placeholder.wav"})  # a bad request fails the sweep, not N runs
    _refuse_untrusted_source(source, request)
    if limit < 0 or concurrency < 1 or batch_size < 0 or max_attempts < 1:
        raise InvalidRequest("limit and batch_size must be >= 0, concurrency and max_attempts >= 1")
    if via == "task-workers":
        if batch_size:
            raise InvalidRequest("via task-workers sends each file as one job: batch_size must be 0")
        target = TASK_WORKERS

    candidates = list_s3(source, glob) if source.startswith("s3://") else list_local(source, glob)
    log.info("sweep %s (%s): %d candidate file(s)", source, glob, len(candidates))
    keyed, copies = _identify(candidates, f"{target}:{speech.__version__}")
    try:
        existing = _existing_runs(keyed)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"cannot read existing flow runs from the Prefect API: {exc}") from exc
    new = _new_files(keyed, existing, max_attempts)
    if len(new) > limit:
        log.info("%d new file(s); triggering %d now (limit), the rest next sweep", len(new), limit)
        for c in new[limit:]:
            c.status = "deferred"
        new = new[:limit]
    if via == "task-workers":  # jobs an earlier sweep sent and no one watches now are watched too
        _dispatch_to_task_workers(new, request, [c for c in keyed.values() if c.detail.get("unfinished")])
    else:
        _trigger_all(_jobs(new, target, request, batch_size), target, concurrency)
    for copy, first in copies:
        copy.flow_run_id, copy.error = first.flow_run_id, first.error
        copy.status = "already-done" if first.status == "triggered" else first.status
        copy.detail["same_bytes_as"] = first.path
    return _report(candidates, source, glob, target)


def _identify(candidates: list[Candidate], key_prefix: str) -> tuple[dict[str, Candidate], list[tuple[Candidate, Candidate]]]:
    """Each file's identity and ledger key ``<target>:<version>:<identity>``; unreadable files
    fail. Same bytes under several names: one ledger key, one run; the copies follow the first."""
    keyed: dict[str, Candidate] = {}
    copies: list[tuple[Candidate, Candidate]] = []
    for c in candidates:
        if c.identity is None and c.error is None:
            try:
                c.identity = local_identity(c.path)
            except Exception as exc:  # noqa: BLE001 - unreadable/empty file: report, go on
                c.error = f"{type(exc).__name__}: {exc}"[:500]
        if c.error:
            c.status = "failed"
            continue
        c.key = f"{key_prefix}:{c.identity}"
        if c.key in keyed:
            copies.append((c, keyed[c.key]))
        else:
            keyed[c.key] = c
    return keyed, copies


def _new_files(keyed: dict[str, Candidate], existing: dict[str, list[Any]], max_attempts: int) -> list[Candidate]:
    """The files to trigger: no run yet, or only failed/crashed ones (fewer than ``max_attempts``)."""
    new: list[Candidate] = []
    for key, c in keyed.items():
        runs = existing.get(key, [])
        done = [r for r in runs if _state_type(r) not in RETRYABLE]
        if done:  # completed, or still scheduled / running: nothing to do
            c.status, c.flow_run_id = "already-done", str(done[0].id)
            c.detail["state"] = done[0].state.name if done[0].state else None
            c.detail["unfinished"] = done[0].state is not None and not done[0].state.is_final()
        elif len(runs) >= max_attempts:
            last = runs[0]
            c.status, c.flow_run_id = "failed", str(last.id)
            c.error = (f"{len(runs)} run(s) failed, the last {last.state.name}: "
                       f"{(last.state.message or '').strip()}"[:400] + "; delete them to retry")
        else:
            c.detail["attempt"] = len(runs) + 1
            new.append(c)
    return new


def _jobs(new: list[Candidate], target: str, request: dict[str, Any],
          batch_size: int) -> list[tuple[list[Candidate], dict[str, Any], str]]:
    """One job = one run: a single file, or a chunk of files for a batch deployment; with its
    parameters and idempotency key."""
    if batch_size <= 0:
        return [([c], {**request, "audio_file": c.path},
                 c.key if c.detail["attempt"] == 1 else f"{c.key}:attempt-{c.detail['attempt']}") for c in new]
    jobs = []
    for i in range(0, len(new), batch_size):
        chunk = new[i:i + batch_size]
        digest = hashlib.sha256("\n".join(sorted(f"{c.key}#{c.detail['attempt']}" for c in chunk)).encode())
        jobs.append((chunk, {"audio_files": [c.path for c in chunk], "request": request},
                     f"{target}:{speech.__version__}:batch-{digest.hexdigest()}"))
    return jobs


def _trigger_all(jobs: list[tuple[list[Candidate], dict[str, Any], str]], target: str, concurrency: int) -> None:
    """Create the runs, ``concurrency`` at a time; a failed trigger is reported, the sweep goes on."""
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        futures = [
            (chunk, runner.submit(trigger_run, {"target": target, "parameters": params, "idempotency_key": key,
                                                "tags": ["sweep"] + [c.tag for c in chunk]}))
            for chunk, params, key in jobs
        ]
        for chunk, future in futures:
            try:
                out = future.result()
            except Exception as exc:  # noqa: BLE001
                for c in chunk:
                    c.status, c.error = "failed", f"trigger failed: {type(exc).__name__}: {exc}"[:500]
                continue
            for c in chunk:
                c.status = "already-done" if out["existed"] else "triggered"
                c.flow_run_id = out["flow_run_id"]


def _dispatch_to_task_workers(new: list[Candidate], request: dict[str, Any],
                              unfinished: Optional[list[Candidate]] = None) -> None:
    """Each new file as one ``transcribe-job`` on warm task workers (tagged with its ledger tag),
    then watched until every one has finished (:mod:`flows.dispatch`: a job whose worker dies
    runs again elsewhere; none is left Running). ``unfinished``: files whose job an earlier sweep
    sent and which is not final yet: watched too (that sweep may have died with their worker; a
    job no one watches would never fail, and its file would never be swept again). Only one
    sweep of a source should run at a time (the deployment's concurrency limit): task runs have
    no idempotency key."""
    from flows.dispatch import delay, follow
    from flows.jobs import JOB_TAG, check_job_request, transcribe_job
    from speech.errors import SpeechError
    from tasks.storage import task_result_storage

    storage = task_result_storage()
    if storage is None:
        raise InvalidRequest("via task-workers needs the result storage the task workers use: set RESULTS_STORAGE "
                             "or RESULTS_STORAGE_BLOCK")
    sent = {}
    for c in new:
        try:
            check_job_request({**request, "audio_file": c.path})
        except SpeechError as exc:  # outside the policy: this file, not the sweep
            c.status, c.error = "failed", str(exc)[:500]
            continue
        future = delay(transcribe_job.with_options(result_storage=storage), {**request, "audio_file": c.path},
                       tags=("sweep", JOB_TAG, c.tag))
        c.status, c.flow_run_id = "triggered", str(future.task_run_id)
        c.detail["sent"] = True
        sent[future.task_run_id] = c
    watched = {UUID(c.flow_run_id): c for c in unfinished or []}
    get_run_logger().info("sent %d file(s) to task workers; watching them%s", len(sent),
                          f" and {len(watched)} sent before, not finished" if watched else "")
    for task_run_id, state in follow([*sent, *watched], transcribe_job.task_key, storage).items():
        c = sent.get(task_run_id) or watched[task_run_id]
        c.detail["state"] = state.name
        if state.is_completed():
            c.status = "done"
        else:
            c.status, c.error = "failed", f"{state.name}: {(state.message or '').strip()}"[:500]


def _report(candidates: list[Candidate], source: str, glob: str, target: str) -> dict[str, int]:
    """The sweep's table artifact and counts."""
    log = get_run_logger()
    counts = {
        "triggered": sum(c.status == "triggered" or bool(c.detail.get("sent")) for c in candidates),
        "skipped": sum(c.status == "already-done" for c in candidates),
        "failed": sum(c.status == "failed" for c in candidates),
        "deferred": sum(c.status == "deferred" for c in candidates),
    }
    if target == TASK_WORKERS:  # watched until done: how many finished well
        counts["done"] = sum(c.status == "done" for c in candidates)
    create_table_artifact(
        key=artifact_key(f"sweep-{stem_key(source)}"),
        table=[{"file": c.path, "identity": c.identity, "status": c.status, "attempt": c.detail.get("attempt"),
                "flow_run_id": c.flow_run_id, "error": c.error} for c in candidates],
        description=(f"Sweep of {source} ({glob}) -> {target}: {counts['triggered']} triggered"
                     + (f" ({counts['done']} done), " if "done" in counts else ", ") +
                     f"{counts['skipped']} already done, {counts['failed']} failed, {counts['deferred']} deferred"),
    )
    for c in candidates:
        if c.status == "failed":
            log.warning("sweep: %s failed: %s", c.path, c.error)
    log.info("sweep: %s", counts)
    return counts


def stem_key(source: str) -> str:
    return source.rstrip("/").replace("s3://", "s3-")[-40:]
