#!/usr/bin/env bash
# Start a local MLflow tracking server for bigmodel, bound to 127.0.0.1 only.
#
#   infra/mlflow-server.sh [PORT] [extra `mlflow server` options...]
#
# PORT: first argument, else $MLFLOW_PORT, else 5000.
# Backend store: $MLFLOW_BACKEND_STORE_URI (e.g. postgresql://user:pw@127.0.0.1:5432/mlflow),
#   else sqlite:///<repo root>/mlflow.db (the same file bigmodel writes without a server).
# Artifacts: proxied by the server (--serve-artifacts) into $MLFLOW_ARTIFACTS_DESTINATION
#   (a folder or an s3:// URI), else <repo root>/mlartifacts.
# One worker process, so it fits a 2-core laptop. Extra arguments go to `mlflow server` as they
# are (e.g. --app-name basic-auth, --allowed-hosts). The server replaces this shell (exec), so
# SIGINT/SIGTERM sent to this script reach it directly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

port="${1:-${MLFLOW_PORT:-5000}}"
if [[ ! "$port" =~ ^[0-9]+$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
    echo "error: port must be an integer between 1 and 65535, got '$port'" >&2
    exit 2
fi
port=$((10#$port))
(( $# > 0 )) && shift

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$root/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$root/mlartifacts}"

if [[ -x "$root/.venv/bin/mlflow" ]]; then
    mlflow_bin="$root/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
    mlflow_bin="$(command -v mlflow)"
else
    echo "error: mlflow not found: run 'make install' (creates $root/.venv) or put mlflow on PATH" >&2
    exit 2
fi

export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
# MLflow 3.17 also starts a job runner (7 huey consumer processes, for GenAI evaluation jobs that
# bigmodel does not use) unless told not to: off by default here, it costs seconds and memory.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec "$mlflow_bin" server \
    --host 127.0.0.1 \
    --port "$port" \
    --workers 1 \
    --backend-store-uri "$backend" \
    --serve-artifacts \
    --artifacts-destination "$artifacts" \
    "$@"
