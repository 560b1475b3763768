"""Models shared by every stage: the process-wide model cache, the device, the hub probe.

Each stage owns how its models are resolved and loaded (``speech.asr.whisper``,
``speech.asr.vad``, ``speech.align.wav2vec2``, ``speech.speakers.pyannote_local``); they all load
through :data:`CACHE`, so a model loads once per process per key and a batch or a task worker
pays each load once. A loader that is given ``failure`` has its failure remembered for the
process too (``auto`` choices then do not retry an unreachable hub on every file).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from typing import Any, Callable, Hashable, Optional

from speech.errors import ModelError
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)


def resolve_device(settings: Optional[Settings] = None, device: Optional[str] = None,
                   compute_type: Optional[str] = None) -> tuple[str, str]:
    """WHISPERX_DEVICE auto|cpu|cuda -> (device, compute type): float16 on CUDA, int8 on CPU.
    ``device`` / ``compute_type`` (a run's own choice) win over the settings."""
    settings = settings or get_settings()
    want = device or settings.device
    has_cuda = False
    if want in ("auto", "cuda"):
        import ctranslate2

        has_cuda = ctranslate2.get_cuda_device_count() > 0
    if want == "cuda" and not has_cuda:  # as the original worker did: run, slower, and say so
        _warn_once("WHISPERX_DEVICE=cuda but no CUDA device is visible: running on the CPU")
    resolved = "cuda" if has_cuda and want != "cpu" else "cpu"
    compute = compute_type or settings.compute_type or ("float16" if resolved == "cuda" else "int8")
    return resolved, compute


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def hub_reachable(repo_id: str, probe_file: str) -> bool:
    """Cheap check before a hub download: cached files, offline mode, or a 3 s HEAD request.

    huggingface_hub retries a dead network for ~25 s; ``auto`` choices should not pay that
    on an offline machine."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
            return True
    except Exception:
        pass
    if hub_offline():
        return False
    try:
        import requests

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        requests.head(f"{endpoint}/api/models/{repo_id}", timeout=3)
        return True
    except Exception:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class ModelCache:
    """Process-wide cache: one load per (kind, key); ``load_count`` counts real loads."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[Hashable, Any]] = {}
        self.load_count = 0
        self._lock = threading.RLock()

    def get(self, kind: str, key: Hashable, load: Callable[[], Any],
            failure: Optional[Callable[[Exception], str]] = None) -> Any:
        """The cached model, else ``load()`` run quietly (library prints and warnings hidden).

        With ``failure``, a failed load is remembered as a :class:`ModelError` with that reason
        and raised again at once on later calls; without it, the error propagates unremembered.
        """
        with self._lock:
            table = self._tables.setdefault(kind, {})
            found = table.get(key)
            if isinstance(found, ModelError):
                raise found
            if found is not None:
                return found
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loaded = load()
            except ModelError as err:
                if failure is not None:
                    table[key] = err
                raise
            except Exception as exc:  # hub/network/gating/format errors of many kinds
                if failure is None:
                    raise
                err = ModelError(failure(exc))
                table[key] = err
                raise err from None
            table[key] = loaded
            self.load_count += 1
            return loaded

    def clear(self, kind: Optional[str] = None) -> None:
        """Forget every model (or those of one kind) and remembered failures."""
        with self._lock:
            if kind is None:
                self._tables.clear()
            else:
                self._tables.pop(kind, None)


CACHE = ModelCache()
