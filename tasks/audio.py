"""The run's audio on whichever machine a stage runs: this one's cache or copy, else the copy
the flow put in the shared result storage (task workers on other machines)."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speech.io.audio import AudioNotHere, read_samples
from speech.contracts import AudioRef
from speech.settings import get_settings

SHARED_FOLDER = "audio"


def share_audio(audio: AudioRef, storage: Any) -> AudioRef:
    """Put the fetched bytes in ``storage`` (a saved Prefect file-system block) under
    ``audio/<sha256>``, once per content; the reference says where."""
    path = f"{SHARED_FOLDER}/{audio.sha256}"
    from tasks.storage import path_exists, write_whole

    if not path_exists(storage, path):
        if not audio.local_path:
            raise AudioNotHere(f"{audio.source}: no local copy of the file to share with task workers")
        write_whole(storage, path, Path(audio.local_path).read_bytes())  # never a short copy under the name
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
    data = storage.read_path(audio.shared)
    if hashlib.sha256(data).hexdigest() != audio.sha256:  # not the bytes the run fetched: never decode them
        from tasks.storage import remove_path

        remove_path(storage, audio.shared)  # the next run of the file shares it again
        raise AudioNotHere(f"{audio.source}: the shared copy {audio.shared} is not the file the run fetched "
                           f"({len(data)} bytes, another sha256: cut short?); it was removed, run the file again")
    jobs = get_settings().jobs_dir or get_settings().cache_dir / "downloads"
    jobs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=jobs, prefix="shared-", delete=False) as f:
        f.write(data)
    try:
        return read_samples(audio.model_copy(update={"local_path": f.name, "temporary": True}))
    finally:
        Path(f.name).unlink(missing_ok=True)  # decoded, failed, or decoded by another thread meanwhile
