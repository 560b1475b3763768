"""The one request policy for everything that takes a request from someone else.

Whoever can start a deployment run (UI, API, schedule), call the RunPod-compatible endpoint (any
mode) or its handler, or drop a file in a swept inbox chooses the request. :func:`admit` is what
each of those entry points calls at its edge, before anything is fetched, loaded, written or
stored; the CLI and the Python API run by the machine's own user are not limited.

* **s3:// sources** (audio, speaker samples, sweep sources), read with the worker's credentials,
  only under the ``ALLOW_S3_SOURCES`` roots (``*``: any, the default but on an endpoint with
  several callers).
* **Local paths** (audio, speaker samples, ``*_json_in``, ``download_dir``, model directories,
  sweep sources) only under the ``ALLOW_LOCAL_PATHS`` roots (``1``: anywhere), checked on the
  exact path that will be opened (a sample's ``?name=``/``#name`` suffix is dropped first, as the
  fetch drops it); outputs also under ``RESULTS_DIR``. A refused path reads the same whether or not
  it exists. Audio and samples are checked again on the file the run opens, and read through a
  copy of it (:func:`request_from_others`): a path swapped for a link later reads nothing.
* **Endpoints and code** named by a request (``s3_endpoint`` without its own keys, a pyannote
  pipeline or wav2vec2 model that is not a published one) only with ``ALLOW_REQUEST_ENDPOINTS``.
* **Models**: a long-lived process runs what it serves (:func:`speech.asr.serving.served_request`).
* **Tokens**: refused where the request would be stored (queued runs, sweeps, task jobs). A
  ``prefect-secret:`` reference never sends a worker Secret block to an ``s3_endpoint`` the request
  chose, nor one of the worker's own tokens in another token's field.
* **Handover marks**: a URL from someone else never carries the mark this service puts on its own
  runs' URLs (it would name another run's credentials held in memory).
* **Cost**: at most ``MAX_SPEAKER_SAMPLES`` enrolment clips (each clip is capped at
  ``MAX_SAMPLE_SECONDS`` when it is read); pyannoteAI polled at most once a second.

URLs are checked when they are fetched (:mod:`speech.io.netguard`), on every connection.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

from speech.errors import FetchError, InvalidRequest
from speech.settings import Settings, get_settings

_SCHEMES = ("http", "https", "s3")
_SERVING_OTHERS = False  # this process has admitted a request from someone else (:func:`serving_others`)
_FROM_OTHERS: ContextVar[bool] = ContextVar("speech_request_from_others", default=False)
MIN_POLL_SECONDS = 1.0  # the shortest pyannoteAI poll interval a request from someone else may ask for


def local_roots(settings: Settings) -> Optional[list[Path]]:
    """None when any local path is allowed (``ALLOW_LOCAL_PATHS=1``), else the allowed roots
    (empty: none)."""
    value = settings.allow_local_paths.strip()
    if value.lower() in ("1", "true", "yes", "*"):
        return None
    parts = [p for chunk in value.split(",") for p in chunk.split(os.pathsep)]
    return [Path(p).expanduser().resolve() for p in parts if p.strip()]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def local_path_of(source: str) -> Optional[Path]:
    """The file a source names on this machine (a path or a file:// URL), as the fetch opens it;
    None for a URL fetched over the network."""
    scheme = urlsplit(source).scheme.lower()
    if scheme in _SCHEMES:
        return None
    return Path(unquote(urlsplit(source).path) if scheme == "file" else source).expanduser()


def sample_target(url: str) -> str:
    """What a speaker sample's fetch opens: a local path loses a ``?name=``/``#name`` suffix
    unless the file really has it; a URL loses its ``#fragment``."""
    if "://" in url.split("?", 1)[0].split("#", 1)[0]:
        return url.split("#", 1)[0]
    if Path(url).expanduser().exists():
        return url
    return url.split("#", 1)[0].split("?", 1)[0]


def check_local_path(source: str, settings: Settings, what: str = "audio_file") -> None:
    """Refuse a local path or file:// URL unless ``ALLOW_LOCAL_PATHS`` allows it; with roots,
    the path must resolve (``..`` and symlinks followed) inside one."""
    path = local_path_of(source)
    roots = local_roots(settings)
    if path is None or roots is None:
        return
    check_inside(path.resolve(), roots, what)


def check_inside(real: Path, roots: list[Path], what: str = "audio_file") -> None:
    """Refuse a file whose real path (links resolved) lies outside the ``ALLOW_LOCAL_PATHS`` roots."""
    if not _inside(real, roots):
        where = "inside " + ", ".join(str(r) for r in roots) if roots else "at all"
        raise FetchError(f"{what}: local paths are not allowed in requests from others {where} (ALLOW_LOCAL_PATHS); "
                         "give an http(s) or s3:// URL")


@contextlib.contextmanager
def request_from_others() -> Iterator[None]:
    """Around a run of a request from someone else (set by each entry point that runs one: a
    deployment run, the handler and the in-process endpoint, a task worker's job): the local files
    it opens are held to the ``ALLOW_LOCAL_PATHS`` roots again when they are opened, on the file
    actually opened (:func:`pinned_roots`), so a path swapped for a link after the request was
    admitted reads nothing outside them. A context variable: it follows the run into its task
    threads and never into another run sharing the process."""
    token = _FROM_OTHERS.set(True)
    try:
        yield
    finally:
        _FROM_OTHERS.reset(token)


def from_others() -> bool:
    """Whether the running code serves a request from someone else (:func:`request_from_others`)."""
    return _FROM_OTHERS.get()


def pinned_roots(settings: Settings) -> Optional[list[Path]]:
    """The roots a local file opened by this run must lie in, judged on the opened file (and read
    through a copy taken from it); None outside :func:`request_from_others` or with
    ``ALLOW_LOCAL_PATHS=1``."""
    return local_roots(settings) if from_others() else None


def s3_roots(settings: Settings) -> Optional[list[str]]:
    """None when any s3:// source is allowed (``ALLOW_S3_SOURCES=*``), else the allowed
    ``bucket/prefix`` roots (empty: none)."""
    value = settings.allow_s3_sources.strip()
    if value == "*":
        return None
    if value.lower() == "none":
        return []
    return [r.strip().removeprefix("s3://") for r in value.split(",") if r.strip()]


def check_s3_source(source: str, settings: Settings, what: str = "audio_file") -> None:
    """Refuse an ``s3://`` source outside the ``ALLOW_S3_SOURCES`` roots: the worker reads it with
    its own credentials, so a caller must not name another's objects. A root ``bucket`` allows the
    whole bucket; ``bucket/prefix`` what starts with it (``..`` in a key is not special to S3)."""
    parts = urlsplit(source)
    roots = s3_roots(settings)
    if parts.scheme.lower() != "s3" or roots is None:
        return
    target = f"{parts.netloc}/{parts.path.lstrip('/')}"
    if not any(target.startswith(root if "/" in root else root + "/") for root in roots):
        where = "under " + ", ".join(f"s3://{r}" for r in roots) if roots else "at all"
        raise FetchError(f"{what}: s3:// sources are not allowed in requests from others {where} "
                         "(ALLOW_S3_SOURCES): the worker reads them with its own credentials; give an http(s) URL "
                         "(a presigned one) or ask the operator")


def check_output_dir(folder: str, settings: Settings) -> None:
    """A ``download_dir`` the request chose must resolve inside ``RESULTS_DIR`` or an
    ``ALLOW_LOCAL_PATHS`` root (``1``: anywhere), so a caller cannot have the worker write
    outputs over its own files."""
    roots = local_roots(settings)
    if roots is None:
        return
    roots = [*roots, Path(settings.results_dir).expanduser().resolve()]
    if not _inside(Path(folder).expanduser().resolve(), roots):
        raise InvalidRequest(f"download_dir: requests from others write outputs only inside "
                             f"{', '.join(str(r) for r in roots)} (RESULTS_DIR, ALLOW_LOCAL_PATHS)")


# pyannote pipelines a request may name without ALLOW_REQUEST_ENDPOINTS (published by pyannote)
KNOWN_DIARIZATION_MODELS = frozenset({
    "pyannote/speaker-diarization-community-1", "pyannote/speaker-diarization-3.1",
    "pyannote/speaker-diarization-3.0", "pyannote/speaker-diarization",
})


def known_align_models() -> frozenset[str]:
    """The wav2vec2 models whisperx picks per language (torchaudio bundles and hub names)."""
    from whisperx.alignment import DEFAULT_ALIGN_MODELS_HF, DEFAULT_ALIGN_MODELS_TORCH

    return frozenset({*DEFAULT_ALIGN_MODELS_HF.values(), *DEFAULT_ALIGN_MODELS_TORCH.values()})


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~", "file:")) or Path(name).expanduser().exists()


def check_untrusted_request(req: Any, settings: Settings) -> None:
    """What a request from someone else may not do on this worker's behalf (see
    ``ALLOW_LOCAL_PATHS`` and ``ALLOW_REQUEST_ENDPOINTS``): read local files outside the allowed
    roots, write outputs outside them and ``RESULTS_DIR``, load models from local folders outside
    them, send the worker's S3 credentials to an endpoint the caller chose, or load a model or
    pipeline config the caller wrote. Raises :class:`FetchError` / :class:`InvalidRequest`."""
    from speech.io.netguard import resolve_checked
    from speech.redact import redact_url, secret_value
    from speech.schema import SECRET_REF_PREFIX

    check_local_path(req.audio_file, settings, "audio_file")
    check_s3_source(req.audio_file, settings, "audio_file")
    check_secret_refs(req, settings)
    if req.pyannote_poll_interval < MIN_POLL_SECONDS:
        raise InvalidRequest(f"pyannote_poll_interval: at least {MIN_POLL_SECONDS:g} s in requests from others (each "
                             "poll is a request on the worker's pyannoteAI key)")
    if len(req.speaker_samples) > settings.max_speaker_samples:
        raise InvalidRequest(f"speaker_samples: {len(req.speaker_samples)} clips, at most {settings.max_speaker_samples} "
                             "(MAX_SPEAKER_SAMPLES)")
    for sample in req.speaker_samples:
        check_local_path(sample_target(sample.url), settings, "speaker_samples")
        check_s3_source(sample_target(sample.url), settings, "speaker_samples")
    for field in ("pyannote_json_in", "deepgram_json_in"):
        if getattr(req, field):
            check_local_path(getattr(req, field), settings, field)
    if req.download_dir:
        check_output_dir(req.download_dir, settings)
    for field in ("model", "align_model", "diarization_model"):
        value = getattr(req, field, None)
        if value and _looks_local(value):
            check_local_path(value, settings, field)
    if settings.allow_request_endpoints:
        return
    if req.s3_endpoint:
        keys = (secret_value(req.access_key), secret_value(req.secret_key))
        if any(key.startswith(SECRET_REF_PREFIX) for key in keys):
            raise InvalidRequest(
                f"s3_endpoint {redact_url(req.s3_endpoint)!r} from a request takes the request's own access_key and "
                "secret_key, not 'prefect-secret:' references: the worker would send a Secret block it holds to an "
                "endpoint the caller chose (ALLOW_REQUEST_ENDPOINTS=1 on the worker allows it)")
        if not all(keys):
            raise InvalidRequest(
                f"s3_endpoint {redact_url(req.s3_endpoint)!r} from a request needs its own access_key and "
                "secret_key: the worker's S3 credentials are not sent to an endpoint the caller chose "
                "(ALLOW_REQUEST_ENDPOINTS=1 on the worker allows it)")
        parts = urlsplit(req.s3_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"s3_endpoint must be an http(s) URL, got {redact_url(req.s3_endpoint)!r}")
        resolve_checked(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), settings)
    if req.diarization_model and req.diarization_model not in KNOWN_DIARIZATION_MODELS:
        raise InvalidRequest(
            f"diarization_model {req.diarization_model!r} from a request is not one of pyannote's published "
            f"pipelines ({', '.join(sorted(KNOWN_DIARIZATION_MODELS))}); a pipeline config can build arbitrary "
            "classes, so other models are set on the worker (PYANNOTE_DIARIZATION_MODEL or "
            "ALLOW_REQUEST_ENDPOINTS=1)")
    if req.align_model and req.align_model not in known_align_models():
        raise InvalidRequest(
            f"align_model {req.align_model!r} from a request is not one of the wav2vec2 models whisperx uses; other "
            "models are set on the worker (ALIGN_MODEL or ALLOW_REQUEST_ENDPOINTS=1)")


