"""Run facts: when, from which code, with which backbone, config, resources and MLflow runs.

Everything is read from the stage summaries (``<stage folder>/summary.json``), so the report of
an old pipeline folder says what that run did, not what today's config would do.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from smpp_ray.provenance import GIT_COMMIT_ENV, git_commit
from smpp_ray.redact import redact_uri
from smpp_ray.report.markup import esc, fmt, fmt_seconds, note, table
from smpp_ray.summary import StageSummary, read_summary

logger = logging.getLogger(__name__)

def stage_summaries(layout: dict[str, str]) -> dict[str, StageSummary]:
    """Stage name (as its summary records it) -> its summary, in the layout's (pipeline) order,
    for the folders that hold one."""
    found = {}
    for location in layout.values():
        summary = read_summary(location)
        if summary and summary.stage:
            found[summary.stage] = summary
    return found


def report_date() -> str:
    """``2026-12-01T21:17:43+00:00 (UTC)``: now, in the local time zone, named."""
    now = dt.datetime.now().astimezone()
    return f"{now.isoformat(timespec='seconds')} ({now.tzname()})"


def effective_config(summaries: dict[str, StageSummary]) -> dict[str, Any]:
    """The config sections the stages ran with (each summary holds the sections its stage reads)."""
    merged: dict[str, Any] = {}
    for summary in summaries.values():
        for section, values in summary.config.items():
            merged.setdefault(section, values)
    return merged


def config_yaml(config: dict[str, Any]) -> str:
    import yaml

    return redact_uri(yaml.safe_dump(config, sort_keys=False))


def backbone_box(model: dict[str, Any]) -> str:
    """Backbone line; a warning box when the backbone is randomly initialised."""
    backbone = model.get("backbone", "?")
    pretrained = model.get("pretrained") or ""
    if not pretrained:
        return note(f"<b>Backbone <code>{esc(backbone)}</code> is randomly initialised</b> "
                    "(<code>model.pretrained</code> is empty): no pretrained weights were loaded, so the "
                    "network features carry little image or text meaning. The numbers below show that the "
                    "pipeline runs, not what a pretrained CLIP achieves; set <code>model.pretrained</code> "
                    "for a real run.", "warning")
    return note(f"Backbone <code>{esc(backbone)}</code> with pretrained weights "
                f"<code>{esc(redact_uri(str(pretrained)))}</code>.")


def resources_rows(summaries: dict[str, StageSummary]) -> list[list[str]]:
    """What each Ray stage asked for and used, as its summary records it."""
    rows = []
    train = _section(summaries, "train", "train")
    if train:
        rows.append(["train", f"{fmt(train.get('num_workers'))} workers x {fmt(train.get('cpus_per_worker'))} CPU"
                     + (", GPU" if train.get("use_gpu") else ", no GPU")])
    protos = _section(summaries, "prototypes", "prototypes")
    if protos:
        rows.append(["prototypes", f"{fmt(protos.get('num_actors'))} actors, "
                     f"{fmt(protos.get('num_gpus_per_actor'))} GPU each"])
    ecfg = _section(summaries, "extract", "extract")
    if ecfg:
        used = summaries["extract"].metrics.get("actors_used")
        rows.append(["extract", f"{fmt(ecfg.get('min_actors'))}-{fmt(ecfg.get('max_actors'))} actors x "
                     f"{fmt(ecfg.get('cpus_per_actor'))} CPU, {fmt(ecfg.get('num_gpus_per_actor'))} GPU "
                     f"(used {fmt(used)})"])
    tune = _section(summaries, "tune", "tune")
    if tune:
        rows.append(["tune", f"{fmt(tune.get('cpus_per_trial'))} CPU per trial, "
                     f"{fmt(tune.get('max_concurrent_trials'))} concurrent, {fmt(tune.get('num_samples'))} trials "
                     "per family"])
    cluster = _cluster_resources()
    if cluster:
        rows.append(["Ray cluster (at report time)", ", ".join(
            f"{k} {v / 2**30:.3g} GiB" if "memory" in k else f"{k} {fmt(v)}"
            for k, v in sorted(cluster.items()) if not k.startswith("node:"))])
    return rows


def _section(summaries: dict[str, StageSummary], stage: str, section: str) -> dict[str, Any]:
    """The config section ``section`` that ``stage`` ran with ({} when it did not run)."""
    return summaries[stage].section(section) if stage in summaries else {}


def _cluster_resources() -> dict[str, float]:
    try:
        import ray

        return dict(ray.cluster_resources()) if ray.is_initialized() else {}
    except Exception:  # a report never fails on Ray
        return {}


def mlflow_rows(summaries: dict[str, StageSummary], tracking_uri: str | None) -> tuple[list[list[str]], str]:
    """Per stage: run id (a link on an http(s) server) and stage time; plus how to open the UI."""
    experiments = _experiment_ids(summaries, tracking_uri)
    web = bool(tracking_uri) and tracking_uri.startswith(("http://", "https://"))
    base = redact_uri(tracking_uri.rstrip("/")) if web else "http://127.0.0.1:5000"
    rows = []
    for stage, summary in summaries.items():
        run_id = summary.mlflow_run_id
        cell = "-"
        if run_id:
            cell = f"<code>{esc(run_id)}</code>"
            if run_id in experiments:
                cell = f'<a href="{esc(base)}/#/experiments/{esc(experiments[run_id])}/runs/{esc(run_id)}">{cell}</a>'
        rows.append([esc(stage), cell, esc(fmt_seconds(summary.seconds))])
    if not tracking_uri:
        how = "MLflow tracking was off for this report (no tracking URI)."
    elif web:
        how = f"MLflow server: <a href=\"{esc(base)}\">{esc(base)}</a> (run ids link to it)."
    else:
        how = ("Open the runs with <code>mlflow ui --backend-store-uri "
               f"{esc(redact_uri(tracking_uri))} --host 127.0.0.1 --port 5000</code>; the run ids then link to "
               f"{esc(base)}.")
    return rows, how


def _experiment_ids(summaries: dict[str, StageSummary], tracking_uri: str | None) -> dict[str, str]:
    """run id -> experiment id, read from the store (empty when it cannot be reached)."""
    run_ids = [s.mlflow_run_id for s in summaries.values() if s.mlflow_run_id]
    if not tracking_uri or not run_ids:
        return {}
    from smpp_ray.tracking import client

    found: dict[str, str] = {}
    try:
        c = client(tracking_uri)
        # A pipeline's stage runs share one experiment: one search finds them all.
        experiment = c.get_run(run_ids[0]).info.experiment_id
        quoted = ", ".join(f"'{r}'" for r in run_ids)
        for run in c.search_runs([experiment], filter_string=f"attributes.run_id IN ({quoted})",
                                 max_results=len(run_ids)):
            found[run.info.run_id] = run.info.experiment_id
        for run_id in set(run_ids) - set(found):  # a stage run elsewhere (run on its own)
            found[run_id] = c.get_run(run_id).info.experiment_id
    except Exception as err:  # a store that is gone must not cost the report
        logger.info("report: MLflow runs not read from %s (%s)", redact_uri(tracking_uri), err)
    return found


def facts_section(layout: dict[str, str], summaries: dict[str, StageSummary], tracking_uri: str | None) -> str:
    config = effective_config(summaries)
    commit = git_commit()
    rows = [["report written", esc(report_date())],
            ["code commit", f"<code>{esc(commit)}</code>" if commit else
             f"unknown (not a git checkout; a job can set <code>{GIT_COMMIT_ENV}</code>)"],
            ["pipeline folder", f"<code>{esc(redact_uri(str(layout['data']).rsplit('/', 1)[0]))}</code>"],
            ["backbone", f"<code>{esc(config.get('model', {}).get('backbone', '?'))}</code>"],
            ["stages complete", esc(", ".join(summaries) or "none")]]
    parts = [backbone_box(config.get("model", {})) if config.get("model") else "",
             table(["fact", "value"], rows, raw=True)]
    resources = resources_rows(summaries)
    if resources:
        parts.append("<h3>Ray resources</h3>" + table(["stage", "resources"], resources))
    mlflow, how = mlflow_rows(summaries, tracking_uri)
    parts.append("<h3>MLflow runs</h3>" + table(["stage", "MLflow run id", "stage time"], mlflow, raw=True)
                 + f"<p>{how}</p>")
    parts.append("<details><summary>Effective config (YAML, the sections the stages ran with)</summary>"
                 f"<pre>{esc(config_yaml(config))}</pre></details>")
    return "\n".join(parts)
