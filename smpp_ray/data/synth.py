"""A synthetic SMPD corpus: the real file layout, real JPEG images, a known generative model.

The real SMPD cannot be shipped, so every stage is developed and tested on a corpus written here
in exactly the SMP Challenge layout (see ``DESIGN.md``): seven files of row-aligned JSON arrays
with string-typed values, ``train_label.txt``, ``train_img_filepath.txt`` and JPEG images under
``train/<Uid>/<Pid>.jpg``; optionally the same for ``test_`` posts (no label file). Beside them
``oracle.parquet`` holds, per Pid, the noise-free popularity score, the split and the label.
The corpus is written to any location :mod:`smpp_ray.storage` writes (a local folder or an
``s3://`` / ``gs://`` prefix).

Generative model (all draws from ``numpy.random.default_rng(seed)``; the class-level look, words
and effects come from a fixed seed so that corpora of different seeds share the same classes):

* **Users.** ``u`` users (default ``posts // 12``), each with a latent popularity
  ``z ~ N(0, 1)``. ``z`` drives the posting rate (posts are assigned to users with probability
  ``∝ exp(0.9 z)``), ``photo_count = exp(6 + 1.3 z + 0.5 ε)``, ``ispro ~ Bernoulli(σ(1.5 z - 1.2))``
  and a 16-float ``user_description`` (a noisy linear read-out of ``z`` and the user's taste).
  Each user has three personal words (invented syllable words), a tag habit
  (mean tag count ``exp(N(1.8, 0.7))``), a timezone and sometimes a path alias.
* **Classes.** The 11 real SMPD categories with the 77 subcategories of
  :mod:`smpp_ray.data.taxonomy_names` (most subcategory names invented). A user's taste is
  ``0.8 Dirichlet(0.15) + 0.2 prior`` over the 77 subcategories (the prior follows the real
  category shares); each post's subcategory is drawn from its user's taste. The Concept is one of
  the subcategory's four class words.
* **Images** (``image_size`` square JPEG, quality 90). The category fixes the background hue,
  the subcategory fixes a foreground colour and one of seven patterns (disc, square, triangle,
  stripes, rings, checker, cross) with its own stripe frequency and angle; each post jitters
  position, scale, rotation and phase and adds a background gradient and pixel noise. A per-post
  *visual appeal* ``a ~ N(0, 1)`` sets contrast (``× e^{0.45a}``), saturation (``× e^{0.35a}``)
  and, when negative, blur (Gaussian, radius ``0.9 |a| · size/64``). Appeal is visible only in
  pixels: no metadata field carries it.
* **Text.** Titles are empty for 55% of posts, else a camera file name, class words or a user
  word with a number. Tags (``Alltags``, space-separated) mix class words of the subcategory
  (30%), words of the category (10%), the user's words (25%) and a generic vocabulary (35%), so
  text tells the class, noisily.
* **Time and place.** Postdate (unix seconds, UTC) over 16 months from 2015-11-01 with
  weekday (weekend ×1.3) and hour-of-day (evening peak) effects; ``test_`` posts fall in the two
  months after. 12% of posts have geo; the rest have Latitude ``"0"``, Longitude ``""`` or
  ``"0"``, Geoaccuracy ``"0"``. ``photo_firstdatetaken`` is ``"None"`` for 10% of users.
* **Popularity.** Noise-free score
  ``s = 5 + 1.1 z + e_sub + 0.9 a + 0.25 cos(2π(h-20)/24) + 0.1 weekend - 0.3 t + 0.25 log1p(#tags)
  + 0.3 ispro`` with ``e_sub ~ N(0, 0.5)`` per subcategory, ``h`` the hour and ``t`` the
  fraction of the 16 months elapsed (recent posts have had less time to gather views). The
  label is ``s + ε`` with ``ε`` Gaussian, its scale set from the spread of ``s`` so that the
  oracle SRC (Spearman of label vs ``s``) is about 0.8; labels are written with 4 decimals.
  A model that sees only metadata can recover ``z``, the class (noisily) and time but not ``a``,
  so its achievable SRC is clearly lower than one that also reads pixels.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from smpp_ray import console, storage
from smpp_ray.data.taxonomy import CORPUS_TAXONOMY_FILE, write_corpus_taxonomy
from smpp_ray.data.taxonomy_names import default_taxonomy

logger = logging.getLogger(__name__)

#: 2015-11-01 00:00:00 UTC, a Sunday; training posts span the next 16 months.
START_TIMESTAMP = 1446336000
TRAIN_DAYS = 487
TEST_DAYS = 61
#: Seed of class-level choices (colours, patterns, words, effects): fixed so every corpus shares them.
_CLASS_SEED = 20_190_601
#: Target correlation of label and noise-free score; Spearman = (6/π) asin(r/2) ≈ 0.8 at r = 0.813.
_TARGET_PEARSON = 0.813
#: Category shares of real SMPD training posts (public statistics), in SMPD_TAXONOMY order.
_CATEGORY_SHARES = np.array([0.065, 0.018, 0.097, 0.014, 0.161, 0.055, 0.179, 0.076, 0.218, 0.05, 0.066])

#: Four class words per subcategory (tags, titles, Concept); the first is the Concept's default.
_CLASS_WORDS: dict[str, list[str]] = {
    "Dog": ["puppy", "doggy", "labrador", "bark"], "Cat": ["kitten", "kitty", "meow", "whiskers"],
    "Bird": ["feathers", "parrot", "birding", "wings"], "Insect": ["butterfly", "bee", "beetle", "macro"],
    "Horse": ["pony", "stallion", "equestrian", "mane"], "Wildlife": ["safari", "deer", "fox", "zoo"],
    "Aquatic": ["fish", "aquarium", "coral", "dolphin"],
    "Phone": ["smartphone", "iphone", "android", "mobile"], "Computer": ["laptop", "keyboard", "pc", "monitor"],
    "Camera": ["lens", "dslr", "tripod", "shutter"], "Gadget": ["gizmo", "drone", "smartwatch", "tech"],
    "Robot": ["android", "robotics", "mech", "automaton"], "Audio Gear": ["headphones", "speaker", "hifi", "vinyl"],
    "Game Console": ["playstation", "xbox", "nintendo", "controller"],
    "Music": ["song", "guitar", "rnb", "band"], "Concert": ["stage", "live", "gig", "crowd"],
    "Movie": ["cinema", "film", "premiere", "actor"], "Theater": ["play", "drama", "broadway", "curtain"],
    "Dance": ["ballet", "dancer", "salsa", "choreography"], "Festival": ["fest", "carnival", "parade", "fair"],
    "Gaming": ["esports", "gamer", "arcade", "cosplay"],
    "Baby": ["newborn", "infant", "toddler", "cradle"], "Kids": ["children", "child", "playground", "toys"],
    "Parents": ["mom", "dad", "mother", "father"], "Grandparents": ["grandma", "grandpa", "elderly", "generations"],
    "Family Portrait": ["family", "reunion", "together", "siblings"],
    "Pets at Home": ["pet", "couch", "cuddle", "furry"], "Home Life": ["home", "kitchen", "livingroom", "cozy"],
    "Girls,Fashion": ["skirt", "dress", "girl", "style"], "Men's Fashion": ["suit", "tie", "menswear", "gentleman"],
    "Shoes": ["sneakers", "heels", "boots", "footwear"], "Jewelry": ["necklace", "ring", "earrings", "gold"],
    "Makeup": ["lipstick", "cosmetics", "beauty", "eyeliner"], "Hairstyle": ["hair", "haircut", "braid", "blonde"],
    "Tattoo": ["ink", "inked", "tattooed", "bodyart"],
    "Dessert": ["cake", "icecream", "chocolate", "sweet"], "Drinks": ["cocktail", "beer", "wine", "bar"],
    "Fruit": ["apple", "berries", "banana", "orange"], "Vegetables": ["salad", "veggies", "tomato", "greens"],
    "Meals": ["dinner", "lunch", "restaurant", "delicious"], "Bakery": ["bread", "croissant", "pastry", "baking"],
    "Coffee": ["espresso", "latte", "cafe", "barista"],
    "Christmas": ["xmas", "santa", "tree", "ornaments"], "Halloween": ["pumpkin", "costume", "spooky", "witch"],
    "Wedding": ["bride", "groom", "weddingdress", "ceremony"], "Birthday": ["party", "candles", "gifts", "balloons"],
    "New Year": ["fireworks", "newyear", "countdown", "champagne"], "Easter": ["eggs", "bunny", "easteregg", "spring"],
    "Thanksgiving": ["turkey", "feast", "harvest", "thankful"],
    "Portrait": ["face", "headshot", "eyes", "model"], "Friends": ["friendship", "buddies", "fun", "hangout"],
    "Couple": ["love", "romance", "kiss", "valentine"], "Crowd": ["people", "gathering", "audience", "masses"],
    "Street People": ["pedestrian", "candid", "streetlife", "stranger"],
    "Protest": ["march", "rally", "banner", "activism"], "Selfie": ["me", "myself", "selfportrait", "smile"],
    "Beach": ["sea", "sand", "waves", "ocean"], "Mountain": ["peak", "alps", "summit", "valley"],
    "Hiking": ["trail", "trek", "backpack", "forest"], "Cycling": ["bike", "bicycle", "cyclist", "mtb"],
    "Soccer": ["football", "goal", "stadium", "fifa"], "Running": ["marathon", "runner", "race", "jogging"],
    "Skiing": ["ski", "slope", "snowboard", "piste"],
    "Architecture": ["building", "facade", "cathedral", "columns"], "Street": ["road", "alley", "sidewalk", "corner"],
    "Skyline": ["cityscape", "skyscraper", "downtown", "towers"], "Bridge": ["river", "arch", "crossing", "span"],
    "Graffiti": ["streetart", "mural", "spray", "tag"], "Night City": ["neon", "citylights", "nightlife", "lights"],
    "Transport": ["train", "subway", "bus", "tram"],
    "Raining": ["umbrella", "puddle", "rainyday", "drizzle"], "Snow": ["snowfall", "winter", "frost", "snowflake"],
    "Sunset": ["dusk", "golden", "twilight", "horizon"], "Clouds": ["sky", "overcast", "cumulus", "skyporn"],
    "Autumn Leaves": ["fall", "leaves", "foliage", "maple"],
    "Spring Flowers": ["blossom", "tulips", "sakura", "bloom"], "Storm": ["lightning", "thunder", "tornado", "wind"],
}
_CATEGORY_WORDS: dict[str, list[str]] = {
    "Animal": ["animal", "animals", "nature"], "Electronics": ["electronics", "device", "technology"],
    "Entertainment": ["entertainment", "show", "music"], "Family": ["family", "love", "home"],
    "Fashion": ["fashion", "style", "outfit"], "Food": ["food", "foodie", "yummy"],
    "Holiday&Celebrations": ["holiday", "celebration", "party"], "Social&People": ["people", "social", "portrait"],
    "Travel&Active&Sports": ["travel", "sports", "outdoor"], "Urban": ["city", "urban", "street"],
    "Whether&Season": ["weather", "season", "sky"],
}
_NOISE_WORDS = (
    "canon nikon sony fuji 2015 2016 2017 bw blackandwhite light photo photography color colour art "
    "flickr iphone instagram film 35mm explore vintage blue red green white black summer winter "
    "nature beautiful happy travel love day night trip weekend old new view instagood picoftheday "
    "eos 50mm d750 a7 lightroom hdr square portrait landscape"
).split()
_SYLLABLES = "ka lo mi ra sen tu vo pe li an dor bel qui zan mar tis ol ne fa ru".split()
_TIMEZONES = np.array(["-8", "-5", "-3", "0", "1", "2", "3", "5.5", "8", "9", "10"])
_HOUR_WEIGHTS = np.array([3, 2, 1.5, 1, 1, 1, 1.5, 2.5, 3.5, 4, 4.5, 5, 5.5, 5, 5, 5, 5.5, 6, 7, 8, 8.5, 8, 6, 4.5])
#: Weekday weights starting at Sunday (the start date's weekday): weekends post more.
_WEEKDAY_WEIGHTS = np.array([1.3, 1.0, 1.0, 1.0, 1.0, 1.05, 1.3])
_PATTERNS = ("disc", "square", "triangle", "stripes", "rings", "checker", "cross")
#: Images rendered before their writes are handed to the writer threads (bounds memory).
_WRITE_CHUNK = 256
#: Concurrent image writes: each is a round trip on object storage.
_WRITE_THREADS = 8

#: Written first into a corpus folder: what tells a rerun that the folder's files are synth's own.
SYNTH_MARKER = ".smpp-synth"
#: The 2024+ form's folders: the JSON metadata one folder deeper, the images under another name
#: than the path file's first folder (as the SMP Challenge's archives unpack).
METADATA_FOLDER_2024 = "{split}_allmetadata_json"
IMAGE_FOLDER_2024 = "SMP_{split}_images"
FORMS = ("smpd2019", "smpd2024")
_MACHINE_TAGS = ("uploaded:by=flickstagram", "uploaded:by=instagram", "instagram:photo={pid}",
                 "foursquare:venue=4b{pid}", "geo:country=france")

TRAIN_FILES = {
    "text": "train_text.json",
    "category": "train_category.json",
    "temporalspatial": "train_temporalspatial_information.json",
    "additional": "train_additional_information.json",
    "user": "train_user_data.json",
    "label": "train_label.txt",
    "img_filepath": "train_img_filepath.txt",
}


@dataclass(frozen=True)
class ClassLook:
    """Seed-independent appearance of the 77 subcategories (arrays indexed by subcategory id)."""

    background: np.ndarray   # (77, 3) RGB in [0, 1]; hue set by the category
    foreground: np.ndarray   # (77, 3)
    pattern: np.ndarray      # (77,) index into _PATTERNS
    frequency: np.ndarray    # (77,) stripes/rings/checker cycles per image side
    angle: np.ndarray        # (77,) radians, the class's mean pattern rotation
    effect: np.ndarray       # (77,) additive popularity effect e_sub


@dataclass
class Corpus:
    """Every generated value of a corpus except pixels (arrays indexed by post, users by user)."""

    # users
    uid: np.ndarray
    z: np.ndarray
    photo_count: np.ndarray
    ispro: np.ndarray
    canbuypro: np.ndarray
    firstdate: np.ndarray
    firstdatetaken: np.ndarray   # object array of strings ("None" for unknown)
    timezone: np.ndarray          # index into _TIMEZONES
    description: list[str]
    location: list[str]
    pathalias: list[str]
    user_words: list[list[str]]
    # posts
    user: np.ndarray
    is_test: np.ndarray
    pid: np.ndarray
    subcategory: np.ndarray
    concept: np.ndarray
    postdate: np.ndarray
    hour: np.ndarray
    appeal: np.ndarray
    titles: list[str]
    tags: list[str]
    mediatype: np.ndarray
    geo: np.ndarray               # bool
    latitude: np.ndarray
    longitude: np.ndarray
    geoaccuracy: np.ndarray
    score: np.ndarray             # noise-free
    label: np.ndarray


def class_look() -> ClassLook:
    """The fixed per-subcategory colours, patterns and popularity effects."""
    rng = np.random.default_rng(_CLASS_SEED)
    taxonomy = default_taxonomy()
    n_sub = taxonomy.num_subcategories
    parents = np.array(taxonomy.parents)
    within = np.array([int(np.sum(parents[:s] == parents[s])) for s in range(n_sub)])  # position in category
    background, foreground = np.zeros((n_sub, 3)), np.zeros((n_sub, 3))
    fg_hues = (np.arange(n_sub) * 0.618034) % 1.0   # golden-ratio hues: neighbours differ a lot
    for s in range(n_sub):
        hue = parents[s] / taxonomy.num_categories + rng.uniform(-0.02, 0.02)
        background[s] = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.35, 0.6), rng.uniform(0.45, 0.8))
        foreground[s] = colorsys.hsv_to_rgb(fg_hues[s], rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return ClassLook(
        background=background, foreground=foreground, pattern=within % len(_PATTERNS),
        frequency=rng.uniform(2.5, 6.0, n_sub), angle=rng.uniform(0, np.pi, n_sub),
        effect=rng.normal(0.0, 0.5, n_sub),
    )


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    syllables = rng.integers(0, len(_SYLLABLES), size=(count, 3))
    lengths = rng.integers(2, 4, size=count)
    return ["".join(_SYLLABLES[i] for i in row[:n]) for row, n in zip(syllables, lengths, strict=True)]


def _tag_words(subcategory: str) -> list[str]:
    """Class words of a subcategory: its name as tag tokens plus its four words."""
    tokens = subcategory.lower().replace(",", " ").replace("'", "").split()
    joined = ["".join(tokens)] if len(tokens) > 1 else []
    return tokens + joined + _CLASS_WORDS[subcategory]


def _generate_users(rng: np.random.Generator, n_users: int) -> dict:
    z = rng.normal(size=n_users)
    uid_numbers = rng.choice(100_000_000, size=n_users, replace=False)
    uid_suffix = rng.integers(0, 100, size=n_users)
    first = START_TIMESTAMP - (rng.uniform(0.1, 1.0, n_users) * 10 * 365 * 86400).astype(np.int64)
    taken = first - (rng.uniform(0, 5, n_users) * 365 * 86400).astype(np.int64)
    taken_str = np.where(rng.random(n_users) < 0.1, "None", taken.astype(str)).astype(object)
    ispro = (rng.random(n_users) < 1 / (1 + np.exp(-(1.5 * z - 1.2)))).astype(np.int64)
    w = rng.normal(size=(2, 16))
    descr = z[:, None] * w[0] + rng.normal(0, 0.7, size=(n_users, 16))
    has_descr = rng.random(n_users) >= 0.1
    loc = rng.normal(size=(n_users, 8))
    has_loc = rng.random(n_users) < 0.5
    alias_words = _pseudo_words(rng, n_users)
    has_alias = rng.random(n_users) < 0.4
    words = _pseudo_words(rng, 3 * n_users)
    return {
        "uid": np.array([f"{n}@N{s:02d}" for n, s in zip(uid_numbers, uid_suffix, strict=True)], dtype=object),
        "z": z,
        "photo_count": np.round(np.exp(6 + 1.3 * z + 0.5 * rng.normal(size=n_users))).astype(np.int64),
        "ispro": ispro,
        "canbuypro": ((1 - ispro) * (rng.random(n_users) < 0.4)).astype(np.int64),
        "firstdate": first,
        "firstdatetaken": taken_str,
        "timezone": rng.integers(0, len(_TIMEZONES), n_users),
        "description": [",".join(f"{v:.6f}" for v in row) if ok else "" for row, ok in zip(descr, has_descr, strict=True)],
        "location": [",".join(f"{v:.4f}" for v in row) if ok else "" for row, ok in zip(loc, has_loc, strict=True)],
        "pathalias": [f"{a}_{i % 97}" if ok else "None" for i, (a, ok) in enumerate(zip(alias_words, has_alias, strict=True))],
        "user_words": [words[3 * i: 3 * i + 3] for i in range(n_users)],
        "tag_rate": np.exp(rng.normal(1.8, 0.7, n_users)),
    }


def _draw_subcategories(rng: np.random.Generator, user: np.ndarray, n_users: int) -> np.ndarray:
    """Each post's subcategory from its user's taste (a Dirichlet mixed with the global prior)."""
    taxonomy = default_taxonomy()
    prior = _CATEGORY_SHARES[np.array(taxonomy.parents)]
    prior = prior / prior.sum()
    taste = 0.8 * rng.dirichlet(np.full(taxonomy.num_subcategories, 0.15), size=n_users) + 0.2 * prior
    cumulative = np.cumsum(taste[user], axis=1)                   # (N, 77)
    draws = rng.random(len(user))[:, None] * cumulative[:, -1:]
    return np.minimum((draws > cumulative).sum(axis=1), taxonomy.num_subcategories - 1)


def _draw_times(rng: np.random.Generator, is_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(is_test)
    day_weights = _WEEKDAY_WEIGHTS[np.arange(TRAIN_DAYS + TEST_DAYS) % 7]
    train_p = day_weights[:TRAIN_DAYS] / day_weights[:TRAIN_DAYS].sum()
    test_p = day_weights[TRAIN_DAYS:] / day_weights[TRAIN_DAYS:].sum()
    day = np.where(is_test, TRAIN_DAYS + rng.choice(TEST_DAYS, size=n, p=test_p),
                   rng.choice(TRAIN_DAYS, size=n, p=train_p))
    hour = rng.choice(24, size=n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    postdate = START_TIMESTAMP + day.astype(np.int64) * 86400 + hour * 3600 + rng.integers(0, 3600, n)
    return postdate.astype(np.int64), hour


def _draw_text(rng: np.random.Generator, users: dict, user: np.ndarray, subcategory: np.ndarray
               ) -> tuple[list[str], list[str], np.ndarray]:
    """Titles, space-joined tags and the tag counts."""
    taxonomy = default_taxonomy()
    sub_words = [_tag_words(name) for name in taxonomy.subcategories]
    cat_words = [_CATEGORY_WORDS[taxonomy.categories[p]] for p in taxonomy.parents]
    n = len(user)
    counts = np.where(rng.random(n) < 0.1, 0, rng.poisson(users["tag_rate"][user]).clip(0, 40))
    total = int(counts.sum())
    source = rng.choice(4, size=total, p=[0.3, 0.1, 0.25, 0.35])
    pick = rng.random(total)
    owner = np.repeat(np.arange(n), counts)
    tags: list[list[str]] = [[] for _ in range(n)]
    for i, src, r in zip(owner.tolist(), source.tolist(), pick.tolist(), strict=True):
        s = int(subcategory[i])
        pool = (sub_words[s], cat_words[s], users["user_words"][user[i]], _NOISE_WORDS)[src]
        word = pool[int(r * len(pool))]
        if word not in tags[i]:
            tags[i].append(word)
    kind = rng.choice(4, size=n, p=[0.55, 0.15, 0.18, 0.12])
    numbers = rng.integers(1, 9999, size=n)
    picks = rng.random((n, 2))
    titles = []
    for i in range(n):
        s, k = int(subcategory[i]), int(kind[i])
        if k == 0:
            titles.append("")
        elif k == 1:
            titles.append(f"{'IMG_' if numbers[i] % 2 else 'DSC0'}{numbers[i]:04d}")
        elif k == 2:
            words = sub_words[s]
            first, second = words[int(picks[i, 0] * len(words))], words[int(picks[i, 1] * len(words))]
            titles.append(f"{first.capitalize()} {second}" if first != second else first.capitalize())
        else:
            own = users["user_words"][user[i]]
            titles.append(f"{own[int(picks[i, 0] * 3)].capitalize()} {numbers[i] % 50}")
    return titles, [" ".join(t) for t in tags], counts


def _label_noise_scale(score: np.ndarray) -> float:
    spread = float(np.std(score)) if len(score) > 1 else 1.0
    return spread * float(np.sqrt(1 / _TARGET_PEARSON**2 - 1))


def generate_corpus(posts: int, seed: int, *, users: int = 0, test_posts: int = 0, first_pid: int = 10_000) -> Corpus:
    """Draw every value of a corpus except the pixels (cheap: used by tests of the score model)."""
    if posts < 0 or test_posts < 0 or users < 0 or posts + test_posts == 0:
        raise ValueError(f"posts, users and test_posts must be >= 0 with at least one post; got posts={posts!r}, "
                         f"users={users!r}, test_posts={test_posts!r}")
    rng = np.random.default_rng(seed)
    look = class_look()
    n_users = users or max(1, (posts or test_posts) // 12)
    u = _generate_users(rng, n_users)
    n = posts + test_posts
    rate = np.exp(0.9 * u["z"])
    user = rng.choice(n_users, size=n, p=rate / rate.sum())
    is_test = np.arange(n) >= posts
    subcategory = _draw_subcategories(rng, user, n_users)
    concept = rng.integers(0, 4, size=n)
    postdate, hour = _draw_times(rng, is_test)
    appeal = rng.normal(size=n)
    titles, tags, n_tags = _draw_text(rng, u, user, subcategory)
    geo = rng.random(n) < 0.12
    # Flickr photo ids grow with upload time; gaps make them look like a sample of a larger site.
    order = np.argsort(postdate, kind="stable")
    pid = np.empty(n, dtype=np.int64)
    pid[order] = first_pid + np.cumsum(rng.integers(1, 40, size=n))
    weekend = ((postdate - START_TIMESTAMP) // 86400 % 7 == 0) | ((postdate - START_TIMESTAMP) // 86400 % 7 == 6)
    elapsed = (postdate - START_TIMESTAMP) / (TRAIN_DAYS * 86400.0)
    score = (5.0 + 1.1 * u["z"][user] + look.effect[subcategory] + 0.9 * appeal
             + 0.25 * np.cos(2 * np.pi * (hour - 20) / 24) + 0.1 * weekend - 0.3 * elapsed
             + 0.25 * np.log1p(n_tags) + 0.3 * u["ispro"][user])
    label = np.round(score + rng.normal(0, _label_noise_scale(score[~is_test]), size=n), 4)
    return Corpus(
        uid=u["uid"], z=u["z"], photo_count=u["photo_count"], ispro=u["ispro"], canbuypro=u["canbuypro"],
        firstdate=u["firstdate"], firstdatetaken=u["firstdatetaken"], timezone=u["timezone"],
        description=u["description"], location=u["location"], pathalias=u["pathalias"],
        user_words=u["user_words"], user=user, is_test=is_test, pid=pid, subcategory=subcategory,
        concept=concept, postdate=postdate, hour=hour, appeal=appeal, titles=titles, tags=tags,
        mediatype=np.where(rng.random(n) < 0.97, "photo", "video"), geo=geo,
        latitude=np.round(rng.uniform(-40, 60, n), 6), longitude=np.round(rng.uniform(-120, 140, n), 6),
        geoaccuracy=rng.integers(1, 17, n), score=score, label=label,
    )


def oracle_src(corpus: Corpus) -> float:
    """Spearman correlation of the labels with the noise-free scores (labelled posts only)."""
    from scipy.stats import spearmanr

    mask = ~corpus.is_test
    if mask.sum() < 2:  # test posts only (new posts to score): nothing labelled to compare
        return float("nan")
    return float(spearmanr(corpus.label[mask], corpus.score[mask]).statistic)


def render_image(look: ClassLook, subcategory: int, appeal: float, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of a subcategory at a given visual appeal."""
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    cx, cy = rng.uniform(0.3, 0.7, 2)
    radius = rng.uniform(0.22, 0.42)
    theta = look.angle[subcategory] + rng.normal(0, 0.25)
    freq = look.frequency[subcategory] * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    dist = np.sqrt(u**2 + v**2)
    pattern = _PATTERNS[int(look.pattern[subcategory])]
    if pattern == "disc":
        mask = dist < radius
    elif pattern == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) < 0.8 * radius
    elif pattern == "triangle":
        mask = (v < 0.7 * radius) & (np.abs(u) < (v + radius) / 1.7)
    elif pattern == "stripes":
        mask = np.sin(2 * np.pi * freq * v + phase) > 0
    elif pattern == "rings":
        mask = (np.sin(2 * np.pi * freq * dist + phase) > 0) & (dist < 1.6 * radius)
    elif pattern == "checker":
        mask = np.sin(2 * np.pi * freq * 0.6 * u + phase) * np.sin(2 * np.pi * freq * 0.6 * v) > 0
    else:  # cross
        mask = ((np.abs(u) < 0.25 * radius) & (np.abs(v) < radius)) | ((np.abs(v) < 0.25 * radius) & (np.abs(u) < radius))
    gradient = (rng.uniform(-0.15, 0.15) * (xx - 0.5) + rng.uniform(-0.15, 0.15) * (yy - 0.5))[..., None]
    image = np.where(mask[..., None], look.foreground[subcategory], look.background[subcategory] + gradient)
    image = image + rng.normal(0, 0.04, size=image.shape)
    # Appeal: contrast and saturation scale with e^{a}; blur (below) for negative appeal.
    gray = image.mean(axis=2, keepdims=True)
    image = gray + (image - gray) * np.exp(0.35 * appeal)
    mean = image.mean()
    image = mean + (image - mean) * np.clip(np.exp(0.45 * appeal), 0.3, 2.0)
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if appeal < 0:
        blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.9 * -appeal * size / 64))
        pixels = np.asarray(blurred)
    return pixels


