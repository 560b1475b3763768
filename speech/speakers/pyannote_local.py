"""The local pyannote.audio pipeline, through WhisperX's ``whisperx.diarize.DiarizationPipeline``.

A hub name (gated models need an HF token) or a local directory; offline, only a local
directory or the Hugging Face cache works. A failed load is remembered for the process, so
``auto`` goes straight to the next backend on later files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from speech.errors import ModelError
from speech.models import ModelCache, hub_reachable, resolve_device
from speech.contracts import DiarizationOutcome, DiarizeParams, Turn
from speech.settings import Settings

DEFAULT_MODEL = "pyannote/speaker-diarization-community-1"  # whisperx's default


def load_pipeline(model: Optional[str], device: str, token: Optional[str], cache: ModelCache,
                  probe: bool = False) -> Any:
    """The pipeline for ``model`` (default WhisperX's); ``probe`` first checks the hub is
    reachable (3 s) instead of letting huggingface_hub retry a dead network."""
    name = model or DEFAULT_MODEL

    def load() -> Any:
        if probe and not Path(name).is_dir() and not hub_reachable(name, "config.yaml"):
            raise ModelError(f"cannot load the pyannote pipeline {name!r}: not cached and the hub is unreachable")
        from whisperx.diarize import DiarizationPipeline

        return DiarizationPipeline(model_name=name, token=token, device=device)

    return cache.get("diarization", (name, device), load,
                     failure=lambda exc: f"cannot load the pyannote pipeline {name!r}: {type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")


def diarize_pyannote_local(audio: np.ndarray, params: DiarizeParams, settings: Settings, hf_token: Optional[str],
                           cache: ModelCache) -> DiarizationOutcome:
    device, _ = resolve_device(settings, params.device)
    pipeline = load_pipeline(params.model or settings.diarization_model, device, hf_token, cache,
                             probe=params.backend == "auto")
    frame = pipeline(np.ascontiguousarray(audio, dtype=np.float32), num_speakers=params.num_speakers,
                     min_speakers=params.min_speakers, max_speakers=params.max_speakers)
    turns = [Turn(start=round(float(r.start), 3), end=round(float(r.end), 3), speaker=str(r.speaker))
             for r in frame.itertuples()]
    return DiarizationOutcome(turns=turns, backend="pyannote")
