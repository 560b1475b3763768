"""Progress and outputs of a run, for whoever started it.

The caller (the CLI's progress bar) wraps the flow call in :func:`listening`; the listener lives
in a context variable, so it follows the run into its tasks (Prefect copies the context into
task threads) and never into another run sharing the process. Each stage gets its callback from
:func:`stage_progress`, which also feeds a Prefect progress artifact when asked to.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from speech.progress import ProgressCallback
from speech.contracts import OutputRef


@dataclass
class RunListener:
    on_progress: Optional[ProgressCallback] = None
    on_outputs: Optional[Callable[[list[OutputRef], str], None]] = None  # (files written, where)


_LISTENER: ContextVar[Optional[RunListener]] = ContextVar("speech_run_listener", default=None)
# raises speech.errors.Stopped when the work must stop (a task worker's RunGuard.check)
_CHECKPOINT: ContextVar[Optional[Callable[[], None]]] = ContextVar("speech_checkpoint", default=None)


@contextlib.contextmanager
def checkpointing(check: Callable[[], None]) -> Iterator[None]:
    """Stages run inside call ``check`` between steps and with every progress report."""
    token = _CHECKPOINT.set(check)
    try:
        yield
    finally:
        _CHECKPOINT.reset(token)


def guarded() -> bool:
    """Whether the running stages already have a check (a task worker's run, its deadline)."""
    return _CHECKPOINT.get() is not None


def checkpoint() -> None:
    check = _CHECKPOINT.get()
    if check is not None:
        check()


@contextlib.contextmanager
def listening(listener: RunListener) -> Iterator[None]:
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def stage_progress(artifact: Optional[str] = None) -> ProgressCallback:
    """The callback for one stage: the listener's, plus a Prefect progress artifact described by
    ``artifact`` (updated in steps of at least 5 %), when given."""
    listener = _LISTENER.get()
    artifact_id = None
    if artifact:
        from prefect.artifacts import create_progress_artifact

        artifact_id = create_progress_artifact(progress=0.0, description=artifact)
    last = [0.0]

    def report(stage: str, fraction: float, message: str) -> None:
        checkpoint()
        pct = round(fraction * 100, 1)
        if artifact_id is not None and (pct - last[0] >= 5 or pct >= 100):
            from prefect.artifacts import update_progress_artifact

            last[0] = pct
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
        if listener is not None and listener.on_progress is not None:
            listener.on_progress(stage, fraction, message)

    return report


def outputs_written(refs: list[OutputRef], where: str) -> None:
    listener = _LISTENER.get()
    if listener is not None and listener.on_outputs is not None:
        listener.on_outputs(refs, where)
