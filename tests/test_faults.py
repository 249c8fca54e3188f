"""Faults stay visible and deduplicated: a killed extraction actor loses and duplicates no post; a
stopped stage ends its MLflow runs KILLED and exits 128 + the signal; a stopped tune stage rerun
resumes in the same MLflow tree (real Ray, real MLflow stores)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_extract import _save_tiny_checkpoint
from test_features_tabular import make_posts, write_dataset

from smpp_ray import tracking
from smpp_ray.config import ExtractConfig
from smpp_ray.data.schema import SPLITS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_killed_extraction_actor_loses_and_duplicates_no_post(ray_session, tmp_path, monkeypatch):
    from smpp_ray.features import extract_features
    from smpp_ray.features.extract import CRASH_ONCE_ENV

    posts = make_posts(32, seed=5, users=4, image_size=24)
    dataset = write_dataset(posts, tmp_path / "data")
    checkpoint = _save_tiny_checkpoint(tmp_path / "train")
    marker = tmp_path / "actor-crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # read by the driver, handed to the actors
    # One actor: its death leaves no other to take the batches, so the run completes only if Ray
    # restarts it and retries the batch it held (and one actor starts faster on 2 cores than two).
    config = ExtractConfig(batch_size=8, min_actors=1, max_actors=1, cpus_per_actor=1, pca_components=0,
                           user_description_components=2)
    result = extract_features(str(dataset), str(checkpoint), str(tmp_path / "features"), extract_config=config)

    assert marker.exists()  # an actor did die mid-run, after its first batch had gone downstream
    # Rows come from the restarted actor, and from the dead one when its first batch's output had
    # left before it died (timing: Ray reports an actor task's output when the task returns).
    assert 1 <= result["actors_used"] <= 2, result["workers"]
    written = pd.concat([pq.read_table(tmp_path / "features" / f"split={s}").to_pandas().assign(split=s)
                         for s in SPLITS], ignore_index=True)
    assert not written["pid"].duplicated().any()
    assert sorted(written["pid"]) == sorted(posts["pid"])  # rows in = rows out (extraction rejects none)
    assert written.set_index("pid").loc[posts["pid"], "split"].tolist() == posts["split"].tolist()
    assert result["rows"] == posts.groupby("split").size().to_dict()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_every_open_run_killed(tmp_path, signum):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    opened: dict[str, str] = {}
    outside = tracking.create_run(uri, "faults", "opened-before")  # its opener ends it, not the stop
    with pytest.raises(tracking.StopRequested) as stopped:
        with tracking.stop_signals_end_runs():
            with tracking.tracked_run(uri, "faults", "stage") as stage_id:
                opened["stage"] = stage_id
                # a run opened by the process but not by a block (a Tune trial's run)
                opened["trial"] = tracking.create_run(uri, "faults", "trial", parent_run_id=stage_id)
                done = tracking.create_run(uri, "faults", "done", parent_run_id=stage_id)
                tracking.end_run(uri, done)
                signal.raise_signal(signum)
                time.sleep(5)  # not reached: the handler raises at the next bytecode
    assert stopped.value.code == 128 + signum
    client = tracking.client(uri)
    assert {name: client.get_run(run_id).info.status for name, run_id in opened.items()} == {
        "stage": "KILLED", "trial": "KILLED"}
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(outside).info.status == "RUNNING"
    tracking.end_run(uri, outside)
    assert signal.getsignal(signum) is not tracking._on_stop_signal  # handlers restored


def test_a_stop_that_a_library_turns_into_another_exit_is_still_a_stop(tmp_path):
    """Ray's blocking ``ray.get`` (a Train run's ``fit``) catches the handler's StopRequested and
    raises ``SystemExit(1)`` instead; the pending signal still makes it a stop: KILLED, 143."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(tracking.StopRequested) as stopped:
        with tracking.stop_signals_end_runs():
            with tracking.tracked_run(uri, "faults", "train") as run_id:
                try:
                    signal.raise_signal(signal.SIGTERM)
                    time.sleep(5)  # not reached
                except tracking.StopRequested:
                    raise SystemExit(1) from None  # what Ray's check_status does with it
    assert stopped.value.code == 128 + signal.SIGTERM
    assert isinstance(stopped.value.__cause__, SystemExit) and stopped.value.__cause__.code == 1
    assert tracking.client(uri).get_run(run_id).info.status == "KILLED"
    # With no stop pending, the same exit is an ordinary failure
    with pytest.raises(SystemExit) as failed:
        with tracking.stop_signals_end_runs():
            with tracking.tracked_run(uri, "faults", "train") as run_id:
                raise SystemExit(1)
    assert failed.value.code == 1 and not isinstance(failed.value, tracking.StopRequested)
    assert tracking.client(uri).get_run(run_id).info.status == "FAILED"


