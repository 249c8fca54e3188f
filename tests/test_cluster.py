"""A real multi-host cluster end to end: cluster/local.sh, jobs/submit.sh, `ray job submit`, S3.

The slow tests bring up a real two-node Ray (head + worker with resource ``node_b``, token auth),
an S3 server (moto, 127.0.0.1) and an MLflow server whose artifacts live in the bucket, all in a
temporary state folder. The worker node runs in its own mount namespace with private tmpfs over
/tmp, /dev/shm and runs/ (``up --isolate-worker``): it sees none of the head's files, as a second
host would, so a stage that reads a driver-local file fails there. Train workers, extraction
actors and Tune trials are pinned to that node (``*_resources=[node_b=...]``), every artifact goes
to ``s3://smpp/...``, and the tests read the bucket, the MLflow server and /proc back. The
pipeline job's LightGBM fits are data-parallel (``tune.engine: ray_train``): their Ray Train
workers are spread over both nodes, not pinned.

To test another job on the same cluster, add a slow test *above* test_down_stops_everything_up_started
(tests run in file order and that one stops the module's cluster) that calls e.g.
``submit_job(local_cluster, ["python", "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml",
"--out", "s3://smpp/run"])``. Locations must be in the bucket: the worker node sees no local file
of the head. Everything lives under ``cluster_workdir``, a folder of this module
rather than pytest's tmp_path: pytest deletes old ``pytest-N`` folders when another session starts
(other test runs on a shared machine), which would pull a running job's data, or the cluster's
token and process records, from under it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from environ import environ

from smpp_ray.stage_table import PIPELINE_STAGES, STAGE_FOLDERS

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
SUBMIT_SH = REPO / "jobs" / "submit.sh"
# Variables of the caller that would point the cluster or the client somewhere else
_CLIENT_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "SMPP_FORWARD_ENV", "SMPP_SUBMIT_OPTS")
_MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


def run_local_sh(command: str, state_dir: Path, timeout: float = 300, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SH), command, *options], env=_clean_env(SMPP_CLUSTER_DIR=str(state_dir)),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _logs_of(state_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state_dir / "logs").glob("*.log")))


def _submit_sh(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT_SH), *args], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def job_status(cluster: LocalCluster, job_id: str) -> str:
    """The job's status as ``ray job status`` prints it (SUCCEEDED, RUNNING, STOPPED, ...)."""
    out = _submit_sh(cluster, "status", job_id)
    text = out.stdout + out.stderr
    match = re.search(r"Job '[^']+' (?:was )?(succeeded|failed|stopped)|Status for job '[^']+': (\w+)", text)
    if not match:
        return "UNKNOWN"
    return (match.group(1) or match.group(2)).upper()


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    return _submit_sh(cluster, "logs", job_id).stdout


