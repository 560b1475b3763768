"""The diarize stage: who spoke when.

Backends (``DiarizeParams.backend``), in :data:`REGISTRY` order, which is also ``auto``'s:
  - ``pyannote-api``: hosted pyannoteAI (:mod:`speech.speakers.pyannote_api`); ``auto`` tries it
    when a saved job (``pyannote_json_in``) or a pyannoteAI key is at hand;
  - ``pyannote``: the local pyannote.audio pipeline (:mod:`speech.speakers.pyannote_local`);
  - ``segmented``: offline, no token (:mod:`speech.speakers.segmented`): segmentation, CAM++
    embeddings, clustering and turn-level refinement on the audio itself; the offline default;
  - ``builtin``: offline, no token, no extra weights (:mod:`speech.speakers.builtin`): GE2E
    windows on the speech regions of the (aligned) segments; ``auto``'s last resort (when the
    CAM++ weights or the segmentation model cannot load).

A backend that fails or finds no turns is logged and the next one runs; diarization never
fails the run: with no backend left, the outcome carries no turns and says why (the original
worker kept the transcript too). An outcome reached after a transient failure is not
``settled``: orchestration does not cache it, so a later run tries the better backend again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from speech.backends import BackendRegistry
from speech.models import CACHE, ModelCache
from speech.redact import secret_value
from speech.contracts import DiarizationOutcome, DiarizeParams, Segment
from speech.settings import Settings, get_settings
from speech.speakers.assign import speech_regions
from speech.speakers.builtin import diarize_builtin
from speech.speakers.pyannote_api import diarize_hosted
from speech.speakers.pyannote_local import diarize_pyannote_local
from speech.speakers.segmented import diarize_segmented


@dataclass
class DiarizeInputs:
    """What a backend may use: the samples, the segments, the settings, tokens and the cache."""

    audio: np.ndarray
    segments: list[Segment]
    params: DiarizeParams
    settings: Settings
    hf_token: Optional[str]
    api_key: Optional[str]  # pyannoteAI; falls back to PYANNOTE_API_KEY
    cache: ModelCache
    stem: str


# every backend: (DiarizeInputs) -> DiarizationOutcome
REGISTRY = BackendRegistry("diarization")
REGISTRY.register("pyannote-api", lambda x: diarize_hosted(x.audio, x.params, x.api_key, x.stem),
                  when=lambda params, hosted: hosted and params.hosted_first(True))
REGISTRY.register("pyannote", lambda x: diarize_pyannote_local(x.audio, x.params, x.settings, x.hf_token, x.cache))
REGISTRY.register("segmented", lambda x: diarize_segmented(x.audio, x.params, cache=x.cache))
REGISTRY.register("builtin", lambda x: diarize_builtin(x.audio, speech_regions(x.segments), x.params))


def diarize(
    audio: np.ndarray,
    segments: list[Segment],
    params: DiarizeParams,
    settings: Optional[Settings] = None,
    hf_token: Optional[str] = None,
    api_key: Optional[str] = None,
    cache: ModelCache = CACHE,
    stem: str = "audio",
    hosted: bool = True,
) -> DiarizationOutcome:
    """Who spoke when. Never raises for a backend failure: the outcome says what failed (also
    for the backends ``auto`` passed over before one succeeded) and the run keeps its transcript.

    ``hosted=False`` keeps ``auto`` on this machine (orchestration runs the hosted API as a task
    of its own, with retries)."""
    settings = settings or get_settings()
    api_key = api_key or secret_value(settings.pyannote_api_key) or None
    x = DiarizeInputs(audio, segments, params, settings, hf_token, api_key, cache, stem)

    def attempt(backend) -> DiarizationOutcome:
        outcome = backend.run(x)
        if not outcome.turns:
            raise ValueError("no speaker turns found")
        return outcome

    tried = REGISTRY.first_success(params.backend, attempt, params=params,
                                   hosted=hosted and bool(params.pyannote_json_in or api_key))
    if tried.result is None:
        return DiarizationOutcome(turns=[], backend=None, error=tried.error, settled=False)
    return tried.result.model_copy(update={"error": tried.error, "settled": tried.settled})
