"""Search spaces and fixed parameters of the two model families.

The spaces follow the usual GBDT tuning ranges (learning rate log-uniform, tree size, row and
column subsampling, L1/L2 regularisation, minimum leaf size). The fixed parameters make a
trial reproducible: a seed, a fixed thread count and LightGBM's deterministic mode, so that a
refit with the best configuration predicts exactly what the trial evaluated.

LightGBM
    ``learning_rate`` log-uniform [0.01, 0.3]; ``num_leaves`` log-int [8, 256];
    ``min_child_samples`` log-int [5, 200]; ``feature_fraction`` and ``bagging_fraction``
    uniform [0.5, 1.0] (bagging every iteration); ``lambda_l1`` and ``lambda_l2`` log-uniform
    [1e-8, 10]; ``min_split_gain`` uniform [0, 0.5]; the loss ``objective`` one of
    ``regression`` (L2), ``huber``, ``regression_l1`` (the challenge scores MAE: L1 and Huber
    fit its median-like target and shrug off viral outliers).
CatBoost
    ``learning_rate`` log-uniform [0.01, 0.3]; ``depth`` int [4, 8]; ``l2_leaf_reg``
    log-uniform [1, 30]; ``random_strength`` log-uniform [1e-3, 10]; ``bagging_temperature``
    uniform [0, 1] (Bayesian bootstrap); ``border_count`` one of 64, 128, 254; the
    ``loss_function`` one of ``RMSE``, ``MAE``, ``Huber:delta=1.0``.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("lightgbm", "catboost")


def search_space(family: str) -> dict[str, Any]:
    """The Tune search space of one family (Tune domain objects, fed to the search algorithm)."""
    from ray import tune

    if family == "lightgbm":
        return {
            "learning_rate": tune.loguniform(0.01, 0.3),
            "num_leaves": tune.lograndint(8, 257),
            "min_child_samples": tune.lograndint(5, 201),
            "feature_fraction": tune.uniform(0.5, 1.0),
            "bagging_fraction": tune.uniform(0.5, 1.0),
            "lambda_l1": tune.loguniform(1e-8, 10.0),
            "lambda_l2": tune.loguniform(1e-8, 10.0),
            "min_split_gain": tune.uniform(0.0, 0.5),
            "objective": tune.choice(["regression", "huber", "regression_l1"]),
        }
    if family == "catboost":
        return {
            "learning_rate": tune.loguniform(0.01, 0.3),
            "depth": tune.randint(4, 9),
            "l2_leaf_reg": tune.loguniform(1.0, 30.0),
            "random_strength": tune.loguniform(1e-3, 10.0),
            "bagging_temperature": tune.uniform(0.0, 1.0),
            "border_count": tune.choice([64, 128, 254]),
            "loss_function": tune.choice(["RMSE", "MAE", "Huber:delta=1.0"]),
        }
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def fixed_params(family: str, *, seed: int, threads: int) -> dict[str, Any]:
    """Parameters every trial and refit of ``family`` shares (seed, threads, determinism; the
    loss, unless the searched configuration names one)."""
    if family == "lightgbm":
        return {"objective": "regression", "metric": "l1", "bagging_freq": 1, "seed": seed,
                "num_threads": threads, "deterministic": True, "force_col_wise": True, "verbosity": -1}
    if family == "catboost":
        return {"loss_function": "RMSE", "bootstrap_type": "Bayesian", "random_seed": seed,
                "thread_count": threads, "allow_writing_files": False, "verbose": False}
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
