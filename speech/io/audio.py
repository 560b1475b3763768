"""The fetch stage: fetch + hash (:mod:`speech.io.fetch`), decode (:mod:`speech.io.decode`), and
cache the samples as ``<cache>/audio/<sha256>.npy`` so later stages and reruns load them with
one memory map instead of decoding again. Stages pass the small :class:`AudioRef`, never arrays.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import numpy as np

from speech.errors import AudioError
from speech.io.decode import decode
from speech.io.fetch import fetch
from speech.redact import redact_url
from speech.schema import SAMPLE_RATE, AudioRef
from speech.settings import Settings, get_settings


def stem_of(source: str) -> str:
    """A safe output stem from a path, URL or S3 key: 'talk.mp3' -> 'talk'."""
    path = urlsplit(source).path if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", source) else source
    name = Path(unquote(path)).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128]
    return stem or "audio"


def load_audio(source: str, output_name: Optional[str] = None, settings: Optional[Settings] = None) -> AudioRef:
    """Fetch + hash + decode. Raises AudioError/FetchError with a one-line reason."""
    settings = settings or get_settings()
    shown = redact_url(source)
    fetched = fetch(source, settings)
    try:
        cache = settings.cache_dir / "audio"
        cache.mkdir(parents=True, exist_ok=True)
        npy = cache / f"{fetched.sha256}.npy"
        meta = cache / f"{fetched.sha256}.fmt"
        if npy.exists() and meta.exists():
            audio = np.load(npy, mmap_mode="r")
            fmt = meta.read_text().strip()
        else:
            audio, fmt = decode(fetched.path, shown, settings.max_audio_seconds)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".npy.part")
            with os.fdopen(fd, "wb") as f:
                np.save(f, audio)
            os.replace(tmp, npy)
            meta.write_text(fmt)
    finally:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
    return AudioRef(
        sha256=fetched.sha256,
        source=shown,
        stem=output_name or stem_of(source),
        decoded_path=str(npy),
        duration=round(audio.shape[0] / SAMPLE_RATE, 3),
        size_bytes=fetched.size,
        format=fmt,
    )


def read_samples(ref: AudioRef) -> np.ndarray:
    """The decoded samples of a fetched file (memory-mapped, float32)."""
    try:
        return np.load(ref.decoded_path, mmap_mode="r")
    except FileNotFoundError:
        raise AudioError(f"decoded audio cache {ref.decoded_path} vanished; rerun with force") from None