def test_a_stopped_pipeline_names_the_stage_ends_killed_and_its_rerun_reattaches(tmp_path, monkeypatch, caplog):
    """In process and without Ray: the synth stage receives SIGTERM (the pipeline's handlers
    are installed as under `smpp pipeline`), then the same pipeline runs again."""
    import smpp_ray.data.synth as synth
    from smpp_ray.config import load_config
    from smpp_ray.pipeline import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(None, ["synth.posts=20", "synth.image_size=16", "tracking.experiment=faults"])
    real = synth.synthesize_corpus

    def stopped_midway(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "synthesize_corpus", stopped_midway)
    with pytest.raises(tracking.StopRequested) as stopped:
        run_pipeline(config, str(tmp_path / "run"), only=["synth"])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "pipeline stopped by SIGTERM during stage synth" in caplog.text
    assert "stage synth: stopped by SIGTERM" in caplog.text
    uri = f"sqlite:///{tmp_path / 'run' / 'mlruns.db'}"
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("faults").experiment_id
    statuses = {r.data.tags["mlflow.runName"]: r.info.status for r in client.search_runs([experiment])}
    assert statuses == {"pipeline": "KILLED", "synth": "KILLED"}

    monkeypatch.setattr(synth, "synthesize_corpus", real)
    result = run_pipeline(config, str(tmp_path / "run"), only=["synth"])
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    (pipeline,) = [r for r in runs if r.data.tags["mlflow.runName"] == "pipeline"]
    assert pipeline.info.run_id == result["mlflow_run_id"] and pipeline.info.status == "FINISHED"
    synth_runs = [r for r in runs if r.data.tags["mlflow.runName"] == "synth"]
    # synth reruns from scratch (a new run of the attempt), in the same pipeline tree
    assert [r.info.status for r in synth_runs] == ["KILLED", "FINISHED"]
    assert {r.data.tags[tracking.PARENT_TAG] for r in synth_runs} == {pipeline.info.run_id}


_STOPPABLE_STAGE = ("import pathlib, sys, time\n"
                    "from smpp_ray.tracking import stop_signals_end_runs\n"
                    "with stop_signals_end_runs():\n"
                    "    print('stage tune: starting', flush=True)\n"
                    "    pathlib.Path(sys.argv[1]).touch()\n"
                    "    time.sleep(60)\n")


def test_a_job_stop_reaching_the_supervisor_stops_the_stage_with_128_plus_the_signal(tmp_path, caplog):
    """job_entry forwards SIGTERM to the stage child, whose exit code (143) becomes the job's."""
    from smpp_ray.job_entry import supervise

    ready = tmp_path / "handlers-installed"

    def stop_once_ready() -> None:  # what `ray job stop` does to the job driver
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    started = time.time()
    threading.Thread(target=stop_once_ready, daemon=True).start()
    with caplog.at_level(logging.ERROR, logger="smpp_ray.job_entry"):
        code = supervise([sys.executable, "-c", _STOPPABLE_STAGE, str(ready)], "tune")
    assert code == 128 + signal.SIGTERM and time.time() - started < 50
    assert "smpp tune: stopped by SIGTERM during stage 'tune'" in caplog.text


