"""Ablation harness: does each component of the method pay off here, as the paper claims?

The paper (arXiv 2508.16147) claims that each component -- hierarchical prototypes, global
prompts, local prompts, cross-modal attention fusion -- improves the result, that the 77-way
classification proxy beats regressing popularity directly, that loss-based sample selection
helps, and that user-history features help. This script runs one variant per claim
(:data:`VARIANTS`, the one table to edit) for ``--seeds`` seeds on a synthetic SMPD corpus and
writes val top-1 (77-way) and test SRC / MAE, mean ± std over seeds, with the claim and whether
it holds here.

The backbone is *pretrained*: the tiny open_clip model that ``tests/pretrained_clip.py`` trains
contrastively on captioned synthetic shapes (built once into ``--work/pretrained``, loaded
through ``model.pretrained``), since the claims are about a pretrained CLIP.

What is shared and what runs per variant:

- once: the pretrained checkpoint; ``run_synth`` -> ``run_prepare`` -> ``run_prototypes`` (the
  library's stage entry points, skipped when complete), one local Ray for the whole harness;
- per distinct network (model + train config, prototype bank on/off) and seed: training and
  feature extraction, cached in ``--work/runs/<engine>-<net>-s<seed>``; variants that differ only
  in the regressor (history off; selection off while full keeps every post) reuse that network.
  ``--engine in-process`` (default) drives the library's own pieces -- ``create_model``, the
  train stage's epochs without Ray (``smpp_ray.train.fit.fit_in_memory``: the same ``fit``,
  schedule and dataset-level selection as the Ray worker), ``metadata_features`` /
  ``network_feature_columns`` / the train-only PCA and the feature manifest -- in one process
  over posts decoded once (no augmentation): on a
  shared 2-core machine a Ray Train run costs ~40 s to start and Ray Data starves under load.
  ``--engine ray`` runs ``train_model`` (a real Ray Train run, 1 worker) and
  ``extract_features`` (the real Ray Data extraction) instead, ~4 min per network on 2 loaded cores;
- per variant and seed: LightGBM with fixed hyperparameters (:data:`LIGHTGBM`, no Tune search)
  through the library's in-process ``smpp_ray.gbdt.refit.refit``, fitted on train, scored on test.

Seeds vary the network's initialisation and shuffle (``train.seed``) and LightGBM's seed; the
corpus and split stay fixed, so the std is the spread of the method, not of the data. A claim
"holds" when the better-by-claim side beats the other in mean test SRC by more than the larger
of their seed stds, is "reversed" when it loses by that much, and is "not seen" otherwise.

    .venv/bin/python bench/ablation.py --seeds 3                      # every variant, 2000 posts (~25 min, 2 cores)
    .venv/bin/python bench/ablation.py --seeds 1 --variants full,fusion_off --posts 600
    .venv/bin/python bench/ablation.py --render-only                  # the table again from --json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("ablation")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: what it changes and, for a claim, which side should win."""

    overrides: tuple[str, ...] = ()
    """``--set`` overrides of the model/train config (the network this variant trains)."""
    drop_groups: tuple[str, ...] = ()
    """Feature groups the regressor does not see."""
    bank: bool = True
    """Give the network the prototype bank; off also removes its similarity features."""
    claim: str = ""
    """The paper's claim this row tests (empty: a reference row)."""
    better: str = ""
    """The variant the claim says wins ..."""
    worse: str = ""
    """... against this one."""


