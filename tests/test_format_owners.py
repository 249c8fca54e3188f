"""One owner per on-disk format: a file's name is spelled only in the module that reads and writes
it; everyone else asks that module (a typed handle or a location function) where the file is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smpp_ray"

#: File name -> the modules that own it (relative to smpp_ray/).
OWNERS = {
    "summary.json": {"summary.py"},
    "manifest.json": {"data/dataset.py"},
    "feature_manifest.json": {"features/manifest.py"},
    "prototypes.safetensors": {"model/prototypes.py"},
    "members.json": {"model/prototypes.py"},
    "trainable.pt": {"model/checkpoint.py"},
    "meta.json": {"model/checkpoint.py"},
    "kept_ids.parquet": {"data/selection.py"},
    "metrics.json": {"gbdt/output.py"},
    "blend.json": {"gbdt/output.py"},
    "predictions.parquet": {"gbdt/output.py"},
    "feature_spec.json": {"gbdt/output.py"},
    "fallback.json": {"gbdt/fallback.py"},
    "bundle.json": {"scoring/bundle.py"},
    # the Hive-style split folders of a dataset's posts and of a features folder
    "split=": {"data/dataset.py", "features/manifest.py"},
    # the feature state folder, in a features folder (FeatureSet) and in a scorer bundle
    "feature_state": {"features/manifest.py", "scoring/bundle.py"},
}


def _spelled(path: Path) -> set[str]:
    """The owned file names that occur in ``path``'s string literals (documentation excluded: a
    string that is a statement of its own, as docstrings are)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            # a path or a name (no spaces); prose that names a file for a person (help, errors) is fine
            if not any(c.isspace() for c in node.value):
                found.update(name for name in OWNERS if name in node.value and _as_a_name(node.value, name))
    return found


def _as_a_name(text: str, name: str) -> bool:
    """``name`` in ``text`` as a file name, not inside a longer one (``fallback_feature_spec.json``)."""
    start = text.find(name)
    while start >= 0:
        before = text[start - 1] if start else ""
        if not (before.isalnum() or before == "_"):
            return True
        start = text.find(name, start + 1)
    return False


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_a_format_is_spelled_only_by_its_owner(name):
    spelled_by = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if name in _spelled(p)}
    assert spelled_by <= OWNERS[name], f"{name} is spelled outside its owner: {sorted(spelled_by - OWNERS[name])}"
    assert spelled_by, f"{name}: its owner no longer names it (update OWNERS)"


def test_the_check_sees_a_name_and_not_a_longer_one():
    assert _as_a_name("out/feature_spec.json", "feature_spec.json")
    assert not _as_a_name("fallback_feature_spec.json", "feature_spec.json")
