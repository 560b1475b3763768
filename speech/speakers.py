"""Speaker embeddings, enrolment and verification: give diarized speakers their real names.

The flow of a verification run::

    encoder  = get_encoder("auto")                      # ECAPA when it loads, else the shipped GE2E
    enrolled = enroll(request.speaker_samples, encoder) # {name: unit vector}, samples pooled per name
    centroids = speaker_embeddings(audio, turns, encoder)   # {SPEAKER_XX: unit vector}
    mapping  = match_names(centroids, enrolled, encoder.threshold, encoder.margin)
    segments, speakers = relabel(segments, speakers, mapping)

Encoders
--------
* ``builtin``: resemblyzer's GE2E ``VoiceEncoder`` (256-d, weights ship in the PyPI wheel, CPU).
* ``ecapa``: SpeechBrain ``speechbrain/spkrec-ecapa-voxceleb`` (192-d), from a local directory
  (``SPEAKER_ENCODER_DIR``) or the Hugging Face hub / its cache. Loaded lazily, once per process.
* ``auto``: ECAPA if it loads, else builtin. The outcome is remembered for the process, so an
  unreachable hub costs one attempt, not one per file.

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

import hashlib
import logging
import math
import os
import re
import threading
import unicodedata
import warnings
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from speech.models import hub_reachable
from speech.errors import AudioError, FetchError, InvalidRequest, ModelError, SpeechError, TransientFetchError
from speech.schema import Segment, SpeakerInfo, SpeakerSample

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MAX_NAME_CHARS = 64
MIN_SAMPLE_SECONDS = 1.0  # an enrolment clip shorter than this is rejected
WINDOW_SECONDS = 3.0  # diarized turns are embedded in windows of at most this length ...
MIN_WINDOW_SECONDS = 0.5  # ... and turns shorter than this are skipped
MAX_WINDOWS_PER_LABEL = 120  # bounds the cost on long recordings (evenly spread over the turns)

# Defaults for match_names, per encoder (see the module docstring for where they come from).
BUILTIN_THRESHOLD, BUILTIN_MARGIN = 0.80, 0.08
ECAPA_THRESHOLD, ECAPA_MARGIN = 0.25, 0.05

ECAPA_SOURCE = "speechbrain/spkrec-ecapa-voxceleb"
ENCODER_KINDS = ("auto", "builtin", "ecapa")


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
    from speech.audio import redact_url

    raise InvalidRequest(
        f"speaker sample {redact_url(url)!r}: cannot derive a speaker name "
        f"(give 'name', a ?name= query or a #fragment)"
    )


# ----------------------------------------------------------------------------------
# encoders


@runtime_checkable
class Encoder(Protocol):
    """A speaker encoder: 16 kHz mono float32 samples -> unit-norm embedding."""

    name: str

    def embed(self, audio: np.ndarray) -> np.ndarray: ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0.0:
        raise AudioError("speaker embedding is degenerate (silent or empty audio)")
    return v / n


class BuiltinEncoder:
    """resemblyzer's GE2E VoiceEncoder (weights ship with the wheel), on the CPU."""

    name = "builtin:resemblyzer-ge2e"
    threshold = BUILTIN_THRESHOLD
    margin = BUILTIN_MARGIN

    def __init__(self) -> None:
        from speech.diarize import _import_resemblyzer, voice_encoder

        self._audio = _import_resemblyzer().audio
        self._model = voice_encoder()  # one GE2E model per process, shared with the diarizer
        self._lock = threading.Lock()

    def embed(self, audio: np.ndarray) -> np.ndarray:
        wav = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if wav.size < int(0.1 * SAMPLE_RATE):
            raise AudioError("too little audio to embed (< 0.1 s)")
        # resemblyzer's own preprocessing: level to -30 dBFS (never louder than needed) and cut
        # long silences with webrtcvad; keep the untrimmed clip when trimming leaves too little.
        wav = self._audio.normalize_volume(wav, -30, increase_only=True)
        try:
            trimmed = self._audio.trim_long_silences(wav)
        except Exception:  # webrtcvad rejects odd lengths/levels now and then; trimming is optional
            trimmed = wav
        if trimmed.size >= int(0.3 * SAMPLE_RATE):
            wav = trimmed
        with self._lock:
            return _unit(self._model.embed_utterance(wav.astype(np.float32, copy=False)))


