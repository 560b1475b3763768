"""Running the stage tasks of one file: timed, cached, in the foreground or the background.

:class:`StageClock` is what :mod:`flows.pipeline` and the GPU task (:mod:`flows.gpu`) call
stage tasks through: each call is a Prefect task run with the shared result storage and, for
``force``, a refreshed cache; the clock notes each stage's seconds and which stages were cache
hits (Prefect's own ``Cached`` state) for the debug block and the summary artifact.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


@dataclass
class StageClock:
    """Seconds per stage and which stages were cache hits (the debug block, the summary artifact)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    storage: Any = None  # where task results and cache records live (None: Prefect's default)
    runner: Any = None  # a task runner for background stages outside a flow run (a task worker's job)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 3)

    def merge(self, seconds: dict[str, float], cached: list[str]) -> None:
        """Stages another process ran for this file (a task worker's GPU task)."""
        for stage, value in seconds.items():
            self.add(stage, value)
        self.cached.extend(s for s in cached if s not in self.cached)

    def run(self, stage: str, task: Any, *args: Any, force: bool = False) -> Any:
        """Run a cached task (``force`` refreshes its cache), timed; note a cache hit."""
        result, error = self.attempt(stage, task, *args, force=force)
        if error is not None:
            raise error
        return result

    def attempt(self, stage: str, task: Any, *args: Any, force: bool = False) -> tuple[Any, Optional[BaseException]]:
        """Like :meth:`run`, but a failed task gives ``(None, its exception)`` instead of raising."""
        with self.time(stage):
            state = self._task(task, force)(*args, return_state=True)
        return self.settle(stage, state)

    def submit(self, stage: str, task: Any, *args: Any, force: bool = False) -> "Running":
        """Start a task in the background (the flow's thread pool, or :attr:`runner`); its seconds
        run from now until it finishes. Arguments may be other :class:`Running` stages' futures."""
        args = tuple(a.future if isinstance(a, Running) else a for a in args)
        configured = self._task(task, force)
        if self.runner is not None:
            from prefect.utilities.callables import get_call_parameters

            future = self.runner.submit(configured, get_call_parameters(configured.fn, args, {}))
        else:
            future = configured.submit(*args)
        return Running(self, stage, future, time.perf_counter())

    def _task(self, task: Any, force: bool) -> Any:
        options: dict[str, Any] = {"refresh_cache": force}
        if self.storage is not None:
            options["result_storage"] = self.storage
        return task.with_options(**options)

    def settle(self, stage: str, state: Any) -> tuple[Any, Optional[BaseException]]:
        result = state.result(raise_on_failure=False)
        if not state.is_completed():
            return None, result if isinstance(result, BaseException) else RuntimeError(state.message or state.name)
        if state.name == "Cached":
            self.cached.append(stage)
        return result, None


@dataclass
class Running:
    """A stage running in the background."""

    clock: StageClock
    stage: str
    future: Any  # PrefectFuture
    started: float
    finished: Optional[float] = None

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _f: setattr(self, "finished", time.perf_counter()))

    def outcome(self) -> tuple[Any, Optional[BaseException]]:
        """Wait; ``(result, None)`` or ``(None, the task's exception)``."""
        self.future.wait()
        self.clock.add(self.stage, (self.finished or time.perf_counter()) - self.started)
        return self.clock.settle(self.stage, self.future.state)

    def result(self) -> Any:
        result, error = self.outcome()
        if error is not None:
            raise error
        return result
