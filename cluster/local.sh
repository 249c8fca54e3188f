#!/usr/bin/env bash
# A real multi-node Ray cluster and an MLflow tracking server on this machine, all on 127.0.0.1.
#
#   cluster/local.sh up [--s3] [--isolate-worker]
#                             head node + a second worker node (token auth) + MLflow server;
#                             writes $SMPP_CLUSTER_DIR/env for clients to source
#       --s3                  also an S3 server on 127.0.0.1 (moto_server, from `make test`'s
#                             install) with bucket $SMPP_S3_BUCKET (smpp): every node, the job
#                             drivers and MLflow get the AWS_* variables, and the MLflow server
#                             stores artifacts in s3://$SMPP_S3_BUCKET/mlflow-artifacts
#       --isolate-worker      the worker node runs in its own mount namespace (root only) with
#                             private tmpfs over /tmp, /dev/shm, <repo>/runs and every folder in
#                             $SMPP_WORKER_HIDE (colon-separated): it sees none of the head's
#                             files, as a second host would; share data through --s3
#   cluster/local.sh status   what is running (exit 0 up, 3 down, 1 partly up)
#   cluster/local.sh down     stop exactly what `up` started; exit 1 if anything is left
#
# Then:  source cluster/.local/env && jobs/submit.sh smoke     (or any `ray job submit`)
#
# Environment (all optional):
#   SMPP_CLUSTER_DIR      state folder: pids, logs, token, env file, MLflow store (cluster/.local)
#   VENV                  virtualenv whose ray/mlflow/python run everything (<repo>/.venv)
#   SMPP_HEAD_CPUS        logical CPUs of the head node (2)
#   SMPP_WORKER_CPUS      logical CPUs of the worker node (2)
#                         2 + 2 makes every smoke pipeline use both nodes: Ray Data spreads its
#                         tasks (scheduling strategy SPREAD), and the two 1-CPU train workers
#                         (placement PACK) fill one node, so their input pipeline runs on the
#                         other. 4 in all is what the smoke config needs (train takes 2, and
#                         refuses to start unless Ray Data keeps at least 1). The head needs >= 1:
#                         with 0 (as on a cloud head) nothing would run on it.
#   SMPP_OBJECT_STORE_MB  object store per node in MiB (256)
#   SMPP_S3_BUCKET        bucket created by --s3 (smpp)
#   SMPP_WORKER_HIDE      extra folders the isolated worker node must not see (colon-separated)
#   SMPP_KEEP_RAY_LOGS    1 keeps the Ray temp folder (session logs) after `down`
#   SMPP_STOP_GRACE_S     seconds `down` waits after SIGTERM before SIGKILL (10)
#
# Trust boundaries (tests/test_cluster.py checks each one on a running cluster):
#   - Every service listens on 127.0.0.1 only: Ray's GCS, both raylets and object managers, the
#     dashboard, the dashboard and runtime-env agents, the metrics exporters (node, dashboard,
#     autoscaler), the Ray client server and every Ray worker's own gRPC server; MLflow; S3.
#     Ray binds a node's services to loopback only when the node's IP is exactly 127.0.0.1, and
#     `ray start` on Linux rewrites 127.0.0.1 to the host's address. The head keeps it with
#     RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; that switch also stops a node joining a cluster, so
#     the worker node starts through cluster/ray_loopback.py (see there). No Ray port is left on
#     another interface. On a real cluster the nodes must reach each other: firewall those
#     ports to the cluster network instead.
#   - Ray's job API and dashboard want the token ($STATE/auth_token, 0600). The metrics ports
#     answer without it, but only on loopback.
#   - MLflow runs with basic auth (`--app-name basic-auth`): user smpp-admin, a random password
#     in $STATE/env and $STATE/mlflow/basic_auth.ini (both 0600). Ray processes inherit the
#     credentials from this script, so a job's runtime env never carries them.
#   - Run storage must be trusted: Tune resumes by unpickling its experiment state from it.
#
# Every service runs in its own session (setsid) whose id is recorded, and every process carries
# SMPP_CLUSTER_ID=<random> in its environment, so `down` finds exactly this cluster's processes
# (Ray puts workers in their own process groups and job drivers in new sessions) and never
# touches another Ray on the machine. `ray stop` is deliberately not used: it stops every Ray.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SMPP_CLUSTER_DIR:-$REPO/cluster/.local}"
VENV="${VENV:-$REPO/.venv}"
HEAD_CPUS="${SMPP_HEAD_CPUS:-2}"
WORKER_CPUS="${SMPP_WORKER_CPUS:-2}"
OBJECT_STORE_MB="${SMPP_OBJECT_STORE_MB:-256}"
PY="$VENV/bin/python"
STATE_FILE="$STATE/cluster.state"
PROCS_FILE="$STATE/processes"   # lines: <name> <pid> <session id>

