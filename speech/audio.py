"""Fetch audio from a path, http(s) URL or s3:// URI; hash it; decode it to 16 kHz mono.

The sha256 of the source bytes is computed while the bytes stream past (one read), and is
the identity every later stage caches on. Decoding uses PyAV (FFmpeg libraries shipped in
the wheel, no system ffmpeg). Decoded samples are cached as ``<cache>/audio/<sha256>.npy``
so later stages and reruns load them with one memory map instead of decoding again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from speech.errors import AudioError, FetchError, TransientFetchError
from speech.schema import AudioRef
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------
# naming


def redact_url(source: str) -> str:
    """Drop query string, fragment and userinfo (presigned URLs carry credentials)."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https", "s3"):
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return source


def stem_of(source: str) -> str:
    """A safe output stem from a path, URL or S3 key: 'talk.mp3' -> 'talk'."""
    path = urlsplit(source).path if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", source) else source
    name = Path(unquote(path)).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128]
    return stem or "audio"


# ----------------------------------------------------------------------------------
# fetching


@dataclass
class FetchedFile:
    path: Path
    sha256: str
    size: int
    temporary: bool  # True when we downloaded it and the caller may delete it


def _copy_hashing(src: BinaryIO, dst: Optional[BinaryIO], limit: int, label: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise AudioError(f"{label}: larger than the {limit} byte limit (MAX_AUDIO_BYTES)")
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


def _download_to(dir_: Path, writer: Callable[[BinaryIO], tuple[str, int]]) -> FetchedFile:
    dir_.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dir_, prefix="dl-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            digest, size = writer(f)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FetchedFile(Path(tmp), digest, size, temporary=True)


def _fetch_local(source: str, settings: Settings) -> FetchedFile:
    path = Path(unquote(urlsplit(source).path) if source.startswith("file://") else source).expanduser()
    if not path.exists():
        raise FetchError(f"audio file not found: {path}")
    if not path.is_file():
        raise FetchError(f"not a regular file: {path}")
    try:
        with path.open("rb") as f:
            digest, size = _copy_hashing(f, None, settings.max_audio_bytes, str(path))
    except PermissionError:
        raise FetchError(f"permission denied reading {path}") from None
    return FetchedFile(path, digest, size, temporary=False)


def _fetch_http(source: str, settings: Settings, dir_: Path) -> FetchedFile:
    import requests

    shown = redact_url(source)
    try:
        resp = requests.get(
            source, stream=True, timeout=(settings.http_connect_timeout, settings.http_read_timeout)
        )
    except requests.exceptions.InvalidURL as exc:
        raise FetchError(f"invalid URL {shown}: {exc}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientFetchError(f"cannot reach {shown}: {type(exc).__name__}") from None
    except requests.exceptions.RequestException as exc:
        raise FetchError(f"cannot fetch {shown}: {exc}") from None
    with resp:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientFetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise FetchError(f"{shown}: HTTP {resp.status_code} {resp.reason}")
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > settings.max_audio_bytes:
            raise AudioError(f"{shown}: {length} bytes exceeds the MAX_AUDIO_BYTES limit")
        resp.raw.decode_content = True
        try:
            return _download_to(dir_, lambda f: _copy_hashing(resp.raw, f, settings.max_audio_bytes, shown))
        except (requests.exceptions.RequestException, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                raise
            raise TransientFetchError(f"download of {shown} broke off: {type(exc).__name__}") from None


def s3_client(settings: Settings, endpoint_url: Optional[str] = None):
    """A boto3 S3 client.

    Credentials come from settings when both keys are set (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` or the original pipeline's ``SWAMI_STORAGE_ACCESS_KEY`` /
    ``SWAMI_STORAGE_SECRET_KEY``), else from boto3's usual chain (env, profiles, roles).
    """
    import boto3
    from botocore.config import Config

    def plain(value) -> Optional[str]:  # str or SecretStr (model_copy(update=...) skips validation)
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        return value or None

    access_key, secret_key = plain(settings.s3_access_key), plain(settings.s3_secret_key)
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


def _fetch_s3(source: str, settings: Settings, dir_: Path) -> FetchedFile:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    parts = urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise FetchError(f"bad S3 URI {source!r}; expected s3://bucket/key")
    client = s3_client(settings)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head.get("ContentLength", 0) > settings.max_audio_bytes:
            raise AudioError(f"{source}: {head['ContentLength']} bytes exceeds the MAX_AUDIO_BYTES limit")
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return _download_to(dir_, lambda f: _copy_hashing(body, f, settings.max_audio_bytes, source))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FetchError(f"{source}: no such object") from None
        if code in ("NoSuchBucket",):
            raise FetchError(f"{source}: no such bucket") from None
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            raise TransientFetchError(f"{source}: S3 error {code}") from None
        raise FetchError(f"{source}: S3 error {code or status}") from None
    except EndpointConnectionError:
        raise TransientFetchError(f"{source}: cannot reach the S3 endpoint") from None
    except BotoCoreError as exc:
        raise FetchError(f"{source}: {type(exc).__name__}: {exc}") from None


def fetch(source: str, settings: Optional[Settings] = None) -> FetchedFile:
    """Bring the source bytes to a local file and hash them in the same pass."""
    settings = settings or get_settings()
    scheme = urlsplit(source).scheme.lower()
    dl_dir = settings.jobs_dir or settings.cache_dir / "downloads"
    if scheme in ("http", "https"):
        fetched = _fetch_http(source, settings, dl_dir)
    elif scheme == "s3":
        fetched = _fetch_s3(source, settings, dl_dir)
    else:
        fetched = _fetch_local(source, settings)
    if fetched.size == 0:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
        raise AudioError(f"{redact_url(source)}: empty file (0 bytes)")
    return fetched


# ----------------------------------------------------------------------------------
# decoding


def decode(path: Path, label: str, max_seconds: float) -> tuple[np.ndarray, str]:
    """Decode any FFmpeg-readable audio to 16 kHz mono float32; detect truncation."""
    import av

    cut = _riff_truncation(path)
    if cut is not None:
        raise AudioError(f"{label}: truncated WAV (header declares {cut[0]} data bytes, file holds {cut[1]})")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AudioError(f"{label}: not a readable audio file ({_av_reason(exc)})") from None
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioError(f"{label}: no audio stream in the file")
        stream = streams[0]
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if declared is None and container.duration:
            declared = container.duration / 1_000_000
        if declared is not None and declared > max_seconds:
            raise AudioError(f"{label}: {declared:.0f} s is longer than the {max_seconds:.0f} s limit")
        fmt = f"{container.format.name}/{stream.codec_context.name}"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                frame.pts = None
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as exc:
            if not chunks:
                raise AudioError(f"{label}: not a readable audio file ({_av_reason(exc)})") from None
            raise AudioError(f"{label}: corrupt or truncated audio ({_av_reason(exc)})") from None
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    decoded = audio.shape[0] / SAMPLE_RATE
    if audio.shape[0] == 0:
        raise AudioError(f"{label}: contains no audio samples")
    if decoded > max_seconds:
        raise AudioError(f"{label}: {decoded:.0f} s is longer than the {max_seconds:.0f} s limit")
    if declared is not None and declared > 0.5 and decoded < 0.9 * declared - 0.1:
        raise AudioError(
            f"{label}: truncated audio (header declares {declared:.2f} s, only {decoded:.2f} s decodable)"
        )
    if not np.isfinite(audio).all():
        raise AudioError(f"{label}: decoded samples are not finite")
    return audio, fmt


def _riff_truncation(path: Path) -> Optional[tuple[int, int]]:
    """For RIFF/WAVE files: (declared data bytes, present data bytes) when data is missing.

    FFmpeg quietly decodes what is there, so a cut-off WAV would pass as a shorter file.
    Streaming writers put 0 or 0xFFFFFFFF in the size field; those are not judged.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            hdr = f.read(8)
            cid, clen = hdr[:4], int.from_bytes(hdr[4:8], "little")
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF):
                    return None
                present = size - (pos + 8)
                return (clen, present) if present < clen else None
            pos += 8 + clen + (clen & 1)
    return None


def _av_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).split(":")[0] or type(exc).__name__


# ----------------------------------------------------------------------------------
# the stage


def load_audio(source: str, output_name: Optional[str] = None, settings: Optional[Settings] = None) -> AudioRef:
    """Fetch + hash + decode. Raises AudioError/FetchError with a one-line reason."""
    settings = settings or get_settings()
    shown = redact_url(source)
    fetched = fetch(source, settings)
    try:
        cache = settings.cache_dir / "audio"
        cache.mkdir(parents=True, exist_ok=True)
        npy = cache / f"{fetched.sha256}.npy"
        meta = cache / f"{fetched.sha256}.fmt"
        if npy.exists() and meta.exists():
            audio = np.load(npy, mmap_mode="r")
            fmt = meta.read_text().strip()
        else:
            audio, fmt = decode(fetched.path, shown, settings.max_audio_seconds)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".npy.part")
            with os.fdopen(fd, "wb") as f:
                np.save(f, audio)
            os.replace(tmp, npy)
            meta.write_text(fmt)
    finally:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
    return AudioRef(
        sha256=fetched.sha256,
        source=shown,
        stem=output_name or stem_of(source),
        decoded_path=str(npy),
        duration=round(audio.shape[0] / SAMPLE_RATE, 3),
        size_bytes=fetched.size,
        format=fmt,
    )


def read_samples(ref: AudioRef) -> np.ndarray:
    """The decoded samples of a fetched file (memory-mapped, float32)."""
    try:
        return np.load(ref.decoded_path, mmap_mode="r")
    except FileNotFoundError:
        raise AudioError(f"decoded audio cache {ref.decoded_path} vanished; rerun with force") from None


def write_wav(samples: np.ndarray, path: Path) -> None:
    """16 kHz mono 16-bit PCM: a compact upload for hosted APIs, whatever the source format."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