def submit_job(cluster: LocalCluster, entrypoint_args: list[str], timeout: float = 600,
               job_id: str | None = None) -> tuple[str, str, str]:
    """Submit through jobs/submit.sh (real ``ray job submit``); wait; return (job_id, status, logs)."""
    job_id = job_id or f"test-{uuid.uuid4().hex[:10]}"
    submitted = subprocess.run(["bash", str(SUBMIT_SH), "--id", job_id, "run", "--", *entrypoint_args],
                               env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    status = job_status(cluster, job_id)
    logs = job_logs(cluster, job_id)
    if status != "SUCCEEDED":
        logs += f"\n--- ray job submit (rc {submitted.returncode}):\n{submitted.stdout[-4000:]}{submitted.stderr[-4000:]}"
    return job_id, status, logs


def start_job(cluster: LocalCluster, entrypoint_args: list[str]) -> str:
    """Submit with ``--no-wait`` (real ``ray job submit``) and return the submission id."""
    job_id = f"test-{uuid.uuid4().hex[:10]}"
    submitted = subprocess.run(["bash", str(SUBMIT_SH), "--id", job_id, "--no-wait", "run", "--",
                                *entrypoint_args], env=cluster.env, capture_output=True, text=True,
                               timeout=300, cwd=REPO)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return job_id


@pytest.fixture(scope="module")
def cluster_workdir():
    """This module's own scratch folder (see the module docstring); removed at the end unless
    SMPP_KEEP_CLUSTER_TEST_DIR=1."""
    workdir = Path(tempfile.mkdtemp(prefix="smpp-cluster-test-"))
    yield workdir
    if os.environ.get("SMPP_KEEP_CLUSTER_TEST_DIR") != "1":
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster(cluster_workdir: Path):
    state_dir = cluster_workdir / "cluster"
    state_dir.mkdir()
    up = run_local_sh("up", state_dir, 300, "--s3", "--isolate-worker")
    if up.returncode != 0:
        run_local_sh("down", state_dir)
        pytest.fail(f"cluster/local.sh up failed ({up.returncode}):\n{up.stderr}\n{_logs_of(state_dir)}")
    state = _read_state(state_dir / "cluster.state")
    sessions = {int(line.split()[2]) for line in (state_dir / "processes").read_text().splitlines()}
    env = _clean_env(**_read_exports(state_dir / "env"))
    # This process reads the MLflow server back: it needs the credentials, as any client does
    try:
        with environ({k: env[k] for k in _MLFLOW_CREDENTIALS}):
            yield LocalCluster(state_dir, env, state["CLUSTER_ID"], sessions)
    finally:
        run_local_sh("down", state_dir)  # no-op when test_down already stopped it


def _read_state(path: Path) -> dict[str, str]:
    return {k: shlex.split(v)[0] for k, _, v in (line.partition("=") for line in path.read_text().splitlines()) if v}


# ---------------------------------------------------------------------------------------------
# Slow: a real cluster (5-7 minutes on 2 busy cores, most of it the smoke pipeline and the
# stop/resume training jobs). Tests run in file order; the last one stops it.


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
        urllib.request.urlopen(f"{local_cluster.dashboard}/api/jobs/", timeout=60)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(f"{local_cluster.dashboard}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        nodes = [n for n in json.load(response)["data"]["result"]["result"] if n["state"] == "ALIVE"]
    assert len(nodes) == 2
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]
    worker = next(n for n in nodes if not n["is_head_node"])
    assert worker["resources_total"].get("node_b") == 1.0
    # Both nodes keep 127.0.0.1 as their IP (the head by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the
    # worker through cluster/ray_loopback.py): what makes Ray bind their services to loopback.
    assert [n["node_ip"] for n in nodes] == ["127.0.0.1", "127.0.0.1"]

    # MLflow: health is open, the API wants the basic-auth credentials of the state folder.
    with urllib.request.urlopen(f"{local_cluster.tracking_uri}/health", timeout=60) as response:
        assert response.status == 200
    search = f"{local_cluster.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(search, timeout=60)
    assert anonymous.value.code == 401
    wrong = base64.b64encode(f"{env['MLFLOW_TRACKING_USERNAME']}:wrong".encode()).decode()
    with pytest.raises(urllib.error.HTTPError) as bad_password:
        urllib.request.urlopen(urllib.request.Request(search, headers={"Authorization": f"Basic {wrong}"}),
                               timeout=60)
    assert bad_password.value.code == 401
    right = base64.b64encode(f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}".encode())
    with urllib.request.urlopen(urllib.request.Request(search, headers={"Authorization": f"Basic {right.decode()}"}),
                                timeout=60) as response:
        assert response.status == 200
    assert len(env["MLFLOW_TRACKING_PASSWORD"]) >= 24
    for secret_file in ("env", "mlflow/basic_auth.ini"):
        assert oct((local_cluster.state_dir / secret_file).stat().st_mode & 0o777) == "0o600", secret_file

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


#: Train workers, extraction actors and Tune trials all need the isolated node's resource.
PIN_TO_WORKER_NODE = ["--set", "train.worker_resources=[node_b=0.5]",
                      "--set", "extract.actor_resources=[node_b=0.01]",
                      "--set", "tune.trial_resources=[node_b=0.01]"]
#: The pipeline job's LightGBM trial and refit fit data-parallel (``tune.engine: ray_train``): two
#: Ray Train workers, spread over the two nodes, reading Ray Data shards of the features in the
#: bucket. Each data-parallel fit is ~55 s of Ray Train start-up here, so the job keeps to one
#: trial per family and to the image's feature groups (the network and retrieval features): its
#: fallback is then the label prior, not a third data-parallel fit.
DATA_PARALLEL_GROUPS = ("network", "neighbours", "user_neighbours")
DATA_PARALLEL_TUNE = ["--set", "tune.engine=ray_train", "--set", "tune.train_workers=2",
                      "--set", "tune.num_samples=1", "--set", f"tune.feature_groups=[{','.join(DATA_PARALLEL_GROUPS)}]"]


@dataclass
class PipelineJob:
    job_id: str
    status: str
    logs: str
    out: str
    experiment: str


def _bucket(cluster: LocalCluster):
    """The cluster's S3 bucket through pyarrow, with the cluster's AWS_* variables."""
    import pyarrow.fs as pafs

    env = cluster.env
    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_DEFAULT_REGION"])


def _bucket_files(cluster: LocalCluster, uri: str) -> list[str]:
    import pyarrow.fs as pafs

    path = uri.removeprefix("s3://")
    infos = _bucket(cluster).get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def _bucket_json(cluster: LocalCluster, uri: str) -> dict | None:
    try:
        with _bucket(cluster).open_input_stream(uri.removeprefix("s3://")) as stream:
            return json.loads(stream.read())
    except (OSError, json.JSONDecodeError):
        return None


@pytest.fixture(scope="module")
def pipeline_job(local_cluster: LocalCluster) -> PipelineJob:
    """The smoke pipeline submitted once through the real CLI into the bucket (4-6 minutes here)."""
    out = f"{local_cluster.env['SMPP_S3']}/pipeline-{uuid.uuid4().hex[:6]}"
    experiment = f"pipeline-{uuid.uuid4().hex[:6]}"
    job_id, status, logs = submit_job(local_cluster, [
        "python", "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml", "--out", out,
        "--set", f"tracking.experiment={experiment}", *PIN_TO_WORKER_NODE, *DATA_PARALLEL_TUNE], timeout=1200)
    return PipelineJob(job_id, status, logs, out, experiment)


def _alive_nodes(cluster: LocalCluster) -> dict[str, dict]:
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{cluster.dashboard}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pipeline_job_writes_everything_to_the_bucket(local_cluster: LocalCluster, pipeline_job: PipelineJob):
    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs
    files = _bucket_files(local_cluster, pipeline_job.out)
    for stage, folder in STAGE_FOLDERS.items():
        summary = _bucket_json(local_cluster, f"{pipeline_job.out}/{folder}/summary.json")
        assert summary and summary["stage"] == stage and summary["status"] == "complete", stage
    for expected in ("raw/train_text.json", "data/manifest.json", "prototypes/prototypes.safetensors",
                     "features/feature_manifest.json", "tune/blend.json", "report/report.html"):
        assert expected in files, (expected, files[:50])
    assert any(f.startswith("data/posts/split=train/") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("features/split=test/") and f.endswith(".parquet") for f in files)
    # The retrieval features ran on the isolated node's actor pool (pinned there by
    # extract.actor_resources), their queries read from the bucket, and their bank was saved to it.
    assert "features/feature_state/neighbours.npz" in files
    features = _bucket_json(local_cluster, f"{pipeline_job.out}/features/summary.json")
    assert features["metrics"]["neighbour_bank_posts"] > 0
    manifest = _bucket_json(local_cluster, f"{pipeline_job.out}/features/feature_manifest.json")
    assert {"neighbours", "user_neighbours"} <= {c["group"] for c in manifest["columns"]}
    train = _bucket_json(local_cluster, f"{pipeline_job.out}/train/summary.json")
    best = train["artifacts"]["best_checkpoint"]   # relative to the train folder, in the bucket
    assert best.startswith("ray_results/"), best
    assert f"train/{best}/trainable.pt" in files
    # Nothing went to a local folder: no "s3:" folder (pathlib's s3:/ fold) and no stage output
    # anywhere in the checkout, the head's Ray folder (job working dirs) or this module's folder
    state = _read_state(local_cluster.state_dir / "cluster.state")
    assert not (REPO / "s3:").exists() and not list((REPO / "runs").glob("**/pipeline-*"))
    for root in (Path(state["RAY_TMP"]), local_cluster.state_dir.parent):
        assert not [p for p in root.rglob("s3:*")], root
        assert not [p for p in root.rglob("summary.json")], root


@pytest.mark.slow
def test_pipeline_job_ran_on_the_isolated_node_and_tracked_through_the_server(local_cluster: LocalCluster,
                                                                              pipeline_job: PipelineJob):
    import mlflow

    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs
    client = mlflow.MlflowClient(tracking_uri=local_cluster.tracking_uri)
    experiment = client.get_experiment_by_name(pipeline_job.experiment)
    assert experiment is not None, f"no experiment {pipeline_job.experiment} on the cluster's MLflow server"
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`smpp.stage` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["smpp.out_dir"] == pipeline_job.out

    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(PIPELINE_STAGES) and len(children) == len(PIPELINE_STAGES)
    for stage, run in by_name.items():
        assert run.info.status == "FINISHED", stage
        summary = _bucket_json(local_cluster, f"{pipeline_job.out}/{STAGE_FOLDERS[stage]}/summary.json")
        assert summary["mlflow_run_id"] == run.info.run_id, stage
        # Artifacts went through the server (mlflow-artifacts:/) into the bucket, and come back
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}, stage
    logged = json.loads(Path(client.download_artifacts(by_name["tune"].info.run_id, "summary.json",
                                                       tempfile.mkdtemp())).read_text())
    assert logged["stage"] == "tune"
    assert _bucket_files(local_cluster, f"{local_cluster.env['SMPP_S3']}/mlflow-artifacts")
    for name in ("test_lightgbm_src", "test_catboost_src", "test_blend_src"):
        assert -1.0 <= parent.data.metrics[name] <= 1.0, name

    # The job's tasks and actors ran on both nodes, the pinned ones on the isolated worker node
    nodes = _alive_nodes(local_cluster)
    worker = next(node_id for node_id, n in nodes.items() if not n["is_head_node"])
    used = set(parent.data.tags["smpp.node_ids"].split(","))
    assert used == set(nodes), (used, set(nodes))
    assert parent.data.tags["smpp.driver_node_id"] != worker  # the driver ran on the head


