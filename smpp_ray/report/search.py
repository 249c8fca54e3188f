"""The report's search section: per model family, every trial's val SRC against val MAE, the
Pareto front of the two (the trials no other trial beats on both) and the trial
``tune.objective`` chose, from the tune folder's ``search_<family>.json``."""

from __future__ import annotations

from typing import Any

from smpp_ray import storage
from smpp_ray.gbdt.output import TuneOutput
from smpp_ray.gbdt.spaces import FAMILIES
from smpp_ray.report import plots
from smpp_ray.report.markup import esc, fmt, img, table
from smpp_ray.summary import StageSummary

#: Searched parameters shown in the front's table (the rest are in search_<family>.json).
SHOWN_PARAMS = 3


def search_section(tune_dir: str, tune_summary: StageSummary | None) -> str:
    where = TuneOutput(tune_dir)
    tune = tune_summary.section("tune") if tune_summary else {}
    parts = [f"<p>Search: <code>{esc(tune.get('search_alg', '?'))}</code>, trials chosen by "
             f"<code>tune.objective: {esc(tune.get('objective', '?'))}</code>. A trial is drawn at its selected "
             "round. The front holds the trials that no other trial beats on both val SRC and val MAE: the "
             "trade-off the challenge's two rankings face, which one objective hides. With the default objective "
             "(the mean of SRC and the MAE skill, higher on both) the chosen trial is always on it.</p>"]
    families = [f for f in (tune.get("models") or FAMILIES) if storage.is_file(where.search(f))]
    if not families:
        return "<p>No search results in the tune folder.</p>"
    for family in families:
        search: dict[str, Any] = storage.read_json(where.search(family))
        front = search.get("pareto_front") or []
        chosen = search.get("best_trial_id")
        parts.append(f"<h3>{esc(family)}: {fmt(len(search.get('trials') or []))} trials, "
                     f"{fmt(len(front))} on the front</h3>")
        parts.append(img(plots.search_front(search.get("trials") or [], front, chosen), f"{family} search front",
                         cls="plot narrow"))
        rows = [[esc(p["trial_id"]) + (" (chosen)" if p["trial_id"] == chosen else ""), fmt(p["round"]),
                 fmt(p["val_src"]), fmt(p["val_mae"]), fmt(p["val_score"]),
                 esc(", ".join(f"{k}={fmt(v)}" for k, v in list((p.get("config") or {}).items())[:SHOWN_PARAMS]))]
                for p in front]
        parts.append(table(["trial", "round", "val SRC", "val MAE", "val score", "parameters (first few)"], rows,
                           raw=True, caption=f"{family}: the Pareto front, by val SRC"))
    return "\n".join(parts)
