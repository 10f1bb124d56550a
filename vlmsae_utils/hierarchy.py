"""Matryoshka levels against a taxonomy: LCA depth of each latent's top images, per level.

A class folder name such as ``00042_Animalia_Chordata_Aves_..._Genus_species`` encodes a
path through the taxonomy. Two images share the first ``d`` ranks of their paths: their
LCA depth is ``d``. A latent whose top images share deep ranks encodes a specific concept;
the paper finds deeper (more specific) latents in later Matryoshka levels (Pach et al. 2025).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import columns
from .device import resolve_device
from .exemplars import TopK
from .metrics import SparseCodes
from .neuron_pass import scan_neurons
from .sae import BaseSAE
from .scoring import check_aligned, sae_codes
from .stages import LEVELS_FILE

__all__ = [
    "DENSE_LINK_LIMIT",
    "FIXTURE_GROUP_FRACTIONS",
    "INATURALIST_RANKS",
    "LEVELS_FILE",
    "LINKS_FILE",
    "PAPER_GROUP_FRACTIONS",
    "LevelAnalysis",
    "analyse_levels",
    "concept_tree",
    "image_paths_of",
    "latent_depths",
    "lca_depth",
    "level_of_latents",
    "level_summary",
    "level_trends",
    "load_taxonomy_map",
    "matryoshka_group_sizes",
    "nested_activations",
    "pair_depths",
    "parent_links",
    "parse_taxonomy",
    "rank_codes",
    "save_level_links",
    "shared_prefix",
    "short_label",
    "taxonomy_of_classes",
]

LINKS_FILE = "links.csv"  # each latent's closest latent one level up
DENSE_LINK_LIMIT = 50_000_000  # co-activation needs dense codes: computed up to this many entries
INATURALIST_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
#: Length of each rank's direction in `nested_activations`, phylum to family: coarser concepts weigh more.
NESTED_NORMS = (4.0, 2.5, 1.6, 1.0)


def parse_taxonomy(
    folder: str, *, separator: str = "_", id_prefix: bool = True, num_ranks: int | None = len(INATURALIST_RANKS)
) -> tuple[str, ...]:
    """Taxonomy path of a class folder name, iNaturalist style: ``NNNNN_Kingdom_…_species`` → 7 ranks.

    ``id_prefix`` drops a leading numeric id; ``num_ranks`` (``None`` = any) is the number of
    ranks a name must have. A name with too few ranks raises ``ValueError`` naming it.
    """
    parts = [p for p in folder.split(separator)]
    if id_prefix:
        if not parts or not parts[0].isdigit():
            raise ValueError(f"class folder {folder!r} does not start with a numeric id followed by {separator!r}")
        parts = parts[1:]
    if any(p == "" for p in parts) or not parts:
        raise ValueError(f"class folder {folder!r} has an empty taxonomy rank")
    if num_ranks is not None and len(parts) != num_ranks:
        raise ValueError(
            f"class folder {folder!r} has {len(parts)} taxonomy ranks after the id; expected "
            f"{num_ranks} ({', '.join(INATURALIST_RANKS) if num_ranks == 7 else 'see num_ranks'})"
        )
    return tuple(parts)


def load_taxonomy_map(path: str | os.PathLike, *, separator: str = "/") -> dict[str, tuple[str, ...]]:
    """A ``class → path`` mapping file for data sets without taxonomic folder names.

    JSON (``{"class": ["rank1", "rank2", …]}`` or ``{"class": "rank1/rank2"}``) or a CSV/TSV
    with two columns ``class,path`` where ``path`` uses ``separator``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy map {path} not found")
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object class → path")
        items: list = list(raw.items())
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["class", "path"]:
            rows = rows[1:]
        bad = [row for row in rows if len(row) != 2]
        if bad:
            raise ValueError(f"{path}: every row needs exactly two columns class,path; bad row {bad[0]}")
        items = rows
    mapping = {}
    for name, value in items:
        ranks = tuple(value) if isinstance(value, list) else tuple(str(value).split(separator))
        if not ranks or any(not r for r in ranks):
            raise ValueError(f"{path}: class {name!r} has an empty taxonomy path {value!r}")
        mapping[str(name)] = ranks
    return mapping


