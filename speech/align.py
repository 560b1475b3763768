"""The align stage: word timestamps for every segment.

Backends (``AlignParams.backend``):
  - ``wav2vec2``: WhisperX's CTC aligner (``whisperx.load_align_model`` / ``whisperx.align``)
    with the language's default model or ``align_model`` (name or local directory).
  - ``pocketsphinx``: forced alignment with the CMU en-us model shipped in pocketsphinx
    (English only; :mod:`speech.align_sphinx`).
  - ``whisper``: cross-attention alignment with the already-loaded Whisper model
    (CTranslate2 ``align``), any language.
  - ``auto``: wav2vec2 if its model loads, else pocketsphinx for English, else whisper.

Alignment never fails the run: a backend error is logged, the segment-level times are kept
and the result says so (``AlignOutcome.error``).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, Field

from speech import progress
from speech.models import CACHE, ModelCache, ModelSpec, resolve_device
from speech.schema import AlignBackend, Segment, TimedWord, Transcript
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
Backend = AlignBackend


class AlignParams(BaseModel):
    """The align stage's own parameters (its cache key, with the audio hash + transcript)."""

    backend: Backend = "auto"
    align_model: Optional[str] = Field(None, description="wav2vec2 model name or local directory")
    interpolate_method: Literal["nearest", "linear", "ignore"] = "nearest"


class AlignOutcome(BaseModel):
    segments: list[Segment]
    backend: Optional[str] = None  # the backend that produced the word times; None = not aligned
    error: Optional[str] = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The result's ``alignment`` key: which backend ran (None = segment times kept)."""
        out: dict[str, Any] = {"backend": self.backend}
        if self.error:
            out["error"] = self.error
        return out


# ----------------------------------------------------------------------------------
# helpers shared by the backends


def tokens_of(text: str) -> list[str]:
    return text.split()


def _spans(tokens: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for tok in tokens:
        spans.append((pos, pos + len(tok)))
        pos += len(tok)
    return spans


def project_words(tokens: list[str], pieces: list[tuple[str, float, float, float]]) -> list[TimedWord]:
    """Map aligner words (text, start, end, score) onto our whitespace tokens by characters.

    Both sides spell the same text up to whitespace, so character offsets (spaces removed)
    line them up even when the aligner splits or merges words differently.
    """
    piece_spans = _spans([re.sub(r"\s+", "", p[0]) for p in pieces])
    out = []
    for (a, b), tok in zip(_spans(tokens), tokens):
        hit = [p for (pa, pb), p in zip(piece_spans, pieces) if pa < b and a < pb]
        if hit:
            score = float(np.mean([h[3] for h in hit])) if all(h[3] is not None for h in hit) else None
            out.append(TimedWord(word=tok, start=round(float(hit[0][1]), 3), end=round(float(hit[-1][2]), 3),
                                 score=None if score is None else round(score, 3)))
        else:
            out.append(TimedWord(word=tok))
    return out


def fill_missing(words: list[TimedWord], seg_start: float, seg_end: float) -> list[TimedWord]:
    """Give unaligned words times between their aligned neighbours (WhisperX's 'nearest')."""
    timed = [i for i, w in enumerate(words) if w.start is not None]
    if not timed:
        n = max(len(words), 1)
        step = (seg_end - seg_start) / n
        return [w.model_copy(update={"start": round(seg_start + i * step, 3), "end": round(seg_start + (i + 1) * step, 3)})
                for i, w in enumerate(words)]
    out = list(words)
    for i, w in enumerate(words):
        if w.start is None:
            prev = max((j for j in timed if j < i), default=None)
            nxt = min((j for j in timed if j > i), default=None)
            start = out[prev].end if prev is not None else seg_start
            end = out[nxt].start if nxt is not None else seg_end
            if end < start:
                end = start
            out[i] = w.model_copy(update={"start": round(start, 3), "end": round(end, 3)})
    return out


def refine(segment: Segment, words: list[TimedWord]) -> Segment:
    """Segment boundaries from its word times."""
    if words and words[0].start is not None:
        return segment.model_copy(update={"words": words, "start": words[0].start, "end": max(w.end for w in words)})
    return segment.model_copy(update={"words": words})


_SENTENCE_END = re.compile(r"[.!?。！？]['\")\]]*$")


def split_sentences(segment: Segment) -> list[Segment]:
    """One segment per sentence, cut at word boundaries (as WhisperX's aligner does)."""
    words = segment.words or []
    if len(words) < 2:
        return [segment]
    groups, current = [], []
    for i, w in enumerate(words):
        current.append(w)
        if _SENTENCE_END.search(w.word) and i < len(words) - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    if len(groups) == 1:
        return [segment]
    return [
        refine(Segment(start=g[0].start, end=g[-1].end, text=" ".join(w.word for w in g)), g) for g in groups
    ]


# ----------------------------------------------------------------------------------
# backends


def _align_whisper(audio: np.ndarray, transcript: Transcript, settings: Settings, cache: ModelCache) -> list[Segment]:
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    device, compute = resolve_device(settings)
    spec = ModelSpec(source=transcript.model_source, label=transcript.model, is_dir=Path(transcript.model_source).is_dir())
    model = cache.get_whisper(spec, device, compute, settings).whisper  # the one that transcribed: cached
    language = transcript.language or "en"
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                          language=language if model.model.is_multilingual else "en")
    fe = model.feature_extractor
    out = []
    for i, seg in enumerate(transcript.segments):
        tokens = tokens_of(seg.text)
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
        progress.report("align", (i + 1) / len(transcript.segments), "whisper")
    return out