#: Every variant, in table order. ``full`` is the default method; to make selection part of
#: the full model, give ``full`` the selection override too (``selection_off`` then differs).
VARIANTS: dict[str, Variant] = {
    "full": Variant(),
    "prototypes_off": Variant(("model.use_prototypes=false",), bank=False,
                              claim="hierarchical prototypes improve the result", better="full",
                              worse="prototypes_off"),
    "global_only": Variant(("model.use_local_prompts=false",),
                           claim="local prompts improve the result", better="full", worse="global_only"),
    "local_only": Variant(("model.use_global_prompts=false",),
                          claim="global prompts improve the result", better="full", worse="local_only"),
    "fusion_off": Variant(("model.use_fusion=false",),
                          claim="cross-modal attention fusion improves the result", better="full",
                          worse="fusion_off"),
    # The network learns popularity instead of the 77/11-way proxy: regression loss on, both
    # cross-entropies and the prototype alignment (a classification loss) off; the contrastive
    # term stays. The regressor still reads the network's features (fused vector, ...).
    "direct_regression": Variant(("model.direct_regression=true", "model.weight_regression=1.0",
                                  "model.weight_ce_sub=0.0", "model.weight_ce_cat=0.0",
                                  "model.weight_prototype=0.0"),
                                 claim="the classification proxy beats direct regression", better="full",
                                 worse="direct_regression"),
    "selection_off": Variant(("train.sample_selection_keep=1.0",)),
    "selection_on": Variant(("train.sample_selection_keep=0.77",),
                            claim="loss-based sample selection helps", better="selection_on",
                            worse="selection_off"),
    "history_off": Variant(drop_groups=("history",),
                           claim="user history features help", better="full", worse="history_off"),
    # Not the paper's: the retrieval features (labels of the nearest earlier training posts/users),
    # off by default; this row turns them on (the same network: extraction alone differs).
    "neighbours_on": Variant(("extract.neighbour_embeddings=[image,text,fused]",),
                             claim="retrieval (neighbour) features help", better="neighbours_on", worse="full"),
    "neighbours_small": Variant(("extract.neighbour_embeddings=[fused]", "extract.neighbour_ks=[5,20]",
                                 "extract.user_neighbour_snapshots=0"),
                                claim="a small retrieval set (fused, k 5/20, no users) helps",
                                better="neighbours_small", worse="full"),
    # Not an ablation of the paper: how much the regressor gets from the network at all here.
    "network_off": Variant(drop_groups=("network",),
                           claim="(premise) the network's features help the regressor", better="full",
                           worse="network_off"),
}

#: What every run shares (the smallest setting with a signal on 2 cores); --posts/--epochs set the rest.
BASE_OVERRIDES = (
    "synth.image_size=64", "data.max_image_side=64", "data.val_fraction=0.15", "data.test_fraction=0.25",
    "data.rows_per_shard=512", "model.backbone=smpp-tiny-clip", "prototypes.shots=32", "prototypes.time_buckets=2",
    "train.num_workers=1", "train.cpus_per_worker=1", "train.batch_size=32", "train.lr=0.003",
    "train.checkpoints_to_keep=1", "train.max_failures=0", "train.early_stopping_patience=0",
    "extract.batch_size=128", "extract.min_actors=1", "extract.max_actors=1", "extract.pca_components=8",
    "tracking.enabled=false", "ray.num_cpus=4",
)

ENGINES = {
    "in-process": "in-process engine (the library's model, losses, train/eval loops, dataset-level selection and "
                  "feature code in one process over posts decoded once; no augmentation)",
    "ray": "train and extract stages' library functions (a Ray Train run, 1 worker, then a Ray Data extraction)",
}

#: Fixed LightGBM settings (no search): small trees and a slow rate for a few hundred train posts.
LIGHTGBM = {"learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 10, "feature_fraction": 0.8,
            "bagging_fraction": 0.8, "lambda_l2": 1.0}
LIGHTGBM_ROUNDS = 200


# ---------------------------------------------------------------------------------------------
# Running


def pretrained_checkpoint(work: Path) -> str:
    """The contrastively trained tiny CLIP of tests/pretrained_clip.py, built once into ``work``."""
    path = work / "pretrained" / "tiny-clip.pt"
    if not path.is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from pretrained_clip import train_tiny_clip

        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        scratch = path.with_suffix(".partial")
        train_tiny_clip(scratch)
        scratch.rename(path)
        logger.info("built the pretrained tiny CLIP in %.0f s -> %s", time.perf_counter() - started, path)
    return str(path)


def shared_stages(config: Any, work: Path) -> tuple[str, str]:
    """synth -> prepare -> prototypes through the stage entry points; skipped when complete."""
    from smpp_ray import stages

    stage_run = stages.StageRun("", config.tracking.experiment, enabled=False, skip_complete=True)
    raw = stages.run_synth(config, str(work / "raw"), stage_run)
    data = stages.run_prepare(config, raw, str(work / "data"), stage_run)
    proto = stages.run_prototypes(config, data, str(work / "prototypes"), stage_run)
    return data, proto