def check_secret_refs(req: Any, settings: Settings) -> None:
    """A ``prefect-secret:<block>`` reference from someone else may not send one of the worker's
    own tokens (the blocks of :data:`speech.settings.SECRETS`, whose names are public) where
    another belongs (e.g. ``deepgram_api_key: prefect-secret:hf-token``); and no URL may carry
    this service's handover mark (:data:`speech.schema.HANDOVER_MARK`), which would name another
    run's URL credentials held in this process."""
    from speech.redact import redact_url, secret_value
    from speech.schema import HANDOVER_MARK, SECRET_FIELDS, SECRET_REF_PREFIX
    from speech.settings import SECRETS

    owners = {spec.block: spec.request_field for spec in SECRETS if spec.block}
    for field in SECRET_FIELDS:
        given = secret_value(getattr(req, field, None))
        if not given.startswith(SECRET_REF_PREFIX):
            continue
        owner = owners.get(given[len(SECRET_REF_PREFIX):].strip())
        if owner and owner != field:
            raise InvalidRequest(f"{field}: {given!r} names the worker's own {owner} Secret block; a request may "
                                 f"name it only as {owner}")
    for what, url in [("audio_file", req.audio_file), *(("speaker_samples", s.url) for s in req.speaker_samples)]:
        if HANDOVER_MARK in url:
            raise InvalidRequest(f"{what}: {redact_url(url.split(HANDOVER_MARK, 1)[0])!r} carries "
                                 f"{HANDOVER_MARK!r}, a mark this service gives its own runs' URLs; send the URL "
                                 "without it")


