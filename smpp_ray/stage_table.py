"""The pipeline's stages, one :class:`Stage` record each: the one place a stage is written down.

A record says what the stage is called, the folder it writes under a pipeline location, the config
sections its artifact depends on, the inputs it reads (each a declared dependency on another
stage's folder), how a run keeps its previous output whole, and the function that does the work.
Everything else derives from :data:`STAGES`: the ``smpp <stage>`` subcommands and their flags
(:mod:`smpp_ray.cli`), the pipeline's order and its wiring of one stage's folder into the next
(:mod:`smpp_ray.pipeline`), the runner's skip/fingerprint/atomic-write rules
(:mod:`smpp_ray.stages`), the ``jobs/<stage>.py`` wrappers and the tests' stage lists.

Adding a stage is adding one record (and its ``jobs/`` wrapper and config section, which
``tests/test_stage_table.py`` checks are there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from smpp_ray import storage
from smpp_ray.config import Config
from smpp_ray.summary import artifact_location, read_summary
from smpp_ray.tracking import TrackingContext

#: What a stage's work function returns: ``metrics`` (summary.json and MLflow) and ``artifacts``
#: (name -> location, stored relative to the stage's folder).
StageResult = dict[str, Any]
#: ``body(config, inputs, out, tracking)``: inputs are the resolved, normalised locations.
StageBody = Callable[[Config, dict[str, str], str, "TrackingContext | None"], StageResult]


@dataclass(frozen=True)
class StageInput:
    """One thing a stage reads: in a pipeline, the folder of stage ``source``; on the command line,
    ``--<flag>`` (the name with ``-`` for ``_`` unless ``flag`` says otherwise)."""

    name: str
    source: str
    help: str
    optional: bool = False
    dataset: bool = True
    """Logged as an MLflow dataset input of the stage's run."""
    replaced_by_raw: bool = False
    """In a pipeline given ``--raw``, that folder is read instead of the synth stage's."""
    resolve: Callable[[Config, str], str] | None = None
    """Turns the given location into the value the stage reads (e.g. a train folder into its
    kept-ids file); '' leaves the input out."""
    flag: str = ""

    @property
    def option(self) -> str:
        return "--" + (self.flag or self.name).replace("_", "-")


@dataclass(frozen=True)
class ConfigFlag:
    """A subcommand flag that is shorthand for one config key (``--posts`` for ``synth.posts``)."""

    name: str
    key: str
    type: type
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Stage:
    """Everything that is particular to one stage."""

    name: str
    folder: str
    """Its folder under a pipeline location."""
    help: str
    examples: tuple[str, ...]
    out_help: str
    sections: tuple[str, ...]
    """Config sections the artifact depends on: a change elsewhere does not invalidate it."""
    inputs: tuple[StageInput, ...]
    writes: str
    """How a run keeps the previous complete output whole: ``staged`` (the library writes beside
    the folder and swaps in), ``set_aside`` (moved away for the run, put back if it fails) or
    ``in_place`` (resumable state stays; summary removed first). See :mod:`smpp_ray.stages`."""
    body: StageBody
    needs_ray: bool = True
    reattach: bool = False
    """A rerun resumes the stopped work, so it reopens the stage's unfinished MLflow run instead of
    starting a second one (tune restores its experiment; the resumed trials stay in one tree)."""
    pipeline_scoped: bool = False
    """Reads and writes inside one pipeline folder: the CLI takes ``--pipeline`` instead of the
    inputs and ``--out``."""
    flags: tuple[ConfigFlag, ...] = ()
    check: Callable[[Config, dict[str, str]], None] | None = None
    """Fails fast on bad inputs, before Ray starts."""
    resumable: Callable[[Config, str], str] | None = None
    """Where an ``in_place`` stage keeps the state a rerun resumes from, given its folder."""
    run_control_keys: frozenset[str] = field(default_factory=frozenset)
    """Config keys that say how a run goes, not what it computes: a rerun changing only these
    resumes the stopped run."""
    pipeline_check: Callable[[Config, str, Sequence[str]], None] | None = None
    """Run in a pipeline right after the stage (config, its folder, the stages selected), so that
    what a later stage would refuse is refused before the stages between spend their time."""
    show: Callable[[str, str | None], None] | None = None
    """How ``smpp <stage>`` shows the result (folder, tracking URI); default: the summary's JSON."""


