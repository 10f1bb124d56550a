"""Grids of SAEs (notebook 02 and sweeps): every (type × expansion) trained on the same data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import columns
from ..device import resolve_device
from ..sae import SAE_LABELS, SAE_TYPES
from ..store import TrainingData
from ..train_config import (
    TrainConfig,
    grid_configs,
)
from .batches import (
    _data_dim,
    _resolve_data_on_device,
    _RowSource,
)
from .evaluate import evaluate_on
from .loop import train_on

__all__ = [
    "run_name",
    "train_grid",
]

# ----- grids of SAEs (notebook 02 and sweeps) ---------------------------------------------------
# SAE_LABELS (type name → table label) is the registry's live view, imported from vlmsae_utils.sae.


def run_name(sae_type: str, expansion: float, k: int) -> str:
    """Folder name of one trained SAE, e.g. ``matryoshka_batch_top_k_x4_k20``."""
    return f"{sae_type}_x{expansion:g}_k{k}"


def train_grid(
    train_data: TrainingData,
    val_data: TrainingData | None,
    sae_types: list[str],
    expansions: list[float],
    out_dir: str | os.PathLike,
    device: str | torch.device = "auto",
    config: TrainConfig | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
    **overrides: Any,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train every (SAE type × expansion) on the same data, save each SAE and its history under
    ``out_dir/<run_name>/``, and return a results table ("R² %": the paper's per-batch R² of :func:`evaluate_sae`, "global R² %": 1 − FVU, L0, dead %)
    and the histories. Settings: ``config`` (default ``TrainConfig()``) with ``overrides`` (TrainConfig
    fields) applied, and each type and expansion of the grid; ``group_fractions`` only reach the
    types with latent groups. ``device`` is resolved once (``"auto"``: CUDA if available); when the
    training data goes on the device (``data_on_device``, see :func:`train_sae`) it is put there
    once for the whole grid."""
    from ..sae import save_sae, store_provenance

    dev = resolve_device(device)
    if not sae_types or not expansions:
        raise ValueError("sae_types and expansions must each list at least one value")
    unknown = [t for t in sae_types if t not in SAE_TYPES]
    if unknown:
        raise ValueError(f"unknown sae_types {unknown}; valid: {', '.join(SAE_TYPES)}")
    configs = grid_configs(sae_types, expansions, config, **overrides)  # all validated before anything trains
    base = next(iter(configs.values()))
    out = Path(out_dir)
    _data_dim(train_data)
    provenance = store_provenance(train_data)  # before the rows move to the device as a bare tensor
    src = _RowSource(train_data)
    if _resolve_data_on_device(base.data_on_device, src, dev, base.memory_fraction):
        train_data = src.load(dev, "training data")  # once for every SAE of the grid
    rows, histories = [], {}
    for sae_type in sae_types:
        for expansion in expansions:
            cfg = configs[sae_type, expansion]
            k = cfg.k
            name = run_name(sae_type, expansion, k)
            checkpoint = out / name / "checkpoint"
            sae, history = train_on(train_data, cfg, dev, val_data, checkpoint, progress, resume, stop_after)
            save_sae(sae, out / name, training=history.attrs["training"], provenance=provenance)
            history.to_csv(out / name / "history.csv", index=False)
            final = evaluate_on(sae, val_data if val_data is not None else train_data, cfg.batch_size, dev)
            rows.append(
                {
                    "SAE": SAE_LABELS[sae_type],
                    "sae_type": sae_type,
                    "expansion": expansion,
                    "latents": sae.dict_size,
                    "k": k,
                    columns.R2: 100 * final["r2_batch_mean"],
                    columns.GLOBAL_R2: 100 * final["r2"],
                    columns.L0: final["l0"],
                    columns.DEAD_PERCENT: 100 * final.get("dead_frac_val", float("nan")),
                    "path": str(out / name),
                }
            )
            histories[name] = history
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    return results, histories
