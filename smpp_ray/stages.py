"""Stage entry points: ``run_<stage>(config, ...) -> artifact folder``.

Each wraps one library function (which takes plain arguments) with what every stage shares:
Ray start-up, an MLflow run (a child of the pipeline run when there is one), ``summary.json``
in the output folder, and a fingerprint of the inputs' contents + config that lets the pipeline
skip a stage whose artifact is already complete.

A failed run never leaves a previous complete output half-replaced. What is atomic, per stage
(:attr:`Stage.writes <smpp_ray.stage_table.Stage.writes>`; ``summary.json`` is always written last,
after everything else):

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
it only when both are the same, up to the stage's ``run_control_keys`` (how the run goes, not what it
computes: more epochs, more retries, other placement). Otherwise, or with ``--force``, the state
is discarded and the stage starts afresh; state outside the stage's folder (``train.storage_path``)
is someone's run elsewhere, so a mismatch there is refused unless ``--force`` is given.

On object storage the swaps and moves are copy-then-delete (see :mod:`smpp_ray.storage`): the
same order of steps, not one atomic step, so a run that dies mid-swap leaves the folder without
its summary (not complete) rather than a mix that claims to be.
"""

from __future__ import annotations

import functools
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
from smpp_ray.locking import output_lock
from smpp_ray.stage_table import (
    STAGES,
    Stage,
    pipeline_inputs,
    pipeline_layout,
    stage_inputs,
)
from smpp_ray.summary import (
    SUMMARY_FILE,
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
    log_dataset_inputs,
    log_metrics,
    metric_name,
    resolve_tracking_uri,
    set_tags,
    stop_signals_end_runs,
    tracked_run,
)

logger = logging.getLogger(__name__)

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
    relevant = {section: values[section] for section in STAGES[stage].sections}
    contents = contents if contents is not None else input_contents(inputs)
    blob = json.dumps({"stage": stage, "config": relevant, "inputs": contents}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resumable_state(stage: str, config: Config, out: str) -> str | None:
    """Where an in-place stage keeps the state a rerun resumes from; None for other stages."""
    where = STAGES[stage].resumable
    return where(config, out) if where else None


def resume_record(stage: str, config: Config, contents: dict[str, str]) -> dict[str, Any]:
    """What an in-place stage's resumable state is made from: its inputs' contents and its config
    sections' values, less its ``run_control_keys``."""
    sections = {section: config_to_dict(config)[section] for section in STAGES[stage].sections}
    control = STAGES[stage].run_control_keys
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
    """Whether ``out_dir`` holds a complete output of ``stage`` for this config and these inputs."""
    return StageCall(STAGES[stage], config, inputs, storage.normalize(out_dir)).complete()


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
    mode = STAGES[stage].writes
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


@dataclass(frozen=True)
class StageCall:
    """One run of one stage: its inputs resolved and its locations normalised, once.

    Whether the output is already complete is decided here and nowhere else (:meth:`complete`),
    from one listing of the inputs' contents, which the run then reuses for its resume record,
    its MLflow dataset inputs and its summary's fingerprint.
    """

    stage: Stage
    config: Config
    inputs: dict[str, str]
    out: str

    @functools.cached_property
    def contents(self) -> dict[str, str]:
        return input_contents(self.inputs)

    @functools.cached_property
    def fingerprint(self) -> str:
        return stage_fingerprint(self.stage.name, self.config, self.inputs, self.contents)

    def complete(self) -> bool:
        """True when the folder holds a complete output of this config and these inputs' contents."""
        summary = read_summary(self.out)
        return is_complete_summary(summary) and summary.fingerprint == self.fingerprint


def plan_stage(name: str, config: Config, given: dict[str, str], out_dir: str) -> StageCall:
    """The call of stage ``name`` on the locations ``given`` for its inputs (flag values, or the
    upstream folders of a pipeline); fails on a bad input before anything starts."""
    stage = STAGES[name]
    inputs = stage_inputs(stage, config, given)
    if stage.check:
        stage.check(config, inputs)  # before Ray starts: a typo should cost no start-up
    return StageCall(stage, config, inputs, storage.normalize(out_dir))


def run_stage(name: str, config: Config, given: dict[str, str], out_dir: str,
              stage_run: StageRun | None = None) -> str:
    """Run stage ``name`` (see :data:`smpp_ray.stage_table.STAGES`) and return its folder;
    with ``stage_run.skip_complete``, return at once when its output is already complete."""
    call = plan_stage(name, config, given, out_dir)
    stage_run = stage_run or default_stage_run(config, root=storage.parent(call.out)
                                               if call.stage.pipeline_scoped else ".")
    if stage_run.skip_complete and call.complete():
        logger.info("stage %s: already complete in %s for this config and these inputs (--force reruns it)",
                    name, call.out)
        return call.out
    return execute(call, stage_run)


def execute(call: StageCall, stage_run: StageRun,
            body: Callable[[TrackingContext | None], dict[str, Any]] | None = None) -> str:
    """Run the stage's work (``body`` replaces it, for tests of the runner) inside its MLflow run and
    write ``summary.json`` for it (last); a failure leaves the previous complete output as the
    stage's ``writes`` says."""
    stage, out = call.stage, call.out
    if body is None:
        if stage.needs_ray:
            _ensure_ray(call.config)

        def body(tracking: TrackingContext | None) -> dict[str, Any]:
            return stage.body(call.config, call.inputs, out, tracking)
    started = time.time()
    # The pipeline's "[n/7] stage -> out" line already says it on the console.
    console.details(__name__).info("stage %s: starting (out=%s)", stage.name, out)
    try:
        with output_lock(out), stop_signals_end_runs(), _keeping_previous_output(stage.name, out):
            storage.make_dir(out)
            _claim_resumable_state(stage.name, call.config, out, call.contents, stage_run.fresh)
            _end_abandoned_runs(stage.name, out, stage_run)
            _run_tracked(call, stage_run, body, started)
    except StopRequested as stop:
        logger.error("stage %s: stopped by %s after %.1f s; its MLflow runs are KILLED; rerun the same "
                     "command to %s", stage.name, stop.signal_name, time.time() - started,
                     "resume it" if stage.writes == "in_place" else "run it again")
        raise
    logger.info("stage %s: done in %.1f s", stage.name, time.time() - started)
    return out


def _run_stage(stage: str, config: Config, out_dir: str, inputs: dict[str, str],
               stage_run: StageRun, body: Callable[[TrackingContext | None], dict[str, Any]]) -> str:
    """:func:`execute` with a given body on inputs taken as they are (the runner's own tests)."""
    call = StageCall(STAGES[stage], config, inputs, storage.normalize(out_dir))
    if stage_run.skip_complete and call.complete():
        return call.out
    return execute(call, stage_run, body)


def _run_tracked(call: StageCall, stage_run: StageRun, body: Callable[[TrackingContext | None], dict[str, Any]],
                 started: float) -> None:
    stage, config, out, inputs, contents = call.stage.name, call.config, call.out, call.inputs, call.contents
    sections = {s: config_to_dict(config)[s] for s in STAGES[stage].sections}
    with tracked_run(stage_run.tracking_uri, stage_run.experiment, stage,
                     parent_run_id=stage_run.parent_run_id, params=flatten_config_dict(sections),
                     tags={STAGE_TAG: stage, OUT_TAG: out}, enabled=stage_run.enabled,
                     reattach=STAGES[stage].reattach) as run_id:
        context = TrackingContext(stage_run.tracking_uri, stage_run.experiment, run_id) if run_id else None
        if run_id:
            datasets = {spec.name for spec in STAGES[stage].inputs if spec.dataset}
            read = {f"smpd-{name}": (location, contents[name]) for name, location in inputs.items()
                    if name in datasets and location}
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
            "fingerprint": call.fingerprint,
            "seconds": round(time.time() - started, 2),
        }
        write_summary(out, summary)
        if run_id:  # from memory: fetching back what was just written to object storage is a round trip
            client(stage_run.tracking_uri).log_dict(run_id, json_safe(summary), SUMMARY_FILE)


