"""speech.io.upload against a real S3 protocol server (moto on 127.0.0.1, see conftest)."""
from __future__ import annotations

import hashlib
import logging
import os
import uuid

import pytest
import requests

from speech.errors import InvalidRequest, StorageError, TransientStorageError
from speech.io.upload import UploadResult, content_type_for, upload_audio


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bucket(s3):
    name = f"up-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    # versioning makes every PUT visible server-side, independent of timestamps
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def puts(s3):
    """Counts PutObject / multipart calls the client actually makes."""
    calls: list[str] = []

    def count(model, **_):
        calls.append(model.name)

    for op in ("PutObject", "CreateMultipartUpload"):
        s3.meta.events.register(f"before-call.s3.{op}", count)
    return calls


def _versions(s3, bucket: str, key: str) -> int:
    resp = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return len([v for v in resp.get("Versions", []) if v["Key"] == key])


def _audio(tmp_path, name="talk.mp3", data: bytes | None = None):
    data = data if data is not None else os.urandom(50_000)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def test_first_upload_then_skip_then_force(s3, bucket, puts, tmp_path):
    path, data = _audio(tmp_path)
    sha = _sha(data)

    first = upload_audio(str(path), sha, bucket=bucket, client=s3)
    assert isinstance(first, UploadResult)
    assert first.uploaded is True
    assert (first.bucket, first.key, first.uri) == (bucket, "audio/talk.mp3", f"s3://{bucket}/audio/talk.mp3")
    assert first.size_bytes == len(data) and first.sha256 == sha
    head = s3.head_object(Bucket=bucket, Key="audio/talk.mp3")
    assert head["Metadata"]["sha256"] == sha
    assert head["ContentType"] == "audio/mpeg"
    assert head["ContentLength"] == len(data)
    assert puts == ["PutObject"] and _versions(s3, bucket, first.key) == 1

    again = upload_audio(str(path), sha, bucket=bucket, client=s3)
    assert again.uploaded is False
    assert again.key == first.key and again.size_bytes == len(data)
    assert puts == ["PutObject"], "identical content must not be uploaded again"
    assert _versions(s3, bucket, first.key) == 1
    assert s3.head_object(Bucket=bucket, Key=first.key)["LastModified"] == head["LastModified"]

    forced = upload_audio(str(path), sha, bucket=bucket, client=s3, force=True)
    assert forced.uploaded is True
    assert puts == ["PutObject", "PutObject"]
    assert _versions(s3, bucket, first.key) == 2


def test_different_content_same_name_reuploads(s3, bucket, puts, tmp_path):
    (tmp_path / "a").mkdir()
    a, data_a = _audio(tmp_path / "a")
    first = upload_audio(str(a), _sha(data_a), bucket=bucket, client=s3)
    assert first.uploaded

    (tmp_path / "b").mkdir()
    b, data_b = _audio(tmp_path / "b", data=os.urandom(50_000))
    second = upload_audio(str(b), _sha(data_b), bucket=bucket, client=s3)
    assert second.uploaded is True and second.key == first.key
    assert len(puts) == 2 and _versions(s3, bucket, first.key) == 2
    body = s3.get_object(Bucket=bucket, Key=first.key)["Body"].read()
    assert body == data_b
    assert s3.head_object(Bucket=bucket, Key=first.key)["Metadata"]["sha256"] == _sha(data_b)


def test_name_and_prefix(s3, bucket, tmp_path):
    path, data = _audio(tmp_path, "local.wav")
    res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3, prefix_audio="in/2024/", name="ep1.wav")
    assert res.key == "in/2024/ep1.wav"
    assert s3.head_object(Bucket=bucket, Key=res.key)["ContentType"] == "audio/wav"


def test_object_from_another_tool_matched_by_etag(s3, bucket, puts, tmp_path):
    """No sha256 metadata (uploaded elsewhere): single-part ETag == MD5 and same size -> skip."""
    path, data = _audio(tmp_path)
    s3.put_object(Bucket=bucket, Key="audio/talk.mp3", Body=data)
    puts.clear()
    res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3)
    assert res.uploaded is False and puts == []

    s3.put_object(Bucket=bucket, Key="audio/talk.mp3", Body=data[:-1] + b"\x00")
    puts.clear()
    res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3)
    assert res.uploaded is True and puts == ["PutObject"]


def test_presigned_url_downloads_exact_bytes(s3, bucket, tmp_path):
    path, data = _audio(tmp_path)
    res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3, url_expiry=120)
    assert "X-Amz-Signature=" in res.presigned_url  # SigV4
    resp = requests.get(res.presigned_url, timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    # the skipped path presigns too
    again = upload_audio(str(path), _sha(data), bucket=bucket, client=s3)
    assert requests.get(again.presigned_url, timeout=10).content == data
    # the URL carries the lifetime we asked for
    assert "X-Amz-Expires=120" in res.presigned_url


def test_presigned_url_never_logged_or_reprd(s3, bucket, tmp_path, caplog):
    path, data = _audio(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="speech"):
        res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3)
        upload_audio(str(path), _sha(data), bucket=bucket, client=s3)
    query = res.presigned_url.split("?", 1)[1]
    assert query
    assert query not in caplog.text and "Signature" not in caplog.text
    assert query not in repr(res) and query not in str(res)


@pytest.mark.parametrize("expiry", [0, -5, 604801, 10**9, 1.5, True, "60"])
def test_expiry_validation(s3, bucket, tmp_path, expiry):
    path, data = _audio(tmp_path)
    with pytest.raises(InvalidRequest, match="url_expiry"):
        upload_audio(str(path), _sha(data), bucket=bucket, client=s3, url_expiry=expiry)


