"""Shared task plumbing: retry policy and content-addressed cache keys."""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from types import ModuleType
from typing import Any

from prefect.tasks import exponential_backoff

import speech
from speech.errors import SpeechError

# Network stages retry with exponential backoff (2 s, 4 s, 8 s ± jitter) ...
NETWORK_RETRIES = 3
NETWORK_BACKOFF = exponential_backoff(backoff_factor=2)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """... but never on deterministic failures: bad audio, bad parameters, 404s."""
    try:
        state.result()
    except SpeechError as exc:
        return exc.retryable
    except Exception:
        return True
    return False


def code_version(*modules: ModuleType) -> str:
    """Pipeline version + hash of the stage's engine source: code changes invalidate caches."""
    h = hashlib.sha256(speech.__version__.encode())
    for m in modules:
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()[:12]


def stage_key(stage: str, audio_sha256: str, params: Any, version: str) -> str:
    """``<stage>-<version>-<audio sha>-<params hash>``: same bytes + same params = hit."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return f"{stage}-{version}-{audio_sha256[:32]}-{hashlib.sha256(blob).hexdigest()[:16]}"


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60] or "audio"


# Prefect Secret blocks the flows fall back to when a token is neither a parameter nor an
# env var (infra/bootstrap.sh saves them from the env of whoever runs it).
SECRET_BLOCKS = {
    "deepgram_api_key": "deepgram-api-key",
    "pyannote_api_key": "pyannote-api-key",
    "huggingface_access_token": "hf-token",
}


def secret_block(name: str) -> Any:
    """The value of the Prefect ``Secret`` block ``name`` as a ``SecretStr``, or None if no
    such block is saved."""
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    try:
        value = Secret.load(name).get()
    except ValueError:  # "Unable to find block document named ..."
        return None
    return SecretStr(str(value)) if value else None
