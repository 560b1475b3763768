"""Clustering of speaker-embedding windows for the builtin diarizer.

Centroid-linkage agglomeration on cosine similarity (unit-norm cluster means) that honours
``num_speakers`` exactly, else ``min_speakers``/``max_speakers``, else estimates the count:
clusters merge while their voices are at least ``SAME_SPEAKER_SIM`` alike. Tiny clusters whose
voice is close to another are outliers (an odd vowel, a window across a speaker change) and
merge first.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from speech.contracts import DiarizeParams

MAX_AUTO_SPEAKERS = 8  # upper bound of the count estimate when max_speakers is not given
SAME_SPEAKER_SIM = 0.82  # clusters whose centroids are at least this similar are one voice (estimate)
MIN_CLUSTER_WINDOWS = 3  # smaller clusters are outliers, merged into their nearest cluster ...
MIN_CLUSTER_SHARE = 0.02  # ... as are clusters holding less than this share of the windows ...
OUTLIER_SIM = 0.70  # ... unless their voice is further than this from every other cluster
MAX_START_CLUSTERS = 400  # above this many windows, agglomeration starts from average-linkage clusters


def unit_rows(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n == 0, 1, n)


def centroids(emb: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): unit_rows(emb[labels == c].mean(axis=0)) for c in np.unique(labels)}


def merge_clusters(emb: np.ndarray, labels: np.ndarray, lo: int, hi: int, threshold: Optional[float],
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
    cents = unit_rows(sums)
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
        c = unit_rows(sums[i])
        row = unit_rows(sums) @ c
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


def cluster(emb: np.ndarray, params: DiarizeParams) -> tuple[np.ndarray, str]:
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
        return merge_clusters(emb, labels, k, k, None, min_size), f"num_speakers={params.num_speakers}"
    lo = min(params.min_speakers or 1, n)
    hi = min(params.max_speakers or max(MAX_AUTO_SPEAKERS, lo), n)
    out = merge_clusters(emb, labels, lo, hi, SAME_SPEAKER_SIM, min_size)
    return out, f"estimated within {lo}..{hi}"
