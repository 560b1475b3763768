"""The one S3 client factory (boto3, SigV4, bounded timeouts and retries) and the mapping of
botocore failures to one-line, retry-aware :class:`StorageError`s."""
from __future__ import annotations

import os
from typing import Any, Optional

from speech.errors import StorageError, TransientStorageError
from speech.redact import redact_url, secret_value
from speech.contracts import S3Options
from speech.settings import Settings, get_settings


def s3_client(settings: Settings, endpoint_url: Optional[str] = None):
    """A boto3 S3 client.

    Credentials come from settings when both keys are set (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` or the original pipeline's ``SWAMI_STORAGE_ACCESS_KEY`` /
    ``SWAMI_STORAGE_SECRET_KEY``), else from boto3's usual chain (env, profiles, roles).
    """
    import boto3
    from botocore.config import Config

    # str or SecretStr: model_copy(update=...) skips validation
    access_key, secret_key = secret_value(settings.s3_access_key), secret_value(settings.s3_secret_key)
    creds = {}
    if access_key and secret_key:
        creds = {
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            # explicit keys make boto3 skip its env chain: keep a temporary session's token
            # when the key is the AWS_* env one it belongs to
            "aws_session_token": (
                os.environ.get("AWS_SESSION_TOKEN") or None
                if os.environ.get("AWS_ACCESS_KEY_ID") == access_key
                else None
            ),
        }
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or settings.s3_endpoint_url,
        region_name=settings.s3_region,
        **creds,
        config=Config(
            # SigV4 everywhere: R2/MinIO and newer AWS regions need it, and presigned URLs
            # otherwise fall back to legacy SigV2 on us-east-1
            signature_version="s3v4",
            connect_timeout=settings.http_connect_timeout,
            read_timeout=settings.http_read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


def s3_client_for(options: Optional[S3Options] = None) -> Any:
    """A client with a run's own endpoint / credentials over the environment's. In a process
    serving others (:func:`speech.policy.serving_others`) a run's own endpoint is connected to only
    at addresses the fetch policy allows, the address checked at each connection
    (:func:`speech.io.netguard.guard_botocore`: the admission check resolved the name once; a
    name that resolves elsewhere by the time of the upload does not reach a private address)."""
    from speech.policy import serving_others

    settings = get_settings()
    update: dict[str, Any] = {}
    if options is not None:
        if options.endpoint:
            update["s3_endpoint_url"] = options.endpoint
        if options.access_key:
            update["s3_access_key"] = options.access_key
        if options.secret_key:
            update["s3_secret_key"] = options.secret_key
    client = s3_client(settings.model_copy(update=update) if update else settings)
    if options is not None and options.endpoint and serving_others() and not settings.allow_request_endpoints:
        from speech.io.netguard import guard_botocore

        guard_botocore(client, settings)
    return client


_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
}


def storage_error(exc: BaseException, what: str, bucket: str) -> StorageError:
    """Map a botocore/boto3 failure to a one-line StorageError (retryable when transient)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    # upload_file wraps a ClientError in S3UploadFailedError (raised inside its except block)
    if isinstance(exc, S3UploadFailedError):
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, (ClientError, BotoCoreError)):
            exc = inner
        else:
            text = str(exc)
            for code in ("NoSuchBucket", *sorted(_DENIED_CODES), *sorted(_TRANSIENT_CODES)):
                if f"({code})" in text:
                    return _storage_error_for_code(code, 0, what, bucket)
            return StorageError(f"{what}: upload failed")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return _storage_error_for_code(str(err.get("Code", "")), int(status), what, bucket)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "")
        where = f" ({redact_url(endpoint)})" if endpoint else ""
        return TransientStorageError(f"{what}: cannot reach the S3 endpoint{where}: {type(exc).__name__}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or SWAMI_STORAGE_ACCESS_KEY/SWAMI_STORAGE_SECRET_KEY)"
        )
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientStorageError(f"{what}: connection failed: {type(exc).__name__}")
    return StorageError(f"{what}: {type(exc).__name__}")


def _storage_error_for_code(code: str, status: int, what: str, bucket: str) -> StorageError:
    if code == "NoSuchBucket":
        return StorageError(f"{what}: bucket {bucket!r} does not exist")
    if code in _DENIED_CODES or status == 403:
        return StorageError(f"{what}: access denied to bucket {bucket!r} ({code or status}); check the credentials")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientStorageError(f"{what}: S3 error {code or status} (retryable)")
    return StorageError(f"{what}: S3 error {code or status}")
