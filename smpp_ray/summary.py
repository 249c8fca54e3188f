"""``summary.json``, the file that says a stage's output is complete: its one reader and writer.

Every stage writes it last, into its output location, so a location with a readable summary
whose ``status`` is ``complete`` holds a whole artifact; a torn or missing one means "not done".
A run that changes its folder removes it first (see :attr:`smpp_ray.stage_table.Stage.writes`).
Readers get a :class:`StageSummary` (:func:`read_summary`, :func:`require_summary`), whose
accessors are the only place the file's fields are spelled.

Artifacts inside the stage's folder are recorded relative to it (``ray_results/smpp-train/
checkpoint_000003``), so a pipeline folder copied or moved elsewhere (another disk, a bucket)
still names its own files; :func:`artifact_location` turns a recorded value back into a location.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from smpp_ray import storage

SUMMARY_FILE = "summary.json"


def summary_location(stage_dir: str) -> str:
    return storage.join(stage_dir, SUMMARY_FILE)


def relative_artifacts(stage_dir: str, artifacts: dict[str, Any]) -> dict[str, Any]:
    """``artifacts`` with every location inside ``stage_dir`` made relative to it."""
    base = storage.normalize(stage_dir).rstrip("/") + "/"
    out: dict[str, Any] = {}
    for key, value in artifacts.items():
        if isinstance(value, str) and value:
            location = storage.normalize(value)
            value = location[len(base):] if location.startswith(base) else value
        out[key] = value
    return out


def artifact_location(stage_dir: str, value: str) -> str:
    """A recorded artifact's location: relative values are inside ``stage_dir``."""
    if storage.is_uri(value) or value.startswith(("/", "file://")):
        return storage.normalize(value)
    return storage.join(stage_dir, value)


@dataclass(frozen=True)
class StageSummary:
    """A stage folder's ``summary.json``, read."""

    location: str
    """The stage's folder (artifacts recorded relative to it resolve against it)."""
    stage: str
    status: str
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """The config sections the stage ran with."""
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    """As recorded: locations inside the folder are relative (see :meth:`artifact`)."""
    mlflow_run_id: str | None = None
    fingerprint: str | None = None
    seconds: float | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def artifact(self, name: str) -> str | None:
        """The location of artifact ``name``, or None when the stage recorded none."""
        value = self.artifacts.get(name)
        return artifact_location(self.location, value) if isinstance(value, str) and value else None

    def section(self, name: str) -> dict[str, Any]:
        """One config section the stage ran with ({} when it does not read that section)."""
        return self.config.get(name) or {}

    @classmethod
    def from_dict(cls, location: str, values: dict[str, Any]) -> StageSummary:
        return cls(location, str(values.get("stage") or ""), str(values.get("status") or ""),
                   values.get("inputs") or {}, values.get("config") or {}, values.get("metrics") or {},
                   values.get("artifacts") or {}, values.get("mlflow_run_id"), values.get("fingerprint"),
                   values.get("seconds"))


def read_summary(stage_dir: str) -> StageSummary | None:
    """The stage's summary, or None when it is missing or torn (a killed run)."""
    location = summary_location(stage_dir)
    try:
        if not storage.is_file(location):
            return None
        values = json.loads(storage.read_text(location))
    except (json.JSONDecodeError, storage.StorageError, UnicodeDecodeError):
        return None
    return StageSummary.from_dict(stage_dir, values) if isinstance(values, dict) else None


def require_summary(stage_dir: str, stage: str) -> StageSummary:
    """The summary of a finished ``stage`` in ``stage_dir``, or a clear error naming both."""
    summary = read_summary(stage_dir)
    if summary is None or not summary.complete:
        raise ValueError(f"{storage.normalize(stage_dir)!r} holds no finished {stage} stage "
                         f"({SUMMARY_FILE}); run `smpp {stage}` (or the pipeline) first")
    return summary


def json_safe(value: Any) -> Any:
    """NaN and infinities become None, so the file stays JSON that every parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            return str(value)
    return value


def write_summary(stage_dir: str, summary: dict[str, Any]) -> str:
    """Write the summary (atomically: the stage is complete from this moment)."""
    return storage.write_json(summary_location(stage_dir), json_safe(summary))


def remove_summary(stage_dir: str) -> None:
    """Mark ``stage_dir`` not complete: the first step of a run that changes the folder in place."""
    storage.remove(summary_location(stage_dir))


def is_complete_summary(summary: StageSummary | None) -> bool:
    return summary is not None and summary.complete
