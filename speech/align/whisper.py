"""Cross-attention word alignment with the Whisper model that transcribed (any language).

CTranslate2's ``find_alignment`` on each segment's own audio (its first 30 s): token-level
resolution, so pauses are absorbed into neighbouring words; the offline fallback for languages
pocketsphinx does not cover.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from speech.align.words import fill_missing, project_words, refine
from speech.asr.whisper import ModelSpec, get_whisper
from speech.models import ModelCache, resolve_device
from speech.progress import ProgressCallback, report
from speech.contracts import Segment, Transcript
from speech.schema import SAMPLE_RATE
from speech.settings import Settings

log = logging.getLogger(__name__)


def align_whisper(audio: np.ndarray, transcript: Transcript, settings: Settings, cache: ModelCache,
                  progress: Optional[ProgressCallback] = None) -> list[Segment]:
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    spec = ModelSpec(source=transcript.model_source, label=transcript.model, is_dir=Path(transcript.model_source).is_dir())
    # the model that transcribed (cached), where it ran; a cached transcript's device may be gone
    device, compute = resolve_device(settings, transcript.device)
    if device == transcript.device:
        compute = transcript.compute_type
    model = get_whisper(spec, device, compute, settings, cache, threads=transcript.threads).whisper
    language = transcript.language or "en"
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                          language=language if model.model.is_multilingual else "en")
    fe = model.feature_extractor
    out = []
    for i, seg in enumerate(transcript.segments):
        tokens = seg.text.split()
        a, b = int(seg.start * SAMPLE_RATE), int(seg.end * SAMPLE_RATE)
        clip = np.ascontiguousarray(audio[a:b])
        if not tokens or clip.size < SAMPLE_RATE // 10:
            out.append(seg)
            continue
        if clip.size > fe.n_samples:
            log.warning("segment %.1f-%.1f s is longer than 30 s; whisper alignment uses its first 30 s", seg.start, seg.end)
            clip = clip[: fe.n_samples]
        features = pad_or_trim(fe(clip))
        encoder_output = model.encode(features)
        num_frames = clip.size // fe.hop_length
        text_tokens = tokenizer.encode(" " + seg.text.strip())
        found = model.find_alignment(tokenizer, [text_tokens], encoder_output, num_frames)[0]
        pieces = [(w["word"], seg.start + float(w["start"]), seg.start + float(w["end"]), float(w["probability"]))
                  for w in found]
        words = fill_missing(project_words(tokens, pieces), seg.start, seg.end)
        out.append(refine(seg, words))
        report(progress, "align", (i + 1) / len(transcript.segments), "whisper")
    return out
