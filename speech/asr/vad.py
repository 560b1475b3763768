"""Voice activity detection: whisperx's pyannote VAD (its weights ship in the whisperx wheel).

VAD runs once per file: its scores give the speech chunks that feed language detection, and
:class:`PrecomputedVad` hands the same scores to whisperx's batched decoder.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from speech.models import CACHE, ModelCache
from speech.schema import SAMPLE_RATE, TranscribeParams
from speech.settings import Settings

CHUNK_SECONDS = 30


def get_vad(device: str, settings: Settings, cache: ModelCache = CACHE) -> Any:
    """whisperx's pyannote VAD on ``device``, loaded once per process."""

    def load() -> Any:
        from whisperx.vads import Pyannote

        model_fp = str(settings.vad_model_path) if settings.vad_model_path else None
        # whisperx ignores the thresholds given here: onset/offset apply per run (speech_chunks)
        defaults = TranscribeParams()
        vad = Pyannote(device, model_fp=model_fp, vad_onset=defaults.vad_onset, vad_offset=defaults.vad_offset)
        # whisperx scores 5 s windows every 0.5 s; a longer hop is the same model, fewer passes
        vad.vad_pipeline._segmentation.step = settings.vad_step_seconds
        return vad

    return cache.get("vad", device, load)


class PrecomputedVad:
    """Hands whisperx the VAD scores we already computed, so VAD runs once per file."""

    def __init__(self, scores: Any):
        self.scores = scores

    def __call__(self, _inputs: Any, **_: Any) -> Any:
        return self.scores


def speech_chunks(vad_model: Any, audio: np.ndarray, onset: float, offset: float,
                  chunk_size: int = CHUNK_SECONDS) -> tuple[Any, list[dict]]:
    """VAD scores and whisperx's merged speech chunks of at most ``chunk_size`` s [{start, end, segments}]."""
    from whisperx.vads import Pyannote

    scores = vad_model({"waveform": Pyannote.preprocess_audio(audio), "sample_rate": SAMPLE_RATE})
    chunks = Pyannote.merge_chunks(scores, chunk_size, onset=onset, offset=offset)
    return scores, chunks
