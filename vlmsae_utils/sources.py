"""Where a name points: model names with a prefix (``fixture:mini_clip``, ``rehearsal:HUB_ID``), the
``"fixture"`` image root, and readable captions of class folders — one registry, so the loaders
(:mod:`.encoders`, :mod:`.llava`, :mod:`.extract`, :mod:`.labels`) never import the code that builds
fixtures or rehearsal models. Each entry names its resolver as ``"module:function"``, imported on
first use; a user's own prefix (``register_model_source("mymodels:", "mypkg.zoo:folder_of")``)
works everywhere a model name does.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CAPTIONERS",
    "DATA_SOURCES",
    "MODEL_SOURCES",
    "class_caption",
    "data_root",
    "model_source",
    "register_model_source",
]

#: Name prefix → resolver ``(rest of the name) -> folder`` (built on first use).
MODEL_SOURCES: dict[str, str] = {
    "fixture:": "vlmsae_utils.fixtures:fixture_model_folder",
    "rehearsal:": "vlmsae_utils.rehearsal:rehearsal_model",
}
#: ``data_dir`` value → resolver ``() -> image root``.
DATA_SOURCES: dict[str, str] = {"fixture": "vlmsae_utils.fixtures:fixture_images"}
#: Resolvers ``(class folder) -> caption or None``, asked in order.
CAPTIONERS: list[str] = ["vlmsae_utils.fixtures.classes:class_caption"]


def _resolve(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` entry names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def register_model_source(prefix: str, target: str) -> None:
    """Let model names starting with ``prefix`` resolve through ``target`` (``"module:function"``)."""
    if not prefix.endswith(":") or ":" not in target:
        raise ValueError(f"a model source is 'prefix:' -> 'module:function', got {prefix!r} -> {target!r}")
    MODEL_SOURCES[prefix] = target


def model_source(name_or_path: str | os.PathLike) -> str:
    """Where ``from_pretrained`` should read a model: a registered prefix becomes its folder (built
    or trained on first use); hub ids, ``open_clip:`` specs and folders pass through unchanged."""
    spec = str(name_or_path)
    for prefix, target in MODEL_SOURCES.items():
        if spec.startswith(prefix):
            return str(_resolve(target)(spec[len(prefix) :]))
    return spec


def data_root(data_dir: str | os.PathLike) -> Path:
    """A notebook's ``data_dir``: a registered name (``"fixture"``) → its image root; a path → itself."""
    target = DATA_SOURCES.get(str(data_dir))
    return Path(_resolve(target)()) if target else Path(data_dir).expanduser()


def class_caption(folder: str) -> str | None:
    """Words for a class folder from the first captioner that knows it (the fixture's classes), else None."""
    for target in CAPTIONERS:
        caption = _resolve(target)(folder)
        if caption is not None:
            return str(caption)
    return None