def check_source(source: str, settings: Optional[Settings] = None) -> None:
    """A sweep's ``source`` from someone else: a folder under the ``ALLOW_LOCAL_PATHS`` roots, a
    bucket prefix under the ``ALLOW_S3_SOURCES`` ones."""
    settings = settings or get_settings()
    check_local_path(source, settings, "source")
    check_s3_source(source, settings, "source")


def check_storable(req: Any, raw: dict[str, Any]) -> None:
    """A request that will be kept in a run's parameters (queued jobs, deployment runs): no token
    (``raw``: the fields as given; ``prefect-secret:<block>`` references pass) and no URL that
    carries credentials (user-info or a presigned signature)."""
    from speech.redact import mask_url_credentials, redact_url
    from speech.schema import plain_secrets

    given = plain_secrets(raw)
    if given:
        raise InvalidRequest(f"{', '.join(given)}: a token would be stored with the queued job's parameters; the "
                             "workers read tokens from their env vars or Secret blocks, or pass "
                             "'prefect-secret:<block name>'")
    for what, url in [("audio_file", req.audio_file), *(("speaker_samples", s.url) for s in req.speaker_samples)]:
        if mask_url_credentials(url) != url:
            raise InvalidRequest(
                f"{what}: {redact_url(url)} carries credentials (user-info or a signature) that would be stored "
                "with the queued job; give s3://bucket/key (the workers read it with their own credentials) or a "
                "URL without them, or send it to an endpoint that runs jobs in its own process")