def taxonomy_of_classes(
    class_names: Sequence[str], mapping: Mapping[str, Sequence[str]] | None = None, **parse_kwargs
) -> dict[str, tuple[str, ...]]:
    """Taxonomy path of each distinct class, from ``mapping`` or by parsing the folder names."""
    out = {}
    for name in dict.fromkeys(class_names):
        if mapping is not None:
            if name not in mapping:
                raise ValueError(f"class {name!r} is missing from the taxonomy map")
            out[name] = tuple(mapping[name])
        else:
            out[name] = parse_taxonomy(name, **parse_kwargs)
    return out


def lca_depth(a: Sequence[str], b: Sequence[str]) -> int:
    """Number of leading ranks two taxonomy paths share (0 = different kingdoms)."""
    depth = 0
    for x, y in zip(a, b):
        if x != y:
            break
        depth += 1
    return depth


def rank_codes(paths: Sequence[Sequence[str]]) -> np.ndarray:
    """Integer code per rank of each path ``[N, R]``; a code identifies the whole prefix up to that rank."""
    if not paths:
        raise ValueError("no taxonomy paths given")
    num_ranks = len(paths[0])
    if any(len(p) != num_ranks for p in paths):
        raise ValueError("all taxonomy paths must have the same number of ranks")
    codes = np.zeros((len(paths), num_ranks), dtype=np.int64)
    for rank in range(num_ranks):
        prefixes: dict[tuple[str, ...], int] = {}
        for i, p in enumerate(paths):
            codes[i, rank] = prefixes.setdefault(tuple(p[: rank + 1]), len(prefixes))
    return codes


def pair_depths(top_indices: torch.Tensor | np.ndarray, image_codes: np.ndarray) -> np.ndarray:
    """LCA depth of every pair ``i < j`` of each latent's top images: ``[K, k(k−1)/2]`` (−1 where absent)."""
    top = np.asarray(top_indices)
    if top.ndim != 2:
        raise ValueError(f"top_indices must be [K, k], got shape {top.shape}")
    k = top.shape[1]
    rows, cols = np.triu_indices(k, 1)
    safe = np.where(top < 0, 0, top)
    if safe.size and safe.max() >= len(image_codes):
        raise ValueError(f"top image index {int(safe.max())} is out of range for {len(image_codes)} images")
    codes = image_codes[safe]  # [K, k, R]
    same = codes[:, rows] == codes[:, cols]  # [K, P, R]; prefix codes make 'same' monotone
    depths = same.sum(axis=2).astype(np.int64)
    absent = (top[:, rows] < 0) | (top[:, cols] < 0)
    depths[absent] = -1
    return depths


