"""Where an SAE's training activations came from, so it is never applied to another model's.

An SAE reads one encoder's activations at one hook and block; another encoder of the same width
gives rows it was never trained on, and its codes mean nothing. :func:`save_sae` records the
training store's encoder, hook, block, token mode and content hash (``config.json``
``"provenance"``); a dictionary_learning checkpoint of the authors' release gets what its folder
names say (``…_activations_<model>_<layer>_<hook>_…``); :func:`check_provenance` refuses a store
or an encoder that contradicts it, naming both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MATCHED_KEYS",
    "ProvenanceError",
    "check_provenance",
    "provenance_from_path",
    "store_provenance",
]

#: What must agree between an SAE's training data and the activations it encodes. The token mode is
#: recorded but not compared: an SAE trained on patch tokens may fairly be read on CLS rows.
MATCHED_KEYS = ("encoder", "hook", "layer")

#: The authors' release names its activation folders ``<data>_activations_<model>_<layer>_<hook>_<variant>``.
_RELEASE_FOLDER = re.compile(
    r"_activations_(?P<model>.+?)_(?P<layer>-?\d+)_(?P<hook>post_mlp_residual|post_projection)_"
)

#: Hub organisations of the models the authors released SAEs for (their folder names drop them).
_RELEASE_ORGS = {"clip-vit-large-patch14-336": "openai", "siglip-so400m-patch14-384": "google"}


class ProvenanceError(ValueError):
    """An SAE applied to activations of another encoder, hook or block than it was trained on."""


def store_provenance(data: Any) -> dict[str, Any] | None:
    """The provenance an SAE trained on ``data`` records: the store's encoder, hook, block, tokens and
    content hash; ``None`` for rows without a manifest (a tensor), which say nothing of their source."""
    manifest = getattr(data, "manifest", None)
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("params"), Mapping):
        return None
    params = manifest["params"]
    record = {key: params.get(key) for key in (*MATCHED_KEYS, "tokens")}
    record["store_hash"] = manifest.get("content_hash")
    return record


def provenance_from_path(path: str | Path) -> dict[str, Any] | None:
    """Encoder, hook, block and token mode read from the authors' release folder names in ``path``
    (layer ``-1`` is their ``post_projection``, which has no block; a ``random_k_2`` folder holds
    SAEs of 2 random patch tokens), or ``None`` where no part of the path is named that way."""
    parts = Path(path).parts
    for part in reversed(parts):
        match = _RELEASE_FOLDER.search(part)
        if match:
            model = match["model"]
            org = _RELEASE_ORGS.get(model)
            per_block = match["hook"] == "post_mlp_residual"
            return {
                "encoder": f"{org}/{model}" if org else model,
                "hook": match["hook"],
                "layer": int(match["layer"]) if per_block else None,
                "tokens": "random_k" if "random_k_2" in parts else "cls",
                "source": "release folder name",
            }
    return None


def _same_encoder(a: Any, b: Any) -> bool:
    """Encoder names agree up to where the model lives: ``openai/clip-…``, a local ``/models/clip-…``
    copy and the release's bare ``clip-…`` name the same model."""
    return str(a).rstrip("/").rsplit("/", 1)[-1] == str(b).rstrip("/").rsplit("/", 1)[-1]


def _disagreements(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """``key: recorded vs given`` for every matched key both sides state and that differs."""
    found = []
    for key in MATCHED_KEYS:
        mine, theirs = recorded.get(key), given.get(key)
        if mine is None or theirs is None:
            continue
        same = _same_encoder(mine, theirs) if key == "encoder" else str(mine) == str(theirs)
        if not same:
            found.append(f"{key} {mine!r} (SAE) vs {theirs!r}")
    return found


def check_provenance(sae: Any, given: Mapping[str, Any] | None, where: str, sae_name: str = "SAE") -> None:
    """Refuse to apply ``sae`` to activations described by ``given`` (a store's params, or the
    encoder/hook/layer an intervention splices into) when its recorded provenance contradicts them.
    An SAE or a source that records nothing passes: width is then all that is checked."""
    recorded = getattr(sae, "provenance", None)
    if not recorded or not given:
        return
    found = _disagreements(recorded, given)
    if found:
        raise ProvenanceError(
            f"{sae_name} was trained on other activations than {where}: {'; '.join(found)}. "
            "Use the activations of the encoder, hook and block it was trained on"
        )
