"""The diarize stage: who spoke when, and which words and segments each speaker said.

This module holds the offline ``builtin`` backend and the assignment of speakers to words and
segments. The builtin backend needs no token and no hub:

  speech regions (aligned word spans or VAD regions, as ``(start, end)`` seconds)
  -> resemblyzer's GE2E speaker encoder (its weights ship in the wheel) on sliding windows
     (1.5 s, 0.75 s hop) inside the regions
  -> agglomerative clustering (centroid linkage, cosine; tiny outlier clusters merged first)
     that honours ``num_speakers`` exactly, else ``min_speakers``/``max_speakers``, else
     estimates the count: clusters merge while their voices are at least ``SAME_SPEAKER_SIM``
     alike (at most 8 speakers; one when every merge is that alike)
  -> label smoothing -> turns labelled ``SPEAKER_00``, ``SPEAKER_01``, ... by first appearance.

It also returns each speaker's centroid (unit-norm encoder embedding) so verification can match
speakers to enrolled voices with :func:`embed_clip` embeddings of the same encoder.

Heavy imports (torch, resemblyzer, librosa, scipy, sklearn) happen on first use.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
from pydantic import BaseModel, Field, model_validator

from speech.models import CACHE, ModelCache, resolve_device
from speech.schema import DiarizationBackend, Segment, SpeakerInfo, TimedWord, check_speaker_counts
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
Backend = DiarizationBackend

# ---- builtin backend constants (seconds unless said otherwise) ---------------------------
WINDOW_S = 1.5  # embedding window
HOP_S = 0.75  # window hop
JOIN_GAP_S = 0.2  # input spans closer than this form one speech region
MIN_RELIABLE_S = 1.0  # regions shorter than this are labelled by their nearest centroid, not clustered
MERGE_TURN_GAP_S = 0.5  # consecutive turns of one speaker closer than this become one turn
MAX_AUTO_SPEAKERS = 8  # upper bound of the count estimate when max_speakers is not given
SAME_SPEAKER_SIM = 0.82  # clusters whose centroids are at least this similar are one voice (estimate)
MIN_CLUSTER_WINDOWS = 3  # smaller clusters are outliers, merged into their nearest cluster ...
MIN_CLUSTER_SHARE = 0.02  # ... as are clusters holding less than this share of the windows ...
OUTLIER_SIM = 0.70  # ... unless their voice is further than this from every other cluster
MAX_START_CLUSTERS = 400  # above this many windows, agglomeration starts from average-linkage clusters
PAUSE_S = 0.25  # a region is cut at a pause at least this long ...
PAUSE_DB = -35.0  # ... of frames this far below the loud speech (95th percentile of the regions)
TARGET_DBFS = -20.0  # speech loudness the encoder sees (RMS over the speech regions)
FRAME_S = 0.01  # the encoder's mel hop (10 ms)


class Turn(BaseModel):
    start: float
    end: float
    speaker: str


class DiarizeParams(BaseModel):
    """The diarize stage's own parameters (its cache key, with the audio hash)."""

    backend: Backend = "auto"
    num_speakers: Optional[int] = Field(None, ge=1, description="Exact number of speakers, when known.")
    min_speakers: Optional[int] = Field(None, ge=1)
    max_speakers: Optional[int] = Field(None, ge=1)

    model: Optional[str] = Field(None, description="local pyannote pipeline: hub name or directory")
    use_api_first: bool = Field(False, description="auto tries the hosted API first (a saved job was given)")

    @classmethod
    def from_request(cls, req: Any) -> "DiarizeParams":
        return cls(backend=req.diarization_backend, num_speakers=req.num_speakers, min_speakers=req.min_speakers,
                   max_speakers=req.max_speakers, model=req.diarization_model,
                   use_api_first=bool(req.pyannote_json_in))

    @model_validator(mode="after")
    def _bounds(self) -> "DiarizeParams":
        check_speaker_counts(self.num_speakers, self.min_speakers, self.max_speakers)
        return self