def network_key(config: Any, variant: Variant) -> str:
    """What the network of a variant depends on; equal keys share one train + extract."""
    from smpp_ray.config import config_to_dict

    values = config_to_dict(config)
    blob = json.dumps({s: values[s] for s in ("synth", "data", "model", "prototypes", "train", "extract")}
                      | {"bank": variant.bank}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def train_and_extract(config: Any, variant: Variant, data: str, proto: str, folder: Path, *,
                      engine: str, corpus: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The network of one variant and seed, trained and its features extracted (cached in ``folder``)."""
    done = folder / "network.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "cached": True}
    started = time.perf_counter()
    features = folder / "features"
    if engine == "ray":
        from smpp_ray.features import extract_features
        from smpp_ray.model.checkpoint import resolve_checkpoint
        from smpp_ray.train import train_model

        result = train_model(data, proto if variant.bank else None, str(folder / "train"),
                             model_config=config.model, train_config=config.train)
        trained = time.perf_counter()
        extract_features(data, resolve_checkpoint(result["best_checkpoint"]), str(features),
                         extract_config=config.extract)
        metrics = {"val_top1": result["val_top1"], "val_top1_cat": result["val_top1_cat"],
                   "kept": (result.get("selection") or {}).get("kept")}
    else:
        assert corpus is not None
        model, metrics = train_in_process(config, corpus, proto if variant.bank else None)
        trained = time.perf_counter()
        extract_in_process(model, corpus, data, config, features)
    network = {**metrics, "train_s": round(trained - started, 1),
               "extract_s": round(time.perf_counter() - trained, 1), "features": str(features)}
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(network, indent=1))
    return {**network, "cached": False}


# The in-process engine: the library's model, losses, train/eval loops, selection and feature
# code, driven by a plain loop over posts decoded once (no Ray Train / Ray Data start-up per
# variant). Differences from the train stage: one process, no augmentation (decoded once).


def decode_corpus(data: str, config: Any) -> dict[str, dict[str, Any]]:
    """Every split decoded and tokenised once (eval transforms), as collated tensors."""
    import pyarrow.parquet as pq

    from smpp_ray.data.dataset import Dataset
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.preprocess import BatchPreprocessor
    from smpp_ray.train.data import INPUT_COLUMNS, collate_batch

    spec = backbone_spec(config.model.backbone, config.model.context_length)
    preprocessor = BatchPreprocessor(spec.backbone, spec.image_size, spec.context_length, train=False,
                                     mean=spec.mean, std=spec.std)
    corpus = {}
    for split in ("train", "val", "test"):
        table = pq.read_table(Dataset(data).posts(split), columns=INPUT_COLUMNS)
        rows = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        corpus[split] = collate_batch(preprocessor(rows))
    return corpus


def train_in_process(config: Any, corpus: dict[str, dict[str, Any]], bank: str | None) -> tuple[Any, dict]:
    """Prompt tuning as the train stage does it (the library's fit, best epoch by val top-1), in
    this process (:func:`smpp_ray.train.fit.fit_in_memory`)."""
    import torch

    from smpp_ray.data.schema import Taxonomy
    from smpp_ray.model.model import create_model
    from smpp_ray.train.fit import fit_in_memory
    from smpp_ray.train.trainer import create_loss_fn

    torch.manual_seed(config.train.seed)
    model = create_model(config.model, Taxonomy.from_dict(corpus["taxonomy"]), bank)
    state, best_weights = fit_in_memory(model, create_loss_fn(model), config.train, corpus["train"], corpus["val"])
    model.load_trainable_state_dict(best_weights)
    model.eval()
    best = state.history[state.best_epoch]
    return model, {"val_top1": best["val_top1"], "val_top1_cat": best["val_top1_cat"], "best_epoch": state.best_epoch,
                   "kept": (state.selection or {}).get("kept")}


def extract_in_process(model: Any, corpus: dict[str, dict[str, Any]], data: str, config: Any, out: Path) -> None:
    """The extract stage's feature files (same columns, groups and manifest), from this model."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from smpp_ray.data.dataset import Dataset
    from smpp_ray.features.extract import EMBEDDINGS, metadata_features, network_feature_columns
    from smpp_ray.features.manifest import FeatureColumn, FeatureSet
    from smpp_ray.features.neighbours import NeighbourBank, NeighbourSettings
    from smpp_ray.features.network import outputs_to_numpy
    from smpp_ray.features.pca import PCAAccumulator
    from smpp_ray.train.fit import memory_batches

    manifest = Dataset(data).manifest()
    tabular, table, _ = metadata_features(data, manifest, config.extract.user_description_components)
    network: dict[str, dict[str, np.ndarray]] = {}
    with torch.inference_mode():
        for split in ("train", "val", "test"):
            parts = [outputs_to_numpy(model(b["pixels"], b["tokens"]))
                     for b in memory_batches(corpus[split], np.arange(len(corpus[split]["pid"])), 256)]
            network[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            network[split]["pid"] = np.asarray(corpus[split]["pid"], dtype=object)
    projections = {}
    if config.extract.pca_components > 0:
        for name in EMBEDDINGS:
            accumulator = PCAAccumulator(network["train"][name].shape[1])
            accumulator.add(network["train"][name])
            fitted = accumulator.fit(config.extract.pca_components)
            projections[name.split("_")[0]] = (fitted.mean, fitted.components)
    def metadata(split: str) -> pa.Table:
        return table.take(pc.index_in(pa.array(network[split]["pid"].astype(str)), value_set=table.column("pid")))

    # The extract stage's retrieval features, from the same bank rules (training posts, earlier only).
    settings = NeighbourSettings.from_config(config.extract)
    bank = None
    if settings.enabled:
        train_rows = metadata("train")
        subcategory_ids = manifest.taxonomy.subcategory_ids
        bank = NeighbourBank.from_training_posts(
            settings, network["train"]["pid"], train_rows.column("postdate").to_numpy(),
            np.asarray(train_rows.column("uid").to_pylist(), dtype=str), train_rows.column("label").to_numpy(),
            np.array([subcategory_ids[s] for s in train_rows.column("subcategory").to_pylist()]), network["train"])
    names: list[str] = []
    for split, arrays in network.items():
        columns = network_feature_columns(arrays, projections)
        names = list(columns)
        rows = metadata(split)
        if bank is not None:
            retrieved = bank.features(arrays, rows.column("postdate").to_numpy(),
                                      np.asarray(rows.column("uid").to_pylist(), dtype=str), arrays["pred_subcategory"])
            columns.update({name: retrieved[name].to_numpy() for name in retrieved.columns})
        joined = pa.table({**{n: rows.column(n) for n in rows.column_names if n != "split"}, **columns})
        (out / f"split={split}").mkdir(parents=True, exist_ok=True)
        pq.write_table(joined, out / f"split={split}" / "part-00000.parquet")
    FeatureSet(str(out)).write_manifest(tabular.columns + [FeatureColumn(n, "network", categorical=n.startswith("net_pred_"))
                                                        for n in names]
                           + (bank.settings.columns() if bank is not None else []))


def fit_regressor(features: str, variant: Variant, seed: int) -> dict[str, float]:
    """LightGBM with :data:`LIGHTGBM` on train; SRC and MAE on test (and val)."""
    from smpp_ray.features.manifest import GROUPS
    from smpp_ray.gbdt.refit import refit
    from smpp_ray.metrics import mae, src

    started = time.perf_counter()
    groups = tuple(g for g in GROUPS if g not in variant.drop_groups) if variant.drop_groups else ()
    fitted = refit("lightgbm", LIGHTGBM, LIGHTGBM_ROUNDS, features, fit_on=("train",), feature_groups=groups,
                   threads=1, seed=seed)
    predictions = fitted["predictions"]
    scores: dict[str, float] = {}
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        scores[f"{split}_src"] = src(rows["label"].to_numpy(), rows["pred"].to_numpy())
        scores[f"{split}_mae"] = mae(rows["label"].to_numpy(), rows["pred"].to_numpy())
    scores["gbdt_s"] = round(time.perf_counter() - started, 1)
    return scores


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every chosen variant for every seed; writes the JSON and the table after each run."""
    import torch

    from smpp_ray.config import load_config
    from smpp_ray.runtime import init_ray

    torch.set_num_threads(args.threads)  # a shared 2-core machine: more threads only spin
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = pretrained_checkpoint(work)
    base = (*BASE_OVERRIDES, f"synth.posts={args.posts}", f"train.epochs={args.epochs}",
            f"model.pretrained={checkpoint}")
    config = load_config(None, base)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)
    data, proto = shared_stages(config, work / f"corpus-{args.posts}")
    corpus = None
    if args.engine == "in-process":
        from smpp_ray.data.dataset import Dataset

        corpus = decode_corpus(data, config)
        corpus["taxonomy"] = Dataset(data).taxonomy().to_dict()
    shared_s = time.perf_counter() - started
    logger.info("shared stages ready in %.0f s (data %s, prototypes %s)", shared_s, data, proto)

    document = {"command": " ".join(["bench/ablation.py", *sys.argv[1:]]), "date": str(datetime.date.today()),
                "host": f"{platform.node()} ({os.cpu_count()} cores)", "posts": args.posts, "epochs": args.epochs,
                "seeds": args.seeds, "variants": args.variants, "engine": args.engine, "lightgbm": {**LIGHTGBM, "rounds": LIGHTGBM_ROUNDS},
                "shared_s": round(shared_s, 1), "runs": []}
    for seed in range(args.seeds):
        for name in args.variants:
            variant = VARIANTS[name]
            run_config = load_config(None, (*base, *variant.overrides, f"train.seed={seed}", f"tune.seed={seed}"))
            key = network_key(run_config, variant)
            logger.info("seed %d, %s: network %s", seed, name, key)
            network = train_and_extract(run_config, variant, data, proto, work / "runs" / f"{args.engine}-{key}-s{seed}",
                                        engine=args.engine, corpus=corpus)
            scores = fit_regressor(network["features"], variant, seed)
            document["runs"].append({"variant": name, "seed": seed, "network": key, **network, **scores})
            logger.info("seed %d, %s: val_top1 %.3f test SRC %.4f MAE %.4f (train %s s, extract %s s%s)", seed, name,
                        network["val_top1"], scores["test_src"], scores["test_mae"], network["train_s"],
                        network["extract_s"], ", cached" if network["cached"] else "")
            document["total_s"] = round(time.perf_counter() - started, 1)
            write_outputs(document, Path(args.out), Path(args.json))
    return document


# ---------------------------------------------------------------------------------------------
# The table


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int) -> str:
    mean, std = _stats(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def verdict(runs: list[dict[str, Any]], variant: Variant) -> str:
    """"holds" / "reversed" / "not seen" for a claim row from its two sides' test SRC."""
    if not variant.claim:
        return "reference"
    sides = {}
    for side in (variant.better, variant.worse):
        sides[side] = [r["test_src"] for r in runs if r["variant"] == side]
    if not all(sides.values()):
        return f"needs {' and '.join(s for s in sides if not sides[s])}"
    (better_mean, better_std), (worse_mean, worse_std) = _stats(sides[variant.better]), _stats(sides[variant.worse])
    diff, noise = better_mean - worse_mean, max(better_std, worse_std)
    seeds = min(len(v) for v in sides.values())
    word = "holds" if diff > noise else "reversed" if diff < -noise else "not seen"
    note = f"Δ SRC {diff:+.4f}" + (f" vs std {noise:.4f}" if seeds > 1 else ", 1 seed: no std")
    return f"{word} ({note})"


def render(document: dict[str, Any]) -> str:
    runs = document["runs"]
    names = [n for n in VARIANTS if any(r["variant"] == n for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "## Ablation: the paper's claims on a pretrained tiny CLIP",
        "",
        f"`{document['command']}` — {document['date']} on {document['host']}. Synthetic corpus of "
        f"{document['posts']} posts (time split 60/15/25 % train/val/test), backbone `smpp-tiny-clip` "
        "contrastively pretrained on captioned synthetic shapes (tests/pretrained_clip.py) and loaded through "
        f"`model.pretrained`; {document['epochs']} epochs of prompt tuning (batch 32, lr 3e-3, best epoch by val top-1) "
        f"and feature extraction with the {ENGINES[document.get('engine', 'ray')]}, LightGBM with fixed parameters ({document['lightgbm']}) "
        f"fitted on train. Seeds {seeds}: network init/shuffle and LightGBM seed; corpus fixed. "
        "Mean ± std over seeds.",
        "",
        "| variant | changes | val top-1 (77-way) | test SRC | test MAE | paper's claim | here |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        variant = VARIANTS[name]
        mine = [r for r in runs if r["variant"] == name]
        changes = ", ".join([*variant.overrides, *(f"no {g} features" for g in variant.drop_groups),
                             *([] if variant.bank else ["no prototype bank"])]) or "—"
        full = {(r["network"], r["seed"]) for r in runs if r["variant"] == "full"}
        if name != "full" and mine and all((r["network"], r["seed"]) in full for r in mine):
            changes += " (the network of full)"
        lines.append(f"| {name} | {changes} | {_cell([r['val_top1'] for r in mine], 3)} | "
                     f"{_cell([r['test_src'] for r in mine], 4)} | {_cell([r['test_mae'] for r in mine], 4)} | "
                     f"{variant.claim or '—'} | {verdict(runs, variant)} |")
    first: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        first.setdefault((r["network"], r["seed"]), r)
    trained = list(first.values())  # each network's times are from when it was trained
    fresh_train = [r["train_s"] for r in trained]
    fresh_extract = [r["extract_s"] for r in trained]
    reused = sum(bool(r.get("cached")) for r in trained)
    lines += [
        "",
        "\"holds\": the side the paper says is better wins in mean test SRC by more than the larger seed std; "
        "\"reversed\": it loses by that much; \"not seen\": within the seed spread.",
        "",
        f"Timings: shared stages (pretrained CLIP, synth, prepare, prototypes, Ray start) {document['shared_s']:.0f} s; "
        f"{len(trained)} networks trained + extracted, per network train {_cell(fresh_train, 0)} s, extract "
        f"{_cell(fresh_extract, 0)} s; LightGBM {_cell([r['gbdt_s'] for r in runs], 1)} s per fit; "
        f"total {document.get('total_s', 0) / 60:.1f} min"
        + (f" ({reused} of the networks came from the cache of an earlier run)." if reused else "."),
    ]
    kept = [r["kept"] for r in runs if r["variant"] == "selection_on" and r.get("kept")]
    if kept:
        lines.append(f"selection_on trained on {statistics.fmean(kept):.0f} kept train posts after the warm-up epoch "
                     "(dataset-level selection by classification loss); the regressor is fitted on all train posts.")
    return "\n".join(lines) + "\n"


def write_outputs(document: dict[str, Any], out: Path, results: Path) -> None:
    for path in (out, results):
        path.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(document, indent=1, default=str))
    out.write_text(render(document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--posts", type=int, default=2000, help="synthetic posts (train/val/test 60/15/25 %%)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", default=str(HERE / "out" / "ablation_work"),
                        help="cache: pretrained CLIP, corpus, prototypes, one folder per network and seed")
    parser.add_argument("--out", default=str(HERE / "out" / "ablation.md"), help="the Markdown table")
    parser.add_argument("--json", default=str(HERE / "out" / "ablation.json"), help="every run's numbers")
    parser.add_argument("--engine", choices=("in-process", "ray"), default="in-process",
                        help="in-process: the library's loops in this process (fast); ray: train_model + "
                             "extract_features, a Ray Train and a Ray Data job per network")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from --json, running nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    out = Path(args.out)
    if args.render_only:
        source = Path(args.json)
        if not source.is_file():
            parser.error(f"--render-only needs {source}; run the ablation first")
        out.write_text(render(json.loads(source.read_text())))
        print(f"wrote {out}")
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; expected some of {list(VARIANTS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    run(args)
    print(f"wrote {out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
