"""The local multi-node cluster end to end: cluster/local.sh, jobs/submit.sh, `ray job submit`.

The slow tests bring up a real two-node Ray (head + worker with resource ``node_b``, token auth)
and an MLflow server in a temporary state folder, submit a job through the real CLI, read the
MLflow server back through its client, then take everything down and check /proc.

To test another job on the same cluster, add a slow test *above* test_down_stops_everything_up_started
(tests run in file order and that one stops the module's cluster) that calls e.g.
``submit_job(local_cluster, ["python", "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml",
"--out", str(tmp_path / "run")])``. Paths must be absolute: the job runs in a temporary copy of
the checkout on the cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
SUBMIT_SH = REPO / "jobs" / "submit.sh"
# Variables of the caller that would point the cluster or the client somewhere else
_CLIENT_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_URI", "SMPP_FORWARD_ENV", "SMPP_SUBMIT_OPTS")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS}
    env.update(extra)
    return env


def _read_exports(path: Path) -> dict[str, str]:
    """``export K=V`` lines of a file written by local.sh (values shell-quoted)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return values


def cluster_processes(cluster_id: str, sessions: set[int]) -> set[int]:
    """Live (non-zombie) pids in one of ``sessions`` or carrying SMPP_CLUSTER_ID=cluster_id."""
    marker = f"SMPP_CLUSTER_ID={cluster_id}".encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
            if state == "Z":
                continue
            if sid in sessions or pgrp in sessions:
                found.add(int(entry.name))
            elif marker in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except (OSError, ValueError):
            continue  # exited while we looked, or not ours to read
    return found


@dataclass
class LocalCluster:
    state_dir: Path
    env: dict[str, str]
    """The client environment: the caller's plus what local.sh wrote to its env file."""
    cluster_id: str
    sessions: set[int]
    task_pids: list[int] = field(default_factory=list)
    """Pids of Ray workers that ran a job's tasks (filled by the job test, checked after down)."""

    @property
    def dashboard(self) -> str:
        return self.env["RAY_ADDRESS"]

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]


def run_local_sh(command: str, state_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SH), command], env=_clean_env(SMPP_CLUSTER_DIR=str(state_dir)),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _logs_of(state_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state_dir / "logs").glob("*.log")))


