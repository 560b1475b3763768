"""prefect.yaml and the work-pool job templates, validated by Prefect's own models."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_parses_with_prefects_model():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"transcribe-cpu", "transcribe-gpu", "sweep-inbox"}
    gpu = by_name["transcribe-gpu"].work_pool.job_variables
    assert gpu["env"]["WHISPERX_DEVICE"] == "cuda"
    assert gpu["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    for d in model.deployments:  # every entrypoint names a real flow function
        path, func = d.entrypoint.split(":")
        assert f"def {func}(" in (ROOT / path).read_text()


def test_process_gpu_template_renders_with_the_workers_configuration(prefect_harness):
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((ROOT / "infra" / "process-gpu-job-template.json").read_text())
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {}))
    assert "CUDA_VISIBLE_DEVICES" in config.env


def test_gpu_templates_request_a_gpu():
    docker = json.loads((ROOT / "infra" / "docker-gpu-job-template.json").read_text())
    k8s = json.loads((ROOT / "infra" / "k8s-gpu-job-template.json").read_text())
    docker_defaults = json.dumps(docker["variables"]["properties"])
    assert "device_requests" in docker_defaults and "gpu" in docker_defaults
    assert "nvidia.com/gpu" in json.dumps(k8s)
