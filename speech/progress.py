"""Progress as an explicit callback, the way whisperX (``progress_callback``) and pyannote
(``hook``) do it: the caller passes one to a stage; the stage calls it. No global state, so two
runs sharing a process (a batch, a task worker) never see each other's events.

A callback takes ``(stage, fraction 0..1, message)``. Stages call :func:`report`, which clamps the
fraction and makes sure a broken display can never fail a transcription.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from speech.errors import Stopped

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float, str], None]


def report(callback: Optional[ProgressCallback], stage: str, fraction: float, message: str = "") -> None:
    if callback is None:
        return
    try:
        callback(stage, min(max(fraction, 0.0), 1.0), message)
    except Stopped:  # the run was cancelled or is out of time: stop the stage here
        raise
    except Exception:  # a broken progress display must never fail a transcription
        log.debug("progress callback failed", exc_info=True)
