"""Outputs are replaced as a set (issue 13): a failure or a kill half-way through leaves the old
set, two runs writing the same output name take turns, an S3 write that is refused part-way
leaves the bucket as it was, and a store that cannot be reached keeps the outputs locally."""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from speech.errors import StorageError
from speech.io import store as store_mod
from speech.io.store import LocalStore, S3Store

ROOT = Path(__file__).resolve().parents[1]
OLD = {"talk.json": b'{"v": "old"}', "talk.segments.json": b"[old]", "talk.srt": b"old srt", "talk.vtt": b"old vtt"}
NEW = {"talk.json": b'{"v": "new"}', "talk.segments.json": b"[new]", "talk.srt": b"new srt", "talk.vtt": b"new vtt"}


def _contents(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if not p.name.startswith(".staging-")}


def test_a_failure_half_way_puts_the_old_set_back(tmp_path, monkeypatch):
    LocalStore(tmp_path).write(OLD)
    real, calls = store_mod.os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", failing)
    with pytest.raises(StorageError, match="No space left"):
        LocalStore(tmp_path).write(NEW)
    monkeypatch.setattr(store_mod.os, "replace", real)
    assert _contents(tmp_path) == OLD
    assert not list(tmp_path.glob(".staging-*"))
    LocalStore(tmp_path).write(NEW)
    assert _contents(tmp_path) == NEW


def test_the_json_is_renamed_last(tmp_path, monkeypatch):
    real, order = store_mod.os.replace, []

    def recording(src, dst):
        if Path(dst).parent == tmp_path:  # renames into the folder (not the plan's, inside staging)
            order.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", recording)
    LocalStore(tmp_path).write(NEW)
    assert order[-1] == "talk.json" and sorted(order) == sorted(NEW)


def test_a_run_killed_half_way_is_rolled_back_by_the_next_writer(tmp_path):
    """A real process dies (os._exit) after two of four renames: the folder holds a mix and a
    staging folder; the next write of that stem first restores the old set."""
    LocalStore(tmp_path).write(OLD)
    script = (
        "import os, sys\n"
        "from speech.io import store\n"
        "real, n = os.replace, [0]\n"
        "def dying(s, d):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os._exit(9)\n"
        "    real(s, d)\n"
        "store.os.replace = dying\n"
        f"store.LocalStore(sys.argv[1]).write({NEW!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert _contents(tmp_path) != OLD and list(tmp_path.glob(f"{store_mod._staging_prefix('talk')}*"))  # a mix
    store = LocalStore(tmp_path)
    with store._locked("talk"):
        store.recover("talk")
    assert _contents(tmp_path) == OLD and not list(tmp_path.glob(".staging-*"))


def test_two_writers_of_one_folder_take_turns(tmp_path, monkeypatch):
    """While another process holds the folder, a writer waits; past LOCK_WAIT_S it fails clearly."""
    import os

    LocalStore(tmp_path).write(OLD)
    lock = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # another process's hold: the folder itself
    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 0.5)
    with pytest.raises(StorageError, match="another run is still writing outputs in"):
        LocalStore(tmp_path).write(NEW)
    assert _contents(tmp_path) == OLD
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 30)
    threading.Timer(0.5, lambda: fcntl.flock(lock, fcntl.LOCK_UN)).start()
    t = time.monotonic()
    LocalStore(tmp_path).write(NEW)
    assert time.monotonic() - t >= 0.4 and _contents(tmp_path) == NEW
    os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NEW)  # no lock file, no staging left


def _killed_writer(tmp_path: Path, patch: str) -> subprocess.CompletedProcess:
    """A real process writes NEW over tmp_path with ``patch`` (Python run first) applied."""
    script = f"import os, sys, shutil, pathlib\nfrom speech.io import store\n{patch}\n" \
             f"store.LocalStore(sys.argv[1]).write({NEW!r})\n"
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120)


def test_a_truncated_plan_does_not_block_the_stem(tmp_path):
    """A writer died while writing its plan (before any rename): the plan is unreadable; the next
    write of that stem drops the staging folder, keeps the old files and replaces them."""
    LocalStore(tmp_path).write(OLD)
    staging = tmp_path / f"{store_mod._staging_prefix('talk')}dead"
    (staging / "old").mkdir(parents=True)
    (staging / "talk.srt").write_bytes(b"half")
    (staging / store_mod.PLAN).write_text('{"talk.s')
    store = LocalStore(tmp_path)
    with store._locked("talk"):
        store.recover("talk")
    assert _contents(tmp_path) == OLD and not list(tmp_path.glob(".staging-*"))
    (staging / "old").mkdir(parents=True)
    (staging / store_mod.PLAN).write_text('{"talk.s')
    LocalStore(tmp_path).write(NEW)
    assert _contents(tmp_path) == NEW and not list(tmp_path.glob(".staging-*"))


