"""The production path end to end, with real processes: a `prefect server start` (SQLite) on
127.0.0.1, infra/bootstrap.sh (work pools from infra/ templates + credential blocks), `prefect
deploy` from prefect.yaml, a `prefect worker start --type process`, and `run_deployment` of
transcribe-cpu, whose flow run reads its Deepgram key from a Secret block and writes its outputs
through the S3Bucket block to a real S3 protocol server (moto).

The only change to prefect.yaml is the one its comment tells plain-checkout users to make: the
pull step's directory is this checkout instead of the image's /app.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DATA, process_running, wer, wer_limit
from deepgram_stub import KEY, DeepgramServer

from deployments.local_server import kill_host, stop

pytestmark = pytest.mark.prefect
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "worker-results"
AUDIO = "sample_2spk.wav"
LOST_AUDIO = "diar_3spk.wav"

# what a worker host must not inherit from the test process: its credentials come from blocks
HOST_ONLY = ("PREFECT_API_URL", "DEEPGRAM_API_KEY", "PYANNOTE_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
             "RESULTS_BUCKET", "RESULTS_S3_BLOCK")


class Server:
    def __init__(self, local):
        self.url, self.home = local.url, local.home
        # a worker host's environment: none of the test process's credentials or Prefect settings
        self.env = {k: v for k, v in local.env.items() if k not in HOST_ONLY or k == "PREFECT_API_URL"}
        self.env["HF_HUB_OFFLINE"] = "1"

    def run(self, *cmd: str, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT) -> str:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
        return out

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from deployments.local_server import local_prefect_server

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    with local_prefect_server(tmp_path_factory.mktemp("prefect-server"), base_env=base) as local:
        yield Server(local)


@pytest.fixture(scope="module")
def bootstrapped(server, s3_server):
    """infra/bootstrap.sh all, with a Deepgram key and S3 (moto) credentials in its environment."""
    out = server.run("bash", str(ROOT / "infra" / "bootstrap.sh"), "all", env={
        "PREFECT": str(BIN / "prefect"), "PYTHON": sys.executable,
        "DEEPGRAM_API_KEY": KEY, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "S3_ENDPOINT_URL": s3_server, "RESULTS_BUCKET": BUCKET,
    })
    return out


@pytest.fixture(scope="module")
def deployed(server, bootstrapped, tmp_path_factory):
    """`prefect deploy --all` from prefect.yaml (pull step pointed at this checkout)."""
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    project["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    prefect_file = tmp_path_factory.mktemp("project") / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(project, sort_keys=False))
    out = server.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with server.client() as client:  # the cron must not fire sweeps at the test workers
        sweep = client.read_deployment_by_name("sweep-inbox/sweep-inbox")
        for schedule in client.read_deployment_schedules(sweep.id):
            client.update_deployment_schedule(sweep.id, schedule.id, active=False)
        for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[sweep.id]))):
            client.delete_flow_run(run.id)
    return out


def test_bootstrap_creates_pools_from_the_infra_templates_and_blocks(server, bootstrapped):
    from prefect.blocks.system import Secret
    from prefect_aws import S3Bucket

    assert KEY not in bootstrapped and "saved  Secret 'deepgram-api-key'" in bootstrapped
    with server.client() as client:
        pools = {p.name: p for p in client.read_work_pools()}
        assert {n: pools[n].type for n in ("cpu-pool", "gpu-docker-pool", "gpu-process-pool", "gpu-k8s-pool")} == {
            "cpu-pool": "process", "gpu-docker-pool": "docker", "gpu-process-pool": "process",
            "gpu-k8s-pool": "kubernetes"}
        for name, template in (("gpu-docker-pool", "docker-gpu-job-template.json"),
                               ("gpu-process-pool", "process-gpu-job-template.json"),
                               ("gpu-k8s-pool", "k8s-gpu-job-template.json")):
            assert pools[name].base_job_template == json.loads((ROOT / "infra" / template).read_text()), name

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}):
        assert Secret.load("deepgram-api-key").get() == KEY
        bucket = S3Bucket.load("whisperx-results")
        assert bucket.bucket_name == BUCKET
        assert bucket.credentials.aws_client_parameters.endpoint_url.startswith("http://127.0.0.1:")
        for absent in ("pyannote-api-key", "hf-token"):  # not in the environment: not saved
            with pytest.raises(ValueError):
                Secret.load(absent)

        from prefect.automations import Automation

        from deployments import automations

        for name, after in ((automations.NAME, automations.AFTER_S),
                            (automations.PENDING_NAME, automations.PENDING_AFTER_S)):
            assert f"saved    automation {name!r} ({after} s)" in bootstrapped
            saved = Automation.read(name=name)
            assert saved.enabled and saved.trigger.within.total_seconds() == after


def test_deploy_registers_prefect_yaml_deployments_with_typed_forms(server, deployed):
    with server.client() as client:
        cpu = client.read_deployment_by_name("transcribe-audio/transcribe-cpu")
        gpu = client.read_deployment_by_name("transcribe-audio/transcribe-gpu")
        batch = client.read_deployment_by_name("transcribe-batch/transcribe-batch-gpu")
        sweep = client.read_deployment_by_name("sweep-inbox/sweep-inbox")
        schedules = client.read_deployment_schedules(sweep.id)
    assert (cpu.work_pool_name, cpu.job_variables) == (
        "cpu-pool", {"env": {"WHISPERX_DEVICE": "cpu", "RESULTS_STORAGE_BLOCK": "whisperx-task-results",
                             "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}})
    assert gpu.work_pool_name == "gpu-docker-pool"
    assert gpu.job_variables["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert batch.work_pool_name == "gpu-docker-pool" and batch.job_variables == gpu.job_variables
    assert batch.parameter_openapi_schema["required"] == ["audio_files"]
    assert [s.schedule.cron for s in schedules] == ["*/5 * * * *"]  # (switched off for these tests)
    assert sweep.parameters["target"] == "transcribe-audio/transcribe-cpu"
    form = cpu.parameter_openapi_schema
    assert form["required"] == ["audio_file"]
    props = form["properties"]
    assert props["audio_file"]["type"] == "string" and props["audio_file"]["description"]
    assert props["diarization_backend"]["enum"] == ["auto", "pyannote", "pyannote-api", "segmented", "builtin"]
    assert props["num_speakers"]["anyOf"][0]["type"] == "integer"
    for secret in ("deepgram_api_key", "pyannote_api_key", "huggingface_access_token", "secret_key"):
        assert props[secret]["anyOf"][0] == {"format": "password", "type": "string", "writeOnly": True}, secret
    assert all(p.get("description") for p in props.values())


def test_process_worker_runs_transcribe_cpu_from_run_deployment(server, deployed, s3, tmp_path):
    """A worker with no credentials of its own: the Deepgram key comes from the Secret block, the
    outputs go to S3 through the S3Bucket block."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    s3.create_bucket(Bucket=BUCKET)
    worker_dir = tmp_path / "worker"  # not the checkout: the pull step must find the code
    worker_dir.mkdir()
    worker_log = tmp_path / "worker.log"
    with DeepgramServer(["ok"]) as deepgram, open(worker_log, "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--type", "process", "--limit", "1"],
            cwd=worker_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "DEEPGRAM_BASE_URL": deepgram.url,
                 "RESULTS_S3_BLOCK": "whisperx-results", "SPEECH_CACHE_DIR": str(tmp_path / "cache"),
                 "ALLOW_LOCAL_PATHS": str(DATA)})  # deployment runs read local files only under these roots
        try:
            with temporary_settings({PREFECT_API_URL: server.url}):
                flow_run = run_deployment("transcribe-audio/transcribe-cpu", timeout=600, poll_interval=1,
                                          parameters={"audio_file": str(DATA / AUDIO), "language": "en"})
        finally:
            stop(worker)
        requests = list(deepgram.requests)
    logs = worker_log.read_text()
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{logs[-6000:]}"
    assert flow_run.work_pool_name == "cpu-pool"

    # outputs in the S3Bucket block's bucket and folder; task results and cache records in the
    # whisperx-task-results block's folder (RESULTS_STORAGE_BLOCK from prefect.yaml)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    stem = Path(AUDIO).stem
    scope = f"transcripts/{stem}/{flow_run.id}/"  # the run's own key: <block folder><stem>/<flow run id>/
    assert [k for k in keys if k.startswith("transcripts/")] == [
        f"{scope}{stem}{ext}" for ext in (".deepgram.json", ".json", ".segments.json", ".srt", ".vtt")]
    cached = [k for k in keys if k.startswith("prefect-results/")]
    stages = [k for k in cached if "-" in k.split("/")[1]]
    assert {k.split("/")[1].split("-")[0] for k in stages} == {"transcribe", "align", "deepgram"}, keys
    # the rest are flow results (persisted beside the task results, for readers of the API)
    assert all(re.fullmatch(r"[0-9a-f]{32}", k.split("/")[1]) for k in set(cached) - set(stages)), keys
    assert len(cached) > len(stages)
    assert len(cached) + 5 == len(keys)
    for key in cached:  # what the cache holds carries no secret either
        assert KEY.encode() not in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    result = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{scope}{stem}.json")["Body"].read())
    manifest = json.loads((DATA / "fixtures.json").read_text())
    text = " ".join(s["text"] for s in result["segments"])
    assert wer(manifest[AUDIO]["text"], text) <= wer_limit(AUDIO)
    assert all(s["words"] for s in result["segments"])  # aligned, since confidence is matched per word
    assert isinstance(result["confidence"], dict) and isinstance(result["unclear_intervals"], list)

    # the key came from the block, and went nowhere else
    assert len(requests) == 1 and requests[0]["auth"] == f"Token {KEY}"
    assert requests[0]["query"]["language"] == ["en"]  # the transcript's language, not Deepgram's default
    with server.client() as client:
        run_logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        stored = client.read_flow_run(flow_run.id).parameters
    messages = "\n".join(r.message for r in run_logs)
    assert "tokens from Secret blocks: deepgram-api-key" in messages
    for text in (logs, messages, json.dumps(stored), json.dumps(result)):
        assert KEY not in text


