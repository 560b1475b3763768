"""Results stores: a local folder (default ``./out``) or an S3-compatible bucket.

Writes replace a run's files as a set: every file is rendered before the first write; a local
store stages them, renames them into place with ``<stem>.json`` (the file consumers poll for)
last and puts the old set back on any failure, also after a crash (:class:`LocalStore`); an
S3 store writes ``<stem>.json`` last and, on failure, removes what it added and restores what it
overwrote (:class:`S3Store`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol
from urllib.parse import quote

from pydantic import BaseModel, Field

from speech.errors import StorageError
from speech.io.files import write_whole
from speech.contracts import OutputOptions, OutputRef, S3Options
from speech.schema import TranscriptionRequest
from speech.settings import Settings, get_settings


LOCK_WAIT_S = 120.0  # a second writer of the same output stem waits this long for the first
PLAN = "plan.json"  # in a staging folder: which names existed before (for the roll-back)


class OutputTarget(BaseModel):
    """Where a run's outputs go: a bucket (parameter or RESULTS_BUCKET), else a local folder."""

    download_dir: Optional[str] = None
    bucket: Optional[str] = None
    prefix: Optional[str] = None
    s3: S3Options = Field(default_factory=S3Options)
    download_transcript: bool = Field(False, description="with a bucket, also write the files to download_dir")
    options: OutputOptions = Field(default_factory=OutputOptions, description="which files, subtitle options")

    @classmethod
    def from_request(cls, req: TranscriptionRequest) -> "OutputTarget":
        return cls(download_dir=req.download_dir, bucket=req.bucket, prefix=req.prefix_transcripts,
                   s3=S3Options.from_request(req), download_transcript=req.download_transcript,
                   options=OutputOptions.from_request(req))


class ResultStore(Protocol):
    def write(self, files: dict[str, bytes]) -> list[OutputRef]: ...

    def describe(self) -> str: ...


class LocalStore:
    """A folder. A run's files are replaced as a set: each is written into a staging folder, the
    old files are kept as hard links beside them, the new ones are renamed into place with
    ``<stem>.json`` (what consumers poll for) last, and any failure puts the old set back. A run
    killed half-way is rolled back by the next write of that stem (its staging folder, named by a
    hash of the exact stem, holds the plan: a writer of ``call`` never touches ``call-2``'s). The
    plan is written whole (a temporary name, then a rename) before the first rename and deleted
    as soon as ``<stem>.json`` is in place (the set is then committed), so a staging folder
    without a readable plan, or whose staged ``<stem>.json`` is gone, has nothing to undo.
    Writers of one folder take turns (an ``flock`` on the folder itself, released when a process
    dies, whatever cache each writer has): the second waits up to :data:`LOCK_WAIT_S`, then
    replaces its set whole, so sets never interleave; the last writer wins. (``flock`` is per
    machine: writers on different machines sharing a network folder are not ordered.)"""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def describe(self) -> str:
        return str(self.root.resolve())

    def write(self, files: dict[str, bytes]) -> list[OutputRef]:
        stem = _stem(files)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc.strerror or exc}") from None
        with self._locked(stem):
            self.recover(stem)
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(stem), dir=self.root))
            replaced: list[str] = []
            plan: dict[str, bool] = {}
            try:
                plan = {name: (self.root / name).exists() for name in files}
                (staging / "old").mkdir()
                for name, data in files.items():
                    (staging / name).write_bytes(data)
                    if plan[name]:
                        os.link(self.root / name, staging / "old" / name)
                write_whole(staging / PLAN, json.dumps(plan).encode())  # whole or absent, never half
                for name in sorted(files, key=lambda n: n == f"{stem}.json"):
                    os.replace(staging / name, self.root / name)
                    replaced.append(name)
            except BaseException as exc:
                _roll_back(self.root, staging, {n: plan[n] for n in replaced} if replaced else {})
                if isinstance(exc, OSError):
                    raise StorageError(f"cannot write outputs to {self.root}: {exc.strerror or exc}") from None
                raise
            with contextlib.suppress(OSError):  # committed: without its plan, staging has nothing to undo
                (staging / PLAN).unlink()
            shutil.rmtree(staging, ignore_errors=True)
        return [OutputRef(name=name, uri=str((self.root / name).resolve()), size_bytes=len(data))
                for name, data in files.items()]

    def recover(self, stem: str) -> None:
        """Roll back what a killed writer of ``stem`` left (call holding the stem's lock). No
        readable plan: it died before its first rename (the plan is written before) or after its
        set was committed (the plan is deleted first); no staged ``<stem>.json`` (renamed last):
        its set is whole. Either way the staging folder is just dropped."""
        for staging in self.root.glob(f"{_staging_prefix(stem)}*"):
            try:
                plan = json.loads((staging / PLAN).read_text())
            except (OSError, ValueError):
                plan = {}
            if not isinstance(plan, dict) or (f"{stem}.json" in plan and not (staging / f"{stem}.json").exists()):
                plan = {}
            _roll_back(self.root, staging, plan)

    @contextlib.contextmanager
    def _locked(self, stem: str) -> Iterator[None]:
        """The folder's write lock: an ``flock`` on the folder itself (no lock file to leave
        behind; every writer of the folder meets it, whatever its cache)."""
        import fcntl

        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(f"another run is still writing outputs in {self.root} after "
                                           f"{LOCK_WAIT_S:.0f} s (writing {stem!r}); retry later") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _staging_prefix(stem: str) -> str:
    """A staging folder's name prefix for exactly ``stem`` (a hash: no stem is a prefix of another's)."""
    import hashlib

    return f".staging-{hashlib.sha256(stem.encode()).hexdigest()[:16]}-"