def _encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _records(corpus: Corpus, idx: np.ndarray, folder: str, form: str = "smpd2019") -> dict[str, list]:
    """The SMPD records of the posts ``idx``: all string-typed, as the 2019-2023 files have them;
    in the smpd2024 form the user rows hold the 2024+ file's values (see :func:`_user_2024`)."""
    taxonomy = default_taxonomy()
    out: dict[str, list] = {k: [] for k in TRAIN_FILES}
    for i in idx.tolist():
        u = int(corpus.user[i])
        uid, pid = _uid(corpus, u, form), str(corpus.pid[i])
        s = int(corpus.subcategory[i])
        sub_name = taxonomy.subcategories[s]
        ids = {"Uid": uid, "Pid": pid}
        tags = corpus.tags[i]
        if form == "smpd2024" and corpus.pid[i] % 5 == 0:   # real Alltags carry machine tags
            tags = f"{tags} {_MACHINE_TAGS[int(corpus.pid[i]) % len(_MACHINE_TAGS)].format(pid=pid)}".strip()
        out["text"].append({**ids, "Title": corpus.titles[i], "Mediatype": str(corpus.mediatype[i]),
                            "Alltags": tags})
        out["category"].append({**ids, "Category": taxonomy.categories[taxonomy.parents[s]],
                                "Subcategory": sub_name, "Concept": _CLASS_WORDS[sub_name][int(corpus.concept[i])]})
        if corpus.geo[i]:
            geo = {"Latitude": f"{corpus.latitude[i]:.6f}", "Longitude": f"{corpus.longitude[i]:.6f}",
                   "Geoaccuracy": str(int(corpus.geoaccuracy[i]))}
        else:
            # Real files mark "no geo" with "0" and often an empty Longitude.
            geo = {"Latitude": "0", "Longitude": "" if corpus.pid[i] % 10 < 7 else "0", "Geoaccuracy": "0"}
        out["temporalspatial"].append({**ids, "Postdate": str(int(corpus.postdate[i])), **geo})
        out["additional"].append({**ids, "Pathalias": corpus.pathalias[u], "Ispublic": "1",
                                  "Mediastatus": "ready"})
        if form == "smpd2024":
            out["user"].append({**ids, "Pid": int(corpus.pid[i]), **_user_2024(corpus, u)})
        else:
            out["user"].append({
                **ids, "photo_firstdate": str(int(corpus.firstdate[u])),
                "photo_count": str(int(corpus.photo_count[u])),
                "ispro": str(int(corpus.ispro[u])), "canbuypro": str(int(corpus.canbuypro[u])),
                "timezone_offset": str(_TIMEZONES[corpus.timezone[u]]),
                "photo_firstdatetaken": str(corpus.firstdatetaken[u]),
                "timezone_timezone_id": str(int(corpus.timezone[u]) + 1),
                "user_description": corpus.description[u], "location_description": corpus.location[u],
            })
        out["label"].append(f"{corpus.label[i]:.4f}")
        out["img_filepath"].append(f"{folder}/{uid}/{pid}.jpg")
    return out


