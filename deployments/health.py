"""``python -m deployments.health``: exit 0 when this container can do its work, 1 (with one line
on stderr) when not. The image's HEALTHCHECK and the Kubernetes probes run it.

* ``PREFECT_API_URL`` set: its ``/health`` answers within 5 s (workers, task workers and flow
  runs cannot work without it);
* ``WORKER_READY_FILE`` set (a task worker): the file exists, i.e. the worker has loaded its
  models (``--preload``) and is serving;
* ``ENDPOINT_HEALTH_URL`` set (the RunPod-compatible endpoint): that URL answers 200.
"""
from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import Optional


def problem() -> Optional[str]:
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if api:
        try:
            headers = {}
            auth = os.environ.get("PREFECT_API_AUTH_STRING")
            if auth:
                import base64

                headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
            urllib.request.urlopen(urllib.request.Request(api.rstrip("/") + "/health", headers=headers), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return f"the Prefect API at {api} does not answer: {type(exc).__name__}"
    ready = os.environ.get("WORKER_READY_FILE", "").strip()
    if ready and not Path(ready).exists():
        return f"the task worker is not serving yet (no {ready})"
    endpoint = os.environ.get("ENDPOINT_HEALTH_URL", "").strip()
    if endpoint:
        try:
            urllib.request.urlopen(endpoint, timeout=5)
        except Exception as exc:  # noqa: BLE001
            return f"the endpoint at {endpoint} does not answer: {type(exc).__name__}"
    return None


def main() -> int:
    found = problem()
    if found:
        print(f"unhealthy: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
