"""Corpus-wide decisions of prepare, made on the driver from the key columns: which taxonomy,
whether a row's classes belong to it, and which split each labelled post goes to."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from smpp_ray.data.schema import (
    SPLITS,
    Taxonomy,
)
from smpp_ray.data.taxonomy import InferredTaxonomy, corpus_taxonomy, infer_taxonomy

logger = logging.getLogger(__name__)

def resolve_taxonomy(taxonomy: Taxonomy | None, raw: str, labelled: list[tuple[str, str]],
                     pairs: list[tuple[str, str]], min_class_posts: int
                     ) -> tuple[Taxonomy, str, InferredTaxonomy | None]:
    """The class list posts are classified into, where it came from, and the inference (if any).

    ``taxonomy`` given (a file the user names, the packaged list, or a pipeline's list in
    ``predict``) is used as it is; else the corpus's own ``taxonomy.json``; else the classes of
    the labelled training rows ``labelled`` (see :mod:`smpp_ray.data.taxonomy`), or of all rows
    ``pairs`` when none is labelled. The data never renumbers a given list: class ids are the
    contract between a dataset, its checkpoints and its models.
    """
    if taxonomy is not None:
        return taxonomy, "given", None
    carried = corpus_taxonomy(raw)
    if carried is not None:
        return carried[0], f"corpus file {carried[1]}", None
    # A folder of unlabelled test_ posts only: their own names are all there is.
    inferred = infer_taxonomy(labelled or pairs, min_class_posts)
    return inferred.taxonomy, "inferred from the training rows" if labelled else "inferred from the rows", inferred

def class_problem(category: str | None, subcategory: str | None, taxonomy: Taxonomy,
                   cat_id: dict[str, int], sub_id: dict[str, int],
                   inferred: InferredTaxonomy | None = None) -> tuple[str, str] | None:
    """(field, reason) when a row's class names do not fit the taxonomy; None when they do."""
    if subcategory is not None and inferred is not None and subcategory in inferred.rare:
        return "Subcategory", (f"subcategory {subcategory!r} has {inferred.rare[subcategory]} labelled training "
                               "row(s), fewer than data.min_class_posts: not a class")
    if category is not None and category not in cat_id:
        return "Category", (f"category {category!r} is not in the taxonomy "
                            f"({taxonomy.num_categories} categories)")
    if subcategory is None:
        return None
    if subcategory not in sub_id:
        return "Subcategory", (f"subcategory {subcategory!r} is not in the taxonomy "
                               f"({taxonomy.num_subcategories} subcategories)")
    parent = taxonomy.categories[taxonomy.parents[sub_id[subcategory]]]
    if category is not None and category != parent:
        if inferred is not None and subcategory in inferred.majority:
            _, count, total = inferred.majority[subcategory]
            return "Category", (f"category {category!r} conflicts with {parent!r}, the majority parent of "
                                f"subcategory {subcategory!r} ({count} of its {total} training rows)")
        return "Category", (f"category {category!r} disagrees with {parent!r}, the parent of "
                            f"subcategory {subcategory!r}")
    return None

def assign_splits(labelled: Any, method: str, val_fraction: float, test_fraction: float
                  ) -> tuple[np.ndarray, dict]:
    """The split (an index into SPLITS) of each labelled post, by time (chronological by
    (postdate, pid)) or by user; and the boundaries. ``labelled``: a frame (or records) with
    ``pid``, ``uid`` and ``postdate``; vectorised, as it runs over every post on the driver."""
    import pandas as pd

    if method not in ("time", "user"):
        raise ValueError(f"unknown split method {method!r}; expected 'time' or 'user'")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction!r} and test_fraction {test_fraction!r} must be in [0, 1) "
                         "and sum to < 1")
    frame = labelled.reset_index(drop=True) if isinstance(labelled, pd.DataFrame) else \
        pd.DataFrame(list(labelled), columns=["pid", "uid", "postdate"])
    n = len(frame)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    codes = np.zeros(n, np.int8)
    if method == "time":
        order = frame.sort_values(["postdate", "pid"], kind="stable").index.to_numpy()
        parts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
                 "test": order[n - n_test:]}
        dates = frame["postdate"].to_numpy()
        for code, name in enumerate(SPLITS):
            codes[parts[name]] = code
        return codes, {name: {"start": int(dates[rows[0]]), "end": int(dates[rows[-1]])} if len(rows) else None
                       for name, rows in parts.items()}
    sizes = frame.groupby("uid", sort=False).size()
    # A hash order is random-looking yet independent of seeds and of file order.
    users = sorted(sizes.index, key=lambda u: hashlib.sha256(str(u).encode()).hexdigest())
    filled, user_counts, split_of = [0, 0, 0], dict.fromkeys(SPLITS, 0), {}
    for user in users:
        code = 2 if filled[2] < n_test else 1 if filled[1] < n_val else 0
        split_of[user] = code
        filled[code] += int(sizes[user])
        user_counts[SPLITS[code]] += 1
    codes[:] = frame["uid"].map(split_of).to_numpy(dtype=np.int8) if n else codes
    return codes, {"users": user_counts}
