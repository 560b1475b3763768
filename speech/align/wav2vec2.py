"""WhisperX's own CTC aligner: ``whisperx.load_align_model`` + ``whisperx.align``, with the
language's default wav2vec2 model or ``align_model`` (a hub name or a local directory)."""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from speech.align.words import fill_missing, merge_segments, refine, round_time
from speech.models import ModelCache, hub_offline, resolve_device
from speech.progress import ProgressCallback, report
from speech.contracts import AlignParams, Segment, TimedChar, TimedWord, Transcript
from speech.settings import Settings

log = logging.getLogger(__name__)


def load_align_model(language: str, model_name: Optional[str], device: str, settings: Settings,
                     cache: ModelCache) -> tuple[Any, dict]:
    """WhisperX's wav2vec2 aligner for a language; a failed load is remembered for the process."""

    def load() -> Any:
        import whisperx

        return whisperx.load_align_model(
            language_code=language, device=device, model_name=model_name,
            model_dir=str(settings.align_model_dir) if settings.align_model_dir else None,
            model_cache_only=hub_offline(),
        )

    return cache.get("align", (language, model_name or "", device), load,
                     failure=lambda exc: f"cannot load the wav2vec2 aligner for {language!r} "
                                         f"({model_name or 'default model'}): {type(exc).__name__}: {str(exc)[:200]}")


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


def align_wav2vec2(audio: np.ndarray, transcript: Transcript, params: AlignParams, settings: Settings,
                   cache: ModelCache, progress: Optional[ProgressCallback] = None) -> list[Segment]:
    """whisperx.align over the transcript. whisperx splits segments into sentences itself; for
    ``segment_resolution="chunk"`` each transcript segment is aligned on its own and its
    sentences joined again."""
    import whisperx

    device, _ = resolve_device(settings, params.device)
    language = transcript.language or "en"
    model, metadata = load_align_model(language, params.align_model, device, settings, cache)
    ensure_punkt(language, settings)
    samples = np.ascontiguousarray(audio)

    def run(segments: list[Segment], done: float, share: float) -> list[Segment]:
        result = whisperx.align(
            [{"start": s.start, "end": s.end, "text": s.text} for s in segments], model, metadata, samples, device,
            interpolate_method=params.interpolate_method, return_char_alignments=params.return_char_alignments,
            progress_callback=lambda pct: report(progress, "align", done + share * pct / 100.0, "wav2vec2"),
        )
        return [_segment(seg) for seg in result["segments"]]

    if params.segment_resolution == "sentence":
        return run(transcript.segments, 0.0, 1.0)
    n = len(transcript.segments)
    return [merge_segments(run([seg], i / n, 1 / n), seg) for i, seg in enumerate(transcript.segments)]


def _segment(seg: dict) -> Segment:
    """One of whisperx.align's segments as ours (words filled, bounds from words, chars kept)."""
    words = [TimedWord(word=w["word"], start=round_time(w.get("start")), end=round_time(w.get("end")),
                       score=round_time(w.get("score"))) for w in seg.get("words", [])]
    start, end = round_time(seg.get("start")), round_time(seg.get("end"))
    words = fill_missing(words, start, end)
    chars, text = seg.get("chars"), seg["text"]
    if chars is not None:
        # one char per character of the stripped text (whisperx's spans can take a space either side)
        at = "".join(c["char"] for c in chars).find(text.strip())
        chars = chars[at:at + len(text.strip())] if at >= 0 else chars
        chars = [TimedChar(char=c["char"], start=round_time(c.get("start")), end=round_time(c.get("end")),
                           score=round_time(c.get("score"))) for c in chars]
    return refine(Segment(start=start, end=end, text=text.strip(), chars=chars), words)
