"""The offline ``builtin`` diarizer: no token, no hub.

  speech regions (aligned word spans or VAD regions, as ``(start, end)`` seconds), cut at pauses
  -> resemblyzer's GE2E speaker encoder (its weights ship in the wheel) on sliding windows
     (1.5 s, 0.75 s hop) inside the regions
  -> clustering (:mod:`speech.speakers.cluster`) that honours the speaker-count hints or
     estimates the count
  -> label smoothing -> turns labelled ``SPEAKER_00``, ``SPEAKER_01``, ... by first appearance.

Heavy imports (torch, resemblyzer, librosa, scipy) happen on first use.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from speech.contracts import DiarizationOutcome, DiarizeParams, Turn
from speech.schema import SAMPLE_RATE
from speech.speakers.cluster import centroids, cluster
from speech.speakers.encoders import voice_encoder

log = logging.getLogger(__name__)

WINDOW_S = 1.5  # embedding window
HOP_S = 0.75  # window hop
JOIN_GAP_S = 0.2  # input spans closer than this form one speech region
MIN_RELIABLE_S = 1.0  # regions shorter than this are labelled by their nearest centroid, not clustered
MERGE_TURN_GAP_S = 0.5  # consecutive turns of one speaker closer than this become one turn
PAUSE_S = 0.25  # a region is cut at a pause at least this long ...
PAUSE_DB = -35.0  # ... of frames this far below the loud speech (95th percentile of the regions)
TARGET_DBFS = -20.0  # speech loudness the encoder sees (RMS over the speech regions)
FRAME_S = 0.01  # the encoder's mel hop (10 ms)


def _as_float(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    audio = audio.astype(np.float32, copy=False)
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def _normalise(audio: np.ndarray, regions: list[tuple[float, float]]) -> np.ndarray:
    """One gain for the whole file so that its speech has RMS ``TARGET_DBFS``.

    The encoder reads a linear (not log) mel spectrogram, so its embeddings depend on level.
    resemblyzer's ``preprocess_wav`` raises quiet files to -30 dBFS over the whole file, silence
    included, then cuts silences with its own VAD. Here the caller's speech regions are the VAD:
    loudness is measured over them only and nothing is cut (cutting would shift every time
    stamp). One gain keeps the speakers' relative loudness; -20 dBFS separated voices best on
    the fixtures (a plateau from -17 to -22; -30 made two male voices look alike).
    """
    parts = [audio[int(s * SAMPLE_RATE): int(e * SAMPLE_RATE)] for s, e in regions]
    speech = np.concatenate(parts) if parts else audio
    rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64)))) if speech.size else 0.0
    if rms < 1e-6:
        return audio
    gain = 10 ** (TARGET_DBFS / 20) / rms
    return (audio * gain).astype(np.float32)


def _mel(audio: np.ndarray) -> np.ndarray:
    """The encoder's input features for the whole file: (frames, 40), one frame per 10 ms."""
    from resemblyzer import audio as ra  # imported by voice_encoder() first

    return ra.wav_to_mel_spectrogram(audio)


def _embed(mels: list[np.ndarray]) -> np.ndarray:
    """Unit-norm embeddings, batching windows of equal length."""
    import torch

    encoder = voice_encoder()
    out = np.zeros((len(mels), 256), np.float32)
    by_len: dict[int, list[int]] = {}
    for i, m in enumerate(mels):
        by_len.setdefault(len(m), []).append(i)
    with torch.inference_mode():
        for idx in by_len.values():
            for k in range(0, len(idx), 64):
                chunk = idx[k: k + 64]
                batch = torch.from_numpy(np.stack([mels[i] for i in chunk]))
                out[chunk] = encoder(batch).numpy()
    return out


def _regions(speech: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    """Sorted, clipped speech spans; spans closer than ``JOIN_GAP_S`` are joined."""
    spans = sorted((max(0.0, float(s)), min(duration, float(e))) for s, e in speech
                   if s is not None and e is not None)
    out: list[list[float]] = []
    for s, e in spans:
        if e - s <= 0:
            continue
        if out and s - out[-1][1] < JOIN_GAP_S:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out if e - s >= 2 * FRAME_S]