def _actors(cluster: LocalCluster, class_name: str) -> list[dict]:
    """Every actor of ``class_name`` the cluster has had (dead ones included), from the State API."""
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    query = urllib.parse.urlencode({"filter_keys": "class_name", "filter_predicates": "=",
                                    "filter_values": class_name, "limit": 1000, "detail": 1})
    request = urllib.request.Request(f"{cluster.dashboard}/api/v0/actors?{query}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["data"]["result"]["result"]


@pytest.mark.slow
def test_pipeline_job_fit_lightgbm_data_parallel_across_both_nodes(local_cluster: LocalCluster,
                                                                   pipeline_job: PipelineJob, monkeypatch):
    """``tune.engine: ray_train`` on the two-node cluster, the features in the bucket: the trial's
    rounds reached Tune from Ray Train workers on both nodes, the refit ran data-parallel, and its
    predictions agree with the single-process fit of the same configuration."""
    import numpy as np
    import pandas as pd

    from smpp_ray import metrics
    from smpp_ray.gbdt.data import load_splits
    from smpp_ray.gbdt.spaces import fixed_params
    from smpp_ray.gbdt.trainables import fit_model, predict

    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs
    tune = f"{pipeline_job.out}/tune"
    files = _bucket_files(local_cluster, tune)
    runs = sorted({f.split("/")[2] for f in files if f.startswith("ray_results/train_runs/")})
    assert [r.split("-")[0] for r in runs] == ["refit", "trial"], runs
    (progress,) = [f for f in files if f.startswith("ray_results/lightgbm/") and f.endswith("/progress.csv")]
    with _bucket(local_cluster).open_input_stream(f"{tune}/{progress}".removeprefix("s3://")) as stream:
        rows = pd.read_csv(stream)
    assert rows["rounds"].tolist() == [1, 11, 21, 31, 41, 51, 60] and np.isfinite(rows["val_score"]).all()

    # The data-parallel fits' workers ran on both nodes (the pipeline's training workers are pinned
    # to the worker node, so a Train worker on the head is a LightGBM one)
    nodes = _alive_nodes(local_cluster)
    head = next(node_id for node_id, n in nodes.items() if n["is_head_node"])
    workers = _actors(local_cluster, "RayTrainWorker")
    assert head in {a["node_id"] for a in workers}, [(a["node_id"], a["state"]) for a in workers]
    assert {a["node_id"] for a in workers} == set(nodes)

    # Quality: the data-parallel refit against one process fitting the same configuration and rounds
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, local_cluster.env[name])
    document = _bucket_json(local_cluster, f"{tune}/metrics.json")
    best = document["best"]["lightgbm"]
    spec, data = load_splits(f"{pipeline_job.out}/features", DATA_PARALLEL_GROUPS)
    single = fit_model("lightgbm", {**fixed_params("lightgbm", seed=0, threads=1), **best["params"]}, best["rounds"],
                       data["train"].X, data["train"].y, spec.categorical)
    with _bucket(local_cluster).open_input_file(f"{tune}/predictions.parquet".removeprefix("s3://")) as file:
        predictions = pd.read_parquet(file)
    for split in ("val", "test"):
        scored = predictions[predictions["split"] == split].set_index("pid")
        keys = data[split].keys["pid"].to_numpy()
        assert set(scored.index) == set(keys) and scored.index.is_unique   # every post of the split, once
        parallel, alone, y = scored.loc[keys, "raw_lightgbm"].to_numpy(), predict(single, data[split].X), data[split].y
        print(f"{split}: {len(y)} posts, agreement SRC {metrics.src(alone, parallel):.3f}; SRC {metrics.src(y, parallel):.3f}"
              f" vs {metrics.src(y, alone):.3f}, MAE {metrics.mae(y, parallel):.3f} vs {metrics.mae(y, alone):.3f}",
              file=sys.stderr)
        # The two fits differ where LightGBM's data-parallel learner bins and splits from the
        # workers' summed histograms, and Ray Data may deal the rows differently each run: they
        # rank the posts alike (measured 0.89-0.96 over runs). This corpus's 36-post splits make
        # any SRC coarse (differences against the label measured 0.003-0.072) and MAE too
        # (0.8-3.3%), hence the margins
        assert metrics.src(alone, parallel) > 0.8, split
        assert metrics.src(y, parallel) == pytest.approx(metrics.src(y, alone), abs=0.12), split
        assert metrics.mae(y, parallel) == pytest.approx(metrics.mae(y, alone), rel=0.08), split