@pytest.mark.parametrize("expiry", [1, 604800])
def test_expiry_bounds_accepted(s3, bucket, tmp_path, expiry):
    path, data = _audio(tmp_path)
    res = upload_audio(str(path), _sha(data), bucket=bucket, client=s3, url_expiry=expiry)
    assert f"X-Amz-Expires={expiry}" in res.presigned_url


def test_no_such_bucket_is_clear_and_not_retryable(s3, tmp_path):
    path, data = _audio(tmp_path)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError, match=f"bucket '{missing}' does not exist") as info:
        upload_audio(str(path), _sha(data), bucket=missing, client=s3)
    assert not isinstance(info.value, TransientStorageError)
    assert info.value.retryable is False


def test_access_denied_mapping():
    from botocore.exceptions import ClientError

    from speech.io.s3 import storage_error as _storage_error

    denied = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
        "PutObject",
    )
    err = _storage_error(denied, "cannot upload x", "b")
    assert type(err) is StorageError
    assert "access denied" in str(err) and err.retryable is False

    slow = ClientError(
        {"Error": {"Code": "SlowDown", "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"
    )
    assert isinstance(_storage_error(slow, "x", "b"), TransientStorageError)


def test_connection_refused_is_retryable(tmp_path):
    import boto3
    from botocore.config import Config

    from deployments.local_server import free_port

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2),
    )
    path, data = _audio(tmp_path)
    with pytest.raises(TransientStorageError, match="cannot reach") as info:
        upload_audio(str(path), _sha(data), bucket="b", client=client)
    assert info.value.retryable is True


def test_bad_inputs(s3, bucket, tmp_path):
    path, data = _audio(tmp_path)
    with pytest.raises(InvalidRequest):
        upload_audio(str(path), "not-a-hash", bucket=bucket, client=s3)
    with pytest.raises(InvalidRequest):
        upload_audio(str(path), _sha(data), bucket="", client=s3)
    with pytest.raises(StorageError, match="not found"):
        upload_audio(str(tmp_path / "nope.mp3"), _sha(data), bucket=bucket, client=s3)


def test_content_types():
    assert content_type_for("a.mp3") == "audio/mpeg"
    assert content_type_for("a.M4A") == "audio/mp4"
    assert content_type_for("a.flac") == "audio/flac"
    assert content_type_for("noext") == "application/octet-stream"


@pytest.fixture
def swami_env(s3_server, monkeypatch, tmp_path):
    """Only the original pipeline's SWAMI_STORAGE_* names; no AWS_* credentials anywhere."""
    from speech.settings import get_settings

    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "RESULTS_BUCKET",
        "S3_BUCKET",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"swami-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SWAMI_STORAGE_ENDPOINT", s3_server)
    monkeypatch.setenv("SWAMI_STORAGE_BUCKET", bucket)
    monkeypatch.setenv("SWAMI_STORAGE_ACCESS_KEY", "swamikey")
    monkeypatch.setenv("SWAMI_STORAGE_SECRET_KEY", "swamisecret")
    get_settings.cache_clear()
    yield bucket
    monkeypatch.undo()
    get_settings.cache_clear()


def test_swami_env_aliases_make_a_working_client(swami_env, tmp_path):
    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    settings = get_settings()
    assert settings.s3_bucket == swami_env
    assert settings.s3_endpoint_url and settings.s3_endpoint_url.startswith("http://127.0.0.1:")
    assert settings.s3_access_key == "swamikey"
    assert settings.s3_secret_key.get_secret_value() == "swamisecret"
    assert "swamisecret" not in repr(settings)
    assert "swamisecret" in settings.secret_values()

    client = s3_client(settings)
    client.create_bucket(Bucket=settings.s3_bucket)
    path, data = _audio(tmp_path)
    # client=None: upload_audio builds its own client from the same settings
    res = upload_audio(str(path), _sha(data), bucket=settings.s3_bucket)
    assert res.uploaded
    assert "swamikey" in res.presigned_url  # signed with the SWAMI_* key
    assert requests.get(res.presigned_url, timeout=10).content == data


def test_settings_defaults_and_env(monkeypatch):
    from speech.settings import Settings

    for var in ("PREFIX_AUDIO", "URL_EXPIRY"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.prefix_audio == "audio/" and s.url_expiry == 3600
    monkeypatch.setenv("PREFIX_AUDIO", "src/")
    monkeypatch.setenv("URL_EXPIRY", "900")
    s = Settings()
    assert s.prefix_audio == "src/" and s.url_expiry == 900


def test_s3_client_accepts_secretstr_access_key(s3_server):
    """tasks/ overrides keys with model_copy(update=...), which may hand SecretStr for both."""
    from pydantic import SecretStr

    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    settings = get_settings().model_copy(
        update={"s3_access_key": SecretStr("copykey"), "s3_secret_key": SecretStr("copysecret")}
    )
    client = s3_client(settings)
    creds = client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("copykey", "copysecret")


def test_a_file_changed_since_its_fetch_is_not_uploaded(s3, bucket, puts, tmp_path):
    """What goes up is what was transcribed: the file is opened once, its bytes checked against
    the fetch's sha256 and uploaded from that open; a file replaced since (or swapped for a link
    to another file) is refused with one line, and the bucket is left as it was."""
    path, data = _audio(tmp_path, "swap.wav")
    fetched = _sha(data)
    other = tmp_path / "elsewhere.wav"
    other.write_bytes(os.urandom(50_000))
    path.unlink()
    path.symlink_to(other)
    with pytest.raises(StorageError, match="not the file that was fetched") as refused:
        upload_audio(str(path), fetched, bucket=bucket, client=s3, force=True)
    assert "\n" not in str(refused.value)
    assert puts == [] and _versions(s3, bucket, "audio/swap.wav") == 0