log() { printf '[local.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit "${2:-1}"; }

# ---------------------------------------------------------------------------------------------
# Finding this cluster's processes

# Prints the pids of every live process of this cluster: in a recorded session or carrying the
# cluster id in its environment (ID empty: sessions only). Reads /proc directly.
members() {
  local id="$1" sessions="$2" d pid stat rest state ppid pgrp sid
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
    stat="$(cat "$d/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"               # the command name may hold spaces and ')'
    read -r state ppid pgrp sid _ <<<"$rest"
    [[ "$state" == "Z" ]] && continue  # zombies hold no resources; their parent reaps them
    if [[ " $sessions " == *" $sid "* ]] || [[ " $sessions " == *" $pgrp "* ]]; then
      echo "$pid"
    elif [[ -n "$id" ]] && grep -qz "^SMPP_CLUSTER_ID=$id\$" "$d/environ" 2>/dev/null; then
      echo "$pid"
    fi
  done
}

load_state() {
  [[ -f "$STATE_FILE" ]] || return 1
  # shellcheck disable=SC1090
  source "$STATE_FILE"
  SESSIONS="$(awk '{print $3}' "$PROCS_FILE" 2>/dev/null | tr '\n' ' ')"
}

free_ports() {  # free_ports N: N distinct free TCP ports on 127.0.0.1 (held open together)
  "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# spawn NAME CMD...: CMD in a new session, output to $STATE/logs/NAME.log; records pid + session.
spawn() {
  local name="$1"; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  # setsid execs in place (the child is not a group leader), so the pid is the session id
  echo "$name $pid $pid" >>"$PROCS_FILE"
  SPAWNED_PID=$pid
}

wait_http() {  # wait_http URL SECONDS NAME [TOKEN]
  local url="$1" secs="$2" name="$3" token="${4:-}"
  "$PY" - "$url" "$secs" "$token" <<'EOF' || die "$name did not answer at $1 within ${2}s; see $STATE/logs/$name.log"
import sys, time, urllib.request
url, secs, token = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.time() + secs
while True:
    try:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit(1)
    time.sleep(0.5)
EOF
}

# ---------------------------------------------------------------------------------------------
# up

cmd_up() {
  local with_s3=0 isolate=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --s3) with_s3=1; shift ;;
      --isolate-worker) isolate=1; shift ;;
      *) die "up: unknown option $1 (known: --s3, --isolate-worker)" 2 ;;
    esac
  done
  [[ -x "$VENV/bin/ray" && -x "$VENV/bin/mlflow" ]] || die "no ray/mlflow in $VENV/bin; run 'make test' once or set VENV" 2
  if ((with_s3)); then
    [[ -x "$VENV/bin/moto_server" ]] || die "--s3 needs moto_server in $VENV/bin (pip install 'moto[server]'; make test installs it)" 2
  fi
  if ((isolate)); then
    [[ "$(id -u)" == 0 ]] || die "--isolate-worker needs root (a mount namespace per node)" 2
    unshare --mount --propagation private true 2>/dev/null || die "--isolate-worker: unshare --mount is not permitted here" 2
  fi
  if load_state; then
    if [[ -n "$(members "$CLUSTER_ID" "$SESSIONS")" ]]; then
      die "a cluster from $STATE is already up; run '$0 down' first" 2
    fi
    log "clearing stale state of a cluster that is no longer running"
    rm -f "$STATE_FILE" "$PROCS_FILE" "$STATE/env" "$STATE/mlflow/basic_auth.ini"
  fi
  mkdir -p "$STATE/logs" "$STATE/mlflow/artifacts"
  : >"$PROCS_FILE"

  CLUSTER_ID="$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
  # Unix socket paths are capped at 107 bytes, so Ray's temp folders must be short, not in STATE.
  # Each node gets its own, as separate hosts would: two nodes sharing one temp folder share
  # session_*/runtime_resources/, so the worker node's runtime-env agent re-extracts a job's
  # working_dir over the one the head unpacked and the job driver is running in. The driver's
  # cwd is then a deleted folder, and `import torch` after `ray.init()` aborts (oneMKL calls
  # getcwd while libtorch_cpu.so loads: "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so").
  RAY_TMP="$(mktemp -d /tmp/smppray.XXXXXX)"
  RAY_TMP_WORKER="$(mktemp -d /tmp/smppray.XXXXXX)"
  local ports
  read -r -a ports <<<"$(free_ports 17)"
  GCS_PORT=${ports[0]} DASHBOARD_PORT=${ports[1]} MLFLOW_PORT=${ports[2]} CLIENT_PORT=${ports[3]}
  {
    printf 'CLUSTER_ID=%q\nRAY_TMP=%q\nRAY_TMP_WORKER=%q\n' "$CLUSTER_ID" "$RAY_TMP" "$RAY_TMP_WORKER"
    printf 'GCS_PORT=%q\nDASHBOARD_PORT=%q\nMLFLOW_PORT=%q\n' "$GCS_PORT" "$DASHBOARD_PORT" "$MLFLOW_PORT"
  } >"$STATE_FILE"
  # From here on a failure (die, or set -e) tears down whatever did start
  UP_DONE=0
  trap '[[ $UP_DONE == 1 ]] || { log "up failed; stopping what was started"; cmd_down || true; }' EXIT

  local token_file="$STATE/auth_token"
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_file")

  # Everything below inherits these: token auth on every node and client, the venv first on PATH
  # (the job entrypoint `python ...` must be the venv's), and the id that `down` looks for.
  export SMPP_CLUSTER_ID="$CLUSTER_ID" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
  export PATH="$VENV/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
  unset RAY_ADDRESS RAY_AUTH_TOKEN

  local artifacts="$STATE/mlflow/artifacts" s3_port=""
  if ((with_s3)); then
    s3_port=${ports[16]}
    local bucket="${SMPP_S3_BUCKET:-smpp}"
    # Test credentials for the local server only; every process below inherits them.
    export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$s3_port"
    export AWS_ACCESS_KEY_ID=smpp-local AWS_SECRET_ACCESS_KEY=smpp-local-secret
    export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    log "starting an S3 server (moto) on 127.0.0.1:$s3_port, bucket $bucket"
    spawn s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port"
    wait_http "http://127.0.0.1:$s3_port/moto-api/" 60 s3
    "$PY" -c 'import boto3, sys; boto3.client("s3").create_bucket(Bucket=sys.argv[1])' "$bucket" \
      || die "could not create bucket $bucket; see $STATE/logs/s3.log"
    artifacts="s3://$bucket/mlflow-artifacts"
    printf 'S3_PORT=%q\nS3_BUCKET=%q\n' "$s3_port" "$bucket" >>"$STATE_FILE"
  fi

  # MLflow with basic auth: one admin user whose random password lives in the state folder
  # (0600). Every Ray process inherits the credentials from here, so job drivers log without
  # them travelling in a job's runtime env (which `ray job list` shows to anyone with the token).
  export MLFLOW_TRACKING_USERNAME=smpp-admin
  MLFLOW_TRACKING_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  export MLFLOW_TRACKING_PASSWORD
  # A fresh user store each time: MLflow ignores admin_password once the admin user exists
  rm -f "$STATE/mlflow/auth.db"
  (umask 077 && printf '%s\n' \
    "[mlflow]" \
    "default_permission = NO_PERMISSIONS" \
    "database_uri = sqlite:///$STATE/mlflow/auth.db" \
    "admin_username = $MLFLOW_TRACKING_USERNAME" \
    "admin_password = $MLFLOW_TRACKING_PASSWORD" \
    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" \
    >"$STATE/mlflow/basic_auth.ini")
  # Clients log through the server (mlflow-artifacts:/), which alone writes the artifact store
  # The Flask secret signs the UI's CSRF tokens; the server alone needs it
  MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/basic_auth.ini" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')" \
    spawn mlflow "$VENV/bin/mlflow" server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1 --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" --artifacts-destination "$artifacts"

  node_ports() {  # per-node service ports, so nothing collides with another Ray on this host
    echo --node-manager-port "${ports[$1]}" --object-manager-port "${ports[$(($1 + 1))]}" \
      --dashboard-agent-listen-port "${ports[$(($1 + 2))]}" --dashboard-agent-grpc-port "${ports[$(($1 + 3))]}" \
      --runtime-env-agent-port "${ports[$(($1 + 4))]}" --metrics-export-port "${ports[$(($1 + 5))]}"
  }
  local store=$((OBJECT_STORE_MB * 1024 * 1024))
  log "starting Ray head on 127.0.0.1:$GCS_PORT (dashboard $DASHBOARD_PORT, $HEAD_CPUS CPUs)"
  # shellcheck disable=SC2046
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 spawn ray-head "$VENV/bin/ray" start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
    --ray-client-server-port "$CLIENT_PORT" $(node_ports 4) \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --resources '{"node_head": 1}' \
    --object-store-memory "$store" --temp-dir "$RAY_TMP" --disable-usage-stats
  wait "$SPAWNED_PID" || die "ray start --head failed; see $STATE/logs/ray-head.log"

  # shellcheck disable=SC2046
  local worker_start=("$PY" "$REPO/cluster/ray_loopback.py" start --address "127.0.0.1:$GCS_PORT"
    $(node_ports 10) --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources '{"node_b": 1}'
    --object-store-memory "$store" --temp-dir "$RAY_TMP_WORKER" --disable-usage-stats)
  if ((isolate)); then
    local hide=(/tmp /dev/shm "$REPO/runs") extra
    IFS=: read -r -a extra <<<"${SMPP_WORKER_HIDE:-}"
    hide+=("${extra[@]}")
    mkdir -p "$REPO/runs"
    local hidden real_venv
    real_venv="$(readlink -f "$VENV")"
    for hidden in "${hide[@]}"; do
      [[ -n "$hidden" && "$real_venv/" == "$(readlink -f "$hidden")/"* ]] && \
        die "--isolate-worker: the venv $real_venv is under $hidden, which the worker node cannot see; set VENV" 2
    done
    # The venv by its real path and the launcher's source as an argument: a symlinked venv or
    # the repository itself may sit under a hidden folder
    worker_start=("$real_venv/bin/python" -c "$(cat "$REPO/cluster/ray_loopback.py")" "${worker_start[@]:2}")
    log "starting Ray worker node ($WORKER_CPUS CPUs, resource node_b) in its own mount namespace; hidden: ${hide[*]}"
    # The token file may be under a hidden folder: the node gets the token itself
    RAY_AUTH_TOKEN="$(cat "$token_file")" spawn ray-worker unshare --mount --propagation private -- \
      bash -c 'set -e; tmp="$1"; shift; n="$1"; shift
               for ((i = 0; i < n; i++)); do [[ -d "$1" ]] && mount -t tmpfs -o mode=1777 smpp-hidden "$1"; shift; done
               mkdir -p "$tmp"; unset RAY_AUTH_TOKEN_PATH; exec "$@"' \
      worker-ns "$RAY_TMP_WORKER" "${#hide[@]}" "${hide[@]}" "${worker_start[@]}"
  else
    log "starting Ray worker node ($WORKER_CPUS CPUs, resource node_b)"
    spawn ray-worker "${worker_start[@]}"
  fi
  wait "$SPAWNED_PID" || die "ray start (worker) failed; see $STATE/logs/ray-worker.log"

  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120 mlflow
  wait_for_nodes 2 60 || die "the cluster did not reach 2 alive nodes; see $STATE/logs and $RAY_TMP"

  # Secrets inside (the MLflow password, the S3 keys): readable by this user only
  (umask 077 && : >"$STATE/env")
  {
    echo "# written by cluster/local.sh up; source it before ray job submit / smpp"
    printf 'export RAY_ADDRESS=%q\n' "http://127.0.0.1:$DASHBOARD_PORT"
    printf 'export SMPP_RAY_GCS_ADDRESS=%q\n' "127.0.0.1:$GCS_PORT"
    printf 'export MLFLOW_TRACKING_URI=%q\n' "http://127.0.0.1:$MLFLOW_PORT"
    printf 'export RAY_AUTH_MODE=token\n'
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$token_file"
    printf 'export MLFLOW_TRACKING_USERNAME=%q\n' "$MLFLOW_TRACKING_USERNAME"
    printf 'export MLFLOW_TRACKING_PASSWORD=%q\n' "$MLFLOW_TRACKING_PASSWORD"
    if ((with_s3)); then
      local name
      for name in AWS_ENDPOINT_URL MLFLOW_S3_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY \
                  AWS_DEFAULT_REGION AWS_REGION AWS_EC2_METADATA_DISABLED; do
        printf 'export %s=%q\n' "$name" "${!name}"
      done
      printf 'export SMPP_S3=%q\n' "s3://${SMPP_S3_BUCKET:-smpp}"
    fi
  } >"$STATE/env"
  UP_DONE=1
  log "up: 2 Ray nodes, MLflow at http://127.0.0.1:$MLFLOW_PORT; source $STATE/env"
}

