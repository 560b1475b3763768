"""The command line's remote mode (issue 21), for the pipeline script's users: ``--endpoint URL
--api-key KEY [--sync]`` sends the request to a RunPod-compatible endpoint (this project's own, in
its in-process mode, on 127.0.0.1), local audio goes up to a real S3 server (moto) and is sent as
a presigned URL, and the same output files are written locally. ``--deployment`` is tested with
the deployment runner in tests/test_runpod_deployment.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import DATA, serving_runpod_api, wer, wer_limit

KEY = "remote-mode-key"


SERVED: dict = {}  # the module endpoint's job table (deployments.runpod_jobs.Jobs)


@pytest.fixture(scope="module")
def endpoint(prefect_harness, s3_server):
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    from deployments.callers import Callers

    SERVED["jobs"] = Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=1)
    # an endpoint shared with another caller: the CLI is the caller "default" (RUNPOD_API_KEY)
    with serving_runpod_api(Callers({"default": KEY, "someone-else": "someone-elses-key"}), SERVED["jobs"]) as base:
        yield f"{base}/whisperx"


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    # the endpoint's side: local paths only under these roots; its fetches may reach the S3 server on 127.0.0.1
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{tmp_path / 'nothing'}")
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)


def _text(name: str) -> str:
    return json.loads((DATA / "fixtures.json").read_text())[name]["text"]


def test_sync_uploads_the_local_file_and_writes_the_outputs_here(endpoint, s3, tmp_path, capsys):
    from flows.cli import main

    s3.create_bucket(Bucket="remote-audio")
    out = tmp_path / "out"
    code = main(["--endpoint", endpoint, "--sync", str(DATA / "sample_2spk.wav"), "--language", "en",
                 "--bucket", "remote-audio", "--download-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_2spk.json", "sample_2spk.segments.json", "sample_2spk.srt", "sample_2spk.vtt"]
    result = json.loads((out / "sample_2spk.json").read_text())
    assert wer(_text("sample_2spk.wav"), " ".join(s["text"] for s in result["segments"])) <= wer_limit("sample_2spk.wav")
    assert "-->" in (out / "sample_2spk.srt").read_text() and captured.out.count("] ") == len(result["segments"])
    assert "uploaded: sample_2spk.wav -> s3://remote-audio/audio/sample_2spk.wav" in captured.err
    assert s3.head_object(Bucket="remote-audio", Key="audio/sample_2spk.wav")["ContentLength"] > 0
    ours = "".join(line for line in captured.err.splitlines(True)  # not the S3 server's own request log
                   if "werkzeug" not in line and "GET /remote-audio/" not in line)
    assert KEY not in ours + captured.out and not re.search(r"X-Amz-Signature=[0-9a-f]", ours)


def test_async_polls_status_and_renders_the_chosen_format(endpoint, s3, tmp_path, capsys):
    """/run then /status; an s3:// source is sent as it is; --output-format and --json as locally."""
    from flows.cli import main

    s3.create_bucket(Bucket="remote-src")
    s3.upload_file(str(DATA / "enrol_slt.wav"), "remote-src", "calls/slt.wav")
    out = tmp_path / "out"
    code = main(["--endpoint", endpoint, "s3://remote-src/calls/slt.wav", "--language", "en", "--output_format", "txt",
                 "--output_dir", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["slt.json", "slt.txt"]
    printed = json.loads(captured.out)
    assert printed["segments"] and (out / "slt.txt").read_text().strip()
    assert wer(_text("enrol_slt.wav"), (out / "slt.txt").read_text()) <= 0.25  # one short sentence


def test_refusals_and_failures_write_nothing(endpoint, s3, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    # a local file with no bucket: the endpoint could not read it; refused before anything is sent
    assert main(["--endpoint", endpoint, str(DATA / "sample_2spk.wav"), "--download-dir", str(out)]) == 2
    assert "the endpoint cannot read it; give --bucket" in capsys.readouterr().err
    # the wrong key: one line, the key not echoed
    assert main(["--endpoint", endpoint, "--api-key", "wrong-key", "s3://remote-src/x.wav", "--download-dir",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused the key" in err and "wrong-key" not in err
    # the job fails at the endpoint: its error, exit 1
    s3.create_bucket(Bucket="remote-empty")
    assert main(["--endpoint", endpoint, "--sync", "s3://remote-empty/missing.wav", "--download-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "missing.wav" in err
    # nobody listening
    assert main(["--endpoint", "http://127.0.0.1:9/v2/x", "s3://remote-empty/a.wav", "--download-dir", str(out)]) == 1
    assert "cannot reach the endpoint" in capsys.readouterr().err
    # not an endpoint address
    assert main(["--endpoint", "ftp://h/x", "s3://remote-empty/a.wav"]) == 2
    assert not out.exists()


def test_the_deadline_cancels_the_remote_job(endpoint, s3, tmp_path, capsys):
    """The endpoint's one worker is busy, so the command's job waits in its queue past
    --remote-timeout: the command ends with exit 1 and the job is cancelled there."""
    from flows.cli import main

    auth = {"Authorization": f"Bearer {KEY}"}
    s3.create_bucket(Bucket="remote-slow")
    s3.upload_file(str(DATA / "enrol_awb.wav"), "remote-slow", "awb.wav")
    busy = requests.post(f"{endpoint}/run", headers=auth, timeout=30, json={"input": {
        "audio_file": "s3://remote-slow/awb.wav", "force": True, "language": "en"}}).json()["id"]
    started = time.monotonic()
    code = main(["--endpoint", endpoint, "s3://remote-slow/awb.wav", "--remote-timeout", "1", "--download-dir",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "did not finish within 1 s" in err and time.monotonic() - started < 30, err
    job = err.split("remote job ")[1].split()[0]

    def final(job_id: str) -> str:
        deadline = time.monotonic() + 300
        while (state := requests.get(f"{endpoint}/status/{job_id}", headers=auth, timeout=30).json()["status"]) \
                not in ("CANCELLED", "COMPLETED", "FAILED"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        return state

    assert final(job) == "CANCELLED" and not (tmp_path / "out").exists()
    assert final(busy) == "COMPLETED"


def test_several_files_are_remote_jobs_at_once_and_same_names_stay_apart(endpoint, s3, tmp_path, capsys):
    """Three files, two of them named talk.wav (different voices and words): all three jobs are
    in the endpoint's queue before the first ends; each talk.wav goes up under its own key and comes
    back as its own talk-<8 hex> outputs (with one shared key, a job could read the other's audio),
    named so here, not by an output_name sent to the endpoint (which, shared with another caller,
    refuses one); the results are printed in the order given."""
    from flows.cli import main
    from speech.io.audio import distinct_output_names

    s3.create_bucket(Bucket="remote-many")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(DATA / "enrol_slt.wav", tmp_path / "a" / "talk.wav")
    shutil.copy(DATA / "enrol_awb.wav", tmp_path / "b" / "talk.wav")
    files = [str(tmp_path / "a" / "talk.wav"), str(tmp_path / "b" / "talk.wav"), str(DATA / "enrol_rms.wav")]
    texts = [_text("enrol_slt.wav"), _text("enrol_awb.wav"), _text("enrol_rms.wav")]
    out = tmp_path / "out"
    since = time.time()
    code = main(["--endpoint", endpoint, *files, "--language", "en", "--bucket", "remote-many", "--remote-jobs", "3",
                 "--download-dir", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    ours = [j for j in SERVED["jobs"].jobs.values() if j["submitted"] >= since]
    assert len(ours) == 3 and all(j["status"] == "COMPLETED" for j in ours)
    assert max(j["submitted"] for j in ours) < min(j["finished"] for j in ours)  # all sent before any ended
    assert captured.err.count(": remote job ") == 3

    decoder, printed, at = json.JSONDecoder(), [], 0
    while at < len(captured.out.rstrip()):
        doc, at = decoder.raw_decode(captured.out, at)
        printed.append(" ".join(s["text"] for s in doc["segments"]))
        at += len(captured.out[at:]) - len(captured.out[at:].lstrip())
    assert len(printed) == 3 and all(wer(t, p) <= 0.25 for t, p in zip(texts, printed)), printed  # in order
    stems = sorted({p.name.split(".")[0] for p in out.iterdir()})
    assert len(stems) == 3 and "enrol_rms" in stems and all(re.fullmatch(r"talk-[0-9a-f]{8}", s) for s in stems[1:]), stems
    for path, text, name in zip(files[:2], texts[:2], distinct_output_names(files)):
        written = " ".join(s["text"] for s in json.loads((out / f"{name}.json").read_text())["segments"])
        assert wer(text, written) <= 0.25, (path, written)
        stored = s3.get_object(Bucket="remote-many", Key=f"audio/{name}.wav")["Body"].read()
        assert stored == open(path, "rb").read()
    assert "audio/talk.wav" not in captured.err


def test_ctrl_c_cancels_every_job_in_flight_and_sends_no_more(tmp_path):
    """The command (its own process) holds two of three files as jobs in a busy endpoint's queue;
    SIGINT ends it with exit 130, both jobs are cancelled there, the third file is never sent."""
    from deployments.runpod_api import Jobs

    gate = threading.Event()
    jobs = Jobs(lambda job, job_id: (gate.wait(120), {"segments": []})[1], workers=1)
    auth = {"Authorization": f"Bearer {KEY}"}
    with serving_runpod_api(KEY, jobs) as base:
        url = f"{base}/whisperx"
        busy = requests.post(f"{url}/run", headers=auth, timeout=30, json={"input": {"audio_file": "s3://b/busy.wav"}})
        env = {**os.environ, "RUNPOD_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
        cli = subprocess.Popen([sys.executable, "-m", "flows.transcribe", "--endpoint", url, "s3://b/one.wav",
                                "s3://b/two.wav", "s3://b/three.wav", "--remote-jobs", "2", "--download-dir",
                                str(tmp_path / "out")], cwd=DATA.parents[1], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines, deadline = [], time.monotonic() + 120
            while sum(": remote job " in line for line in lines) < 2:
                assert time.monotonic() < deadline and cli.poll() is None, lines
                lines.append(cli.stderr.readline())
            cli.send_signal(signal.SIGINT)
            rest = cli.communicate(timeout=60)[1]
        finally:
            if cli.poll() is None:
                cli.kill()
            gate.set()
        assert cli.returncode == 130, "".join(lines) + rest
        assert "2 remote jobs cancelled" in rest, rest
        sent = [j for j in jobs.jobs.values() if j["id"] != busy.json()["id"]]
        assert len(sent) == 2 and all(j["status"] == "CANCELLED" for j in sent), sent
        assert not (tmp_path / "out").exists()


def test_audio_replaced_after_upload_fails_the_job_instead_of_transcribing_it(s3, tmp_path, capsys, prefect_harness):
    """The race two senders of one file name can run into: this command uploads talk.wav and sends
    its presigned URL; before the endpoint's worker reads it, someone else's talk.wav replaces the
    object. The job carries the file's sha256 (audio_sha256), so it fails with that reason
    (exit 1, nothing written here) instead of returning a transcript of the other person's audio."""
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler
    from flows.cli import main

    s3.create_bucket(Bucket="remote-race")
    shutil.copy(DATA / "enrol_slt.wav", tmp_path / "talk.wav")
    gate = threading.Event()
    jobs = Jobs(lambda job, job_id: (gate.wait(120), handler(job, flow_run_name=job_id))[1], workers=1)
    out, outcome = tmp_path / "out", {}
    with serving_runpod_api(KEY, jobs) as base:
        command = threading.Thread(target=lambda: outcome.update(code=main([
            "--endpoint", f"{base}/whisperx", str(tmp_path / "talk.wav"), "--language", "en", "--bucket",
            "remote-race", "--download-dir", str(out)])))
        command.start()
        try:
            deadline = time.monotonic() + 60
            while not jobs.jobs:  # the job is queued: the upload is done and the URL sent
                assert time.monotonic() < deadline and command.is_alive()
                time.sleep(0.1)
            s3.upload_file(str(DATA / "enrol_awb.wav"), "remote-race", "audio/talk.wav")  # the other sender
        finally:
            gate.set()
            command.join(timeout=300)
    err = capsys.readouterr().err
    assert outcome.get("code") == 1, err
    assert "are not the audio_sha256 the request gave" in err and "nothing was transcribed" in err, err
    assert not out.exists()
    (job,) = jobs.jobs.values()
    assert job["status"] == "FAILED"


def test_audio_sha256_is_checked_by_every_run(tmp_path):
    """The field itself: validated as a SHA-256 digest; the fetched audio must have it; it names
    one file, so a command or batch of several files cannot give it."""
    from speech.errors import AudioError, InvalidRequest
    from speech.io.audio import load_audio
    from speech.schema import TranscriptionRequest, check_one_file_fields

    ref = load_audio(str(DATA / "enrol_rms.wav"), decode_now=False)
    load_audio(str(DATA / "enrol_rms.wav"), decode_now=False, sha256=ref.sha256.upper())  # any case: no error
    load_audio(str(DATA / "enrol_rms.wav"), decode_now=False, sha256=None)
    with pytest.raises(AudioError, match="not the audio_sha256"):
        load_audio(str(DATA / "enrol_rms.wav"), decode_now=False, sha256="0" * 64)
    with pytest.raises(InvalidRequest, match="audio_sha256 is one file's content"):
        check_one_file_fields({"audio_sha256": ref.sha256}, 2)
    check_one_file_fields({"audio_sha256": ref.sha256}, 1)
    assert TranscriptionRequest.parse({"audio_file": "a.wav", "audio_sha256": "AB" * 32}).audio_sha256 == "ab" * 32
    with pytest.raises(Exception, match="64 hexadecimal"):
        TranscriptionRequest.parse({"audio_file": "a.wav", "audio_sha256": "abc"})


@pytest.mark.parametrize("value, expected", [
    ("abc123", ("https://api.runpod.ai/v2", "abc123")),
    ("http://127.0.0.1:8000/v2/whisperx", ("http://127.0.0.1:8000/v2", "whisperx")),
    ("https://api.runpod.ai/v2/abc123/runsync", ("https://api.runpod.ai/v2", "abc123")),
])
def test_endpoint_addresses(value, expected):
    from flows.remote import endpoint_address

    assert endpoint_address(value) == expected


@pytest.mark.parametrize("value", ["http://host", "ftp://h/v2/x", "a b", "http:///v2/x"])
def test_bad_endpoint_addresses(value):
    from flows.remote import endpoint_address
    from speech.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        endpoint_address(value)