def submit_job(cluster: LocalCluster, entrypoint_args: list[str], timeout: float = 600) -> tuple[str, str, str]:
    """Submit through jobs/submit.sh (real ``ray job submit``); wait; return (job_id, status, logs)."""
    job_id = f"test-{uuid.uuid4().hex[:10]}"
    submitted = subprocess.run(["bash", str(SUBMIT_SH), "--id", job_id, "run", "--", *entrypoint_args],
                               env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    status_out = subprocess.run(["bash", str(SUBMIT_SH), "status", job_id], env=cluster.env,
                                capture_output=True, text=True, timeout=120, cwd=REPO)
    match = re.search(r"Job '[^']+' (succeeded|failed|stopped)|Status for job '[^']+': (\w+)",
                      status_out.stdout + status_out.stderr)
    status = "UNKNOWN"
    if match:
        status = (match.group(1) or match.group(2)).upper()
        status = {"SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED", "STOPPED": "STOPPED"}.get(status, status)
    logs = subprocess.run(["bash", str(SUBMIT_SH), "logs", job_id], env=cluster.env,
                          capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    if status != "SUCCEEDED":
        logs += f"\n--- ray job submit (rc {submitted.returncode}):\n{submitted.stdout[-4000:]}{submitted.stderr[-4000:]}"
    return job_id, status, logs


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    up = run_local_sh("up", state_dir)
    if up.returncode != 0:
        run_local_sh("down", state_dir)
        pytest.fail(f"cluster/local.sh up failed ({up.returncode}):\n{up.stderr}\n{_logs_of(state_dir)}")
    state = _read_state(state_dir / "cluster.state")
    sessions = {int(line.split()[2]) for line in (state_dir / "processes").read_text().splitlines()}
    env = _clean_env(**_read_exports(state_dir / "env"))
    yield LocalCluster(state_dir, env, state["CLUSTER_ID"], sessions)
    run_local_sh("down", state_dir)  # no-op when test_down already stopped it


def _read_state(path: Path) -> dict[str, str]:
    return {k: shlex.split(v)[0] for k, _, v in (line.partition("=") for line in path.read_text().splitlines()) if v}


# ---------------------------------------------------------------------------------------------
# Slow: a real cluster (about a minute on 2 cores). Tests run in file order; the last one stops it.


@pytest.mark.slow
def test_up_starts_two_nodes_mlflow_and_token_auth(local_cluster: LocalCluster):
    env = local_cluster.env
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert len(token) >= 32
    assert oct(Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"

    # The job API refuses a request without the token and answers one with it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{local_cluster.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(f"{local_cluster.dashboard}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = [n for n in json.load(response)["data"]["result"]["result"] if n["state"] == "ALIVE"]
    assert len(nodes) == 2
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]
    worker = next(n for n in nodes if not n["is_head_node"])
    assert worker["resources_total"].get("node_b") == 1.0
    # Two nodes on one host. Ray records the host's routable IP even for --node-ip-address
    # 127.0.0.1 (services.resolve_ip_for_localhost), so the check is "the same host", not 127.0.0.1.
    assert nodes[0]["node_ip"] == nodes[1]["node_ip"]

    with urllib.request.urlopen(f"{local_cluster.tracking_uri}/health", timeout=10) as response:
        assert response.status == 200

    status = run_local_sh("status", local_cluster.state_dir)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert re.search(rf"{name}\s+session \d+\s+\d+ processes", status.stdout), status.stdout
    # A second `up` on the same state refuses instead of starting a second cluster
    again = run_local_sh("up", local_cluster.state_dir)
    assert again.returncode == 2 and "already up" in again.stderr


@pytest.mark.slow
def test_probe_job_runs_on_both_nodes_and_logs_to_mlflow(local_cluster: LocalCluster):
    import mlflow

    experiment = f"probe-{uuid.uuid4().hex[:6]}"
    job_id, status, logs = submit_job(local_cluster, ["python", "jobs/cluster_probe.py",
                                                      "--experiment", experiment])
    assert status == "SUCCEEDED", logs
    lines = [line for line in logs.splitlines() if line.startswith("CLUSTER_PROBE_RESULT ")]
    assert len(lines) == 1, logs
    result = json.loads(lines[0].split(" ", 1)[1])
    node_ids = result["node_ids"]
    assert len(node_ids) == 2 and len(set(node_ids)) == 2
    assert result["node_b"] in node_ids
    assert sorted(t["node_id"] for t in result["tasks"]) == sorted(node_ids)

    client = mlflow.MlflowClient(tracking_uri=local_cluster.tracking_uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["distinct_nodes"] == 2
    assert set(parent.data.tags["smpp.node_ids"].split(",")) == set(node_ids)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None and parent.info.experiment_id == exp.experiment_id
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert {c.data.tags["smpp.node_id"] for c in children} == set(node_ids)
    assert all(c.info.status == "FINISHED" and "node_index" in c.data.metrics for c in children)
    # Remember the Ray worker pids that ran the tasks: `down` must take them too.
    local_cluster.task_pids.extend(int(t["pid"]) for t in result["tasks"])


@pytest.mark.slow
def test_down_stops_everything_up_started(local_cluster: LocalCluster):
    before = cluster_processes(local_cluster.cluster_id, local_cluster.sessions)
    assert len(before) >= 3, "the cluster should be running before down"
    down = run_local_sh("down", local_cluster.state_dir, timeout=120)
    assert down.returncode == 0, down.stderr
    assert cluster_processes(local_cluster.cluster_id, local_cluster.sessions) == set()
    for pid in local_cluster.task_pids:
        assert pid not in before or not Path(f"/proc/{pid}").exists(), f"task worker {pid} survived down"
    assert not (local_cluster.state_dir / "env").exists()
    status = run_local_sh("status", local_cluster.state_dir)
    assert status.returncode == 3 and status.stdout.startswith("down")
    # down is idempotent
    assert run_local_sh("down", local_cluster.state_dir).returncode == 0


# ---------------------------------------------------------------------------------------------
# Fast: the scripts' contracts without a cluster


def test_local_sh_usage_and_empty_state(tmp_path: Path):
    bad = run_local_sh("restart", tmp_path)
    assert bad.returncode == 2 and "usage" in bad.stderr
    status = run_local_sh("status", tmp_path)
    assert status.returncode == 3 and "down" in status.stdout
    assert run_local_sh("down", tmp_path).returncode == 0


def test_runtime_env_excludes_local_state_and_forwards_tracking(tmp_path: Path):
    env = _clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:5999", SMPP_FORWARD_ENV="AWS_REGION UNSET_VAR",
                     AWS_REGION="eu-west-1")
    out = subprocess.run(["bash", str(SUBMIT_SH), "runtime-env"], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    runtime_env = json.loads(out.stdout)
    for path in (".venv", ".git", "runs", "cluster/.local"):
        assert path in runtime_env["excludes"]
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999",
                                       "AWS_REGION": "eu-west-1"}


def test_submit_sh_refuses_missing_address_and_config():
    no_address = subprocess.run(["bash", str(SUBMIT_SH), "run", "--", "python", "-V"], env=_clean_env(),
                                capture_output=True, text=True, timeout=60)
    assert no_address.returncode == 2 and "RAY_ADDRESS" in no_address.stderr
    missing = subprocess.run(["bash", str(SUBMIT_SH), "pipeline", "no-such-config"],
                             env=_clean_env(RAY_ADDRESS="http://127.0.0.1:1"), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "jobs/configs/no-such-config.yaml" in missing.stderr
