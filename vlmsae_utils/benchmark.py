"""The authors' metric benchmark as a check on this book's MS (Pach et al. 2025, §4 and Appendix A).

The benchmark folder holds ``pairs.csv`` (``k_x, k_y, R_user, MS_x_dino, MS_y_dino, MS_x_clip,
MS_y_clip``: the user-study pairs with the authors' MS of both neurons) and ``activations.csv``
(``k, a_1 … a_N``: each neuron's activation on the N = 50,000 ImageNet val images). Given the
scorer embeddings of the same images in the same order (DINOv2-B ``pooler_output`` for ``dino``,
CLIP-B/32 ``image_embeds`` for ``clip``), :func:`benchmark_check` recomputes every neuron's MS with
the closed form and reports how far it lies from the authors' numbers, beside the user-study
agreement of both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .metrics import monosemanticity_score, ms_user_agreement

__all__ = [
    "ACTIVATIONS_FILE",
    "PAIRS_FILE",
    "benchmark_check",
    "published_ms",
    "read_benchmark_activations",
]

PAIRS_FILE, ACTIVATIONS_FILE = "pairs.csv", "activations.csv"


def _benchmark_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not the authors' benchmark folder: {name} is missing")
    return file


def read_benchmark_activations(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(neuron ids [K], activations [N, K])`` from ``activations.csv`` (one row per neuron)."""
    table = pd.read_csv(_benchmark_file(Path(folder), ACTIVATIONS_FILE))
    columns = [c for c in table.columns if c != "k"]
    if "k" not in table.columns or not columns or not all(c.startswith("a_") for c in columns):
        raise ValueError(f"{folder}/{ACTIVATIONS_FILE}: expected columns k, a_1 … a_N, got {list(table.columns)[:4]} …")
    values = table[columns].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{folder}/{ACTIVATIONS_FILE}: holds missing or non-finite activations")
    return table["k"].to_numpy(np.int64), values.T.copy()


def published_ms(pairs: pd.DataFrame, scorer: str) -> pd.Series:
    """The authors' MS of every neuron named in the pairs (as x or y), by neuron id; a neuron given
    two different values is an error naming it."""
    both = pd.concat(
        [
            pairs[["k_x", f"MS_x_{scorer}"]].set_axis(["k", "MS"], axis=1),
            pairs[["k_y", f"MS_y_{scorer}"]].set_axis(["k", "MS"], axis=1),
        ]
    )
    spread = both.groupby("k")["MS"].agg(["min", "max"])
    uneven = spread.index[spread["max"] - spread["min"] > 1e-12].tolist()
    if uneven:
        raise ValueError(f"pairs give neuron(s) {uneven[:5]} different MS_{scorer} values")
    return spread["min"]


def benchmark_check(
    folder: str | os.PathLike, embeddings: Mapping[str, Any], device: str | torch.device | None = "auto"
) -> pd.DataFrame:
    """One row per scorer of ``embeddings`` (``"dino"``, ``"clip"``: ``[N, D]`` of the benchmark's
    images in order): neurons compared, max and mean |Δ| between our MS and the authors', and the
    user-study agreement (overall, pair-weighted) of both."""
    folder = Path(folder)
    pairs = pd.read_csv(_benchmark_file(folder, PAIRS_FILE))
    ids, activations = read_benchmark_activations(folder)
    rows = []
    for scorer, embedding in embeddings.items():
        target = torch.as_tensor(np.asarray(embedding), dtype=torch.float32)
        if target.ndim != 2 or target.shape[0] != activations.shape[0]:
            raise ValueError(
                f"{scorer} embeddings have shape {tuple(target.shape)}; the benchmark has {activations.shape[0]} images"
            )
        ours = pd.Series(monosemanticity_score(activations, target, device=device).numpy(), index=ids)
        theirs = published_ms(pairs, scorer)
        missing = sorted(set(theirs.index) - set(ids))
        if missing:
            raise ValueError(f"pairs name neuron(s) {missing[:5]} that {ACTIVATIONS_FILE} does not hold")
        delta = (ours.loc[theirs.index] - theirs).abs()
        recomputed = pairs.assign(
            **{f"MS_x_{scorer}": ours.loc[pairs["k_x"]].to_numpy(), f"MS_y_{scorer}": ours.loc[pairs["k_y"]].to_numpy()}
        )
        rows.append(
            {
                "scorer": scorer,
                "neurons": len(theirs),
                "max |Δ MS|": float(delta.max()),
                "mean |Δ MS|": float(delta.mean()),
                "agreement (authors' MS)": _overall(ms_user_agreement(pairs, scorer=scorer)),
                "agreement (our MS)": _overall(ms_user_agreement(recomputed, scorer=scorer)),
            }
        )
    return pd.DataFrame(rows)


def _overall(table: pd.DataFrame) -> float:
    return float(table.loc[table["bin"] == "overall", "agreement"].iloc[0])
