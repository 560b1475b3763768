"""Shared fixtures: isolated caches, one Prefect harness, loopback HTTP and S3 servers."""
from __future__ import annotations

import atexit
import contextlib
import functools
import http.server
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from bench.metrics import der, normalize_text, wer, word_time_error  # noqa: F401 - shared with the tests
from deployments.local_server import free_port

DATA = Path(__file__).parent / "data"
SR = 16000  # the fixtures' sample rate (16 kHz mono 16-bit)

# Word error rate of each English fixture through the transcribe stage (bundled base, int8, the
# language detected) as measured on an AMD EPYC with AVX2 only, with the numerics pinned below
# (the same without pinning there). On an Intel CPU with AVX-512/VNNI, before pinning,
# diar_2spk gave 0.1261 (issue 19). A test's limit is the measured value plus two words of the
# fixture, and never under 0.12: room for a word or two of machine-to-machine difference.
MEASURED_WER = {"sample_2spk.wav": 0.0938, "heldout_3spk.wav": 0.0286, "align_3spk.wav": 0.1,
                "diar_2spk.wav": 0.1171, "diar_3spk.wav": 0.0756, "diar_4spk.wav": 0.0992}


def wer_limit(name: str) -> float:
    words = len(json.loads((DATA / "fixtures.json").read_text())[name]["text"].split())
    return round(max(0.12, MEASURED_WER[name] + 2 / words), 4)

# The same numerics on every x86-64 machine (set before torch or CTranslate2 load; subprocesses
# inherit them). Left alone, CTranslate2 multiplies with Intel MKL on Intel CPUs and oneDNN on
# others, and every library picks its kernels by the CPU's ISA (AVX2, AVX-512, VNNI): on an
# AVX-512 Intel machine a fixture's transcript differed by a word from an AVX2 AMD one. Pinned to
# what an AVX2 machine runs (oneDNN, AVX2 kernels), both give the same words. Tests only:
# production keeps the fastest kernels of its machine.
for _name, _value in (("CT2_USE_MKL", "0"), ("CT2_FORCE_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                      ("DNNL_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"),
                      ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):
    os.environ.setdefault(_name, _value)

# Keep every test run off the user's real caches and off the network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The tests' HTTP servers listen on 127.0.0.1, which fetches refuse by default (no SSRF);
# tests/test_hostile.py clears this to prove the refusal.
os.environ.setdefault("FETCH_ALLOW_HOSTS", "127.0.0.1")
os.environ["HF_HUB_OFFLINE"] = "1"
# a developer's own `prefect server start` on :4200 must not receive the tests' CLI runs
os.environ["LOCAL_PREFECT_SERVER"] = "off"
# Prefect keeps cached task results on disk under PREFECT_HOME: isolate them per session,
# set before anything imports prefect; removed when this test process ends.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Settings are read once per process (get_settings is cached); a test's monkeypatched
    environment must be what the code under test reads, and must not leak into the next test."""
    from speech.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    from speech.settings import get_settings

    cache = tmp_path_factory.mktemp("speech-cache")
    os.environ["SPEECH_CACHE_DIR"] = str(cache)
    os.environ["RESULTS_DIR"] = str(tmp_path_factory.mktemp("results-default"))
    get_settings.cache_clear()
    yield cache
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((DATA / "fixtures.json").read_text())


@pytest.fixture(scope="session")
def prefect_harness():
    """One real (temporary, SQLite) Prefect API for every flow-level test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        _Handler.hits[path] = _Handler.hits.get(path, 0) + 1
        if self.path.startswith("/error500"):
            self.send_error(500, "boom")
            return
        super().do_GET()


@pytest.fixture(scope="session")
def http_server():
    """Serves tests/data on 127.0.0.1; /error500 answers 500; ``server.hits`` counts GETs per path."""
    handler = functools.partial(_Handler, directory=str(DATA))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()


class HttpServer(str):
    """The base URL (a str) plus the request counter."""

    @property
    def hits(self) -> dict[str, int]:
        return _Handler.hits


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1, with the env pointing boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from speech.settings import get_settings

    get_settings.cache_clear()
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()
    server.stop()


@pytest.fixture
def s3(s3_server):
    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    return s3_client(get_settings())


# ---- audio of the fixtures ---------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; answers 500 ``fail_first`` times."""

    def __init__(self, fail_first: int = 0):
        self.bodies: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.attempts += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.attempts <= fail_first:
                    self.send_response(500)
                else:
                    outer.bodies.append(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t"

    def wait(self, n: int, seconds: float = 120) -> list[dict]:
        deadline = time.monotonic() + seconds
        while len(self.bodies) < n:
            assert time.monotonic() < deadline, (self.attempts, self.bodies)
            time.sleep(0.2)
        return self.bodies


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def read_wav(name: str) -> np.ndarray:
    """A fixture's 16-bit samples as float32, read straight from the WAV (no decoding stack)."""
    import wave

    with wave.open(str(DATA / name)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def samples(name: str) -> np.ndarray:
    """A fixture through the pipeline's own fetch + decode stage (cached .npy, float32)."""
    from speech.io.audio import load_audio, read_samples

    return np.asarray(read_samples(load_audio(str(DATA / name))), dtype=np.float32)


# ---- the RunPod-compatible endpoint ----------------------------------------------------


@contextlib.contextmanager
def serving_runpod_api(key, jobs, **options) -> Iterator[str]:
    """deployments.runpod_api's app over ``jobs`` on a free 127.0.0.1 port, in a thread: yields
    the base URL an SDK's ``runpod.endpoint_url_base`` takes (``http://127.0.0.1:PORT/v2``)."""
    import time

    import uvicorn

    from deployments.runpod_api import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(key, jobs, **options), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the endpoint did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{server.config.port}/v2"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def runpod_sdk(monkeypatch, key: str, base: str):
    """The official runpod SDK pointed at a local endpoint (the one line a client changes)."""
    import runpod

    monkeypatch.setattr(runpod, "api_key", key)
    monkeypatch.setattr(runpod, "endpoint_url_base", base)
    return runpod


@pytest.fixture
def slow_server():
    """/headers and everything under /stalled/: a status line, then one header byte a second
    (for 10 minutes: a stalled proxy, a hub that stopped answering); anything else: 503 after 2 s."""
    import socketserver

    class Slow(socketserver.BaseRequestHandler):
        def handle(self):
            request = self.request.recv(4096).decode("latin-1")
            try:
                if " /headers" in request or " /stalled/" in request:
                    self.request.sendall(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(600):
                        self.request.sendall(b"X")
                        time.sleep(1)
                else:
                    time.sleep(2)
                    self.request.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
