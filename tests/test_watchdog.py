"""The watchdog that ends a process whose run is stuck past its deadline where no check is
reached (a stage that never returns): a task worker, or a deployment run's own process; and the
watch that ends a deployment run's process when the worker that started it dies (end to end on
serve.py and a process worker: tests/test_worker.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_running

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


ORPHAN = """
import os, sys, time
from pathlib import Path
import flows.runguard as rg
out = Path(sys.argv[1])
rg._set_crashed = lambda ids, reason: (out / "crashed").write_text(",".join(ids) + "\\n" + reason)
rg.end_with_starter("run-1", interval=0.1, grace=float(sys.argv[2]))
(out / "pid").write_text(str(os.getpid()))
while True:
    try:
        time.sleep(100)
    except rg.StarterGone:
        (out / "stopped").write_text("yes")
        if sys.argv[3] == "unwinds":
            raise SystemExit(3)
        # else it is swallowed, as by native code that never returns
"""
STARTER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', *sys.argv[1:]]); time.sleep(600)"


@pytest.mark.parametrize("run", ["unwinds", "never returns"])
def test_a_run_whose_starter_dies_is_stopped_crashed_and_its_process_ended(run, tmp_path):
    """The process that started a run (serve.py, a process worker) is killed with SIGKILL: the
    run's main thread is stopped and the run set Crashed with the cause; a run that does not stop
    within the grace is set Crashed and its process ended all the same."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, ORPHAN, str(tmp_path), "1.0", run], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists():
            assert starter.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        pid = int((tmp_path / "pid").read_text())
        time.sleep(0.5)
        assert not (tmp_path / "stopped").exists()  # its starter alive: the run goes on
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
        while process_running(pid):
            assert time.monotonic() < deadline, "the run's process outlived its starter"
            time.sleep(0.1)
    finally:
        if starter.poll() is None:
            starter.kill()
    assert (tmp_path / "stopped").read_text() == "yes"
    ids, reason = (tmp_path / "crashed").read_text().split("\n", 1)
    assert ids == "run-1" and f"the process that started this run (pid {starter.pid}" in reason

