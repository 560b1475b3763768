"""Where a run's outputs go (results store) and where Prefect keeps task results and cache
records (result storage), including saved prefect-aws blocks (Prefect-only glue)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from speech.errors import InvalidRequest
from speech.io.s3 import s3_client_for
from speech.io.store import OutputTarget, ResultStore, S3Store, open_store
from speech.settings import get_settings


def results_store(target: OutputTarget) -> ResultStore:
    """``RESULTS_S3_BLOCK`` names a saved ``S3Bucket`` block: its bucket, folder and
    credentials (AwsCredentials or MinIOCredentials, endpoint included) are used unless the
    run asks for a bucket or a local ``download_dir`` of its own."""
    block_name = get_settings().s3_block
    if block_name and not target.bucket and not target.download_dir:
        from prefect_aws import S3Bucket

        block = S3Bucket.load(block_name)
        return S3Store(block.bucket_name, target.prefix if target.prefix is not None else block.bucket_folder,
                       block.credentials.get_s3_client())
    client = s3_client_for(target.s3) if target.s3.given() else None
    return open_store(download_dir=target.download_dir, bucket=target.bucket, prefix=target.prefix, client=client)


def job_outputs(req: Any, job_id: str, name_is_ours: bool = False) -> Any:
    """``req`` with its outputs under the job's own key (:func:`speech.policy.job_scoped`),
    the ``RESULTS_S3_BLOCK`` bucket's folder included when the outputs go there."""
    from speech.policy import job_scoped

    settings = get_settings()
    folder = None
    if settings.s3_block and not req.bucket and not req.download_dir and (name_is_ours or not req.output_name):
        from prefect_aws import S3Bucket

        folder = S3Bucket.load(settings.s3_block).bucket_folder or ""
    return job_scoped(req, job_id, settings, block_folder=folder, name_is_ours=name_is_ours)


_STORAGE: dict[tuple, Any] = {}


def _log() -> Any:
    from prefect.logging import get_logger, get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(__name__)


def task_result_storage() -> Optional[Any]:
    """The file system for task results and cache records: the ``S3Bucket`` block named by
    ``RESULTS_STORAGE_BLOCK``, else ``RESULTS_STORAGE`` (``s3://bucket/prefix`` or a folder), else
    None (Prefect's default, ``$PREFECT_HOME/storage``: one machine's disk). Prefect wants it
    saved server-side, so ``RESULTS_STORAGE`` is saved as a block named after it, holding the
    endpoint and region but no keys: S3 credentials come from boto3's chain (AWS_* variables,
    profile, instance or pod role) where the task runs. Resolved once per process and setting."""
    settings = get_settings()
    key = (settings.results_storage_block, settings.results_storage, settings.s3_endpoint_url, settings.s3_region)
    if key not in _STORAGE:
        _STORAGE[key] = _build_result_storage(settings)
    return _STORAGE[key]


def _build_result_storage(settings: Any) -> Optional[Any]:
    if settings.results_storage_block:
        from prefect_aws import S3Bucket

        try:
            return S3Bucket.load(settings.results_storage_block)
        except ValueError:  # "Unable to find block document named ..."
            _log().warning(
                "RESULTS_STORAGE_BLOCK names no saved S3Bucket block %r (infra/bootstrap.sh saves "
                "whisperx-task-results when RESULTS_BUCKET and S3 credentials are set): task results "
                "and cache records stay on this machine", settings.results_storage_block)
    where = (settings.results_storage or "").strip()
    if not where:
        return None
    name = "task-results-" + hashlib.sha256(f"{where} {settings.s3_endpoint_url}".encode()).hexdigest()[:12]
    if where.startswith("s3://"):
        parts = urlsplit(where)
        if not parts.netloc:
            raise InvalidRequest(f"RESULTS_STORAGE {where!r}: expected s3://bucket/prefix")
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters

        credentials = AwsCredentials(region_name=settings.s3_region,
                                     aws_client_parameters=AwsClientParameters(endpoint_url=settings.s3_endpoint_url))
        block: Any = S3Bucket(bucket_name=parts.netloc, bucket_folder=parts.path.strip("/"), credentials=credentials)
    else:
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=str(Path(where).expanduser().resolve()))
    try:  # saved by an earlier run with the same settings: reuse it (one API read, no write)
        saved = type(block).load(name)
        if saved.model_dump(exclude_none=True) == block.model_dump(exclude_none=True):
            return saved
    except ValueError:  # not saved yet
        pass
    block.save(name, overwrite=True)
    return block


def path_exists(storage: Any, path: str) -> bool:
    """Whether ``path`` is in the storage block already (a folder: a stat; S3: a HEAD request)."""
    from prefect.filesystems import LocalFileSystem

    if isinstance(storage, LocalFileSystem):
        return (Path(storage.basepath) / path).is_file()
    try:
        storage.credentials.get_s3_client().head_object(Bucket=storage.bucket_name, Key=_s3_key(storage, path))
        return True
    except Exception:  # noqa: BLE001 - missing (404) or unknown
        return False


def write_whole(storage: Any, path: str, data: bytes) -> None:
    """Write ``path`` in the storage block so a reader finds the whole content or nothing: a
    folder gets a temporary name renamed into place (a writer killed mid-write leaves no short
    file under ``path``); an S3 PUT is whole already."""
    from prefect.filesystems import LocalFileSystem

    from speech.io.files import write_whole as write_file_whole

    if isinstance(storage, LocalFileSystem):
        write_file_whole(Path(storage.basepath).expanduser() / path, data)
    else:
        storage.write_path(path, data)


def read_if_there(storage: Any, path: str) -> Optional[bytes]:
    """The bytes at ``path`` in the storage block, or None when there are none."""
    try:
        return storage.read_path(path)
    except Exception:  # noqa: BLE001 - missing: ValueError (folder), ClientError/NoSuchKey (S3)
        return None


def remove_path(storage: Any, path: str) -> None:
    """Delete ``path`` from the storage block (a folder or an S3Bucket); missing is fine."""
    from prefect.filesystems import LocalFileSystem

    if isinstance(storage, LocalFileSystem):
        (Path(storage.basepath) / path).unlink(missing_ok=True)
        return
    try:
        storage.credentials.get_s3_client().delete_object(Bucket=storage.bucket_name, Key=_s3_key(storage, path))
    except Exception:  # noqa: BLE001 - best effort: a leftover marker is harmless
        _log().debug("could not delete %s from the result storage", path, exc_info=True)


def _s3_key(storage: Any, path: str) -> str:
    return storage._join_bucket_folder(path)  # S3Bucket: bucket_folder/path
