"""The ``smpp`` command line: one subcommand per stage, each with ``--config`` and ``--set``.

Exit codes: 0 success, 2 bad usage or bad input (unknown config key, missing file, invalid
data), 1 any other failure.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys
import textwrap
from collections.abc import Sequence

from smpp_ray import console
from smpp_ray.config import Config, ConfigError, load_config
from smpp_ray.stage_table import PIPELINE_STAGES, STAGES, Stage, pipeline_inputs, pipeline_layout


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smpp_ray")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"

logger = logging.getLogger("smpp_ray.cli")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
#: A Ctrl+C outside a stage's own stop handling: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not "(default: None)" on required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, "", [], False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


#: Subcommands that run one stage (and skip it when its output is complete): one per stage record.
STAGE_COMMANDS = PIPELINE_STAGES


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config (jobs/configs/*.yaml); defaults otherwise")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add(sub, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                            formatter_class=_Formatter)
    _common(parser)
    if name in STAGE_COMMANDS:
        parser.add_argument("--force", action="store_true",
                            help="rerun even when the output is complete for this config and these inputs")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smpp", formatter_class=_Formatter,
        description=textwrap.dedent("""\
            Social media popularity prediction on Ray: prompt-tuned CLIP with hierarchical
            prototypes and dual-grained prompts, then LightGBM/CatBoost tuned on Ray Tune.
            Stages: synth -> prepare -> prototypes -> train -> extract -> tune -> evaluate."""),
        epilog=_examples("smpp pipeline --config jobs/configs/demo.yaml --out runs/demo",
                         "smpp train --data runs/demo/data --prototypes runs/demo/prototypes --out runs/t1 "
                         "--set train.epochs=3",
                         "smpp <command> --help"))
    parser.add_argument("--version", action="version", version=f"smpp {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    for stage in STAGES.values():
        _add_stage(sub, stage)

    p = _add(sub, "predict", "score new posts (SMPD layout, labels optional) as a Ray Data job",
             _examples("smpp predict --pipeline runs/demo --posts new_posts/ --out scores.csv",
                       "smpp predict --model models:/smpp-scorer@champion --posts s3://b/new/ --out s3://b/scores/",
                       "smpp predict --pipeline runs/demo --model lightgbm --posts new_posts/ --out scores.parquet",
                       "smpp predict --pipeline runs/demo --posts smpd_test/ --format smp-challenge "
                       "--out submission.csv"))
    _scorer_source(p)
    p.add_argument("--posts", required=True,
                   help="new posts: a raw SMPD folder (test_ or train_ files + images) or a prepared dataset")
    p.add_argument("--out", required=True, help="scores: a .csv or .parquet file, or a folder of Parquet parts")
    p.add_argument("--format", dest="output_format", choices=["table", "smp-challenge"], default="table",
                   help="table: every model's score and the predicted classes; smp-challenge: the SMP Challenge "
                        "submission (post_id,popularity_score for every row of the test_ files, --out a .csv; "
                        "posts the network cannot score listed in <out>.fallback.csv)")

    p = _add(sub, "serve", "serve scores online: a Ray Serve app with POST /predict and GET /healthz",
             _examples("smpp serve --pipeline runs/demo",
                       "smpp serve --model models:/smpp-scorer@champion --set serve.replicas=4 "
                       "--set serve.gpus_per_replica=1"))
    _scorer_source(p)
    p.add_argument("--host", help="address to bind (serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (serve.port)")
    p.add_argument("--duration-s", type=float, default=0.0,
                   help="stop after this many seconds (0: until Ctrl+C); for smoke tests and benchmarks")

    p = _add(sub, "config", "print the effective config (YAML) of a --config + --set combination",
             _examples("smpp config show --config jobs/configs/demo.yaml --set train.epochs=3"))
    p.add_argument("action", choices=["show"], help="show: the config every stage would run with")

    p = _add(sub, "pipeline", "run every stage under one parent MLflow run, skipping complete ones",
             _examples("smpp pipeline --config jobs/configs/demo.yaml --out runs/demo",
                       "smpp pipeline --raw /data/smpd --config jobs/configs/smpd-8gpu.yaml --out s3://bucket/run1"))
    p.add_argument("--out", required=True, help="pipeline folder: raw/, data/, prototypes/, train/, ...")
    p.add_argument("--raw", default="", help="a real SMPD folder; without it a synthetic corpus is generated")
    p.add_argument("--only", default="", help="comma-separated stages to run (default all)")
    p.add_argument("--force", action="store_true", help="rerun stages even when their artifact is complete")
    return parser


def _add_stage(sub, stage: Stage) -> None:
    """``smpp <stage>``: a flag per input (or ``--pipeline`` for a stage inside one pipeline
    folder), ``--out``, and the stage's config shorthands."""
    p = _add(sub, stage.name, stage.help, _examples(*stage.examples))
    if stage.pipeline_scoped:
        p.add_argument("--pipeline", required=True, help="pipeline output folder")
    else:
        for spec in stage.inputs:
            p.add_argument(spec.option, dest=spec.name, required=not spec.optional,
                           default="" if spec.optional else None, help=spec.help)
        p.add_argument("--out", required=True, help=stage.out_help)
    for flag in stage.flags:
        p.add_argument("--" + flag.name.replace("_", "-"), dest=flag.name, type=flag.type, choices=flag.choices,
                       help=f"{flag.help} ({flag.key})")


