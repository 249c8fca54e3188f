"""How well the network's own classification heads do on test: the 11-category confusion and
77-way top-1 / top-5 accuracy, from the extract stage's feature files."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data.schema import Taxonomy
from smpp_ray.features.manifest import FeatureSet
from smpp_ray.report.markup import fmt, img, table
from smpp_ray.report.plots import category_confusion


def read_network_test(features_dir: str, subcategories: int) -> dict[str, np.ndarray] | None:
    """True and predicted codes of the labelled test posts, plus the 77-way probabilities
    (``prob_sub``, posts x subcategories) when the features hold them; None without network columns."""
    fs, path = storage.resolve(FeatureSet(features_dir).split("test"))
    names = set(pq.ParquetDataset(path, filesystem=fs).schema.names)
    wanted = ["category_code", "subcategory_code", "net_pred_category", "net_pred_subcategory"]
    if not set(wanted) <= names:
        return None
    probs = [f"net_prob_sub_{i}" for i in range(subcategories)]
    has_probs = set(probs) <= names
    frame = pq.read_table(path, columns=wanted + (probs if has_probs else []), filesystem=fs).to_pandas()
    frame = frame[(frame["category_code"] >= 0) & (frame["subcategory_code"] >= 0)]
    out = {c: frame[c].to_numpy().astype(int) for c in wanted}
    if has_probs:
        out["prob_sub"] = frame[probs].to_numpy()
    return out


def top_k_accuracy(truth: np.ndarray, probs: np.ndarray, k: int) -> float:
    if len(truth) == 0:
        return float("nan")
    top = np.argsort(-probs, axis=1)[:, :k]  # (posts, k)
    return float(np.mean((top == truth[:, None]).any(axis=1)))


def network_section(features_dir: str, taxonomy: Taxonomy) -> str:
    categories = list(taxonomy.categories)
    subcategories = taxonomy.num_subcategories
    data = read_network_test(features_dir, subcategories)
    if data is None or len(data["category_code"]) == 0:
        return "<p>No network predictions in the features (a metadata-only run, or no labelled test posts).</p>"
    truth, pred = data["category_code"], data["net_pred_category"]
    matrix = np.zeros((len(categories), len(categories)), dtype=np.int64)
    keep = (pred >= 0) & (pred < len(categories))
    np.add.at(matrix, (truth[keep], pred[keep]), 1)
    rows = [["11 categories", "top-1", fmt(float(np.mean(truth == pred)))]]
    sub_truth = data["subcategory_code"]
    rows.append([f"{subcategories} subcategories", "top-1", fmt(float(np.mean(sub_truth == data["net_pred_subcategory"])))])
    if "prob_sub" in data:
        rows.append([f"{subcategories} subcategories", "top-5", fmt(top_k_accuracy(sub_truth, data["prob_sub"], 5))])
    chance = [["chance (uniform)", "top-1 / top-5",
               f"{fmt(1 / len(categories))} (11-way), {fmt(1 / subcategories)} / {fmt(5 / subcategories)} "
               f"({subcategories}-way)"]]
    return (f"<p>The network's {subcategories}-way subcategory classifier is a proxy task (its outputs are "
            f"features of the popularity models). On {len(truth)} labelled test posts: its top-1 and top-5 "
            "accuracy, and its confusion folded to the 11 categories (the predicted category is the parent of the "
            "predicted subcategory).</p>"
            + table(["task", "metric", "accuracy"], rows + chance)
            + img(category_confusion(matrix, categories), "11-category confusion"))
