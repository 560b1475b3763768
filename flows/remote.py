"""The command line's remote mode, for users of the pipeline script's ``--endpoint/--api-key/--sync``:
the request runs elsewhere and the same output files are written here.

``--endpoint URL_OR_ID`` sends it to a RunPod-compatible endpoint (RunPod's, or this project's
``whisperx-prefect-endpoint``) with the ``runpod`` SDK's client: ``/runsync`` with ``--sync``, else ``/run``
and then ``/status`` until the job ends. ``--deployment NAME`` runs a Prefect deployment
(``run_deployment``) and reads the run's result. Either way the result is rendered by
:func:`speech.output.formats.render` into ``--download-dir`` (all files or none), as a local run.

Local files (the audio, speaker samples) cannot be read by the remote side. With a bucket
(``--bucket`` / RESULTS_BUCKET) they are uploaded (skipped when the same content is there) and sent
as a presigned URL to an endpoint, as the pipeline script did, or as an ``s3://`` URI to a deployment
(whose workers read it with their own credentials; a presigned URL would be stored in the run's
parameters). Without a bucket an endpoint gets no local file (refused here); a deployment gets the
absolute path, which its workers read only under their ``ALLOW_LOCAL_PATHS`` roots.

Every wait has a deadline (``--remote-timeout``); at the deadline or on Ctrl-C the remote job is
cancelled. The key never reaches a log or an error message (it is one of the scrubbed secrets).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from speech.errors import InvalidRequest, SpeechError, StorageError

RUNPOD_API = "https://api.runpod.ai/v2"
# request fields that act on this side: where the outputs go here, and how local files are uploaded
LOCAL_ONLY = ("download_dir", "download_transcript", "upload", "access_key", "secret_key", "s3_endpoint",
              "prefix_audio", "url_expiry")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class RemoteFailed(SpeechError):
    """The remote job ended without a result (its own error, a cancel), or could not be sent."""


class RemoteTimeout(RemoteFailed):
    """The remote job outlived ``--remote-timeout`` (it has been cancelled)."""


def endpoint_address(value: str) -> tuple[str, str]:
    """``abc123`` -> (RunPod's API, ``abc123``); ``http://host:8000/v2/whisperx`` -> (``http://host:8000/v2``,
    ``whisperx``); a trailing ``/run`` or ``/runsync`` is dropped."""
    text = re.sub(r"/(run|runsync)/?$", "", value.strip()).rstrip("/")
    if "://" not in text:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise InvalidRequest(f"--endpoint {value!r}: give a RunPod endpoint id or the endpoint's URL (…/v2/ID)")
        return RUNPOD_API, text
    parts = urlsplit(text)
    base, _, endpoint_id = text.rpartition("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or "/" not in parts.path or not endpoint_id:
        raise InvalidRequest(f"--endpoint {value!r}: give the endpoint's http(s) URL including its id, e.g. "
                             "http://127.0.0.1:8000/v2/whisperx or https://api.runpod.ai/v2/ID")
    return base, endpoint_id


def _is_local(source: str) -> bool:
    return urlsplit(source).scheme not in ("http", "https", "s3")


def _local_path(source: str) -> Path:
    return Path(source[7:] if source.startswith("file://") else source).expanduser().resolve()


def remote_payload(data: dict[str, Any], req: Any, to_deployment: bool, note: Callable[[str], None]) -> dict[str, Any]:
    """The request as the remote side gets it: the fields given here, less :data:`LOCAL_ONLY`, with
    every local file uploaded (a bucket) or, for a deployment, made absolute."""
    from speech.settings import get_settings

    settings = get_settings()
    payload = {k: v for k, v in data.items() if k not in LOCAL_ONLY}
    bucket = req.bucket or settings.s3_bucket
    cache: dict[Path, str] = {}

    def send(source: str, what: str) -> str:
        if not _is_local(source):
            return source
        path = _local_path(source)
        if not path.is_file():
            raise InvalidRequest(f"{what}: file not found: {path}")
        if path in cache:
            return cache[path]
        if not bucket:
            if not to_deployment:
                raise InvalidRequest(f"{what}: {path} is on this machine and the endpoint cannot read it; give --bucket "
                                     "(it is uploaded and sent as a presigned URL, as the pipeline script did) or a URL")
            cache[path] = str(path)  # the deployment's workers read it under their ALLOW_LOCAL_PATHS roots
            return cache[path]
        cache[path] = _upload(path, bucket, req, settings, to_deployment, note)
        return cache[path]

    payload["audio_file"] = send(req.audio_file, "audio_file")
    if req.speaker_samples:
        payload["speaker_samples"] = [{**({"name": s.name} if s.name else {}), "url": send(s.url, "speaker sample")}
                                      for s in req.speaker_samples]
    return payload


def _upload(path: Path, bucket: str, req: Any, settings: Any, as_uri: bool, note: Callable[[str], None]) -> str:
    from speech.io.fetch import fetch
    from speech.io.s3 import s3_client_for
    from speech.io.upload import upload_audio
    from speech.schema import S3Options

    done = upload_audio(str(path), fetch(str(path)).sha256, bucket=bucket, prefix_audio=req.prefix_audio or settings.prefix_audio,
                        force=req.force, url_expiry=req.url_expiry, client=s3_client_for(S3Options.from_request(req)))
    note(f"{'uploaded' if done.uploaded else 'already in the bucket'}: {path.name} -> {done.uri}")
    return done.uri if as_uri else done.presigned_url


def run_endpoint(address: str, api_key: Optional[str], payload: dict[str, Any], sync: bool, timeout: float,
                 show: Callable[[str], None]) -> dict[str, Any]:
    """The job's output from a RunPod-compatible endpoint, or :class:`RemoteFailed` with its error.

    The ``runpod`` SDK's client makes the requests; the waiting is ours because the SDK's own
    (``Job.output``, ``run_sync``) drops a failed job's ``error``."""
    import requests
    import runpod

    base, endpoint_id = endpoint_address(address)
    host = (urlsplit(base).hostname or "").lower()
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        raise InvalidRequest("--endpoint needs a key: --api-key or RUNPOD_API_KEY (the pipeline script's "
                             "SWAMI_RUNPOD_API_KEY works too)")
    ep = runpod.Endpoint(endpoint_id, api_key=api_key or "no-key")  # a keyless loopback endpoint ignores it
    client = ep.rp_client
    client.endpoint_url_base = base
    deadline = time.monotonic() + timeout
    job_id: Optional[str] = None
    try:
        try:
            if sync:
                body = client.post(f"{endpoint_id}/runsync", {"input": payload}, timeout=max(1, int(timeout)))
            else:
                body = client.post(f"{endpoint_id}/run", {"input": payload}, timeout=60)
            job_id = body.get("id")
            delay = 1.0
            while body.get("status") not in FINAL:
                show(f"remote job {job_id}: {body.get('status', '?')}")
                if time.monotonic() + delay > deadline:
                    raise RemoteTimeout(f"the remote job {job_id} did not finish within {timeout:.0f} s "
                                           "(--remote-timeout); it was cancelled")
                time.sleep(delay)
                delay = min(5.0, delay * 1.5)
                body = client.get(f"{endpoint_id}/status/{job_id}", timeout=30)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RemoteFailed(f"cannot reach the endpoint {base}/{endpoint_id}: {type(exc).__name__}") from None
        except requests.HTTPError as exc:
            raise RemoteFailed(f"the endpoint answered {_http_error(exc)}") from None
        except RuntimeError as exc:  # the SDK's 401 message
            raise RemoteFailed(f"the endpoint refused the key: {exc}") from None
    except (KeyboardInterrupt, RemoteTimeout):
        if job_id:
            _quietly(lambda: client.post(f"{endpoint_id}/cancel/{job_id}", None, timeout=10))
        raise
    if body["status"] != "COMPLETED" or not isinstance(body.get("output"), dict):
        raise RemoteFailed(f"remote job {job_id} {body['status']}: {body.get('error') or 'no output'}")
    return body["output"]


