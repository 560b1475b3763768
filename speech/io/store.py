"""Results stores: a local folder (default ``./out``) or an S3-compatible bucket.

Writes are all-or-nothing from the caller's view: every file is rendered before the first
write; a local store writes into a hidden temp folder and renames into place; an S3 store
writes the ``<stem>.json`` (the file consumers poll for) last.
"""
from __future__ import annotations

import mimetypes
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote
from typing import Any, Optional, Protocol

from pydantic import BaseModel, Field

from speech.errors import StorageError
from speech.schema import OutputRef, S3Options, TranscriptionRequest
from speech.settings import Settings, get_settings


class OutputTarget(BaseModel):
    """Where a run's outputs go: a bucket (parameter or RESULTS_BUCKET), else a local folder."""

    download_dir: Optional[str] = None
    bucket: Optional[str] = None
    prefix: Optional[str] = None
    s3: S3Options = Field(default_factory=S3Options)
    download_transcript: bool = Field(False, description="with a bucket, also write the files to download_dir")

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "OutputTarget":
        return cls(download_dir=req.download_dir, bucket=req.bucket, prefix=req.prefix_transcripts,
                   s3=S3Options.from_request(req), download_transcript=req.download_transcript)


class ResultStore(Protocol):
    def write(self, files: dict[str, bytes]) -> list[OutputRef]: ...

    def describe(self) -> str: ...


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def describe(self) -> str:
        return str(self.root.resolve())

    def write(self, files: dict[str, bytes]) -> list[OutputRef]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc.strerror or exc}") from None
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            refs = []
            for name, data in files.items():
                final = self.root / name
                os.replace(staging / name, final)
                refs.append(OutputRef(name=name, uri=str(final.resolve()), size_bytes=len(data)))
            return refs
        except OSError as exc:
            raise StorageError(f"cannot write outputs to {self.root}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class S3Store:
    def __init__(self, bucket: str, prefix: str, client: Any):
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = client

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _url(self, key: str) -> Optional[str]:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return f"{endpoint.rstrip('/')}/{quote(self.bucket)}/{quote(key)}" if endpoint else None

    def write(self, files: dict[str, bytes]) -> list[OutputRef]:
        from botocore.exceptions import BotoCoreError, ClientError

        order = sorted(files, key=lambda n: n.endswith(".json") and not n.endswith(".segments.json"))
        refs = []
        for name in order:
            key = self.prefix + name
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if name.endswith((".srt", ".vtt")):
                ctype = "text/vtt" if name.endswith(".vtt") else "application/x-subrip"
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=files[name], ContentType=ctype)
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"cannot write s3://{self.bucket}/{key}: {exc}") from None
            refs.append(OutputRef(name=name, uri=f"s3://{self.bucket}/{key}", size_bytes=len(files[name]),
                                  url=self._url(key)))
        return refs


def open_store(
    download_dir: Optional[str] = None,
    bucket: Optional[str] = None,
    prefix: Optional[str] = None,
    settings: Optional[Settings] = None,
    client: Any = None,
) -> ResultStore:
    """The run's store: a bucket if one is given (parameter or env), else a local folder."""
    settings = settings or get_settings()
    bucket = bucket or (None if download_dir else settings.s3_bucket)
    if bucket:
        from speech.io.s3 import s3_client

        return S3Store(bucket, settings.s3_prefix if prefix is None else prefix, client or s3_client(settings))
    return local_store(download_dir, settings)


def local_store(download_dir: Optional[str] = None, settings: Optional[Settings] = None) -> LocalStore:
    return LocalStore(Path(download_dir) if download_dir else (settings or get_settings()).results_dir)
