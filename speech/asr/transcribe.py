"""The transcribe stage: WhisperX's batched faster-whisper pipeline + language detection.

VAD runs once per file (:mod:`speech.asr.vad`); its speech regions feed both language
detection (:mod:`speech.asr.language`) and the batched decoder.
"""
from __future__ import annotations

import contextlib
import io
import logging
import resource
import time
from typing import Any, Optional

import numpy as np

from speech.asr.language import detect_language
from speech.asr.vad import get_vad, precomputed, speech_chunks
from speech.asr.whisper import get_whisper, resolve_model
from speech.models import CACHE, ModelCache, resolve_device
from speech.progress import ProgressCallback, report
from speech.contracts import Segment, TranscribeParams, Transcript
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)


def peak_memory_mb(device: str) -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if device == "cuda":
        import torch

        rss += torch.cuda.max_memory_allocated() / 2**20
    return round(rss, 1)


def transcribe(
    audio: np.ndarray,
    params: TranscribeParams,
    settings: Optional[Settings] = None,
    cache: ModelCache = CACHE,
    progress: Optional[ProgressCallback] = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 samples into segments (no word times yet)."""
    settings = settings or get_settings()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    import whisperx.asr  # noqa: F401 - torch, transformers, pyannote: seconds on first use

    if time.perf_counter() - t > 0.05:
        timings["import"] = round(time.perf_counter() - t, 3)
    audio = np.asarray(audio)
    if audio.dtype != np.float32 or not audio.flags.writeable:  # torch dislikes read-only maps
        audio = np.array(audio, dtype=np.float32)  # (the decode cache's copy-on-write map needs no copy)

    t = time.perf_counter()
    spec = resolve_model(params.model, settings)
    device, compute_type = resolve_device(settings, params.device, params.compute_type)
    before = cache.load_count
    if params.threads:  # whisperx's --threads: torch's pool (process-wide) and CTranslate2's
        import torch

        torch.set_num_threads(params.threads)
    loaded = get_whisper(spec, device, compute_type, settings, cache, threads=params.threads)
    vad_model = get_vad(device, settings, cache, params.vad_method)
    if cache.load_count != before:
        timings["model_load"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    report(progress, "transcribe", 0.0, "voice activity detection")
    scores, chunks = speech_chunks(vad_model, audio, params.vad_onset, params.vad_offset, params.chunk_size,
                                   params.vad_method)
    timings["vad"] = round(time.perf_counter() - t, 3)

    language, probability, tries = params.language, None, 0
    if language is None and chunks:
        t = time.perf_counter()
        language, probability, tries = detect_language(
            loaded.whisper, audio, chunks, params.language_detection_min_prob, params.language_detection_max_tries
        )
        timings["language_detection"] = round(time.perf_counter() - t, 3)
    elif not loaded.whisper.model.is_multilingual and language != "en":
        log.warning("model %s is English-only; transcribing as English", spec.label)
        language = "en"

    t = time.perf_counter()
    batch_size = params.batch_size
    if device == "cpu" and settings.cpu_batch_size and batch_size > settings.cpu_batch_size:
        batch_size = settings.cpu_batch_size  # same transcript, same speed on the CPU, a fraction of the memory
        log.info("decoding %d chunks at a time on the CPU (WHISPERX_CPU_BATCH_SIZE; batch_size %d is for GPUs)",
                 batch_size, params.batch_size)
    segments = _decode(audio, chunks, scores, loaded, language, params, batch_size, progress) if chunks else []
    if not chunks:
        log.info("no speech found; returning an empty transcript")
    timings["asr"] = round(time.perf_counter() - t, 3)
    report(progress, "transcribe", 1.0, f"{len(segments)} segments")

    return Transcript(
        segments=segments,
        language=language,
        language_probability=None if probability is None else round(probability, 4),
        language_detection_tries=tries,
        model=spec.label,
        model_source=spec.source,
        device=device,
        compute_type=compute_type,
        threads=params.threads,
        timings=timings,
        peak_memory_mb=peak_memory_mb(device),
    )


def _decode(audio: np.ndarray, chunks: list[dict], scores: Any, loaded: Any, language: Optional[str],
            params: TranscribeParams, batch_size: int, progress: Optional[ProgressCallback]) -> list[Segment]:
    """whisperx's batched pipeline over the speech chunks, with the VAD scores already computed."""
    from whisperx.asr import load_model

    asr_options = params.asr_options()
    with contextlib.redirect_stdout(io.StringIO()):  # whisperx prints a notice here
        pipeline = load_model(
            loaded.spec.source,
            loaded.device,
            compute_type=loaded.compute_type,
            asr_options=asr_options,
            language=language,
            vad_model=precomputed(scores, params.vad_method),
            vad_options={"vad_onset": params.vad_onset, "vad_offset": params.vad_offset,
                         "chunk_size": params.chunk_size},
            model=loaded.whisper,
        )
    out = pipeline.transcribe(
        audio,
        batch_size=batch_size,
        language=language,
        task=params.task,
        chunk_size=params.chunk_size,
        progress_callback=lambda pct: report(progress, "transcribe", pct / 100.0, "decoding"),
    )
    return [Segment(start=float(s["start"]), end=float(s["end"]), text=s["text"].strip())
            for s in out["segments"] if s["text"].strip()]
