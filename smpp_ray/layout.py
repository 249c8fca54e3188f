"""Where each stage of a pipeline writes under its output location: the one owner of the layout."""

from __future__ import annotations

from smpp_ray import storage

PIPELINE_STAGES = ("synth", "prepare", "prototypes", "train", "extract", "tune", "evaluate")
#: Stage -> its folder under the pipeline location.
STAGE_FOLDERS = {"synth": "raw", "prepare": "data", "prototypes": "prototypes", "train": "train",
                 "extract": "features", "tune": "tune", "evaluate": "report"}


def pipeline_layout(out: str) -> dict[str, str]:
    """Folder name -> location (``raw``, ``data``, ..., ``report``), keeping URIs intact."""
    return {folder: storage.join(out, folder) for folder in STAGE_FOLDERS.values()}
