"""The project installs as a package (issue 21): a wheel built from pyproject.toml, installed into
a fresh venv in another folder, gives the console scripts on PATH and imports from anywhere, and
its CLI transcribes a file there: no repository checkout on sys.path, no PYTHONPATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["whisperx-prefect", "whisperx-prefect-endpoint", "whisperx-prefect-worker", "whisperx-prefect-serve",
           "whisperx-prefect-handler"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A venv in a temporary folder with only the built wheel installed (--no-deps, --no-index);
    the pinned dependencies come from this test's venv through a .pth line, as if installed."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    for package in ("speech", "tasks", "flows", "deployments"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("whisperx_prefect_pipeline-*.whl")
    venv = tmp / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "pinned-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, elsewhere, env


def test_every_console_script_is_on_path_and_imports_come_from_the_install(fresh):
    venv, elsewhere, env = fresh
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), script
    for script in SCRIPTS[:4]:
        shown = subprocess.run([script, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (script, shown.stderr[-2000:])
    where = subprocess.run(["python", "-c", "import flows.transcribe, speech, deployments.runpod_handler as h; "
                            "from speech.speakers import campplus, segmentation; import os; "
                            "print(flows.transcribe.__file__); print(speech.__file__); print(callable(h.serve)); "
                            "print(campplus.TELEPHONE_FRONT_END.is_file(), "
                            "os.path.isfile(segmentation.TELEPHONE_WEIGHTS))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    paths = where.stdout.split()
    assert all(p.startswith(str(venv)) for p in paths[:2]), paths  # the installed copy, not the checkout
    assert paths[2:] == ["True", "True", "True"]  # the telephone-band students ship in the wheel


def test_the_installed_cli_transcribes_from_another_folder(fresh, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    venv, elsewhere, env = fresh
    shutil.copy(DATA / "enrol_slt.wav", elsewhere / "talk.wav")
    done = subprocess.run(["whisperx-prefect", "talk.wav", "--language", "en", "--download-dir", "out"], cwd=elsewhere,
                          env={**env, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (elsewhere / "out").iterdir()) == [
        "talk.json", "talk.segments.json", "talk.srt", "talk.vtt"]


def test_the_image_serves_every_entry_point_and_keeps_its_models_outside_mounts(prefect_harness, tmp_path):
    """Read as Docker and Kubernetes read them: runpod is a runtime requirement (the handler's
    loop), the project is pip-installed (console scripts), a HEALTHCHECK and the task worker's
    probes run deployments.health, and the preloaded model folder lies outside every mounted
    path (compose volumes, the docker pool's binds, the k8s mounts). The health check itself:
    healthy against a live API, unhealthy against a dead one or before the worker is ready."""
    import json
    import re

    import yaml
    from prefect.settings import PREFECT_API_URL

    assert re.search(r"^runpod==1\.10\.\d+$", (ROOT / "requirements.txt").read_text(), re.M)
    docker = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"RUN pip install --no-cache-dir --no-deps --no-build-isolation \.", docker)
    assert re.search(r'HEALTHCHECK .*CMD \["python", "-m", "deployments\.health"\]', docker)  # exec form (hadolint)
    model_dir = re.search(r"WHISPERX_MODEL_DIR=(\S+)", docker).group(1)
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    mounts = [v.split(":")[1] for s in compose["services"].values() for v in s.get("volumes", []) if ":" in v]
    template = json.loads((ROOT / "infra" / "docker-gpu-job-template.json").read_text())
    mounts += [b.split(":")[1] for b in template["variables"]["properties"]["volumes"]["default"]]
    worker = yaml.safe_load((ROOT / "infra" / "k8s-task-worker.yaml").read_text())
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    mounts += [m["mountPath"] for m in container["volumeMounts"]]
    assert mounts and not any(model_dir == m or model_dir.startswith(m.rstrip("/") + "/") for m in mounts), (model_dir, mounts)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["python", "-m", "deployments.health"], probe
    assert {"name": "WORKER_READY_FILE", "value": "/tmp/worker-ready"} in container["env"]

    def health(**env):
        clean = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "WORKER_READY_FILE")}
        return subprocess.run([sys.executable, "-m", "deployments.health"], cwd=ROOT, env={**clean, **env},
                              capture_output=True, text=True, timeout=60)

    assert health(PREFECT_API_URL=PREFECT_API_URL.value()).returncode == 0
    dead = health(PREFECT_API_URL="http://127.0.0.1:9/api")
    assert dead.returncode == 1 and "does not answer" in dead.stderr
    ready = tmp_path / "ready"
    assert health(WORKER_READY_FILE=str(ready)).returncode == 1
    ready.write_text("worker")
    assert health(WORKER_READY_FILE=str(ready)).returncode == 0