def _uid(corpus: Corpus, user: int, form: str) -> str:
    """The user's id; the smpd2024 form writes the ``@N`` suffix unpadded (``27882@N8``), as real
    SMPD ids are."""
    uid = str(corpus.uid[user])
    if form != "smpd2024":
        return uid
    number, suffix = uid.split("@N")
    return f"{number}@N{int(suffix)}"


def _user_2024(corpus: Corpus, u: int) -> dict:
    """A user row of the 2024+ user file: float counts and flags, a datetime string for the first
    photo taken, ``timezone_id`` (no ``canbuypro``), nulls for missing values and the descriptions
    as raw text (HTML and URLs included)."""
    taken = str(corpus.firstdatetaken[u])
    words = corpus.user_words[u]
    alias = corpus.pathalias[u]
    description = None
    if corpus.description[u]:
        description = (f"<p>I shoot {words[0]} and {words[1]}.</p> More at "
                       f'<a href="https://www.example.org/{alias if alias != "None" else words[2]}">my site</a>')
    return {
        "photo_firstdate": float(corpus.firstdate[u]),
        "photo_count": float(corpus.photo_count[u]),
        "ispro": float(corpus.ispro[u]),
        "timezone_offset": str(_TIMEZONES[corpus.timezone[u]]),
        "photo_firstdatetaken": None if taken == "None" else time.strftime("%Y-%m-%d %H:%M:%S",
                                                                           time.gmtime(int(taken))),
        "timezone_id": str(int(corpus.timezone[u]) + 1),
        "user_description": description,
        "location_description": f"{words[2].capitalize()}, Earth" if corpus.location[u] else None,
    }