def test_a_run_killed_while_writing_its_plan_leaves_no_half_plan(tmp_path):
    """The process dies half-way through writing the plan: no half-written ``plan.json`` is left
    (it is written to a temporary name and renamed), and the next write goes through."""
    LocalStore(tmp_path).write(OLD)
    proc = _killed_writer(tmp_path, (  # dies with half the plan written, before it is renamed into place
        "real = os.replace\n"
        "def dying(src, dst):\n"
        "    if pathlib.Path(dst).name == store.PLAN:\n"
        "        data = pathlib.Path(src).read_bytes()\n"
        "        pathlib.Path(src).write_bytes(data[: len(data) // 2])\n"
        "        os._exit(9)\n"
        "    return real(src, dst)\n"
        "os.replace = dying\n"))
    assert proc.returncode == 9, proc.stderr
    [staging] = tmp_path.glob(f"{store_mod._staging_prefix('talk')}*")
    assert not (staging / store_mod.PLAN).exists()
    assert _contents(tmp_path) == OLD
    LocalStore(tmp_path).write(NEW)
    assert _contents(tmp_path) == NEW and not list(tmp_path.glob(".staging-*"))


def test_a_run_killed_after_its_last_rename_is_not_rolled_back(tmp_path):
    """The process dies after ``talk.json`` is renamed, before its staging folder is removed: the
    set is complete (committed), so the next writer must not put the old files back."""
    LocalStore(tmp_path).write(OLD)
    proc = _killed_writer(tmp_path, "store.shutil.rmtree = lambda *a, **k: os._exit(9)")
    assert proc.returncode == 9, proc.stderr
    [staging] = tmp_path.glob(f"{store_mod._staging_prefix('talk')}*")
    assert _contents(tmp_path) == NEW and sorted(p.name for p in (staging / "old").iterdir()) == sorted(OLD)
    assert not (staging / store_mod.PLAN).exists()  # committed: no plan, nothing to undo
    store = LocalStore(tmp_path)
    with store._locked("talk"):
        store.recover("talk")
    assert _contents(tmp_path) == NEW and not list(tmp_path.glob(".staging-*"))


def test_a_plan_whose_json_was_renamed_is_committed(tmp_path):
    """Killed between the last rename and the plan's removal: the plan is still there, but the
    staged ``talk.json`` is gone (renamed last), so recover() leaves the complete new set."""
    LocalStore(tmp_path).write(OLD)
    staging = tmp_path / f"{store_mod._staging_prefix('talk')}dead"
    (staging / "old").mkdir(parents=True)
    for name in OLD:
        (staging / "old" / name).write_bytes(OLD[name])
        (tmp_path / name).write_bytes(NEW[name])
    (staging / store_mod.PLAN).write_text(json.dumps({name: True for name in NEW}))
    store = LocalStore(tmp_path)
    with store._locked("talk"):
        store.recover("talk")
    assert _contents(tmp_path) == NEW and not list(tmp_path.glob(".staging-*"))


WRITER = """
import os, sys
os.environ["SPEECH_CACHE_DIR"] = sys.argv[3]  # each writer its own cache: the lock must not live there
from speech.io.store import LocalStore
root, stem, n = sys.argv[1], sys.argv[2], int(sys.argv[4])
for i in range(n):
    tag = f"{stem}:{os.getpid()}:{i}".encode()
    LocalStore(root).write({f"{stem}.json": tag, f"{stem}.segments.json": tag, f"{stem}.srt": tag, f"{stem}.vtt": tag})
"""


def test_writers_of_call_and_call_2_with_their_own_caches_never_fail_or_mix(tmp_path):
    """Four processes (two per stem, each with its own SPEECH_CACHE_DIR) write ``call`` and
    ``call-2`` 100 times each into one folder: no write fails, every set is whole and one writer's."""
    out = tmp_path / "out"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), stem, str(tmp_path / f"cache{i}"), "100"],
                              cwd=ROOT, stderr=subprocess.PIPE)
             for i, stem in enumerate(["call", "call-2", "call", "call-2"])]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    for stem in ("call", "call-2"):
        files = {p.read_bytes() for p in out.glob(f"{stem}.*")}
        assert len(list(out.glob(f"{stem}.*"))) == 4 and len(files) == 1, (stem, files)
        assert next(iter(files)).startswith(f"{stem}:".encode())
    assert not list(out.glob(".staging-*"))


