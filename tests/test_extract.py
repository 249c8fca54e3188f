"""Feature extraction end to end: tabular-only, and through Ray Data with the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_features_tabular import T0, make_posts, write_dataset

from smpp_ray.config import ExtractConfig, ModelConfig
from smpp_ray.data.schema import SPLITS
from smpp_ray.data.taxonomy_names import default_taxonomy
from smpp_ray.features import FeatureSet, extract_features, select_columns
from smpp_ray.features.extract import join_network_batch, network_feature_columns
from smpp_ray.features.history import history_features
from smpp_ray.features.network import NetworkFeatureExtractor, decode_batch, outputs_to_numpy
from smpp_ray.features.pca import fit_pca
from smpp_ray.features.tabular import build_tabular_features

POSTS = 96


@pytest.fixture(scope="module")
def posts() -> pd.DataFrame:
    return make_posts(POSTS, seed=11, users=5, image_size=24)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, posts) -> Path:
    return write_dataset(posts, tmp_path_factory.mktemp("data"))


def _save_tiny_checkpoint(directory: Path, *, prototype_backbone: str = "smpp-tiny-clip") -> Path:
    """A checkpoint in the train helper's format from a tiny random model (seeded)."""
    from smpp_ray.model.checkpoint import save_checkpoint
    from smpp_ray.model.model import create_model
    from smpp_ray.model.prototypes import PrototypeBank

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    bank = PrototypeBank(torch.randn(88, 64, generator=generator), torch.randn(88, 64, generator=generator),
                         torch.full((88,), 4), 77, {"backbone": "smpp-tiny-clip", "pretrained": ""})
    bank.save(str(directory / "bank.safetensors"))
    config = ModelConfig()
    torch.manual_seed(0)
    model = create_model(config, default_taxonomy(), str(directory / "bank.safetensors"))
    with torch.no_grad():  # trained-looking, non-default trainable values
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(directory / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                           model_config=config, taxonomy=default_taxonomy(),
                           prototypes_path=str(directory / "bank.safetensors"), metrics={"val_top1": 0.1},
                           state={"epoch": 0})
    if prototype_backbone != "smpp-tiny-clip":  # a bank from another backbone copied in by mistake
        bank.metadata["backbone"] = prototype_backbone
        bank.save(str(path / "prototypes.safetensors"))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("train"))


def _read_split(out: Path, split: str) -> pd.DataFrame:
    return pq.read_table(out / f"split={split}").to_pandas()


def _read_all(out: Path) -> pd.DataFrame:
    return pd.concat([_read_split(out, s).assign(split=s) for s in SPLITS], ignore_index=True).set_index("pid")


def test_tabular_only_extraction(dataset: Path, posts: pd.DataFrame, tmp_path: Path) -> None:
    config = ExtractConfig(user_description_components=2)
    result = extract_features(str(dataset), None, str(tmp_path), extract_config=config)
    assert result["network"] is False and result["columns_per_group"]["network"] == 0
    assert result["rows"] == posts.groupby("split").size().to_dict()
    manifest = FeatureSet(str(tmp_path)).manifest()
    assert manifest["key_columns"] == ["pid", "uid", "postdate", "label", "category", "subcategory"]
    assert {c["group"] for c in manifest["columns"]} == {"user", "time", "text", "geo", "category", "history"}
    out = _read_all(tmp_path)
    assert list(out.reset_index().columns[:6]) == manifest["key_columns"]
    assert set(select_columns(manifest)) | set(manifest["key_columns"]) | {"split"} == set(out.reset_index().columns)
    # the files hold exactly the features computed in memory, matched by pid
    meta = posts.drop(columns=["image"])
    expected = pd.concat([build_tabular_features(meta, user_description_components=2, corpus_start=T0).frame,
                          history_features(meta)[0]], axis=1).set_index("pid")
    for column in select_columns(manifest):
        np.testing.assert_array_equal(out.loc[expected.index, column].to_numpy(dtype=float),
                                      expected[column].to_numpy(dtype=float), err_msg=column)
    assert out.loc[posts["pid"], "split"].tolist() == posts["split"].tolist()
    # a rerun overwrites instead of appending
    extract_features(str(dataset), None, str(tmp_path), extract_config=config)
    assert len(_read_all(tmp_path)) == POSTS