# ---- the work of each stage: plain arguments in, {"metrics", "artifacts"} out ------------------

def _synth(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.data.synth import synthesize_corpus

    s = config.synth
    summary = synthesize_corpus(out, posts=s.posts, seed=s.seed, image_size=s.image_size, users=s.users,
                                test_posts=s.test_posts, first_pid=s.first_pid, form=s.form)
    return {"metrics": summary, "artifacts": {"raw": out}}


def _check_raw(config: Config, inputs: dict[str, str]) -> None:
    raw = inputs["raw"]
    if not (storage.exists(raw) if config.data.format == "table" else storage.is_dir(raw)):
        expected = "a table file or a folder of them" if config.data.format == "table" else \
            "a folder of train_*.json/.txt files"
        raise FileNotFoundError(f"raw corpus {raw} does not exist (expected {expected})")


def _prepare(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.data.dataset import Dataset
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.taxonomy import chosen_taxonomy

    d = config.data
    manifest = prepare_dataset(inputs["raw"], out, split=d.split, val_fraction=d.val_fraction,
                               test_fraction=d.test_fraction, max_image_side=d.max_image_side,
                               jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard,
                               max_reject_fraction=d.max_reject_fraction, max_image_bytes=d.max_image_bytes,
                               taxonomy=chosen_taxonomy(d.taxonomy), min_class_posts=d.min_class_posts,
                               image_root=d.image_root, data_format=d.format, columns=d.columns,
                               extra_columns=d.extra_columns)
    dataset = Dataset(out)
    return {"metrics": manifest.get("counts", {}),
            "artifacts": {"manifest": dataset.manifest_file, "posts": dataset.posts_root, "rejects": dataset.rejects}}


def _check_corpus_size(config: Config, data_dir: str, selected: Sequence[str]) -> None:
    """Splits too small for the search are refused right after prepare, not when tune meets them."""
    if "tune" not in selected:
        return
    from smpp_ray.data.dataset import Dataset
    from smpp_ray.gbdt.data import check_split_sizes

    check_split_sizes(Dataset(data_dir).manifest().per_split, config.tune.min_val_posts, f"the prepared corpus {data_dir}")


def _prototypes(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.prototype_job import build_prototypes

    p, m = config.prototypes, config.model
    result = build_prototypes(inputs["data"], out, backbone=m.backbone, pretrained=m.pretrained, shots=p.shots,
                              time_buckets=p.time_buckets, batch_size=p.batch_size, num_actors=p.num_actors,
                              num_gpus_per_actor=p.num_gpus_per_actor, seed=p.seed)
    return {"metrics": result, "artifacts": {"prototypes": result["prototypes_path"],
                                             "members": result["members_path"]}}


def _train(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.train import train_model

    result = train_model(inputs["data"], inputs["prototypes"], out, model_config=config.model,
                         train_config=config.train, tracking=tracking)
    artifacts = {"best_checkpoint": result.get("best_checkpoint")}
    if (result.get("selection") or {}).get("kept_ids"):
        artifacts["kept_ids"] = result["selection"]["kept_ids"]
    return {"metrics": {k: v for k, v in result.items() if k != "best_checkpoint"}, "artifacts": artifacts}


def _train_state(config: Config, out: str) -> str:
    from smpp_ray.train.trainer import run_location

    return run_location(out, config.train)


def _extract(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.features import extract_features
    from smpp_ray.model.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(inputs["checkpoint"]) if inputs["checkpoint"] else None
    result = extract_features(inputs["data"], checkpoint, out, extract_config=config.extract)
    from smpp_ray.features.manifest import FeatureSet

    return {"metrics": result, "artifacts": {"features": out, "feature_manifest": FeatureSet(out).manifest_file}}


def kept_ids_input(config: Config, train_dir: str) -> str:
    """What ``tune.fit_on_selected`` fits on: ``tune.selected_ids`` when set, else the kept-ids
    file the train stage in ``train_dir`` recorded; '' when the option is off. Fails, naming what
    to set, when there is none to find."""
    tune = config.tune
    if not tune.fit_on_selected:
        return ""
    if tune.selected_ids:
        return storage.normalize(tune.selected_ids)
    summary = read_summary(train_dir) if train_dir else None
    # artifacts.kept_ids (relative to the train folder); older summaries held metrics.selection's
    older = ((summary.metrics.get("selection") or {}).get("kept_ids") if summary else None)
    kept = (summary.artifact("kept_ids") if summary else None) or (artifact_location(train_dir, older) if older else None)
    if not kept:
        where = f"the train stage in {train_dir}" if train_dir else "no train stage given (--train)"
        raise ValueError(f"tune.fit_on_selected: {where} recorded no dataset-level sample selection "
                         "(it needs train.sample_selection: dataset and train.sample_selection_keep < 1); "
                         "set tune.selected_ids to a kept_ids.parquet or tune.fit_on_selected=false")
    return kept


def _tune(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.gbdt import tune_models

    result = tune_models(inputs["features"], out, tune_config=config.tune, tracking=tracking,
                         selected_ids=inputs.get("selected_ids", ""))
    if tracking is not None:
        from smpp_ray.scoring.registration import register_scorer

        scorer = register_scorer(tracking, inputs["features"], out, config.tune)
        if scorer:
            result["paths"]["scorer_model"] = scorer["uri"]
    metrics = {**result["metrics"], "blend_weights": result["blend_weights"],
               "peak_rss_mib": {family: search["peak_rss_mib"] for family, search in result["search"].items()},
               "private_mib": {family: search["private_mib"] for family, search in result["search"].items()}}
    return {"metrics": metrics, "artifacts": result["paths"]}


def _tune_state(config: Config, out: str) -> str:
    from smpp_ray.gbdt.run import search_location

    return search_location(out)


def _evaluate(config: Config, inputs: dict[str, str], out: str, tracking: TrackingContext | None) -> StageResult:
    from smpp_ray.evaluate import evaluate_pipeline
    from smpp_ray.tracking import log_artifact

    result = evaluate_pipeline(pipeline_layout(storage.parent(out)), seed=config.tune.seed,
                               tracking_uri=tracking.tracking_uri if tracking else None)
    if tracking:
        log_artifact(tracking.tracking_uri, tracking.run_id, result["report"])
    return {"metrics": {"final": result["final_metrics"], "table": result["table"].to_dict(orient="records")},
            "artifacts": {"report": result["report"], "results": result["results"]}}


def _show_results(out: str, tracking_uri: str | None) -> None:
    from smpp_ray.evaluate import load_results, print_results

    print_results(load_results(out, tracking_uri))


_DATA = StageInput("data", "prepare", "prepared dataset folder")

#: Every stage, in pipeline order.
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("synth", "raw", "write a synthetic corpus in the SMPD layout (JPEGs + oracle.parquet)",
          ("smpp synth --out runs/raw --posts 2000 --seed 0",), "folder for the raw SMPD files",
          ("synth",), (), "set_aside", _synth, needs_ray=False,
          flags=(ConfigFlag("posts", "synth.posts", int, "number of training posts"),
                 ConfigFlag("seed", "synth.seed", int, "random seed"),
                 ConfigFlag("test_posts", "synth.test_posts", int, "unlabelled test_ posts beside them"),
                 ConfigFlag("first_pid", "synth.first_pid", int, "Pids start just above this"))),
    Stage("prepare", "data", "validate a raw SMPD folder into Parquet shards, rejects and manifest.json",
          ("smpp prepare --raw runs/raw --out runs/data", "smpp prepare --raw /data/smpd --out runs/data --split user"),
          "dataset folder to write", ("data",),
          (StageInput("raw", "synth", "raw SMPD folder (train_*.json, train_label.txt, images)",
                      replaced_by_raw=True),),
          "staged", _prepare, check=_check_raw, pipeline_check=_check_corpus_size,
          flags=(ConfigFlag("split", "data.split", str, "chronological or grouped-by-user split",
                            ("time", "user")),)),
    Stage("prototypes", "prototypes", "build visual/textual prototypes of the subcategories and categories",
          ("smpp prototypes --data runs/data --out runs/prototypes --set prototypes.shots=64",),
          "folder for prototypes.safetensors and members.json", ("model", "prototypes"), (_DATA,),
          "set_aside", _prototypes),
    Stage("train", "train", "prompt-tune the network on Ray Train (resumes when relaunched with the same name)",
          ("smpp train --data runs/data --prototypes runs/prototypes --out runs/train",
           "smpp train ... --set train.num_workers=8 --set train.use_gpu=true"),
          "train stage folder (checkpoints under ray_results/)", ("model", "train"),
          (_DATA, StageInput("prototypes", "prototypes", "prototypes stage folder", dataset=False)),
          "in_place", _train, resumable=_train_state,
          run_control_keys=frozenset({
              "train.epochs", "train.max_failures", "train.fail_at_epoch", "train.storage_path", "train.name",
              "train.checkpoints_to_keep", "train.early_stopping_patience", "train.prefetch_batches",
              "train.num_workers", "train.cpus_per_worker", "train.worker_resources", "train.use_gpu"})),
    Stage("extract", "features", "extract network + tabular features for every post with a Ray Data actor pool",
          ("smpp extract --data runs/data --checkpoint runs/train --out runs/features",
           "smpp extract --data runs/data --out runs/features_meta   # tabular only"),
          "features folder to write", ("extract",),
          (_DATA, StageInput("checkpoint", "train", "train stage folder or checkpoint folder; empty: tabular only",
                             optional=True, dataset=False)),
          "set_aside", _extract),
    Stage("tune", "tune", "search LightGBM and CatBoost on Ray Tune, refit, blend and evaluate",
          ("smpp tune --features runs/features --out runs/tune --set tune.num_samples=50",
           "smpp tune --features runs/features --train runs/train --out runs/tune --set tune.fit_on_selected=true"),
          "tune stage folder", ("tune",),
          (StageInput("features", "extract", "features folder"),
           StageInput("selected_ids", "train", "train stage folder whose kept ids tune.fit_on_selected fits on",
                      optional=True, resolve=kept_ids_input, flag="train")),
          "in_place", _tune, reattach=True, resumable=_tune_state,
          run_control_keys=frozenset({
              "tune.max_concurrent_trials", "tune.trial_resources", "tune.cpus_per_trial", "tune.time_budget_s",
              "tune.interrupt_after_trials", "tune.registered_model_prefix", "tune.champion_alias"})),
    Stage("evaluate", "report", "results table and HTML report of a finished pipeline folder",
          ("smpp evaluate --pipeline runs/demo",), "", ("tune",),
          # The synth folder, not --raw: its oracle (a synthetic corpus's) is what the report compares to
          (StageInput("raw", "synth", "raw corpus"), StageInput("features", "extract", "features folder"),
           StageInput("tune", "tune", "tune stage folder", dataset=False)),
          "set_aside", _evaluate, needs_ray=False, pipeline_scoped=True, show=_show_results),
)}

#: Stage names in pipeline order.
PIPELINE_STAGES = tuple(STAGES)
#: Stage -> its folder under the pipeline location.
STAGE_FOLDERS = {name: stage.folder for name, stage in STAGES.items()}


def pipeline_layout(out: str) -> dict[str, str]:
    """Folder name -> location (``raw``, ``data``, ..., ``report``), keeping URIs intact."""
    return {folder: storage.join(out, folder) for folder in STAGE_FOLDERS.values()}


def stage_inputs(stage: Stage, config: Config, given: dict[str, str]) -> dict[str, str]:
    """The stage's inputs from the locations given for them (flag values, or upstream folders):
    each normalised once and resolved; an optional input given none, or resolved to '', is ''
    (or left out, when it has a resolver)."""
    values: dict[str, str] = {}
    for spec in stage.inputs:
        location = given.get(spec.name) or ""
        if not location and not spec.optional:
            raise ValueError(f"stage {stage.name}: input {spec.name!r} ({spec.help}) is required")
        location = storage.normalize(location) if location else ""
        if spec.resolve is not None:
            location = spec.resolve(config, location)
            if not location:
                continue
        values[spec.name] = location
    return values


def pipeline_inputs(stage: Stage, layout: dict[str, str], raw_dir: str | None) -> dict[str, str]:
    """Where each input of ``stage`` is in a pipeline: its source stage's folder (or ``raw_dir``
    for the raw corpus of a pipeline given one)."""
    return {spec.name: (raw_dir if spec.replaced_by_raw and raw_dir else layout[STAGE_FOLDERS[spec.source]])
            for spec in stage.inputs}
