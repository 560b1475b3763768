"""The transcribe stage: WhisperX's batched faster-whisper pipeline + language detection.

VAD runs once per file (whisperx's pyannote VAD, shipped in its wheel); its speech regions
feed both language detection and the batched decoder. Detection follows the original
worker's contract: try successive 30 s windows of *speech* until one reaches
``language_detection_min_prob`` (at most ``language_detection_max_tries``); if none does,
keep the most probable.
"""
from __future__ import annotations

import contextlib
import io
import logging
import resource
import time
from typing import Any, Optional

import numpy as np

from speech import progress
from speech.models import CACHE, ModelCache, resolve_device, resolve_model
from speech.schema import Segment, TranscribeParams, Transcript
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CHUNK_SECONDS = 30


class _PrecomputedVad:
    """Hands whisperx the VAD scores we already computed, so VAD runs once per file."""

    def __init__(self, scores: Any):
        self.scores = scores

    def __call__(self, _inputs: Any, **_: Any) -> Any:
        return self.scores


def speech_chunks(vad_model: Any, audio: np.ndarray, onset: float, offset: float) -> tuple[Any, list[dict]]:
    """VAD scores and whisperx's merged ≤30 s speech chunks [{start, end, segments}]."""
    from whisperx.vads import Pyannote

    scores = vad_model({"waveform": Pyannote.preprocess_audio(audio), "sample_rate": SAMPLE_RATE})
    chunks = Pyannote.merge_chunks(scores, CHUNK_SECONDS, onset=onset, offset=offset)
    return scores, chunks


def detect_language(
    model: Any, audio: np.ndarray, chunks: list[dict], min_prob: float, max_tries: int
) -> tuple[str, float, int]:
    """(language, probability, windows tried) over successive 30 s windows of speech."""
    from faster_whisper.audio import pad_or_trim

    if not model.model.is_multilingual:
        return "en", 1.0, 0
    if chunks:
        speech = np.concatenate([audio[int(c["start"] * SAMPLE_RATE) : int(c["end"] * SAMPLE_RATE)] for c in chunks])
    else:
        speech = audio
    n = model.feature_extractor.n_samples
    windows = [speech[i : i + n] for i in range(0, max(len(speech), 1), n)]
    # a last window with under 1 s of speech says little; keep it only if it is the only one
    windows = [w for k, w in enumerate(windows) if k == 0 or len(w) >= SAMPLE_RATE]
    tries = 1 if min_prob <= 0 else max_tries
    best: Optional[tuple[str, float]] = None
    used = 0
    for used, window in enumerate(windows[:tries], start=1):
        features = pad_or_trim(model.feature_extractor(np.ascontiguousarray(window)))
        results = model.model.detect_language(model.encode(features))[0]
        token, prob = results[0]
        lang = token[2:-2]
        log.info("language window %d: %s (%.2f)", used, lang, prob)
        if best is None or prob > best[1]:
            best = (lang, prob)
        if prob >= min_prob:
            break
    assert best is not None
    return best[0], float(best[1]), used


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
) -> Transcript:
    """Transcribe 16 kHz mono float32 samples into segments (no word times yet)."""
    settings = settings or get_settings()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    from whisperx.asr import load_model  # torch, transformers, pyannote: seconds on first use

    if time.perf_counter() - t > 0.05:
        timings["import"] = round(time.perf_counter() - t, 3)
    audio = np.array(audio, dtype=np.float32)  # writable copy: torch dislikes read-only maps

    t = time.perf_counter()
    spec = resolve_model(params.model, settings)
    device, compute_type = resolve_device(settings)
    before = cache.load_count
    loaded = cache.get_whisper(spec, device, compute_type, settings)
    vad_model = cache.get_vad(device, settings)
    if cache.load_count != before:
        timings["model_load"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    progress.report("transcribe", 0.0, "voice activity detection")
    scores, chunks = speech_chunks(vad_model, audio, params.vad_onset, params.vad_offset)
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

    segments: list[Segment] = []
    t = time.perf_counter()
    if chunks:
        asr_options: dict[str, Any] = {"temperatures": [params.temperature], "initial_prompt": params.initial_prompt}
        if params.beam_size is not None:
            asr_options["beam_size"] = params.beam_size
        with contextlib.redirect_stdout(io.StringIO()):  # whisperx prints a notice here
            pipeline = load_model(
                spec.source,
                device,
                compute_type=compute_type,
                asr_options=asr_options,
                language=language,
                vad_model=_PrecomputedVad(scores),
                vad_options={"vad_onset": params.vad_onset, "vad_offset": params.vad_offset},
                model=loaded.whisper,
            )
        out = pipeline.transcribe(
            audio,
            batch_size=params.batch_size,
            language=language,
            progress_callback=lambda pct: progress.report("transcribe", pct / 100.0, "decoding"),
        )
        for s in out["segments"]:
            text = s["text"].strip()
            if text:
                segments.append(Segment(start=float(s["start"]), end=float(s["end"]), text=text))
    else:
        log.info("no speech found; returning an empty transcript")
    timings["asr"] = round(time.perf_counter() - t, 3)
    progress.report("transcribe", 1.0, f"{len(segments)} segments")

    return Transcript(
        segments=segments,
        language=language,
        language_probability=None if probability is None else round(probability, 4),
        language_detection_tries=tries,
        model=spec.label,
        model_source=spec.source,
        device=device,
        compute_type=compute_type,
        timings=timings,
        peak_memory_mb=peak_memory_mb(device),
    )
