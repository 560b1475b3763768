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
from collections import OrderedDict
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
    """Process-wide cache: one load per (kind, key); ``load_count`` counts real loads.

    Bounded: at most ``max_models`` loaded models (``MODEL_CACHE_MAX``; 0 = no bound) are kept,
    the least recently used going first (``evictions`` counts them), so requests naming new
    models cannot pile models up until the GPU runs out of memory. Each key has its own load
    lock: one slow load (a hub download) does not block requests for models already loaded or
    for other keys, and two requests for the same model load it once."""

    def __init__(self, max_models: Optional[int] = None) -> None:
        self._models: "OrderedDict[tuple[str, Hashable], Any]" = OrderedDict()  # least recently used first
        self._failures: dict[tuple[str, Hashable], ModelError] = {}
        self._load_locks: dict[tuple[str, Hashable], threading.Lock] = {}
        self._guard = threading.Lock()
        self._max_models = max_models
        self.load_count = 0
        self.evictions = 0

    @property
    def max_models(self) -> int:
        return self._max_models if self._max_models is not None else get_settings().model_cache_max

    def get(self, kind: str, key: Hashable, load: Callable[[], Any],
            failure: Optional[Callable[[Exception], str]] = None) -> Any:
        """The cached model, else ``load()`` run quietly (library prints and warnings hidden).

        With ``failure``, a failed load is remembered as a :class:`ModelError` with that reason
        and raised again at once on later calls; without it, the error propagates unremembered.
        """
        slot = (kind, key)
        found = self._lookup(slot)
        if found is not None:
            return found
        with self._guard:
            lock = self._load_locks.setdefault(slot, threading.Lock())
        with lock:  # one load per key; other keys load (or are served) meanwhile
            found = self._lookup(slot)
            if found is not None:
                return found
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loaded = load()
            except ModelError as err:
                if failure is not None:
                    with self._guard:
                        self._failures[slot] = err
                raise
            except Exception as exc:  # hub/network/gating/format errors of many kinds
                if failure is None:
                    raise
                err = ModelError(failure(exc))
                with self._guard:
                    self._failures[slot] = err
                raise err from None
            self._insert(slot, loaded)
            return loaded

    def _lookup(self, slot: tuple[str, Hashable]) -> Any:
        with self._guard:
            if slot in self._failures:
                raise self._failures[slot]
            found = self._models.get(slot)
            if found is not None:
                self._models.move_to_end(slot)
            return found

    def _insert(self, slot: tuple[str, Hashable], loaded: Any) -> None:
        evicted = []
        with self._guard:
            self._models[slot] = loaded
            self.load_count += 1
            limit = self.max_models
            while limit > 0 and len(self._models) > limit:
                old, _model = self._models.popitem(last=False)
                evicted.append(old)
                self.evictions += 1
        if evicted:
            log.info("model cache full (MODEL_CACHE_MAX=%d): evicted %s", self.max_models,
                     ", ".join(f"{kind} {key}" for kind, key in evicted))
            _free_accelerator_memory()

    def loaded(self) -> list[tuple[str, Hashable]]:
        """(kind, key) of every model held now, least recently used first."""
        with self._guard:
            return list(self._models)

    def clear(self, kind: Optional[str] = None) -> None:
        """Forget every model (or those of one kind) and remembered failures."""
        with self._guard:
            for table in (self._models, self._failures, self._load_locks):
                for slot in [s for s in table if kind is None or s[0] == kind]:
                    del table[slot]


def _free_accelerator_memory() -> None:
    """Give an evicted model's GPU memory back (once nothing else holds it)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


CACHE = ModelCache()