# Alive Ray nodes, read from the dashboard's state API with the cluster token.
alive_nodes() {
  "$PY" - "http://127.0.0.1:$DASHBOARD_PORT" "$STATE/auth_token" <<'EOF'
import json, sys, urllib.request
url, token_path = sys.argv[1], sys.argv[2]
token = open(token_path).read().strip()
req = urllib.request.Request(f"{url}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, timeout=10) as r:
    nodes = json.load(r)["data"]["result"]["result"]
for n in nodes:
    if n.get("state") == "ALIVE":
        res = {k: v for k, v in n.get("resources_total", {}).items() if not k.startswith("node:")}
        print(n["node_id"], "head" if n.get("is_head_node") else "worker", json.dumps(res, sort_keys=True))
EOF
}

wait_for_nodes() {  # wait_for_nodes N SECONDS
  local deadline=$((SECONDS + $2)) n
  while ((SECONDS < deadline)); do
    n="$(alive_nodes 2>/dev/null | wc -l)" || n=0
    ((n >= $1)) && return 0
    sleep 1
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# down

cmd_down() {
  if ! load_state; then
    log "nothing recorded in $STATE; nothing to stop"
    return 0
  fi
  local pids
  # Stop the worker node before the head so it does not spin reconnecting, MLflow last.
  for name in ray-worker ray-head mlflow s3; do
    local sid
    sid="$(awk -v n="$name" '$1 == n {print $3}' "$PROCS_FILE")"
    [[ -n "$sid" ]] && kill -TERM -- "-$sid" 2>/dev/null || true
  done
  pids="$(members "$CLUSTER_ID" "$SESSIONS")"
  [[ -n "$pids" ]] && kill -TERM $pids 2>/dev/null || true
  # Ray's GCS can sit on SIGTERM for a long time once its raylets are gone, so the grace is short
  local deadline=$((SECONDS + ${SMPP_STOP_GRACE_S:-10}))
  while [[ -n "$(members "$CLUSTER_ID" "$SESSIONS")" ]] && ((SECONDS < deadline)); do sleep 0.5; done
  pids="$(members "$CLUSTER_ID" "$SESSIONS")"
  if [[ -n "$pids" ]]; then
    log "killing processes that ignored SIGTERM: $(ps -o pid=,comm= -p "$(echo $pids | tr " " ,)" | tr -s " \n" " ")"
    kill -KILL $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [[ -n "$(members "$CLUSTER_ID" "$SESSIONS")" ]] && ((SECONDS < deadline)); do sleep 0.5; done
  fi
  pids="$(members "$CLUSTER_ID" "$SESSIONS")"
  if [[ -n "$pids" ]]; then
    die "still running after SIGKILL: $(echo $pids)"
  fi
  if [[ "${SMPP_KEEP_RAY_LOGS:-0}" != 1 ]]; then
    local tmp
    for tmp in "$RAY_TMP" "${RAY_TMP_WORKER:-}"; do
      [[ "$tmp" == /tmp/smppray.* ]] && rm -rf "$tmp"
    done
  fi
  mv -f "$PROCS_FILE" "$STATE/processes.stopped"
  rm -f "$STATE_FILE" "$STATE/env" "$STATE/auth_token" "$STATE/mlflow/basic_auth.ini"
  log "down: nothing of cluster $CLUSTER_ID is left running"
}

# ---------------------------------------------------------------------------------------------
# status

cmd_status() {
  if ! load_state; then
    echo "down (no cluster recorded in $STATE)"
    return 3
  fi
  local name pid sid alive=0 total=0 n
  echo "cluster $CLUSTER_ID, state $STATE"
  while read -r name pid sid; do
    n="$(members "" "$sid" | wc -l)"
    total=$((total + 1)); ((n > 0)) && alive=$((alive + 1))
    printf '  %-11s session %-8s %s\n' "$name" "$sid" "$( ((n > 0)) && echo "$n processes" || echo stopped)"
  done <"$PROCS_FILE"
  n="$(members "$CLUSTER_ID" "$SESSIONS" | wc -l)"
  echo "  $n processes in all (Ray workers and job drivers included)"
  echo "  ray dashboard / job API http://127.0.0.1:$DASHBOARD_PORT (GCS 127.0.0.1:$GCS_PORT)"
  alive_nodes 2>/dev/null | sed 's/^/    node /' || echo "    (Ray state API not answering)"
  echo "  mlflow http://127.0.0.1:$MLFLOW_PORT"
  [[ -n "${S3_PORT:-}" ]] && echo "  s3 http://127.0.0.1:$S3_PORT (bucket s3://$S3_BUCKET)"
  echo "  client env: source $STATE/env"
  ((alive == total)) && return 0
  ((alive == 0)) && return 3
  return 1
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [--s3] [--isolate-worker] | down | status   (state in \${SMPP_CLUSTER_DIR:-cluster/.local})" >&2; exit 2 ;;
esac