class DiarizationOutcome(BaseModel):
    turns: list[Turn]
    backend: Optional[str] = None
    error: Optional[str] = None
    # per speaker label: the unit-norm embedding of the builtin encoder (for verification)
    centroids: dict[str, list[float]] = Field(default_factory=dict)
    seconds: float = 0.0
    job: Optional[dict[str, Any]] = Field(None, description="pyannoteAI job JSON (saved as <stem>.pyannote.job.json)")


# ----------------------------------------------------------------------------------
# the speaker encoder (resemblyzer GE2E), loaded once per process

_ENCODER: Any = None
_ENCODER_LOCK = threading.Lock()


def _import_resemblyzer() -> Any:
    """``import resemblyzer`` quietly (pkg_resources and scipy deprecation warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import resemblyzer

    return resemblyzer


def voice_encoder() -> Any:
    """resemblyzer's ``VoiceEncoder`` on CPU, loaded once per process (weights ship in the wheel)."""
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            t0 = time.perf_counter()
            resemblyzer = _import_resemblyzer()
            _ENCODER = resemblyzer.VoiceEncoder("cpu", verbose=False)
            _ENCODER.eval()
            log.info("loaded the resemblyzer speaker encoder in %.1f s", time.perf_counter() - t0)
        return _ENCODER


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


def embed_clip(audio: np.ndarray, speech: Optional[list[tuple[float, float]]] = None) -> np.ndarray:
    """One unit-norm embedding for a clip (e.g. an enrolment sample), comparable with the
    ``centroids`` of :func:`diarize_builtin`: the same normalisation, windows and encoder.

    ``speech`` limits it to speech regions; by default the clip's non-silent span is used.
    """
    audio = _as_float(audio)
    if speech is None:
        speech = _energy_regions(audio)
    regions = _regions(speech, len(audio) / SAMPLE_RATE)
    if not regions:
        raise ValueError("the clip holds no speech")
    voice_encoder()
    mel = _mel(_normalise(audio, regions))
    windows = _windows(regions, len(mel))
    emb = _embed([mel[a:b] for _, a, b in windows])
    weights = np.array([b - a for _, a, b in windows], np.float64)
    v = (emb * weights[:, None]).sum(axis=0)
    return (v / (np.linalg.norm(v) or 1.0)).astype(np.float32)


def _energy_regions(audio: np.ndarray, frame_s: float = 0.03, floor_db: float = -40.0) -> list[tuple[float, float]]:
    """Crude speech regions for a clip with no VAD: frames within ``floor_db`` of the loudest."""
    n = int(frame_s * SAMPLE_RATE)
    if audio.size < n:
        return [(0.0, audio.size / SAMPLE_RATE)] if audio.size else []
    frames = audio[: audio.size // n * n].reshape(-1, n)
    db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    on = db > db.max() + floor_db
    out: list[tuple[float, float]] = []
    for i in np.flatnonzero(on):
        s, e = i * frame_s, (i + 1) * frame_s
        if out and s - out[-1][1] < 0.3:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


# ----------------------------------------------------------------------------------
# regions and windows


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


# ----------------------------------------------------------------------------------
# clustering


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n == 0, 1, n)


def _centroids(emb: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): _unit(emb[labels == c].mean(axis=0)) for c in np.unique(labels)}


