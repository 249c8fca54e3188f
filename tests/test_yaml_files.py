"""Every shipped YAML parses, and each one means what it says (litgpt's test_config_hub idea).

- every ``*.yaml`` under jobs/ and cluster/ parses (multi-document Kubernetes files included);
- every ``jobs/configs/*.yaml`` loads into the config tree;
- the Ray cluster launcher file passes Ray's own launcher schema;
- the KubeRay manifests pin this Ray version, enable token auth and request GPUs;
- every ``jobs/configs/<name>.yaml`` a cluster file names exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def _shipped_yaml() -> list[Path]:
    files = [p for folder in ("jobs", "cluster") for p in (REPO / folder).rglob("*.y*ml")]
    # cluster/.local holds a running local cluster's state, not shipped files
    return sorted(p for p in files if ".local" not in p.relative_to(REPO).parts)


def _configs() -> list[Path]:
    return sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


@pytest.mark.parametrize("path", _shipped_yaml(), ids=_ids(_shipped_yaml()))
def test_yaml_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if path.parent.name == "configs":
        return  # an empty config file is a valid config (all defaults); loading is tested below
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top level of each document must be a mapping"


@pytest.mark.parametrize("path", _configs(), ids=_ids(_configs()))
def test_job_config_loads_into_config_tree(path: Path):
    from smpp_ray.config import Config, load_config

    config = load_config(path)
    assert isinstance(config, Config)


def test_job_configs_exist_or_skip():
    if not _configs():
        pytest.skip("jobs/configs/ holds no YAML yet")


def test_launcher_config_passes_ray_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))  # raises on a key or value Ray does not accept

    gpu_types = [name for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "the launcher must define a GPU worker type"
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert ray.__version__ in config["docker"]["image"], "the image must carry the Ray version the package pins"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{key} must enable token auth"
    assert any("pip install" in c and "smpp_ray" in c for c in config["setup_commands"])
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])


def test_launcher_schema_check_is_not_vacuous():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    config["max_workers"] = "eight"
    with pytest.raises(Exception, match="eight"):
        validate_config(prepare_config(config))


def _ray_clusters() -> list[tuple[Path, dict]]:
    """(file, RayCluster spec) for every RayCluster and every RayJob's rayClusterSpec."""
    found = []
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayCluster":
                found.append((path, doc["spec"]))
            elif doc and doc.get("kind") == "RayJob":
                found.append((path, doc["spec"]["rayClusterSpec"]))
    return found


def test_kuberay_manifests_are_complete():
    import ray

    kinds = set()
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: {doc.get('kind')} lacks a field"
            assert doc["metadata"].get("name"), f"{path}: {doc['kind']} has no metadata.name"
            kinds.add(doc["kind"])
    assert {"RayCluster", "RayJob"} <= kinds

    clusters = _ray_clusters()
    assert len(clusters) >= 2
    for path, spec in clusters:
        assert spec["rayVersion"] == ray.__version__, f"{path}: rayVersion {spec['rayVersion']!r}"
        assert spec["authOptions"]["mode"] == "token", f"{path}: token auth must be on"
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{path}: no GPU worker group"
        for group in gpu_groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{path}: {group['groupName']}"

    job = next(doc for p in KUBERAY for doc in yaml.safe_load_all(p.read_text()) if doc["kind"] == "RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert "jobs/pipeline.py" in job["spec"]["entrypoint"]


def test_configs_named_by_cluster_files_exist():
    if not _configs():
        pytest.skip("jobs/configs/ holds no YAML yet")
    texts = [p.read_text() for p in [LAUNCHER, *KUBERAY, REPO / "cluster" / "README.md"] if p.exists()]
    named = {m for text in texts for m in re.findall(r"jobs/configs/([\w.-]+)\.yaml", text)}
    missing = sorted(n for n in named if not (REPO / "jobs" / "configs" / f"{n}.yaml").exists())
    assert not missing, f"cluster files name configs that jobs/configs/ lacks: {missing}"