@pytest.mark.slow
def test_resubmitting_the_pipeline_skips_every_stage(local_cluster: LocalCluster, pipeline_job: PipelineJob):
    import mlflow

    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs
    job_id, status, logs = submit_job(local_cluster, [
        "python", "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml", "--out", pipeline_job.out,
        "--set", f"tracking.experiment={pipeline_job.experiment}", *PIN_TO_WORKER_NODE, *DATA_PARALLEL_TUNE],
        timeout=600)
    assert status == "SUCCEEDED", logs
    for stage in PIPELINE_STAGES:
        assert re.search(rf"\] {stage}: complete for these inputs and config, skipped", logs), (stage, logs[-3000:])
    client = mlflow.MlflowClient(tracking_uri=local_cluster.tracking_uri)
    experiment = client.get_experiment_by_name(pipeline_job.experiment)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`smpp.stage` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 2
    assert not client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_job_scores_posts_read_from_the_bucket(local_cluster: LocalCluster, pipeline_job: PipelineJob,
                                                       monkeypatch):
    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs
    from smpp_ray.data.synth import synthesize_corpus

    new_posts, scores = f"{pipeline_job.out}-new-posts", f"{pipeline_job.out}-scores.csv"
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, local_cluster.env[name])
    # New posts written straight into the bucket from here, in a Pid range the pipeline does not use
    synthesize_corpus(new_posts, posts=12, seed=11, image_size=32, first_pid=900_000_000)
    job_id, status, logs = submit_job(local_cluster, [
        "python", "jobs/predict.py", "--pipeline", pipeline_job.out, "--posts", new_posts, "--out", scores,
        *PIN_TO_WORKER_NODE], timeout=800)
    assert status == "SUCCEEDED", logs
    import pandas as pd

    with _bucket(local_cluster).open_input_stream(scores.removeprefix("s3://")) as stream:
        table = pd.read_csv(stream, dtype={"pid": str})
    assert len(table) == 12 and table["pid"].is_unique
    assert table["predicted_popularity"].notna().all()


