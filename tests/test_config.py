"""The config tree: loading, overrides, errors that name the key, the generated README block."""

from __future__ import annotations

from pathlib import Path

import pytest

from smpp_ray.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
)
from smpp_ray.docs import render_readme

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load_and_are_frozen():
    config = load_config()
    assert config == Config()
    with pytest.raises(AttributeError):
        config.train.epochs = 3  # type: ignore[misc]


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.01\ntune:\n  models: [lightgbm]\n")
    config = load_config(path, ["train.epochs=3", "model.backbone=ViT-B-16", "train.lr=1"])
    assert config.train.epochs == 3
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.backbone == "ViT-B-16"
    assert config.tune.models == ("lightgbm",)


@pytest.mark.parametrize("override, named", [
    ("train.epoch=3", "train.epoch"),
    ("trian.epochs=3", "trian"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("train.use_gpu=maybe", "train.use_gpu"),
    ("data.split=random", "data.split"),
    ("tune.models=[xgboost]", "tune.models"),
    ("model.n_ctx=3", "model.n_ctx"),
    ("train.lr=.inf", "train.lr: expected a finite number"),
    ("train.lr=.nan", "train.lr: expected a finite number"),
    ("tune.cpus_per_trial=-1", "tune.cpus_per_trial is an amount of a resource"),
    ("ray.num_cpus=-2", "ray.num_cpus is an amount of a resource"),
    ("train=0", "train is a section"),
    ("synth.form=2024", "synth.form"),
    ("data.taxonomy=", "data.taxonomy"),
    ("data.format=csv", "data.format"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1)"),   # train and tune choose on val
    ("tune.objective=rmse", "tune.objective"),
    ("tune.min_rounds=-1", "tune.min_rounds"),
])
def test_bad_key_or_value_is_an_error_naming_it(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert named in str(err.value)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_dict_round_trip_and_flat_params():
    config = load_config(None, ["train.epochs=2", "tune.feature_groups=[user, time]"])
    assert config_from_dict(config_to_dict(config)) == config
    flat = flatten_config(config)
    assert flat["train.epochs"] == 2
    assert flat["tune.feature_groups"] == ["user", "time"]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_the_config_reference_is_in_sync():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert render_readme(text) == text, "run `python -m smpp_ray.docs docs/configuration.md` to regenerate the block"


def test_a_bad_setting_is_exit_2_through_the_cli(tmp_path, caplog):
    """The CLI refuses `--set train=0` (which used to reset the section silently) before any work."""
    from smpp_ray.cli import EXIT_BAD_INPUT, main

    assert main(["synth", "--out", str(tmp_path / "raw"), "--posts", "10", "--set", "train=0"]) == EXIT_BAD_INPUT
    assert "train is a section" in caplog.text and not (tmp_path / "raw").exists()