def sweep_table(client, flow_run, full: bool = False) -> dict:
    """The sweep run's table artifact (what a user sees in the UI): file name -> status (or row)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    (artifact,) = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))) if a.type == "table"]
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {Path(r["file"]).name: (r if full else r["status"]) for r in rows}


SWEPT = (("a.wav", "sample_2spk.wav"), ("b.wav", "heldout_3spk.wav"), ("c.wav", "align_3spk.wav"))


def test_scheduled_sweep_deployment_feeds_the_worker(server, deployed, tmp_path):
    """prefect.yaml's sweep-inbox deployment, run by a process worker: 3 fixtures + 1 corrupt
    file -> 4 transcribe-cpu runs executed by the same worker; the 3 succeed with outputs, the
    corrupt one fails; sweeping again triggers nothing and reports the corrupt file as failed."""
    import shutil

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for name, src in SWEPT:
        shutil.copy(DATA / src, inbox / name)
    (inbox / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot really audio" * 50)
    parameters = {"source": str(inbox), "glob": "*.wav", "target": "transcribe-audio/transcribe-cpu",
                  "request": {"language": "en", "download_dir": str(out)}, "max_attempts": 1}

    with DeepgramServer(["ok"]) as deepgram, open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--type", "process", "--limit", "2"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "DEEPGRAM_BASE_URL": deepgram.url,
                 "SPEECH_CACHE_DIR": str(tmp_path / "cache"),
                 "ALLOW_LOCAL_PATHS": f"{inbox}{os.pathsep}{out}"})
        try:
            with temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
                target = client.read_deployment_by_name("transcribe-audio/transcribe-cpu")
                before = {r.id for r in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])))}

                first = run_deployment("sweep-inbox/sweep-inbox", parameters=parameters, timeout=300, poll_interval=1)
                assert first.state.is_completed(), first.state
                assert sweep_table(client, first) == {"a.wav": "triggered", "b.wav": "triggered",
                                                      "c.wav": "triggered", "corrupt.wav": "triggered"}

                deadline = time.monotonic() + 480
                while True:
                    runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[target.id]))) if r.id not in before]
                    if len(runs) == 4 and all(r.state.is_final() for r in runs):
                        break
                    assert time.monotonic() < deadline, [(r.name, r.state.name) for r in runs]
                    time.sleep(2)

                again = run_deployment("sweep-inbox/sweep-inbox", parameters=parameters, timeout=300, poll_interval=1)
                assert again.state.is_completed(), again.state
                table = sweep_table(client, again, full=True)
                assert {n: row["status"] for n, row in table.items()} == {
                    "a.wav": "already-done", "b.wav": "already-done", "c.wav": "already-done", "corrupt.wav": "failed"}
                assert "1 run(s) failed, the last Failed" in table["corrupt.wav"]["error"]
        finally:
            stop(worker)

    by_file = {Path(r.parameters["audio_file"]).name: r for r in runs}
    assert {n: r.state.type.value for n, r in by_file.items()} == {
        "a.wav": "COMPLETED", "b.wav": "COMPLETED", "c.wav": "COMPLETED", "corrupt.wav": "FAILED"}
    # each run's outputs under its own key: <download_dir>/<stem>/<flow run id>/<stem>.json
    assert {p.relative_to(out).as_posix() for p in out.glob("*/*/*.json") if p.name.count(".") == 1} \
        == {f"{stem}/{by_file[stem + '.wav'].id}/{stem}.json" for stem in ("a", "b", "c")}
    assert not list(out.glob("corrupt*/*/*"))  # the failed run wrote nothing
    manifest = json.loads((DATA / "fixtures.json").read_text())
    for name, src in SWEPT:
        stem = name.removesuffix(".wav")
        result = json.loads((out / stem / str(by_file[name].id) / f"{stem}.json").read_text())
        assert wer(manifest[src]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit(src), name


def test_a_run_whose_worker_host_is_lost_is_set_crashed_and_swept_again(server, deployed, tmp_path):
    """A swept file's transcribe-cpu run is running on worker A when A and every process it
    started are killed with SIGKILL (a lost node): no worker is left to report the run. The
    automation bootstrap saved (window cut to 45 s here) sets it Crashed once its heartbeats stop,
    while a run on worker B that lives longer than the window (60 s, beating every 30 s)
    completes; the next sweep triggers the file again and B transcribes it. A run left Pending
    (submitted by a worker lost before the run's process started) is set Crashed too."""
    import shutil

    from liveness_flow import wait
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments import automations

    window = 45
    assert server.run(sys.executable, "-m", "deployments.automations", "--after", str(window), "--pending-after",
                      str(window)).count("updated  automation") == 2
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(DATA / LOST_AUDIO, inbox / "lost.wav")  # content no other sweep here has done
    parameters = {"source": str(inbox), "glob": "*.wav", "target": "transcribe-audio/transcribe-cpu",
                  "request": {"language": "en", "download_dir": str(out)}, "max_attempts": 2}

    def start_worker(name: str, limit: int, log) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--type", "process", "--limit",
             str(limit), "--name", name], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "DEEPGRAM_BASE_URL": deepgram.url,
                 "SPEECH_CACHE_DIR": str(tmp_path / "cache"), "ALLOW_LOCAL_PATHS": f"{inbox}{os.pathsep}{out}"})

    workers: list[subprocess.Popen] = []
    with DeepgramServer(["ok"]) as deepgram, open(tmp_path / "worker.log", "w") as log, \
            temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
        try:
            wait.to_deployment(name="probe", tags=[automations.TAG], work_pool_name="cpu-pool", job_variables={
                "working_dir": str(ROOT),
                "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(automations.HEARTBEAT_S)}}).apply()
            target = client.read_deployment_by_name("transcribe-audio/transcribe-cpu")

            def triggered() -> list:
                return [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                    any_=[target.id]))) if r.parameters.get("audio_file") == str(inbox / "lost.wav")]

            workers.append(start_worker("host-a", 1, log))
            first = run_deployment("sweep-inbox/sweep-inbox", parameters=parameters, timeout=300, poll_interval=1)
            assert first.state.is_completed() and sweep_table(client, first) == {"lost.wav": "triggered"}
            (lost,) = triggered()
            deadline = time.monotonic() + 240
            while not client.read_flow_run(lost.id).state.is_running():
                assert time.monotonic() < deadline, client.read_flow_run(lost.id).state
                time.sleep(0.2)
            time.sleep(1)  # Running (which arms the automation) and maybe no heartbeat yet: still lost
            assert kill_host(workers[0]) >= 2  # the worker and the run's process
            killed = time.monotonic()
            assert client.read_flow_run(lost.id).state.is_running()  # nothing left to say otherwise

            # a run a worker submitted (Pending) and was lost with before the run's process started
            from prefect.states import Pending

            stuck = run_deployment("liveness-probe/probe", parameters={"seconds": 1}, timeout=0)
            client.set_flow_run_state(stuck.id, Pending(), force=True)
            workers.append(start_worker("host-b", 2, log))
            probe = run_deployment("liveness-probe/probe", parameters={"seconds": 60}, timeout=0)
            while not (state := client.read_flow_run(lost.id).state).is_final():
                assert time.monotonic() - killed < window + 120, state
                time.sleep(1)
            assert state.type.value == "CRASHED" and state.message == automations.MESSAGE.format(after=window), state
            assert time.monotonic() - killed >= window - 5  # after its heartbeats stopped, not before

            again = run_deployment("sweep-inbox/sweep-inbox", parameters=parameters, timeout=300, poll_interval=1)
            assert again.state.is_completed() and sweep_table(client, again) == {"lost.wav": "triggered"}
            deadline = time.monotonic() + 300
            while True:
                runs = triggered()
                if len(runs) == 2 and all(r.state.is_final() for r in runs) \
                        and client.read_flow_run(probe.id).state.is_final():
                    break
                assert time.monotonic() < deadline, [(r.name, r.state.name) for r in runs]
                time.sleep(1)
        finally:
            for worker in workers:
                stop(worker)
            print(automations.ensure())  # the module's other tests keep the default window

        states = {r.id: r.state.type.value for r in runs}
        assert states == {lost.id: "CRASHED", next(r.id for r in runs if r.id != lost.id): "COMPLETED"}, states
        probe_state = client.read_flow_run(probe.id).state
        assert probe_state.is_completed(), probe_state  # alive longer than the window: never Crashed
        stuck_state = client.read_flow_run(stuck.id).state
        assert stuck_state.type.value == "CRASHED", stuck_state
        assert stuck_state.message == automations.PENDING_MESSAGE.format(after=window)
    (redo,) = [r for r in runs if r.id != lost.id]
    assert not (out / "lost" / str(lost.id)).exists()  # the lost run wrote nothing
    result = json.loads((out / "lost" / str(redo.id) / "lost.json").read_text())
    manifest = json.loads((DATA / "fixtures.json").read_text())
    assert wer(manifest[LOST_AUDIO]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit(LOST_AUDIO)


def test_serve_py_runs_every_deployment_from_one_process(server, tmp_path):
    """The single-machine default: deployments/serve.py registers transcribe-local,
    transcribe-batch-local and (SWEEP_SOURCE set) the scheduled sweep-inbox-local, and executes
    their runs itself: a sweep run triggers a transcribe-local run that serve.py executes."""
    import shutil

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(DATA / AUDIO, inbox / "served.wav")
    log_path = tmp_path / "serve.log"
    with DeepgramServer(["ok"]) as deepgram, open(log_path, "w") as log:
        serve = subprocess.Popen(
            [sys.executable, str(ROOT / "deployments" / "serve.py")], cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**server.env, "SWEEP_SOURCE": str(inbox), "SWEEP_GLOB": "*.wav", "RESULTS_DIR": str(out),
                 "DEEPGRAM_BASE_URL": deepgram.url, "SPEECH_CACHE_DIR": str(tmp_path / "cache")})
        try:
            with temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
                deadline = time.monotonic() + 180
                names = ("transcribe-audio/transcribe-local", "transcribe-batch/transcribe-batch-local",
                         "sweep-inbox/sweep-inbox-local")
                while True:
                    try:
                        deployments = {n: client.read_deployment_by_name(n) for n in names}
                        break
                    except Exception:  # noqa: BLE001 - not registered yet
                        assert serve.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                        time.sleep(1)
                sweep = deployments["sweep-inbox/sweep-inbox-local"]
                assert [s.schedule.cron for s in client.read_deployment_schedules(sweep.id)] == ["*/5 * * * *"]
                assert sweep.parameters["source"] == str(inbox)

                swept = run_deployment("sweep-inbox/sweep-inbox-local", timeout=300, poll_interval=1)
                assert swept.state.is_completed(), log_path.read_text()[-3000:]
                assert sweep_table(client, swept) == {"served.wav": "triggered"}
                while not list(out.glob("served/*/served.json")):  # the triggered run, executed by serve.py
                    assert serve.poll() is None and time.monotonic() < deadline + 300, log_path.read_text()[-3000:]
                    time.sleep(1)
        finally:
            stop(serve)
    from deployments import automations

    assert re.search(rf"(saved|kept) +automation '{automations.NAME}'", log_path.read_text())
    result = json.loads(next(out.glob("served/*/served.json")).read_text())  # under the run's own key
    manifest = json.loads((DATA / "fixtures.json").read_text())
    assert wer(manifest[AUDIO]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit(AUDIO)


def test_cli_uses_a_local_server_that_is_already_running(server, tmp_path, deepgram):
    """With no PREFECT_API_URL the CLI runs against the Prefect server answering at
    LOCAL_PREFECT_SERVER (default http://127.0.0.1:4200/api) instead of starting a throw-away one:
    the run is that server's, and visible in its UI."""
    env = {k: v for k, v in server.env.items() if k != "PREFECT_API_URL"}
    env.update(LOCAL_PREFECT_SERVER=server.url, PREFECT_HOME=str(tmp_path / "cli-home"),
               SPEECH_CACHE_DIR=str(tmp_path / "cache"))
    (tmp_path / "cli-home").mkdir()
    # the server holds a deepgram-api-key block (bootstrap): confidence runs, against the stub
    proc = subprocess.run([sys.executable, "-m", "flows.transcribe", str(DATA / "enrol_awb.wav"), "--language", "en",
                           "--output-name", "cli-on-local-server", "--download-dir", str(tmp_path / "out")],
                          env={**env, "DEEPGRAM_BASE_URL": deepgram.url}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with server.client() as client:
        runs = client.read_flow_runs()
    assert any(r.parameters.get("output_name") == "cli-on-local-server" and r.state.is_completed() for r in runs)


FLOW_SCRIPT = """
import json, sys
from flows.transcribe import transcribe_audio
result = transcribe_audio(audio_file=sys.argv[1], language="en", align_output=True, diarization=True,
                          debug=True, download_dir=sys.argv[2])
heavy = [m for m in ("torch", "whisperx.asr", "ctranslate2", "faster_whisper", "pyannote.audio") if m in sys.modules]
print("RESULT " + json.dumps({"result": result, "heavy": heavy}))
"""


@pytest.fixture
def deepgram():
    with DeepgramServer(["ok"]) as stub:
        yield stub


def test_gpu_stages_run_in_a_warm_task_worker(server, tmp_path, deepgram):
    """GPU_TASK_WORKERS=1: two flow runs (two processes, as a process worker would start them)
    send transcribe, align and diarize to one long-lived task worker, which loads Whisper once for
    both; the flow processes never import torch or WhisperX, share their audio through the
    result storage (the worker has its own cache dir) and get what an inline run gets."""
    shared = tmp_path / "shared-results"
    # the server holds a deepgram-api-key block (bootstrap): confidence runs, against the stub
    common = {**server.env, "RESULTS_STORAGE": str(shared), "PREFECT_LOGGING_LEVEL": "INFO",
              "DEEPGRAM_BASE_URL": deepgram.url}
    log_path = tmp_path / "task-worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "deployments.task_worker", "--limit", "1"], cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**common, "SPEECH_CACHE_DIR": str(tmp_path / "worker-cache")})
    try:
        deadline = time.monotonic() + 120
        while b"serving" not in log_path.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        outputs = []
        for i, audio in enumerate(("heldout_3spk.wav", "diar_2spk.wav")):
            proc = subprocess.run(
                [sys.executable, "-c", FLOW_SCRIPT, str(DATA / audio), str(tmp_path / "out")], cwd=ROOT,
                env={**common, "GPU_TASK_WORKERS": "1", "SPEECH_CACHE_DIR": str(tmp_path / f"flow-cache-{i}")},
                capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log_path.read_text()[-3000:]
            outputs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    finally:
        stop(worker)
    worker_log = log_path.read_text()
    assert worker_log.count("loaded Whisper") == 1, worker_log[-3000:]  # one load for both runs
    manifest = json.loads((DATA / "fixtures.json").read_text())
    for out, audio in zip(outputs, ("heldout_3spk.wav", "diar_2spk.wav")):
        assert out["heavy"] == []  # the flow process only orchestrated
        result = out["result"]
        assert wer(manifest[audio]["text"], " ".join(s["text"] for s in result["segments"])) <= wer_limit(audio)
        assert result["alignment"]["backend"] == "pocketsphinx" and result["speakers"]
    # the worker loaded its models for the first file; the second found them loaded
    assert outputs[0]["result"]["debug"]["model_loads"] > 0 and outputs[1]["result"]["debug"]["model_loads"] == 0
    inline = subprocess.run(  # the same request run inline, in a process of its own, for comparison
        [sys.executable, "-c", FLOW_SCRIPT, str(DATA / "heldout_3spk.wav"), str(tmp_path / "out-inline")], cwd=ROOT,
        env={**server.env, "SPEECH_CACHE_DIR": str(tmp_path / "inline-cache"), "DEEPGRAM_BASE_URL": deepgram.url},
        capture_output=True, text=True, timeout=600)
    assert inline.returncode == 0, inline.stderr[-3000:]
    inline_out = json.loads(inline.stdout.split("RESULT ", 1)[1])
    assert inline_out["heavy"]  # inline, the flow process did the GPU work itself
    for key in ("segments", "speakers", "detected_language", "alignment"):
        assert inline_out["result"][key] == outputs[0]["result"][key], key
    shas = sorted(hashlib.sha256((DATA / a).read_bytes()).hexdigest() for a in ("heldout_3spk.wav", "diar_2spk.wav"))
    assert sorted(p.name for p in (shared / "audio").iterdir()) == shas  # shared once per content
    assert sorted(p.stem for p in (tmp_path / "worker-cache" / "audio").glob("*.npy")) == shas  # decoded there


def _processes_of(flow_run_id) -> list[int]:
    """Processes running the flow run (Prefect's runner gives each its id in the environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _stalled_hub_env(slow_server: str, tmp_path: Path, inbox: Path, out: Path) -> dict[str, str]:
    """A run's environment where its Whisper model download stalls (one byte a second)."""
    return {"ALLOW_LOCAL_PATHS": f"{inbox}{os.pathsep}{out}", "RESULTS_DIR": str(out), "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": f"{slow_server}/stalled", "HF_HOME": str(tmp_path / "hf"),
            "SPEECH_CACHE_DIR": str(tmp_path / "cache")}


def _start_serve(server, tmp_path: Path, log, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "deployments" / "serve.py")], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**server.env, **env})


