"""Progress events from the engine to whoever listens (CLI progress bar, Prefect artifact).

The engine calls :func:`report`; front ends :func:`subscribe`. No Prefect, no rich here.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

log = logging.getLogger(__name__)

Listener = Callable[[str, float, str], None]  # (stage, fraction 0..1, message)

_lock = threading.Lock()
_listeners: list[Listener] = []


def report(stage: str, fraction: float, message: str = "") -> None:
    fraction = min(max(fraction, 0.0), 1.0)
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(stage, fraction, message)
        except Exception:  # a broken progress display must never fail a transcription
            log.debug("progress listener failed", exc_info=True)


@contextlib.contextmanager
def subscribe(fn: Listener) -> Iterator[None]:
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)
