#!/usr/bin/env bash
# Screenshots for the README, taken from a finished pipeline's real report and MLflow UI:
#   bash docs/screenshots.sh runs/demo
# Needs headless Chromium (`make test` installs the Debian package as root). The MLflow UI runs
# on 127.0.0.1 in its own process group, which is stopped (by its group id) at the end.
set -euo pipefail
run=${1:-runs/demo}
here=$(cd "$(dirname "$0")" && pwd)
bin=${VENV:-$here/../.venv}/bin
shots=$here/screenshots
port=${PORT:-5077}
mkdir -p "$shots"
browser() { chromium --headless --no-sandbox --disable-gpu --hide-scrollbars "$@" >/dev/null 2>&1; }

report=$(cd "$run/report" && pwd)/report.html
browser --window-size=1400,1800 --screenshot="$shots/report-top.png" "file://$report"

setsid "$bin/mlflow" ui --backend-store-uri "sqlite:///$(cd "$run" && pwd)/mlruns.db" \
  --host 127.0.0.1 --port "$port" --workers 1 >"$shots/.mlflow-ui.log" 2>&1 &
ui=$!
trap 'kill -- -$ui 2>/dev/null || true' EXIT
for _ in $(seq 180); do curl -fs -m 5 "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
experiment=$(curl -fs "http://127.0.0.1:$port/api/2.0/mlflow/experiments/get-by-name?experiment_name=smpp" |
  "$bin/python" -c 'import json,sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')
browser --window-size=1400,900 --virtual-time-budget=20000 --screenshot="$shots/mlflow-runs.png" \
  "http://127.0.0.1:$port/#/experiments/$experiment/runs?workflowType=machine_learning"
rm -f "$shots/.mlflow-ui.log"
ls -l "$shots"