def _ensure_ray(config: Config) -> None:
    from smpp_ray.runtime import init_ray

    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)


# ---- the Python API: one function per stage, ``run_<stage>(config, <inputs>..., out)`` ----------

def run_synth(config: Config, out_dir: str, stage_run: StageRun | None = None) -> str:
    """Write a synthetic SMPD corpus (no Ray needed)."""
    return run_stage("synth", config, {}, out_dir, stage_run)


def run_prepare(config: Config, raw_dir: str, out_dir: str, stage_run: StageRun | None = None) -> str:
    """Validate a raw SMPD folder and write Parquet shards, rejects and the manifest."""
    return run_stage("prepare", config, {"raw": raw_dir}, out_dir, stage_run)


def run_prototypes(config: Config, data_dir: str, out_dir: str, stage_run: StageRun | None = None) -> str:
    """Select diverse class members and write the visual/textual prototype bank."""
    return run_stage("prototypes", config, {"data": data_dir}, out_dir, stage_run)


def run_train(config: Config, data_dir: str, prototypes_dir: str, out_dir: str,
              stage_run: StageRun | None = None) -> str:
    """Prompt-tune the network on Ray Train; the best checkpoint path goes into summary.json."""
    return run_stage("train", config, {"data": data_dir, "prototypes": prototypes_dir}, out_dir, stage_run)


def run_extract(config: Config, data_dir: str, checkpoint: str | None, out_dir: str,
                stage_run: StageRun | None = None) -> str:
    """Network + tabular features for every post, partitioned by split (tabular only without a
    checkpoint)."""
    return run_stage("extract", config, {"data": data_dir, "checkpoint": checkpoint or ""}, out_dir, stage_run)


def run_tune(config: Config, features_dir: str, out_dir: str, stage_run: StageRun | None = None,
             train_dir: str = "") -> str:
    """Search LightGBM and CatBoost on Ray Tune, refit, blend, evaluate; ``train_dir`` is the train
    stage whose kept ids ``tune.fit_on_selected`` fits on (unless ``tune.selected_ids`` names them)."""
    return run_stage("tune", config, {"features": features_dir, "selected_ids": train_dir}, out_dir, stage_run)


def run_evaluate(config: Config, pipeline_dir: str, stage_run: StageRun | None = None) -> str:
    """The results table and HTML report of a finished pipeline, in ``<pipeline>/report``."""
    pipeline_dir = storage.normalize(pipeline_dir)
    stage, layout = STAGES["evaluate"], pipeline_layout(pipeline_dir)
    return run_stage("evaluate", config, pipeline_inputs(stage, layout, None), layout[stage.folder], stage_run)
