"""Speaker embeddings, enrolment and verification: give diarized speakers their real names.

The flow of a verification run::

    encoder  = get_encoder("auto")                      # ECAPA when it loads, else the shipped GE2E
    enrolled = enroll(request.speaker_samples, encoder) # {name: unit vector}, samples pooled per name
    naming   = name_speakers(audio, turns, enrolled, encoder, encoder.threshold, encoder.margin)
    # = speaker_embeddings (a centroid per SPEAKER_XX) + match_names (one-to-one) + name_turns
    segments, speakers = relabel(segments, speakers, naming.mapping, naming.scores)  # words assigned to naming.turns

Encoders (:mod:`speech.speakers.encoders`): ``builtin`` (resemblyzer GE2E, shipped), ``ecapa``
(SpeechBrain), ``auto`` (ECAPA if it loads, else CAM++, else builtin).

Cosine similarities are not comparable across encoders, so every encoder carries its own
``threshold`` and ``margin``; pass them to :func:`match_names`. The builtin values were measured
on the test fixtures (three flite voices, different sentences, centroids of whole
conversations): same voice 0.895-0.973, different voices 0.471-0.727 — hence a threshold of
0.80 (between the two bands) and a margin of 0.08 (the smallest correct best-vs-second gap seen
was 0.18). ECAPA's values follow SpeechBrain's own verification threshold (0.25); they could not
be measured here because its weights are not available offline.

Matching is one-to-one (Hungarian assignment on cosine similarity). A label keeps its
``SPEAKER_XX`` unless its assigned name clears the threshold AND beats that label's second-best
name by the margin — an unenrolled voice, or one that sits between two enrolled voices, stays
anonymous rather than getting a wrong name.

No Prefect here; torch, resemblyzer and speechbrain are imported only when an encoder loads.
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from typing import NamedTuple, Optional, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from speech.errors import AudioError, FetchError, InvalidRequest, SpeechError, TransientFetchError
from speech.policy import sample_target
from speech.redact import redact_url
from speech.contracts import Segment, SpeakerInfo
from speech.schema import SAMPLE_RATE, SpeakerSample
from speech.speakers.encoders import BUILTIN_MARGIN, BUILTIN_THRESHOLD, Encoder, get_encoder, unit

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 64
MIN_SAMPLE_SECONDS = 1.0  # an enrolment clip shorter than this is rejected
WINDOW_SECONDS = 3.0  # diarized turns are embedded in windows of at most this length ...
MIN_WINDOW_SECONDS = 0.5  # ... and turns shorter than this are skipped
MAX_WINDOWS_PER_LABEL = 120  # bounds the cost on long recordings (evenly spread over the turns)
MIN_TURN_SECONDS = 1.0  # a turn named on its own (name_turns) needs this much speech ...
MAX_TURNS_NAMED = 400  # ... and at most this many of the longest turns are embedded one by one


# ----------------------------------------------------------------------------------
# names


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def sanitize_name(raw: str) -> str:
    """Make a user- or URL-supplied name safe to show and to store.

    NFC-normalised; control/format characters and path separators become spaces; runs of
    whitespace collapse; leading dots go (no ``..`` or hidden-file names); at most 64 chars.
    Returns '' when nothing is left.
    """
    text = unicodedata.normalize("NFC", str(raw))
    text = "".join(" " if (unicodedata.category(ch).startswith("C") or ch in "/\\") else ch for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text.lstrip(". ")
    return text[:MAX_NAME_CHARS].strip()


def derive_name(sample: SpeakerSample) -> str:
    """The speaker name of an enrolment sample.

    First that applies: ``sample.name``; the URL's ``?name=`` query parameter; its
    ``#fragment``; the file stem (``clips/alice.wav`` -> ``alice``). The result is sanitised
    (:func:`sanitize_name`); an empty result raises :class:`InvalidRequest`.
    """
    url = sample.url.strip()
    candidates: list[tuple[str, str]] = []
    if sample.name is not None:
        candidates.append(("name", sample.name))
    else:
        parts = urlsplit(url)
        for value in parse_qs(parts.query, keep_blank_values=True).get("name", []):
            candidates.append(("?name=", value))
        if parts.fragment:
            candidates.append(("#fragment", unquote(parts.fragment)))
        path = parts.path if _SCHEME.match(url) else url.split("?", 1)[0].split("#", 1)[0]
        base = unquote(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
        candidates.append(("file stem", stem))
    for origin, raw in candidates:
        name = sanitize_name(raw)
        if name:
            return name
        if origin == "name":
            break  # an explicit but unusable name is an error, not a cue to guess
    raise InvalidRequest(
        f"speaker sample {redact_url(url)!r}: cannot derive a speaker name "
        f"(give 'name', a ?name= query or a #fragment)"
    )



# ----------------------------------------------------------------------------------
# enrolment


def _load_sample(sample: SpeakerSample, name: str) -> np.ndarray:
    from speech.io.audio import load_audio, read_samples
    from speech.settings import get_settings

    url = sample.url.strip()
    shown = f"speaker sample {name!r} ({redact_url(url)})"
    settings = get_settings()
    longest = min(settings.max_sample_seconds, settings.max_audio_seconds)
    try:  # a clip is decoded only up to MAX_SAMPLE_SECONDS: a longer one is refused, not read whole
        ref = load_audio(sample_target(url), settings=settings.model_copy(update={"max_audio_seconds": longest}))
        audio = np.asarray(read_samples(ref, settings), dtype=np.float32)
    except TransientFetchError as exc:
        raise TransientFetchError(f"{shown}: {exc}") from None  # network trouble: may retry
    except FetchError as exc:
        raise InvalidRequest(f"{shown}: {exc}") from None  # 404, no such file: fix the request
    except AudioError as exc:
        if "limit" in str(exc):
            raise AudioError(f"{shown}: longer than the {longest:.0f} s an enrolment clip may be (MAX_SAMPLE_SECONDS)") from None
        raise AudioError(f"{shown}: {exc}") from None
    seconds = audio.shape[0] / SAMPLE_RATE
    if seconds < MIN_SAMPLE_SECONDS:
        raise AudioError(f"{shown}: only {seconds:.2f} s of audio; an enrolment clip needs at least {MIN_SAMPLE_SECONDS:.0f} s")
    if float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < 1e-4:
        raise AudioError(f"{shown}: the clip is silent")
    return audio


def enroll(samples: Sequence[SpeakerSample], encoder: Optional[Encoder] = None) -> dict[str, np.ndarray]:
    """Fetch (local/http/s3, like the main audio) and embed each sample: ``{name: unit vector}``.

    Several samples with the same (derived) name are pooled into one voice: the mean of their
    embeddings, renormalised — that is how a speaker is enrolled from several clips. Any bad
    sample fails the whole enrolment with a message naming it: :class:`InvalidRequest` for a
    missing file/URL (404) or a name that cannot be derived, :class:`AudioError` for a file that
    is not audio or holds less than 1 s, :class:`TransientFetchError` for network trouble.
    """
    encoder = encoder or get_encoder()
    pooled: dict[str, list[np.ndarray]] = {}
    for sample in samples:
        name = derive_name(sample)
        audio = _load_sample(sample, name)
        try:
            vec = encoder.embed(audio)
        except SpeechError as exc:
            raise AudioError(f"speaker sample {name!r}: {exc}") from None
        pooled.setdefault(name, []).append(unit(vec))
    out = {name: unit(np.mean(vecs, axis=0)) for name, vecs in pooled.items()}
    log.info("enrolled %d speaker(s) from %d sample(s) with %s", len(out), len(samples), getattr(encoder, "name", "encoder"))
    return out


# ----------------------------------------------------------------------------------
# diarized speakers


def _windows(start: float, end: float) -> list[tuple[float, float]]:
    """Split one turn into equal windows of at most WINDOW_SECONDS; [] when it is too short."""
    dur = end - start
    if dur < MIN_WINDOW_SECONDS:
        return []
    n = max(1, math.ceil(dur / WINDOW_SECONDS - 1e-9))
    step = dur / n
    return [(start + k * step, start + (k + 1) * step) for k in range(n)]


def speaker_embeddings(
    audio: np.ndarray,
    turns: Sequence[tuple[float, float, str]],
    encoder: Optional[Encoder] = None,
    max_windows: int = MAX_WINDOWS_PER_LABEL,
) -> dict[str, np.ndarray]:
    """One unit-norm centroid per diarized label.

    Each turn ``(start, end, label)`` is cut into equal windows of at most 3 s (turns under
    0.5 s are skipped); window embeddings are averaged, weighted by their length, and
    renormalised. A label with no usable speech is left out. At most ``max_windows`` windows
    per label are embedded, spread evenly over its turns, to bound the cost on long audio.
    """
    encoder = encoder or get_encoder()
    total = audio.shape[0]
    by_label: dict[str, list[tuple[float, float]]] = {}
    for start, end, label in turns:
        s, e = max(0.0, float(start)), min(float(end), total / SAMPLE_RATE)
        by_label.setdefault(str(label), []).extend(_windows(s, e))
    out: dict[str, np.ndarray] = {}
    for label, wins in by_label.items():
        if not wins:
            continue
        if len(wins) > max_windows:
            idx = np.linspace(0, len(wins) - 1, max_windows).round().astype(int)
            wins = [wins[i] for i in sorted(set(idx.tolist()))]
        acc, weight = None, 0.0
        for s, e in wins:
            clip = np.asarray(audio[int(round(s * SAMPLE_RATE)):int(round(e * SAMPLE_RATE))], dtype=np.float32)
            try:
                vec = unit(encoder.embed(clip))
            except SpeechError:
                continue  # a silent window says nothing about the voice
            acc = vec * (e - s) if acc is None else acc + vec * (e - s)
            weight += e - s
        if acc is not None and weight > 0:
            out[label] = unit(acc)
    return out


# ----------------------------------------------------------------------------------
# matching


def similarity_matrix(
    centroids: dict[str, np.ndarray], enrolled: dict[str, np.ndarray]
) -> tuple[list[str], list[str], np.ndarray]:
    """(labels, names, cosine similarities [label x name]) — also handy for debug output."""
    labels, names = sorted(centroids), list(enrolled)
    if not labels or not names:
        return labels, names, np.zeros((len(labels), len(names)), dtype=np.float64)
    a = np.stack([unit(centroids[k]) for k in labels]).astype(np.float64)
    b = np.stack([unit(enrolled[n]) for n in names]).astype(np.float64)
    return labels, names, a @ b.T


def match_names(
    centroids: dict[str, np.ndarray],
    enrolled: dict[str, np.ndarray],
    threshold: float = BUILTIN_THRESHOLD,
    margin: float = BUILTIN_MARGIN,
) -> dict[str, str]:
    """``{label: name}`` for the labels that can be named with confidence.

    One-to-one Hungarian assignment maximising total cosine similarity; an assigned pair is
    kept only when its similarity is ``>= threshold`` and exceeds the label's best similarity to
    any *other* enrolled name by ``>= margin``. A label left over whose closest name went to
    another label (one voice split in two) shares that name at ``>= threshold + margin``. Defaults suit the builtin encoder; use
    :func:`encoder_defaults` (or ``encoder.threshold``/``.margin``) for another.
    """
    labels, names, sim = similarity_matrix(centroids, enrolled)
    if not labels or not names:
        return {}
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-sim)
    mapping: dict[str, str] = {}
    for i, j in zip(rows.tolist(), cols.tolist()):
        score = float(sim[i, j])
        others = np.delete(sim[i], j)
        second = float(others.max()) if others.size else -1.0
        if score >= threshold and score - second >= margin:
            mapping[labels[i]] = names[j]
        else:
            log.info("speaker %s left unnamed: best %s %.3f (threshold %.2f), next %.3f (margin %.2f)",
                     labels[i], names[j], score, threshold, second, margin)
    # one person split in two by the diarization (an under-merge: the segmented diarizer prefers it
    # to fusing two people on telephone audio): a label left over whose closest name went to another
    # label takes that name too, when it clears a stricter bar (threshold + margin) and leads every
    # other name by the margin; two people still never share a name below that bar
    for i, label in enumerate(labels):
        j = int(np.argmax(sim[i]))
        if label in mapping or names[j] not in mapping.values():
            continue
        others = np.delete(sim[i], j)
        second = float(others.max()) if others.size else -1.0
        if float(sim[i, j]) >= threshold + margin and float(sim[i, j]) - second >= margin:
            mapping[label] = names[j]
            log.info("speaker %s also named %s (%.3f): the same voice as another speaker", label, names[j], sim[i, j])
    return mapping


def name_turns(
    audio: np.ndarray,
    turns: Sequence[tuple[float, float, str]],
    mapping: dict[str, str],
    enrolled: dict[str, np.ndarray],
    encoder: Optional[Encoder] = None,
    threshold: float = BUILTIN_THRESHOLD,
    margin: float = BUILTIN_MARGIN,
) -> tuple[list[tuple[float, float, str]], dict[str, str], dict[str, float]]:
    """Enrolled people the diarization did not separate, found turn by turn.

    A name no diarized speaker got (its voice was clustered into someone else's: the under-merge
    the segmented diarizer prefers to a spurious speaker) goes to each turn whose own voice
    matches it at ``>= threshold + margin`` and leads every other enrolled name by ``>= margin``
    (the bar :func:`match_names` sets for two labels sharing a name). Those turns move to a new
    label (the next free ``SPEAKER_XX``) carrying that name. Turns under MIN_TURN_SECONDS are
    not judged alone; at most MAX_TURNS_NAMED of the longest are embedded.

    Returns the turns (relabelled), ``mapping`` with the new labels, and each new label's mean
    similarity to its name. Nothing changes (and nothing is embedded) when every name was given.
    """
    turns = [(float(s), float(e), str(label)) for s, e, label in turns]
    missing = [name for name in enrolled if name not in mapping.values()]
    if not missing or not turns:
        return turns, dict(mapping), {}
    encoder = encoder or get_encoder()
    longest = sorted(range(len(turns)), key=lambda i: turns[i][1] - turns[i][0], reverse=True)
    chosen = [i for i in longest if turns[i][1] - turns[i][0] >= MIN_TURN_SECONDS][:MAX_TURNS_NAMED]
    vectors = speaker_embeddings(audio, [(turns[i][0], turns[i][1], str(i)) for i in chosen], encoder)
    names = list(enrolled)
    matrix = np.stack([enrolled[n] for n in names])
    used = {label for _, _, label in turns}
    new_label: dict[str, str] = {}
    sims: dict[str, list[float]] = {}
    out = list(turns)
    for key, vec in vectors.items():
        sim = matrix @ vec
        order = np.argsort(sim)[::-1]
        best = float(sim[order[0]])
        second = float(sim[order[1]]) if len(order) > 1 else -1.0
        name = names[int(order[0])]
        if name not in missing or best < threshold + margin or best - second < margin:
            continue
        if name not in new_label:
            k = 0
            while f"SPEAKER_{k:02d}" in used:
                k += 1
            new_label[name] = f"SPEAKER_{k:02d}"
            used.add(new_label[name])
        i = int(key)
        out[i] = (turns[i][0], turns[i][1], new_label[name])
        sims.setdefault(new_label[name], []).append(best)
    for name, label in new_label.items():
        log.info("%s named on %d turn(s) of other speakers (similarity %.3f): a voice the diarization did not "
                 "separate", name, len(sims[label]), float(np.mean(sims[label])))
    return out, {**mapping, **{label: name for name, label in new_label.items()}}, \
        {label: round(float(np.mean(v)), 4) for label, v in sims.items()}


class Naming(NamedTuple):
    """What :func:`name_speakers` decided: the turns (some relabelled by :func:`name_turns`),
    ``{label: name}``, each named label's similarity to its name, and the explanation
    (:func:`explain`, plus ``named_by_turn`` when turns were named on their own)."""

    turns: list[tuple[float, float, str]]
    mapping: dict[str, str]
    scores: dict[str, float]
    explanation: dict


def name_speakers(audio: np.ndarray, turns: Sequence[tuple[float, float, str]], enrolled: dict[str, np.ndarray],
                  encoder: Optional[Encoder] = None, threshold: float = BUILTIN_THRESHOLD,
                  margin: float = BUILTIN_MARGIN, by_turn: bool = True) -> Naming:
    """Names for diarized speakers: their centroids matched one-to-one (:func:`match_names`),
    then turns of a person no speaker was named for (:func:`name_turns`; ``by_turn=False``
    skips that step)."""
    encoder = encoder or get_encoder()
    centroids = speaker_embeddings(audio, turns, encoder)
    clustered = match_names(centroids, enrolled, threshold=threshold, margin=margin)
    if by_turn:
        spans, mapping, found = name_turns(audio, turns, clustered, enrolled, encoder, threshold, margin)
    else:
        spans, mapping, found = [(float(s), float(e), str(label)) for s, e, label in turns], clustered, {}
    present = {label for _, _, label in spans}  # a speaker whose every turn was named on its own is gone
    explanation = explain({label: vec for label, vec in centroids.items() if label in present}, enrolled, mapping,
                          threshold, margin)
    if found:
        explanation["named_by_turn"] = {label: {"name": mapping[label], "similarity": score}
                                        for label, score in found.items()}
    return Naming(spans, mapping, {**match_scores(centroids, enrolled, clustered), **found}, explanation)


def match_scores(centroids: dict[str, np.ndarray], enrolled: dict[str, np.ndarray],
                 mapping: dict[str, str]) -> dict[str, float]:
    """{label: cosine similarity to the name it was given}."""
    labels, names, sim = similarity_matrix(centroids, enrolled)
    return {label: float(sim[labels.index(label), names.index(name)]) for label, name in mapping.items()}


def explain(centroids: dict[str, np.ndarray], enrolled: dict[str, np.ndarray], mapping: dict[str, str],
            threshold: float, margin: float) -> dict:
    """What the result says about the naming: the names given, why each other speaker kept its
    label (its closest enrolled name, the score, the threshold and the lead over the next name),
    and a note when diarization found fewer speakers than there are enrolled names."""
    labels, names, sim = similarity_matrix(centroids, enrolled)
    unnamed = {}
    for i, label in enumerate(labels):
        if label in mapping or not names:
            continue
        order = np.argsort(sim[i])[::-1]
        score = float(sim[i, order[0]])
        lead = score - float(sim[i, order[1]]) if len(order) > 1 else None
        reason = (f"similarity {score:.2f} to {names[order[0]]} is below the threshold {threshold:.2f}"
                  if score < threshold else
                  f"{names[order[0]]} leads the next name by {lead:.2f}, under the margin {margin:.2f}"
                  if lead is not None and lead < margin else f"{names[order[0]]} went to a closer speaker")
        unnamed[label] = {"closest": names[order[0]], "score": round(score, 3),
                          "lead": None if lead is None else round(lead, 3), "reason": reason}
    out: dict = {"names": dict(mapping), "threshold": threshold, "margin": margin}
    if unnamed:
        out["unnamed"] = unnamed
    unheard = sorted(set(enrolled) - set(mapping.values()))
    if len(centroids) < len(enrolled) and unheard:
        out["note"] = (f"diarization found {len(centroids)} speaker(s) for {len(enrolled)} enrolled names: "
                       f"{', '.join(unheard)} not heard as a separate speaker")
    return out


def relabel(
    segments: Sequence[Segment], speakers: Optional[dict[str, SpeakerInfo]], mapping: dict[str, str],
    scores: Optional[dict[str, float]] = None,
) -> tuple[list[Segment], dict[str, SpeakerInfo]]:
    """Put enrolled names into ``segment.speaker``, ``word.speaker`` and ``speakers[label].name``;
    a named segment also keeps its label as ``speaker_id`` and, given ``scores`` ({label:
    similarity to its name}), the ``similarity``, as the original worker's segments did.

    Returns copies. The keys of ``speakers`` stay the diarization labels (``SPEAKER_XX``), as
    in the original worker's ``speakers: {SPEAKER_XX: {name, time}}``; labels without a match
    keep their label as the name.
    """
    out_segments: list[Segment] = []
    for seg in segments:
        new = seg.model_copy(deep=True)
        if new.speaker in mapping:
            label = new.speaker
            new.speaker, new.speaker_id = mapping[label], label
            if scores and label in scores:
                new.similarity = round(float(scores[label]), 4)
        for word in new.words or []:
            if word.speaker in mapping:
                word.speaker = mapping[word.speaker]
        out_segments.append(new)
    out_speakers: dict[str, SpeakerInfo] = {}
    for label, info in (speakers or {}).items():
        out_speakers[label] = info.model_copy(update={"name": mapping[label]}) if label in mapping else info.model_copy()
    return out_segments, out_speakers
