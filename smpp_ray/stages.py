"""Stage entry points: ``run_<stage>(config, ...) -> artifact folder``.

Each wraps one library function (which takes plain arguments) with what every stage shares:
Ray start-up, an MLflow run (a child of the pipeline run when there is one), ``summary.json``
in the output folder, and a fingerprint of the inputs' contents + config that lets the pipeline
skip a stage whose artifact is already complete.

A failed run never leaves a previous complete output half-replaced. What is atomic, per stage
(:data:`STAGE_WRITES`; ``summary.json`` is always written last, after everything else):

- **prepare** (staged): writes into ``.<name>.staging-<id>`` beside its folder and swaps
  ``posts/``, ``rejects/`` and ``manifest.json`` in on success (old summary and manifest removed
  first, manifest moved in last). During the run and after a failure, the previous dataset and
  its summary stay in place, byte-identical.
- **synth, prototypes, extract, evaluate** (set aside): a previous complete output is moved to
  ``.<name>.previous-<id>`` beside the folder while the run writes the folder afresh, deleted on
  success and moved back, byte-identical, when the run raises. A run killed outright leaves it
  there; the next run keeps it as the output to restore, unless the folder is complete by then.
  The folder is empty (no summary) while the stage runs.
- **train, tune** (in place): they resume from ``ray_results/`` in their folder, so it stays;
  only ``summary.json`` is atomic: removed before the run changes anything, written last. Tune's
  final files (models, predictions, plots) are rewritten in place, so after a failed tune rerun
  the folder is incomplete (no summary) and the next run completes it.

Resuming is decided here, once for both in-place stages: their resumable state carries a record
(:data:`RESUME_RECORD`) of the inputs' contents and the config it was made from. A rerun resumes
it only when both are the same, up to :data:`RUN_CONTROL_KEYS` (how the run goes, not what it
computes: more epochs, more retries, other placement). Otherwise, or with ``--force``, the state
is discarded and the stage starts afresh; state outside the stage's folder (``train.storage_path``)
is someone's run elsewhere, so a mismatch there is refused unless ``--force`` is given.

On object storage the swaps and moves are copy-then-delete (see :mod:`smpp_ray.storage`): the
same order of steps, not one atomic step, so a run that dies mid-swap leaves the folder without
its summary (not complete) rather than a mix that claims to be.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from smpp_ray import console, storage
from smpp_ray.config import Config, config_to_dict, flatten_config_dict
from smpp_ray.layout import STAGE_FOLDERS, pipeline_layout
from smpp_ray.locking import output_lock
from smpp_ray.summary import (
    SUMMARY_FILE,
    artifact_location,
    is_complete_summary,
    json_safe,
    read_summary,
    relative_artifacts,
    remove_summary,
    write_summary,
)
from smpp_ray.tracking import (
    OUT_TAG,
    STAGE_TAG,
    StopRequested,
    TrackingContext,
    client,
    log_artifact,
    log_dataset_inputs,
    log_metrics,
    metric_name,
    resolve_tracking_uri,
    set_tags,
    stop_signals_end_runs,
    tracked_run,
)

logger = logging.getLogger(__name__)

#: The config sections each stage depends on; a change elsewhere does not invalidate its artifact.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "synth": ("synth",),
    "prepare": ("data",),
    "prototypes": ("model", "prototypes"),
    "train": ("model", "train"),
    "extract": ("extract",),
    "tune": ("tune",),
    "evaluate": ("tune",),
}

#: How a run keeps a stage's previous complete output whole (see the module docstring):
#: ``staged`` (the library writes beside the folder and swaps in), ``set_aside`` (moved away for
#: the run, put back if it fails) or ``in_place`` (resumable state stays; summary removed first).
STAGE_WRITES: dict[str, str] = {
    "synth": "set_aside",
    "prepare": "staged",
    "prototypes": "set_aside",
    "train": "in_place",
    "extract": "set_aside",
    "tune": "in_place",
    "evaluate": "set_aside",
}

#: Stages whose rerun resumes the stopped work (Tune restores its experiment), so the rerun
#: reopens the stage's unfinished MLflow run instead of starting a second one: the resumed
#: search runs and trials stay in one tree. (Train resumes too, but its per-epoch metrics after a
#: resume belong to the new attempt's run until it logs them only after committed checkpoints.)
REATTACHED_STAGES = frozenset({"tune"})


#: Config keys of the in-place stages that say how a run goes, not what it computes: a rerun that
#: changes only these resumes the stopped run. Everything else in the stage's sections, and every
#: input's contents, must match for a resume (see :func:`_claim_resumable_state`).
RUN_CONTROL_KEYS: dict[str, frozenset[str]] = {
    "train": frozenset({"train.epochs", "train.max_failures", "train.fail_at_epoch", "train.storage_path",
                        "train.name", "train.checkpoints_to_keep", "train.early_stopping_patience",
                        "train.prefetch_batches", "train.num_workers", "train.cpus_per_worker",
                        "train.worker_resources", "train.use_gpu"}),
    "tune": frozenset({"tune.max_concurrent_trials", "tune.trial_resources", "tune.cpus_per_trial",
                       "tune.time_budget_s", "tune.interrupt_after_trials", "tune.registered_model_prefix",
                       "tune.champion_alias"}),
}

#: The file inside an in-place stage's resumable state that records what the state was made from.
RESUME_RECORD = "smpp_resume_record.json"


@dataclass(frozen=True)
class StageRun:
    """Where a stage reports: tracking store/experiment and the parent (pipeline) run, if any."""

    tracking_uri: str
    experiment: str
    enabled: bool = True
    parent_run_id: str | None = None
    skip_complete: bool = False
    """Return at once when the output is already complete for the same config and inputs (the
    single-stage CLI; the pipeline decides that itself)."""
    fresh: bool = False
    """Discard an in-place stage's resumable state and start it afresh (``--force``)."""


