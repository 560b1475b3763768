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

from speech import models

pytestmark = pytest.mark.prefect
DATA = Path(__file__).parent / "data"


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

    # warm: recomputing (force, no cache hits) loads nothing
    loads = models.CACHE.load_count
    again = transcribe_batch(files[:2], {**request, "force": True})
    assert again == {"succeeded": files[:2], "failed": []}
    assert models.CACHE.load_count == loads
