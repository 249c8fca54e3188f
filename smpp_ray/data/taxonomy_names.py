"""The SMPD class taxonomy: 11 categories with 77 subcategories under them.

The 11 category names are the real SMPD ones, spelled as the dataset spells them (including
``Whether&Season``). SMPD does not publish its 77 subcategory names as a list; three of the names
below are real ones seen in the released files (``Raining``, ``Girls,Fashion`` with its comma,
``Music``), the others are invented but plausible, seven per category. The synthetic corpus uses
exactly these names. A real corpus needs its own list: set ``data.taxonomy`` to a JSON file of it
(the manifest's ``taxonomy`` form); names outside the taxonomy in use are rejected rows, never a
new class list (see :func:`smpp_ray.data.splits.resolve_taxonomy`).
"""

from __future__ import annotations

from smpp_ray.data.schema import Taxonomy

#: Category name -> its subcategory names, in id order (category ids follow the key order).
SMPD_TAXONOMY: dict[str, list[str]] = {
    "Animal": ["Dog", "Cat", "Bird", "Insect", "Horse", "Wildlife", "Aquatic"],
    "Electronics": ["Phone", "Computer", "Camera", "Gadget", "Robot", "Audio Gear", "Game Console"],
    "Entertainment": ["Music", "Concert", "Movie", "Theater", "Dance", "Festival", "Gaming"],
    "Family": ["Baby", "Kids", "Parents", "Grandparents", "Family Portrait", "Pets at Home", "Home Life"],
    "Fashion": ["Girls,Fashion", "Men's Fashion", "Shoes", "Jewelry", "Makeup", "Hairstyle", "Tattoo"],
    "Food": ["Dessert", "Drinks", "Fruit", "Vegetables", "Meals", "Bakery", "Coffee"],
    "Holiday&Celebrations": ["Christmas", "Halloween", "Wedding", "Birthday", "New Year", "Easter",
                             "Thanksgiving"],
    "Social&People": ["Portrait", "Friends", "Couple", "Crowd", "Street People", "Protest", "Selfie"],
    "Travel&Active&Sports": ["Beach", "Mountain", "Hiking", "Cycling", "Soccer", "Running", "Skiing"],
    "Urban": ["Architecture", "Street", "Skyline", "Bridge", "Graffiti", "Night City", "Transport"],
    "Whether&Season": ["Raining", "Snow", "Sunset", "Clouds", "Autumn Leaves", "Spring Flowers",
                       "Storm"],
}


def default_taxonomy() -> Taxonomy:
    """The 11/77 taxonomy above as a :class:`Taxonomy` (ids are positions in the lists)."""
    categories = tuple(SMPD_TAXONOMY)
    subcategories: list[str] = []
    parents: list[int] = []
    for category_id, names in enumerate(SMPD_TAXONOMY.values()):
        subcategories.extend(names)
        parents.extend([category_id] * len(names))
    return Taxonomy(categories, tuple(subcategories), tuple(parents))
