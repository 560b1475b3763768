"""Shared task plumbing: retry policy, content-addressed cache keys, artifact keys, Secret blocks."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from prefect.tasks import exponential_backoff

import speech
from speech.errors import SpeechError

def send_engine_logs_to_prefect(logger_name: str = "speech") -> None:
    """Every ``speech.*`` record logged inside a flow or task run reaches that run's Prefect
    logs (the UI), as ``PREFECT_LOGGING_EXTRA_LOGGERS=speech`` would, also when Prefect set up
    logging before this package was imported: the handlers of Prefect's ``prefect.extra`` logger
    go on ``speech``, which logs at Prefect's level (``PREFECT_LOGGING_LEVEL``, INFO by default)
    unless its own level was set."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    target = logging.getLogger(logger_name)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    if target.level == logging.NOTSET:
        target.setLevel(logging.getLogger("prefect.extra").level or logging.INFO)


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


def keep_out_of_cache(reason: str) -> None:
    """Return this task's result to the flow but do not record it under the task's cache key:
    a fallback or a failure is not an answer a later run should reuse."""
    from prefect.logging import get_run_logger
    from prefect.transactions import get_transaction

    txn = get_transaction()
    if txn is not None:
        txn.write_on_commit = False
    get_run_logger().info("not cached: %s", reason)


def code_version(*modules: ModuleType) -> str:
    """Pipeline version + hash of the stage's engine source (every file of a package): code
    changes invalidate caches."""
    h = hashlib.sha256(speech.__version__.encode())
    for m in modules:
        root = Path(m.__file__)
        files = sorted(root.parent.rglob("*.py")) if root.name == "__init__.py" else [root]
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


REFRESH_TAG = "refresh-cache"


def stage_key(stage: str, audio_sha256: str, params: Any, version: str, context: Any = None) -> str:
    """``<stage>-<version>-<audio sha>-<params hash>``: same bytes + same params = hit.

    A task run tagged ``refresh-cache`` (``force`` for a stage sent to a task worker, where the
    flow's ``refresh_cache`` option does not travel) gets a key of its own: it recomputes."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    key = f"{stage}-{version}-{audio_sha256[:32]}-{hashlib.sha256(blob).hexdigest()[:16]}"
    task_run = getattr(context, "task_run", None)
    if task_run is not None and REFRESH_TAG in (task_run.tags or []):
        key += f"-refresh-{task_run.id}"
    return key


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a saved API response a run reuses (its content, not its path, is the identity)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60] or "audio"


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