def admit(request: Any, *, stored: bool = False, serving: bool = True, settings: Optional[Settings] = None) -> Any:
    """A request from someone else as this process will run it (a
    :class:`speech.schema.TranscriptionRequest`), or a :class:`speech.errors.SpeechError` that
    says why not. ``request``: the worker's input (``{"input": {...}}`` or its fields) or a parsed
    request. ``stored``: it will be kept in a run's parameters, so a token in it is refused.
    ``serving``: a long-lived process, which runs only the models it serves (``WORKER_MODELS``)."""
    from speech.schema import TranscriptionRequest

    global _SERVING_OTHERS
    _SERVING_OTHERS = True
    settings = settings or get_settings()
    if isinstance(request, TranscriptionRequest):
        req, raw = request, {name: getattr(request, name) for name in request.model_fields_set}
    else:
        req = TranscriptionRequest.parse(request)
        raw = request.get("input", request) if isinstance(request, dict) else {}
    if stored:
        check_storable(req, raw if isinstance(raw, dict) else {})
    check_untrusted_request(req, settings)
    if serving:
        from speech.asr.serving import served_request

        req = served_request(req, settings)
    return req


def serving_others() -> bool:
    """Whether this process takes requests from others (it has called :func:`admit`: an endpoint,
    the handler, a task worker, a deployment run). Such a process connects to an ``s3_endpoint`` a
    request chose only at an address the policy allows, pinned to the address checked
    (:func:`speech.io.s3.s3_client_for`); the CLI and Python API of the machine's own user never
    call :func:`admit`."""
    return _SERVING_OTHERS