def _merge_clusters(emb: np.ndarray, labels: np.ndarray, lo: int, hi: int, threshold: Optional[float],
                    min_size: int) -> np.ndarray:
    """Centroid-linkage agglomeration (cosine of unit-norm cluster means) from ``labels``.

    Merges the most similar pair while there are more than ``hi`` clusters, or more than ``lo``
    and the pair's similarity is at least ``threshold``. A cluster smaller than ``min_size``
    windows whose voice is still close to another (``OUTLIER_SIM``) is merged first, whatever
    the threshold: a few windows of a known voice are an outlier (an odd vowel, a window across
    a speaker change), not a speaker; a few windows of a clearly different voice are kept.
    """
    keys = list(np.unique(labels))
    sums = np.stack([emb[labels == k].sum(axis=0) for k in keys]).astype(np.float64)
    sizes = np.array([(labels == k).sum() for k in keys])
    members = [[k] for k in keys]
    cents = _unit(sums)
    sim = cents @ cents.T
    np.fill_diagonal(sim, -np.inf)
    alive = np.ones(len(keys), bool)
    n = len(keys)
    while n > max(lo, 1):
        small = alive & (sizes < min_size) & (sim.max(axis=1) >= OUTLIER_SIM)
        if small.any():
            masked = np.where(small[:, None] | small[None, :], sim, -np.inf)
        else:
            masked = sim
        i, j = np.unravel_index(np.argmax(masked), masked.shape)
        if not small.any() and n <= hi and (threshold is None or masked[i, j] < threshold):
            break
        i, j = min(i, j), max(i, j)
        sums[i] += sums[j]
        sizes[i] += sizes[j]
        members[i] += members[j]
        alive[j] = False
        sim[j, :] = sim[:, j] = -np.inf
        c = _unit(sums[i])
        row = _unit(sums) @ c
        row[~alive] = -np.inf
        row[i] = -np.inf
        sim[i, :] = sim[:, i] = row
        n -= 1
    out = labels.copy()
    for m, keep in zip(members, alive):
        if keep:
            for k in m:
                out[labels == k] = m[0]
    return out


def _cluster(emb: np.ndarray, params: DiarizeParams) -> tuple[np.ndarray, str]:
    """Cluster labels for the window embeddings, and how the count was chosen.

    Exact ``num_speakers``: agglomerate to that many clusters. Otherwise agglomerate while two
    clusters' voices are at least ``SAME_SPEAKER_SIM`` alike, within ``min_speakers`` ..
    ``max_speakers`` (default 1 .. ``MAX_AUTO_SPEAKERS``).
    """
    n = len(emb)
    if n == 1:
        return np.zeros(1, int), "one window"
    labels = np.arange(n)
    if n > MAX_START_CLUSTERS:  # keep the agglomeration quadratic: start from small clusters
        from scipy.cluster.hierarchy import fcluster, linkage

        z = linkage(emb.astype(np.float64), method="average", metric="cosine")
        labels = fcluster(z, t=MAX_START_CLUSTERS, criterion="maxclust") - 1
    min_size = max(MIN_CLUSTER_WINDOWS, int(np.ceil(MIN_CLUSTER_SHARE * n)))
    if params.num_speakers is not None:
        k = min(params.num_speakers, n)
        return _merge_clusters(emb, labels, k, k, None, min_size), f"num_speakers={params.num_speakers}"
    lo = min(params.min_speakers or 1, n)
    hi = min(params.max_speakers or max(MAX_AUTO_SPEAKERS, lo), n)
    out = _merge_clusters(emb, labels, lo, hi, SAME_SPEAKER_SIM, min_size)
    return out, f"estimated within {lo}..{hi}"


# ----------------------------------------------------------------------------------
# the builtin backend


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

    # Cluster the windows of regions long enough for a steady embedding; label the rest by
    # their nearest centroid (all windows when no region is long enough).
    long_enough = np.array([regions[r][1] - regions[r][0] >= MIN_RELIABLE_S for r, _, _ in windows])
    fit = long_enough if long_enough.any() else np.ones(len(windows), bool)
    fit_labels, how = _cluster(emb[fit], params)
    cents = _centroids(emb[fit], fit_labels)
    keys = sorted(cents)
    labels = np.empty(len(windows), int)
    labels[fit] = fit_labels
    if (~fit).any():
        sims = emb[~fit] @ np.stack([cents[k] for k in keys]).T
        labels[~fit] = np.array(keys)[sims.argmax(axis=1)]

    labels = _smooth(windows, labels)
    turns = _turns(regions, windows, labels)
    # names by first appearance
    order: dict[int, str] = {}
    for _, _, lab in turns:
        order.setdefault(lab, f"SPEAKER_{len(order):02d}")
    named = [Turn(start=round(s, 3), end=round(e, 3), speaker=order[lab]) for s, e, lab in turns]
    final = {}
    for c, name in order.items():
        sel = (labels == c) & fit if ((labels == c) & fit).any() else labels == c
        final[name] = [round(float(x), 6) for x in _unit(emb[sel].mean(axis=0))]
    log.info("builtin diarization: %d speakers (%s) from %d windows in %d regions",
             len(order), how, len(windows), len(regions))
    return DiarizationOutcome(turns=named, backend="builtin", centroids=final,
                              seconds=round(time.perf_counter() - t0, 3))


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


