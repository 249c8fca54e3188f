"""Where a dataset's class list comes from: a file, the corpus's own ``taxonomy.json``, or the data.

SMPD publishes no list of its 77 subcategory names; the only source is the training file itself.
So by default (``data.taxonomy: infer``) the classes are the corpus's own: the list in a
``taxonomy.json`` beside the raw files when the corpus carries one (``smpp synth`` writes its
packaged list there), else the (Category, Subcategory) pairs of the labelled training rows:

* a subcategory's parent is the category most of its rows name (ties: the first name in sorted
  order); rows naming another category are rejects that name the conflict;
* a subcategory with fewer than ``min_class_posts`` rows under that parent is not a class (a
  stray typo must not become one): its rows are rejects saying so;
* categories are in name order, subcategories grouped by category then in name order, so the same
  rows give the same ids whatever their order in the files.

Once chosen, the list is recorded in the manifest and every later stage, ``predict`` and
``serve`` use that list: a post naming a class outside it is a reject. A file named by
``data.taxonomy`` (the manifest's ``taxonomy`` form) stays an explicit choice; ``packaged`` is the
synthetic corpus's 11/77 list.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from smpp_ray import storage
from smpp_ray.data.manifest import load_taxonomy_file
from smpp_ray.data.schema import Taxonomy

logger = logging.getLogger(__name__)

#: The class list a corpus may carry beside its raw files.
CORPUS_TAXONOMY_FILE = "taxonomy.json"
INFER, PACKAGED = "infer", "packaged"


@dataclass(frozen=True)
class InferredTaxonomy:
    """A class list read from the data, with why some names did not become classes."""

    taxonomy: Taxonomy
    rare: dict[str, int] = field(default_factory=dict)
    """Subcategory -> its row count, for names below ``min_class_posts``."""
    majority: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """Subcategory named under several categories -> (its parent, rows under it, all its rows)."""


def infer_taxonomy(pairs: Iterable[tuple[str, str]], min_class_posts: int) -> InferredTaxonomy:
    """The classes of labelled (category, subcategory) rows (rules in the module docstring).

    Raises ValueError when no subcategory has ``min_class_posts`` rows: a corpus without classes
    cannot train the class prompts.
    """
    counts: dict[str, Counter[str]] = {}
    for category, subcategory in pairs:
        counts.setdefault(subcategory, Counter())[category] += 1
    parent_of: dict[str, str] = {}
    rare: dict[str, int] = {}
    majority: dict[str, tuple[str, int, int]] = {}
    for subcategory, parents in counts.items():
        parent, count = min(parents.items(), key=lambda item: (-item[1], item[0]))
        if len(parents) > 1:
            majority[subcategory] = (parent, count, sum(parents.values()))
        if count < min_class_posts:
            rare[subcategory] = count
        else:
            parent_of[subcategory] = parent
    if not parent_of:
        raise ValueError(f"no subcategory has data.min_class_posts={min_class_posts} labelled training rows "
                         f"({len(counts)} names seen): the corpus has no class to learn")
    categories = tuple(sorted(set(parent_of.values())))
    category_id = {name: i for i, name in enumerate(categories)}
    subcategories = tuple(sorted(parent_of, key=lambda s: (category_id[parent_of[s]], s)))
    taxonomy = Taxonomy(categories, subcategories, tuple(category_id[parent_of[s]] for s in subcategories))
    if rare:
        logger.warning("prepare: %d subcategory name(s) have fewer than %d training rows and are not classes "
                       "(their rows are rejects): %s", len(rare), min_class_posts,
                       ", ".join(repr(n) for n in sorted(rare)[:10]) + (" ..." if len(rare) > 10 else ""))
    return InferredTaxonomy(taxonomy, rare, majority)


def corpus_taxonomy(raw_dir: str) -> tuple[Taxonomy, str] | None:
    """The class list a corpus carries (``taxonomy.json`` in its raw folder) and its location."""
    location = storage.join(raw_dir, CORPUS_TAXONOMY_FILE)
    if not storage.is_file(location):
        return None
    return load_taxonomy_file(location), location


def write_corpus_taxonomy(raw_dir: str, taxonomy: Taxonomy) -> str:
    """Write the class list a corpus carries beside its raw files; returns its location."""
    return storage.write_json(storage.join(raw_dir, CORPUS_TAXONOMY_FILE), taxonomy.to_dict())


def chosen_taxonomy(choice: str) -> Taxonomy | None:
    """``data.taxonomy`` as prepare takes it: None for ``infer`` (decided from the corpus), the
    packaged list for ``packaged``, else the list in the file at that location."""
    if choice == INFER:
        return None
    if choice == PACKAGED:
        from smpp_ray.data.taxonomy_names import default_taxonomy

        return default_taxonomy()
    return load_taxonomy_file(choice)
