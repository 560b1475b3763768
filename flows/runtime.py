"""What every flow run does first, whichever flow it is: the original worker's env switches,
and erasing tokens passed as plain parameters from the stored flow run."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Optional

from prefect.logging import get_run_logger

from speech.schema import HANDOVER_MARK, SECRET_FIELDS
from speech.settings import get_settings

MASK = "**********"  # what Prefect stores for a SecretStr parameter

# URL credentials (user-info, a presigned URL's signature) never go into a flow run's stored
# parameters: a run started in this process (CLI, handler, in-process endpoint) gets the masked
# URL plus a handover mark, and takes the real URL back from this process's memory.
# A request from someone else carrying the mark is refused (speech.policy), so no caller can name
# another run's key.
HANDOVER = HANDOVER_MARK
_HANDED_LOCK = threading.Lock()
_HANDED: "OrderedDict[str, str]" = OrderedDict()
_HANDED_MAX = 10_000


def hand_over(url: str) -> str:
    """``url`` as a run parameter: masked with a handover mark when it carries credentials."""
    import secrets

    from speech.redact import mask_url_credentials

    masked = mask_url_credentials(url)
    if masked == url:
        return url
    key = secrets.token_hex(12)
    with _HANDED_LOCK:
        _HANDED[key] = url
        while len(_HANDED) > _HANDED_MAX:
            _HANDED.popitem(last=False)
    return f"{masked}{HANDOVER}{key}"


def take_back(value: str) -> str:
    """The real URL behind a handed-over parameter (unchanged when it has no mark)."""
    from speech.errors import InvalidRequest

    shown, mark, key = value.rpartition(HANDOVER)
    if not mark:
        return value
    with _HANDED_LOCK:
        url = _HANDED.get(key)
    if url is None:
        raise InvalidRequest(f"{shown}: this URL's credentials were never stored, and this process does not hold "
                             "them (a run resumed or retried elsewhere); start a new run with the URL")
    return url


def taken_back(req: Any) -> Any:
    """``req`` with every handed-over URL (audio, speaker samples) restored."""
    update: dict[str, Any] = {}
    if HANDOVER in req.audio_file:
        update["audio_file"] = take_back(req.audio_file)
    if any(HANDOVER in s.url for s in req.speaker_samples):
        update["speaker_samples"] = [s.model_copy(update={"url": take_back(s.url)}) for s in req.speaker_samples]
    return req.model_copy(update=update) if update else req


def handed_over_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flow kwargs with the credentials of their URLs handed over (:func:`hand_over`)."""
    out = dict(kwargs)
    if isinstance(out.get("audio_file"), str):
        out["audio_file"] = hand_over(out["audio_file"])
    if isinstance(out.get("speaker_samples"), list):
        out["speaker_samples"] = [{**s, "url": hand_over(s["url"])} if isinstance(s, dict) else s
                                  for s in out["speaker_samples"]]
    return out


def set_console_level(level: str | int) -> None:
    """Level of Prefect's console handlers (on the root logger in Prefect's default logging
    config, on prefect loggers in custom ones); the API handlers are left alone."""
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
        from speech.output.report import mounted_volumes

        get_run_logger().info("mounts:\n%s", "\n".join(mounted_volumes()))


def _masked(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with plain-text tokens replaced by Prefect's mask and credentials inside URLs
    (user-info, signed query parameters) masked."""
    from speech.redact import mask_url_credentials

    out = dict(params)
    for k in SECRET_FIELDS:
        if isinstance(out.get(k), str) and out[k] not in ("", MASK):
            out[k] = MASK
    if isinstance(out.get("audio_file"), str):
        out["audio_file"] = mask_url_credentials(out["audio_file"])
    if isinstance(out.get("audio_files"), list):
        out["audio_files"] = [mask_url_credentials(a) if isinstance(a, str) else a for a in out["audio_files"]]
    if isinstance(out.get("speaker_samples"), list):
        out["speaker_samples"] = [
            {**x, "url": mask_url_credentials(x["url"])} if isinstance(x, dict) and isinstance(x.get("url"), str)
            else mask_url_credentials(x) if isinstance(x, str) else x
            for x in out["speaker_samples"]]
    return out


def redact_stored_secrets(nested: Optional[str] = None) -> None:
    """A token the run was given as a plain parameter (a request field, stored at the top level
    or, e.g. for a batch, under the parameter ``nested``), or credentials inside an
    audio or speaker-sample URL (user-info, a presigned URL's signature), are used for this run
    but erased from the stored flow-run parameters (a retry from the UI then needs a fresh URL).

    (Passed as ``SecretStr`` a token is stored masked from the start; the CLI does that.)
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    stored = dict(ctx.flow_run.parameters)
    masked = _masked(stored)
    if nested and isinstance(stored.get(nested), dict):
        masked[nested] = _masked(stored[nested])
    if masked == stored:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, parameters=masked)


def admit_deployment_run(req: Any) -> Any:
    """In a deployment run (started from the UI, the API, a sweep or a schedule: anyone who can
    start one chooses its parameters), refuse what the request policy does not allow
    (:func:`speech.policy.admit`; the model only with ``WORKER_MODELS`` set: a deployment run is
    its own process), and put the outputs under the run's own key (``<prefix><stem>/<flow run
    id>/``: :func:`speech.policy.job_scoped`). Runs from the CLI or Python are the caller's own
    machine and are neither restricted nor moved."""
    from prefect.runtime import deployment, flow_run

    if not deployment.id:
        return req
    from speech.policy import admit
    from tasks.storage import job_outputs

    settings = get_settings()
    admit(req, settings=settings, serving=bool(settings.worker_models))
    # in a batch run, output_name is the batch's own (call-2 for a second call.wav: a caller cannot
    # give one for several files), so it is scoped to the run like any file's stem
    return job_outputs(req, str(flow_run.id), name_is_ours=flow_run.flow_name == "transcribe-batch")


def keep_result_with_task_results() -> None:
    """The flow run's own result (persisted: ``persist_result=True``) goes where the task results
    go (``RESULTS_STORAGE_BLOCK`` / ``RESULTS_STORAGE``), not to the machine's disk, so whoever
    reads the run back from the API (``deployments/runpod_api.py --deployment``) finds it in the
    shared bucket. Prefect reads the run context's result store when the flow returns."""
    from prefect.context import FlowRunContext

    from tasks.storage import task_result_storage

    ctx = FlowRunContext.get()
    storage = task_result_storage()
    if ctx is not None and ctx.result_store is not None and storage is not None:
        ctx.result_store = ctx.result_store.model_copy(update={"result_storage": storage})


def failure_message(state: Any) -> str:
    """A failed or crashed flow run's state message as the handler's one-line error."""
    from speech import errors
    from speech.redact import one_line, scrub_configured

    message = (state.message or state.name or "failed").strip()
    for prefix in ("Flow run encountered an exception: ", "Task run encountered an exception "):
        message = message.removeprefix(prefix)
    name, sep, rest = message.partition(": ")
    if sep and isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), errors.SpeechError):
        message = rest  # the handler answers a pipeline error with its message alone
    return one_line(scrub_configured(message))
