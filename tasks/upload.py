"""Upload the source audio to the bucket and presign it (the original pipeline's first step)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from speech.io.s3 import s3_client_for
from speech.io.upload import UploadResult, upload_audio
from speech.redact import redact_url
from speech.contracts import AudioRef, S3Options
from tasks.common import NETWORK_BACKOFF, NETWORK_RETRIES, retry_transient


@task(name="upload-audio", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE, persist_result=False)  # presigned URL: never stored
def upload(local_path: str, audio: AudioRef, bucket: str, prefix_audio: str, force: bool, url_expiry: int,
           s3: S3Options) -> UploadResult:
    """Skip-if-same-content upload under ``prefix_audio``, then a presigned GET URL."""
    result = upload_audio(local_path, audio.sha256, bucket=bucket, prefix_audio=prefix_audio, force=force,
                          url_expiry=url_expiry, client=s3_client_for(s3))
    get_run_logger().info("%s %s (%d bytes); presigned for %d s: %s", "uploaded" if result.uploaded else "already in",
                          result.uri, result.size_bytes, url_expiry, redact_url(result.presigned_url))
    return result
