"""The `smpp` command line: help for every subcommand and exit codes that mean something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smpp_ray.cli import EXIT_BAD_INPUT, build_parser, main
from smpp_ray.stage_table import PIPELINE_STAGES

COMMANDS = [*PIPELINE_STAGES, "predict", "serve", "config", "pipeline"]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help_with_examples_config_and_set(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--config" in out and "--set" in out


def test_version_and_help_without_empty_defaults(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "smpp 0.1.0"
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "--data DATA" in out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "smpp_ray.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: smpp" in result.stdout


def test_bad_usage_and_bad_config_exit_2(tmp_path, caplog):
    assert main(["train"]) == EXIT_BAD_INPUT  # required flags missing
    assert main(["synth", "--out", str(tmp_path), "--set", "synth.postz=3"]) == EXIT_BAD_INPUT
    assert "synth.postz" in caplog.text


def test_missing_input_folder_exits_2(tmp_path, caplog):
    code = main(["prepare", "--raw", str(tmp_path / "absent"), "--out", str(tmp_path / "data"),
                 "--set", "tracking.enabled=false"])
    assert code == EXIT_BAD_INPUT
    assert "absent" in caplog.text


def test_parser_knows_every_command():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sorted(choices) == sorted(COMMANDS)


def test_local_paths_become_absolute_and_uris_pass_through(tmp_path, monkeypatch):
    from smpp_ray.stage_table import pipeline_layout
    from smpp_ray.storage import normalize

    monkeypatch.chdir(tmp_path)
    assert normalize("runs/demo") == str(tmp_path / "runs" / "demo")
    assert normalize("s3://bucket/runs/demo") == "s3://bucket/runs/demo"
    # The layout of an s3:// pipeline keeps the scheme (pathlib folds s3:// into s3:/)
    layout = pipeline_layout("s3://b/r")
    assert layout["data"] == "s3://b/r/data" and layout["report"] == "s3://b/r/report"


def test_an_s3_pipeline_without_a_tracking_server_is_refused_clearly(monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["pipeline", "--out", "s3://bucket/run"]) == EXIT_BAD_INPUT
    assert "MLFLOW_TRACKING_URI" in caplog.text and "s3://bucket/run" in caplog.text


def test_config_show_prints_the_effective_config_that_loads_back(tmp_path, capsys):
    """`smpp config show`: YAML of --config + --set, which as a config file gives the same config."""
    import yaml

    from smpp_ray.config import config_to_dict, load_config

    smoke = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.yaml")
    assert main(["config", "show", "--config", smoke, "--set", "train.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 3 and shown["synth"]["posts"] == 360  # the --set, then the YAML
    assert shown["serve"]["host"] == "127.0.0.1"  # and every default
    (tmp_path / "effective.yaml").write_text(yaml.safe_dump(shown))
    assert config_to_dict(load_config(tmp_path / "effective.yaml")) == config_to_dict(
        load_config(smoke, ["train.epochs=3"]))
    assert main(["config", "show", "--set", "train.epochz=3"]) == EXIT_BAD_INPUT


def test_a_single_stage_keeps_its_mlflow_store_and_log_beside_its_output(tmp_path, monkeypatch, capsys):
    """Not in the folder the command runs from: `<out>/../mlruns.db` and `<out>/../logs/<stage>.log`."""
    from smpp_ray.tracking import client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run" / "raw"
    assert main(["synth", "--out", str(out), "--posts", "20", "--set", "synth.image_size=16"]) == 0
    capsys.readouterr()
    assert list(elsewhere.iterdir()) == []
    store = tmp_path / "run" / "mlruns.db"
    runs = client(f"sqlite:///{store}").search_runs(
        [client(f"sqlite:///{store}").get_experiment_by_name("smpp").experiment_id])
    assert [r.data.tags["mlflow.runName"] for r in runs] == ["synth"]
    log = (tmp_path / "run" / "logs" / "synth.log").read_text()
    assert "stage synth: done" in log
    assert not (out / "logs").exists()  # a stage folder holds only its outputs (they are fingerprinted)


def test_a_stage_writing_to_s3_leaves_its_log_beside_its_output(s3_bucket, capsys):
    """The log of a URI output is written on the node, then copied to the run's storage, where
    the stage's output is: ``<parent>/logs/<command>.log`` as for a local folder."""
    from smpp_ray import storage

    out = f"{s3_bucket}/run/raw"
    assert main(["synth", "--out", out, "--posts", "20", "--set", "synth.image_size=16",
                 "--set", "tracking.enabled=false"]) == 0
    capsys.readouterr()
    log = storage.read_text(f"{s3_bucket}/run/logs/synth.log")
    assert "stage synth: done" in log
    assert not storage.exists(f"{out}/logs")