def test_missing_checkpoint_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(ValueError, match=f"checkpoint '{missing}' not found"):
        extract_features(str(dataset), str(missing), str(tmp_path / "out"), extract_config=ExtractConfig())


def test_mismatched_checkpoint_is_a_clear_error(dataset: Path, checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "renamed"
    shutil.copytree(checkpoint, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["taxonomy"]["subcategories"][3]["name"] = "not-a-subcategory"
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"renamed.*does not match dataset.*subcategories id 3 is 'not-a-subcategory'"):
        extract_features(str(dataset), str(other), str(tmp_path / "out"), extract_config=ExtractConfig())

    other_backbone = _save_tiny_checkpoint(tmp_path / "b", prototype_backbone="ViT-B-32")
    with pytest.raises(ValueError, match="trained on backbone 'smpp-tiny-clip' but its prototypes were built "
                                         "with backbone 'ViT-B-32'"):
        extract_features(str(dataset), str(other_backbone), str(tmp_path / "out"), extract_config=ExtractConfig())

    meta = json.loads((other_backbone / "meta.json").read_text())
    meta["model_config"]["backbone"] = "ViT-B-32"  # now bank and config agree, but the state is tiny's
    (other_backbone / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not load into backbone 'ViT-B-32'"):
        extract_features(str(dataset), str(other_backbone), str(tmp_path / "out"), extract_config=ExtractConfig())


def _in_process_outputs(checkpoint: Path, posts: pd.DataFrame) -> dict[str, np.ndarray]:
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.checkpoint import load_model_from_checkpoint

    spec = backbone_spec("smpp-tiny-clip")
    batch = {name: posts[name].to_numpy() for name in ("pid", "image", "title", "tags")}
    decoded = decode_batch(batch, backbone=spec.backbone, image_size=spec.image_size,
                           context_length=spec.context_length, mean=spec.mean, std=spec.std)
    model = load_model_from_checkpoint(checkpoint)
    with torch.inference_mode():
        return outputs_to_numpy(model(torch.from_numpy(decoded["pixels"]), torch.from_numpy(decoded["tokens"])))


def test_extractor_is_a_plain_callable(checkpoint: Path, posts: pd.DataFrame) -> None:
    from smpp_ray.model.backbone import backbone_spec

    spec = backbone_spec("smpp-tiny-clip")
    batch = {name: posts[name].to_numpy()[:5] for name in ("pid", "image", "title", "tags", "split")}
    decoded = decode_batch(batch, backbone=spec.backbone, image_size=spec.image_size,
                           context_length=spec.context_length, mean=spec.mean, std=spec.std)
    assert decoded["pixels"].shape == (5, 3, 64, 64) and list(decoded["split"]) == list(batch["split"])
    out = NetworkFeatureExtractor(str(checkpoint), device="cpu", num_threads=1)(decoded)
    np.testing.assert_allclose(out["prob_sub"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["prob_cat"].sum(1), 1.0, rtol=1e-5)
    assert out["sim_visual"].shape == out["sim_text"].shape == (5, 88)
    assert (out["pred_subcategory"] == out["prob_sub"].argmax(1)).all()
    assert list(out["pid"]) == list(batch["pid"]) and len(set(out["worker"])) == 1
    # with PCA off, the embeddings are written whole
    flat = network_feature_columns(out, projections={})
    assert sum(name.startswith("net_image_embedding_") for name in flat) == 64


def test_join_is_by_pid_in_any_order(ray_session) -> None:
    import pyarrow as pa

    from smpp_ray.features.network import TENSOR_OUTPUTS

    table = pa.table({"pid": ["a", "b", "c"], "uid": ["u", "u", "v"], "f": [1.0, 2.0, 3.0]})
    ref = ray_session.put(table)
    batch = {name: np.arange(4, dtype=np.float32).reshape(2, 2) for name in TENSOR_OUTPUTS}
    batch.update(pid=np.array(["c", "a"], dtype=object), pred_subcategory=np.array([5, 6]),
                 pred_category=np.array([0, 1]))
    out = join_network_batch(batch, tabular_ref=[ref], projections={}).to_pydict()
    assert out["pid"] == ["c", "a"] and out["uid"] == ["v", "u"] and out["f"] == [3.0, 1.0]
    assert out["net_fused_1"] == [1.0, 3.0] and out["net_pred_subcategory"] == [5, 6]
    projected = join_network_batch(batch, tabular_ref=[ref], projections={
        "image": (np.zeros(2), np.array([[1.0, 1.0]]))}).to_pydict()
    assert projected["net_image_pc_0"] == [1.0, 5.0] and "net_image_embedding_0" not in projected
    batch["pid"] = np.array(["c", "zz"], dtype=object)
    with pytest.raises(ValueError, match="post 'zz' has network features but no metadata row"):
        join_network_batch(batch, tabular_ref=[ref], projections={})


def test_ray_extraction_equals_in_process_model(ray_session, dataset: Path, checkpoint: Path,
                                                posts: pd.DataFrame, tmp_path: Path) -> None:
    config = ExtractConfig(batch_size=8, min_actors=2, max_actors=2, cpus_per_actor=1, pca_components=3,
                           user_description_components=2)
    result = extract_features(str(dataset), str(checkpoint), str(tmp_path), extract_config=config)
    assert result["network"] is True and result["rows"] == posts.groupby("split").size().to_dict()
    # At most the configured pool did the work. Whether both actors got a batch is up to timing:
    # the pool starts whole, but when one decode task is slower than the actors, each decoded
    # block finds every actor idle and Ray Data hands it to the same one.
    assert 1 <= result["actors_used"] == len(result["workers"]) <= 2, result["workers"]
    assert result["steady_images_per_s"] > 0 and result["images_per_s"] > 0
    assert not (tmp_path / "_network").exists()

    manifest = FeatureSet(str(tmp_path)).manifest()
    network = select_columns(manifest, ["network"])
    assert {c["name"] for c in manifest["columns"] if c["categorical"]} >= {"net_pred_subcategory", "net_pred_category"}
    out = _read_all(tmp_path).loc[posts["pid"]]  # rows in the in-process order, matched by pid
    expected = _in_process_outputs(checkpoint, posts)
    for name, width in (("prob_sub", 77), ("prob_cat", 11), ("sim_visual", 88), ("sim_text", 88)):
        columns = [f"net_{name}_{i}" for i in range(width)]
        assert set(columns) <= set(network)
        np.testing.assert_allclose(out[columns].to_numpy(), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert (out["net_pred_subcategory"].to_numpy() == expected["pred_subcategory"]).all()
    assert (out["net_pred_category"].to_numpy() == expected["pred_category"]).all()

    # embeddings and the fused vector (extract.pca_fused): a PCA fitted on the train posts only,
    # applied to every split
    train = (posts["split"] == "train").to_numpy()
    for kind, name in (("image", "image_embedding"), ("text", "text_embedding"), ("fused", "fused")):
        pca = fit_pca(expected[name][train], 3)
        columns = [f"net_{kind}_pc_{i}" for i in range(3)]
        assert set(columns) <= set(network) and f"net_{name}_0" not in network  # only the projection
        np.testing.assert_allclose(out[columns].to_numpy(), pca.transform(expected[name]), atol=1e-4)
        with_val_test = fit_pca(expected[name], 3)  # what leaking val/test would give
        assert not np.allclose(out[columns].to_numpy(), with_val_test.transform(expected[name]), atol=1e-3)
    # tabular columns ride along unchanged in the same rows
    assert (out["uid"].to_numpy() == posts["uid"].to_numpy()).all()
    assert (out["subcategory_code"].to_numpy() == posts["subcategory_id"].to_numpy()).all()
    state = json.loads((tmp_path / "feature_state" / "state.json").read_text())
    assert state["backbone"] == "smpp-tiny-clip" and state["embedding_pcas"] == ["fused", "image", "text"]
    # the decode stage (PIL decoding in CPU tasks) was sized from the rates measured on the driver
    assert result["gpu_decode"] is False and result["decode_concurrency_from"] == "rates"
    assert 1 <= result["decode_concurrency"] <= 4 - 2 and result["decode_images_per_s"] > 0


def test_steady_throughput_uses_the_later_half_of_the_batches() -> None:
    from smpp_ray.features.extract import steady_throughput

    finished = np.repeat([100.0, 101.0, 110.0, 111.0, 113.0], 8)  # 5 batches of 8 rows
    assert steady_throughput(finished) == pytest.approx(16 / 3.0)  # batches 4-5 after batch 3
    assert np.isnan(steady_throughput(np.full(8, 5.0)))