def majority_depth(depths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Most common pair depth per latent; among tied depths the one whose first pair comes first
    (pairs in ``itertools.combinations`` order), as the authors' ``Counter.most_common(1)``."""
    num_pairs = depths.shape[1]
    first = np.full(counts.shape, num_pairs, dtype=np.int64)
    for depth in range(counts.shape[1]):
        hit = depths == depth
        first[:, depth] = np.where(hit.any(axis=1), hit.argmax(axis=1), num_pairs)
    tied = counts == counts.max(axis=1, keepdims=True)
    return np.where(tied, first, num_pairs + 1).argmin(axis=1)


def latent_depths(top_indices: torch.Tensor | np.ndarray, image_paths: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Per latent: mean pair depth, its rounding, the majority depth, and whether it is excluded.

    A latent is excluded (``excluded=True``, depths NaN) when any of its top-k slots is absent
    (fewer than k images with a positive activation), as in the paper.
    """
    codes = rank_codes(image_paths)
    depths = pair_depths(top_indices, codes)
    excluded = (np.asarray(top_indices) < 0).any(axis=1)
    num_ranks = codes.shape[1]
    counts = np.stack([(depths == d).sum(axis=1) for d in range(num_ranks + 1)], axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(excluded, np.nan, depths.clip(min=0).mean(axis=1))
    majority = np.where(excluded, np.nan, majority_depth(depths, counts).astype(float))
    return pd.DataFrame(
        {
            "latent": np.arange(len(depths)),
            "depth_mean": mean,
            "depth_rounded": np.round(mean),
            "depth_majority": majority,
            "excluded": excluded,
        }
    )


def level_of_latents(group_sizes: Sequence[int]) -> np.ndarray:
    """Matryoshka level (0 = coarsest) of each latent, from the group sizes."""
    if not group_sizes or any(int(g) < 1 for g in group_sizes):
        raise ValueError(f"group_sizes must be positive integers, got {list(group_sizes)}")
    return np.repeat(np.arange(len(group_sizes)), [int(g) for g in group_sizes])


def level_summary(
    depths: pd.DataFrame,
    ms: torch.Tensor | np.ndarray | None,
    group_sizes: Sequence[int],
    breadth: torch.Tensor | np.ndarray | None = None,
) -> pd.DataFrame:
    """Table A8 of the paper: per level, LCA depth (rounded mean / majority) and MS mean/max/min.

    Depth and MS averages use the latents that are not excluded (fewer than k positive
    images); ``excluded %`` reports how many were left out. ``breadth`` (optional, per latent:
    the fraction of images it fires on) adds ``fires on %``, averaged over all latents of a level —
    a second, taxonomy-free view of general (broad) vs specific (narrow) latents.
    """
    levels = level_of_latents(group_sizes)
    if len(levels) != len(depths):
        raise ValueError(f"group sizes cover {len(levels)} latents but {len(depths)} latents have depths")
    frame = depths.assign(level=levels)
    if ms is not None:
        ms = np.asarray(ms, dtype=float)
        if ms.shape != (len(levels),):
            raise ValueError(f"ms must have one score per latent ({len(levels)}), got shape {ms.shape}")
        frame = frame.assign(ms=ms)
    if breadth is not None and len(np.asarray(breadth)) != len(levels):
        raise ValueError(f"breadth must have one value per latent ({len(levels)}), got {len(np.asarray(breadth))}")
    rows = []
    prefix = 0
    for level, size in enumerate(group_sizes):
        prefix += int(size)
        part = frame[frame.level == level]
        kept = part[~part.excluded]
        row = {
            "level": level,
            "prefix": prefix,
            "latents": len(part),
            "excluded %": 100.0 * part.excluded.mean(),
            "LCA depth (mean)": kept.depth_rounded.mean(),
            "LCA depth (majority)": kept.depth_majority.mean(),
        }
        if ms is not None:
            scores = kept.ms.dropna()
            row |= {columns.MS_MEAN: scores.mean(), columns.MS_MAX: scores.max(), columns.MS_MIN: scores.min()}
        if breadth is not None:
            row["fires on %"] = 100.0 * float(np.asarray(breadth, dtype=float)[levels == level].mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("level")


def shared_prefix(paths: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The taxonomy ranks all given paths share (a node's label in the concept tree)."""
    if not paths:
        return ()
    depth = min(lca_depth(paths[0], p) for p in paths)
    return tuple(paths[0][:depth])


def parent_links(decoder: torch.Tensor, group_sizes: Sequence[int], codes: torch.Tensor | None = None) -> pd.DataFrame:
    """For each latent of level ≥ 1: its most similar latent one level up (decoder cosine) and co-activation.

    ``decoder`` is ``W_dec [ω, d]``. ``codes [N, ω]`` (optional) adds ``coactivation`` =
    P(parent active | child active) over the images.
    """
    levels = level_of_latents(group_sizes)
    if decoder.shape[0] != len(levels):
        raise ValueError(f"decoder has {decoder.shape[0]} latents, group sizes cover {len(levels)}")
    directions = torch.nn.functional.normalize(decoder.detach().float(), dim=1)
    starts = np.concatenate([[0], np.cumsum(group_sizes)])
    rows = []
    for level in range(1, len(group_sizes)):
        parents = slice(int(starts[level - 1]), int(starts[level]))
        children = slice(int(starts[level]), int(starts[level + 1]))
        cosine = directions[children] @ directions[parents].T
        best, which = cosine.max(dim=1)
        child_ids = np.arange(children.start, children.stop)
        parent_ids = which.numpy() + parents.start
        frame = pd.DataFrame({"child": child_ids, "child_level": level, "parent": parent_ids, "cosine": best.numpy()})
        if codes is not None:
            active = codes > 0
            child_active = active[:, children].float()
            both = (child_active * active[:, parent_ids].float()).sum(0)
            frame["coactivation"] = (both / child_active.sum(0).clamp(min=1)).numpy()
        rows.append(frame)
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["child", "child_level", "parent", "cosine"])
    )


