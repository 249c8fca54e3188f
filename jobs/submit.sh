#!/usr/bin/env bash
# Submit smpp stages to a Ray cluster with `ray job submit`, and follow, inspect or stop them.
#
#   jobs/submit.sh [--id ID] [--no-wait] pipeline CONFIG [ARGS...]
#        python jobs/pipeline.py --config jobs/configs/CONFIG.yaml ARGS...   (CONFIG: name or path)
#   jobs/submit.sh [--id ID] [--no-wait] run [--] COMMAND...
#        any entrypoint, e.g.  run python jobs/train.py --config jobs/configs/demo.yaml
#   jobs/submit.sh logs ID [--follow] | status ID | stop ID | list
#   jobs/submit.sh runtime-env          print the runtime env JSON that submissions use
#
# Needs RAY_ADDRESS (the dashboard, http://HEAD:8265) and, with token auth, RAY_AUTH_MODE=token
# plus RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; `source cluster/.local/env` after
# `cluster/local.sh up` sets all of them. The repository is uploaded as the job's working dir
# (without .venv, runs/, .git and caches). The client's MLFLOW_TRACKING_URI and the variables
# named in SMPP_FORWARD_ENV (space separated, e.g. "AWS_REGION HF_HOME") are passed to the job
# as runtime-env env_vars: the cluster does not see the client's environment otherwise.
# Extra `ray job submit` options go in SMPP_SUBMIT_OPTS (e.g. "--entrypoint-num-cpus 1").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
if [[ -x "$VENV/bin/ray" ]]; then RAY="$VENV/bin/ray"; PY="$VENV/bin/python"; else RAY=ray; PY=python3; fi

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
need_address() {
  [[ -n "${RAY_ADDRESS:-}" ]] || { echo "submit.sh: RAY_ADDRESS is not set (source cluster/.local/env?)" >&2; exit 2; }
}

# The runtime env: what to leave out of the upload and which client variables the job needs.
# The upload leaves .git out, so the checkout's commit travels as SMPP_GIT_COMMIT (MLflow's
# source.git.commit tag and the report's run facts).
runtime_env_json() {
  SMPP_GIT_COMMIT="${SMPP_GIT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)}" "$PY" - <<'EOF'
import json, os
names = ["MLFLOW_TRACKING_URI", "SMPP_GIT_COMMIT"] + os.environ.get("SMPP_FORWARD_ENV", "").split()
env_vars = {n: os.environ[n] for n in names if os.environ.get(n)}
print(json.dumps({
    "excludes": [".venv", "runs", ".git", "cluster/.local", "**/__pycache__", "*.egg-info",
                 ".pytest_cache", ".ruff_cache", "bench/out", "mlruns", "mlruns.db"],
    "env_vars": env_vars,
}))
EOF
}

submit() {  # submit COMMAND...
  need_address
  local opts=()
  [[ -n "$ID" ]] && opts+=(--submission-id "$ID")
  [[ "$NO_WAIT" == 1 ]] && opts+=(--no-wait)
  # shellcheck disable=SC2206
  [[ -n "${SMPP_SUBMIT_OPTS:-}" ]] && opts+=($SMPP_SUBMIT_OPTS)
  cd "$REPO"
  exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . \
    --runtime-env-json "$(runtime_env_json)" "${opts[@]}" -- "$@"
}

ID="" NO_WAIT=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --id) ID="$2"; shift 2 ;;
    --no-wait) NO_WAIT=1; shift ;;
    *) break ;;
  esac
done

case "${1:-}" in
  pipeline)
    [[ $# -ge 2 ]] || usage
    config="$2"; shift 2
    [[ "$config" == *.yaml || "$config" == */* ]] || config="jobs/configs/$config.yaml"
    [[ -f "$REPO/$config" ]] || { echo "submit.sh: no config file $REPO/$config" >&2; exit 2; }
    submit python jobs/pipeline.py --config "$config" "$@" ;;
  run)
    shift
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    submit "$@" ;;
  logs)
    [[ $# -ge 2 ]] || usage
    need_address; exec "$RAY" job logs --address "$RAY_ADDRESS" "${@:2}" ;;
  status)
    [[ $# -eq 2 ]] || usage
    need_address; exec "$RAY" job status --address "$RAY_ADDRESS" "$2" ;;
  stop)
    [[ $# -eq 2 ]] || usage
    need_address; exec "$RAY" job stop --address "$RAY_ADDRESS" "$2" ;;
  list)
    need_address; exec "$RAY" job list --address "$RAY_ADDRESS" ;;
  runtime-env)
    runtime_env_json ;;
  *) usage ;;
esac
