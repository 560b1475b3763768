"""Sweep and batch flows against the real Prefect test server (shared harness).

The sweep's target is a real deployment applied to the server without a work pool, so
run_deployment creates SCHEDULED runs that nothing executes: triggering and idempotency are
what is tested here; executing them is the worker test's job.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA
from speech import models

pytestmark = pytest.mark.prefect


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _runs_of(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client() as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _artifacts(flow_run_id, kind="table"):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [a for a in arts if a.type == kind]


@pytest.fixture(scope="module")
def sweep_target(prefect_harness):
    from flows.transcribe import transcribe_audio

    deployment_id = transcribe_audio.to_deployment(name="sweep-test").apply()
    return "transcribe-audio/sweep-test", deployment_id


def test_sweep_triggers_each_new_file_once(sweep_target, tmp_path):
    from flows.sweep import sweep_inbox

    target, deployment_id = sweep_target
    inbox = tmp_path / "sweep-inbox"
    inbox.mkdir()
    for name, src in [("a.wav", "enrol_awb.wav"), ("b.wav", "enrol_rms.wav"), ("c.wav", "enrol_slt.wav")]:
        shutil.copy(DATA / src, inbox / name)
    (inbox / "notes.txt").write_text("not matched by the glob")

    state = sweep_inbox(str(inbox), glob="*.wav", target=target, request={"language": "en"}, return_state=True)
    assert state.is_completed(), state
    assert state.result() == {"triggered": 3, "skipped": 0, "failed": 0, "deferred": 0}
    runs = _runs_of(deployment_id)
    assert len(runs) == 3 and all(r.state.name == "Scheduled" for r in runs)
    assert sorted(Path(r.parameters["audio_file"]).name for r in runs) == ["a.wav", "b.wav", "c.wav"]
    assert all(r.parameters["language"] == "en" for r in runs)
    assert all(r.idempotency_key.startswith(f"{target}:") for r in runs)
    table = json.loads(_artifacts(state.state_details.flow_run_id)[0].data)
    assert sorted(row["status"] for row in table) == ["triggered"] * 3
    assert {row["flow_run_id"] for row in table} == {str(r.id) for r in runs}

    # again: nothing new
    assert sweep_inbox(str(inbox), glob="*.wav", target=target, request={"language": "en"}) == {
        "triggered": 0, "skipped": 3, "failed": 0, "deferred": 0}
    assert len(_runs_of(deployment_id)) == 3

    # one new file, one corrupt (empty) file, and a renamed copy of a done file (same bytes: not new)
    shutil.copy(DATA / "enrol_kal16.wav", inbox / "d.wav")
    (inbox / "empty.wav").write_bytes(b"")
    shutil.copy(DATA / "enrol_awb.wav", inbox / "a-renamed.wav")
    state = sweep_inbox(str(inbox), glob="*.wav", target=target, request={"language": "en"}, return_state=True)
    assert state.is_completed(), state
    assert state.result() == {"triggered": 1, "skipped": 4, "failed": 1, "deferred": 0}
    runs = _runs_of(deployment_id)
    assert len(runs) == 4 and "d.wav" in {Path(r.parameters["audio_file"]).name for r in runs}
    table = {Path(row["file"]).name: row for row in json.loads(_artifacts(state.state_details.flow_run_id)[0].data)}
    assert table["empty.wav"]["status"] == "failed" and "empty" in table["empty.wav"]["error"]
    assert table["d.wav"]["status"] == "triggered" and table["a-renamed.wav"]["status"] == "already-done"

    # secrets are refused (they would be stored in every triggered run)
    bad = sweep_inbox(str(inbox), target=target, request={"deepgram_api_key": "dg_secret"}, return_state=True)
    assert bad.is_failed() and "secret" in str(bad.result(raise_on_failure=False))


def test_sweep_s3_prefix_in_batches(sweep_target, s3, prefect_harness):
    """S3 listing (ETag identity) and batch_size chunks to a transcribe-batch deployment."""
    from flows.batch import transcribe_batch
    from flows.sweep import sweep_inbox

    deployment_id = transcribe_batch.to_deployment(name="sweep-batch-test").apply()
    target = "transcribe-batch/sweep-batch-test"
    s3.create_bucket(Bucket="sweep-inbox")
    for i, src in enumerate(["enrol_awb.wav", "enrol_rms.wav", "enrol_slt.wav"]):
        s3.upload_file(str(DATA / src), "sweep-inbox", f"calls/{i}.wav")
    s3.put_object(Bucket="sweep-inbox", Key="calls/empty.wav", Body=b"")
    s3.put_object(Bucket="sweep-inbox", Key="other/x.wav", Body=b"outside the prefix")

    counts = sweep_inbox("s3://sweep-inbox/calls/", glob="*.wav", target=target, batch_size=2)
    assert counts == {"triggered": 3, "skipped": 0, "failed": 1, "deferred": 0}
    runs = _runs_of(deployment_id)
    assert sorted(len(r.parameters["audio_files"]) for r in runs) == [1, 2]
    assert sorted(f for r in runs for f in r.parameters["audio_files"]) == [
        "s3://sweep-inbox/calls/0.wav", "s3://sweep-inbox/calls/1.wav", "s3://sweep-inbox/calls/2.wav"]
    counts = sweep_inbox("s3://sweep-inbox/calls/", glob="*.wav", target=target, batch_size=2)
    assert counts == {"triggered": 0, "skipped": 3, "failed": 1, "deferred": 0}
    assert len(_runs_of(deployment_id)) == 2


def test_batch_flow_loads_models_once_and_survives_a_bad_file(prefect_harness, tmp_path):
    from flows.batch import transcribe_batch

    files = []
    for name, src in [("one.wav", "enrol_awb.wav"), ("two.wav", "enrol_rms.wav"), ("three.wav", "heldout_3spk.wav")]:
        shutil.copy(DATA / src, tmp_path / name)
        files.append(str(tmp_path / name))
    missing = str(tmp_path / "missing.wav")
    out = tmp_path / "out"
    request = {"language": "en", "download_dir": str(out), "huggingface_access_token": "hf_batch_secret"}

    loads = models.CACHE.load_count
    state = transcribe_batch(files[:2] + [missing] + files[2:], request, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["succeeded"] == files
    assert [f["audio_file"] for f in result["failed"]] == [missing] and "not found" in result["failed"][0]["error"]
    assert {p.name for p in out.glob("*.json")} >= {"one.json", "two.json", "three.json"}
    assert models.CACHE.load_count - loads <= 2  # at most the first Whisper + VAD load, not one per file

    flow_run_id = state.state_details.flow_run_id
    with _client() as client:
        stored = client.read_flow_run(flow_run_id).parameters
    assert "hf_batch_secret" not in json.dumps(stored)
    batch_table = [a for a in _artifacts(flow_run_id) if (a.description or "").startswith("Batch:")]
    assert len(batch_table) == 1
    statuses = {Path(r["file"]).name: r["status"] for r in json.loads(batch_table[0].data)}
    assert statuses == {"one.wav": "succeeded", "two.wav": "succeeded", "missing.wav": "failed",
                        "three.wav": "succeeded"}

    # warm: recomputing (force, no cache hits) loads nothing; two files with one stem keep
    # their outputs apart (<stem>-<hash of the source>)
    (tmp_path / "sub").mkdir()
    same_stem = str(shutil.copy(DATA / "enrol_slt.wav", tmp_path / "sub" / "one.wav"))
    out2 = tmp_path / "out2"
    loads = models.CACHE.load_count
    again = transcribe_batch([files[0], same_stem], {**request, "download_dir": str(out2), "force": True})
    assert again == {"succeeded": [files[0], same_stem], "failed": []}
    assert models.CACHE.load_count == loads
    names = sorted(p.name for p in out2.glob("*.json") if not p.name.endswith(".segments.json"))
    assert len(names) == 2 and all(n.startswith("one-") for n in names), names
    texts = {json.loads((out2 / n).read_text())["segments"][0]["text"] for n in names}
    assert len(texts) == 2  # awb's and slt's sentences, not one file twice

    bad = transcribe_batch(files[:2], {**request, "output_name": "x"}, return_state=True)
    assert bad.is_failed() and "output_name" in str(bad.result(raise_on_failure=False))


def test_sweep_retries_failed_runs_up_to_max_attempts(sweep_target, tmp_path):
    """A file whose runs failed is triggered again (new idempotency key) until max_attempts runs
    failed; then it is reported as failed. A completed or scheduled run means done."""
    import numpy as np
    from prefect.states import Completed, Crashed, Failed

    from flows.sweep import sweep_inbox
    from speech.io.decode import write_wav

    target, deployment_id = sweep_target
    inbox = tmp_path / "retry-inbox"
    inbox.mkdir()
    rng = np.random.default_rng(7)  # bytes no other test sweeps
    write_wav((rng.standard_normal(16000) * 0.01).astype(np.float32), inbox / "flaky.wav")
    write_wav((rng.standard_normal(16000) * 0.01).astype(np.float32), inbox / "fine.wav")

    def runs_for(name):
        return sorted((r for r in _runs_of(deployment_id) if Path(r.parameters["audio_file"]).name == name),
                      key=lambda r: r.created)

    def set_state(run, state):
        with _client() as client:
            client.set_flow_run_state(run.id, state, force=True)

    def sweep(**kw):
        state = sweep_inbox(str(inbox), glob="*.wav", target=target, return_state=True, **kw)
        rows = {Path(r["file"]).name: r for r in json.loads(_artifacts(state.state_details.flow_run_id)[0].data)}
        return state.result(), rows

    assert sweep(max_attempts=2)[0]["triggered"] == 2
    set_state(runs_for("flaky.wav")[0], Failed(message="decoder exploded"))
    set_state(runs_for("fine.wav")[0], Completed())

    counts, rows = sweep(max_attempts=2)  # flaky: attempt 2; fine: done
    assert counts == {"triggered": 1, "skipped": 1, "failed": 0, "deferred": 0}
    assert rows["flaky.wav"]["status"] == "triggered" and rows["flaky.wav"]["attempt"] == 2
    first, second = runs_for("flaky.wav")
    assert second.idempotency_key == f"{first.idempotency_key}:attempt-2"

    assert sweep(max_attempts=2)[0]["skipped"] == 2  # attempt 2 is still scheduled: nothing new
    set_state(second, Crashed(message="worker lost"))
    counts, rows = sweep(max_attempts=2)  # two failed runs = max_attempts: reported, not retried
    assert counts == {"triggered": 0, "skipped": 1, "failed": 1, "deferred": 0}
    assert "2 run(s) failed, the last Crashed: worker lost" in rows["flaky.wav"]["error"]
    assert len(runs_for("flaky.wav")) == 2
    assert sweep(max_attempts=3)[0]["triggered"] == 1  # a higher limit tries once more
    assert len(runs_for("flaky.wav")) == 3