def _objects(s3, bucket: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_an_s3_write_refused_part_way_leaves_the_bucket_as_it_was(s3):
    """The final PUT (the json) is refused: the objects the write added are deleted, the ones it
    overwrote restored, and no backup stays behind."""
    from botocore.exceptions import ClientError

    s3.create_bucket(Bucket="atomic")
    S3Store("atomic", "t/", s3).write({k: v for k, v in OLD.items() if k != "talk.vtt"})
    before = _objects(s3, "atomic")
    real_put = s3.put_object

    def refuse_json(**kw):
        if kw["Key"].endswith("talk.json"):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
        return real_put(**kw)

    s3.put_object = refuse_json
    try:
        with pytest.raises(StorageError, match="access denied"):
            S3Store("atomic", "t/", s3).write(NEW)
    finally:
        s3.put_object = real_put
    assert _objects(s3, "atomic") == before  # talk.vtt (new) gone, srt/segments restored, no .backup/
    S3Store("atomic", "t/", s3).write(NEW)
    assert _objects(s3, "atomic") == {f"t/{k}": v for k, v in NEW.items()}


class _Interrupting:
    """The real client, but the ``n``-th call of ``method`` raises ``exc`` after the real call
    went through (a cancel that lands while the request is in flight)."""

    def __init__(self, client, method: str, n: int, exc: BaseException):
        self._client, self._method, self._n, self._exc, self.calls = client, method, n, exc, 0

    def __getattr__(self, attr):
        real = getattr(self._client, attr)
        if attr != self._method:
            return real

        def call(**kw):
            result = real(**kw)
            self.calls += 1
            if self.calls == self._n:
                raise self._exc
            return result
        return call


def _termination():
    from prefect.exceptions import TerminationSignal

    return TerminationSignal(15)


@pytest.mark.parametrize("method", ["put_object", "copy_object"])
@pytest.mark.parametrize("make_exc", [KeyboardInterrupt, _termination], ids=["KeyboardInterrupt", "TerminationSignal"])
def test_an_s3_write_cancelled_part_way_leaves_the_bucket_as_it_was(s3, method, make_exc):
    """A cancel (Ctrl-C, or Prefect's TerminationSignal on a UI cancel / SIGTERM) arrives during
    the second PUT or the second backup copy: the write rolls back (old set, no ``.backup/``
    keys) and the very same BaseException propagates, not a StorageError."""
    bucket = f"cancel-{method.split('_')[0]}-{make_exc.__name__.strip('_').lower()}"
    s3.create_bucket(Bucket=bucket)
    S3Store(bucket, "t/", s3).write(OLD)
    before = _objects(s3, bucket)
    exc = make_exc()
    with pytest.raises(type(exc)) as raised:
        S3Store(bucket, "t/", _Interrupting(s3, method, 2, exc)).write(NEW)
    assert raised.value is exc
    assert _objects(s3, bucket) == before and not [k for k in before if ".backup/" in k]
    S3Store(bucket, "t/", s3).write(NEW)
    assert _objects(s3, bucket) == {f"t/{k}": v for k, v in NEW.items()}


def test_an_unreachable_store_keeps_the_outputs_locally(prefect_harness, s3_server, tmp_path, monkeypatch):
    """The bucket's endpoint refuses connections (botocore retries, then gives up): the run fails
    saying where the rendered outputs were kept, and they are all there."""
    import socket

    from conftest import DATA
    from flows.transcribe import transcribe_audio
    from speech.settings import get_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "kept"))
    get_settings.cache_clear()
    try:
        state = transcribe_audio(audio_file=str(DATA / "sample_2spk.wav"), language="en", bucket="results",
                                 return_state=True)
    finally:
        get_settings.cache_clear()
    exc = state.result(raise_on_failure=False)
    assert state.is_failed() and isinstance(exc, StorageError)
    kept = tmp_path / "kept" / "transcripts"  # RESULTS_DIR + the bucket key's folders (the default prefix)
    assert "cannot reach the S3 endpoint" in str(exc) and f"the outputs were kept in {kept}" in str(exc)
    assert sorted(p.name for p in kept.iterdir() if not p.name.startswith(".")) == [
        "sample_2spk.json", "sample_2spk.segments.json", "sample_2spk.srt", "sample_2spk.vtt"]
