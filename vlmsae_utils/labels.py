"""Readable class names for class folders of standard data sets (one mapping, used everywhere).

- ImageNet-1k wnids (``n01440764``) → the CLIP-curated class names that open_clip ships
  (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``: ``tench``). Those 1000 names are in
  the standard class-index order, which is the sorted order of the 1000 wnids; the wnid list
  itself comes from timm (``timm.data.ImageNetInfo``), which open_clip depends on.
- iNaturalist folders ``NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_species`` →
  ``Genus species``.
- Any other name: a leading numeric id dropped and underscores turned into spaces.

The class-name baseline of steering embeds the authors' names instead (:func:`baseline_text`):
Keras' ImageNet class index as their ``similarity_baseline.py`` embeds it, underscores kept
(``great_white_shark``), shipped with this package as ``imagenet_keras_names.json``.

The tables are loaded on the first wnid seen, so other names never import open_clip or timm.
:func:`class_label` does not know the fixture's captions; :func:`class_text` (the words an answer
is matched against) uses them for the fixture's class folders.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from .sources import class_caption

__all__ = [
    "BASELINE_NAMES",
    "baseline_text",
    "class_label",
    "class_text",
    "imagenet_authors_names",
    "imagenet_classnames",
    "imagenet_wnids",
]

#: Names a class-name baseline can embed for ImageNet classes: the authors' (Keras) or the CLIP-curated ones.
BASELINE_NAMES = ("authors", "clip")
AUTHORS_NAMES_FILE = Path(__file__).with_name("imagenet_keras_names.json")

_WNID = re.compile(r"n\d{8}")
_INAT_RANKS = 7  # kingdom … species after the numeric id


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted), as timm ships them."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000 or list(wnids) != sorted(set(wnids)):
        raise RuntimeError(f"timm's ImageNet-1k synset list is not 1000 sorted unique wnids ({len(wnids)} entries)")
    return wnids


@lru_cache(maxsize=1)
def imagenet_classnames() -> dict[str, str]:
    """wnid → CLIP-curated class name (open_clip's ``IMAGENET_CLASSNAMES``) for ImageNet-1k."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = imagenet_wnids()
    if len(IMAGENET_CLASSNAMES) != len(wnids):
        raise RuntimeError(f"open_clip lists {len(IMAGENET_CLASSNAMES)} ImageNet class names, expected {len(wnids)}")
    return dict(zip(wnids, IMAGENET_CLASSNAMES))


@lru_cache(maxsize=1)
def imagenet_authors_names() -> dict[str, str]:
    """wnid → the name the authors' class-name baseline embeds (``great_white_shark``, ``cock``,
    ``water_ouzel``; two classes are called ``crane`` and two ``maillot``), from the shipped file."""
    names = json.loads(AUTHORS_NAMES_FILE.read_text())["names"]
    if len(names) != 1000 or list(names) != sorted(names):
        raise RuntimeError(f"{AUTHORS_NAMES_FILE.name} does not hold 1000 sorted wnids ({len(names)} entries)")
    return names


def baseline_text(folder: str, names: str = "authors") -> str:
    """The text the class-name baseline embeds for a class folder: for an ImageNet-1k wnid the
    authors' name verbatim (``names="authors"``) or the CLIP-curated one (``"clip"``); any other
    folder its :func:`class_text`."""
    if names not in BASELINE_NAMES:
        raise ValueError(f"names must be one of {', '.join(BASELINE_NAMES)}, got {names!r}")
    if names == "authors" and _WNID.fullmatch(str(folder)) and folder in imagenet_authors_names():
        return imagenet_authors_names()[folder]
    return class_text(folder)


def class_label(folder: str) -> str:
    """A readable label for a class folder name.

    ``n01440764`` → ``tench``; ``00001_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus``
    → ``Danaus plexippus``; ``007_red_fox`` → ``red fox``; a wnid that is not an ImageNet-1k
    class (e.g. from ImageNet-21k) is returned unchanged.
    """
    name = str(folder)
    if _WNID.fullmatch(name):
        return imagenet_classnames().get(name, name)
    parts = name.split("_")
    if len(parts) == _INAT_RANKS + 1 and parts[0].isdigit() and all(parts[1:]):
        return f"{parts[-2]} {parts[-1]}"
    if len(parts) > 1 and parts[0].isdigit():
        parts = parts[1:]
    return " ".join(p for p in parts if p) or name


def class_text(folder: str) -> str:
    """Words for a class folder: the fixture's caption for a fixture class (``a red striped
    triangle``), else its readable label (:func:`class_label`: ImageNet wnid → CLIP class name such
    as ``tench``, iNaturalist folder → ``Genus species``, other names without numeric id and ``_``)."""
    caption = class_caption(folder)
    return class_label(folder) if caption is None else caption
