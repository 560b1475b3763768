"""Bring audio bytes to a local file from a path, an http(s) URL or an s3:// URI, hashing them
(sha256) in the same pass: the identity every later stage caches on. Sizes are bounded by
``MAX_AUDIO_BYTES``; network failures that may pass are :class:`TransientFetchError`."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional
from urllib.parse import unquote, urlsplit

from speech.errors import AudioError, FetchError, TransientFetchError
from speech.io import netguard
from speech.io.files import open_nonblocking
from speech.io.netguard import Deadline, DeadlineExceeded
from speech.io.s3 import s3_client
from speech.redact import redact_url
from speech.settings import Settings, get_settings

_CHUNK = 1 << 20


@dataclass
class FetchedFile:
    path: Path
    sha256: str
    size: int
    temporary: bool  # True when we downloaded it and the caller may delete it


def _copy_hashing(src: BinaryIO, dst: Optional[BinaryIO], limit: int, label: str,
                  deadline: Optional[Deadline] = None) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` (if any), hashing; ``deadline`` is ticked after every read, which
    returns whatever arrived (``read1``) so a trickling server cannot hold it."""
    h = hashlib.sha256()
    size = 0
    read = getattr(src, "read1", None) if deadline is not None else None
    read = read or src.read
    while True:
        chunk = read(_CHUNK)
        if deadline is not None:
            deadline.tick(len(chunk))
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise AudioError(f"{label}: larger than the {limit} byte limit (MAX_AUDIO_BYTES)")
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


LEFTOVER_AFTER_S = 24 * 3600  # a download or shared copy this old belongs to no live run


def sweep_leftovers(dir_: Path, older_than: float = LEFTOVER_AFTER_S) -> list[Path]:
    """Delete the downloads (``dl-*.part``) and task workers' copies (``shared-*``) that a
    process killed before it could release them left in ``dir_`` more than ``older_than`` seconds
    ago; what was deleted."""
    removed, now = [], time.time()
    for path in dir_.glob("*"):
        if not (path.name.startswith("dl-") and path.name.endswith(".part")) and not path.name.startswith("shared-"):
            continue
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > older_than:
                path.unlink()
                removed.append(path)
    return removed


