"""Language detection with the original worker's contract: try successive 30 s windows of
*speech* (after VAD) until one reaches ``language_detection_min_prob``, at most
``language_detection_max_tries`` windows; if none does, keep the most probable."""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from speech.schema import SAMPLE_RATE

log = logging.getLogger(__name__)


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