def _columns(records: list[dict]) -> dict[str, dict[str, object]]:
    """Records as the pandas column dict ``DataFrame.to_json()`` writes (index labels "0", "1", ...)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    return {name: {str(i): r.get(name) for i, r in enumerate(records)} for name in names}


def _split_files(out: str, prefix: str, form: str) -> dict[str, str]:
    """Kind -> location of a split's files (the smpd2024 form puts the JSON files one folder deeper)."""
    split = prefix.rstrip("_")
    files = {}
    for kind, name in TRAIN_FILES.items():
        name = name.replace("train_", prefix)
        deeper = form == "smpd2024" and name.endswith(".json")
        files[kind] = storage.join(out, METADATA_FOLDER_2024.format(split=split), name) if deeper \
            else storage.join(out, name)
    return files


def _write_split(out: str, corpus: Corpus, idx: np.ndarray, prefix: str, image_size: int,
                 seed: int, form: str = "smpd2019") -> int:
    folder = prefix.rstrip("_")
    records = _records(corpus, idx, folder, form)
    for kind, location in _split_files(out, prefix, form).items():
        if kind == "label" and prefix == "test_":
            continue   # test posts are unlabelled, as in the challenge
        if kind in ("label", "img_filepath"):
            storage.write_text(location, "".join(line + "\n" for line in records[kind]))
        elif kind == "user" and form == "smpd2024":
            storage.write_text(location, json.dumps(_columns(records[kind]), ensure_ascii=False))
        else:
            storage.write_text(location, json.dumps(records[kind], ensure_ascii=False))
    image_folder = IMAGE_FOLDER_2024.format(split=folder) if form == "smpd2024" else folder
    look = class_look()
    # A stream of its own per split, so adding test posts never changes the train images.
    rng = np.random.default_rng([seed, 1 if prefix == "test_" else 0])
    started = time.perf_counter()
    posts = list(zip(idx.tolist(), records["img_filepath"], strict=True))
    # Rendering stays in order on this thread (the images depend on the rng stream); the writes,
    # which on object storage are round trips, overlap in a few threads.
    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        for first in range(0, len(posts), _WRITE_CHUNK):
            chunk = posts[first: first + _WRITE_CHUNK]
            images = [_encode_jpeg(render_image(look, int(corpus.subcategory[i]), float(corpus.appeal[i]),
                                                image_size, rng)) for i, _ in chunk]
            targets = [storage.join(out, image_folder, r.split("/", 1)[1]) for _, r in chunk]
            list(pool.map(storage.write_bytes, targets, images))
            done = first + len(chunk)
            if done // 20_000 > first // 20_000:
                logger.info("synth: %d/%d %s images (%.0f images/s)", done, len(idx), folder,
                            done / max(time.perf_counter() - started, 1e-9))
    return len(idx)


