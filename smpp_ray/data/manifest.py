"""A prepared dataset's ``manifest.json``, typed (read and written through
:class:`smpp_ray.data.dataset.Dataset`), and the user-given class list file.

Keys: ``schema_version``, ``raw_dir``, ``files``, ``counts`` {``input_rows``, ``written``,
``rejected``, ``per_split`` {train, val, test}, ``rejected_by_field``}, ``taxonomy``
(:meth:`Taxonomy.to_dict`), ``concepts`` (names; ``concept_id`` indexes this list), ``split``
{``method``, fractions, ``boundaries``}, ``time_range`` {``start``, ``end``} (unix seconds),
``image`` {``max_side``, ``jpeg_quality``, ``max_bytes``, ``max_pixels``} and ``run`` {``seconds``, ``posts_per_s``}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smpp_ray import storage
from smpp_ray.data.schema import SCHEMA_VERSION, SPLITS, Taxonomy


@dataclass(frozen=True)
class DatasetManifest:
    """A prepared dataset's manifest, typed: what readers take from it, by name.

    ``facts`` is the JSON as written (for the summary and the report's verbatim figures); every
    reader in the package goes through the accessors below instead of digging in it.
    """

    facts: dict[str, Any]

    @classmethod
    def checked(cls, facts: Any, location: str) -> DatasetManifest:
        """``facts`` as read from ``location``; ValueError naming it unless this code's schema version."""
        version = facts.get("schema_version") if isinstance(facts, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(f"{location!r} has schema_version {version!r}; this code reads version {SCHEMA_VERSION}. "
                             "Rerun `smpp prepare`.")
        return cls(facts)

    @property
    def taxonomy(self) -> Taxonomy:
        return Taxonomy.from_dict(self.facts["taxonomy"])

    @property
    def concepts(self) -> list[str]:
        """Concept names; a post's ``concept_id`` indexes this list."""
        return list(self.facts.get("concepts") or [])

    @property
    def extra_columns(self) -> tuple[str, ...]:
        return tuple(self.facts.get("extra_columns") or ())

    @property
    def image(self) -> dict[str, int]:
        """How the images were stored (``max_side``, ``jpeg_quality``, ``max_bytes``, ``max_pixels``)."""
        return dict(self.facts.get("image") or {})

    @property
    def counts(self) -> dict[str, Any]:
        """``input_rows``, ``written``, ``rejected``, ``per_split``, ``rejected_by_field``."""
        return dict(self.facts.get("counts") or {})

    @property
    def per_split(self) -> dict[str, int]:
        per_split = self.counts.get("per_split") or {}
        return {split: int(per_split.get(split, 0)) for split in SPLITS}

    @property
    def written(self) -> int:
        return int(self.counts.get("written", sum(self.per_split.values())))

    @property
    def input_rows(self) -> int:
        return int(self.counts.get("input_rows", self.written))

    @property
    def time_start(self) -> int | None:
        """The earliest postdate (unix seconds), None for an empty dataset."""
        start = (self.facts.get("time_range") or {}).get("start")
        return int(start) if isinstance(start, (int, float)) else None

    @property
    def raw_files(self) -> dict[str, dict[str, str]]:
        """The raw files read, by prefix (``train`` / ``test``) and kind."""
        return dict(self.facts.get("files") or {})

    @property
    def raw_dir(self) -> str | None:
        return self.facts.get("raw_dir")

    @property
    def split(self) -> dict[str, Any]:
        """How the splits were made: ``method``, the fractions, ``boundaries`` per split."""
        return dict(self.facts.get("split") or {})

    @property
    def time_range(self) -> dict[str, int | None]:
        """``start`` / ``end`` postdates (unix seconds) of the whole dataset."""
        return dict(self.facts.get("time_range") or {})


def load_taxonomy_file(location: str) -> Taxonomy:
    """A class list given by the user (``data.taxonomy``): JSON in the manifest's ``taxonomy`` form,
    ``{"categories": [{"id", "name"}], "subcategories": [{"id", "name", "category_id"}]}``."""
    try:
        return Taxonomy.from_dict(storage.read_json(location))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"data.taxonomy {location!r} is not a taxonomy ({{'categories': [{{'id', 'name'}}], "
                         f"'subcategories': [{{'id', 'name', 'category_id'}}]}}): {err!r}") from err
