"""The README's commands, run as written: the documented path and the tested path cannot drift.

Every fenced ``bash`` block right after a ``<!-- tested: ... -->`` marker in README.md is run by
bash (``set -euo pipefail``) in a fresh copy of the checkout (tracked and untracked-but-not-
ignored files, ``.venv`` linked in), as a person who cloned the repository and ran ``make test``
once would run it. Slow: a real two-node cluster running the smoke pipeline, and ``make demo``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cluster import _CLIENT_VARS, cluster_processes

from smpp_ray.stage_table import PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCORING = "Scoring new posts: predict, the registry, serve"
_MARKER = re.compile(r"<!-- tested:[^>]*-->\s*\n```bash\n(.*?)\n```", re.S)


def readme_blocks(section: str) -> list[str]:
    """The marked bash blocks of the README section headed ``## <section>``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return _MARKER.findall(text[start:end if end > 0 else len(text)])


def test_every_marked_block_is_found():
    """Each section the suite runs has its block (a renamed heading must not silently skip it)."""
    assert len(readme_blocks("Running on a cluster")) == 1
    assert len(readme_blocks("The two commands")) == 1
    assert len(readme_blocks(SCORING)) == 2
    assert "cluster/local.sh up" in readme_blocks("Running on a cluster")[0]


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """What a fresh clone holds (committed or not, minus ignored files), with this .venv linked."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "checkout"
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)  # keeps mtimes: make sees the venv as up to date
    (copy / ".venv").symlink_to(REPO / ".venv")
    stamp = REPO / ".venv" / ".installed"
    if stamp.exists():
        # `make` in the copy must not reinstall the shared .venv from it (an editable install
        # pointing into a temporary folder): the copy's pyproject is never newer than the stamp.
        older = stamp.stat().st_mtime - 1
        os.utime(copy / "pyproject.toml", (older, older))
    return copy


def run_block(block: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS and k != "SMPP_CLUSTER_DIR"}
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_cluster_commands_as_written(checkout_copy: Path):
    block = readme_blocks("Running on a cluster")[0]
    state = checkout_copy / "cluster" / ".local"
    try:
        done = run_block(block, checkout_copy, timeout=1300)
        output = done.stdout[-6000:] + done.stderr[-6000:]
        assert done.returncode == 0, output
        # once from `ray job submit`, once from `jobs/submit.sh status probe-1`
        assert (done.stdout + done.stderr).count("Job 'probe-1' succeeded") == 2, output
        # the job's tasks ran on both nodes (the pipeline job itself: tests/test_cluster.py)
        (line,) = [x for x in (done.stdout + done.stderr).splitlines() if "CLUSTER_PROBE_RESULT " in x]
        result = json.loads(line.split("CLUSTER_PROBE_RESULT ", 1)[1])
        assert len(set(result["node_ids"])) == 2, result
        # `down` (the block's last line) left nothing of the cluster running
        records = (state / "processes.stopped").read_text().splitlines()
        sessions = {int(line.split()[2]) for line in records}
        assert cluster_processes("", sessions) == set()
    finally:
        subprocess.run(["bash", str(checkout_copy / "cluster" / "local.sh"), "down"], cwd=checkout_copy,
                       capture_output=True, timeout=120)


#: Lines only Ray, MLflow, torch or Python's warnings print; none may reach the default console.
LIBRARY_CHATTER = ("pid=", "core_worker", "raylet", "streaming_executor", "Execution plan", "worker.py",
                   "UserWarning", "DeprecationWarning", "FutureWarning", "WARNING ", "INFO ", "Traceback",
                   "ray.data", "mlflow.", "\x1b[")


def assert_console_is_the_projects(console: str, *, epochs: int, trials: int) -> None:
    """`make demo`'s console: the project's lines only (stages, epochs, trials, the results)."""
    lines = [line for line in console.splitlines() if line.strip()]
    noise = [line for line in lines if any(word in line for word in LIBRARY_CHATTER)
             and not line.startswith(("make", ".venv/bin/"))]
    assert not noise, "\n".join(noise[:20])
    for number, stage in enumerate(PIPELINE_STAGES, 1):
        assert f"[{number}/{len(PIPELINE_STAGES)}] {stage}" in console, stage
    for epoch in range(1, epochs + 1):
        assert f"epoch {epoch}/{epochs} train_loss" in console, epoch
    for family in ("lightgbm", "catboost"):
        assert f"{family} trial {trials}/{trials}" in console, family
    assert "MLflow UI: mlflow ui" in console and "Report: " in console
    assert len(lines) <= 60, f"{len(lines)} console lines"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_demo_then_predict_as_written(checkout_copy: Path):
    two_commands = readme_blocks("The two commands")[0]
    demo = [line for line in two_commands.splitlines() if line.startswith("make demo")]
    assert len(demo) == 1, two_commands
    done = run_block(demo[0], checkout_copy, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert "Test split" in done.stdout and "blend" in done.stdout, done.stdout[-3000:]
    assert_console_is_the_projects(done.stdout + done.stderr, epochs=4, trials=4)
    logs = checkout_copy / "runs" / "demo" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(["pipeline.log", *(f"{s}.log" for s in PIPELINE_STAGES)])
    assert "TrainController" in (logs / "train.log").read_text()  # Ray Train's own account, in its stage's file

    import pandas as pd

    from_pipeline, from_registry = readme_blocks(SCORING)
    predict = run_block(from_pipeline, checkout_copy, timeout=600)
    assert predict.returncode == 0, predict.stdout[-6000:] + predict.stderr[-6000:]
    scores = pd.read_csv(checkout_copy / "runs" / "scores.csv", dtype={"pid": str}).set_index("pid")
    assert len(scores) == 50  # 40 train_ + 10 test_ posts, none rejected
    assert scores["predicted_popularity"].notna().all()
    assert scores.index.is_unique

    registry = run_block(from_registry, checkout_copy, timeout=600)
    assert registry.returncode == 0, registry.stdout[-6000:] + registry.stderr[-6000:]
    again = pd.read_csv(checkout_copy / "runs" / "scores.csv", dtype={"pid": str}).set_index("pid")
    pd.testing.assert_series_equal(again.loc[scores.index, "predicted_popularity"], scores["predicted_popularity"])