def short_label(folder: str) -> str:
    """A compact caption for a class folder: the genus rank of a taxonomic name, else its readable
    name (ImageNet wnid → class name, see :func:`.labels.class_label`)."""
    from .labels import class_label

    try:
        return parse_taxonomy(folder)[-2]
    except ValueError:
        return class_label(folder)


# The paper's 5-level split (0.002, 0.009, 0.035, 0.189, 0.765 of 1536 latents) gives an empty
# first group on a small dictionary; this keeps five levels with 2, 4, 10, 28, 84 of 128 latents.
FIXTURE_GROUP_FRACTIONS = (2 / 128, 4 / 128, 10 / 128, 28 / 128, 84 / 128)
PAPER_GROUP_FRACTIONS = (0.002, 0.009, 0.035, 0.189, 0.765)


def nested_activations(
    branching: Sequence[int] = (2, 3, 3, 3),
    per_leaf: int = 20,
    dim: int = 64,
    *,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """Activation rows whose concepts nest along a taxonomy by construction: a control for Table A8.

    Every phylum, class, order and family (``branching`` children per node, four ranks) gets a random
    direction of length `NESTED_NORMS` (coarse ranks longer); a row is the sum of its leaf's four
    directions, each at its own random strength in [0.5, 1.5], plus Gaussian ``noise``. Returns the
    rows and their iNaturalist-style class folders (kingdom ``Nestia``, genus = leaf).
    """
    import itertools

    if len(branching) != len(NESTED_NORMS) or min(branching) < 1 or per_leaf < 1 or dim < 1 or noise < 0:
        raise ValueError(
            f"need {len(NESTED_NORMS)} positive branching factors, per_leaf ≥ 1, dim ≥ 1 and noise ≥ 0; "
            f"got {tuple(branching)}, {per_leaf}, {dim}, {noise}"
        )
    rng = np.random.default_rng(seed)
    directions: dict[tuple[int, ...], np.ndarray] = {}
    rows, folders = [], []
    for index, leaf in enumerate(itertools.product(*(range(b) for b in branching))):
        path = ["".join(map(str, leaf[: r + 1])) for r in range(len(leaf))]
        ranks = [f"{letter}{code}" for letter, code in zip("PCOF", path)]
        folder = "_".join([f"{index:05d}", "Nestia", *ranks, f"G{path[-1]}", "sp"])
        for _ in range(per_leaf):
            row = rng.normal(scale=noise, size=dim)
            for rank, norm in enumerate(NESTED_NORMS):
                direction = directions.setdefault(leaf[: rank + 1], rng.normal(size=dim))
                row += rng.uniform(0.5, 1.5) * norm * direction / np.linalg.norm(direction)
            rows.append(row)
            folders.append(folder)
    return torch.tensor(np.array(rows), dtype=torch.float32), folders


def image_paths_of(
    class_names: Sequence[str], mapping: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[str, ...]]:
    """Taxonomy path of every image from its class (folder name or mapping file)."""
    per_class = taxonomy_of_classes(class_names, mapping)
    return [per_class[name] for name in class_names]


def concept_tree(
    links: pd.DataFrame, top_counts: torch.Tensor | np.ndarray, roots: int = 3, children: int = 3
) -> list[tuple[int, list[int]]]:
    """A few level-0 latents (those firing on most images) with their strongest level-1 children.

    Children are ranked by co-activation with the parent when known, else decoder cosine.
    """
    counts = np.asarray(top_counts)
    first = links[links.child_level == 1]
    if first.empty:
        raise ValueError("a concept tree needs at least two Matryoshka levels")
    candidates = np.arange(int(first.child.min()))  # level 0 = every latent before the first level-1 latent
    ranked = sorted(candidates, key=lambda j: (-counts[j], j))[:roots]
    key = "coactivation" if "coactivation" in first.columns else "cosine"
    tree = []
    for root in ranked:
        kids = first[first.parent == root].sort_values([key, "cosine"], ascending=False)
        kids = kids[counts[kids.child.to_numpy()] > 0]
        tree.append((int(root), [int(c) for c in kids.child.head(children)]))
    return tree


def matryoshka_group_sizes(sae: BaseSAE, name: str = "the SAE") -> list[int]:
    """The nested group sizes of a Matryoshka SAE; any other SAE is refused (it has no levels)."""
    group_sizes = getattr(sae, "group_sizes", None)
    if not group_sizes:
        raise ValueError(f"{name} is not a Matryoshka SAE (no group_sizes): chapter 4 needs nested levels")
    return [int(g) for g in group_sizes]


@dataclass
class LevelAnalysis:
    """What chapter 4 computes for one Matryoshka SAE: the per-level table and what it was built from."""

    table: pd.DataFrame  # level_summary's layout (the paper's Table A8)
    depths: pd.DataFrame  # per latent: LCA depth of its top images
    codes: SparseCodes  # the SAE's codes on the store
    top: TopK  # every latent's top images
    group_sizes: list[int]


def analyse_levels(
    sae: BaseSAE,
    store,
    embeddings,
    paths: Sequence[Sequence[str]],
    top_k: int = 16,
    device: str | torch.device | None = "auto",
    out: str | os.PathLike | None = None,
) -> LevelAnalysis:
    """LCA depth of each latent's top images and MS per Matryoshka level (Pach et al. 2025, Table A8);
    the table is written to ``out/LEVELS_FILE`` when ``out`` is given. ``embeddings=None`` (rows
    without images, e.g. `nested_activations`) leaves the MS columns out."""
    group_sizes = matryoshka_group_sizes(sae)
    if embeddings is not None:
        check_aligned(store, embeddings)
    dev = resolve_device(device)
    codes = sae_codes(sae, store, device=dev)
    scanned = scan_neurons(codes, None if embeddings is None else embeddings.to_tensor(), top_k=top_k, device=dev)
    top, ms = scanned.top_images(), scanned.ms
    depths = latent_depths(top.indices, paths)
    breadth = top.count_positive.numpy() / len(store.image_ids)  # fraction of images each latent fires on
    table = level_summary(depths, ms, group_sizes, breadth)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out) / LEVELS_FILE)
    return LevelAnalysis(table, depths, codes, top, group_sizes)


