"""Errors the engine raises for problems the caller can fix.

They carry a one-line, user-facing message. Orchestration code must not retry them:
a bad file or a bad parameter fails the same way every time.
"""
from __future__ import annotations


class SpeechError(Exception):
    """Base class: a clear, deterministic failure with a one-line reason."""

    retryable = False


class InvalidRequest(SpeechError):
    """A request parameter is invalid."""


class AudioError(SpeechError):
    """The audio is missing, empty, truncated, not audio, or over a limit."""


class FetchError(SpeechError):
    """The audio could not be fetched (404, access denied, bad URL)."""


class TransientFetchError(FetchError):
    """A network failure that may succeed on retry (timeout, 5xx, connection refused)."""

    retryable = True


class ModelError(SpeechError):
    """A model could not be resolved or loaded."""


class StorageError(SpeechError):
    """The results store could not be written."""


class Stopped(SpeechError):
    """The work was stopped from outside: its run was cancelled, or it ran past its deadline.
    Raised from progress callbacks too (:func:`speech.progress.report` lets it through)."""


class WorkerUnavailable(SpeechError):
    """No task worker serves the work, or the workers that took it died too often."""


class DiarizationError(SpeechError):
    """Diarization failed: a failed or timed-out hosted job, a rejected key, bad output.

    Deterministic by default; network trouble (connection refused, 429, 5xx) is raised with
    ``retryable=True`` so orchestration retries it.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class TransientStorageError(StorageError):
    """The store could not be reached (connection refused, timeout, 5xx, throttling); retry."""

    retryable = True


class ConfidenceError(SpeechError):
    """The Deepgram confidence stage failed: a rejected key, a bad request, a malformed response.

    Deterministic by default; network trouble (connection refused, timeouts, 429, 5xx after the
    SDK's own retries) is raised with ``retryable=True`` so orchestration may retry it later.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass on its own (network trouble, throttling, 5xx): worth a retry,
    and never a reason to remember a fallback as the answer."""
    if isinstance(exc, SpeechError):
        return exc.retryable
    return isinstance(exc, (ConnectionError, TimeoutError))
