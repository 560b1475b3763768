"""What a sweep sees: audio files in a folder or under an S3 prefix, and their identities.

Engine code (no Prefect): :mod:`flows.sweep` decides what to trigger from these.
"""
from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from speech.errors import InvalidRequest

FILE_TAG_PREFIX = "sweep-file:"


@dataclass
class Candidate:
    path: str  # local path or s3://bucket/key: what the triggered run gets as audio_file
    identity: Optional[str] = None
    error: Optional[str] = None
    key: Optional[str] = None  # ledger key = target:version:identity
    status: str = "pending"
    flow_run_id: Optional[str] = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return FILE_TAG_PREFIX + hashlib.sha256(self.key.encode()).hexdigest()[:24]


def list_local(folder: str, pattern: str) -> list[Candidate]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidRequest(f"sweep source {folder!r} is not a folder (nor an s3://bucket/prefix)")
    return [Candidate(str(p)) for p in sorted(root.iterdir())
            if p.is_file() and not p.name.startswith(".") and fnmatch.fnmatch(p.name, pattern)]


def list_s3(uri: str, pattern: str) -> list[Candidate]:
    """Paginated ``list_objects_v2``; the glob applies to the key's last component. Identity = ETag."""
    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise InvalidRequest(f"bad S3 sweep source {uri!r}; expected s3://bucket/prefix")
    out: list[Candidate] = []
    for page in s3_client(get_settings()).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            name = key.rsplit("/", 1)[-1]
            if not name or name.startswith(".") or not fnmatch.fnmatch(name, pattern):
                continue
            c = Candidate(f"s3://{bucket}/{key}")
            if obj.get("Size", 0) == 0:
                c.error = "AudioError: empty object (0 bytes)"
            else:
                c.identity = "etag-" + obj["ETag"].strip('"')
            out.append(c)
    return sorted(out, key=lambda c: c.path)


def local_identity(path: str) -> str:
    """sha256 of the bytes, streamed (speech.audio.fetch: also rejects empty/oversized files)."""
    from speech.io.fetch import fetch

    return fetch(path).sha256
