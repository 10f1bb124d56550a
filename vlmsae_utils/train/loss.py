"""The training objective of the reference trainer with sparse gradients, and what a run starts from:
the learning-rate schedule, the input scale and the geometric-median decoder bias."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..sae import BaseSAE, bag_offsets
from ..store import TrainingData
from ..train_config import (
    DEFAULT_AUX_ALPHA,
    TrainConfig,
)
from .batches import (
    _check_finite,
    _RowSource,
)

__all__ = [
    "dead_after_batch",
    "estimate_input_scale",
    "geometric_median",
    "lr_lambda",
    "project_decoder_grad",
    "sae_loss",
]


def lr_lambda(step: int, steps: int, warmup_steps: int, decay_start: int | None) -> float:
    """Learning-rate multiplier: linear warm-up ``step / warmup_steps`` (dictionary_learning's: the first
    step at 0), then 1, then linear decay to 0 from ``decay_start`` (``None``: no decay)."""
    m = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_start is not None and step >= decay_start:
        m *= max(0.0, (steps - step) / max(1, steps - decay_start))
    return m


def estimate_input_scale(
    data: TrainingData | _RowSource,
    n_rows: int | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    n_batches: int = 100,
) -> float:
    """Scalar ``s`` with ``E||s·x||² = 1`` (unit mean squared norm, Pach et al. 2025): ``s = 1/√mean‖x‖²``.

    As the authors (dictionary_learning's ``--normalize_activations``), the mean is taken over
    ``n_batches`` random batches: a seeded uniform sample without replacement of
    ``n_rows = n_batches · batch_size`` rows drawn across the whole data
    (``default_rng([seed, 1])``), or every row when the data has fewer — not the first rows in
    store order, which in a class-sorted store cover only a few classes."""
    src = data if isinstance(data, _RowSource) else _RowSource(data)
    N = src.n_rows
    n = min(N, int(n_rows) if n_rows is not None else int(n_batches) * int(batch_size))
    if n < 1:
        raise ValueError("cannot normalise inputs: data is empty")
    rows = (
        np.arange(N) if n >= N else np.sort(np.random.default_rng([int(seed) % 2**63, 1]).choice(N, n, replace=False))
    )
    total = 0.0
    for start in range(0, n, 8192):
        part = rows[start : start + 8192]
        b = src.gather(part)
        _check_finite(b, "data", rows=part)
        total += float(b.double().pow(2).sum())
    if total <= 0:
        raise ValueError("cannot normalise inputs: data is empty or identically zero")
    return float(1.0 / math.sqrt(total / n))


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations for the geometric median of the rows of ``points``."""
    points = points.double()
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        prev = guess
        w = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-12)
        guess = (w[:, None] * points).sum(0) / w.sum()
        if (guess - prev).norm() < tol:
            break
    return guess.float()


# ----- loss with sparse gradients -------------------------------------------------------------