def _split_at_pauses(audio: np.ndarray, regions: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Cut regions at pauses of at least ``PAUSE_S`` (frames ``PAUSE_DB`` below the loud speech).

    Word spans need no cutting, but VAD regions or segment times may hold several turns with
    short pauses between them: windows across such a pause mix two voices. Regions are only
    cut, never widened; audio with a high noise floor simply keeps its regions.
    """
    hop = int(FRAME_S * SAMPLE_RATE)
    n = len(audio) // hop
    if n == 0:
        return regions
    power = np.square(audio[: n * hop].reshape(n, hop), dtype=np.float64).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    inside = np.zeros(n, bool)
    for s, e in regions:
        inside[int(s / FRAME_S): int(e / FRAME_S)] = True
    if not inside.any():
        return regions
    quiet = db < np.percentile(db[inside], 95) + PAUSE_DB
    min_run = int(round(PAUSE_S / FRAME_S))
    out = []
    for s, e in regions:
        a, b = int(s / FRAME_S), min(int(e / FRAME_S), n)
        start, k = s, a
        while k < b:
            if quiet[k]:
                j = k
                while j < b and quiet[j]:
                    j += 1
                if j - k >= min_run and k > a and j < b:
                    out.append((start, k * FRAME_S))
                    start = j * FRAME_S
                k = j
            else:
                k += 1
        out.append((start, e))
    return [(s, e) for s, e in out if e - s >= 2 * FRAME_S]


def _windows(regions: list[tuple[float, float]], n_frames: int) -> list[tuple[int, int, int]]:
    """(region index, first frame, end frame) of each embedding window.

    A region shorter than a window is one window; a longer one is covered by windows of
    ``WINDOW_S`` every ``HOP_S``, the last one flush with the region's end.
    """
    win, hop = round(WINDOW_S / FRAME_S), round(HOP_S / FRAME_S)
    out = []
    for r, (s, e) in enumerate(regions):
        a, b = int(round(s / FRAME_S)), min(int(round(e / FRAME_S)), n_frames)
        if b - a <= win:
            if b > a:
                out.append((r, a, b))
            continue
        starts = list(range(a, b - win, hop)) + [b - win]
        out += [(r, st, st + win) for st in starts]
    return out


def diarize_builtin(audio: np.ndarray, speech: list[tuple[float, float]],
                    params: Optional[DiarizeParams] = None) -> DiarizationOutcome:
    """Offline diarization: speech regions -> encoder windows -> clustering -> turns.

    ``audio`` is 16 kHz mono (float32 in [-1, 1] or int16); ``speech`` the regions that hold
    speech, as (start, end) seconds: aligned word spans or VAD regions. Raises only for a broken
    encoder install; no speech gives no turns.
    """
    params = params or DiarizeParams()
    t0 = time.perf_counter()
    audio = _as_float(audio)
    duration = len(audio) / SAMPLE_RATE
    regions = _split_at_pauses(audio, _regions(speech, duration))
    if not regions:
        return DiarizationOutcome(turns=[], backend="builtin", seconds=round(time.perf_counter() - t0, 3))
    voice_encoder()
    mel = _mel(_normalise(audio, regions))
    windows = _windows(regions, len(mel))
    emb = _embed([mel[a:b] for _, a, b in windows])
    labels, how = _label_windows(emb, windows, regions, params)
    turns = _turns(regions, windows, _smooth(windows, labels))
    # names by first appearance
    order: dict[int, str] = {}
    for _, _, lab in turns:
        order.setdefault(lab, f"SPEAKER_{len(order):02d}")
    named = [Turn(start=round(s, 3), end=round(e, 3), speaker=order[lab]) for s, e, lab in turns]
    log.info("builtin diarization: %d speakers (%s) from %d windows in %d regions",
             len(order), how, len(windows), len(regions))
    return DiarizationOutcome(turns=named, backend="builtin", seconds=round(time.perf_counter() - t0, 3))


def _label_windows(emb: np.ndarray, windows: list[tuple[int, int, int]], regions: list[tuple[float, float]],
                   params: DiarizeParams) -> tuple[np.ndarray, str]:
    """A cluster label per window, and how the count was chosen.

    The windows of regions long enough for a steady embedding are clustered; the rest take
    their nearest centroid's label (all windows are clustered when no region is long enough).
    """
    long_enough = np.array([regions[r][1] - regions[r][0] >= MIN_RELIABLE_S for r, _, _ in windows])
    fit = long_enough if long_enough.any() else np.ones(len(windows), bool)
    fit_labels, how = cluster(emb[fit], params)
    cents = centroids(emb[fit], fit_labels)
    keys = sorted(cents)
    labels = np.empty(len(windows), int)
    labels[fit] = fit_labels
    if (~fit).any():
        sims = emb[~fit] @ np.stack([cents[k] for k in keys]).T
        labels[~fit] = np.array(keys)[sims.argmax(axis=1)]
    return labels, how


def _smooth(windows: list[tuple[int, int, int]], labels: np.ndarray) -> np.ndarray:
    """Within a region, a lone window whose neighbours agree takes their label (a 3-median)."""
    out = labels.copy()
    for i in range(1, len(windows) - 1):
        r = windows[i][0]
        if windows[i - 1][0] == r == windows[i + 1][0] and labels[i - 1] == labels[i + 1] != labels[i]:
            out[i] = labels[i - 1]
    return out


def _turns(regions: list[tuple[float, float]], windows: list[tuple[int, int, int]],
           labels: np.ndarray) -> list[tuple[float, float, int]]:
    """Each region's time goes to the window whose centre is nearest; runs become turns."""
    pieces: list[tuple[float, float, int]] = []
    by_region: dict[int, list[int]] = {}
    for i, (r, _, _) in enumerate(windows):
        by_region.setdefault(r, []).append(i)
    for r, (s, e) in enumerate(regions):
        idx = by_region.get(r)
        if not idx:
            continue
        centres = [(windows[i][1] + windows[i][2]) / 2 * FRAME_S for i in idx]
        # boundaries halfway between consecutive window centres that change label
        start = s
        for j in range(1, len(idx)):
            if labels[idx[j]] != labels[idx[j - 1]]:
                cut = (centres[j - 1] + centres[j]) / 2
                pieces.append((start, cut, int(labels[idx[j - 1]])))
                start = cut
        pieces.append((start, e, int(labels[idx[-1]])))
    merged: list[list] = []
    for s, e, lab in pieces:
        if merged and merged[-1][2] == lab and s - merged[-1][1] < MERGE_TURN_GAP_S:
            merged[-1][1] = e
        else:
            merged.append([s, e, lab])
    return [(s, e, lab) for s, e, lab in merged]