def _latest_checkpoint_epoch(cluster: LocalCluster, run_uri: str) -> int | None:
    """Epoch of the newest checkpoint Ray Train has registered in the run's storage, if any.

    Train V2 writes ``checkpoint_manager_snapshot.json`` once a reported checkpoint is persisted,
    so a checkpoint it names is complete (a ``checkpoint_*`` folder alone may be mid-upload).
    """
    snapshot = _bucket_json(cluster, f"{run_uri}/checkpoint_manager_snapshot.json")
    latest = snapshot.get("latest_checkpoint_result") if snapshot else None
    return int(latest["metrics"]["epoch"]) if latest else None


#: Epochs of the stop/resume job. An epoch of the smoke model takes ~6 s and `ray job stop` about
#: 10 s from the CLI to dead workers, so with 3 epochs the first job could finish before the stop
#: lands; 5 leaves a margin of 3 epochs and costs ~12 s more in the resumed job.
RESUME_EPOCHS = 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stopped_training_job_resumes_from_its_checkpoint_in_the_bucket(local_cluster: LocalCluster,
                                                                         pipeline_job: PipelineJob):
    import mlflow

    assert pipeline_job.status == "SUCCEEDED", "needs the pipeline job's data and prototypes"
    name, experiment = "resume-test", f"resume-{uuid.uuid4().hex[:6]}"
    out = f"{pipeline_job.out}-resume"
    command = ["python", "jobs/train.py", "--config", "jobs/configs/smoke.yaml",
               "--data", f"{pipeline_job.out}/data", "--prototypes", f"{pipeline_job.out}/prototypes",
               "--out", out, "--set", f"train.epochs={RESUME_EPOCHS}", "--set", f"train.name={name}",
               "--set", "train.early_stopping_patience=0", "--set", f"tracking.experiment={experiment}",
               "--set", "train.worker_resources=[node_b=0.5]"]
    run_uri = f"{out}/ray_results/{name}"  # train.storage_path is empty: <out>/ray_results/<name>

    first = start_job(local_cluster, command)
    deadline = next_status_check = time.monotonic()
    deadline += 600
    while _latest_checkpoint_epoch(local_cluster, run_uri) is None:
        # The snapshot is polled often, the job (a CLI call of a few seconds) only now and then
        if time.monotonic() >= next_status_check:
            status = job_status(local_cluster, first)
            assert status in ("PENDING", "RUNNING"), f"{status} before a checkpoint:\n{job_logs(local_cluster, first)}"
            assert time.monotonic() < deadline, f"no checkpoint in {run_uri}:\n{job_logs(local_cluster, first)}"
            next_status_check = time.monotonic() + 10
        time.sleep(0.5)
    stop = _submit_sh(local_cluster, "stop", first, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_status(local_cluster, first) == "STOPPED"
    stopped_at = _latest_checkpoint_epoch(local_cluster, run_uri)  # an epoch may have finished while stopping
    assert stopped_at is not None and stopped_at < RESUME_EPOCHS - 1, "the job finished before the stop"
    assert _bucket_json(local_cluster, f"{out}/summary.json") is None

    second, status, logs = submit_job(local_cluster, command)
    assert status == "SUCCEEDED", logs
    # The workers' own word (Ray's log dedup may fold rank 0's line into rank 1's)
    assert set(re.findall(r"rank \d resumed from epoch (\d+) \(attempt 1\)", logs)) == {str(stopped_at)}, logs
    metrics = _bucket_json(local_cluster, f"{out}/summary.json")["metrics"]
    assert metrics["epochs_run"] == RESUME_EPOCHS and metrics["resumes"] == 1
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(RESUME_EPOCHS))
    # Epochs up to the checkpoint ran in the first job (attempt 0), only the rest in the second
    assert [h["attempt"] for h in history] == [0 if h["epoch"] <= stopped_at else 1 for h in history]

    client = mlflow.MlflowClient(tracking_uri=local_cluster.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.`smpp.stage` = 'train'", order_by=["attributes.start_time ASC"])
    # One per job: the stopped one KILLED (`ray job stop` sends SIGTERM), the resumed one FINISHED
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]