def job_scoped(req: Any, job_id: str, settings: Optional[Settings] = None, block_folder: Optional[str] = None,
               name_is_ours: bool = False) -> Any:
    """Outputs that belong to their job: a request from a service entry point writes under
    ``<prefix><stem>/<job id>/`` in a bucket (``<download_dir>/<stem>/<job id>/`` in a folder,
    ``RESULTS_DIR`` by default), so a returned key or URL names objects no other job writes.
    A request that names ``output_name`` asks for the shared ``<prefix><output_name>.*`` keys
    (the original worker's layout) and is left as it is. ``block_folder``: the folder of the
    ``RESULTS_S3_BLOCK`` bucket when that block is where this request's outputs go
    (:func:`tasks.storage.job_outputs` reads it). ``name_is_ours``: the ``output_name`` was
    chosen by this service, not the caller (a batch's ``call-2`` for a second ``call.wav``): the
    files keep that name, under ``<prefix><output_name>/<job id>/``."""
    import re

    from speech.io.audio import stem_of

    if req.output_name and not name_is_ours:
        return req
    settings = settings or get_settings()
    job = re.sub(r"[^A-Za-z0-9_.-]", "_", str(job_id)).strip(".") or "job"
    stem = req.output_name or stem_of(req.audio_file)
    update: dict[str, Any] = {}
    bucket = req.bucket or (None if req.download_dir else settings.s3_bucket)
    if bucket or block_folder is not None:
        default = settings.s3_prefix if bucket else block_folder
        base = default if req.prefix_transcripts is None else req.prefix_transcripts
        base = base if not base or base.endswith("/") else base + "/"
        update["prefix_transcripts"] = f"{base}{stem}/{job}/"
        if req.download_dir and req.download_transcript:
            update["download_dir"] = str(Path(req.download_dir) / stem / job)
    else:
        update["download_dir"] = str(Path(req.download_dir or settings.results_dir) / stem / job)
    return req.model_copy(update=update)
