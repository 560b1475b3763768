"""Speaker encoders: 16 kHz mono samples -> a unit-norm voice embedding.

* ``builtin``: resemblyzer's GE2E ``VoiceEncoder`` (256-d, weights ship in the PyPI wheel, CPU);
  the same model embeds the builtin diarizer's windows (:func:`voice_encoder`).
* ``ecapa``: SpeechBrain ``speechbrain/spkrec-ecapa-voxceleb`` (192-d), from a local directory
  (``SPEAKER_ENCODER_DIR``) or the Hugging Face hub / its cache. Loaded lazily, once per process.
* ``campplus``: 3D-Speaker CAM++ (192-d, :mod:`speech.speakers.campplus`), its weights installed by
  ``make setup``; measured on real speech (council clips across meetings): EER 2.1 % vs GE2E's 5.3 %.
* ``auto``: ECAPA if it loads, else CAM++ if its weights are installed, else builtin. The outcome
  is remembered for the process, so an unreachable hub costs one attempt, not one per file.

Cosine similarities are not comparable across encoders, so every encoder carries its own
``threshold`` and ``margin`` for name matching (:mod:`speech.speakers.verify` says where the
values come from).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from speech.errors import AudioError, InvalidRequest, ModelError
from speech.models import hub_reachable
from speech.schema import SAMPLE_RATE
from speech.settings import get_settings

log = logging.getLogger(__name__)

# Defaults for match_names, per encoder (see speech.speakers.verify for where they come from).
BUILTIN_THRESHOLD, BUILTIN_MARGIN = 0.80, 0.08
ECAPA_THRESHOLD, ECAPA_MARGIN = 0.25, 0.05

ECAPA_SOURCE = "speechbrain/spkrec-ecapa-voxceleb"
ENCODER_KINDS = ("auto", "builtin", "ecapa", "campplus")

_GE2E: Any = None
_GE2E_LOCK = threading.Lock()


def import_resemblyzer() -> Any:
    """``import resemblyzer`` quietly (pkg_resources and scipy deprecation warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import resemblyzer

    return resemblyzer


def voice_encoder() -> Any:
    """resemblyzer's ``VoiceEncoder`` on CPU, loaded once per process (weights ship in the wheel)."""
    global _GE2E
    with _GE2E_LOCK:
        if _GE2E is None:
            t0 = time.perf_counter()
            resemblyzer = import_resemblyzer()
            _GE2E = resemblyzer.VoiceEncoder("cpu", verbose=False)
            _GE2E.eval()
            log.info("loaded the resemblyzer speaker encoder in %.1f s", time.perf_counter() - t0)
        return _GE2E



@runtime_checkable
class Encoder(Protocol):
    """A speaker encoder: 16 kHz mono float32 samples -> unit-norm embedding."""

    name: str

    def embed(self, audio: np.ndarray) -> np.ndarray: ...


def unit(v: np.ndarray) -> np.ndarray:
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
        self._audio = import_resemblyzer().audio
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
            return unit(self._model.embed_utterance(wav.astype(np.float32, copy=False)))


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
        return unit(out.detach().cpu().numpy())


_ENCODERS: dict[str, object] = {}  # kind -> encoder, or the ModelError its load raised
_ENCODER_LOCK = threading.Lock()


def _ecapa_source() -> tuple[str, bool]:
    local = os.environ.get("SPEAKER_ENCODER_DIR", "").strip()
    if local:
        return str(Path(local).expanduser()), True
    return ECAPA_SOURCE, False


def _load_ecapa(probe: bool) -> EcapaEncoder:
    source, is_local = _ecapa_source()
    if is_local and not (Path(source) / "hyperparams.yaml").is_file():
        raise ModelError(f"SPEAKER_ENCODER_DIR={source} holds no hyperparams.yaml (a SpeechBrain ECAPA model)")
    if not is_local and probe and not hub_reachable(source, "hyperparams.yaml"):
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
    ``SPEAKER_ENCODER_DIR`` or the hub, ``campplus``: CAM++ (both raise :class:`ModelError` when they
    cannot load). ``auto``: ECAPA if it loads, else CAM++, else builtin; failed loads are remembered.
    """
    if kind == "campplus":
        from speech.speakers.segmented import campplus_encoder

        return campplus_encoder()
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
        if kind == "auto":
            from speech.speakers.segmented import campplus_encoder

            try:
                return campplus_encoder()
            except ModelError as err:
                log.info("%s; using the builtin speaker encoder", err)
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


def clear_encoders() -> None:
    """Forget loaded encoders and remembered load failures (tests; a changed SPEAKER_ENCODER_DIR)."""
    from speech.models import CACHE

    with _ENCODER_LOCK:
        _ENCODERS.clear()
        CACHE.clear("speaker-encoder")
