"""The SMP Challenge submission file, the one owner of its format, and the side file that explains it.

A submission must hold one finite score for every post of the challenge's ``test_`` files, or it
is incomplete. ``smpp predict --format smp-challenge --out submission.csv`` writes::

    submission.csv            post_id,popularity_score   one row per test_ row, in raw-file order,
                                                         post_id "post<Pid>"
    submission.fallback.csv   pid,row_index,scored_by,field,reason
                              every row the network did not score: ``fallback`` (its image is
                              unusable: the fallback regressor scored its metadata) or ``prior``
                              (another field is bad: the mean training label)

A row whose Pid cannot be read cannot be named in the submission: :func:`assemble_submission`
refuses the whole file then (ValueError, exit 2) rather than upload one that silently lacks a
post; the side file still lists every row with its reason (``scored_by`` ``none``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from smpp_ray import storage
from smpp_ray.scoring.fallback import (
    SCORED_BY_FALLBACK,
    SCORED_BY_NETWORK,
    SCORED_BY_PRIOR,
    FallbackScorer,
    missing_fallback,
)

logger = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("post_id", "popularity_score")
SIDE_COLUMNS = ("pid", "row_index", "scored_by", "field", "reason")
SUFFIX = ".csv"
SIDE_SUFFIX = ".fallback.csv"
#: ``scored_by`` of a row no line of the submission can name (no readable Pid).
UNNAMED = "none"


def side_file(out: str) -> str:
    """``<out without .csv>.fallback.csv``."""
    return out[: -len(SUFFIX)] + SIDE_SUFFIX


def check_output(out: str) -> None:
    """A submission is one CSV file; ValueError naming ``out`` otherwise (before any work)."""
    if not out.endswith(SUFFIX):
        raise ValueError(f"--format smp-challenge writes one CSV file: --out {out!r} must end in {SUFFIX}")


@dataclass
class Submission:
    """The submission rows (``row_index`` order) and the side file's rows."""

    table: pd.DataFrame
    """row_index, pid, popularity_score, scored_by."""
    side: pd.DataFrame
    """SIDE_COLUMNS: every row not scored by the network."""

    @property
    def unnamed(self) -> pd.DataFrame:
        """Side rows without a Pid: a submission cannot name them."""
        return self.side[self.side["scored_by"] == UNNAMED]

    def counts(self) -> dict[str, int]:
        by = self.table["scored_by"].value_counts()
        return {"scored": int(by.get(SCORED_BY_NETWORK, 0)), "fallback_scored": int(by.get(SCORED_BY_FALLBACK, 0)),
                "prior_scored": int(by.get(SCORED_BY_PRIOR, 0))}


def assemble_submission(posts: pd.DataFrame, network: pd.DataFrame, imageless: pd.DataFrame, rejects: pd.DataFrame,
                        fallback: FallbackScorer | None, *, input_rows: int, source: str) -> Submission:
    """One scored row per input row of the ``test_`` files.

    ``posts`` (pid, row_index) are the written posts and ``network`` (pid, predicted_popularity)
    their scores; ``imageless`` the prepared metadata of the posts rejected for their image alone
    (POSTS_SCHEMA, ``image`` empty); ``rejects`` every rejected row (REJECTS_SCHEMA, the imageless
    ones included). Raises ValueError when rows need the fallback or prior and ``fallback`` is
    None, or when a row has no Pid; RuntimeError when the rows do not add up to ``input_rows``
    or a score is not finite.
    """
    scored = posts[["pid", "row_index"]].merge(network[["pid", "predicted_popularity"]], on="pid", how="left",
                                               validate="one_to_one")
    unscored = scored[scored["predicted_popularity"].isna()]
    if len(unscored) or len(network) != len(posts):
        raise RuntimeError(f"predict lost posts: {len(posts)} written, {len(network)} network scores; "
                           f"unscored Pids {unscored['pid'].head(5).tolist()}")
    lines = [scored.rename(columns={"predicted_popularity": "popularity_score"}).assign(scored_by=SCORED_BY_NETWORK)]
    side = _side_rows(rejects, imageless, fallback, source)
    if len(side):
        lines.append(side[["pid", "row_index", "popularity_score", "scored_by"]])
    table = pd.concat(lines, ignore_index=True).sort_values("row_index", kind="stable").reset_index(drop=True)
    _check_rows(table, input_rows)
    named = table[table["pid"].notna()]
    bad = named[~np.isfinite(named["popularity_score"].to_numpy(dtype=np.float64))]
    if len(bad):
        raise RuntimeError(f"{len(bad)} submission score(s) are not finite, e.g. Pid {bad['pid'].iloc[0]!r} "
                           f"(row {bad['row_index'].iloc[0]}, scored by {bad['scored_by'].iloc[0]})")
    duplicated = table["pid"][table["pid"].duplicated()].unique().tolist()
    if duplicated:
        logger.warning("predict: Pid(s) %s appear on more than one test_ row; each row keeps its own line",
                       duplicated[:5])
    return Submission(table, side[list(SIDE_COLUMNS)].reset_index(drop=True))


