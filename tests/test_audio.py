"""Fetch + decode: formats, hashing, http/s3 sources, and every kind of bad input."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from speech.errors import AudioError, FetchError, TransientFetchError
from speech.io.audio import load_audio, read_samples, stem_of
from speech.redact import redact_url
SAMPLE = DATA / "sample_2spk.wav"


def encode(src: Path, dst: Path, codec: str, rate: int = 44100, layout: str = "stereo") -> Path:
    """Re-encode a fixture with PyAV (FFmpeg in the wheel) to another container/codec."""
    import av

    samples = read_samples(load_audio(str(src)))[:16000 * 5]
    with av.open(str(dst), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = 16000
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return dst


def test_wav_is_hashed_and_decoded():
    ref = load_audio(str(SAMPLE))
    assert ref.sha256 == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert ref.stem == "sample_2spk" and ref.size_bytes == SAMPLE.stat().st_size
    samples = read_samples(ref)
    assert samples.dtype == np.float32 and abs(len(samples) / 16000 - ref.duration) < 1e-3
    assert 0.01 < float(np.abs(samples).max()) <= 1.0


@pytest.mark.parametrize("name, codec", [("a.mp3", "mp3"), ("a.flac", "flac"), ("a.ogg", "libopus"), ("a.m4a", "aac")])
def test_common_formats_decode_to_16k_mono(tmp_path, name, codec):
    path = encode(SAMPLE, tmp_path / name, codec, rate=48000 if codec == "libopus" else 44100)
    ref = load_audio(str(path))
    assert abs(ref.duration - 5.0) < 0.1, ref
    assert read_samples(ref).ndim == 1


def test_same_bytes_elsewhere_have_the_same_identity(tmp_path):
    copy = tmp_path / "renamed.wav"
    shutil.copy(SAMPLE, copy)
    a, b = load_audio(str(SAMPLE)), load_audio(str(copy))
    assert a.sha256 == b.sha256 and b.stem == "renamed"


def test_missing_file(tmp_path):
    with pytest.raises(FetchError, match="not found"):
        load_audio(str(tmp_path / "nope.wav"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(str(tmp_path / "empty.wav"))


def test_truncated_wav(tmp_path):
    data = SAMPLE.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 3])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(str(tmp_path / "cut.wav"))


def test_header_only_wav(tmp_path):
    (tmp_path / "hdr.wav").write_bytes(SAMPLE.read_bytes()[:44])
    with pytest.raises(AudioError):
        load_audio(str(tmp_path / "hdr.wav"))


def test_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(str(tmp_path / "notes.wav"))


def test_size_limit(tmp_path, monkeypatch):
    from speech.settings import get_settings

    monkeypatch.setenv("MAX_AUDIO_BYTES", "1000")
    get_settings.cache_clear()
    try:
        with pytest.raises(AudioError, match="limit"):
            load_audio(str(SAMPLE))
    finally:
        monkeypatch.delenv("MAX_AUDIO_BYTES")
        get_settings.cache_clear()


def test_http_fetch(http_server):
    ref = load_audio(f"{http_server}/sample_2spk.wav?X-Amz-Signature=secret")
    assert ref.sha256 == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert "secret" not in ref.source and ref.stem == "sample_2spk"


def test_downloads_go_to_jobs_dir_and_are_removed_once_decoded(http_server, tmp_path, monkeypatch):
    from speech.io import audio
    from speech.settings import get_settings

    jobs = tmp_path / "jobs"
    monkeypatch.setenv("JOBS_DIR", str(jobs))
    get_settings.cache_clear()
    seen = []
    real = audio.decode_to_npy
    monkeypatch.setattr(audio, "decode_to_npy", lambda path, *a: (seen.append(Path(path)), real(path, *a))[1])
    try:
        data = (DATA / "enrol_kal16.wav").read_bytes() + b"\0\0"  # bytes no other test decoded
        (DATA / "_jobs_dir_probe.wav").write_bytes(data)  # the http server serves tests/data
        ref = load_audio(f"{http_server}/_jobs_dir_probe.wav")
    finally:
        (DATA / "_jobs_dir_probe.wav").unlink(missing_ok=True)
        get_settings.cache_clear()
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert len(seen) == 1 and seen[0].parent == jobs  # downloaded into JOBS_DIR ...
    assert list(jobs.iterdir()) == []  # ... and gone once decoded


def test_http_404_is_not_retryable(http_server):
    with pytest.raises(FetchError, match="404") as info:
        load_audio(f"{http_server}/missing.wav")
    assert not info.value.retryable


def test_http_5xx_and_unreachable_are_retryable(http_server):
    from deployments.local_server import free_port

    with pytest.raises(TransientFetchError, match="500"):
        load_audio(f"{http_server}/error500")
    with pytest.raises(TransientFetchError, match="cannot reach"):
        load_audio(f"http://127.0.0.1:{free_port()}/a.wav")


def test_s3_fetch_and_missing_key(s3):
    s3.create_bucket(Bucket="inbox")
    s3.upload_file(str(SAMPLE), "inbox", "calls/day1/sample.wav")
    ref = load_audio("s3://inbox/calls/day1/sample.wav")
    assert ref.stem == "sample" and ref.sha256 == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    with pytest.raises(FetchError, match="no such object"):
        load_audio("s3://inbox/calls/missing.wav")


def test_naming_helpers():
    assert stem_of("https://h/x/My Talk.final.mp3?sig=1") == "My_Talk.final"
    assert stem_of("/a/b/.wav") == "wav" and stem_of("s3://bucket/") == "audio"
    assert redact_url("https://user:pw@h:8080/a.wav?sig=x#f") == "https://h:8080/a.wav"
