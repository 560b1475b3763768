#!/usr/bin/env bash
# Create (or update) the work pools this project deploys to, from the job templates in infra/,
# register the prefect-aws block types, and save credentials from the environment as blocks
# (python -m deployments.blocks): Secret blocks deepgram-api-key / pyannote-api-key / hf-token
# from DEEPGRAM_API_KEY / PYANNOTE_API_KEY / HF_TOKEN, AwsCredentials whisperx-s3 and
# S3Bucket whisperx-results (outputs) + whisperx-task-results (task results and cache records,
# named by the job templates' RESULTS_STORAGE_BLOCK) from AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY / S3_ENDPOINT_URL / RESULTS_BUCKET. Unset variables are skipped; values
# are never printed.
#
#   PREFECT_API_URL=http://localhost:4200/api infra/bootstrap.sh [--compose] [POOL ...]
#
# POOL: cpu          cpu-pool          process     Prefect's default process template
#       docker-gpu   gpu-docker-pool   docker      infra/docker-gpu-job-template.json
#       process-gpu  gpu-process-pool  process     infra/process-gpu-job-template.json
#       k8s-gpu      gpu-k8s-pool      kubernetes  infra/k8s-gpu-job-template.json
#       all          every pool above
# Default: cpu docker-gpu (the pools prefect.yaml deploys to). Re-running is safe: existing
# pools get the template again (--overwrite).
#
# --compose  for infra/docker-compose.yml: flow-run containers of gpu-docker-pool join the
#            compose network (whisperx-prefect) and get its MinIO settings as default env;
#            the S3 blocks point at the compose MinIO (http://minio:9000).
#
# Also saves the automations deployments/automations.py describes: a flow run tagged whisperx
# that sends no heartbeat for UNRESPONSIVE_AFTER_S seconds (default 120; its runs beat every
# 30 s), or stays Pending for STUCK_PENDING_AFTER_S (default 1800), is set Crashed, so a lost
# worker host leaves no run Running or Pending for ever.
#
# Environment: PREFECT (CLI to use; default: `prefect` on PATH, else .venv/bin/prefect),
# PYTHON (default python3), BLOCKS_PYTHON (a Python with this project's requirements; default:
# the python next to PREFECT), COMPOSE_NETWORK, RESULTS_BUCKET, MINIO_ROOT_USER,
# MINIO_ROOT_PASSWORD (required with --compose, as in infra/.env), UNRESPONSIVE_AFTER_S,
# STUCK_PENDING_AFTER_S.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

usage() { sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

if [[ -z "${PREFECT:-}" ]]; then
  if command -v prefect >/dev/null 2>&1; then
    PREFECT=prefect
  elif [[ -x "$ROOT/.venv/bin/prefect" ]]; then
    PREFECT="$ROOT/.venv/bin/prefect"
  else
    echo "error: no prefect CLI found (run \`make setup\`, or set PREFECT=/path/to/prefect)" >&2
    exit 1
  fi
fi
PYTHON="${PYTHON:-python3}"

compose=0
pools=()
for arg in "$@"; do
  case "$arg" in
    --compose) compose=1 ;;
    -h|--help) usage; exit 0 ;;
    all) pools+=(cpu docker-gpu process-gpu k8s-gpu) ;;
    cpu|docker-gpu|process-gpu|k8s-gpu) pools+=("$arg") ;;
    *) echo "error: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ ${#pools[@]} -eq 0 ]]; then
  pools=(cpu docker-gpu)
fi

api_url="$("$PREFECT" config view 2>/dev/null | sed -n "s/^PREFECT_API_URL='\([^']*\)'.*/\1/p")"
if [[ -z "$api_url" ]]; then
  echo "error: PREFECT_API_URL is not set: pools would go to a throw-away ephemeral server." >&2
  echo "       e.g. PREFECT_API_URL=http://localhost:4200/api $0 $*" >&2
  exit 1
fi
echo "Prefect API: $api_url"

tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT

# Docker GPU template, with the compose network and MinIO settings when --compose is given.
docker_template() {
  if [[ $compose -eq 0 ]]; then
    echo "$HERE/docker-gpu-job-template.json"
    return
  fi
  local out="$tmpdir/docker-gpu-job-template.compose.json"
  COMPOSE_NETWORK="${COMPOSE_NETWORK:-whisperx-prefect}" \
  RESULTS_BUCKET="${RESULTS_BUCKET:-transcripts}" \
  MINIO_ROOT_USER="${MINIO_ROOT_USER:?set MINIO_ROOT_USER (infra/.env)}" \
  MINIO_ROOT_PASSWORD="${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD (infra/.env)}" \
  "$PYTHON" - "$HERE/docker-gpu-job-template.json" "$out" <<'PY'
import json, os, sys

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    template = json.load(f)
props = template["variables"]["properties"]
props["networks"]["default"] = [os.environ["COMPOSE_NETWORK"]]
props["env"]["default"] = {
    **props["env"].get("default", {}),
    "RESULTS_BUCKET": os.environ["RESULTS_BUCKET"],
    "RESULTS_STORAGE": f"s3://{os.environ['RESULTS_BUCKET']}/prefect-results",
    "AWS_ENDPOINT_URL_S3": "http://minio:9000",
    "AWS_ACCESS_KEY_ID": os.environ["MINIO_ROOT_USER"],
    "AWS_SECRET_ACCESS_KEY": os.environ["MINIO_ROOT_PASSWORD"],
    "AWS_DEFAULT_REGION": "us-east-1",
}
with open(dst, "w") as f:
    json.dump(template, f, indent=2)
PY
  echo "$out"
}

create_pool() {  # name type [template]
  local name="$1" type="$2" template="${3:-}"
  local args=(work-pool create "$name" --type "$type" --overwrite)
  if [[ -n "$template" ]]; then
    args+=(--base-job-template "$template")
  fi
  echo "==> $name ($type${template:+, $(basename "$template")})"
  "$PREFECT" --no-prompt "${args[@]}"
}

for pool in "${pools[@]}"; do
  case "$pool" in
    cpu)         create_pool cpu-pool process ;;
    docker-gpu)  create_pool gpu-docker-pool docker "$(docker_template)" ;;
    process-gpu) create_pool gpu-process-pool process "$HERE/process-gpu-job-template.json" ;;
    k8s-gpu)     create_pool gpu-k8s-pool kubernetes "$HERE/k8s-gpu-job-template.json" ;;
  esac
done

# S3 / MinIO credentials and API tokens as Prefect blocks (prefect-aws is pinned in requirements.txt).
echo "==> prefect-aws block types"
"$PREFECT" --no-prompt block register -m prefect_aws

echo "==> credential blocks (from the environment)"
BLOCKS_PYTHON="${BLOCKS_PYTHON:-$(dirname "$(command -v "$PREFECT")")/python}"
if [[ $compose -eq 1 ]]; then  # blocks are read by flow runs inside the compose network
  export S3_ENDPOINT_URL=http://minio:9000 AWS_DEFAULT_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID="${MINIO_ROOT_USER:?set MINIO_ROOT_USER (infra/.env)}" \
    AWS_SECRET_ACCESS_KEY="${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD (infra/.env)}" \
    RESULTS_BUCKET="${RESULTS_BUCKET:-transcripts}"
fi
(cd "$ROOT" && "$BLOCKS_PYTHON" -m deployments.blocks)

# a run whose worker host is lost (no process left to report it) is set Crashed instead of
# staying Running (or Pending) for ever
echo "==> automations for lost flow runs"
(cd "$ROOT" && "$BLOCKS_PYTHON" -m deployments.automations ${UNRESPONSIVE_AFTER_S:+--after "$UNRESPONSIVE_AFTER_S"} \
  ${STUCK_PENDING_AFTER_S:+--pending-after "$STUCK_PENDING_AFTER_S"})

cat <<'EOF'

Work pools and blocks are ready. Next:
  prefect deploy --all                                    # deployments from prefect.yaml
  prefect worker start --pool cpu-pool --type process     # unless docker-compose runs the workers
  prefect worker start --pool gpu-docker-pool --type docker   # needs: pip install prefect-docker==0.7.4

Flow runs use the tokens in the Secret blocks when their worker has no DEEPGRAM_API_KEY /
PYANNOTE_API_KEY / HF_TOKEN env var; a worker with RESULTS_S3_BLOCK=whisperx-results writes
outputs to that bucket with the block's credentials.
EOF