def _side_rows(rejects: pd.DataFrame, imageless: pd.DataFrame, fallback: FallbackScorer | None,
               source: str) -> pd.DataFrame:
    """Each reject with its score and who gave it: the fallback model for an imageless post, else the prior."""
    side = rejects[["pid", "row_index", "field", "reason"]].copy().reset_index(drop=True)
    side["row_index"] = side["row_index"].astype("int64")
    side["popularity_score"] = np.nan
    side["scored_by"] = SCORED_BY_PRIOR
    if not len(side):
        return side
    if fallback is None:
        rows = "; ".join(f"row {r.row_index} ({r.field}: {r.reason})" for r in side.head(5).itertuples())
        raise ValueError(f"{missing_fallback(source)}. {len(side)} test post(s) need it, the network cannot score "
                         f"them: {rows}")
    keyed = imageless.assign(row_index=imageless["row_index"].astype("int64"))
    keyed = keyed.drop_duplicates(["pid", "row_index"]).set_index(["pid", "row_index"])
    image_rows = side.index[(side["field"] == "image") & side["pid"].notna()]
    found = [i for i in image_rows if (side.at[i, "pid"], side.at[i, "row_index"]) in keyed.index]
    if fallback.has_model and found:
        metadata = keyed.loc[[(side.at[i, "pid"], side.at[i, "row_index"]) for i in found]].reset_index()
        side.loc[found, "popularity_score"] = fallback.score(metadata)
        side.loc[found, "scored_by"] = SCORED_BY_FALLBACK
    why = "this scorer's fallback is the prior only" if not fallback.has_model else \
        "its metadata was not kept (prepared without keep_imageless)"
    for i in image_rows.difference(found if fallback.has_model else []):
        side.at[i, "reason"] = f"{side.at[i, 'reason']} ({why})"
    prior = side["scored_by"] == SCORED_BY_PRIOR
    side.loc[prior, "popularity_score"] = fallback.prior
    side.loc[side["pid"].isna(), "scored_by"] = UNNAMED
    return side


def _check_rows(table: pd.DataFrame, input_rows: int) -> None:
    """Every input row is one line: row indices 0 .. input_rows - 1, each once."""
    rows = table["row_index"].to_numpy(dtype=np.int64)
    if len(rows) != input_rows or not np.array_equal(rows, np.arange(input_rows)):
        missing = sorted(set(range(input_rows)) - set(rows.tolist()))
        repeated = sorted(table["row_index"][table["row_index"].duplicated()].unique().tolist())
        raise RuntimeError(f"predict lost posts: {input_rows} test_ rows in, {len(rows)} lines "
                           f"(rows missing {missing[:5]}, rows twice {repeated[:5]})")


def write_submission(submission: Submission, out: str) -> dict[str, str | None]:
    """The submission CSV at ``out`` and its side file (none when every row was the network's).

    With rows no line can name (no Pid), only the side file is written (a previous ``out`` is
    removed, so no stale submission is mistaken for this one) and ValueError names the rows.
    """
    side = side_file(out)
    storage.remove(side)
    if len(submission.side):
        storage.write_text(side, submission.side.to_csv(index=False))
    unnamed = submission.unnamed
    if len(unnamed):
        storage.remove(out)
        rows = "; ".join(f"row {r.row_index} ({r.field}: {r.reason})" for r in unnamed.head(5).itertuples())
        raise ValueError(f"{len(unnamed)} row(s) of the test_ files have no readable Pid, so a submission cannot "
                         f"name them and would be incomplete; no {out} written: {rows} (every row's reason is in "
                         f"{side}); fix those rows and score again")
    table = submission.table
    frame = pd.DataFrame({SUBMISSION_COLUMNS[0]: "post" + table["pid"].astype(str),
                          SUBMISSION_COLUMNS[1]: table["popularity_score"].to_numpy(dtype=np.float64)})
    storage.write_text(out, frame.to_csv(index=False))
    return {"out": out, "fallback_file": side if len(submission.side) else None}