def _clear_previous(out: str) -> None:
    """Remove what an earlier synth run wrote here (only our own names), so a rerun is clean.

    Only from a corpus synth wrote (its marker, written first, or its ``oracle.parquet``, written
    last, is there, so a run killed half way is still ours): a folder holding a
    ``train/`` or SMPD files of someone else's is refused (ValueError) and left as it is."""
    present = set(storage.list_names(out))
    ours = {"train", "test", *(IMAGE_FOLDER_2024.format(split=x) for x in ("train", "test")),
            *(METADATA_FOLDER_2024.format(split=x) for x in ("train", "test")), *TRAIN_FILES.values(),
            *(n.replace("train_", "test_") for n in TRAIN_FILES.values())}
    if present & ours and not present & {"oracle.parquet", SYNTH_MARKER}:
        raise ValueError(f"synth --out {out!r} holds {', '.join(sorted(present & ours)[:4])} that synth did not "
                         f"write (no {SYNTH_MARKER} or oracle.parquet beside them); give an empty or new folder")
    for split in ("train", "test"):
        for folder in (split, IMAGE_FOLDER_2024.format(split=split), METADATA_FOLDER_2024.format(split=split)):
            storage.remove(storage.join(out, folder))
    for name in [*TRAIN_FILES.values(), *(n.replace("train_", "test_") for n in TRAIN_FILES.values()),
                 "oracle.parquet", CORPUS_TAXONOMY_FILE]:
        storage.remove(storage.join(out, name))


