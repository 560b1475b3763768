"""Resolve the run's results store, including saved prefect-aws blocks (Prefect-only glue)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import SecretStr

from speech.settings import get_settings
from speech.storage import ResultStore, S3Store, open_store


def s3_client_for(endpoint: Optional[str] = None, access_key: Optional[str] = None,
                  secret_key: Optional[str] = None) -> Any:
    """A boto3 client with the run's endpoint/credentials over the environment's."""
    from speech.audio import s3_client

    settings = get_settings()
    update: dict[str, Any] = {}
    if endpoint:
        update["s3_endpoint_url"] = endpoint
    if access_key:
        update["s3_access_key"] = SecretStr(access_key)
    if secret_key:
        update["s3_secret_key"] = SecretStr(secret_key)
    return s3_client(settings.model_copy(update=update) if update else settings)


def results_store(download_dir: Optional[str], bucket: Optional[str], prefix: Optional[str],
                  s3_options: Optional[dict[str, Any]] = None) -> ResultStore:
    """``RESULTS_S3_BLOCK`` names a saved ``S3Bucket`` block: its bucket, folder and
    credentials (AwsCredentials or MinIOCredentials, endpoint included) are used unless the
    run asks for a local ``download_dir``; run parameters override its bucket and folder."""
    block_name = get_settings().s3_block
    if block_name and not bucket and not download_dir:
        from prefect_aws import S3Bucket

        block = S3Bucket.load(block_name)
        return S3Store(
            bucket or block.bucket_name,
            prefix if prefix is not None else block.bucket_folder,
            block.credentials.get_s3_client(),
        )
    client = s3_client_for(**s3_options) if s3_options and any(s3_options.values()) else None
    return open_store(download_dir=download_dir, bucket=bucket, prefix=prefix, client=client)