def _http_error(exc: Any) -> str:
    reply = exc.response
    try:
        detail = reply.json().get("error") or reply.json().get("detail")
    except Exception:  # noqa: BLE001 - not JSON
        detail = reply.text[:300]
    return f"HTTP {reply.status_code}: {detail}"


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - best effort: the command is ending anyway
        pass


def run_deployment_remote(name: str, payload: dict[str, Any], timeout: float,
                          show: Callable[[str], None]) -> dict[str, Any]:
    """The result of a run of Prefect deployment ``name`` with ``payload`` as its parameters."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import FlowRunWaitTimeout, wait_for_flow_run
    from prefect.states import Cancelling
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.runtime import failure_message
    from speech.policy import check_storable
    from speech.schema import TranscriptionRequest

    check_storable(TranscriptionRequest.parse(payload), payload)  # parameters are stored: no token, no signed URL
    try:
        run = run_deployment(name, parameters=payload, timeout=0)
    except ObjectNotFound:
        raise InvalidRequest(f"--deployment {name!r}: no such deployment on this Prefect API "
                             "(names are 'flow-name/deployment-name'; see `prefect deployment ls`)") from None
    show(f"flow run {run.name} ({run.id}) of {name}")
    try:
        run = run_coro_as_sync(wait_for_flow_run(run.id, timeout=max(1, int(timeout)), log_states=False))
    except (KeyboardInterrupt, FlowRunWaitTimeout) as exc:
        with get_client(sync_client=True) as client:
            _quietly(lambda: client.set_flow_run_state(run.id, Cancelling(), force=True))
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RemoteTimeout(f"flow run {run.name} did not finish within {timeout:.0f} s (--remote-timeout); it "
                               "was cancelled") from None
    if not run.state.is_completed():
        raise RemoteFailed(f"flow run {run.name} {run.state.name}: {failure_message(run.state)}")
    try:
        result = run.state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - result storage this machine cannot read
        raise StorageError(f"flow run {run.name} completed but its result cannot be read here ({type(exc).__name__}: "
                           f"{exc}); give the workers and this machine one RESULTS_STORAGE / RESULTS_STORAGE_BLOCK") from None
    if not isinstance(result, dict):
        raise RemoteFailed(f"flow run {run.name} completed without the worker's result ({type(result).__name__})")
    return result


def write_locally(output: dict[str, Any], req: Any) -> list[Any]:
    """The remote result as this machine's output files (``<download_dir>/<stem>.*``)."""
    from speech.io.audio import stem_of
    from speech.io.store import local_store
    from speech.output.formats import render
    from speech.schema import OutputOptions, TranscriptionResult

    result = TranscriptionResult.model_validate({k: v for k, v in output.items() if k in TranscriptionResult.model_fields})
    files = render(result, req.output_name or stem_of(req.audio_file), options=OutputOptions.from_request(req))
    return local_store(req.download_dir).write(files)


def run_remote(args: Any, data: dict[str, Any], req: Any, console: Any) -> tuple[dict[str, Any], list[Any]]:
    """One file through ``--endpoint`` or ``--deployment``: (the result, this machine's output refs)."""
    from speech.settings import get_settings

    with console.status("sending the request") as status:
        def show(text: str) -> None:
            status.update(text)

        payload = remote_payload(data, req, bool(args.deployment), lambda line: console.print(line))
        if args.deployment:
            output = run_deployment_remote(args.deployment, payload, args.remote_timeout, show)
        else:
            key = args.api_key or get_settings().runpod_api_key
            key = key.get_secret_value() if hasattr(key, "get_secret_value") else key
            output = run_endpoint(args.endpoint, key, payload, args.sync, args.remote_timeout, show)
        return output, write_locally(output, req)