def level_trends(table: pd.DataFrame) -> list[str]:
    """Two sentences on the level table: does the LCA depth grow, and does the share of images a
    latent fires on shrink, from the coarsest to the finest level?"""
    kept = table.dropna(subset=["LCA depth (mean)"])
    lines = []
    if len(kept):
        first, last = kept["LCA depth (mean)"].iloc[0], kept["LCA depth (mean)"].iloc[-1]
        lines.append(
            f"LCA depth, coarsest → finest scored level: {first:.2f} → {last:.2f} "
            f"({'deeper' if last > first else 'not deeper'})"
        )
    if "fires on %" in table and len(table):
        first, last = table["fires on %"].iloc[0], table["fires on %"].iloc[-1]
        lines.append(
            f"fires on % of images, coarsest → finest level: {first:.1f} → {last:.1f} "
            f"({'narrower' if last < first else 'not narrower'})"
        )
    return lines


def save_level_links(sae: BaseSAE, analysis: LevelAnalysis, out: str | os.PathLike | None = None) -> pd.DataFrame:
    """`parent_links` of the SAE's levels, with co-activation when the dense codes fit in
    `DENSE_LINK_LIMIT` entries; written to ``out/LINKS_FILE`` when ``out`` is given."""
    codes = analysis.codes
    dense = codes.to_dense() if len(codes) * codes.num_latents <= DENSE_LINK_LIMIT else None
    links = parent_links(sae.W_dec, analysis.group_sizes, dense)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        links.to_csv(Path(out) / LINKS_FILE, index=False)
    return links