def _scorer_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="", help="finished pipeline folder whose models score")
    parser.add_argument("--model", default="",
                        help="registered scorer (models:/smpp-scorer@champion, runs:/<id>/scorer) or bundle "
                             "folder; or blend, lightgbm or catboost: which score --pipeline gives")
    parser.add_argument("--score", choices=["blend", "lightgbm", "catboost"],
                        help="which model's score is predicted_popularity (default blend)")


def scorer_choice(args: argparse.Namespace) -> tuple[str, str]:
    """(scorer source, score) of ``--pipeline`` / ``--model`` / ``--score``; ValueError when unclear."""
    from smpp_ray.scoring.bundle import MODEL_CHOICES

    model, score = args.model, args.score
    if model in MODEL_CHOICES:  # --model lightgbm: which score, from --pipeline
        if score and score != model:
            raise ValueError(f"--model {model} and --score {score} disagree")
        model, score = "", model
    if bool(model) == bool(args.pipeline):
        raise ValueError("give the scorer as exactly one of --pipeline DIR or --model URI "
                         "(models:/smpp-scorer@champion, a runs:/ URI or a bundle folder)")
    return model or args.pipeline, score or "blend"


def _configure_logging(verbose: bool) -> None:
    """Library loggers' levels; where their records go is :func:`smpp_ray.console.capture`'s job."""
    for noisy in ("urllib3", "matplotlib", "PIL", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_SHORTHANDS: dict[str, dict[str, str]] = {
    **{stage.name: {flag.name: flag.key for flag in stage.flags} for stage in STAGES.values()},
    "serve": {"host": "serve.host", "port": "serve.port"},
}


def _overrides(args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys become ``--set`` overrides (flags win over YAML)."""
    extra = list(args.overrides)
    # Per subcommand: predict's --posts is a folder, not synth's post count.
    shorthands = _SHORTHANDS.get(args.command, {})
    for flag, key in shorthands.items():
        value = getattr(args, flag, None)
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


def _dispatch(args: argparse.Namespace, config: Config) -> object:
    from smpp_ray import stages

    command = args.command
    if command in STAGES:
        # A single stage whose output is already complete for this config and inputs returns at once.
        stage = STAGES[command]
        if stage.pipeline_scoped:
            layout = pipeline_layout(args.pipeline)
            given, out = pipeline_inputs(stage, layout, None), layout[stage.folder]
        else:
            given, out = {spec.name: getattr(args, spec.name) for spec in stage.inputs}, args.out
        run = stages.default_stage_run(config, root=_store_root(args), skip_complete=not args.force, fresh=args.force)
        location = stages.run_stage(command, config, given, out, run)
        if stage.show:
            stage.show(location, run.tracking_uri or None)
        return location
    if command == "predict":
        from smpp_ray.predict import predict_posts

        source, score = scorer_choice(args)
        return predict_posts(source, args.posts, args.out, config=config, model=score,
                             output_format=args.output_format)
    if command == "serve":
        from smpp_ray.serve import serve_scorer

        source, score = scorer_choice(args)
        return serve_scorer(source, config=config, model=score, duration_s=args.duration_s)
    if command == "config":
        import yaml

        from smpp_ray.config import config_to_dict
        from smpp_ray.redact import redact_uri

        console.out(redact_uri(yaml.safe_dump(config_to_dict(config), sort_keys=False)))
        return None
    if command == "pipeline":
        from smpp_ray.evaluate import print_results
        from smpp_ray.pipeline import run_pipeline

        only = [s.strip() for s in args.only.split(",") if s.strip()]
        result = run_pipeline(config, args.out, raw_dir=args.raw or None, only=only, force=args.force)
        if "table" in result:
            print_results(result)
        return args.out
    raise ConfigError(f"unknown command {command!r}")


def _print_summary(location: object) -> None:
    from smpp_ray.console import out
    from smpp_ray.summary import read_summary

    if isinstance(location, dict):  # predict and serve return their own summary
        out(json.dumps(location, indent=2, default=str))
        return
    summary = read_summary(str(location)) if location else None
    if summary:
        out(json.dumps({"stage": summary.stage, "out": str(location), "metrics": summary.metrics},
                       indent=2, default=str))
    else:
        out(str(location))


def _enable_faulthandler() -> None:
    """Python stacks on a native crash, to the real stderr (sys.stderr may be a capture without a
    file descriptor, as under pytest's capsys or an embedding application)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.enable(file=stream)
            return
        except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
            continue


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, 0 on --help
        return int(exit_.code or 0)
    _configure_logging(args.verbose)
    pipeline_root = args.command in ("pipeline", "serve") or (args.command in STAGES
                                                               and STAGES[args.command].pipeline_scoped)
    log_path = console.log_location(args.command, _output_of(args), pipeline_root=pipeline_root)
    published = console.published_log_location(args.command, _output_of(args), pipeline_root=pipeline_root)
    try:
        return _run_logged(args, log_path)
    finally:
        if published:
            console.publish_log(log_path, published)
            import os

            for stage in PIPELINE_STAGES:  # a pipeline's stage logs go beside its own, named by the same rule
                stage_log = console.stage_log_path(log_path, stage)
                if os.path.isfile(stage_log):
                    console.publish_log(stage_log, console.stage_log_path(published, stage))


def _run_logged(args: argparse.Namespace, log_path: str) -> int:
    with console.capture(log_path, verbose=args.verbose):
        # A native crash (SIGSEGV, SIGABRT) prints the Python stack of every thread before dying
        _enable_faulthandler()
        try:
            config = load_config(args.config, _overrides(args))
            location = _dispatch(args, config)
        except (ConfigError, ValueError, FileNotFoundError) as err:  # StorageError is a ValueError
            logger.error("%s", err)
            logging.getLogger("smpp.details").debug("details", exc_info=True)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            logger.error("interrupted; full log: %s", log_path)
            return EXIT_INTERRUPTED
        except Exception as err:
            logging.getLogger("smpp.details").error("smpp %s failed", args.command, exc_info=True)
            logger.error("smpp %s failed: %s: %s (traceback and library output in %s)", args.command,
                         type(err).__name__, err, log_path)
            return EXIT_FAILURE
        shown = args.command in STAGES and STAGES[args.command].show is not None
        if not shown and args.command not in ("pipeline", "config"):
            _print_summary(location)
        return EXIT_OK


def _store_root(args: argparse.Namespace) -> str:
    """Where a single stage's default MLflow store (mlruns.db) goes: beside its output folder, as a
    pipeline's stages share ``<pipeline>/mlruns.db``; never the folder the command is run from."""
    from smpp_ray import storage

    out = getattr(args, "out", None)
    if out:
        return storage.parent(storage.normalize(out))
    return getattr(args, "pipeline", None) or "."


def _output_of(args: argparse.Namespace) -> str | None:
    """The folder (or file) a command writes, beside which (in a pipeline: in which) its logs/ go."""
    return getattr(args, "out", None) or getattr(args, "pipeline", None) or None


if __name__ == "__main__":
    sys.exit(main())
