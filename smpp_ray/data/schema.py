"""The Arrow schema of prepared posts and rejects, and the class taxonomy stored in
``manifest.json``: the contract between ``prepare`` (which writes them) and every later stage
(which reads them). Where they lie in a dataset folder: :class:`smpp_ray.data.dataset.Dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

#: 2: ``user_description_text`` (the 2024+ user file's text descriptions) and ``imageless/``.
#: 3: ``extra`` (a table corpus's extra numeric columns, named by the manifest's ``extra_columns``).
SCHEMA_VERSION = 3
SPLITS = ("train", "val", "test")

#: One row per post. Ids are strings as in SMPD; absent values are null, never sentinel strings.
POSTS_SCHEMA = pa.schema([
    pa.field("pid", pa.string(), nullable=False),            # SMPD Pid
    pa.field("uid", pa.string(), nullable=False),            # SMPD Uid (user)
    pa.field("row_index", pa.int64(), nullable=False),       # row of the post in the raw files
    pa.field("image", pa.binary(), nullable=False),          # JPEG bytes, longest side <= data.max_image_side
    pa.field("image_path", pa.string()),                     # relative path in the raw folder
    pa.field("title", pa.string()),                          # may be ""
    pa.field("tags", pa.string()),                           # Alltags: space-separated, may be ""
    pa.field("mediatype", pa.string()),
    pa.field("category", pa.string()),                      # names; null for unlabelled test posts
    pa.field("subcategory", pa.string()),
    pa.field("concept", pa.string()),
    pa.field("category_id", pa.int32()),                     # ids index the manifest taxonomy; -1 unknown
    pa.field("subcategory_id", pa.int32()),
    pa.field("concept_id", pa.int32()),
    pa.field("postdate", pa.int64(), nullable=False),        # unix seconds (UTC)
    pa.field("latitude", pa.float64()),                      # null when the post has no geo
    pa.field("longitude", pa.float64()),
    pa.field("geoaccuracy", pa.float64()),
    pa.field("ispublic", pa.int8()),
    pa.field("pathalias", pa.string()),
    pa.field("photo_firstdate", pa.int64()),                 # unix seconds of the user's first photo; null unknown
    pa.field("photo_firstdatetaken", pa.int64()),
    pa.field("photo_count", pa.int64()),
    pa.field("ispro", pa.int8()),
    pa.field("canbuypro", pa.int8()),
    pa.field("timezone_offset", pa.float64()),               # hours east of UTC; null unknown
    pa.field("timezone_id", pa.string()),
    pa.field("user_description", pa.list_(pa.float32())),   # the comma-separated floats, parsed (2019-2023 form)
    pa.field("user_description_text", pa.string()),          # the raw text (2024+ form); null when absent
    pa.field("location_description", pa.string()),           # text only; the older float vectors are dropped
    pa.field("label", pa.float64()),                         # log-views popularity; null for test_ files
    pa.field("extra", pa.list_(pa.float64())),               # manifest extra_columns' values (null: missing)
])

#: Columns a row carries between prepare's readers and its image tasks, never written: the file
#: the row came from (named in its image rejects), the prefix it stands for (``train_`` labelled,
#: ``test_`` not) and the image bytes a table corpus carries in a column of its own.
SOURCE_COLUMN, PREFIX_COLUMN, IMAGE_BYTES_COLUMN = "_img_source", "_prefix", "_image_bytes"

#: One row per rejected raw row; ``counts in = rows written + rows rejected``.
REJECTS_SCHEMA = pa.schema([
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("pid", pa.string()),
    pa.field("uid", pa.string()),
    pa.field("field", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class Taxonomy:
    """Category and subcategory names with ids (SMPD: 11 and 77); ``parents[s]`` is the category of s."""

    categories: tuple[str, ...]
    subcategories: tuple[str, ...]
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.parents) != len(self.subcategories):
            raise ValueError(f"taxonomy has {len(self.subcategories)} subcategories but {len(self.parents)} parents")
        bad = [p for p in self.parents if not 0 <= p < len(self.categories)]
        if bad:
            raise ValueError(f"taxonomy parent id {bad[0]} out of range for {len(self.categories)} categories")

    @property
    def category_ids(self) -> dict[str, int]:
        """Category name -> id."""
        return {name: i for i, name in enumerate(self.categories)}

    @property
    def subcategory_ids(self) -> dict[str, int]:
        """Subcategory name -> id."""
        return {name: i for i, name in enumerate(self.subcategories)}

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def num_subcategories(self) -> int:
        return len(self.subcategories)

    def to_dict(self) -> dict:
        return {
            "categories": [{"id": i, "name": n} for i, n in enumerate(self.categories)],
            "subcategories": [{"id": i, "name": n, "category_id": p}
                              for i, (n, p) in enumerate(zip(self.subcategories, self.parents, strict=True))],
        }

    @classmethod
    def from_dict(cls, values: dict) -> Taxonomy:
        cats = sorted(values["categories"], key=lambda c: c["id"])
        subs = sorted(values["subcategories"], key=lambda s: s["id"])
        return cls(tuple(c["name"] for c in cats), tuple(s["name"] for s in subs),
                   tuple(int(s["category_id"]) for s in subs))
