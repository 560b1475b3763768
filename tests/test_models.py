"""The model cache a warm worker lives on, and what a worker serves (no Prefect, no real models:
the cache's contract is about keys, order and locks)."""
from __future__ import annotations

import threading
import time

import pytest

from speech.errors import InvalidRequest
from speech.models import ModelCache
from speech.contracts import TranscribeParams
from speech.settings import get_settings


def test_the_cache_keeps_at_most_its_budget_least_recently_used_out_first():
    cache = ModelCache(max_models=2)
    a = cache.get("whisper", "a", object)
    cache.get("vad", "cpu", object)
    assert cache.get("whisper", "a", lambda: pytest.fail("reloaded")) is a  # a is now the most recent
    cache.get("align", "en", object)  # over budget: the least recently used (vad) goes
    assert cache.loaded() == [("whisper", "a"), ("align", "en")]
    assert (cache.load_count, cache.evictions) == (3, 1)
    cache.get("vad", "cpu", object)  # back, as a fresh load
    assert cache.load_count == 4 and cache.loaded()[-1] == ("vad", "cpu")


def test_unbounded_cache_and_remembered_failures_take_no_room():
    from speech.errors import ModelError

    cache = ModelCache(max_models=0)
    for i in range(20):
        cache.get("whisper", i, object)
    assert len(cache.loaded()) == 20 and cache.evictions == 0

    bounded = ModelCache(max_models=1)
    with pytest.raises(ModelError):
        bounded.get("align", "xx", lambda: 1 / 0, failure=lambda exc: "no aligner for xx")
    kept = bounded.get("whisper", "a", object)
    with pytest.raises(ModelError, match="no aligner for xx"):  # remembered, raised at once
        bounded.get("align", "xx", lambda: pytest.fail("retried"))
    assert bounded.loaded() == [("whisper", "a")] and bounded.get("whisper", "a", object) is kept


def test_a_slow_load_blocks_only_its_own_key():
    """One load lock per key: a slow load (a hub download) does not hold up a model that is
    loaded already or another key's load; two callers of the same key load it once."""
    cache = ModelCache(max_models=8)
    fast = cache.get("whisper", "fast", object)
    started, release = threading.Event(), threading.Event()
    loads = []

    def slow_load():
        loads.append(1)
        started.set()
        release.wait(10)
        return "slow model"

    waiters = [threading.Thread(target=cache.get, args=("whisper", "slow", slow_load)) for _ in range(2)]
    for t in waiters:
        t.start()
    assert started.wait(5)
    t0 = time.monotonic()
    assert cache.get("whisper", "fast", object) is fast  # served while the other key loads
    assert cache.get("vad", "cpu", lambda: "vad") == "vad"  # another key loads meanwhile
    assert time.monotonic() - t0 < 1
    release.set()
    for t in waiters:
        t.join(5)
    assert loads == [1] and cache.get("whisper", "slow", object) == "slow model"


@pytest.fixture
def worker_models(monkeypatch):
    def set_models(value: str) -> None:
        monkeypatch.setenv("WORKER_MODELS", value)
        monkeypatch.setenv("WHISPERX_DEVICE", "cpu")
        get_settings.cache_clear()

    yield set_models
    get_settings.cache_clear()


def test_a_worker_serves_its_models_and_refuses_the_rest(worker_models):
    from speech.asr.serving import check_served, served_models

    worker_models("bundled:base:int8, bundled:tiny.en")
    assert [(s.model, s.compute_type, s.device) for s in served_models()] == [
        ("bundled:base", "int8", "cpu"), ("bundled:tiny.en", "int8", "cpu")]
    default = check_served(TranscribeParams())
    assert (default.model, default.compute_type) == ("bundled:base", "int8")  # the first served model
    assert check_served(TranscribeParams(model="bundled:tiny.en")).model == "bundled:tiny.en"
    assert check_served(TranscribeParams(threads=get_settings().cpu_threads or __import__("os").cpu_count())).threads is None
    for asked, why in ((dict(model="large-v3"), "model 'large-v3'"), (dict(compute_type="float32"), "float32 on cpu"),
                       (dict(threads=999), "999 CPU threads")):
        with pytest.raises(InvalidRequest) as refused:
            check_served(TranscribeParams(**asked))
        message = str(refused.value)
        assert why in message and "this worker serves bundled:base (int8 on cpu), bundled:tiny.en (int8 on cpu)" in message
        assert "\n" not in message


def test_filling_in_the_served_model_keeps_the_cache_key(worker_models):
    """A worker that fills in the model it serves computes the transcribe cache key a run naming
    nothing gets on the same machine: inline and worker runs share cached transcripts."""
    from speech.asr.serving import check_served
    from tasks.transcribe import transcribe_key

    worker_models("")
    asked = TranscribeParams(language="en")
    assert transcribe_key("0" * 64, check_served(asked)) == transcribe_key("0" * 64, asked)
