"""Validation metrics of a trained SAE: the authors' per-batch R², global R² (1 − FVU), L0, dead latents."""

from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from ..sae import BaseSAE
from ..store import TrainingData
from .batches import (
    _eval_batches,
)

__all__ = [
    "evaluate_on",
    "evaluate_sae",
]

# ----- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(
    sae: BaseSAE, data: TrainingData, batch_size: int = 4096, device: str | torch.device = "auto"
) -> dict[str, float]:
    """Reconstruction quality and sparsity of ``sae`` on ``data`` (inference encoding).

    Returns ``r2_batch_mean`` — the R² the paper reports, computed as the authors log it
    (dictionary_learning's ``frac_variance_explained``): per batch of the validation data read in
    store order (class-sorted, unshuffled; ``batch_size`` = the training batch size, the last batch
    short), ``1 − Σ_j var_b(x − x̂)_j / Σ_j var_b(x)_j``, averaged over all batches, the short last
    one included (a last batch of one row has no variance and is left out, where the authors' value
    would be NaN). Also ``fvu`` and ``r2 = 1 − FVU`` over the whole data (global: one residual sum of
    squares over one total sum of squares around the data mean; independent of batching), ``l0``,
    ``dead_frac_val`` (latents never active) and, for Matryoshka, ``r2_prefix_<m>`` per nested
    prefix (global). The SAE is moved to ``device`` (``"auto"``: CUDA if available) and back.
    """
    return evaluate_on(sae, data, batch_size, resolve_device(device))


@torch.no_grad()
def evaluate_on(sae: BaseSAE, data: TrainingData, batch_size: int, dev: torch.device) -> dict[str, float]:
    """:func:`evaluate_sae` on a device its caller resolved (training resolves it once, at its entry point)."""
    was_training = sae.training
    home = sae.W_enc.device
    sae.eval()
    if home != dev:
        sae.to(dev)
    try:
        sums = torch.zeros(sae.activation_dim, dtype=torch.float64, device=dev)
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        n, sse, l0 = 0, 0.0, 0.0
        fired = torch.zeros(sae.dict_size, dtype=torch.bool, device=dev)
        prefix_sse: torch.Tensor | None = None
        per_batch: list[float] = []
        for x in _eval_batches(data, batch_size, dev):
            f = sae.encode(x)
            if sae.prefix_sizes:  # per-prefix R² for every type with nested prefixes
                recs = sae.decode_prefixes(f)
                x_hat = recs[-1]
                pe = torch.stack([(x - r).double().pow(2).sum() for r in recs])
                prefix_sse = pe if prefix_sse is None else prefix_sse + pe
            else:
                x_hat = sae.decode(f)
            resid = (x - x_hat).double()
            xd = x.double()
            sse += float(resid.pow(2).sum())
            sums = sums + xd.sum(0)
            sq = sq + xd.pow(2).sum()
            n += x.shape[0]
            l0 += float((f != 0).sum())
            fired |= (f != 0).any(0)
            if x.shape[0] >= 2:
                var_x = float((xd - xd.mean(0)).pow(2).sum())
                var_r = float((resid - resid.mean(0)).pow(2).sum())
                per_batch.append(1.0 - var_r / var_x if var_x > 0 else float("nan"))
        if n == 0:
            raise ValueError("validation data is empty")
        tss = float(sq - sums.pow(2).sum() / n)
        fvu = sse / tss if tss > 0 else float("nan")
        out = {
            "fvu": fvu,
            "r2": 1.0 - fvu,
            "r2_batch_mean": float(np.mean(per_batch)) if per_batch else float("nan"),
            "l0": l0 / n,
            "dead_frac_val": float((~fired).float().mean()),
        }
        if prefix_sse is not None:
            for m, e in zip(sae.prefix_sizes, prefix_sse.tolist()):
                out[f"r2_prefix_{m}"] = 1.0 - e / tss if tss > 0 else float("nan")
        return out
    finally:
        if home != dev:
            sae.to(home)
        sae.train(was_training)
