"""Who is calling the RunPod-compatible endpoint (:mod:`deployments.runpod_api`): one Bearer key
per caller, so callers who do not trust each other can share one endpoint.

    ENDPOINT_API_KEYS="alice:KEY-A,bob:KEY-B"   # several callers, each with a key of its own
    ENDPOINT_API_KEYS_FILE=/run/secrets/keys     # the same, one name:key per line (a mounted secret)
    ENDPOINT_API_KEY=KEY                         # one caller, named "default" (the RunPod way)

A job belongs to the caller whose key sent it: only that caller can read its status, stream,
cancel it or purge it from the queue (another caller's job id answers 404, as an unknown one
does); each caller may have at most its share of the queue waiting (``--max-queued-per-caller``,
default ``--max-queued`` divided by the number of callers), so no caller can fill the queue for
the others; the in-process table starts queued jobs in turn across callers. The caller's name
(never its key) is tagged on the job's Prefect run (``runpod-caller:<name>``), so the UI can
filter by it and a restarted endpoint still knows whose run it is.
"""
from __future__ import annotations

import hmac
import os
import re
from typing import Iterable, Mapping, MutableMapping, Optional

DEFAULT = "default"  # the one caller of ENDPOINT_API_KEY, and of an endpoint without a key
TAG_PREFIX = "runpod-caller:"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Callers:
    """name -> key; :meth:`who` finds the caller a Bearer token belongs to."""

    def __init__(self, keys: Mapping[str, str]):
        if not keys:
            raise ValueError("no caller keys")
        seen: dict[str, str] = {}
        for name, key in keys.items():
            if not NAME.fullmatch(name):
                raise ValueError(f"caller name {name!r}: letters, digits, '_', '.', '-' (at most 64), starting "
                                 "with a letter or digit")
            if not key or key != key.strip():
                raise ValueError(f"caller {name}: an empty key, or one with spaces around it")
            if key in seen:
                raise ValueError(f"callers {seen[key]} and {name} have the same key: each caller needs its own")
            seen[key] = name
        self.keys = dict(keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Optional["Callers"]:
        """``ENDPOINT_API_KEYS`` (``name:key`` pairs, separated by commas or new lines), or the
        file ``ENDPOINT_API_KEYS_FILE`` names (the same pairs; lines starting with ``#`` skipped),
        and ``ENDPOINT_API_KEY`` (the caller ``default``); None when none is set. A malformed value
        raises ValueError saying which entry (never echoing a key)."""
        source, text = "ENDPOINT_API_KEYS", env.get("ENDPOINT_API_KEYS", "")
        if env.get("ENDPOINT_API_KEYS_FILE"):
            if text:
                raise ValueError("set ENDPOINT_API_KEYS or ENDPOINT_API_KEYS_FILE, not both")
            source = "ENDPOINT_API_KEYS_FILE"
            try:
                text = open(env["ENDPOINT_API_KEYS_FILE"], encoding="utf-8").read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"ENDPOINT_API_KEYS_FILE cannot be read: {type(exc).__name__}") from None
        keys: dict[str, str] = {}
        for n, entry in enumerate(re.split(r"[,\n]", text), 1):
            entry = entry.strip()
            if not entry or entry.startswith("#"):
                continue
            name, sep, key = entry.partition(":")
            if not sep:
                raise ValueError(f"{source} entry {n} is not name:key")
            name = name.strip()
            if name in keys:
                raise ValueError(f"{source} names the caller {name} twice")
            keys[name] = key.strip()
        single = env.get("ENDPOINT_API_KEY")
        if single:
            if DEFAULT in keys:
                raise ValueError(f"ENDPOINT_API_KEY is the caller {DEFAULT}: ENDPOINT_API_KEYS must not name it too")
            keys[DEFAULT] = single
        return cls(keys) if keys else None

    def who(self, token: str) -> Optional[str]:
        """The caller whose key ``token`` is, or None; every key is compared, in constant time, so
        the answer's timing says nothing about which keys exist."""
        found = None
        for name, key in self.keys.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                found = name
        return found

    def __len__(self) -> int:
        return len(self.keys)


def s3_sources_closed(callers: Optional["Callers"], env: MutableMapping[str, str] = os.environ) -> bool:
    """With several callers and no ``ALLOW_S3_SOURCES``, s3:// sources are refused (``none``):
    the workers read them with their own credentials, so any caller could name another's
    uploads. True when it set that."""
    if callers is None or len(callers) < 2 or env.get("ALLOW_S3_SOURCES"):
        return False
    env["ALLOW_S3_SOURCES"] = "none"
    from speech.settings import get_settings

    get_settings.cache_clear()
    return True


def tag(caller: str) -> str:
    """The Prefect tag that marks a run as ``caller``'s."""
    return f"{TAG_PREFIX}{caller}"


def owner(tags: Optional[Iterable[str]]) -> str:
    """Whose job a run with these tags is (a run made before callers were tagged: ``default``)."""
    for t in tags or ():
        if t.startswith(TAG_PREFIX):
            return t[len(TAG_PREFIX):]
    return DEFAULT


def share(max_queued: int, callers: int) -> int:
    """Each caller's default share of the queue: the whole of it for one caller, else an equal
    part (at least 1), so that all callers' shares together fit in it."""
    return max(1, max_queued // max(1, callers))