def test_a_pipeline_writes_one_log_per_stage_and_keeps_its_own_for_the_story(ray_session, tmp_path, capsys):
    """`smpp pipeline`: each stage's library-level output lands in `<out>/logs/<stage>.log`;
    `logs/pipeline.log` keeps the project's lines and names those files.

    The library lines checked are the project's file-only records (``smpp.details.*``, which
    propagate to the root logger like any library's): Ray Data's own logger is configured once per
    process, here by earlier tests outside any capture, so its lines say nothing in this process.
    The README's `make demo` test checks Ray Train's lines in a fresh process's `logs/train.log`."""
    out = tmp_path / "run"
    assert main(["pipeline", "--config", "jobs/configs/smoke.yaml", "--out", str(out), "--only", "synth,prepare",
                 "--set", "synth.posts=40", "--set", "synth.test_posts=0", "--set", "tracking.enabled=false"]) == 0
    console_text = capsys.readouterr().err
    logs = out / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["pipeline.log", "prepare.log", "synth.log"]
    prepare, story = (logs / "prepare.log").read_text(), (logs / "pipeline.log").read_text()
    detail = "prepare: split=train wrote 32 of 32 posts"  # a library-level line of the stage
    assert detail in prepare, prepare[-2000:]
    assert detail not in story and detail not in console_text
    assert "synth: wrote 40 train posts" in (logs / "synth.log").read_text()
    assert "[2/2] prepare" in story and "stage prepare: done" in story  # the project's lines, in both
    assert "stage prepare: done" in prepare
    assert f"stage prepare: library output in {logs / 'prepare.log'}" in story
    assert "[2/2] prepare" in console_text


SECRET_URI = "http://alice:s3cret-pw@127.0.0.1:9"


def test_a_corpus_too_small_for_the_search_is_refused_right_after_prepare(ray_session, tmp_path, capsys):
    """120 posts give a 12-post val split: the pipeline stops with exit 2 and the numbers right
    after prepare, before prototypes, training and extraction spend their minutes; the stages
    before the check keep their outputs (a larger val fraction reuses nothing it should not)."""
    out = tmp_path / "run"
    code = main(["pipeline", "--config", "jobs/configs/smoke.yaml", "--out", str(out), "--set", "synth.posts=120",
                 "--set", "synth.test_posts=0", "--set", "tracking.enabled=false"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train holds 96 posts and val 12" in err and "tune.min_val_posts=20" in err, err[-1500:]
    assert (out / "data" / "summary.json").is_file() and not (out / "prototypes").exists()


def test_a_password_in_a_uri_never_reaches_the_console_the_log_or_config_show(tmp_path, capsys):
    """The error path (a location naming credentials) and `config show` print the URI redacted;
    the log file holds no password either and is readable by its owner only."""
    out = tmp_path / "run" / "data"
    code = main(["prepare", "--raw", f"{SECRET_URI}/raw", "--out", str(out), "--set", "tracking.enabled=false"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "http://***@127.0.0.1:9/raw" in err and "s3cret-pw" not in err
    log = tmp_path / "run" / "logs" / "prepare.log"
    assert "http://***@127.0.0.1:9/raw" in log.read_text() and "s3cret-pw" not in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o600

    assert main(["config", "show", "--set", f"tracking.tracking_uri={SECRET_URI}"]) == 0
    shown = capsys.readouterr().out
    assert "tracking_uri: http://***@127.0.0.1:9" in shown and "s3cret-pw" not in shown
