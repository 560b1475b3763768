"""The RunPod handler signature (issue 14): the worker's jobs in, the worker's output out."""
from __future__ import annotations

import pytest
import requests

from conftest import DATA, wer, wer_limit

from deployments.runpod_handler import handler


@pytest.fixture(autouse=True)
def local_roots(monkeypatch, tmp_path):
    """A job is a request from someone else: local paths only under ALLOW_LOCAL_PATHS."""
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}:{tmp_path}")


@pytest.fixture
def manifest_text():
    import json

    return json.loads((DATA / "fixtures.json").read_text())["sample_2spk.wav"]["text"]


def test_a_job_returns_the_workers_output(prefect_harness, tmp_path, manifest_text):
    out = handler({"id": "sync-1", "input": {"audio_file": str(DATA / "sample_2spk.wav"), "language": "en",
                                            "beam_size": 99, "download_dir": str(tmp_path / "out")}})
    assert "error" not in out, out
    assert {"segments", "detected_language", "language_probability"} <= set(out)
    assert out["language_probability"] is None  # the language was given
    assert wer(manifest_text, " ".join(s["text"] for s in out["segments"])) <= wer_limit("sample_2spk.wav")
    assert "transcript_key" not in out  # written to a folder, not a bucket


def test_bad_jobs_answer_with_one_error_line(prefect_harness):
    assert handler({"id": "x", "input": {}})["error"].startswith("invalid request: audio_file")
    missing = handler({"id": "x", "input": {"audio_file": str(DATA / "nonexistent.wav")}})
    assert set(missing) == {"error"} and "not found" in missing["error"] and "Traceback" not in missing["error"]


def test_outputs_in_a_bucket_come_back_as_keys_and_urls(prefect_harness, s3, tmp_path):
    s3.create_bucket(Bucket="handler-out")
    out = handler({"id": "j", "input": {"audio_file": str(DATA / "sample_2spk.wav"), "language": "en",
                                       "bucket": "handler-out", "prefix_transcripts": "tx/"}})
    # the job's own key (<prefix><stem>/<job id>/), so no other job's outputs can replace them
    assert out["transcript_key"] == "tx/sample_2spk/j/sample_2spk.json"
    assert out["segments_key"] == "tx/sample_2spk/j/sample_2spk.segments.json"
    body = requests.get(out["transcript_url"], timeout=30)
    assert body.status_code == 200 and body.json()["segments"] == out["segments"]
    assert requests.get(out["segments_url"], timeout=30).json() == out["segments"]


def test_a_job_past_its_deadline_is_stopped_and_writes_nothing(prefect_harness, tmp_path, monkeypatch):
    """An endpoint's or the handler's job stops at its deadline (GPU_TASK_TIMEOUT) at the next
    stage: one error line, no outputs."""
    monkeypatch.setenv("GPU_TASK_TIMEOUT", "0.001")
    out = handler({"id": "late-1", "input": {"audio_file": str(DATA / "sample_2spk.wav"), "language": "en",
                                            "download_dir": str(tmp_path / "out")}})
    assert set(out) == {"error"}, out
    assert "deadline" in out["error"] and "GPU_TASK_TIMEOUT" in out["error"] and "Traceback" not in out["error"]
    assert not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