def _download_to(dir_: Path, writer: Callable[[BinaryIO], tuple[str, int]]) -> FetchedFile:
    dir_.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(dir_)
    fd, tmp = tempfile.mkstemp(dir=dir_, prefix="dl-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            digest, size = writer(f)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FetchedFile(Path(tmp), digest, size, temporary=True)


@contextlib.contextmanager
def open_local(path: Path, settings: Settings, what: str = "audio file") -> Iterator[tuple[BinaryIO, bool]]:
    """A local file opened once, never blocking (a FIFO swapped in is refused, not waited on), and
    whether it is pinned. In a run of a request from someone else (:func:`speech.policy.pinned_roots`)
    the file actually opened must lie inside the ``ALLOW_LOCAL_PATHS`` roots, so a path swapped for a
    link after the request was admitted reads nothing outside them (a missing target outside reads
    the same as a present one). Raises :class:`FetchError`."""
    from speech.policy import check_inside, pinned_roots

    roots = pinned_roots(settings)
    try:
        fd = open_nonblocking(path)
    except (FileNotFoundError, NotADirectoryError):
        if roots is not None:
            check_inside(Path(os.path.realpath(path)), roots)
        raise FetchError(f"{what} not found: {path}") from None
    except PermissionError:
        raise FetchError(f"permission denied reading {path}") from None
    with os.fdopen(fd, "rb") as f:
        if roots is not None:
            check_inside(_opened_path(fd, path), roots)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FetchError(f"not a regular file: {path}")
        yield f, roots is not None


def _fetch_local(source: str, settings: Settings, dir_: Path) -> FetchedFile:
    """A local file through :func:`open_local`; a pinned one is read through a copy taken from
    that open file, so a file swapped after the fetch is not what later stages decode."""
    path = Path(unquote(urlsplit(source).path) if source.startswith("file://") else source).expanduser()
    with open_local(path, settings) as (f, pinned):
        if not pinned:
            digest, size = _copy_hashing(f, None, settings.max_audio_bytes, str(path))
            return FetchedFile(path, digest, size, temporary=False)
        return _download_to(dir_, lambda out: _copy_hashing(f, out, settings.max_audio_bytes, str(path)))


def _opened_path(fd: int, path: Path) -> Path:
    """The real path of the file open on ``fd`` (Linux: ``/proc/self/fd``; elsewhere the resolved
    path, accepted only when it is the same file)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        real = Path(os.path.realpath(path))
        opened, named = os.fstat(fd), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise FetchError(f"{path} changed while it was opened") from None
        return real


def _fetch_http(source: str, settings: Settings, dir_: Path, since: Optional[float] = None) -> FetchedFile:
    """GET through :func:`speech.io.netguard.session` (public addresses only, every redirect
    checked), within HTTP_MAX_SECONDS from ``since`` (connect, headers and body; every attempt
    together) and above HTTP_MIN_BYTES_PER_SECOND."""
    shown = redact_url(source)
    with Deadline(shown, settings, since) as deadline:
        try:
            return _get(source, shown, settings, dir_, deadline)
        except DeadlineExceeded:
            raise
        except TransientFetchError:
            if deadline.expired:  # the timer shut the socket: say why
                raise deadline.exceeded() from None
            raise


def _get(source: str, shown: str, settings: Settings, dir_: Path, deadline: Deadline) -> FetchedFile:
    import requests
    import urllib3

    try:
        with netguard.session(settings, on_socket=deadline.watch) as http:
            resp = http.get(source, stream=True, timeout=(settings.http_connect_timeout, settings.http_read_timeout))
    except requests.exceptions.TooManyRedirects:
        raise FetchError(f"{shown}: too many redirects") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema, UnicodeError, ValueError) as exc:
        raise FetchError(f"invalid URL {shown}: {type(exc).__name__}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientFetchError(f"cannot reach {shown}: {type(exc).__name__}") from None
    except requests.exceptions.RequestException as exc:
        if deadline.expired:
            raise deadline.exceeded() from None
        raise FetchError(f"cannot fetch {shown}: {type(exc).__name__}") from None
    with resp:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientFetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise FetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}")
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > settings.max_audio_bytes:
            raise AudioError(f"{shown}: {length} bytes exceeds the MAX_AUDIO_BYTES limit")
        resp.raw.decode_content = True
        try:
            return _download_to(dir_, lambda f: _copy_hashing(resp.raw, f, settings.max_audio_bytes, shown, deadline))
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            raise TransientFetchError(f"download of {shown} stalled: no data for {settings.http_read_timeout:.0f} s "
                                      "(HTTP_READ_TIMEOUT)") from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError, OSError) as exc:
            if deadline.expired:
                raise deadline.exceeded() from None
            raise TransientFetchError(f"download of {shown} broke off: {type(exc).__name__}") from None


def _fetch_s3(source: str, settings: Settings, dir_: Path) -> FetchedFile:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    parts = urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise FetchError(f"bad S3 URI {source!r}; expected s3://bucket/key")
    client = s3_client(settings)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head.get("ContentLength", 0) > settings.max_audio_bytes:
            raise AudioError(f"{source}: {head['ContentLength']} bytes exceeds the MAX_AUDIO_BYTES limit")
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return _download_to(dir_, lambda f: _copy_hashing(body, f, settings.max_audio_bytes, source))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FetchError(f"{source}: no such object") from None
        if code in ("NoSuchBucket",):
            raise FetchError(f"{source}: no such bucket") from None
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            raise TransientFetchError(f"{source}: S3 error {code}") from None
        raise FetchError(f"{source}: S3 error {code or status}") from None
    except EndpointConnectionError:
        raise TransientFetchError(f"{source}: cannot reach the S3 endpoint") from None
    except BotoCoreError as exc:
        raise FetchError(f"{source}: {type(exc).__name__}: {exc}") from None


def fetch(source: str, settings: Optional[Settings] = None, since: Optional[float] = None) -> FetchedFile:
    """Bring the source bytes to a local file and hash them in the same pass; an http(s) download
    ends ``HTTP_MAX_SECONDS`` after ``since`` (the first attempt's start, epoch seconds; default now)."""
    settings = settings or get_settings()
    scheme = urlsplit(source).scheme.lower()
    dl_dir = settings.jobs_dir or settings.cache_dir / "downloads"
    if scheme in ("http", "https"):
        fetched = _fetch_http(source, settings, dl_dir, since)
    elif scheme == "s3":
        fetched = _fetch_s3(source, settings, dl_dir)
    else:
        fetched = _fetch_local(source, settings, dl_dir)
    if fetched.size == 0:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
        raise AudioError(f"{redact_url(source)}: empty file (0 bytes)")
    return fetched