def _wait_registered(client, name: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.read_deployment_by_name(name)
            return
        except Exception:  # noqa: BLE001 - not registered yet
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)


def test_a_deployment_run_stuck_in_a_stage_is_failed_and_its_process_ended(server, slow_server, tmp_path):
    """A deployment run whose stage never returns (here: its Whisper model downloaded from a hub
    that stopped answering, one byte a second, so no read times out) is not left running: past its
    deadline (GPU_TASK_TIMEOUT) and the grace (WATCHDOG_GRACE, cut to 5 s), its watchdog sets it
    Failed with the reason and ends its process; serve.py goes on, and no output is written."""
    import shutil

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    GRACE = 5

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(DATA / AUDIO, inbox / "stuck.wav")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        serve = _start_serve(server, tmp_path, log, {**_stalled_hub_env(slow_server, tmp_path, inbox, out),
                                                     "GPU_TASK_TIMEOUT": "1", "WATCHDOG_GRACE": str(GRACE)})
        try:
            with temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
                deadline = time.monotonic() + 180
                _wait_registered(client, "transcribe-audio/transcribe-local", serve, log_path)
                run = run_deployment("transcribe-audio/transcribe-local", timeout=0, parameters={
                    "audio_file": str(inbox / "stuck.wav"), "language": "en", "model": "tiny.en"})
                started = None
                while True:
                    state = client.read_flow_run(run.id).state
                    if state.is_running() and started is None:
                        started = time.monotonic()
                    if state.is_final():
                        break
                    assert serve.poll() is None and time.monotonic() < deadline + GRACE + 120, \
                        log_path.read_text()[-3000:]
                    time.sleep(1)
                took = time.monotonic() - started
                assert state.is_failed() and "deadline" in state.message and "was ended" in state.message, state
                assert f"by more than {GRACE} s (WATCHDOG_GRACE)" in state.message, state.message
                assert took >= GRACE  # the watchdog waits out the grace: stages may still stop on their own
                for _ in range(30):  # the runner reaps its child
                    if not _processes_of(run.id):
                        break
                    time.sleep(1)
                assert not _processes_of(run.id), "the stuck run's process is still running"
                assert serve.poll() is None, log_path.read_text()[-3000:]  # serve.py goes on
                assert client.read_flow_run(run.id).state.is_failed()  # not replaced by Crashed
        finally:
            stop(serve)
    assert not [f for f in out.rglob("*") if f.is_file()]


