"""The fetch stage: fetch + hash (:mod:`speech.io.fetch`), decode (:mod:`speech.io.decode`), and
cache the samples as ``<cache>/audio/<sha256>.npy`` so later stages and reruns load them with
one memory map instead of decoding again. Stages pass the small :class:`AudioRef`, never arrays.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import numpy as np

from speech.errors import AudioError, StorageError
from speech.io.decode import decode_to_npy, probe
from speech.io.fetch import fetch
from speech.redact import redact_url
from speech.contracts import AudioRef
from speech.schema import SAMPLE_RATE
from speech.settings import Settings, get_settings


def stem_of(source: str) -> str:
    """A safe output stem from a path, URL or S3 key: 'talk.mp3' -> 'talk'."""
    path = urlsplit(source).path if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", source) else source
    name = Path(unquote(path)).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128]
    return stem or "audio"


def distinct_output_names(sources: list[str]) -> list[Optional[str]]:
    """None (= named after the file) unless two sources share a stem (a/talk.wav, b/talk.mp3):
    those get ``<stem>-<8 hex of their source>``, stable across runs, so no file's outputs (or
    uploaded audio) take another's place."""
    import hashlib
    from collections import Counter

    stems = [stem_of(f) for f in sources]
    counts = Counter(stems)
    return [f"{stem}-{hashlib.sha256(f.encode()).hexdigest()[:8]}" if counts[stem] > 1 else None
            for f, stem in zip(sources, stems)]


def load_audio(source: str, output_name: Optional[str] = None, settings: Optional[Settings] = None,
               decode_now: bool = True, keep_bytes: bool = False, since: Optional[float] = None,
               sha256: Optional[str] = None) -> AudioRef:
    """Fetch + hash (+ decode). Raises AudioError/FetchError with a one-line reason.

    ``sha256`` (the request's ``audio_sha256``): the bytes must have this digest, else AudioError
    before anything is probed or decoded: a sender that uploads a file and sends its URL learns,
    instead of getting a transcript of someone else's audio, that the object was replaced between
    its upload and this fetch.

    ``decode_now=False`` (the pipeline's fetch stage) only probes the file (format, declared
    length, its first frame) and keeps the bytes on this machine; :func:`read_samples` decodes
    them the first time a stage needs samples, so a run whose stages are all cache hits never
    decodes. ``keep_bytes`` keeps them even when the samples are cached here (for another
    machine to decode). Decoded samples are cached per sha256 either way."""
    settings = settings or get_settings()
    shown = redact_url(source)
    fetched = fetch(source, settings, since)  # since: the first attempt's start (the download deadline)
    if sha256 and fetched.sha256.lower() != sha256.lower():
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
        raise AudioError(f"{shown}: its bytes (sha256 {fetched.sha256[:12]}…) are not the audio_sha256 the request "
                         f"gave ({sha256[:12]}…): the file was replaced after the request was sent (another upload "
                         "under the same name?); nothing was transcribed")
    cache = settings.cache_dir / "audio"
    cache.mkdir(parents=True, exist_ok=True)
    npy, meta = cache / f"{fetched.sha256}.npy", cache / f"{fetched.sha256}.fmt"
    keep = False
    try:
        if npy.exists() and meta.exists():
            _touch(npy)
            duration, fmt = np.load(npy, mmap_mode="r").shape[0] / SAMPLE_RATE, meta.read_text().strip()
            keep = keep_bytes
        elif decode_now:
            audio = _decode_to_cache(fetched.path, shown, npy, meta, settings)
            duration, fmt = audio.shape[0] / SAMPLE_RATE, meta.read_text().strip()
        else:
            fmt, declared = probe(fetched.path, shown, settings.max_audio_seconds)
            duration, keep = declared or 0.0, True
    finally:
        if fetched.temporary and not keep:
            fetched.path.unlink(missing_ok=True)
    return AudioRef(
        sha256=fetched.sha256,
        source=shown,
        stem=output_name or stem_of(source),
        decoded_path=str(npy),
        duration=round(duration, 3),
        size_bytes=fetched.size,
        format=fmt,
        local_path=str(fetched.path) if keep else None,
        temporary=keep and fetched.temporary,
    )


class AudioNotHere(AudioError):
    """The samples are neither cached nor decodable on this machine (a task worker elsewhere)."""


_DECODE_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def read_samples(ref: AudioRef, settings: Optional[Settings] = None) -> np.ndarray:
    """The decoded samples of a fetched file (memory-mapped, float32) from this machine's cache,
    decoded from ``ref.local_path`` on first use."""
    settings = settings or get_settings()
    npy = settings.cache_dir / "audio" / f"{ref.sha256}.npy"
    if not npy.exists() and ref.local_path and Path(ref.local_path).is_file():
        with _LOCKS_GUARD:
            lock = _DECODE_LOCKS.setdefault(ref.sha256, threading.Lock())
        with lock:  # concurrent stages decode once
            if not npy.exists():
                npy.parent.mkdir(parents=True, exist_ok=True)
                _decode_to_cache(Path(ref.local_path), ref.source, npy, npy.with_suffix(".fmt"), settings)
                release(ref)
    try:
        # copy-on-write map: writable for torch without a second in-memory copy of the audio
        samples = np.load(npy, mmap_mode="c")
        _touch(npy)
        return samples
    except FileNotFoundError:
        raise AudioNotHere(f"{ref.source}: its samples are not on this machine (no {npy.name} in "
                           f"{npy.parent}, no local copy of the file)") from None


def release(ref: AudioRef) -> None:
    """Delete a download kept for decoding (JOBS_DIR); a local source file is never touched."""
    if ref.temporary and ref.local_path:
        Path(ref.local_path).unlink(missing_ok=True)


def _decode_to_cache(path: Path, label: str, npy: Path, meta: Path, settings: Settings) -> np.ndarray:
    """Decode into ``<sha256>.npy.part`` beside the cache entry and rename it into place (a
    concurrent reader sees all samples or none); a failed decode leaves nothing behind, and a
    full disk is reported once, not retried."""
    fd, tmp = tempfile.mkstemp(dir=npy.parent, suffix=".npy.part")
    os.close(fd)
    part = Path(tmp)
    try:
        _, fmt = decode_to_npy(path, label, settings.max_audio_seconds, part)
        os.replace(part, npy)
        meta.write_text(fmt)
        evict(npy.parent, int(settings.decode_cache_max_gb * 1024**3), keep=npy)
    except OSError as exc:
        part.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"{label}: no space left for the decoded audio in {npy.parent} "
                               "(SPEECH_CACHE_DIR; DECODE_CACHE_MAX_GB bounds it)") from None
        raise
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return np.load(npy, mmap_mode="r")


def _touch(npy: Path) -> None:
    """Mark a cache entry as used now (its mtime orders eviction)."""
    with contextlib.suppress(OSError):
        os.utime(npy)


def evict(folder: Path, max_bytes: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete the least recently used ``<sha256>.npy`` (+ ``.fmt``) entries of ``folder`` until the
    rest fit in ``max_bytes``; ``keep`` (the entry just written) stays. Also removes ``.npy.part``
    files an interrupted decode left over an hour ago. Returns what was deleted."""
    entries, removed = [], []
    now = time.time()
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            st = path.stat()
            if path.name.endswith(".npy.part"):
                if now - st.st_mtime > 3600:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            elif path.suffix == ".npy":
                entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        path.with_suffix(".fmt").unlink(missing_ok=True)
        removed.append(path)
        total -= size
    return removed
