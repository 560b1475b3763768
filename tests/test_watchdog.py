"""The watchdog that ends a process whose run is stuck past its deadline where no check is
reached (a stage that never returns): a task worker, or a deployment run's own process."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUCK = """
import sys, threading
from flows.runguard import RunGuard, start_watchdog
start_watchdog(before_exit=lambda ids: open(sys.argv[1], "w").write(",".join(ids)), interval=0.1, grace=0.5)
with RunGuard("run-1", 0.2, "a stuck stage", read_state=lambda: None):
    threading.Event().wait()  # never returns, like a native call or a stalled download
"""


def test_a_run_stuck_past_its_deadline_ends_its_process(tmp_path):
    told = tmp_path / "told"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK, str(told)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    took = time.monotonic() - t0
    from flows.runguard import WATCHDOG_EXIT

    assert proc.returncode == WATCHDOG_EXIT, proc.stderr[-2000:]
    assert told.read_text() == "run-1"  # told which runs before the process ended
    assert "stuck past their deadline" in proc.stderr
    assert took < 30  # deadline 0.2 s + grace 0.5 s, after the imports


def test_a_run_that_finishes_in_time_leaves_its_process_alone(tmp_path):
    code = STUCK.replace("threading.Event().wait()", "import time; time.sleep(0.1)") + "\nimport time; time.sleep(1.5)\n"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "told")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "told").exists()
