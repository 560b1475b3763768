"""A flow that only waits, for tests/test_worker.py: a live run that outlasts the unresponsive-run
window under test, beating every 30 s, must not be set Crashed."""
from __future__ import annotations

import time

from prefect import flow


@flow(name="liveness-probe")
def wait(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