# ----------------------------------------------------------------------------------
# assignment of words and segments to speakers


class _TurnIndex:
    """Turns sorted by start, for overlap and nearest-turn queries in O(log n + hits)."""

    def __init__(self, turns: list[Turn]):
        self.turns = sorted(turns, key=lambda t: (t.start, t.end))
        self.starts = [t.start for t in self.turns]
        self.max_end: list[float] = []  # running max of ends, and where it occurs
        self.max_at: list[int] = []
        for i, t in enumerate(self.turns):
            if not self.max_end or t.end > self.max_end[-1]:
                self.max_end.append(t.end)
                self.max_at.append(i)
            else:
                self.max_end.append(self.max_end[-1])
                self.max_at.append(self.max_at[-1])
        self.first = {}
        for t in self.turns:
            self.first.setdefault(t.speaker, t.start)

    def speaker_at(self, start: float, end: float) -> str:
        """The speaker with the most overlap (ties: the one heard first); else the nearest turn's."""
        hi = bisect.bisect_right(self.starts, end)  # turns starting before the span ends
        overlap: dict[str, float] = {}
        touching: set[str] = set()  # turns holding a zero-length span
        k = hi - 1
        while k >= 0 and self.max_end[k] >= start:
            t = self.turns[k]
            ov = min(end, t.end) - max(start, t.start)
            if ov > 0:
                overlap[t.speaker] = overlap.get(t.speaker, 0.0) + ov
            elif ov == 0 and t.start <= start and end <= t.end:
                touching.add(t.speaker)
            k -= 1
        if overlap:
            return max(sorted(overlap.items()), key=lambda kv: (kv[1], -self.first[kv[0]]))[0]
        if touching:
            return min(sorted(touching), key=lambda spk: self.first[spk])
        mid = (start + end) / 2
        after = bisect.bisect_left(self.starts, mid)
        candidates = []
        if after < len(self.turns):
            candidates.append((self.turns[after].start - mid, self.turns[after]))
        if after > 0:
            before = self.turns[self.max_at[after - 1]]
            candidates.append((max(mid - before.end, 0.0), before))
        return min(candidates, key=lambda c: (c[0], c[1].start))[1].speaker


def talk_time(turns: list[Turn]) -> dict[str, SpeakerInfo]:
    """``speakers``: {label: {name: label, time: talk seconds}} from the turns, labels sorted."""
    totals: dict[str, float] = {}
    for t in turns:
        totals[t.speaker] = totals.get(t.speaker, 0.0) + max(0.0, t.end - t.start)
    return {k: SpeakerInfo(name=k, time=round(v, 2)) for k, v in sorted(totals.items())}


