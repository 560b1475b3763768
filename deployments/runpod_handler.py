"""RunPod's serverless handler signature around this pipeline, for people who keep running on
RunPod but want the Prefect DAG inside:

    python deployments/runpod_handler.py          # runpod.serverless.start({"handler": handler})

``handler({"id": ..., "input": {...}})`` takes the original worker's job, runs one
``transcribe-audio`` flow run (in-process; the Prefect API from ``PREFECT_API_URL``, else a
throw-away one) and returns what the original handler returned: the worker's JSON result
(``segments``, ``detected_language``, ``language_probability``, ...), plus, when the outputs
went to a bucket, ``transcript_key`` / ``transcript_url`` and ``segments_key`` / ``segments_url``
(presigned GET URLs, ``URL_EXPIRY`` / ``PRESIGN_TTL`` seconds). A failure is
``{"error": "<one line>"}``, as the worker answered, never a traceback; no token appears in it.
The ``runpod`` package is only needed to serve (``pip install runpod==1.10.*``).
"""
from __future__ import annotations

from typing import Any, Optional



def handler(job: dict[str, Any], flow_run_name: Optional[str] = None) -> dict[str, Any]:
    """One RunPod job through the transcribe flow; the worker's output or ``{"error": ...}``.
    ``flow_run_name`` names the flow run (the HTTP endpoint passes the job id)."""
    from speech.errors import SpeechError
    import uuid

    from speech.policy import admit
    from speech.redact import scrub_configured
    from tasks.storage import job_outputs

    try:
        # a job comes from someone else: the request policy (local paths only under ALLOW_LOCAL_PATHS,
        # no caller-chosen endpoints or code); a long-lived process serving many callers (RunPod's
        # warm worker, the in-process endpoint) runs the model it serves (WORKER_MODELS); its
        # outputs go under <prefix><stem>/<job id>/ unless it names an output_name
        req = job_outputs(admit(job), str(job.get("id") or flow_run_name or uuid.uuid4()))
    except SpeechError as exc:
        return {"error": scrub_configured(str(exc))}
    from flows.cli import flow_kwargs
    from flows.transcribe import transcribe_audio
    from speech.policy import request_from_others
    from tasks.progress import RunListener, listening

    refs: list[Any] = []
    try:
        # the files the run opens are checked again as opened (a path swapped for a link since)
        with listening(RunListener(on_outputs=lambda written, _where: refs.extend(written))), request_from_others():
            flow = transcribe_audio.with_options(flow_run_name=flow_run_name) if flow_run_name else transcribe_audio
            result = flow(**flow_kwargs(req))
    except SpeechError as exc:
        return {"error": scrub_configured(str(exc))}
    except Exception as exc:  # noqa: BLE001 - the worker answered every failure with one line
        return {"error": f"{type(exc).__name__}: {scrub_configured(str(exc))}"}
    return {**result, **_bucket_keys(req, refs)}


def _bucket_keys(req: Any, refs: list[Any]) -> dict[str, str]:
    """``transcript_key/url`` and ``segments_key/url`` for outputs written to a bucket."""
    from tasks.outputs import bucket_keys

    return bucket_keys(refs, _results_store(req))


def stored_bucket_keys(req: Any, run_id: str) -> dict[str, str]:
    """The same keys for a deployment run ``run_id`` that wrote elsewhere (its worker):
    ``<stem>.json`` and ``<stem>.segments.json`` where that run put them
    (:func:`speech.policy.job_scoped`), those that exist."""
    from speech.io.audio import stem_of
    from speech.io.store import S3Store
    from tasks.outputs import keys_and_urls
    from tasks.storage import job_outputs

    req = job_outputs(req, run_id)
    store = _results_store(req)
    if not isinstance(store, S3Store):
        return {}
    stem = req.output_name or stem_of(req.audio_file)
    uris = {}
    for kind, name in (("transcript", f"{stem}.json"), ("segments", f"{stem}.segments.json")):
        try:
            store.client.head_object(Bucket=store.bucket, Key=store.prefix + name)
        except Exception:  # noqa: BLE001 - not written (output_format) or not readable: no key
            continue
        uris[kind] = f"s3://{store.bucket}/{store.prefix}{name}"
    return keys_and_urls(store, uris)


def _results_store(req: Any) -> Any:
    from speech.io.store import OutputTarget
    from tasks.storage import results_store

    return results_store(OutputTarget.from_request(req))


def serve() -> None:
    """``whisperx-prefect-handler``: RunPod's serverless loop around :func:`handler`."""
    try:
        import runpod  # runpod==1.10.* (1.11+ needs a newer fastapi than Prefect 3.8.8's)
    except ImportError:
        raise SystemExit("error: the runpod package is not installed: pip install 'runpod==1.10.*'") from None
    from flows.local_api import mark_abandoned_runs_quietly

    mark_abandoned_runs_quietly()  # runs a killed worker on this machine left Running: Crashed
    from flows.runguard import fail_stuck_flow_runs, start_watchdog

    start_watchdog(before_exit=fail_stuck_flow_runs)  # a job stuck in a stage that never returns ends the worker
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    serve()
