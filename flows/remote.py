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

Several files run as that many remote jobs, up to ``--remote-jobs`` at once (default 4: a pool of
workers or an autoscaled endpoint serves them side by side); each is reported, in the order given,
as it ends. Two files with one name (``a/call.wav``, ``b/call.wav``) are uploaded and written as
``call-<8 hex>``, so neither job can read, nor either output overwrite, the other's.

Every wait has a deadline (``--remote-timeout``, counted from the job's submission, its time in
the remote queue included); at the deadline the job is cancelled, and Ctrl-C cancels every job in
flight and sends no more. The key never reaches a log or an error message (it is one of the
scrubbed secrets).
"""
from __future__ import annotations

import contextvars
import queue
import re
import threading
import time
from concurrent.futures import Future
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


class InFlight:
    """The remote jobs this command has started and not yet seen end, each with the call that cancels
    it: Ctrl-C cancels them all (:meth:`cancel_all`), and a waiting job gives up at once."""

    def __init__(self, announce: Callable[[str], None] = lambda line: None):
        self.stopped = threading.Event()
        self.note = announce
        self._lock = threading.Lock()
        self._cancels: dict[str, Callable[[], Any]] = {}

    def started(self, what: str, job_id: str, cancel: Callable[[], Any]) -> None:
        with self._lock:
            self._cancels[job_id] = cancel
        self.note(f"{what}: remote job {job_id}")

    def ended(self, job_id: Optional[str]) -> None:
        with self._lock:
            self._cancels.pop(job_id or "", None)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``; :class:`RemoteFailed` at once when the command is being stopped."""
        if self.stopped.wait(seconds):
            raise RemoteFailed("interrupted: the remote job was cancelled")

    def cancel_all(self) -> list[str]:
        """Cancel every job in flight (best effort); the ids cancelled."""
        self.stopped.set()
        with self._lock:
            calls, self._cancels = list(self._cancels.items()), {}
        for _, call in calls:
            _quietly(call)
        return [job_id for job_id, _ in calls]


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


def remote_payload(data: dict[str, Any], req: Any, to_deployment: bool, note: Callable[[str], None],
                   audio_name: Optional[str] = None, samples: Optional[list[dict[str, str]]] = None) -> dict[str, Any]:
    """The request as the remote side gets it: the fields given here, less :data:`LOCAL_ONLY`, with
    every local file uploaded (a bucket; the audio as ``audio_name`` when given) or, for a deployment,
    made absolute. ``samples``: the speaker samples as :func:`sample_payload` sent them already."""
    payload = {k: v for k, v in data.items() if k not in LOCAL_ONLY}
    sha256 = None
    if _is_local(req.audio_file) and _local_path(req.audio_file).is_file():
        from speech.io.fetch import fetch

        sha256 = fetch(str(_local_path(req.audio_file))).sha256
        # the job fails, rather than transcribing someone else's file, if the object is replaced before it is read
        payload["audio_sha256"] = payload.get("audio_sha256") or sha256
    payload["audio_file"] = _send(req.audio_file, "audio_file", req, to_deployment, note, audio_name, sha256)
    if req.speaker_samples:
        payload["speaker_samples"] = samples if samples is not None else sample_payload(req, to_deployment, note)
    return payload


def sample_payload(req: Any, to_deployment: bool, note: Callable[[str], None]) -> list[dict[str, str]]:
    """The request's speaker samples as the remote side gets them (each local clip sent once)."""
    sent: dict[str, str] = {}
    for s in req.speaker_samples or []:
        if s.url not in sent:
            sent[s.url] = _send(s.url, "speaker sample", req, to_deployment, note)
    return [{**({"name": s.name} if s.name else {}), "url": sent[s.url]} for s in req.speaker_samples or []]


def _send(source: str, what: str, req: Any, to_deployment: bool, note: Callable[[str], None],
          name: Optional[str] = None, sha256: Optional[str] = None) -> str:
    """A source as the remote side can read it: a URL or S3 URI as given; a local file uploaded to the
    bucket (a presigned URL for an endpoint, the ``s3://`` URI for a deployment), or without a bucket
    its absolute path (deployments only)."""
    from speech.settings import get_settings

    if not _is_local(source):
        return source
    path = _local_path(source)
    if not path.is_file():
        raise InvalidRequest(f"{what}: file not found: {path}")
    settings = get_settings()
    bucket = req.bucket or settings.s3_bucket
    if not bucket:
        if not to_deployment:
            raise InvalidRequest(f"{what}: {path} is on this machine and the endpoint cannot read it; give --bucket "
                                 "(it is uploaded and sent as a presigned URL, as the pipeline script did) or a URL")
        return str(path)  # the deployment's workers read it under their ALLOW_LOCAL_PATHS roots
    return _upload(path, bucket, req, settings, to_deployment, note, name, sha256)