class _SparseEncoderGrad(torch.autograd.Function):
    """Identity on gathered post-ReLU encoder values whose backward only touches the gathered entries.

    ``vals[n] = ReLU(xc[rows[n]] · W_enc[:, cols[n]] + b_enc[cols[n]])`` with ``xc = xs − b_dec``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        vals: torch.Tensor,
        xs: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(xs, W_enc, b_dec, rows, cols, vals)
        return vals.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, W_enc, b_dec, rows, cols, vals = ctx.saved_tensors
        g = (g * (vals > 0)).to(W_enc.dtype)
        omega = W_enc.shape[1]
        gb = torch.zeros(omega, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
        gW = _encoder_weight_grad(xs - b_dec, rows, cols, g, omega) if ctx.needs_input_grad[2] else None
        gbdec = -(W_enc @ gb) if ctx.needs_input_grad[4] else None
        return None, None, gW, gb, gbdec, None, None


def _encoder_weight_grad(
    xc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor, omega: int
) -> torch.Tensor:
    """``∂L/∂W_enc [d, ω]``: column ``cols[n]`` gains ``g[n] · xc[rows[n]]``. Summed per latent as
    bags of input rows (``embedding_bag``, vectorised along d; 5x faster than a sparse product
    with the aux-K entries), then laid out as W_enc."""
    order = cols.argsort(stable=True)
    per_latent = F.embedding_bag(
        rows[order], xc, bag_offsets(cols[order], omega), mode="sum", per_sample_weights=g[order]
    )
    return per_latent.T.contiguous()


def _dense_loss(sae: BaseSAE, xs: torch.Tensor, l1_coeff: float) -> dict[str, Any]:
    """Dense training loss of a type without sparse training (ReLU): ``l2 + l1_coeff · sparsity_penalty``."""
    pre = F.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = sae.select(pre)
    x_hat = f @ sae.W_dec + sae.b_dec
    l2 = (xs - x_hat).pow(2).sum(-1).mean()
    l1 = sae.sparsity_penalty(f)
    fired = (f > 0).any(0)
    return {
        "loss": l2 + l1_coeff * l1,
        "l2": l2.detach(),
        "aux": torch.zeros(()),
        "l1": l1.detach(),
        "l0": float((f > 0).sum()) / xs.shape[0],
        "fired": fired,
        "min_kept": None,
    }


def sae_loss(
    sae: BaseSAE,
    x: torch.Tensor,
    dead_mask: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    aux_alpha: float = DEFAULT_AUX_ALPHA,
    k_aux: int | None = None,
    l1_coeff: float = TrainConfig.l1_coeff,
    autocast: bool = False,
) -> dict[str, Any]:
    """Training loss of the reference trainer on raw inputs ``x`` (scaled by ``sae.input_scale``).

    ``loss = l2 + aux_alpha · aux``. The SAE class decides the terms: which entries are kept
    (:meth:`~vlmsae_utils.sae.BaseSAE.select_indices`; only they carry gradient) and the
    reconstruction term (:meth:`~vlmsae_utils.sae.BaseSAE.sparse_reconstruction`). For Matryoshka
    with G groups, as dictionary_learning's ``MatryoshkaBatchTopKTrainer``: each prefix's error
    ``l2_m = mean_b ||x_b − x̂_{m,b}||²`` is weighted ``1/G`` and the weighted errors are averaged
    over the G prefixes, so ``l2 = Σ_m l2_m / G²``. Types with ``sparse_training = False`` (ReLU)
    use the dense loss ``l2 + l1_coeff · L1``. ``dead_mask`` (bool [ω]) names the latents the
    auxiliary-K loss may revive; a callable gets the batch's ``fired`` mask and returns it
    (:func:`dead_after_batch`, the trainer's rule). ``autocast`` runs the dense encoder forward in bf16
    and only applies on CUDA (ignored elsewhere).

    Returns a dict with ``loss`` (differentiable), ``l2`` (the reconstruction term of the loss),
    ``aux``, ``l0``, ``fired`` (bool [ω]), ``min_kept`` (smallest positive kept activation) and,
    for Matryoshka, ``prefix_l2`` (the unweighted ``l2_m``).
    """
    autocast = bool(autocast) and x.device.type == "cuda"
    xs = x.to(sae.W_enc.dtype) * sae.input_scale
    if not sae.sparse_training:
        return _dense_loss(sae, xs, l1_coeff)
    with torch.no_grad():
        pre = _encoder_pre_acts(sae, xs, autocast)
        with record_function("step.select"):
            rows, cols = sae.select_indices(pre)
            vals = pre[rows, cols]
            pos = vals > 0
            fired = torch.zeros(sae.dict_size, dtype=torch.bool, device=xs.device)
            fired[cols[pos]] = True
            min_kept = float(vals[pos].min()) if bool(pos.any()) else 0.0
        if callable(dead_mask):
            dead_mask = dead_mask(fired)
        aux_rows, aux_cols = _aux_entries(sae, pre, dead_mask, k_aux)
    all_rows = rows if aux_rows is None else torch.cat([rows, aux_rows])
    all_cols = cols if aux_cols is None else torch.cat([cols, aux_cols])
    all_vals = pre[all_rows, all_cols]
    g_vals = _SparseEncoderGrad.apply(all_vals, xs.detach(), sae.W_enc, sae.b_enc, sae.b_dec, all_rows, all_cols)
    n_kept = rows.shape[0]
    out: dict[str, Any] = {"l0": float(pos.sum()) / xs.shape[0], "fired": fired, "min_kept": min_kept}
    with record_function("step.decode_loss"):
        l2, x_hat, extra = sae.sparse_reconstruction(xs, rows, cols, g_vals[:n_kept])
        out.update(extra)
        aux = torch.zeros((), device=xs.device)
        if aux_rows is not None and aux_cols is not None:
            aux = _aux_loss(sae, (xs - x_hat).detach(), aux_cols, g_vals[n_kept:])
    out.update(loss=l2 + aux_alpha * aux, l2=l2.detach(), aux=aux.detach())
    return out


@record_function("step.encoder_gemm")
def _encoder_pre_acts(sae: BaseSAE, xs: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The dense post-ReLU pre-activations of scaled inputs, in float32 (bf16 GEMM under ``autocast``)."""
    with torch.autocast(device_type=xs.device.type, dtype=torch.bfloat16, enabled=autocast):
        pre = torch.addmm(sae.b_enc, xs - sae.b_dec, sae.W_enc).relu_()
    return pre.float()


@record_function("step.aux_select")
def _aux_entries(
    sae: BaseSAE, pre: torch.Tensor, dead_mask: torch.Tensor | None, k_aux: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(rows, cols)`` of the auxiliary-K entries: each image's ``k_aux`` (default d/2) largest
    pre-activations among the dead latents; ``(None, None)`` when none is dead or the type revives none."""
    n_dead = int(dead_mask.sum()) if dead_mask is not None and sae.revives_dead_latents else 0
    if dead_mask is None or n_dead == 0:
        return None, None
    B = pre.shape[0]
    ka = min(k_aux if k_aux is not None else sae.activation_dim // 2, n_dead)
    dead_idx = dead_mask.nonzero().flatten()
    sub = pre[:, dead_idx].topk(ka, dim=-1, sorted=False).indices
    return torch.arange(B, device=pre.device).repeat_interleave(ka), dead_idx[sub].flatten()


def _aux_loss(sae: BaseSAE, resid: torch.Tensor, aux_cols: torch.Tensor, aux_vals: torch.Tensor) -> torch.Tensor:
    """The auxiliary-K term: how well the dead latents' entries reconstruct the residual, relative
    to the residual's variance (0 when that is 0)."""
    B = resid.shape[0]
    ka = aux_cols.shape[0] // B
    aux_rec = F.embedding_bag(aux_cols.view(B, ka), sae.W_dec, mode="sum", per_sample_weights=aux_vals.view(B, ka))
    l2_aux = (resid - aux_rec).pow(2).sum(-1).mean()
    denom = (resid - resid.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return (l2_aux / denom).nan_to_num(0.0)


def dead_after_batch(
    since_fired: torch.Tensor, dead_tokens: int, n_rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The auxiliary loss's dead latents as dictionary_learning counts them: after this batch's
    ``n_rows`` tokens are added and its firing latents reset, ``since_fired ≥ dead_tokens``."""
    return lambda fired: (since_fired + n_rows >= dead_tokens) & ~fired


def project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove from ``W_dec.grad`` the component parallel to each (unit) decoder row."""
    if W_dec.grad is None:
        return
    w, grad = W_dec.data, W_dec.grad
    along = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)  # ⟨grad_j, w_j⟩ per row, no [ω, d] temporary
    grad.addcmul_(w, along, value=-1.0)
