"""Fixture artifacts built on demand, so every notebook runs on its defaults without earlier runs.

A notebook parameter left empty (``""``) means "the embedded default": the stores and SAEs
below are computed once from the fixture and cached under the data home.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .extract import extract_activations, extract_embeddings, open_dataset
from .hf import image_backend
from .io import sha256_json
from .paths import data_home, resolve_out_dir, safe_stem
from .store import ActivationStore

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAYER",
    "DEFAULT_MODEL",
    "DEFAULT_SCORER",
    "default_embeddings",
    "default_sae",
    "default_store",
    "defaults_dir",
    "embeddings_or_default",
    "fixture_box_mass",
    "fixture_name_accuracy",
    "is_fixture_store",
    "latent_names_or_skip",
    "matryoshka_or_default",
    "naming_model_or_default",
    "open_sae",
    "open_store",
    "saes_or_default",
    "store_or_default",
    "uniqueness_store_or_default",
    "vocabulary_or_default",
]

DEFAULT_MODEL = "fixture:mini_clip"
DEFAULT_SCORER = "fixture:scorer"
DEFAULT_LAYER = -2


def defaults_dir() -> Path:
    """Where the default artifacts are cached (inside the data home, beside the fixture)."""
    return data_home() / "defaults"


def default_store(
    split: str = "train",
    *,
    model: str = DEFAULT_MODEL,
    layer: int = DEFAULT_LAYER,
    tokens: str = "cls",
    random_k: int = 2,
) -> ActivationStore:
    """Activations of a fixture model on a fixture split (built on first use; one folder per image
    backend, so switching ``VLMSAE_IMAGE_BACKEND`` never meets a store of the other)."""
    rows = f"{tokens}{random_k if tokens == 'random_k' else ''}"
    name = safe_stem(f"{model}_L{layer}_{rows}_{split}_{image_backend()}")
    return _assembled(
        extract_activations(
            model,
            open_dataset("fixture", split),
            defaults_dir() / name,
            layer=layer,
            tokens=tokens,
            random_k=random_k,
            progress=False,
        )
    )


def default_embeddings(split: str = "train", *, scorer: str = DEFAULT_SCORER) -> ActivationStore:
    """Scoring embeddings of a fixture split (built on first use)."""
    name = safe_stem(f"{scorer}_embeddings_{split}_{image_backend()}")
    return _assembled(extract_embeddings(scorer, open_dataset("fixture", split), defaults_dir() / name, progress=False))


def _assembled(store: ActivationStore | None) -> ActivationStore:
    """The store a single-process extraction returns (``None`` only while other ranks still write)."""
    if store is None:
        raise RuntimeError("the fixture store is not assembled: other processes are still writing it")
    return store


def open_store(path: str | os.PathLike) -> ActivationStore:
    """A store given as a notebook parameter (relative paths live under the outputs root)."""
    return ActivationStore.open(resolve_out_dir(path))


def store_or_default(path: str | os.PathLike, split: str = "train", **default: Any) -> ActivationStore:
    """The store a notebook parameter names, or, when the parameter is empty, the fixture default
    (``default`` holds `default_store`'s keywords: model, layer, tokens, random_k)."""
    return open_store(path) if path else default_store(split, **default)


def uniqueness_store_or_default(path: str | os.PathLike, scored: str | os.PathLike) -> ActivationStore:
    """The store whose top images chapter 3's uniqueness counts: ``path``; when it is empty, the
    fixture's train split if the chapter scores the fixture (``scored`` empty), else the scored store
    itself, with a warning (the authors count it on the train split; a fixture store would not match)."""
    if path:
        return open_store(path)
    if not scored:
        return default_store("train")
    log.warning("uniqueness_store is empty: counting overlaps on the scored images %s (the authors: train)", scored)
    return open_store(scored)


def embeddings_or_default(path: str | os.PathLike, split: str = "train") -> ActivationStore:
    """The scorer embeddings a notebook parameter names, or the fixture scorer's when it is empty."""
    return open_store(path) if path else default_embeddings(split)


def default_sae(
    sae_type: str = "matryoshka_batch_top_k",
    *,
    store: ActivationStore | None = None,
    name: str = "cls",
    **settings: Any,
):
    """An SAE trained on a default fixture store (built and cached on first use); returns the loaded SAE.
    The settings are the fixture's scale (:meth:`~vlmsae_utils.train_config.TrainConfig.fixture`)
    with ``settings`` (TrainConfig fields) applied, checked before the cache."""
    from .sae import load_sae, save_sae, store_provenance
    from .train import TRAINER_VERSION, TrainConfig, run_name, train_sae

    config = TrainConfig.fixture(sae_type=sae_type, **settings)
    data = store if store is not None else default_store("train")
    fractions = "" if config.group_fractions is None else "_g" + "-".join(f"{f:g}" for f in config.group_fractions)
    key = (
        f"{name}_{run_name(sae_type, config.expansion, config.k)}{fractions}_s{config.steps}_t{TRAINER_VERSION}"
        f"_{data.manifest['content_hash'][:12]}"
    )
    others = {n: v for n, v in settings.items() if n not in ("expansion", "k", "group_fractions", "steps")}
    if others:  # any other setting keys the cache too
        key += "_" + sha256_json(others)[:8]
    folder = defaults_dir() / "sae" / key  # keyed by the training data, so a changed store retrains
    if not (folder / "config.json").is_file():
        sae, _ = train_sae(data, config, progress=False, device="cpu")  # tiny: the same SAE on every machine
        save_sae(sae, folder, provenance=store_provenance(data))
    return load_sae(folder).eval()


def open_sae(path: str | os.PathLike):
    """An SAE given as a notebook parameter: a folder or checkpoint (relative paths live under the
    outputs root), or a released SAE by name (``released:<model>/<layer>/<sae>/x<ε>[@<step>]``)."""
    from .sae import load_sae
    from .sae.release import RELEASE_PREFIX, load_released, parse_released

    if str(path).startswith(RELEASE_PREFIX):
        entry, step = parse_released(str(path))
        return load_released(
            entry.model, entry.layer, entry.sae, entry.expansion, tokens=entry.tokens, data=entry.data, step=step
        ).eval()
    return load_sae(resolve_out_dir(path)).eval()


def saes_or_default(paths: list[str]) -> dict:
    """SAEs named by folder (keyed by folder name), or, when ``paths`` is empty, a BatchTopK and a
    Matryoshka SAE (ε = 4) trained on the fixture, as chapter 3 compares them."""
    from .sae import sae_name

    if paths:
        names = [sae_name(p) for p in paths]  # run folders: released checkpoints are all ae_100000.pt
        if len(set(names)) < len(names):
            raise ValueError(f"SAE folders must have distinct names (they label the tables), got {names}")
        return {name: open_sae(p) for name, p in zip(names, paths)}
    return {"BatchTopK ×4": default_sae("batch_top_k"), "Matryoshka ×4": default_sae()}


def matryoshka_or_default(
    path: str | os.PathLike,
    group_fractions: list[float] | None = None,
    *,
    store: ActivationStore | None = None,
    name: str = "cls",
):
    """The Matryoshka SAE a notebook parameter names, or, when it is empty, one trained with ε = 2 as
    in the paper's hierarchy run and five levels (``group_fractions``, default
    `hierarchy.FIXTURE_GROUP_FRACTIONS`) on ``store`` (default: the fixture's; ``name`` keys the cache)."""
    from .hierarchy import FIXTURE_GROUP_FRACTIONS, matryoshka_group_sizes

    if path:
        sae = open_sae(path)
        matryoshka_group_sizes(sae, str(path))  # refuse a non-Matryoshka SAE here, with its path
        return sae
    fractions = list(group_fractions or FIXTURE_GROUP_FRACTIONS)
    return default_sae("matryoshka_batch_top_k", expansion=2, group_fractions=fractions, store=store, name=name)


def is_fixture_store(store: ActivationStore) -> bool:
    """Whether a store holds a fixture encoder's activations (the embedded default, whose truth is known)."""
    return str(store.params.get("encoder", "")).startswith("fixture:")


def naming_model_or_default(naming_model: str, store: ActivationStore) -> str:
    """The CLIP that names latents: the notebook parameter, else the fixture's mini-CLIP for a fixture
    store and the rehearsal CLIP ViT-B/32 for a rehearsal one; "" for any other store (naming then
    needs ``naming_model``, e.g. the paper's judge ``openai/clip-vit-base-patch32``, §7)."""
    if naming_model:
        return naming_model
    if is_fixture_store(store):
        return "fixture:mini_clip"
    return (
        "rehearsal:openai/clip-vit-base-patch32"
        if str(store.params.get("encoder", "")).startswith("rehearsal:")
        else ""
    )


def latent_names_or_skip(naming_model: str, vocabulary: list[str], sae, store: ActivationStore, **options: Any):
    """:func:`~.naming.name_latents` with the default judge and vocabulary of ``store``; with no judge to
    use (a store of another model and no ``naming_model``), an empty table and a logged note."""
    from .llava import load_clip_text_image
    from .naming import NAME_COLUMNS, LatentNames, name_latents

    judge = naming_model_or_default(naming_model, store)
    if not judge:
        log.warning("latents are not named: set naming_model (the paper's judge: openai/clip-vit-base-patch32)")
        return LatentNames(pd.DataFrame(columns=list(NAME_COLUMNS)), {})
    device = options.get("device", "auto")
    return name_latents(
        sae, store, load_clip_text_image(judge, device), vocabulary_or_default(vocabulary, store), **options
    )


def vocabulary_or_default(vocabulary: list[str], store: ActivationStore) -> list[str]:
    """The naming vocabulary a notebook parameter gives; empty: the fixture's attribute words for a
    fixture store, else the store's readable class names plus the colour and texture words."""
    from .fixtures.fit import attribute_words
    from .labels import class_text
    from .naming import attribute_vocabulary

    if vocabulary:
        return list(vocabulary)
    if is_fixture_store(store):
        return attribute_words()
    return [*dict.fromkeys(class_text(c) for c in sorted(set(store.class_names))), *attribute_vocabulary()]


def fixture_box_mass(maps, store: ActivationStore, image_indices: list[int], latents: list[int]) -> dict | None:
    """:func:`~.heatmaps.box_mass` of ``maps`` (image ``k`` = store image ``image_indices[k]``, shown
    for latent ``latents[k]``) against the generated shapes' boxes of a fixture store; ``None`` for
    any other store (its objects' places are not known) or no maps."""
    from .fixtures import ensure_fixture, shape_box
    from .heatmaps import box_mass

    if maps is None or not is_fixture_store(store):
        return None
    seed = ensure_fixture().seed
    return box_mass(maps, latents, [shape_box(store.image_ids[i], seed) for i in image_indices])


def fixture_name_accuracy(named, store: ActivationStore, vocabulary: list[str]) -> dict[str, float]:
    """How often the names of :func:`~.naming.name_latents` on a fixture store say an attribute (shape,
    colour, texture, family) that at least 3/4 of the latent's top images share, against random names."""
    from .fixtures.fit import attribute_truths
    from .naming import name_accuracy

    folders = [[store.class_names[i] for i in named.top_indices[j]] for j in named.names.latent]
    return name_accuracy(named.names, attribute_truths(folders), vocabulary)
