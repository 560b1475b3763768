"""Resolve the run's results store, including saved prefect-aws blocks (Prefect-only glue)."""
from __future__ import annotations

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
