"""The one settings object: every environment variable the pipeline reads lives here.

Secrets are ``SecretStr`` so they never show up in ``repr``, logs or dumps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class SecretSpec:
    """One secret, everywhere it appears: the request field a run may pass it in, the
    :class:`Settings` field that reads its env var, and the Prefect Secret block a worker falls
    back to (None: S3 keys come from ``AwsCredentials`` / ``S3Bucket`` blocks instead)."""

    request_field: str
    setting: str
    env: str
    block: Optional[str]
    speakers_only: bool = False  # needed only by the speaker stages (diarization / verification)


SECRETS: tuple[SecretSpec, ...] = (
    SecretSpec("huggingface_access_token", "hf_token", "HF_TOKEN", "hf-token", speakers_only=True),
    SecretSpec("pyannote_api_key", "pyannote_api_key", "PYANNOTE_API_KEY", "pyannote-api-key", speakers_only=True),
    SecretSpec("deepgram_api_key", "deepgram_api_key", "DEEPGRAM_API_KEY", "deepgram-api-key"),
    SecretSpec("access_key", "s3_access_key", "AWS_ACCESS_KEY_ID", None),
    SecretSpec("secret_key", "s3_secret_key", "AWS_SECRET_ACCESS_KEY", None),
)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "speech-pipeline"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    # --- models -----------------------------------------------------------------------
    whisperx_model: Optional[str] = Field(
        None,
        validation_alias=AliasChoices("WHISPERX_MODEL", "WHISPERX_MODEL_NAME"),
        description="Whisper model name (hub) or directory; overrides the shipped model.",
    )
    whisperx_model_dir: Optional[Path] = Field(
        None,
        validation_alias="WHISPERX_MODEL_DIR",
        description="Directory holding a CTranslate2 model.bin; used when it exists.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias="WHISPERX_DEVICE")
    compute_type: Optional[str] = Field(
        None,
        validation_alias="WHISPERX_COMPUTE_TYPE",
        description="CTranslate2 compute type; default float16 on CUDA, int8 on CPU.",
    )
    cpu_threads: int = Field(0, validation_alias="WHISPERX_CPU_THREADS", description="0 = all cores")
    cpu_batch_size: int = Field(
        8, ge=0, validation_alias="WHISPERX_CPU_BATCH_SIZE",
        description="On the CPU, decode at most this many 30 s chunks at once, whatever batch_size asks (0 = no "
        "cap): the transcript is identical and CPU speed flat from 8 up, while memory grows with every chunk "
        "decoded at once (Whisper base: +0.95 GB at 8, +2.2 GB at 24; an hour at the worker's 64: +6.5 GB).")
    vad_model_path: Optional[Path] = Field(None, validation_alias="VAD_MODEL_PATH")
    vad_step_seconds: float = Field(
        1.0,
        gt=0,
        le=5.0,
        validation_alias="VAD_STEP_SECONDS",
        description="Hop between the VAD's 5 s scoring windows. whisperx uses 0.5 (10x overlap); "
        "1.0 gave identical speech chunks on our fixtures at half the VAD time.",
    )
    campplus_weights: Optional[Path] = Field(
        None, validation_alias="CAMPPLUS_WEIGHTS",
        description="CAM++ speaker-encoder checkpoint (default: the copy `make setup` installs in the environment).",
    )
    align_model_dir: Optional[Path] = Field(
        None, validation_alias="ALIGN_MODEL_DIR", description="Cache/download dir for wav2vec2 align models."
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir, validation_alias="SPEECH_CACHE_DIR")
    decode_cache_max_gb: float = Field(
        20.0, ge=0, validation_alias="DECODE_CACHE_MAX_GB",
        description="Size cap of the decoded-audio cache (<SPEECH_CACHE_DIR>/audio); the least recently used "
        "entries go first (0: keep only the newest).",
    )

    # --- inputs -----------------------------------------------------------------------
    max_audio_bytes: int = Field(2 * 1024**3, validation_alias="MAX_AUDIO_BYTES")
    max_audio_seconds: float = Field(6 * 3600.0, validation_alias="MAX_AUDIO_SECONDS")
    max_sample_seconds: float = Field(
        120.0, gt=0, validation_alias="MAX_SAMPLE_SECONDS",
        description="Longest speaker-enrolment clip read (seconds); a longer one is refused.",
    )
    max_speaker_samples: int = Field(
        20, ge=0, validation_alias="MAX_SPEAKER_SAMPLES",
        description="Most speaker-enrolment clips one request may give.",
    )
    max_request_bytes: int = Field(
        1_000_000, gt=0, validation_alias="MAX_REQUEST_BYTES",
        description="Largest request body the RunPod-compatible endpoint reads (bytes); larger: 413.",
    )
    http_connect_timeout: float = Field(10.0, validation_alias="HTTP_CONNECT_TIMEOUT")
    http_read_timeout: float = Field(60.0, validation_alias="HTTP_READ_TIMEOUT")
    http_max_seconds: float = Field(
        3600.0, gt=0, validation_alias="HTTP_MAX_SECONDS",
        description="Total deadline of one download (curl's --max-time).",
    )
    http_min_rate: int = Field(
        1024, ge=0, validation_alias="HTTP_MIN_BYTES_PER_SECOND",
        description="A download slower than this (bytes/s) over HTTP_MIN_RATE_SECONDS is abandoned (curl's "
        "--speed-limit; 0 turns it off).",
    )
    http_min_rate_seconds: float = Field(30.0, gt=0, validation_alias="HTTP_MIN_RATE_SECONDS")
    allow_private_urls: bool = Field(
        False, validation_alias="ALLOW_PRIVATE_URLS",
        description="Fetch http(s) URLs that resolve to loopback, link-local, private, multicast or unspecified "
        "addresses (off: such URLs, and redirects to them, are refused).",
    )
    fetch_allow_hosts: str = Field(
        "", validation_alias="FETCH_ALLOW_HOSTS",
        description="Comma-separated hosts (or host:port) fetched even when they resolve to a private address.",
    )
    allow_request_endpoints: bool = Field(
        False, validation_alias="ALLOW_REQUEST_ENDPOINTS",
        description="Requests from others may name their own s3_endpoint without their own keys (it would be sent "
        "the worker's S3 credentials), any diarization_model (a pyannote config can build arbitrary classes) and "
        "any align_model. Off: s3_endpoint needs access_key + secret_key and a public address; diarization_model "
        "must be a published pyannote pipeline, align_model one of whisperx's per-language models. Values from the environment are always trusted.",
    )
    allow_s3_sources: str = Field(
        "*", validation_alias="ALLOW_S3_SOURCES",
        description="For requests from others: the s3:// roots ('bucket' or 'bucket/prefix/', separated by ',') "
        "that audio, speaker samples and sweep sources may be read from with the worker's S3 credentials; '*' any "
        "(the default, except on an endpoint with several callers, which refuses s3:// sources until this names "
        "the roots they may read), 'none' none. Local runs (CLI, Python) are not restricted.",
    )
    allow_local_paths: str = Field(
        "", validation_alias="ALLOW_LOCAL_PATHS",
        description="For requests from others (deployment runs, the RunPod-compatible endpoint and handler, "
        "task jobs, sweeps): '1' allows any local path or file:// URL (audio, speaker samples, *_json_in, "
        "download_dir, model folders, sweep sources), or a list of root folders (separated by ':' or ',') it must "
        "resolve inside; empty refuses them. Local runs (CLI, Python) are not restricted.",
    )

    # --- results store ----------------------------------------------------------------
    results_dir: Path = Field(Path("out"), validation_alias="RESULTS_DIR")
    s3_bucket: Optional[str] = Field(
        None, validation_alias=AliasChoices("RESULTS_BUCKET", "S3_BUCKET", "SWAMI_STORAGE_BUCKET", "STORAGE_BUCKET")
    )
    s3_prefix: str = Field("transcripts/", validation_alias=AliasChoices("RESULTS_PREFIX", "S3_PREFIX", "PREFIX_TRANSCRIPTS"))
    s3_endpoint_url: Optional[str] = Field(
        None,
        validation_alias=AliasChoices(
            "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "SWAMI_STORAGE_ENDPOINT", "STORAGE_ENDPOINT"
        ),
    )
    s3_access_key: Optional[str] = Field(
        None,
        validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "SWAMI_STORAGE_ACCESS_KEY", "STORAGE_ACCESS_KEY"),
        description="S3 access key id; passed to boto3 explicitly when set.",
    )
    s3_secret_key: Optional[SecretStr] = Field(
        None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "SWAMI_STORAGE_SECRET_KEY", "STORAGE_SECRET_KEY")
    )
    prefix_audio: str = Field(
        "audio/", validation_alias="PREFIX_AUDIO", description="Key prefix for uploaded source audio."
    )
    url_expiry: int = Field(
        3600,
        validation_alias=AliasChoices("URL_EXPIRY", "PRESIGN_TTL"),
        description="Lifetime in seconds of presigned GET URLs, 1..604800 (S3's 7-day maximum); "
        "checked where a URL is presigned so a bad value fails as a clear InvalidRequest.",
    )
    s3_block: Optional[str] = Field(
        None,
        validation_alias="RESULTS_S3_BLOCK",
        description="Name of a saved prefect-aws S3Bucket block for results (resolved by tasks/).",
    )
    s3_region: Optional[str] = Field(None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    results_storage: Optional[str] = Field(
        None,
        validation_alias="RESULTS_STORAGE",
        description="s3://bucket/prefix (or a folder) for Prefect's task results and cache records, shared by "
        "every worker and container (endpoint and credentials as for the results bucket).",
    )
    results_storage_block: Optional[str] = Field(
        None,
        validation_alias="RESULTS_STORAGE_BLOCK",
        description="Name of a saved prefect-aws S3Bucket block for the same (wins over RESULTS_STORAGE).",
    )

    diarization_model: Optional[str] = Field(
        None, validation_alias=AliasChoices("PYANNOTE_DIARIZATION_MODEL", "DIARIZATION_MODEL"),
        description="The local pyannote pipeline (hub name or directory) when a run names none; trusted, unlike "
        "the diarization_model run parameter in deployment runs (see ALLOW_REQUEST_ENDPOINTS).",
    )

    # --- hosted APIs ------------------------------------------------------------------
    pyannote_api_url: Optional[str] = Field(
        None,
        validation_alias="PYANNOTE_API_URL",
        description="pyannoteAI API base URL (default https://api.pyannote.ai/v1; a bare host gets /v1).",
    )

    # --- secrets (never logged) -------------------------------------------------------
    hf_token: Optional[SecretStr] = Field(
        None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_ACCESS_TOKEN")
    )
    deepgram_api_key: Optional[SecretStr] = Field(None, validation_alias="DEEPGRAM_API_KEY")
    pyannote_api_key: Optional[SecretStr] = Field(None, validation_alias="PYANNOTE_API_KEY")
    runpod_api_key: Optional[SecretStr] = Field(
        None, validation_alias=AliasChoices("RUNPOD_API_KEY", "SWAMI_RUNPOD_API_KEY"),
        description="The CLI's remote mode (--endpoint): the key sent to a RunPod-compatible endpoint.")

    debug: bool = Field(False, validation_alias="DEBUG")

    # --- the original worker's runtime switches (also set in the Dockerfile) ----------
    jobs_dir: Optional[Path] = Field(
        None, validation_alias="JOBS_DIR",
        description="Scratch folder for downloaded inputs (http/s3); each file is removed once decoded "
        "(default <SPEECH_CACHE_DIR>/downloads).",
    )
    console_log_level: Optional[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]] = Field(
        None, validation_alias="CONSOLE_LOG_LEVEL",
        description="Level of flow runs' console (stdout) logs; the Prefect API still gets every log.",
    )
    gpu_task_workers: bool = Field(
        False, validation_alias="GPU_TASK_WORKERS",
        description="Send the GPU stages (transcribe, align, local diarization, speaker embeddings) to warm task "
        "workers (python -m deployments.task_worker) instead of running them in the flow-run process.",
    )
    gpu_task_pickup_timeout: float = Field(
        300.0, gt=0, validation_alias="GPU_TASK_PICKUP_TIMEOUT",
        description="A GPU task waits in the queue while a task worker serves it (busy workers: as long as it "
        "takes); with no task worker serving it for this many seconds, or workers connected but idle without "
        "taking it, the run fails, saying so.")
    gpu_task_timeout: float = Field(
        0.0, ge=0, validation_alias="GPU_TASK_TIMEOUT",
        description="Seconds one file's work may run once fetched before it is stopped and fails the run: a GPU "
        "task on a task worker, or the rest of a deployment run or endpoint job working on its own machine (plus "
        "pyannote_timeout when it may wait on the hosted API). 0: scaled to the audio, 300 s + 2 s per second of "
        "audio.")
    watchdog_grace: float = Field(
        60.0, gt=0, validation_alias="WATCHDOG_GRACE",
        description="Seconds past its deadline (GPU_TASK_TIMEOUT) a run stuck in a stage that never returns is given "
        "before the watchdog sets it Failed and ends its process (a task worker, a deployment run, the in-process "
        "endpoint, the RunPod handler).")
    gpu_task_retries: int = Field(
        2, ge=0, validation_alias="GPU_TASK_RETRIES",
        description="A GPU task whose worker died (killed, crashed, lost) runs again on another worker up to this "
        "many times; then it fails the run. Failures of the file itself are never retried.")
    worker_models: str = Field(
        "", validation_alias="WORKER_MODELS",
        description="What a task worker serves, comma-separated model[:compute_type] (e.g. 'large-v3:float16'); "
        "default: its configured model (WHISPERX_MODEL...) with the default compute type. Requests for "
        "another model, compute type, device or thread count are refused, never loaded on the side.")
    model_cache_max: int = Field(
        8, ge=0, validation_alias="MODEL_CACHE_MAX",
        description="Loaded models kept per process (Whisper, VAD, aligners, diarizers, speaker encoders), the "
        "least recently used evicted first (0: no bound).")
    local_prefect_server: str = Field(
        "http://127.0.0.1:4200/api", validation_alias="LOCAL_PREFECT_SERVER",
        description="With no PREFECT_API_URL, the CLI uses a Prefect server answering here instead of starting "
        "a throw-away one ('off' disables the check).",
    )
    print_mounts: bool = Field(
        False, validation_alias="PRINT_MOUNTS",
        description="Log the container's mounted volumes at the start of each flow run.",
    )

    @field_validator("console_log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    def secret_values(self) -> list[str]:
        """Every configured secret, for scrubbing text before it is logged or stored."""
        values = [getattr(self, spec.setting) for spec in SECRETS] + [self.runpod_api_key]
        return [v.get_secret_value() for v in values if isinstance(v, SecretStr) and v.get_secret_value()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process (tests call ``get_settings.cache_clear()``)."""
    return Settings()