def default_stage_run(config: Config, parent_run_id: str | None = None, root: str = ".",
                      skip_complete: bool = False, fresh: bool = False) -> StageRun:
    """Where a single stage reports: the configured store, $MLFLOW_TRACKING_URI, else SQLite in
    ``root`` (only a store is resolved when tracking is on: an s3:// stage needs a server)."""
    if not config.tracking.enabled:
        return StageRun("", config.tracking.experiment, False, parent_run_id, skip_complete, fresh)
    uri = resolve_tracking_uri(config.tracking.tracking_uri, root)
    return StageRun(uri, config.tracking.experiment, config.tracking.enabled, parent_run_id, skip_complete, fresh)


def input_contents(inputs: dict[str, str]) -> dict[str, str]:
    """Each input's contents fingerprint (:func:`smpp_ray.storage.fingerprint`; '' for none)."""
    return {name: storage.fingerprint(location) if location else "" for name, location in inputs.items()}


def stage_fingerprint(stage: str, config: Config, inputs: dict[str, str],
                      contents: dict[str, str] | None = None) -> str:
    """Hash of the stage's config sections and its inputs' contents, not their paths.

    An input's contents are the names, sizes and mtimes of its files
    (:func:`smpp_ray.storage.fingerprint`): a raw file edited in place, or an upstream stage
    rerun (its ``summary.json`` is new), changes the fingerprint. It lists every file of each
    input, a few seconds for a real SMPD raw folder on object storage.
    """
    values = config_to_dict(config)
    relevant = {section: values[section] for section in STAGE_SECTIONS[stage]}
    contents = contents if contents is not None else input_contents(inputs)
    blob = json.dumps({"stage": stage, "config": relevant, "inputs": contents}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resumable_state(stage: str, config: Config, out: str) -> str | None:
    """Where an in-place stage keeps the state a rerun resumes from; None for other stages."""
    if stage == "train":
        from smpp_ray.train.trainer import run_location

        return run_location(out, config.train)
    if stage == "tune":
        from smpp_ray.gbdt.run import search_location

        return search_location(out)
    return None


def resume_record(stage: str, config: Config, contents: dict[str, str]) -> dict[str, Any]:
    """What an in-place stage's resumable state is made from: its inputs' contents and its config
    sections' values, less :data:`RUN_CONTROL_KEYS`."""
    sections = {section: config_to_dict(config)[section] for section in STAGE_SECTIONS[stage]}
    control = RUN_CONTROL_KEYS.get(stage, frozenset())
    values = {k: v for k, v in flatten_config_dict(sections).items() if k not in control}
    return json_safe({"stage": stage, "inputs": dict(sorted(contents.items())), "config": values})


def _record_changes(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between the record a state carries and this run's, in words."""
    if recorded is None:
        return ["it carries no record of its inputs (made by an older smpp_ray, or a run that never began)"]
    changes = [f"input {name!r} changed" for name in sorted(set(recorded.get("inputs", {})) | set(current["inputs"]))
               if recorded.get("inputs", {}).get(name) != current["inputs"].get(name)]
    before, now = recorded.get("config", {}), current["config"]
    changes += [f"{key} was {before.get(key)!r}, now {now.get(key)!r}" for key in sorted(set(before) | set(now))
                if before.get(key) != now.get(key)]
    return changes


def _claim_resumable_state(stage: str, config: Config, out: str, contents: dict[str, str], fresh: bool) -> None:
    """Keep an in-place stage's resumable state only when it was made from these inputs and this
    config; otherwise discard it (or refuse, for state outside the stage's folder) and record this
    run's inputs in the state before anything resumes from it."""
    state = resumable_state(stage, config, out)
    if state is None:
        return
    current = resume_record(stage, config, contents)
    record = storage.join(state, RESUME_RECORD)
    if storage.is_dir(state) and storage.list_names(state):
        recorded = storage.read_json(record) if storage.is_file(record) else None
        changes = ["--force asks for a fresh run"] if fresh else _record_changes(recorded, current)
        if changes:
            why = "; ".join(changes)
            inside = storage.normalize(state).startswith(storage.normalize(out).rstrip("/") + "/")
            if not inside and not fresh:
                raise ValueError(f"{stage}: the run in {state} was not made from these inputs and config ({why}); "
                                 "resuming would mix them: pass --force to discard it, or choose another "
                                 f"{'train.name' if stage == 'train' else 'output folder'}")
            logger.info("%s: not resuming the run in %s (%s); starting afresh", stage, state, why)
            storage.remove(state)
    storage.write_text(record, json.dumps(current, indent=1, sort_keys=True))


def _end_abandoned_runs(stage: str, out: str, stage_run: StageRun) -> None:
    """Mark KILLED the runs of this stage and folder still RUNNING: with the folder's lock held, no
    live command owns them, so a run killed outright (``kill -9``, a lost node) left them. A
    resumable stage's rerun then reopens the newest (:func:`smpp_ray.tracking.find_reattachable_run`)."""
    if not stage_run.enabled or not stage_run.tracking_uri or storage.is_uri(out):
        return  # an object-store folder has no lock: a RUNNING run there may be alive
    from smpp_ray.tracking import end_run, find_runs

    for run_id in find_runs(stage_run.tracking_uri, stage_run.experiment, {STAGE_TAG: stage, OUT_TAG: out},
                            status="RUNNING"):
        logger.info("stage %s: MLflow run %s was left RUNNING by a command that died; marking it KILLED",
                    stage, run_id)
        end_run(stage_run.tracking_uri, run_id, "KILLED")


def is_complete(stage: str, config: Config, inputs: dict[str, str], out_dir: str) -> bool:
    summary = read_summary(out_dir)
    return is_complete_summary(summary) and summary.get("fingerprint") == stage_fingerprint(stage, config, inputs)


def _previous_output(out: str) -> str | None:
    """Move the folder's complete output aside for a ``set_aside`` run; where it went, or None.

    A run killed after moving the output aside left it beside the folder; while the folder is not
    complete again, that is still the output to restore, so it is kept, not set aside again."""
    earlier = storage.set_aside_folders(out)
    complete_here = is_complete_summary(read_summary(out))
    keep = None if complete_here else next((e for e in earlier if is_complete_summary(read_summary(e))), None)
    for stale in earlier:
        if stale != keep:
            storage.remove(stale)
    return storage.set_aside(out) if complete_here else keep


@contextmanager
def _keeping_previous_output(stage: str, out: str) -> Iterator[None]:
    """Run a stage's writes so that, if they raise, its previous complete output is as it was."""
    mode = STAGE_WRITES[stage]
    if mode == "in_place":
        remove_summary(out)   # resumable state stays; the folder is just not complete any more
    if mode != "set_aside":
        yield
        return
    aside = _previous_output(out)
    try:
        yield
    except BaseException:
        if aside:
            logger.warning("stage %s failed: putting the previous output back in %s", stage, out)
            storage.put_back(aside, out)
        raise
    if aside:
        storage.remove(aside)


#: Models whose summary metrics are ``{model: {test_src, ...}}``: logged as ``test_<model>_src``.
MODEL_SECTIONS = ("lightgbm", "catboost", "blend", "fallback")
#: Summary sections that stay in summary.json and the report, not MLflow metric columns
#: (one column per class would bury the run's real metrics).
UNLOGGED_SECTIONS = ("counts",)


def _numeric_leaves(values: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to ``a.b`` keys, keeping numbers only (for MLflow)."""
    flat: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            flat.update(_numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        flat[prefix.rstrip(".")] = float(values)
    return flat


def summary_metric_names(metrics: dict[str, Any]) -> dict[str, float]:
    """A stage summary's numbers under the one MLflow name each quantity has everywhere.

    A model's split metrics are ``<split>_<model>_<metric>`` (``test_blend_mae``), as the tune
    stage logs them while it runs and the evaluate stage and the pipeline log the final ones;
    blend weights ``blend_weight_<model>``; the evaluate stage's ``final`` section is logged
    unprefixed. Other leaves keep their dotted path.
    """
    named: dict[str, float] = {}
    for key, value in _numeric_leaves(metrics).items():
        head, _, rest = key.partition(".")
        if head in UNLOGGED_SECTIONS:
            continue
        if head in MODEL_SECTIONS and rest.count("_") == 1 and "." not in rest:
            split, metric = rest.split("_")
            key = f"{split}_{head}_{metric}"
        elif head == "blend_weights" and rest:
            key = f"blend_weight_{rest}"
        elif head == "final" and rest:
            key = rest
        named[key] = value
    return named


def _run_stage(stage: str, config: Config, out_dir: str, inputs: dict[str, str],
               stage_run: StageRun, body: Callable[[TrackingContext | None], dict[str, Any]]) -> str:
    """Run ``body`` inside the stage's MLflow run and write ``summary.json`` for it (last); a
    failure leaves the previous complete output as :data:`STAGE_WRITES` says."""
    if stage_run.skip_complete and is_complete(stage, config, inputs, out_dir):
        logger.info("stage %s: already complete in %s for this config and these inputs (--force reruns it)",
                    stage, out_dir)
        return storage.normalize(out_dir)
    out = storage.normalize(out_dir)
    started = time.time()
    # The pipeline's "[n/7] stage -> out" line already says it on the console.
    console.details(__name__).info("stage %s: starting (out=%s)", stage, out)
    # Listed once: each input's files are listed for resuming, the dataset inputs and the summary
    contents = input_contents(inputs)
    try:
        with output_lock(out), stop_signals_end_runs(), _keeping_previous_output(stage, out):
            storage.make_dir(out)
            _claim_resumable_state(stage, config, out, contents, stage_run.fresh)
            _end_abandoned_runs(stage, out, stage_run)
            _run_tracked(stage, config, out, inputs, contents, stage_run, body, started)
    except StopRequested as stop:
        logger.error("stage %s: stopped by %s after %.1f s; its MLflow runs are KILLED; rerun the same "
                     "command to %s", stage, stop.signal_name, time.time() - started,
                     "resume it" if STAGE_WRITES[stage] == "in_place" else "run it again")
        raise
    logger.info("stage %s: done in %.1f s", stage, time.time() - started)
    return out


#: Stage inputs that are datasets, logged as MLflow dataset inputs of the stage's run.
DATASET_INPUTS = ("raw", "data", "features", "selected_ids")


def _run_tracked(stage: str, config: Config, out: str, inputs: dict[str, str], contents: dict[str, str],
                 stage_run: StageRun, body: Callable[[TrackingContext | None], dict[str, Any]],
                 started: float) -> None:
    sections = {s: config_to_dict(config)[s] for s in STAGE_SECTIONS[stage]}
    with tracked_run(stage_run.tracking_uri, stage_run.experiment, stage,
                     parent_run_id=stage_run.parent_run_id, params=flatten_config_dict(sections),
                     tags={STAGE_TAG: stage, OUT_TAG: out}, enabled=stage_run.enabled,
                     reattach=stage in REATTACHED_STAGES) as run_id:
        context = TrackingContext(stage_run.tracking_uri, stage_run.experiment, run_id) if run_id else None
        if run_id:
            read = {f"smpd-{name}": (location, contents[name]) for name, location in inputs.items()
                    if name in DATASET_INPUTS and location}
            log_dataset_inputs(stage_run.tracking_uri, run_id, read, context=stage)
        result = body(context)
        metrics = result.get("metrics", {})
        if run_id:
            # Only what the stage did not log itself: a final value at step 0 would sit in front
            # of its per-epoch series and bend every training curve.
            logged = set(client(stage_run.tracking_uri).get_run(run_id).data.metrics)
            final = {k: v for k, v in summary_metric_names(metrics).items() if metric_name(k) not in logged}
            log_metrics(stage_run.tracking_uri, run_id, final)
            set_tags(stage_run.tracking_uri, run_id, {f"input.{k}": v for k, v in inputs.items()})
        summary = {
            "stage": stage,
            "status": "complete",
            "inputs": inputs,
            "config": sections,
            "metrics": metrics,
            "artifacts": relative_artifacts(out, result.get("artifacts", {})),
            "mlflow_run_id": run_id,
            "fingerprint": stage_fingerprint(stage, config, inputs, contents),
            "seconds": round(time.time() - started, 2),
        }
        write_summary(out, summary)
        if run_id:  # from memory: fetching back what was just written to object storage is a round trip
            client(stage_run.tracking_uri).log_dict(run_id, json_safe(summary), SUMMARY_FILE)


def _ensure_ray(config: Config) -> None:
    from smpp_ray.runtime import init_ray

    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)


def run_synth(config: Config, out_dir: str, stage_run: StageRun | None = None) -> str:
    """Write a synthetic SMPD corpus (no Ray needed)."""
    out_dir = storage.normalize(out_dir)
    from smpp_ray.data.synth import synthesize_corpus

    stage_run = stage_run or default_stage_run(config)
    s = config.synth

    def body(_: TrackingContext | None) -> dict[str, Any]:
        summary = synthesize_corpus(str(out_dir), posts=s.posts, seed=s.seed, image_size=s.image_size,
                                    users=s.users, test_posts=s.test_posts, first_pid=s.first_pid, form=s.form)
        return {"metrics": summary, "artifacts": {"raw": str(out_dir)}}

    return _run_stage("synth", config, out_dir, {}, stage_run, body)


def run_prepare(config: Config, raw_dir: str, out_dir: str,
                stage_run: StageRun | None = None) -> str:
    """Validate a raw SMPD folder and write Parquet shards, rejects and the manifest."""
    raw_dir, out_dir = storage.normalize(raw_dir), storage.normalize(out_dir)
    from smpp_ray.data.manifest import manifest_location
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.schema import rejects_path
    from smpp_ray.data.taxonomy import chosen_taxonomy

    if not (storage.exists(raw_dir) if config.data.format == "table" else storage.is_dir(raw_dir)):
        # before Ray starts: a typo should cost no start-up
        expected = "a table file or a folder of them" if config.data.format == "table" else \
            "a folder of train_*.json/.txt files"
        raise FileNotFoundError(f"raw corpus {raw_dir} does not exist (expected {expected})")
    stage_run = stage_run or default_stage_run(config)
    d = config.data
    _ensure_ray(config)

    def body(_: TrackingContext | None) -> dict[str, Any]:
        manifest = prepare_dataset(str(raw_dir), str(out_dir), split=d.split, val_fraction=d.val_fraction,
                                   test_fraction=d.test_fraction, max_image_side=d.max_image_side,
                                   jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard,
                                   max_reject_fraction=d.max_reject_fraction, max_image_bytes=d.max_image_bytes,
                                   taxonomy=chosen_taxonomy(d.taxonomy), min_class_posts=d.min_class_posts,
                                   image_root=d.image_root, data_format=d.format, columns=d.columns,
                                   extra_columns=d.extra_columns)
        return {"metrics": manifest.get("counts", {}),
                "artifacts": {"manifest": manifest_location(out_dir), "posts": storage.join(out_dir, "posts"),
                              "rejects": rejects_path(out_dir)}}

    return _run_stage("prepare", config, out_dir, {"raw": str(raw_dir)}, stage_run, body)


def run_prototypes(config: Config, data_dir: str, out_dir: str,
                   stage_run: StageRun | None = None) -> str:
    """Select diverse class members and write the visual/textual prototype bank."""
    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    from smpp_ray.model.prototypes import build_prototypes

    stage_run = stage_run or default_stage_run(config)
    p, m = config.prototypes, config.model
    _ensure_ray(config)

    def body(_: TrackingContext | None) -> dict[str, Any]:
        result = build_prototypes(str(data_dir), str(out_dir), backbone=m.backbone, pretrained=m.pretrained,
                                  shots=p.shots, time_buckets=p.time_buckets, batch_size=p.batch_size,
                                  num_actors=p.num_actors, num_gpus_per_actor=p.num_gpus_per_actor, seed=p.seed)
        return {"metrics": result,
                "artifacts": {"prototypes": storage.join(out_dir, "prototypes.safetensors"),
                              "members": storage.join(out_dir, "members.json")}}

    return _run_stage("prototypes", config, out_dir, {"data": str(data_dir)}, stage_run, body)


def run_train(config: Config, data_dir: str, prototypes_dir: str, out_dir: str,
              stage_run: StageRun | None = None) -> str:
    """Prompt-tune the network on Ray Train; the best checkpoint path goes into summary.json."""
    data_dir, prototypes_dir, out_dir = storage.normalize(data_dir), storage.normalize(prototypes_dir), storage.normalize(out_dir)
    from smpp_ray.train import train_model

    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)

    def body(tracking: TrackingContext | None) -> dict[str, Any]:
        result = train_model(str(data_dir), str(prototypes_dir), str(out_dir), model_config=config.model,
                             train_config=config.train, tracking=tracking)
        best = result.get("best_checkpoint")
        metrics = {k: v for k, v in result.items() if k != "best_checkpoint"}
        artifacts = {"best_checkpoint": best}
        if (result.get("selection") or {}).get("kept_ids"):
            artifacts["kept_ids"] = result["selection"]["kept_ids"]
        return {"metrics": metrics, "artifacts": artifacts}

    return _run_stage("train", config, out_dir, {"data": str(data_dir), "prototypes": str(prototypes_dir)},
                      stage_run, body)


def run_extract(config: Config, data_dir: str, checkpoint: str | None, out_dir: str,
                stage_run: StageRun | None = None) -> str:
    """Network + tabular features for every post, partitioned by split."""
    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    from smpp_ray.features import extract_features
    from smpp_ray.train.checkpoint import resolve_checkpoint

    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)
    checkpoint_dir = resolve_checkpoint(str(checkpoint)) if checkpoint else None

    def body(_: TrackingContext | None) -> dict[str, Any]:
        result = extract_features(str(data_dir), checkpoint_dir, str(out_dir), extract_config=config.extract)
        return {"metrics": result, "artifacts": {"features": out_dir,
                                                 "feature_manifest": storage.join(out_dir, "feature_manifest.json")}}

    inputs = {"data": str(data_dir), "checkpoint": str(checkpoint or "")}
    return _run_stage("extract", config, out_dir, inputs, stage_run, body)


def selected_ids_config(config: Config, train_dir: str | None) -> Config:
    """``tune.fit_on_selected`` without ``tune.selected_ids``: the kept-ids file the train stage
    in ``train_dir`` wrote (its summary's ``selection.kept_ids``). Fails, naming what to set,
    when there is none to find."""
    tune = config.tune
    if not tune.fit_on_selected or tune.selected_ids:
        return config
    summary = read_summary(train_dir) if train_dir else None
    # artifacts.kept_ids (relative to the train folder); older summaries held metrics.selection's
    kept = ((summary or {}).get("artifacts", {}).get("kept_ids")
            or ((summary or {}).get("metrics", {}).get("selection") or {}).get("kept_ids"))
    kept = artifact_location(train_dir, kept) if kept and train_dir else None
    if not kept:
        where = f"the train stage in {train_dir}" if train_dir else "no train stage given"
        raise ValueError(f"tune.fit_on_selected: {where} recorded no dataset-level sample selection "
                         "(it needs train.sample_selection: dataset and train.sample_selection_keep < 1); "
                         "set tune.selected_ids to a kept_ids.parquet or tune.fit_on_selected=false")
    return dataclasses.replace(config, tune=dataclasses.replace(tune, selected_ids=kept))


def run_tune(config: Config, features_dir: str, out_dir: str,
             stage_run: StageRun | None = None) -> str:
    """Search LightGBM and CatBoost on Ray Tune, refit, blend, evaluate."""
    features_dir, out_dir = storage.normalize(features_dir), storage.normalize(out_dir)
    from smpp_ray.gbdt import tune_models

    if config.tune.fit_on_selected and not config.tune.selected_ids:
        raise ValueError("tune.fit_on_selected needs tune.selected_ids (the train stage's "
                         "selection/kept_ids.parquet); a pipeline fills it in from its train stage")
    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)

    def body(tracking: TrackingContext | None) -> dict[str, Any]:
        result = tune_models(str(features_dir), str(out_dir), tune_config=config.tune, tracking=tracking)
        metrics = {**result["metrics"], "blend_weights": result["blend_weights"],
                   "peak_rss_mib": {family: search["peak_rss_mib"] for family, search in result["search"].items()},
                   "private_mib": {family: search["private_mib"] for family, search in result["search"].items()}}
        return {"metrics": metrics, "artifacts": result["paths"]}

    inputs = {"features": str(features_dir)}
    if config.tune.fit_on_selected:
        inputs["selected_ids"] = config.tune.selected_ids  # its contents are fingerprinted too
    return _run_stage("tune", config, out_dir, inputs, stage_run, body)


def run_evaluate(config: Config, pipeline_dir: str, stage_run: StageRun | None = None) -> str:
    """The results table and HTML report of a finished pipeline, in ``<pipeline>/report``."""
    from smpp_ray.evaluate import evaluate_pipeline

    pipeline_dir = storage.normalize(pipeline_dir)
    layout = pipeline_layout(pipeline_dir)
    stage_run = stage_run or default_stage_run(config, root=pipeline_dir)

    def body(tracking: TrackingContext | None) -> dict[str, Any]:
        result = evaluate_pipeline(layout, seed=config.tune.seed,
                                   tracking_uri=tracking.tracking_uri if tracking else None)
        if tracking:
            log_artifact(tracking.tracking_uri, tracking.run_id, result["report"])
        return {"metrics": {"final": result["final_metrics"], "table": result["table"].to_dict(orient="records")},
                "artifacts": {"report": result["report"], "results": result["results"]}}

    return _run_stage("evaluate", config, layout[STAGE_FOLDERS["evaluate"]], evaluate_inputs(layout),
                      stage_run, body)


def evaluate_inputs(layout: dict[str, str]) -> dict[str, str]:
    """What the evaluate stage reads (its fingerprint's inputs): the raw oracle, features, models."""
    return {name: layout[name] for name in ("raw", "features", "tune")}
