"""Fetch, hash and probe the audio (retried on transient network errors only)."""
from __future__ import annotations

from typing import Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from speech.io.audio import load_audio
from speech.contracts import AudioRef
from tasks.common import NETWORK_BACKOFF, NETWORK_RETRIES, retry_transient


@task(
    name="fetch-audio",
    retries=NETWORK_RETRIES,
    retry_delay_seconds=NETWORK_BACKOFF,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,  # the bytes must be read to know their hash
)
def fetch_audio(audio_file: str, output_name: Optional[str] = None, keep_bytes: bool = False,
                sha256: Optional[str] = None) -> AudioRef:
    """Fetch (path/http/s3), hash (it must be ``sha256`` when given) and probe the audio; returns a
    small reference. The samples are decoded by the first stage that needs them (none, when every
    stage is a cache hit)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()  # retries share one download deadline, counted from the first attempt
    first = ctx.task_run.start_time if ctx is not None and ctx.task_run.start_time is not None else None
    ref = load_audio(audio_file, output_name, decode_now=False, keep_bytes=keep_bytes,
                     since=first.timestamp() if first is not None else None, sha256=sha256)
    get_run_logger().info(
        "fetched %s: %.1f s, %s, %d bytes, sha256 %s", ref.source, ref.duration, ref.format, ref.size_bytes, ref.sha256[:12]
    )
    return ref
