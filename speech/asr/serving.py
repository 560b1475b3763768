"""What a warm worker serves: the Whisper models (and compute types) it holds, on its device.

A task worker, or any long-lived process that takes requests from others, declares its models
in ``WORKER_MODELS`` (``large-v3:float16,large-v3-turbo``; default: its configured model with
the default compute type). A request that names another model, compute type, device or thread
count is refused with one line saying what is served: a caller must not make a shared GPU
process load models of its choosing (each large model is GBs of GPU memory, and a load blocks
that process for seconds to minutes). A request that names none gets the first served model.
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from typing import Any, Optional

from speech.asr.whisper import resolve_model
from speech.errors import InvalidRequest
from speech.models import resolve_device
from speech.contracts import TranscribeParams
from speech.schema import ComputeType
from speech.settings import Settings, get_settings

COMPUTE_TYPES = set(typing.get_args(ComputeType))


@dataclass(frozen=True)
class ServedModel:
    model: str  # as configured: a name, a directory or bundled:<name>
    label: str  # as resolve_model reports it (what the transcribe cache key holds)
    device: str
    compute_type: str

    def __str__(self) -> str:
        return f"{self.label} ({self.compute_type} on {self.device})"


def served_models(settings: Optional[Settings] = None) -> list[ServedModel]:
    """``WORKER_MODELS`` parsed (``model[:compute_type]``, comma-separated; ``bundled:base`` is a
    model, not a compute type), else the worker's configured model; each resolved on this
    machine's device."""
    settings = settings or get_settings()
    entries = [e.strip() for e in settings.worker_models.split(",") if e.strip()] or [""]
    served = []
    for entry in entries:
        model, _, compute = entry.rpartition(":")
        if compute not in COMPUTE_TYPES:
            model, compute = entry, ""
        if compute in ("default", "auto"):
            compute = ""
        spec = resolve_model(model or None, settings, assemble=False)
        device, compute_type = resolve_device(settings, None, compute or None)
        served.append(ServedModel(model=model or spec.label, label=spec.label, device=device, compute_type=compute_type))
    return served


def worker_threads(settings: Settings) -> int:
    return settings.cpu_threads or os.cpu_count() or 4


def check_served(params: TranscribeParams, settings: Optional[Settings] = None) -> TranscribeParams:
    """``params`` with the served model and compute type filled in (the first served model when
    the request names none; a named model's served compute type when it names none), or
    :class:`InvalidRequest` when the request asks for what this worker does not serve."""
    settings = settings or get_settings()
    served = served_models(settings)
    if params.model is None:
        params = params.model_copy(update={"model": served[0].model,
                                           "compute_type": params.compute_type or served[0].compute_type})
    label = resolve_model(params.model, settings, assemble=False).label
    device, compute = resolve_device(settings, params.device, params.compute_type)
    if params.compute_type is None:
        compute = next((s.compute_type for s in served if (s.label, s.device) == (label, device)), compute)
    asked = f"model {label!r} ({compute} on {device})"
    if params.threads and params.threads != worker_threads(settings):
        asked = f"{params.threads} CPU threads (this worker runs {worker_threads(settings)})"
    elif any((s.label, s.device, s.compute_type) == (label, device, compute) for s in served):
        return params.model_copy(update={"compute_type": compute, "threads": None})
    raise InvalidRequest(
        f"this worker serves {', '.join(map(str, served))}; the request asks for {asked}: leave model, "
        "compute_type, device and threads unset, or send it to a pool that serves them (WORKER_MODELS)")


def served_request(req: Any, settings: Optional[Settings] = None) -> Any:
    """A :class:`speech.schema.TranscriptionRequest` as a warm process runs it: the served model
    and compute type filled in (:func:`check_served`), or :class:`InvalidRequest`."""
    params = check_served(TranscribeParams.from_request(req), settings)
    return req.model_copy(update={"model": params.model, "compute_type": params.compute_type, "threads": None})
