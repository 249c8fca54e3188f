"""The stage table is the one place a stage is written down: everything else is derived from it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from smpp_ray.cli import build_parser
from smpp_ray.config import Config
from smpp_ray.stage_table import PIPELINE_STAGES, STAGE_FOLDERS, STAGES, stage_inputs

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("name", PIPELINE_STAGES)
def test_every_stage_is_wired(name):
    stage = STAGES[name]
    # a subcommand with a flag per input (or --pipeline), and --out
    sub = _subcommands()[name]
    options = {o for a in sub._actions for o in a.option_strings}
    expected = {"--pipeline"} if stage.pipeline_scoped else {spec.option for spec in stage.inputs} | {"--out"}
    assert expected <= options, (name, expected - options)
    assert {"--" + f.name.replace("_", "-") for f in stage.flags} <= options
    # a job wrapper that runs exactly this stage
    wrapper = ROOT / "jobs" / f"{name}.py"
    assert wrapper.is_file(), wrapper
    assert f'run_job("{name}", sys.argv[1:])' in wrapper.read_text()
    # config sections that exist, and keys that exist in them
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(stage.sections) <= fields, stage.sections
    flat = {f"{s}.{k.name}" for s in fields for k in dataclasses.fields(getattr(Config(), s))}
    assert stage.run_control_keys <= flat, stage.run_control_keys - flat
    assert {f.key for f in stage.flags} <= flat
    # inputs come from stages before it; in_place stages say where their resumable state is
    earlier = PIPELINE_STAGES[:PIPELINE_STAGES.index(name)]
    assert all(spec.source in earlier for spec in stage.inputs), stage.inputs
    assert stage.writes in ("staged", "set_aside", "in_place")
    assert (stage.resumable is not None) == (stage.writes == "in_place")


def test_folders_are_distinct():
    assert len(set(STAGE_FOLDERS.values())) == len(STAGES)


def test_a_required_input_missing_is_named():
    with pytest.raises(ValueError, match="stage train: input 'prototypes'"):
        stage_inputs(STAGES["train"], Config(), {"data": "runs/data"})
    # an optional input given nothing is '' (extract: tabular only) or, with a resolver, left out
    assert stage_inputs(STAGES["extract"], Config(), {"data": "d"})["checkpoint"] == ""
    assert "selected_ids" not in stage_inputs(STAGES["tune"], Config(), {"features": "f"})


def _stage_name_lists(path: Path) -> list[int]:
    """Lines of ``path`` holding a literal collection of (nearly) every stage name: the pipeline
    spelled out again. A few stages named for a purpose of their own are fine."""
    names = set(PIPELINE_STAGES)
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
            node.keys if isinstance(node, ast.Dict) else []
        spelled = [e.value for e in elements if isinstance(e, ast.Constant) and e.value in names]
        if len(set(spelled)) >= len(names) - 1:
            lines.append(node.lineno)
    return lines


def test_nothing_outside_the_table_lists_the_stages():
    table = ROOT / "smpp_ray" / "stage_table.py"
    found = {str(p.relative_to(ROOT)): lines
             for folder in ("smpp_ray", "jobs", "tests", "bench")
             for p in sorted((ROOT / folder).rglob("*.py"))
             if p != table and (lines := _stage_name_lists(p))}
    assert not found, found