class EcapaEncoder:
    """SpeechBrain ECAPA-TDNN (``speechbrain/spkrec-ecapa-voxceleb`` or a local directory)."""

    threshold = ECAPA_THRESHOLD
    margin = ECAPA_MARGIN

    def __init__(self, source: str, savedir: Path, device: str = "cpu") -> None:
        overrides = {}
        hparams = Path(source) / "hyperparams.yaml"
        if hparams.is_file() and re.search(r"^pretrained_path\s*:", hparams.read_text(errors="replace"), re.M):
            # a local copy of the hub repo still points its checkpoints at the hub name
            # ("pretrained_path: speechbrain/spkrec-ecapa-voxceleb"): load them from here instead
            overrides["pretrained_path"] = str(Path(source).resolve())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from speechbrain.inference.speaker import EncoderClassifier

            self._model = EncoderClassifier.from_hparams(
                source=source, savedir=str(savedir), run_opts={"device": device}, overrides=overrides
            )
        if self._model is None:
            raise ModelError(f"speechbrain returned no model for {source}")
        self.name = f"ecapa:{source}"
        self.device = device
        self._lock = threading.Lock()

    def embed(self, audio: np.ndarray) -> np.ndarray:
        import torch

        wav = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if wav.size < int(0.1 * SAMPLE_RATE):
            raise AudioError("too little audio to embed (< 0.1 s)")
        with self._lock, torch.no_grad():
            out = self._model.encode_batch(torch.from_numpy(wav)[None, :].to(self.device))
        return _unit(out.detach().cpu().numpy())


_ENCODERS: dict[str, object] = {}  # kind -> encoder, or the ModelError its load raised
_ENCODER_LOCK = threading.Lock()


def _ecapa_source() -> tuple[str, bool]:
    local = os.environ.get("SPEAKER_ENCODER_DIR", "").strip()
    if local:
        return str(Path(local).expanduser()), True
    return ECAPA_SOURCE, False


def _hub_reachable(source: str) -> bool:
    return hub_reachable(source, "hyperparams.yaml")


def _load_ecapa(probe: bool) -> EcapaEncoder:
    from speech.settings import get_settings

    source, is_local = _ecapa_source()
    if is_local and not (Path(source) / "hyperparams.yaml").is_file():
        raise ModelError(f"SPEAKER_ENCODER_DIR={source} holds no hyperparams.yaml (a SpeechBrain ECAPA model)")
    if not is_local and probe and not _hub_reachable(source):
        raise ModelError(f"cannot load ECAPA {source}: not cached and the Hugging Face hub is unreachable")
    tag = "local-" + hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:12] if is_local else source.replace("/", "--")
    savedir = get_settings().cache_dir / "models" / "speaker-encoders" / tag
    device = os.environ.get("SPEAKER_ENCODER_DEVICE", "cpu").strip() or "cpu"
    try:
        return EcapaEncoder(source, savedir, device=device)
    except Exception as exc:  # speechbrain/hf/torch raise many kinds
        raise ModelError(f"cannot load ECAPA speaker encoder from {source}: {type(exc).__name__}: {str(exc)[:200]}") from None


def get_encoder(kind: str = "auto") -> Encoder:
    """A speaker encoder, loaded once per process.

    ``builtin``: resemblyzer GE2E (always available offline). ``ecapa``: SpeechBrain ECAPA from
    ``SPEAKER_ENCODER_DIR`` or the hub (raises :class:`ModelError` when it cannot load).
    ``auto``: ECAPA if it loads, else builtin; a failed ECAPA load is remembered.
    """
    kind = (kind or "auto").strip().lower()
    if kind not in ENCODER_KINDS:
        raise InvalidRequest(f"unknown speaker encoder {kind!r}; choose one of {', '.join(ENCODER_KINDS)}")
    with _ENCODER_LOCK:
        if kind in ("ecapa", "auto"):
            # "ecapa" holds the outcome of a full load attempt; "ecapa-auto" a failed cheap probe
            # (auto mode), which an explicit "ecapa" request does not trust.
            found = _ENCODERS.get("ecapa") or (_ENCODERS.get("ecapa-auto") if kind == "auto" else None)
            if found is None:
                try:
                    found = _load_ecapa(probe=(kind == "auto"))
                    log.info("speaker encoder: %s", found.name)
                except ModelError as err:
                    found = err
                    if kind == "auto":
                        log.info("%s; using the builtin speaker encoder", err)
                full = kind == "ecapa" or not isinstance(found, ModelError)
                _ENCODERS["ecapa" if full else "ecapa-auto"] = found
            if not isinstance(found, ModelError):
                return found  # type: ignore[return-value]
            if kind == "ecapa":
                raise found
        enc = _ENCODERS.get("builtin")
        if enc is None:
            try:
                enc = BuiltinEncoder()
            except Exception as exc:
                raise ModelError(f"cannot load the builtin speaker encoder (resemblyzer): {type(exc).__name__}: {exc}") from None
            _ENCODERS["builtin"] = enc
        return enc  # type: ignore[return-value]