def _upload(path: Path, bucket: str, req: Any, settings: Any, as_uri: bool, note: Callable[[str], None],
            name: Optional[str] = None, sha256: Optional[str] = None) -> str:
    from speech.io.fetch import fetch
    from speech.io.s3 import s3_client_for
    from speech.io.upload import upload_audio
    from speech.contracts import S3Options

    done = upload_audio(str(path), sha256 or fetch(str(path)).sha256, bucket=bucket, prefix_audio=req.prefix_audio or settings.prefix_audio,
                        name=name, force=req.force, url_expiry=req.url_expiry,
                        client=s3_client_for(S3Options.from_request(req)))
    note(f"{'uploaded' if done.uploaded else 'already in the bucket'}: {path.name} -> {done.uri}")
    return done.uri if as_uri else done.presigned_url


def run_endpoint(address: str, api_key: Optional[str], payload: dict[str, Any], sync: bool, timeout: float,
                 show: Callable[[str], None], jobs: Optional[InFlight] = None, what: str = "") -> dict[str, Any]:
    """The job's output from a RunPod-compatible endpoint, or :class:`RemoteFailed` with its error.
    A job still running is registered with ``jobs`` (as ``what``) until it ends, so the command can
    cancel it.

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
            body = _submit(client, endpoint_id, payload, sync, deadline, show, jobs)
            job_id = body.get("id")
            if jobs and job_id and body.get("status") not in FINAL:
                jobs.started(what, job_id, lambda: client.post(f"{endpoint_id}/cancel/{job_id}", None, timeout=10))
            delay = 1.0
            while body.get("status") not in FINAL:
                show(f"remote job {job_id}: {body.get('status', '?')}")
                if time.monotonic() + delay > deadline:
                    raise RemoteTimeout(f"the remote job {job_id} did not finish within {timeout:.0f} s "
                                           "(--remote-timeout); it was cancelled")
                jobs.wait(delay) if jobs else time.sleep(delay)
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
    finally:
        if jobs:
            jobs.ended(job_id)
    if body["status"] != "COMPLETED" or not isinstance(body.get("output"), dict):
        raise RemoteFailed(f"remote job {job_id} {body['status']}: {body.get('error') or 'no output'}")
    return body["output"]


def _submit(client: Any, endpoint_id: str, payload: dict[str, Any], sync: bool, deadline: float,
            show: Callable[[str], None], jobs: Optional[InFlight]) -> dict[str, Any]:
    """POST the job; while the endpoint answers 429 (its queue is full), wait as its ``Retry-After``
    says and send it again, until the deadline."""
    import requests

    while True:
        try:
            if sync:
                left = max(1, int(deadline - time.monotonic()))
                return client.post(f"{endpoint_id}/runsync", {"input": payload}, timeout=left)
            return client.post(f"{endpoint_id}/run", {"input": payload}, timeout=60)
        except requests.HTTPError as exc:
            reply = exc.response
            if reply is None or reply.status_code != 429:
                raise
            try:
                pause = min(60.0, max(1.0, float(reply.headers.get("Retry-After", 5))))
            except ValueError:
                pause = 5.0
            if time.monotonic() + pause > deadline:
                raise RemoteFailed(f"the endpoint's queue stayed full until --remote-timeout: {_http_error(exc)}") \
                    from None
            show(f"the endpoint's queue is full; sending again in {pause:.0f} s")
            # the server may close this idle connection while we wait, and a POST on a connection
            # closed under it is not retried: the next try opens a new one
            client.rp_session.close()
            jobs.wait(pause) if jobs else time.sleep(pause)


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


def run_deployment_remote(name: str, payload: dict[str, Any], timeout: float, show: Callable[[str], None],
                          jobs: Optional[InFlight] = None, what: str = "") -> dict[str, Any]:
    """The result of a run of Prefect deployment ``name`` with ``payload`` as its parameters (the run
    registered with ``jobs``, as ``what``, until it ends)."""
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

    def cancel(run_id: Any = run.id) -> None:
        with get_client(sync_client=True) as client:
            _quietly(lambda: client.set_flow_run_state(run_id, Cancelling(), force=True))

    key = f"{run.id} (flow run {run.name})"
    if jobs:
        jobs.started(what, key, cancel)
    try:
        run = run_coro_as_sync(wait_for_flow_run(run.id, timeout=max(1, int(timeout)), log_states=False))
    except (KeyboardInterrupt, FlowRunWaitTimeout) as exc:
        cancel()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RemoteTimeout(f"flow run {run.name} did not finish within {timeout:.0f} s (--remote-timeout); it "
                               "was cancelled") from None
    finally:
        if jobs:
            jobs.ended(key)
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
    from speech.contracts import OutputOptions, TranscriptionResult

    result = TranscriptionResult.model_validate({k: v for k, v in output.items() if k in TranscriptionResult.model_fields})
    files = render(result, req.output_name or stem_of(req.audio_file), options=OutputOptions.from_request(req))
    return local_store(req.download_dir).write(files)


def run_remote(args: Any, data: dict[str, Any], req: Any, show: Callable[[str], None], note: Callable[[str], None],
               jobs: Optional[InFlight] = None, audio_name: Optional[str] = None,
               samples: Optional[list[dict[str, str]]] = None) -> tuple[dict[str, Any], list[Any]]:
    """One file through ``--endpoint`` or ``--deployment``: (the result, this machine's output refs)."""
    from speech.settings import get_settings

    what = Path(req.audio_file).name if _is_local(req.audio_file) else req.audio_file
    payload = remote_payload(data, req, bool(args.deployment), note, audio_name, samples)
    if args.deployment:
        output = run_deployment_remote(args.deployment, payload, args.remote_timeout, show, jobs, what)
    else:
        key = args.api_key or get_settings().runpod_api_key
        key = key.get_secret_value() if hasattr(key, "get_secret_value") else key
        output = run_endpoint(args.endpoint, key, payload, args.sync, args.remote_timeout, show, jobs, what)
    return output, write_locally(output, req)


def run_files(args: Any, data: dict[str, Any], req: Any, files: list[str], console: Any,
              report: Callable[[dict[str, Any], list[Any], float], None]) -> int:
    """Every file through ``--endpoint`` / ``--deployment``, up to ``args.remote_jobs`` at once, each
    reported (``report(result, outputs, started)``) in the order given. Exit status: 0, else 1 when a
    remote job failed or 2 for a refused request (the first failure's), 130 on Ctrl-C (every job in
    flight cancelled)."""
    from rich.markup import escape

    from speech.errors import SpeechError
    from speech.io.audio import distinct_output_names
    from speech.redact import scrub_configured

    names = distinct_output_names(files)
    futures: list[Future] = [Future() for _ in files]
    jobs = InFlight(lambda line: console.print(line, markup=False))  # a file's name is not markup
    status = console.status("sending the request")
    shown: dict[int, str] = {}
    lock = threading.Lock()

    def show(i: int, text: Optional[str]) -> None:
        """File i's state on the status line (None: it ended); with several files, the first three."""
        with lock:
            shown.pop(i, None) if text is None else shown.__setitem__(i, text)
            if len(files) == 1:
                line = shown.get(0, "")
            else:  # "remote job ID: IN_QUEUE" -> "a.wav: IN_QUEUE"
                line = "; ".join(f"{Path(files[j]).name}: {shown[j].rsplit(': ', 1)[-1][:40]}" for j in sorted(shown)[:3])
                line += f"; {len(shown) - 3} more" if len(shown) > 3 else ""
            status.update(escape(line) or f"{sum(f.done() for f in futures)} of {len(files)} done")

    def one(i: int) -> None:
        started = time.perf_counter()
        audio_file, name = files[i], names[i]
        update = {"audio_file": audio_file, **({"output_name": name} if name else {})}
        audio_name = f"{name}{Path(_local_path(audio_file)).suffix}" if name and _is_local(audio_file) else None
        try:  # the name is for the local outputs: the remote job's own are its job id's anyway (and an
            # endpoint with a key per caller refuses output_name, whose shared keys another could replace)
            result = run_remote(args, {**data, "audio_file": audio_file}, req.model_copy(update=update),
                                lambda text: show(i, text),
                                jobs.note, jobs, audio_name, samples)
            futures[i].set_result((*result, started))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            futures[i].set_exception(exc)
        finally:
            show(i, None)

    pending: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    for i in range(len(files)):
        pending.put(i)

    def lane() -> None:
        while not jobs.stopped.is_set():
            try:
                i = pending.get_nowait()
            except queue.Empty:
                return
            one(i)

    code = 0
    status.start()
    try:
        try:  # the speaker samples go up once, for every file
            samples = sample_payload(req, bool(args.deployment), jobs.note) if req.speaker_samples else None
        except SpeechError as exc:
            console.print(f"[red]error:[/red] {escape(scrub_configured(str(exc)))}")
            return 2
        for _ in range(min(args.remote_jobs, len(files))):  # daemon: an interrupted command does not wait
            threading.Thread(target=contextvars.copy_context().run, args=(lane,), daemon=True).start()
        for i, future in enumerate(futures):
            try:
                output, outputs, started = future.result()
            except SpeechError as exc:
                console.print(f"[red]error:[/red] {escape(files[i])}: {escape(scrub_configured(str(exc)))}")
                code = code or (1 if isinstance(exc, RemoteFailed) else 2)
                continue
            status.stop()
            report(output, outputs, started)
            if i + 1 < len(files):
                status.start()
    except KeyboardInterrupt:
        status.stop()
        cancelled = jobs.cancel_all()
        console.print(f"[red]interrupted[/red] ({len(cancelled)} remote job{'' if len(cancelled) == 1 else 's'} "
                      "cancelled" + (f": {escape(', '.join(cancelled))}" if cancelled else "") + ")")
        return 130
    finally:
        status.stop()
    return code