def ensure_punkt(language: str, settings: Settings) -> None:
    """whisperx.align splits sentences with NLTK's Punkt model, which it downloads on first
    use. Offline, give NLTK an untrained Punkt model (splits on sentence punctuation only)
    so alignment still runs; a real ``punkt_tab`` install takes precedence."""
    import nltk
    from whisperx.utils import PUNKT_LANGUAGES

    lang = PUNKT_LANGUAGES.get(language, "english")
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
        return
    except LookupError:
        pass
    root = settings.cache_dir / "nltk_data"
    model = root / "tokenizers" / "punkt_tab" / lang
    model.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).touch()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    log.info("NLTK punkt_tab not installed; using an untrained Punkt model for sentence splits")


def _align_wav2vec2(audio: np.ndarray, transcript: Transcript, params: AlignParams, settings: Settings,
                    cache: ModelCache) -> list[Segment]:
    import whisperx

    device, _ = resolve_device(settings)
    language = transcript.language or "en"
    model, metadata = cache.get_align_model(language, params.align_model, device, settings)
    ensure_punkt(language, settings)
    segments = [{"start": s.start, "end": s.end, "text": s.text} for s in transcript.segments]
    result = whisperx.align(
        segments, model, metadata, np.ascontiguousarray(audio), device,
        interpolate_method=params.interpolate_method, return_char_alignments=False,
        progress_callback=lambda pct: progress.report("align", pct / 100.0, "wav2vec2"),
    )
    out = []
    for seg in result["segments"]:
        raw = seg.get("words", [])
        words = [TimedWord(word=w["word"], start=_round(w.get("start")), end=_round(w.get("end")),
                           score=_round(w.get("score"))) for w in raw]
        start, end = _round(seg.get("start")), _round(seg.get("end"))
        words = fill_missing(words, start, end)
        out.append(refine(Segment(start=start, end=end, text=seg["text"].strip()), words))
    return out


def _round(x: Any) -> Optional[float]:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return None
    return round(float(x), 3)


def _align_pocketsphinx(audio: np.ndarray, transcript: Transcript) -> list[Segment]:
    from speech.align_sphinx import align_words_pocketsphinx

    out = []
    for i, seg in enumerate(transcript.segments):
        raw = align_words_pocketsphinx(audio, seg.start, seg.end, seg.text)
        words = [TimedWord(word=w["word"], start=_round(w.get("start")), end=_round(w.get("end")),
                           score=_round(w.get("score"))) for w in raw]
        out.append(refine(seg, fill_missing(words, seg.start, seg.end)))
        progress.report("align", (i + 1) / len(transcript.segments), "pocketsphinx")
    return out


def align(
    audio: np.ndarray,
    transcript: Transcript,
    params: Optional[AlignParams] = None,
    settings: Optional[Settings] = None,
    cache: ModelCache = CACHE,
) -> AlignOutcome:
    """Word times for every segment; never raises for a backend failure."""
    params = params or AlignParams()
    settings = settings or get_settings()
    t0 = time.perf_counter()
    if not transcript.segments:
        return AlignOutcome(segments=[], backend=None)
    language = transcript.language or "en"
    order = [params.backend] if params.backend != "auto" else ["wav2vec2"] + (["pocketsphinx"] if language == "en" else []) + ["whisper"]
    errors = []
    for backend in order:
        try:
            if backend == "wav2vec2":
                segments = _align_wav2vec2(audio, transcript, params, settings, cache)
            elif backend == "pocketsphinx":
                if language != "en":
                    raise ValueError(f"pocketsphinx aligns English only, not {language!r}")
                segments = _align_pocketsphinx(audio, transcript)
            else:
                segments = _align_whisper(audio, transcript, settings, cache)
        except Exception as exc:  # noqa: BLE001 - alignment must never fail the run
            reason = f"{backend}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            (log.info if params.backend == "auto" else log.warning)("alignment backend unavailable: %s", reason)
            errors.append(reason)
            continue
        segments = [part for seg in segments for part in split_sentences(seg)]
        return AlignOutcome(segments=segments, backend=backend, seconds=round(time.perf_counter() - t0, 3))
    log.warning("alignment failed; keeping segment-level times (%s)", "; ".join(errors))
    return AlignOutcome(segments=transcript.segments, backend=None, error="; ".join(errors),
                        seconds=round(time.perf_counter() - t0, 3))
