"""Upload the source audio to an S3-compatible bucket and presign a GET URL for it.

Engine code (no Prefect): the upload task in ``tasks/`` wraps :func:`upload_audio`.

The object goes to ``<prefix_audio><name>``. An object already there with the same content
is left alone (no PUT): content is compared by the ``sha256`` stored in the object's user
metadata (every upload here writes it), falling back, for objects written by other tools,
to size + ETag == MD5 (valid for single-part uploads only). ``force=True`` always uploads.

The presigned URL carries credentials in its query string: it is returned, never logged;
messages use :func:`speech.redact.redact_url`. ``UploadResult``'s repr hides it as well.
"""
from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Optional

from pydantic import BaseModel, Field

from speech.errors import InvalidRequest, StorageError
from speech.io.files import open_nonblocking
from speech.io.s3 import s3_client, storage_error
from speech.redact import redact_url

log = logging.getLogger(__name__)

MAX_URL_EXPIRY = 604800  # S3 SigV4 presigned URLs live at most 7 days

_TYPES = {  # audio (guessed badly or not at all by mimetypes) and the subtitle outputs
    ".srt": "application/x-subrip",
    ".vtt": "text/vtt",
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".mp4": "video/mp4",
    ".aac": "audio/aac",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".webm": "audio/webm",
    ".weba": "audio/webm",
    ".mka": "audio/x-matroska",
    ".mkv": "video/x-matroska",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
    ".wma": "audio/x-ms-wma",
    ".amr": "audio/amr",
}

class UploadResult(BaseModel):
    bucket: str
    key: str
    uri: str  # s3://bucket/key
    presigned_url: str = Field(repr=False)  # carries credentials: never log it
    uploaded: bool  # False: an identical object was already there
    size_bytes: int
    sha256: str


def presign(client: Any, bucket: str, key: str, expiry: int) -> str:
    """A presigned GET URL for ``s3://bucket/key`` (it carries credentials: never log it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expiry)
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, f"cannot presign s3://{bucket}/{key}", bucket) from None


def content_type_for(name: str) -> str:
    ext = Path(name).suffix.lower()
    return _TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _digests(f: BinaryIO) -> tuple[str, str]:
    """sha256 and MD5 of an open file, read once from where it stands."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
        md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _same_object(client: Any, bucket: str, key: str, size: int, sha256: str, md5: str) -> bool:
    """True when ``bucket/key`` exists and holds the bytes whose digests are given."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("404", "NoSuchKey", "NotFound") or status == 404:
            # also what HEAD says for a missing bucket: the upload then reports NoSuchBucket
            return False
        raise storage_error(exc, f"cannot check s3://{bucket}/{key}", bucket) from None
    except BotoCoreError as exc:
        raise storage_error(exc, f"cannot check s3://{bucket}/{key}", bucket) from None

    stored_sha = (head.get("Metadata") or {}).get("sha256")
    if stored_sha:
        return stored_sha.lower() == sha256.lower()
    if int(head.get("ContentLength", -1)) != size:
        return False
    etag = str(head.get("ETag", "")).strip('"').lower()
    if not etag or "-" in etag:  # multipart ETags are not the content MD5
        return False
    return etag == md5


def upload_audio(
    local_path: str,
    sha256: str,
    *,
    bucket: str,
    prefix_audio: str = "audio/",
    name: Optional[str] = None,
    force: bool = False,
    url_expiry: int = 3600,
    client: Any = None,
) -> UploadResult:
    """Put ``local_path`` at ``s3://bucket/<prefix_audio><name>`` unless already there; presign it.

    ``sha256`` is the hex digest of the file's bytes (computed by the fetch stage); it is
    stored as object metadata and used to recognise an identical object on later runs.
    Raises InvalidRequest for bad parameters, StorageError for a missing bucket or denied
    access, TransientStorageError (retryable) for connection problems and S3 5xx/throttling.
    """
    if not bucket:
        raise InvalidRequest("upload: no bucket given (--bucket / RESULTS_BUCKET / SWAMI_STORAGE_BUCKET)")
    if isinstance(url_expiry, bool) or not isinstance(url_expiry, int) or not 1 <= url_expiry <= MAX_URL_EXPIRY:
        raise InvalidRequest(f"url_expiry must be an integer from 1 to {MAX_URL_EXPIRY} seconds, got {url_expiry!r}")
    if not sha256 or len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
        raise InvalidRequest("upload: sha256 must be a 64-character hex digest")
    path = Path(local_path).expanduser()
    try:
        fd = open_nonblocking(path)
    except OSError:
        raise StorageError(f"upload: audio file not found: {path}") from None
    object_name = name or path.name
    prefix = prefix_audio or ""
    key = prefix + object_name.lstrip("/") if prefix.endswith("/") or not prefix else f"{prefix}/{object_name.lstrip('/')}"
    uri = f"s3://{bucket}/{key}"
    sha256 = sha256.lower()

    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    # one open file: its bytes are checked against the fetch's digest and uploaded from the same open,
    # so what goes up is what was transcribed (a file swapped since, or for a link, is refused)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StorageError(f"upload: audio file not found: {path}")
        if not object_name or object_name.endswith("/"):
            raise InvalidRequest(f"upload: bad object name {object_name!r}")
        size = os.fstat(fd).st_size
        digest, md5 = _digests(f)
        if digest != sha256:
            raise StorageError(f"upload: {path.name} is not the file that was fetched and transcribed (sha256 "
                               f"{digest[:12]}…, fetched {sha256[:12]}…): it changed since; nothing was uploaded")
        if client is None:
            from speech.settings import get_settings

            client = s3_client(get_settings())
        uploaded = False
        if force or not _same_object(client, bucket, key, size, sha256, md5):
            f.seek(0)
            try:
                client.upload_fileobj(
                    f,
                    bucket,
                    key,
                    ExtraArgs={"Metadata": {"sha256": sha256}, "ContentType": content_type_for(object_name)},
                )
            except (ClientError, BotoCoreError, Boto3Error) as exc:
                raise storage_error(exc, f"cannot upload {path.name} to {uri}", bucket) from None
            uploaded = True
            log.info("uploaded %s (%d bytes) to %s", path.name, size, uri)
        else:
            log.info("%s already holds this audio (sha256 %s…); upload skipped", uri, sha256[:12])

    url = presign(client, bucket, key, url_expiry)
    log.debug("presigned %s for %ds: %s", uri, url_expiry, redact_url(url))
    return UploadResult(
        bucket=bucket, key=key, uri=uri, presigned_url=url, uploaded=uploaded, size_bytes=size, sha256=sha256
    )