def _listening_sockets(pids: set[int]) -> dict[str, set[int]]:
    """``host:port`` of every TCP socket in LISTEN state that one of ``pids`` holds, read from
    /proc (no `ss` needed): socket inodes from each process's fds, addresses from /proc/net."""
    inodes: dict[str, set[int]] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.setdefault(target[len("socket:["):-1], set()).add(pid)
        except OSError:
            continue  # exited while we looked
    listening: dict[str, set[int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            listening[f"{_proc_net_ip(address, width)}:{int(port, 16)}"] = inodes[inode]
    return listening


def _proc_net_ip(hex_address: str, width: int) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order) in text."""
    import ipaddress
    import struct

    words = [int(hex_address[i:i + 8], 16) for i in range(0, width, 8)]
    packed = b"".join(struct.pack("<I", w) for w in words)
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


@pytest.mark.slow
def test_every_cluster_service_listens_on_loopback_only(local_cluster: LocalCluster, pipeline_job: PipelineJob):
    """After the jobs above (Train workers, Data and Tune workers, the job supervisor all ran),
    no process of the cluster listens on anything but loopback."""
    pids = cluster_processes(local_cluster.cluster_id, local_cluster.sessions)
    listening = _listening_sockets(pids)
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pids_ in listening.values() for pid in pids_
             if Path(f"/proc/{pid}/comm").exists()}
    # GCS, 2 raylets x 2, 2 dashboard agents, 2 runtime-env agents, dashboard, MLflow, S3, ...
    assert len(listening) >= 10, listening
    exposed = {address: sorted(names.get(p, str(p)) for p in holders) for address, holders in listening.items()
               if address.rsplit(":", 1)[0] not in ("127.0.0.1", "::1")}
    assert exposed == {}, f"listening beyond loopback: {exposed}"
    state = _read_state(local_cluster.state_dir / "cluster.state")
    for port_name in ("GCS_PORT", "DASHBOARD_PORT", "MLFLOW_PORT", "S3_PORT"):
        assert f"127.0.0.1:{state[port_name]}" in listening, port_name


def test_local_ray_listens_on_loopback_only(ray_session):
    """The local Ray a command starts (here the session's, through ``init_ray``) serves this
    process only: after a task ran (so workers exist), no process it started listens beyond
    loopback, and the driver's environment is left as it was (a later ``ray start`` may join a
    real cluster)."""
    import psutil

    @ray_session.remote(num_cpus=0)
    def node_ip() -> str:
        return ray_session.util.get_node_ip_address()

    assert ray_session.get(node_ip.remote()) == "127.0.0.1"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    started = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = _listening_sockets(started)
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pids_ in listening.values() for pid in pids_
             if Path(f"/proc/{pid}/comm").exists()}
    assert any(name in ("gcs_server", "raylet") for name in names.values()), names  # Ray's own were seen
    exposed = {address: sorted(names.get(p, str(p)) for p in holders) for address, holders in listening.items()
               if address.rsplit(":", 1)[0] not in ("127.0.0.1", "::1")}
    assert exposed == {}, f"listening beyond loopback: {exposed}"


def _secrets(cluster: LocalCluster) -> dict[str, str]:
    return {"ray token": Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
            "mlflow password": cluster.env["MLFLOW_TRACKING_PASSWORD"],
            "s3 secret key": cluster.env["AWS_SECRET_ACCESS_KEY"]}


@pytest.mark.slow
def test_no_secret_in_logs_summaries_or_mlflow(local_cluster: LocalCluster, pipeline_job: PipelineJob):
    """The cluster's secrets (Ray token, MLflow password, S3 secret key) appear nowhere a run
    writes: the job's console, every file of the run in the bucket (summaries, stage logs,
    reports, configs), and the params, tags and summary artifacts of its MLflow runs."""
    import mlflow

    secrets = _secrets(local_cluster)
    places: dict[str, str] = {"job logs": pipeline_job.logs}
    for name in _bucket_files(local_cluster, pipeline_job.out):
        if name.endswith((".json", ".log", ".csv", ".md", ".html", ".yaml", ".txt")):
            with _bucket(local_cluster).open_input_stream(f"{pipeline_job.out.removeprefix('s3://')}/{name}") as f:
                places[name] = f.read().decode("utf-8", errors="replace")
    assert any(name.startswith("logs/") for name in places), sorted(places)  # the stage logs were read
    client = mlflow.MlflowClient(tracking_uri=local_cluster.tracking_uri)
    experiment = client.get_experiment_by_name(pipeline_job.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 8  # the pipeline run, 7 stages, the searches and trials
    for run in runs:
        places[f"mlflow run {run.info.run_name} params+tags"] = json.dumps([run.data.params, run.data.tags])
    leaks = [(what, where) for where, text in places.items() for what, secret in secrets.items() if secret in text]
    assert leaks == []


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
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "AWS_REGION": "eu-west-1",
                                       **({"SMPP_GIT_COMMIT": commit} if commit else {})}


def test_submit_sh_refuses_missing_address_and_config():
    no_address = subprocess.run(["bash", str(SUBMIT_SH), "run", "--", "python", "-V"], env=_clean_env(),
                                capture_output=True, text=True, timeout=60)
    assert no_address.returncode == 2 and "RAY_ADDRESS" in no_address.stderr
    missing = subprocess.run(["bash", str(SUBMIT_SH), "pipeline", "no-such-config"],
                             env=_clean_env(RAY_ADDRESS="http://127.0.0.1:1"), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "jobs/configs/no-such-config.yaml" in missing.stderr
