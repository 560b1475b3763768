"""The run's audio on whichever machine a stage runs: this one's cache or copy, else the copy
the flow put in the shared result storage (task workers on other machines)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speech.io.audio import AudioNotHere, read_samples
from speech.schema import AudioRef
from speech.settings import get_settings

SHARED_FOLDER = "audio"


def share_audio(audio: AudioRef, storage: Any) -> AudioRef:
    """Put the fetched bytes in ``storage`` (a saved Prefect file-system block) under
    ``audio/<sha256>``, once per content; the reference says where."""
    path = f"{SHARED_FOLDER}/{audio.sha256}"
    from tasks.storage import path_exists

    if not path_exists(storage, path):
        if not audio.local_path:
            raise AudioNotHere(f"{audio.source}: no local copy of the file to share with task workers")
        storage.write_path(path, Path(audio.local_path).read_bytes())
    return audio.model_copy(update={"shared": path})


def audio_samples(audio: AudioRef) -> np.ndarray:
    """The decoded samples, here: cached, or decoded from a local copy, or from the shared copy."""
    try:
        return read_samples(audio)
    except AudioNotHere:
        if not audio.shared:
            raise
    from tasks.storage import task_result_storage

    storage = task_result_storage()
    if storage is None:
        raise AudioNotHere(f"{audio.source}: shared at {audio.shared}, but this worker has no RESULTS_STORAGE")
    jobs = get_settings().jobs_dir or get_settings().cache_dir / "downloads"
    jobs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=jobs, prefix="shared-", delete=False) as f:
        f.write(storage.read_path(audio.shared))
    return read_samples(audio.model_copy(update={"local_path": f.name, "temporary": True}))
