"""Voice activity detection: whisperx's pyannote VAD (its weights ship in the whisperx wheel) or
Silero VAD v6 (the ONNX model bundled with faster-whisper; whisperx's own ``silero`` method
fetches it from torch.hub, which offline machines cannot reach).

VAD runs once per file: its output gives the speech chunks that feed language detection, and
:func:`precomputed` hands the same output to whisperx's batched decoder.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from speech.models import CACHE, ModelCache
from speech.contracts import TranscribeParams
from speech.schema import SAMPLE_RATE
from speech.settings import Settings

CHUNK_SECONDS = 30
# silero-vad's own get_speech_timestamps defaults, which whisperx's Silero method runs with
SILERO_MIN_SPEECH_MS, SILERO_MIN_SILENCE_MS, SILERO_PAD_MS = 250, 100, 30


def get_vad(device: str, settings: Settings, cache: ModelCache = CACHE, method: str = "pyannote") -> Any:
    """The VAD model for ``method``, loaded once per process (Silero runs on the CPU, in ONNX Runtime)."""
    if method == "silero":
        def load_silero() -> Any:
            from faster_whisper.vad import get_vad_model

            return get_vad_model()

        return cache.get("vad", "silero", load_silero)

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
    """Hands whisperx the pyannote VAD scores we already computed, so VAD runs once per file."""

    def __init__(self, scores: Any):
        self.scores = scores

    def __call__(self, _inputs: Any, **_: Any) -> Any:
        return self.scores


def precomputed(scores: Any, method: str = "pyannote") -> Any:
    """What whisperx's pipeline calls as its VAD: our output, merged the way ``method`` merges."""
    if method != "silero":
        return PrecomputedVad(scores)
    from whisperx.vads.vad import Vad

    class PrecomputedSilero(Vad):  # a Vad subclass: whisperx then merges with Vad.merge_chunks
        def __init__(self) -> None:  # noqa: D107 - no thresholds to check: the segments are final
            pass

        @staticmethod
        def preprocess_audio(audio: Any) -> Any:
            return audio

        def __call__(self, _inputs: Any, **_: Any) -> Any:
            return scores

    return PrecomputedSilero()


def speech_chunks(vad_model: Any, audio: np.ndarray, onset: float, offset: float,
                  chunk_size: int = CHUNK_SECONDS, method: str = "pyannote") -> tuple[Any, list[dict]]:
    """The VAD's output and whisperx's merged speech chunks of at most ``chunk_size`` s [{start, end, segments}]."""
    if method == "silero":
        return _silero_chunks(vad_model, audio, onset, offset, chunk_size)
    from whisperx.vads import Pyannote

    scores = vad_model({"waveform": Pyannote.preprocess_audio(audio), "sample_rate": SAMPLE_RATE})
    chunks = Pyannote.merge_chunks(scores, chunk_size, onset=onset, offset=offset)
    return scores, chunks


def _silero_chunks(model: Any, audio: np.ndarray, onset: float, offset: float,
                   chunk_size: int) -> tuple[Any, list[dict]]:
    """Silero speech regions (onset = speech threshold, offset = the threshold speech must drop
    below to end, at most ``chunk_size`` s each), merged as whisperx merges Silero's."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps
    from whisperx.diarize import Segment as SegmentX
    from whisperx.vads.vad import Vad

    del model  # get_speech_timestamps takes faster-whisper's cached model, which get_vad loaded
    options = VadOptions(threshold=onset, neg_threshold=min(offset, onset), max_speech_duration_s=chunk_size,
                         min_speech_duration_ms=SILERO_MIN_SPEECH_MS, min_silence_duration_ms=SILERO_MIN_SILENCE_MS,
                         speech_pad_ms=SILERO_PAD_MS)
    stamps = get_speech_timestamps(np.asarray(audio, dtype=np.float32), options, sampling_rate=SAMPLE_RATE)
    segments = [SegmentX(t["start"] / SAMPLE_RATE, t["end"] / SAMPLE_RATE, "UNKNOWN") for t in stamps]
    return segments, (Vad.merge_chunks(segments, chunk_size, onset, offset) if segments else [])
