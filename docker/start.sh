#!/usr/bin/env bash
# Container start-up: run the bridge (`python -m bridge serve`), which starts the image's
# tritonserver (bound to 127.0.0.1) and serves the API on API_HOST:API_PORT (0.0.0.0:7861).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: start.sh [--help] [SERVE_OPTIONS...]

Starts the GPU worker: `python -m bridge serve SERVE_OPTIONS...`. The bridge launches
tritonserver (TRITONSERVER_BIN, default /opt/tritonserver/bin/tritonserver) over MODEL_REPOSITORY,
consumes the Redis queues and serves the HTTP API.

Environment (defaults shown; see docs/DEPLOY.md for the full list):
  API_HOST=0.0.0.0 API_PORT=7861      HTTP API (GET /health, GET /ready, GET /metrics, chat routes)
  TRITON_HOST=127.0.0.1               Triton HTTP/gRPC/metrics ports stay inside the container
  TRITONSERVER_BIN=/opt/tritonserver/bin/tritonserver
  MODELS_DIR=/workspace/models        model weights (the RunPod volume)
  REDIS_URL, SUPABASE_URL, SUPABASE_SERVICE_KEY, JOB_CALLBACK_SECRET, WORKER_API_KEY, API_OPEN_ROUTES
  PYTHON=python                       interpreter to run the bridge with

Other commands run in place of this script, e.g.:
  docker run --rm IMAGE python -m bridge --help
USAGE
}

case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
esac

# The image's tritonserver; outside the image fall back to PATH / the pytriton wheel (launcher).
export TRITONSERVER_BIN="${TRITONSERVER_BIN:-/opt/tritonserver/bin/tritonserver}"
if [[ ! -x "${TRITONSERVER_BIN}" ]]; then
  echo "start.sh: ${TRITONSERVER_BIN} not found; letting the launcher find tritonserver" >&2
  unset TRITONSERVER_BIN
fi
export API_HOST="${API_HOST:-0.0.0.0}"
export API_PORT="${API_PORT:-7861}"
export TRITON_HOST="${TRITON_HOST:-127.0.0.1}"

# Docker's default /dev/shm (64 MB) is too small for video outputs of the Python backend.
shm_kb="$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $2}')" || shm_kb=""
if [[ -n "${shm_kb}" && "${shm_kb}" -lt 1048576 ]]; then
  echo "start.sh: WARNING: /dev/shm is $((shm_kb / 1024)) MB; run the container with --shm-size=2g" >&2
fi

if [[ -n "${OUTPUT_DIR:-}" ]]; then
  mkdir -p "${OUTPUT_DIR}"
fi

exec "${PYTHON:-python}" -m bridge serve "$@"
