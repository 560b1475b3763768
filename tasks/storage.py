"""Resolve the run's results store, including saved prefect-aws blocks (Prefect-only glue)."""
from __future__ import annotations

from typing import Optional

from speech.settings import get_settings
from speech.storage import ResultStore, S3Store, open_store


def results_store(download_dir: Optional[str], bucket: Optional[str], prefix: Optional[str]) -> ResultStore:
    """``RESULTS_S3_BLOCK`` names a saved ``S3Bucket`` block: its bucket, folder and
    credentials (AwsCredentials or MinIOCredentials, endpoint included) are used unless the
    run asks for a local ``download_dir``; run parameters override its bucket and folder."""
    block_name = get_settings().s3_block
    if block_name and not download_dir:
        from prefect_aws import S3Bucket

        block = S3Bucket.load(block_name)
        return S3Store(
            bucket or block.bucket_name,
            prefix if prefix is not None else block.bucket_folder,
            block.credentials.get_s3_client(),
        )
    return open_store(download_dir=download_dir, bucket=bucket, prefix=prefix)
