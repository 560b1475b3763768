"""A pipeline strangers can trigger (issue 13): what a hostile or careless caller controls
(``audio_file``, speaker-sample URLs, local paths) cannot reach the worker's network or files,
hold a worker forever, or exhaust its memory; each refusal is one clear error.

Real sockets on 127.0.0.1 throughout: the servers below redirect, trickle and stall for real.
"""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA
from speech.errors import FetchError, TransientFetchError
from speech.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
WAV = (DATA / "sample_2spk.wav").read_bytes()


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/ok: a real WAV; /redirect?to=URL: 302 there; /trickle: one byte every 0.3 s forever;
    /stall: headers and 1 kB, then silence; /endless: 200 kB/s for ever."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        try:
            if path == "/ok":
                self._head(len(WAV))
                self.wfile.write(WAV)
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query.split("=", 1)[1])
                self.end_headers()
            elif path == "/trickle":
                self._head(10_000_000)
                for _ in range(200):
                    self.wfile.write(b"R")
                    self.wfile.flush()
                    time.sleep(0.3)
            elif path == "/stall":
                self._head(10_000_000)
                self.wfile.write(WAV[:1024])
                self.wfile.flush()
                time.sleep(30)
            elif path == "/endless":
                self._head(1_000_000_000)
                while True:
                    self.wfile.write(b"\0" * 10_000)
                    time.sleep(0.05)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(length))
        self.end_headers()


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Settings from a clean slate: no allow-list (conftest allows 127.0.0.1 for the other tests)."""
    monkeypatch.delenv("FETCH_ALLOW_HOSTS", raising=False)
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _settings(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    return get_settings()


# ----------------------------------------------------------------------------------
# no server-side request forgery


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                "0.0.0.0", "224.0.0.1", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "::",
                                "168.63.129.16", "100.100.100.200", "fd00:ec2::254", "::ffff:168.63.129.16",
                                # IPv4 inside IPv6: NAT64 to 10.0.0.5, 6to4 of 169.254.169.254, Teredo
                                "64:ff9b::a00:5", "2002:a9fe:a9fe::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"])
def test_non_public_addresses_are_blocked(ip):
    from speech.io.netguard import address_blocked

    assert address_blocked(ip)


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808",
                                "2002:808:808::1"])
def test_public_addresses_are_not(ip):
    from speech.io.netguard import address_blocked

    assert not address_blocked(ip)


def test_private_urls_are_refused_before_connecting(env, hostile):
    from speech.io.audio import load_audio
    from speech.io.netguard import BlockedURL

    for url in (f"http://127.0.0.1:{hostile}/ok", "http://169.254.169.254/latest/meta-data/iam/",
                f"http://localhost:{hostile}/ok", f"http://[::1]:{hostile}/ok"):
        with pytest.raises(BlockedURL, match="not a public address.*ALLOW_PRIVATE_URLS"):
            load_audio(url)
    assert not list((Path(get_settings().cache_dir) / "downloads").glob("*"))  # nothing written


def test_a_refusal_does_not_tell_whether_a_port_is_open(env, hostile):
    from speech.io.audio import load_audio

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    messages = []
    for port in (hostile, closed):
        with pytest.raises(FetchError) as err:
            load_audio(f"http://127.0.0.1:{port}/ok")
        messages.append(str(err.value).replace(f":{port}", ":PORT"))
    assert messages[0] == messages[1]


def test_a_redirect_to_a_private_address_is_refused(env, hostile):
    """localhost is allowed by name; its redirect to 127.0.0.1 (not allowed) is checked again."""
    from speech.io.audio import load_audio
    from speech.io.netguard import BlockedURL

    _settings(env, FETCH_ALLOW_HOSTS="localhost")
    assert load_audio(f"http://localhost:{hostile}/ok").duration > 1  # the allowed host itself
    target = f"http://127.0.0.1:{hostile}/ok"
    with pytest.raises(BlockedURL, match="127.0.0.1"):
        load_audio(f"http://localhost:{hostile}/redirect?to={target}")
    with pytest.raises(BlockedURL):
        load_audio(f"http://localhost:{hostile}/redirect?to=http://169.254.169.254/latest/")


def test_allow_private_urls_and_the_allow_list(env, hostile):
    from speech.io.audio import load_audio

    _settings(env, FETCH_ALLOW_HOSTS=f"127.0.0.1:{hostile}")
    assert load_audio(f"http://127.0.0.1:{hostile}/ok").duration > 1
    env.delenv("FETCH_ALLOW_HOSTS")
    _settings(env, ALLOW_PRIVATE_URLS="1")
    assert load_audio(f"http://127.0.0.1:{hostile}/ok").duration > 1


def test_a_speaker_sample_url_to_a_private_address_is_refused(env, hostile):
    from speech.errors import InvalidRequest
    from speech.schema import SpeakerSample
    from speech.speakers import verify
    from speech.speakers.encoders import get_encoder

    with pytest.raises(InvalidRequest, match="speaker sample 'x'.*not a public address"):
        verify.enroll([SpeakerSample(name="x", url="http://169.254.169.254/latest/user-data")],
                      get_encoder("builtin"))


# ----------------------------------------------------------------------------------
# downloads have a deadline and a minimum rate


def test_a_trickling_server_is_abandoned(env, hostile):
    from speech.io.audio import load_audio

    _settings(env, FETCH_ALLOW_HOSTS="127.0.0.1", HTTP_MIN_BYTES_PER_SECOND="100", HTTP_MIN_RATE_SECONDS="1")
    t = time.monotonic()
    with pytest.raises(TransientFetchError, match="stalled: .* under the 100 bytes/s minimum"):
        load_audio(f"http://127.0.0.1:{hostile}/trickle")
    assert time.monotonic() - t < 10
    assert not list((Path(get_settings().cache_dir) / "downloads").glob("*"))


def test_a_download_past_its_deadline_is_abandoned(env, hostile):
    from speech.io.audio import load_audio

    _settings(env, FETCH_ALLOW_HOSTS="127.0.0.1", HTTP_MAX_SECONDS="1")
    with pytest.raises(TransientFetchError, match="longer than 1 s .HTTP_MAX_SECONDS"):
        load_audio(f"http://127.0.0.1:{hostile}/endless")


def test_a_stalled_body_is_one_clear_error_with_exit_code_2(env, hostile, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    proc = subprocess.run(
        [sys.executable, "-m", "flows.transcribe", f"http://127.0.0.1:{hostile}/stall", "--download-dir",
         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FETCH_ALLOW_HOSTS": "127.0.0.1", "HTTP_READ_TIMEOUT": "1", "PREFECT_HOME": str(tmp_path),
             "SPEECH_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stalled: no data for 1 s (HTTP_READ_TIMEOUT)" in " ".join(proc.stderr.split())
    assert "urllib3" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------
# local paths in deployment runs


def test_local_paths_in_deployment_runs(env, tmp_path):
    from speech.policy import check_local_path

    inbox, other = tmp_path / "inbox", tmp_path / "other"
    inbox.mkdir(), other.mkdir()
    (inbox / "a.wav").write_bytes(b"x")
    (other / "secret.wav").write_bytes(b"x")
    (inbox / "link.wav").symlink_to(other / "secret.wav")
    settings = _settings(env)
    with pytest.raises(FetchError, match="local paths are not allowed in requests from others at all"):
        check_local_path(str(inbox / "a.wav"), settings)
    settings = _settings(env, ALLOW_LOCAL_PATHS=str(inbox))
    check_local_path(str(inbox / "a.wav"), settings)
    check_local_path(f"file://{inbox / 'a.wav'}", settings)
    check_local_path("https://example.com/a.wav", settings)  # not a local path: the URL rules apply
    for escape in (str(inbox / ".." / "other" / "secret.wav"), str(inbox / "link.wav"), "/etc/passwd",
                   f"file://{other / 'secret.wav'}"):
        with pytest.raises(FetchError, match=f"inside {inbox}"):
            check_local_path(escape, settings)
    check_local_path("/etc/passwd", _settings(env, ALLOW_LOCAL_PATHS="1"))


# ----------------------------------------------------------------------------------
# decoding is bounded while decoding


def _silent_flac_without_length(path: Path, minutes: int) -> Path:
    """Silence as FLAC with the STREAMINFO total-samples field zeroed: no declared duration, so
    only decoding can tell how long it is (a few hundred kB for hours)."""
    import numpy as np
    import soundfile as sf

    with sf.SoundFile(str(path), "w", samplerate=16000, channels=1, subtype="PCM_16", format="FLAC") as f:
        block = np.zeros(16000 * 60, dtype=np.int16)
        for _ in range(minutes):
            f.write(block)
    data = bytearray(path.read_bytes())
    data[21] &= 0xF0
    data[22:26] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    return path


def test_a_long_file_without_a_declared_length_is_refused_with_little_memory(tmp_path):
    """3 h of silence (no declared length) against a 2 h limit: refused while decoding, peak
    memory far below the 2 h of float32 (460 MB) the old decode held before refusing."""
    flac = _silent_flac_without_length(tmp_path / "long.flac", 180)
    assert flac.stat().st_size < 2_000_000
    script = (
        "import resource, sys\n"
        "from speech.io.audio import load_audio\n"
        "from speech.errors import AudioError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_audio(sys.argv[1])\n"
        "    print('ACCEPTED')\n"
        "except AudioError as exc:\n"
        "    print('REFUSED', exc)\n"
        "print('PEAK_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(flac)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MAX_AUDIO_SECONDS": "7200",
                                            "SPEECH_CACHE_DIR": str(tmp_path / "cache")})
    out = proc.stdout
    assert "REFUSED" in out and "longer than the 7200 s limit (MAX_AUDIO_SECONDS)" in out, (out, proc.stderr[-2000:])
    peak = float(out.split("PEAK_MB")[1])
    assert peak < 300, peak  # measured ~20 MB; the old decode: > 900 MB
    assert not list((tmp_path / "cache" / "audio").glob("*"))  # no .npy, no .npy.part left


def test_a_long_file_within_the_limit_decodes_to_the_cache(tmp_path, monkeypatch):
    import numpy as np

    from speech.io.audio import load_audio, read_samples

    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        ref = load_audio(str(_silent_flac_without_length(tmp_path / "ten.flac", 10)))
        samples = read_samples(ref)
    finally:
        get_settings.cache_clear()
    assert ref.duration == 600.0 and samples.shape == (600 * 16000,) and samples.dtype == np.float32
    assert not np.any(samples[:: 16000])
    assert [p.suffix for p in (tmp_path / "cache" / "audio").iterdir()] == [".fmt", ".npy"] or \
        sorted(p.suffix for p in (tmp_path / "cache" / "audio").iterdir()) == [".fmt", ".npy"]


def test_a_full_disk_leaves_no_part_file_and_is_not_retried(tmp_path, monkeypatch):
    import errno

    from speech.errors import StorageError
    from speech.io import decode as decode_mod
    from speech.io.audio import load_audio

    monkeypatch.setenv("SPEECH_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    real = decode_mod._npy_header
    calls = []

    def full(samples):  # the second header write (the final one) finds the disk full
        calls.append(samples)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(samples)

    monkeypatch.setattr(decode_mod, "_npy_header", full)
    try:
        with pytest.raises(StorageError, match="no space left") as err:
            load_audio(str(DATA / "sample_2spk.wav"))
    finally:
        get_settings.cache_clear()
    assert err.value.retryable is False
    assert not list((tmp_path / "cache" / "audio").glob("*"))


def test_downloads_a_killed_process_left_are_swept_by_the_next_download(env, hostile):
    """dl-*.part and shared-* files that a process killed with SIGKILL could not release (over a
    day old) are deleted when the next download starts; fresh ones (a live run's) and anything
    else in the folder stay."""
    import os

    from speech.io.fetch import fetch

    _settings(env, FETCH_ALLOW_HOSTS="127.0.0.1")
    downloads = get_settings().cache_dir / "downloads"
    downloads.mkdir(parents=True)
    old = [downloads / "dl-killed.part", downloads / "shared-killed"]
    fresh = [downloads / "dl-live.part", downloads / "shared-live"]
    other = downloads / "notes.txt"
    for path in [*old, *fresh, other]:
        path.write_bytes(b"x" * 1000)
    two_days_ago = time.time() - 2 * 86400
    for path in [*old, other]:
        os.utime(path, (two_days_ago, two_days_ago))
    fetched = fetch(f"http://127.0.0.1:{hostile}/ok", get_settings())
    assert fetched.path.read_bytes() == WAV
    assert not any(p.exists() for p in old) and all(p.exists() for p in fresh) and other.exists()


# ----------------------------------------------------------------------------------
# in real flow runs


def _run_flow(**kwargs):
    from flows.transcribe import transcribe_audio

    state = transcribe_audio(return_state=True, **kwargs)
    return state, state.result(raise_on_failure=False)


def test_a_deployment_run_refuses_local_paths_unless_allowed(prefect_harness, monkeypatch, tmp_path):
    """What a deployment run is told to read from the worker's disk: refused before anything is
    fetched, unless ALLOW_LOCAL_PATHS covers it (a local run from the CLI or Python is not limited)."""
    import uuid

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", str(uuid.uuid4()))
    get_settings.cache_clear()
    out = tmp_path / "out"
    state, exc = _run_flow(audio_file=str(DATA / "sample_2spk.wav"), language="en", download_dir=str(out))
    assert state.is_failed() and isinstance(exc, FetchError)
    assert "local paths are not allowed in requests from others" in str(exc) and not out.exists()
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(DATA))
    get_settings.cache_clear()
    try:
        # the audio may be read now, but the outputs may not land outside RESULTS_DIR and the roots
        victim = tmp_path / "home" / ".bashrc"
        victim.parent.mkdir()
        victim.write_text("# the worker's own file\n")
        for folder in (victim.parent, get_settings().results_dir / ".." / "elsewhere"):  # `..` is resolved
            state, exc = _run_flow(audio_file=str(DATA / "sample_2spk.wav"), language="en", download_dir=str(folder),
                                   output_name="bashrc")
            assert state.is_failed() and "download_dir: requests from others write outputs only inside" in str(exc)
        assert victim.read_text() == "# the worker's own file\n" and len(list(victim.parent.iterdir())) == 1
        state, result = _run_flow(audio_file=str(DATA / "sample_2spk.wav"), language="en",
                                  download_dir=str(get_settings().results_dir / "mine"))
        assert state.is_completed(), state
        monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}{os.pathsep}{tmp_path}")
        get_settings.cache_clear()
        state, result = _run_flow(audio_file=str(DATA / "sample_2spk.wav"), language="en", download_dir=str(out))
    finally:
        get_settings.cache_clear()
    assert state.is_completed(), state
    # a deployment run's outputs go under its own key: <download_dir>/<stem>/<flow run id>/
    assert result["segments"] and (out / "sample_2spk" / str(state.state_details.flow_run_id) / "sample_2spk.json").is_file()


def test_credentials_in_urls_are_not_stored_or_logged(prefect_harness, http_server, tmp_path):
    """A presigned-style URL with user-info: fetched as given, stored and logged masked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    base = http_server.replace("http://", "http://alice:pw-do-not-store@")
    url = f"{base}/sample_2spk.wav?X-Amz-Credential=cred-do-not-store&X-Amz-Signature=sig-do-not-store&v=1"
    sample = f"{http_server}/enrol_slt.wav?token=token-do-not-store"
    state, result = _run_flow(audio_file=url, language="en", download_dir=str(tmp_path / "out"),
                              speaker_verification=True, diarization=True,
                              speaker_samples=[{"name": "slt", "url": sample}])
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    stored = str(run.parameters) + " ".join(log.message for log in logs) + str(result)
    stored += " ".join(p.read_text() for p in (tmp_path / "out").iterdir())
    for secret in ("pw-do-not-store", "cred-do-not-store", "sig-do-not-store", "token-do-not-store"):
        assert secret not in stored, secret
    assert run.parameters["audio_file"].endswith("X-Amz-Credential=***&X-Amz-Signature=***&v=1")
    assert "://***@127.0.0.1" in run.parameters["audio_file"]


def test_the_decode_cache_evicts_the_least_recently_used(tmp_path):
    from speech.io.audio import evict

    for i, name in enumerate(("old", "mid", "new")):
        (tmp_path / f"{name}.npy").write_bytes(b"\0" * 1000)
        (tmp_path / f"{name}.fmt").write_text("wav/pcm_s16le")
        os.utime(tmp_path / f"{name}.npy", (1000 + i, 1000 + i))
    (tmp_path / "stale.npy.part").write_bytes(b"\0" * 10)
    os.utime(tmp_path / "stale.npy.part", (1000, 1000))
    (tmp_path / "fresh.npy.part").write_bytes(b"\0" * 10)  # a decode in progress
    os.utime(tmp_path / "mid.npy")  # just used
    removed = evict(tmp_path, 2000, keep=tmp_path / "new.npy")
    assert sorted(p.name for p in removed) == ["old.npy", "stale.npy.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.npy.part", "mid.fmt", "mid.npy", "new.fmt", "new.npy"]
    assert [p.name for p in evict(tmp_path, 0, keep=tmp_path / "new.npy")] == ["mid.npy"]


# ----------------------------------------------------------------------------------
# request-chosen endpoints and models do not borrow the worker's identity


def test_request_endpoints_and_models_in_deployment_runs(env):
    from speech.errors import InvalidRequest
    from speech.io.netguard import BlockedURL
    from speech.policy import check_untrusted_request
    from speech.schema import TranscriptionRequest

    settings = _settings(env, ALLOW_LOCAL_PATHS="1")

    def req(**kw):
        return TranscriptionRequest.parse({"audio_file": "https://example.com/a.wav", **kw})

    check_untrusted_request(req(), settings)
    with pytest.raises(InvalidRequest, match="needs its own access_key and secret_key"):
        check_untrusted_request(req(s3_endpoint="http://attacker.example:9000"), settings)
    with pytest.raises(BlockedURL):  # own keys, but the worker's network
        check_untrusted_request(req(s3_endpoint="http://169.254.169.254", access_key="a", secret_key="b"), settings)
    check_untrusted_request(req(s3_endpoint="http://93.184.216.34:9000", access_key="a", secret_key="b"), settings)
    with pytest.raises(InvalidRequest, match="can build arbitrary classes"):
        check_untrusted_request(req(diarization_model="/tmp/evil-pipeline"), settings)
    with pytest.raises(InvalidRequest, match="not one of pyannote's published pipelines"):
        check_untrusted_request(req(diarization_model="attacker/pipeline"), settings)
    check_untrusted_request(req(diarization_model="pyannote/speaker-diarization-3.1"), settings)
    trusting = _settings(env, ALLOW_REQUEST_ENDPOINTS="1")
    check_untrusted_request(req(s3_endpoint="http://127.0.0.1:9000", diarization_model="/tmp/x"), trusting)


# ----------------------------------------------------------------------------------
# secrets by reference: the token never travels as a parameter


def test_a_token_parameter_can_name_a_secret_block(prefect_harness):
    from prefect import flow
    from prefect.blocks.system import Secret

    from flows.pipeline import with_block_secrets
    from speech.errors import InvalidRequest
    from speech.schema import TranscriptionRequest

    Secret(value="dg-from-the-callers-block").save("caller-deepgram", overwrite=True)

    @flow
    def resolve(key: str) -> str:
        req = with_block_secrets(TranscriptionRequest.parse({"audio_file": "a.wav", "deepgram_api_key": key}))
        return req.deepgram_api_key.get_secret_value()

    assert resolve("prefect-secret:caller-deepgram") == "dg-from-the-callers-block"
    state = resolve("prefect-secret:no-such-block", return_state=True)
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, InvalidRequest) and "no Secret block named 'no-such-block'" in str(exc)


def test_upstream_messages_lose_signed_urls_and_stay_short():
    from speech.redact import mask_url_credentials, one_line

    text = ("PUT https://b.s3.amazonaws.com/k.wav?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=deadbeef&v=2 "
            "failed: 403 " + "x" * 1000)
    line = one_line(text, 200)
    assert "deadbeef" not in line and "AKIA" not in line and len(line) <= 200
    assert "X-Amz-Signature=***" in line and "v=2" in line
    assert mask_url_credentials("s3://bucket/key.wav") == "s3://bucket/key.wav"
    assert mask_url_credentials("https://h/a.wav?name=bob") == "https://h/a.wav?name=bob"  # nothing to hide