def _stem(files: dict[str, bytes]) -> str:
    """The shared stem of a run's files (``<stem>.srt`` is the shortest name)."""
    return min(files, key=len).rsplit(".", 1)[0]


def _roll_back(root: Path, staging: Path, plan: dict[str, bool]) -> None:
    """Undo a partial write: names in ``plan`` that existed get their old file back (kept as a
    hard link in ``staging/old``); those that did not are removed. Then drop ``staging``."""
    for name, existed in plan.items():
        backup = staging / "old" / name
        with contextlib.suppress(OSError):
            if existed and backup.exists():
                os.replace(backup, root / name)
            elif not existed:
                (root / name).unlink(missing_ok=True)
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
        """Put every file, ``<stem>.json`` last; an object about to be overwritten is first copied
        (server-side) under ``<prefix>.backup/<nonce>/``. On a failure the objects this write added
        are deleted and the overwritten ones restored, so the bucket keeps the old set; the
        backups go once the set is complete. A cancel (``KeyboardInterrupt``, Prefect's
        ``TerminationSignal`` on a UI cancel or SIGTERM: any ``BaseException``) rolls back too and
        is re-raised as it is; an ``Exception`` becomes a :class:`StorageError`. The client retries
        throttling, 5xx and connection errors itself (botocore's standard mode)."""
        import uuid

        from speech.io.s3 import storage_error
        from speech.io.upload import content_type_for

        stem = _stem(files)
        nonce = uuid.uuid4().hex[:12]
        backups: dict[str, Optional[str]] = {}  # key -> its backup's key, None when it is new
        refs = []
        key = pending = ""
        try:
            for name in sorted(files, key=lambda n: n == f"{stem}.json"):
                key, pending = self.prefix + name, f"{self.prefix}.backup/{nonce}/{name}"
                backups[key] = self._backup(key, pending)
                self.client.put_object(Bucket=self.bucket, Key=key, Body=files[name], ContentType=content_type_for(name))
                refs.append(OutputRef(name=name, uri=f"s3://{self.bucket}/{key}", size_bytes=len(files[name]),
                                      url=self._url(key)))
        except BaseException as exc:  # noqa: BLE001 - every failure and cancel rolls back
            self._roll_back(backups)
            if key and key not in backups:  # stopped while copying its backup: drop a copy that landed
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=pending)
            if not isinstance(exc, Exception):
                raise
            raise storage_error(exc, f"cannot write s3://{self.bucket}/{key}", self.bucket) from None
        for backup in backups.values():
            if backup:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=backup)
        return refs

    def _backup(self, key: str, backup: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            self.client.copy_object(Bucket=self.bucket, Key=backup, CopySource={"Bucket": self.bucket, "Key": key})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return backup

    def _roll_back(self, backups: dict[str, Optional[str]]) -> None:
        for key, backup in backups.items():
            with contextlib.suppress(Exception):
                if backup:
                    self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": backup})
                    self.client.delete_object(Bucket=self.bucket, Key=backup)
                else:
                    self.client.delete_object(Bucket=self.bucket, Key=key)


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


def kept_folder(download_dir: Optional[str], prefix: str, settings: Optional[Settings] = None) -> Path:
    """Where a set the bucket refused is kept: ``download_dir`` (default ``RESULTS_DIR``) plus the
    bucket prefix's folders (``..`` and empty parts dropped), so a job-scoped prefix
    (``<prefix><stem>/<job id>/``) keeps the job's files in a folder of its own and a request
    naming a bucket that refuses it cannot write over another job's local files."""
    from pathlib import PurePosixPath

    base = Path(download_dir).expanduser() if download_dir else (settings or get_settings()).results_dir
    return Path(base).joinpath(*(p for p in PurePosixPath(prefix or "").parts if p not in ("/", ".", "..")))


def local_store(download_dir: Optional[str] = None, settings: Optional[Settings] = None) -> LocalStore:
    return LocalStore(Path(download_dir) if download_dir else (settings or get_settings()).results_dir)
