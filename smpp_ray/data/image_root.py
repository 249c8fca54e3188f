"""Where a raw corpus's images are, when its path file says something else.

SMPD's ``train_img_filepath.txt`` says ``train/<Uid>/<Pid>.jpg``, but the image archives unpack
under ``train/``, ``SMP_train_images/`` or ``train_new/`` depending on the release. So before any
image task starts, a few paths of each file set are probed (one existence check each, no read)
under a short list of rules, and the first rule that finds the most of them is applied to every
row of that set:

1. the path as written (``train/U/P.jpg``);
2. for each folder ``D`` directly in the raw folder, in name order: the path with its first folder
   replaced by ``D`` (``SMP_train_images/U/P.jpg``), then the path under ``D``
   (``images/train/U/P.jpg``).

``data.image_root`` names the folder instead (rule 2's first form, nothing probed). When no rule
finds any probed image, prepare stops with an error listing the paths it tried: a wrong image
folder must cost one message, not 300,000 rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from smpp_ray import storage

logger = logging.getLogger(__name__)

#: Paths probed per file set (the first ones with a valid path).
PROBES = 8

Rule = tuple[str, Callable[[str], str]]


def _replace_first(folder: str) -> Callable[[str], str]:
    def rewrite(path: str) -> str:
        parts = path.split("/")
        return "/".join([folder, *parts[1:]]) if len(parts) > 1 else f"{folder}/{path}"
    return rewrite


def _under(folder: str) -> Callable[[str], str]:
    return lambda path: f"{folder}/{path}"


def candidate_rules(raw: str) -> list[Rule]:
    """The rules of the module docstring, in the order they are tried."""
    rules: list[Rule] = [("as written", lambda path: path)]
    for folder in storage.list_folders(raw):
        rules.append((f"first folder replaced by {folder}/", _replace_first(folder)))
        rules.append((f"under {folder}/", _under(folder)))
    return rules


def choose_image_rule(raw: str, source: str, probes: list[str], image_root: str = "") -> Rule:
    """The rule that finds the most of ``probes`` (a file set's first image paths, as listed in
    ``source``) under ``raw``, or the one ``data.image_root`` names.

    Raises ValueError listing the paths tried when no probed image is found.
    """
    if image_root:
        return f"data.image_root={image_root}", _replace_first(image_root.strip("/"))
    return _best_rule(raw, source, probes[:PROBES], candidate_rules(raw))


def _best_rule(raw: str, source: str, probes: list[str], rules: list[Rule]) -> Rule:
    best, best_hits, tried = rules[0], 0, []
    for rule in rules:
        locations = [storage.join(raw, rule[1](path)) for path in probes]
        hits = sum(storage.is_file(location) for location in locations)
        tried.append(locations[0])
        if hits > best_hits:
            best, best_hits = rule, hits
        if hits == len(probes):
            break
    if best_hits == 0 and probes:
        shown = ", ".join(repr(t) for t in tried[:8]) + (" ..." if len(tried) > 8 else "")
        raise ValueError(f"no image listed in {source} was found under raw folder {raw!r}: for "
                         f"{probes[0]!r} tried {shown}. Set data.image_root to the folder (inside the raw "
                         "folder) that holds the <Uid>/<Pid>.jpg images")
    return best