@pytest.mark.parametrize("starter", ["serve.py", "process worker"])
def test_a_run_whose_worker_is_killed_ends_crashed_at_once(starter, request, server, slow_server, tmp_path):
    """serve.py or a process worker is killed with SIGKILL (the OOM killer, an operator) while a
    deployment run it started is working (here: downloading its model from a stalled hub), its
    run's process left alive: the run does not go on unseen (a restarted worker would not count
    it, no one could cancel or reap it). Within seconds its own process stops it, sets it Crashed
    naming the cause, and ends; nothing is written."""
    import shutil

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(DATA / AUDIO, inbox / "orphan.wav")
    env = {**_stalled_hub_env(slow_server, tmp_path, inbox, out), "GPU_TASK_TIMEOUT": "600"}
    log_path = tmp_path / "starter.log"
    if starter == "serve.py":
        name = "transcribe-audio/transcribe-local"
        with open(log_path, "w") as log:
            proc = _start_serve(server, tmp_path, log, env)
    else:
        request.getfixturevalue("deployed")
        name = "transcribe-audio/transcribe-cpu"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--type", "process", "--limit", "1"],
                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**server.env, **env, "PREFECT_WORKER_QUERY_SECONDS": "1"})
    try:
        with temporary_settings({PREFECT_API_URL: server.url}), server.client() as client:
            _wait_registered(client, name, proc, log_path)
            run = run_deployment(name, timeout=0, parameters={
                "audio_file": str(inbox / "orphan.wav"), "language": "en", "model": "tiny.en",
                "download_dir": str(out)})
            deadline = time.monotonic() + 240
            while not (state := client.read_flow_run(run.id).state).is_running():
                assert not state.is_final() and time.monotonic() < deadline, (state, log_path.read_text()[-3000:])
                time.sleep(0.5)
            time.sleep(3)  # into the stalled download
            (running,) = _processes_of(run.id)
            os.kill(proc.pid, signal.SIGKILL)  # the worker alone: its run's process lives on
            killed = time.monotonic()
            while not (state := client.read_flow_run(run.id).state).is_final() and time.monotonic() - killed < 60:
                time.sleep(0.5)
            took = time.monotonic() - killed
            cause = f"the process that started this run (pid {proc.pid}: serve.py or its worker) ended"
            assert state.is_crashed() and cause in state.message, state  # Prefect's Crashed names it ...
            assert took < 30, took
            while not state.message.startswith(cause) and time.monotonic() - killed < 60:  # ... then it alone
                time.sleep(0.5)
                state = client.read_flow_run(run.id).state
            assert state.is_crashed() and state.message.startswith(cause), state
            for _ in range(30):
                if not process_running(running):
                    break
                time.sleep(0.5)
            assert not process_running(running), f"the run's process {running} outlived its worker"
    finally:
        stop(proc)
    assert not [f for f in out.rglob("*") if f.is_file()]

