"""The align stage: word timestamps for every segment.

Backends (``AlignParams.backend``), in :data:`REGISTRY` order, which is also ``auto``'s:
  - ``wav2vec2``: WhisperX's CTC aligner (:mod:`speech.align.wav2vec2`);
  - ``pocketsphinx``: forced alignment with the CMU en-us model shipped in pocketsphinx
    (:mod:`speech.align.pocketsphinx`; English only, so ``auto`` tries it for English only);
  - ``whisper``: cross-attention alignment with the already-loaded Whisper model
    (:mod:`speech.align.whisper`), any language.

Alignment never fails the run: a backend error is logged, the segment-level times are kept
and the outcome says so (``AlignOutcome.error``). Aligned segments are split into sentences
(``segment_resolution="sentence"``, whisperx's default) or keep the transcription's segments
(``"chunk"``); only wav2vec2 gives character times (``return_char_alignments``).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from speech.align.pocketsphinx import align_pocketsphinx
from speech.align.wav2vec2 import align_wav2vec2
from speech.align.whisper import align_whisper
from speech.align.words import split_sentences
from speech.backends import BackendRegistry
from speech.models import CACHE, ModelCache
from speech.progress import ProgressCallback
from speech.contracts import AlignOutcome, AlignParams, Transcript
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

# every backend: (audio, transcript, params, settings, cache, progress) -> aligned segments
REGISTRY = BackendRegistry("alignment")
REGISTRY.register("wav2vec2", align_wav2vec2)
REGISTRY.register("pocketsphinx", lambda audio, transcript, _params, _settings, _cache, progress:
                  align_pocketsphinx(audio, transcript, progress), when=lambda language: language == "en")
REGISTRY.register("whisper", lambda audio, transcript, _params, settings, cache, progress:
                  align_whisper(audio, transcript, settings, cache, progress))


def align(
    audio: np.ndarray,
    transcript: Transcript,
    params: Optional[AlignParams] = None,
    settings: Optional[Settings] = None,
    cache: ModelCache = CACHE,
    progress: Optional[ProgressCallback] = None,
) -> AlignOutcome:
    """Word times for every segment; never raises for a backend failure."""
    params = params or AlignParams()
    settings = settings or get_settings()
    t0 = time.perf_counter()
    if not transcript.segments:
        return AlignOutcome(segments=[], backend=None)
    tried = REGISTRY.first_success(
        params.backend, lambda b: b.run(audio, transcript, params, settings, cache, progress),
        language=transcript.language or "en")
    seconds = round(time.perf_counter() - t0, 3)
    if tried.backend is None:
        log.warning("alignment failed; keeping segment-level times (%s)", tried.error)
        return AlignOutcome(segments=transcript.segments, backend=None, error=tried.error, seconds=seconds,
                            settled=False)
    segments = tried.result
    if params.segment_resolution == "sentence":
        segments = [part for seg in segments for part in split_sentences(seg)]
    chars_error = None
    if params.return_char_alignments and tried.backend != "wav2vec2":
        chars_error = f"character times need the wav2vec2 aligner; {tried.backend} aligns words only"
        log.warning("return_char_alignments: %s", chars_error)
    return AlignOutcome(segments=segments, backend=tried.backend, seconds=seconds, settled=tried.settled,
                        chars_error=chars_error)