def _tune_command(features: Path, out: Path, ray_address: str) -> list[str]:
    """``smpp tune``: 4 full-length LightGBM trials one at a time, on the test session's Ray."""
    overrides = ["tune.models=[lightgbm]", "tune.num_samples=4", "tune.max_rounds=300", "tune.grace_rounds=300",
                 "tune.report_every=30", "tune.max_concurrent_trials=1", "tune.cpus_per_trial=1",
                 "tune.registered_model_prefix=faults", f"ray.address={ray_address}"]
    return [sys.executable, "-m", "smpp_ray.cli", "tune", "--features", str(features), "--out", str(out),
            *[arg for o in overrides for arg in ("--set", o)]]


def _cli_env() -> dict[str, str]:
    """The single stage's default store (beside its folder), whatever this shell points at."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONUNBUFFERED": "1"}


def _read_lines(process: subprocess.Popen, lines: list[str], seen: threading.Event, pattern: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if pattern in line:
            seen.set()


def _runs(uri: str) -> list:
    client = tracking.client(uri)
    return client.search_runs([client.get_experiment_by_name("smpp").experiment_id], max_results=1000)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_tune_stage_ends_killed_and_its_rerun_resumes_in_the_same_tree(ray_session, tmp_path):
    from smpp_ray.gbdt.synthetic import write_synthetic_features
    from smpp_ray.gbdt.tracking_callback import FAMILY_TAG, TRIAL_TAG

    features = tmp_path / "features"
    write_synthetic_features(features, rows=3000, seed=0)
    out = tmp_path / "run" / "tune"
    uri = f"sqlite:///{tmp_path / 'run' / 'mlruns.db'}"  # a single stage's store: beside its folder
    address = ray_session.get_runtime_context().gcs_address

    process = subprocess.Popen(_tune_command(features, out, address), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_cli_env(), cwd=ROOT)
    lines: list[str] = []
    first_trial_done = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(process, lines, first_trial_done, "lightgbm trial 1/4"),
                              daemon=True)
    reader.start()
    assert first_trial_done.wait(180), "".join(lines)
    process.send_signal(signal.SIGTERM)  # what `ray job stop` sends (job_entry forwards it)
    code = process.wait(120)
    reader.join(10)
    text = "".join(lines)
    assert code == 128 + signal.SIGTERM, text
    assert "stage tune: stopped by SIGTERM" in text, text

    runs = _runs(uri)
    (stage,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune"]
    (search,) = [r for r in runs if r.data.tags.get(FAMILY_TAG) == "lightgbm" and TRIAL_TAG not in r.data.tags]
    assert stage.info.status == "KILLED" and search.info.status == "KILLED"
    trials = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert trials and {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    assert "RUNNING" not in {r.info.status for r in runs}

    rerun = subprocess.run(_tune_command(features, out, address), capture_output=True, text=True, cwd=ROOT,
                           env=_cli_env(), timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    runs = _runs(uri)
    # one tree: the same stage run and search run, every trial (resumed or new) under that search
    (stage_again,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune"]
    (search_again,) = [r for r in runs if r.data.tags.get(FAMILY_TAG) == "lightgbm" and TRIAL_TAG not in r.data.tags]
    assert (stage_again.info.run_id, search_again.info.run_id) == (stage.info.run_id, search.info.run_id)
    assert search_again.data.tags[tracking.PARENT_TAG] == stage.info.run_id
    assert stage_again.info.status == search_again.info.status == "FINISHED"
    trials = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert len({r.data.tags[TRIAL_TAG] for r in trials}) == len(trials) == 4
    assert {r.data.tags[tracking.PARENT_TAG] for r in trials} == {search.info.run_id}
    assert {r.info.status for r in trials} == {"FINISHED"}