def assign_speakers(segments: list[Segment], turns: list[Turn]) -> tuple[list[Segment], dict[str, SpeakerInfo]]:
    """Label words and segments with speakers by time overlap (WhisperX's
    ``assign_word_speakers``, plus splitting): a segment whose words belong to several speakers
    becomes one segment per run of words (text re-joined from the words, times from the words).

    Each word takes the speaker with the most overlap, else the nearest turn's; a word without
    times takes its run's speaker (the previous timed word's, else the next's). A segment
    without words takes the speaker with the most overlap (nearest turn when none).
    """
    if not turns:
        return list(segments), {}
    index = _TurnIndex(turns)
    out: list[Segment] = []
    for seg in segments:
        words = seg.words or []
        timed = [w.start is not None and w.end is not None for w in words]
        if not any(timed):
            speaker = index.speaker_at(seg.start, seg.end)
            new_words = [w.model_copy(update={"speaker": speaker}) for w in words] if words else seg.words
            out.append(seg.model_copy(update={"speaker": speaker, "words": new_words}))
            continue
        spk: list[Optional[str]] = [index.speaker_at(w.start, w.end) if ok else None for w, ok in zip(words, timed)]
        last = next(s for s in spk if s is not None)
        for i, s in enumerate(spk):  # untimed words follow the previous timed word
            if s is None:
                spk[i] = last
            else:
                last = s
        labelled = [w.model_copy(update={"speaker": s}) for w, s in zip(words, spk)]
        runs: list[list[TimedWord]] = []
        for w in labelled:
            if runs and runs[-1][0].speaker == w.speaker:
                runs[-1].append(w)
            else:
                runs.append([w])
        if len(runs) == 1:
            out.append(seg.model_copy(update={"speaker": runs[0][0].speaker, "words": labelled}))
            continue
        for run in runs:
            starts = [w.start for w in run if w.start is not None]
            ends = [w.end for w in run if w.end is not None]
            out.append(Segment(
                start=min(starts) if starts else seg.start,
                end=max(ends) if ends else seg.end,
                text=" ".join(w.word.strip() for w in run),
                words=run,
                speaker=run[0].speaker,
            ))
    return out, talk_time(turns)


# ----------------------------------------------------------------------------------
# the stage: backend choice, fallbacks


def speech_regions(segments: list[Segment]) -> list[tuple[float, float]]:
    """Where people speak: aligned word spans when there are words, else segment spans."""
    regions = []
    for seg in segments:
        if seg.words and all(w.start is not None for w in seg.words):
            regions += [(w.start, w.end) for w in seg.words if w.end > w.start]
        else:
            regions.append((seg.start, seg.end))
    return regions


def _diarize_pyannote_local(audio: np.ndarray, params: DiarizeParams, settings: Settings, hf_token: Optional[str],
                            cache: ModelCache) -> DiarizationOutcome:
    device, _ = resolve_device(settings)
    pipeline = cache.get_diarization_pipeline(params.model, device, hf_token, settings, probe=params.backend == "auto")
    frame = pipeline(np.ascontiguousarray(audio, dtype=np.float32), num_speakers=params.num_speakers,
                     min_speakers=params.min_speakers, max_speakers=params.max_speakers)
    turns = [Turn(start=round(float(r.start), 3), end=round(float(r.end), 3), speaker=str(r.speaker))
             for r in frame.itertuples()]
    return DiarizationOutcome(turns=turns, backend="pyannote")


def diarize(
    audio: np.ndarray,
    segments: list[Segment],
    params: DiarizeParams,
    settings: Optional[Settings] = None,
    hf_token: Optional[str] = None,
    api: Optional[Callable[[], Any]] = None,
    cache: ModelCache = CACHE,
) -> DiarizationOutcome:
    """Who spoke when. ``auto``: local pyannote if its model loads, else builtin. Never raises
    for a backend failure: the outcome says what failed and the run keeps its transcript."""
    settings = settings or get_settings()
    if params.backend == "auto":
        order = (["pyannote-api"] if params.use_api_first else []) + ["pyannote", "builtin"]
    else:
        order = [params.backend]
    errors = []
    for backend in order:
        try:
            if backend == "pyannote":
                outcome = _diarize_pyannote_local(audio, params, settings, hf_token, cache)
            elif backend == "pyannote-api":
                if api is None:
                    raise ValueError("no pyannoteAI API key (PYANNOTE_API_KEY) and no pyannote_json_in")
                outcome = api()
            else:
                outcome = diarize_builtin(audio, speech_regions(segments), params)
            if not outcome.turns:
                raise ValueError("no speaker turns found")
        except Exception as exc:  # noqa: BLE001 - the original worker kept the transcript too
            reason = f"{backend}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            (log.info if params.backend == "auto" else log.warning)("diarization backend unavailable: %s", reason)
            errors.append(reason)
            continue
        if errors:
            outcome.error = "; ".join(errors)
        return outcome
    return DiarizationOutcome(turns=[], backend=None, error="; ".join(errors))