def synthesize_corpus(out_dir: str, *, posts: int, seed: int, image_size: int = 64,
                      users: int = 0, test_posts: int = 0, first_pid: int = 10_000, form: str = "smpd2019") -> dict:
    """Write a synthetic SMPD corpus (layout and model in the module docstring) into the
    location ``out_dir`` (a local folder or an ``s3://`` / ``gs://`` prefix).

    ``form`` ``smpd2024`` writes the SMP Challenge's 2024+ file forms (see ``synth.form``). The
    packaged class list goes beside the files as ``taxonomy.json``, the corpus's own list.
    Byte-identical for the same arguments. Returns a summary: counts, ``oracle_src`` and timing.
    """
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    started = time.perf_counter()
    corpus = generate_corpus(posts, seed, users=users, test_posts=test_posts, first_pid=first_pid)
    out = storage.normalize(out_dir)
    _clear_previous(out)
    storage.write_text(storage.join(out, SYNTH_MARKER), "written by smpp synth\n")
    write_corpus_taxonomy(out, default_taxonomy())
    written = _write_split(out, corpus, np.flatnonzero(~corpus.is_test), "train_", image_size, seed, form) \
        if posts else 0
    console.details(__name__).info("synth: wrote %d train posts in %.1fs", written, time.perf_counter() - started)
    if test_posts:
        _write_split(out, corpus, np.flatnonzero(corpus.is_test), "test_", image_size, seed, form)
    oracle = pa.table({
        "pid": pa.array(corpus.pid.astype(str)),
        "score": pa.array(corpus.score, pa.float64()),
        "label": pa.array(corpus.label, pa.float64()),
        "split": pa.array(np.where(corpus.is_test, "test", "train")),
    })
    fs, path = storage.resolve(storage.join(out, "oracle.parquet"))
    pq.write_table(oracle, path, filesystem=fs)
    seconds = time.perf_counter() - started
    summary = {
        "out_dir": out, "posts": posts, "test_posts": test_posts, "users": len(corpus.uid),
        "images": posts + test_posts, "image_size": image_size, "seed": seed, "form": form,
        "oracle_src": round(oracle_src(corpus), 4), "seconds": round(seconds, 2),
        "posts_per_s": round((posts + test_posts) / max(seconds, 1e-9), 1),
    }
    logger.info("synth: %d posts (+%d test) from %d users in %.1fs (%.0f posts/s), oracle SRC %.3f",
                posts, test_posts, summary["users"], seconds, summary["posts_per_s"], summary["oracle_src"])
    return summary
