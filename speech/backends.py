"""One registry for a stage's interchangeable backends (aligners, diarizers).

Like pyannote-audio's backend tables: a backend is registered under a name; an explicit choice
is looked up with one clear error; ``auto`` is an ordered list of names, each with an optional
condition (pocketsphinx only for English, the hosted API only with a saved job), walked by
:meth:`BackendRegistry.first_success` until one backend succeeds. A new backend plugs in with
``REGISTRY.register("name", fn, auto=True)``; nothing else changes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from speech.errors import InvalidRequest, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[..., Any]
    in_auto: Callable[..., bool]  # whether ``auto`` tries it, given the stage's context


@dataclass
class Attempts(Generic[T]):
    """What walking the backends gave: the winner (or None) and why the others were skipped."""

    backend: Optional[str]
    result: Optional[T]
    errors: list[str]
    transient: bool = False  # some backend failed in a way that may pass (network, 5xx)

    @property
    def error(self) -> Optional[str]:
        return "; ".join(self.errors) or None

    @property
    def settled(self) -> bool:
        """A backend succeeded and nothing before it failed transiently: the same request
        would give the same answer again, so it may be cached."""
        return self.backend is not None and not self.transient


class BackendRegistry:
    def __init__(self, stage: str):
        self.stage = stage
        self._backends: dict[str, Backend] = {}

    def register(self, name: str, run: Callable[..., Any], *, auto: bool = True,
                 when: Optional[Callable[..., bool]] = None) -> None:
        """Add a backend; ``auto`` tries it (in registration order) when ``when(**context)`` holds."""
        self._backends[name] = Backend(name, run, (when or (lambda **_: True)) if auto else (lambda **_: False))

    def names(self) -> list[str]:
        return list(self._backends)

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown {self.stage} backend {name!r}; choose one of auto, {', '.join(self._backends)}"
            ) from None

    def order(self, choice: str, **context: Any) -> list[str]:
        """The backends to try: the chosen one, or ``auto``'s list filtered by ``context``."""
        if choice != "auto":
            return [self.get(choice).name]
        return [b.name for b in self._backends.values() if b.in_auto(**context)]

    def first_success(self, choice: str, attempt: Callable[[Backend], T], **context: Any) -> Attempts[T]:
        """Call ``attempt(backend)`` along :meth:`order` until one returns; every exception is a
        reason to try the next (logged at INFO under ``auto``, where falling back is expected,
        WARNING for an explicit choice). Never raises for a backend failure."""
        errors: list[str] = []
        transient = False
        for name in self.order(choice, **context):
            try:
                return Attempts(name, attempt(self._backends[name]), errors, transient)
            except Exception as exc:  # noqa: BLE001 - a failed backend is reported, not raised
                reason = f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                (log.info if choice == "auto" else log.warning)("%s backend unavailable: %s", self.stage, reason)
                errors.append(reason)
                transient = transient or is_transient(exc)
        return Attempts(None, None, errors, transient)
