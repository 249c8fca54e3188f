"""Prototypes and training with every location on S3 (a real moto server on 127.0.0.1).

The dataset is prepared locally and uploaded; the prototypes stage reads it from S3 and writes
its bank to S3; one short Ray Train run (1 epoch, 1 worker, tiny model) reads both from S3 and
persists its checkpoints to ``<out>/ray_results`` in the bucket. The run caches its image
features (``train.cache_image_features``, float32): a Ray Data job encodes every post once into
the bucket and the worker streams those instead of pixels, so the probe logits the worker
computed from stored features must equal the pixel path's at inference. Its best checkpoint is an
``s3://`` location that ``resolve_checkpoint`` accepts and that loads for inference.

Ray workers see the S3 endpoint and credentials only through the ``AWS_*`` variables as they
were when Ray started, so the session's ``ray_session`` starts after the ``s3_endpoint`` server
(tests/conftest.py) and ``ray_with_s3`` checks from a worker that they arrived.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from smpp_ray import storage
from smpp_ray.config import ModelConfig, TrainConfig
from smpp_ray.model import checkpoint as ckpt
from smpp_ray.model.backbone import TINY_MODEL
from smpp_ray.model.checkpoint import load_model_from_checkpoint, resolve_checkpoint
from smpp_ray.model.prototypes import PROTOTYPES_FILE
from smpp_ray.summary import write_summary

RUN_NAME = "s3-run"


@pytest.fixture(scope="module")
def bucket(module_bucket) -> str:
    return module_bucket


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_with_s3, bucket) -> dict[str, str]:
    """~240 synthetic posts prepared locally, then uploaded: the S3 copy is what the stages read."""
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("s3-train")
    synthesize_corpus(str(root / "raw"), posts=240, seed=3)
    local = str(root / "data")
    prepare_dataset(str(root / "raw"), local, val_fraction=0.15, test_fraction=0.05)
    remote = storage.upload_dir(local, f"{bucket}/data")
    return {"local": local, "remote": remote, "root": str(root)}


@pytest.fixture(scope="module")
def prototypes(dataset, bucket) -> dict:
    from smpp_ray.prototype_job import build_prototypes

    out = f"{bucket}/prototypes"
    summary = build_prototypes(dataset["remote"], out, backbone=TINY_MODEL, shots=8, time_buckets=2,
                               batch_size=32, num_actors=1, seed=0)
    return {"out": out, "summary": summary}


def _train(dataset, prototypes, bucket):
    from smpp_ray.train.trainer import train_model

    config = TrainConfig(num_workers=1, cpus_per_worker=1.0, epochs=1, batch_size=16, lr=1e-2,
                         warmup_epochs=0.5, checkpoints_to_keep=1, max_failures=0, early_stopping_patience=0,
                         name=RUN_NAME, cache_image_features=True, image_features_dtype="float32")
    return train_model(dataset["remote"], prototypes["out"], f"{bucket}/run/train", model_config=ModelConfig(),
                       train_config=config, tracking=None)


@pytest.fixture(scope="module")
def trained(dataset, prototypes, bucket) -> dict:
    return _train(dataset, prototypes, bucket)


def _checkpoint_names(run_path: str) -> list[str]:
    return [n for n in storage.list_names(run_path) if n.startswith("checkpoint_") and not n.endswith(".json")]


def _train_stage(bucket: str, best: str) -> str:
    """The train stage folder as ``stages`` leaves it: a summary naming the best checkpoint."""
    stage = f"{bucket}/run/train"
    write_summary(stage, {"stage": "train", "status": "complete", "artifacts": {"best_checkpoint": best}})
    return stage


def test_prototypes_read_from_and_written_to_s3_equal_the_in_process_bank(prototypes, dataset):
    from smpp_ray.data.dataset import Dataset
    from smpp_ray.model.prototypes import (
        MEMBERS_FILE,
        PROTOTYPES_FILE,
        EmbedPosts,
        PrototypeBank,
        compute_prototypes,
    )

    summary, out = prototypes["summary"], prototypes["out"]
    assert summary["prototypes_path"] == f"{out}/{PROTOTYPES_FILE}"
    assert summary["members_path"] == f"{out}/{MEMBERS_FILE}"
    bank = PrototypeBank.load(summary["prototypes_path"])
    members = storage.read_json(summary["members_path"])
    assert bank.visual.shape == (88, 64) and bank.metadata["backbone"] == TINY_MODEL
    assert len(members["classes"]) == 88 and members["randomly_initialised"] is True

    table = pq.read_table(f"{dataset['local']}/posts/split=train")
    embedded = EmbedPosts(TINY_MODEL)({c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names})
    expected, expected_members = compute_prototypes(embedded, Dataset(dataset["local"]).taxonomy(), shots=8,
                                                    time_buckets=2, seed=0, embed_dim=64)
    assert [c["pids"] for c in members["classes"]] == [c["pids"] for c in expected_members["classes"]]
    torch.testing.assert_close(bank.visual, expected.visual, rtol=0, atol=1e-5)
    assert torch.equal(bank.counts, expected.counts)


@pytest.mark.slow
def test_training_with_out_on_s3_checkpoints_into_the_bucket(trained, prototypes, bucket):
    run_path = f"{bucket}/run/train/ray_results/{RUN_NAME}"
    assert trained["run_path"] == run_path
    best = trained["best_checkpoint"]
    assert best.startswith(f"{run_path}/checkpoint_"), best
    for name in (ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE, ckpt.META_FILE, PROTOTYPES_FILE, ckpt.PROBE_FILE):
        assert storage.is_file(f"{best}/{name}"), name
    meta = ckpt.read_meta(best)
    assert meta["prototypes_path"] == f"{prototypes['out']}/prototypes.safetensors"  # a location, not a local path
    assert meta["epoch"] == trained["best_epoch"] == 0 and trained["epochs_run"] == 1

    assert resolve_checkpoint(best) == best
    assert resolve_checkpoint(_train_stage(bucket, best)) == best


@pytest.mark.slow
def test_image_features_are_encoded_once_into_the_bucket(trained, dataset, prototypes, bucket):
    from smpp_ray.train.data import count_rows
    from smpp_ray.train.image_features import MANIFEST, POOLED, build_image_features, read_manifest

    facts = trained["image_features"]
    location = f"{trained['run_path']}/image_features"
    assert facts["location"] == location and not facts["reused"]
    expected = {split: count_rows(dataset["remote"], split) for split in ("train", "val")}
    assert facts["rows"] == expected and read_manifest(location)["rows"] == expected
    assert storage.is_file(f"{location}/{MANIFEST}")
    fs, path = storage.resolve(f"{location}/train")
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table.column("pid").to_pylist()) == sorted(
        pq.read_table(f"{dataset['local']}/posts/split=train").column("pid").to_pylist())  # each post once
    assert "pixels" not in table.column_names
    assert np.asarray(table.column(POOLED).to_numpy(zero_copy_only=False)[0]).size == 64  # (D,) per post

    from smpp_ray.model.backbone import backbone_spec

    spec = backbone_spec(ModelConfig().backbone, ModelConfig().context_length)
    again = build_image_features(dataset["remote"], location, splits=("train", "val"), spec=spec,
                                 model_config=ModelConfig(), taxonomy=None, prototypes_path=prototypes["out"],
                                 seed=0, dtype="float32", actors=1, cpus_per_actor=1.0, gpus_per_actor=0.0,
                                 batch_size=16)
    assert again["reused"] and again["rows"] == expected  # same key: no second Ray Data job


@pytest.mark.slow
def test_s3_checkpoint_loads_for_inference_once_per_node(trained, dataset, bucket, tmp_path, monkeypatch):
    from test_train import probe_logits

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    best = trained["best_checkpoint"]
    model = load_model_from_checkpoint(best)
    probe = torch.load(io.BytesIO(storage.read_bytes(f"{best}/{ckpt.PROBE_FILE}")), weights_only=True)
    logits, _ = probe_logits(model, dataset["local"], probe)
    torch.testing.assert_close(logits, probe["logits_sub"], rtol=1e-4, atol=1e-4)  # what the worker computed

    cached = storage.list_files(str(tmp_path / "cache"))
    assert [storage.name(c) for c in cached] == [ckpt.TRAINABLE_FILE]
    load_model_from_checkpoint(_train_stage(bucket, best))  # via the stage's summary.json
    assert storage.list_files(str(tmp_path / "cache")) == cached  # the node's copy is reused


@pytest.mark.slow
def test_relaunch_of_a_finished_s3_run_reads_its_result_back(trained, dataset, prototypes, bucket):
    before = _checkpoint_names(trained["run_path"])
    assert len(before) == 1
    again = _train(dataset, prototypes, bucket)  # finished: no new trainer, the result comes from S3
    assert _checkpoint_names(trained["run_path"]) == before
    assert again["best_checkpoint"] == trained["best_checkpoint"] and again["history"] == trained["history"]


def test_resolve_checkpoint_names_an_s3_location_that_is_neither(bucket):
    storage.write_text(f"{bucket}/elsewhere/notes.txt", "not a checkpoint\n")
    with pytest.raises(ValueError, match=f"checkpoint '{bucket}/elsewhere' is neither a checkpoint folder"):
        resolve_checkpoint(f"{bucket}/elsewhere")
    write_summary(f"{bucket}/unfinished", {"stage": "train", "status": "running"})
    with pytest.raises(ValueError, match="holds no finished train stage"):
        resolve_checkpoint(f"{bucket}/unfinished")
    assert resolve_checkpoint("") is None and resolve_checkpoint(None) is None