def encoder_defaults(encoder: Encoder) -> tuple[float, float]:
    """(threshold, margin) suited to this encoder's similarity scale."""
    return (float(getattr(encoder, "threshold", BUILTIN_THRESHOLD)), float(getattr(encoder, "margin", BUILTIN_MARGIN)))


# ----------------------------------------------------------------------------------
# enrolment


def _fetch_target(url: str) -> str:
    """What to fetch: a local path loses a ``?name=``/``#name`` suffix unless the file really has it."""
    if _SCHEME.match(url):
        return url.split("#", 1)[0]
    if Path(url).expanduser().exists():
        return url
    return url.split("#", 1)[0].split("?", 1)[0]


def _load_sample(sample: SpeakerSample, name: str) -> np.ndarray:
    from speech.audio import load_audio, read_samples, redact_url

    url = sample.url.strip()
    shown = f"speaker sample {name!r} ({redact_url(url)})"
    try:
        ref = load_audio(_fetch_target(url))
        audio = np.asarray(read_samples(ref), dtype=np.float32)
    except TransientFetchError as exc:
        raise TransientFetchError(f"{shown}: {exc}") from None  # network trouble: may retry
    except FetchError as exc:
        raise InvalidRequest(f"{shown}: {exc}") from None  # 404, no such file: fix the request
    except AudioError as exc:
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
        pooled.setdefault(name, []).append(_unit(vec))
    out = {name: _unit(np.mean(vecs, axis=0)) for name, vecs in pooled.items()}
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
                vec = _unit(encoder.embed(clip))
            except SpeechError:
                continue  # a silent window says nothing about the voice
            acc = vec * (e - s) if acc is None else acc + vec * (e - s)
            weight += e - s
        if acc is not None and weight > 0:
            out[label] = _unit(acc)
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
    a = np.stack([_unit(centroids[k]) for k in labels]).astype(np.float64)
    b = np.stack([_unit(enrolled[n]) for n in names]).astype(np.float64)
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
    any *other* enrolled name by ``>= margin``. Defaults suit the builtin encoder; use
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
    return mapping


def relabel(
    segments: Sequence[Segment], speakers: Optional[dict[str, SpeakerInfo]], mapping: dict[str, str]
) -> tuple[list[Segment], dict[str, SpeakerInfo]]:
    """Put enrolled names into ``segment.speaker``, ``word.speaker`` and ``speakers[label].name``.

    Returns copies. The keys of ``speakers`` stay the diarization labels (``SPEAKER_XX``), as
    in the original worker's ``speakers: {SPEAKER_XX: {name, time}}``; labels without a match
    keep their label as the name.
    """
    out_segments: list[Segment] = []
    for seg in segments:
        new = seg.model_copy(deep=True)
        if new.speaker in mapping:
            new.speaker = mapping[new.speaker]
        for word in new.words or []:
            if word.speaker in mapping:
                word.speaker = mapping[word.speaker]
        out_segments.append(new)
    out_speakers: dict[str, SpeakerInfo] = {}
    for label, info in (speakers or {}).items():
        out_speakers[label] = info.model_copy(update={"name": mapping[label]}) if label in mapping else info.model_copy()
    return out_segments, out_speakers


def clear_encoders() -> None:
    """Forget loaded encoders and remembered load failures (tests; a changed SPEAKER_ENCODER_DIR)."""
    with _ENCODER_LOCK:
        _ENCODERS.clear()
