"""SAE trainer faithful to the dictionary_learning reference (PAPER.md §3), with sparse gradients.

Training tricks: input normalisation to unit mean squared norm (factor stored in
``sae.input_scale``), geometric-median ``b_dec``, tied init, unit-norm decoder rows with
gradient projection, grad-norm clip 1.0, Adam(0.9, 0.999), linear warm-up / linear decay,
auxiliary-K loss for dead latents, threshold EMA, Matryoshka sum of prefix losses.
Speed: for the top-k variants only the ``B·k`` kept (plus auxiliary) entries carry gradient,
so encoder and decoder gradients are computed sparsely (sparse mm / ``embedding_bag``); the
dense encoder forward is the only ``B·d·ω`` product per step.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
import torch.nn.functional as F

from .io import atomic_torch_save
from .sae import SAE_TYPES, BaseSAE, MatryoshkaBatchTopKSAE, make_sae

DEFAULT_GROUP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5625)
CHECKPOINT_FILE = "checkpoint.pt"


# ----- parameters ----------------------------------------------------------------------------

def default_lr(dict_size: int) -> float:
    """Reference learning rate ``2e-4 / sqrt(ω / 2**14)`` (the code's, not the paper text's)."""
    return 2e-4 / math.sqrt(dict_size / 2**14)


def group_sizes_from_fractions(group_fractions, dict_size: int) -> list[int]:
    """Group sizes as dictionary_learning computes them: ``int(f·ω)`` for all but the last group."""
    fr = [float(f) for f in group_fractions]
    if not fr or any(not (f > 0) for f in fr):
        raise ValueError(f"group_fractions must be positive, got {list(group_fractions)}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"group_fractions must sum to 1, got {list(group_fractions)} (sum {sum(fr):.6g})")
    sizes = [int(f * dict_size) for f in fr[:-1]]
    sizes.append(dict_size - sum(sizes))
    if any(s < 1 for s in sizes):
        raise ValueError(f"group_fractions {fr} give an empty group for dict_size={dict_size}: sizes {sizes}")
    return sizes


def lr_lambda(step: int, steps: int, warmup_steps: int, decay_start: int | None) -> float:
    """Learning-rate multiplier: linear warm-up from 0, then 1, then linear decay to 0 from ``decay_start``."""
    m = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_start is not None and step >= decay_start:
        m *= max(0.0, (steps - step) / max(1, steps - decay_start))
    return m


# ----- data ---------------------------------------------------------------------------------

def _first_bad_rows(x: torch.Tensor, offset: int = 0, n: int = 5) -> list[int]:
    bad = (~torch.isfinite(x).all(dim=-1)).nonzero().flatten()[:n]
    return [int(i) + offset for i in bad]


def _check_finite(x: torch.Tensor, what: str, offset: int = 0) -> None:
    bad = _first_bad_rows(x, offset)
    if bad:
        raise ValueError(f"{what} contains NaN/inf values; first bad rows: {bad}")


def _data_dim(data) -> int:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"data tensor must be [N, d], got shape {tuple(data.shape)}")
        return int(data.shape[1])
    if hasattr(data, "dim") and hasattr(data, "iter_batches"):
        return int(data.dim)
    raise ValueError(f"data must be a torch.Tensor [N, d] or an ActivationStore, got {type(data).__name__}")


class _Batches:
    """Endless, seeded, resumable stream of training batches from a tensor or a store."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.is_tensor = isinstance(data, torch.Tensor)
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self._it = 0, 0, None
        if self.is_tensor:
            _check_finite(data, "training data")

    def state(self) -> dict:
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "pos": self.pos}

    def load_state(self, st: dict) -> None:
        self.gen.set_state(st["gen"])
        self.epoch, self.pos, self._it = int(st["epoch"]), int(st["pos"]), None

    def _store_iter(self) -> Iterator[torch.Tensor]:
        while True:
            it = self.data.iter_batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch)
            skip = self.pos
            for i, b in enumerate(it):
                if i < skip:
                    continue
                self.pos = i + 1
                yield b
            self.epoch, self.pos = self.epoch + 1, 0

    def next(self) -> torch.Tensor:
        if self.is_tensor:
            idx = torch.randint(self.data.shape[0], (self.batch_size,), generator=self.gen)
            return self.data[idx]
        if self._it is None:
            self._it = self._store_iter()
        b = next(self._it)
        b = torch.as_tensor(b).float()
        _check_finite(b, f"training store (epoch {self.epoch}, batch {self.pos - 1})")
        return b


def _iter_eval(data, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
    else:
        yield from data.iter_batches(batch_size, shuffle=False)


def estimate_input_scale(data, n_rows: int = 65536, batch_size: int = 4096) -> float:
    """Scalar ``s`` with ``E||s·x||² = 1`` (unit mean squared norm, PAPER.md §3)."""
    total, count = 0.0, 0
    for b in _iter_eval(data, batch_size):
        b = torch.as_tensor(b).double()
        total += float(b.pow(2).sum())
        count += b.shape[0]
        if count >= n_rows:
            break
    if count == 0 or total <= 0:
        raise ValueError("cannot normalise inputs: data is empty or identically zero")
    return float(1.0 / math.sqrt(total / count))


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
    def forward(ctx, vals, xs, W_enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(xs, W_enc, b_dec, rows, cols, vals)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        xs, W_enc, b_dec, rows, cols, vals = ctx.saved_tensors
        g = (g * (vals > 0)).to(W_enc.dtype)
        omega = W_enc.shape[1]
        gb = torch.zeros(omega, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
        gW = None
        if ctx.needs_input_grad[2]:
            xc = xs - b_dec
            G = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (omega, xs.shape[0]), check_invariants=False)
            gW = torch.sparse.mm(G, xc).T.contiguous()
        gbdec = -(W_enc @ gb) if ctx.needs_input_grad[4] else None
        return None, None, gW, gb, gbdec, None, None


def _select(sae: BaseSAE, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the kept entries, sorted row-major."""
    B, omega = pre.shape
    if sae.sae_type == "top_k":
        cols = pre.topk(sae.k, dim=-1, sorted=False).indices.flatten()
        rows = torch.arange(B, device=pre.device).repeat_interleave(sae.k)
        return rows, cols
    n = min(sae.k * B, pre.numel())
    idx = batch_topk_indices(pre, n).sort().values
    return idx // omega, idx % omega


def batch_topk_indices(pre: torch.Tensor, n: int, sample_size: int = 65536, margin: float = 2.0) -> torch.Tensor:
    """Flat indices of the ``n`` largest entries of ``pre`` (exact, like ``flatten().topk``).

    Fast path: a strided sample gives a cut ``t`` expected to leave ~``margin·n`` entries above it;
    the exact top-n among the entries ``> t`` is the global top-n whenever at least n survive
    (checked; otherwise a full top-k runs)."""
    flat = pre.flatten()
    N = flat.numel()
    if N < 8 * sample_size or margin * n >= N / 4:
        return flat.topk(n, sorted=False).indices
    stride = max(1, N // sample_size)
    while math.gcd(stride, pre.shape[-1]) != 1:  # avoid sampling the same columns
        stride += 1
    sample = flat[::stride]
    rank = max(1, int(sample.numel() * (1.0 - margin * n / N)))
    t = sample.kthvalue(rank).values
    cand = (flat > t).nonzero().squeeze(1)
    if cand.numel() < n:
        return flat.topk(n, sorted=False).indices
    return cand[flat[cand].topk(n, sorted=False).indices]


def _bag_offsets(keys: torch.Tensor, n_bags: int) -> torch.Tensor:
    counts = torch.bincount(keys, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


def sae_loss(sae: BaseSAE, x: torch.Tensor, dead_mask: torch.Tensor | None = None, aux_alpha: float = 1 / 32,
             k_aux: int | None = None, l1_coeff: float = 1e-1, autocast: bool = False) -> dict[str, Any]:
    """Training loss of the reference trainer on raw inputs ``x`` (scaled by ``sae.input_scale``).

    Returns a dict with ``loss`` (differentiable), ``l2``, ``aux``, ``l0``, ``fired`` (bool [ω]),
    ``min_kept`` (smallest positive kept activation) and, for Matryoshka, ``prefix_l2``.
    """
    xs = x.to(sae.W_enc.dtype) * sae.input_scale
    B, omega = xs.shape[0], sae.dict_size
    if sae.sae_type == "relu":
        pre = F.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
        x_hat = pre @ sae.W_dec + sae.b_dec
        l2 = (xs - x_hat).pow(2).sum(-1).mean()
        l1 = pre.sum(-1).mean()
        fired = (pre > 0).any(0)
        return {"loss": l2 + l1_coeff * l1, "l2": l2.detach(), "aux": torch.zeros(()), "l1": l1.detach(),
                "l0": float((pre > 0).sum()) / B, "fired": fired, "min_kept": None}
    with torch.no_grad():
        with torch.autocast(device_type=xs.device.type, dtype=torch.bfloat16, enabled=autocast):
            pre = torch.addmm(sae.b_enc, xs - sae.b_dec, sae.W_enc).relu_()
        pre = pre.float()
        rows, cols = _select(sae, pre)
        vals = pre[rows, cols]
        pos = vals > 0
        fired = torch.zeros(omega, dtype=torch.bool, device=xs.device)
        fired[cols[pos]] = True
        min_kept = float(vals[pos].min()) if bool(pos.any()) else 0.0
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        aux_rows = aux_cols = None
        if n_dead > 0:
            ka = min(k_aux if k_aux is not None else sae.activation_dim // 2, n_dead)
            dead_idx = dead_mask.nonzero().flatten()
            sub = pre[:, dead_idx].topk(ka, dim=-1, sorted=False).indices
            aux_cols = dead_idx[sub].flatten()
            aux_rows = torch.arange(B, device=xs.device).repeat_interleave(ka)
    all_rows = rows if aux_rows is None else torch.cat([rows, aux_rows])
    all_cols = cols if aux_cols is None else torch.cat([cols, aux_cols])
    all_vals = pre[all_rows, all_cols]
    g_vals = _SparseEncoderGrad.apply(all_vals, xs.detach(), sae.W_enc, sae.b_enc, sae.b_dec, all_rows, all_cols)
    n_kept = rows.shape[0]
    kv = g_vals[:n_kept]
    out: dict[str, Any] = {"l0": float(pos.sum()) / B, "fired": fired, "min_kept": min_kept}
    if isinstance(sae, MatryoshkaBatchTopKSAE) and len(sae.group_sizes) > 1:
        G = len(sae.group_sizes)
        bounds = torch.tensor(sae.prefix_sizes, device=xs.device)
        gid = torch.bucketize(cols, bounds, right=True)
        keys = rows * G + gid
        order = keys.argsort(stable=True)
        contrib = F.embedding_bag(cols[order], sae.W_dec, _bag_offsets(keys[order], B * G),
                                  mode="sum", per_sample_weights=kv[order]).view(B, G, -1)
        recons = contrib.cumsum(1) + sae.b_dec
        prefix_l2 = (xs[:, None, :] - recons).pow(2).sum(-1).mean(0)
        l2 = prefix_l2.mean()  # equal weights w_m = 1/G
        x_hat = recons[:, -1]
        out["prefix_l2"] = prefix_l2.detach()
    else:
        x_hat = F.embedding_bag(cols, sae.W_dec, _bag_offsets(rows, B), mode="sum", per_sample_weights=kv) + sae.b_dec
        l2 = (xs - x_hat).pow(2).sum(-1).mean()
    aux = torch.zeros((), device=xs.device)
    if aux_rows is not None:
        resid = (xs - x_hat).detach()
        ka = aux_cols.shape[0] // B
        aux_rec = F.embedding_bag(aux_cols.view(B, ka), sae.W_dec, mode="sum", per_sample_weights=g_vals[n_kept:].view(B, ka))
        l2_aux = (resid - aux_rec).pow(2).sum(-1).mean()
        denom = (resid - resid.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        aux = (l2_aux / denom).nan_to_num(0.0)
    out.update(loss=l2 + aux_alpha * aux, l2=l2.detach(), aux=aux.detach())
    return out


def project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove from ``W_dec.grad`` the component parallel to each (unit) decoder row."""
    if W_dec.grad is None:
        return
    w = W_dec.data
    W_dec.grad -= (W_dec.grad * w).sum(1, keepdim=True) * w


# ----- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_sae(sae: BaseSAE, data, batch_size: int = 4096, device: str | torch.device = "cpu") -> dict[str, float]:
    """FVU, R² = 1 − FVU, L0 and fraction of latents never active on ``data`` (inference encoding);
    Matryoshka adds ``r2_prefix_<m>`` per nested prefix."""
    was_training = sae.training
    sae.eval()
    try:
        sums, sq, n, sse, l0, fired = None, None, 0, 0.0, 0.0, torch.zeros(sae.dict_size, dtype=torch.bool, device=device)
        prefix_sse = None
        for b in _iter_eval(data, batch_size):
            x = torch.as_tensor(b).float().to(device)
            f = sae.encode(x)
            if isinstance(sae, MatryoshkaBatchTopKSAE):
                recs = sae.decode_prefixes(f)
                x_hat = recs[-1]
                pe = torch.stack([(x - r).double().pow(2).sum() for r in recs])
                prefix_sse = pe if prefix_sse is None else prefix_sse + pe
            else:
                x_hat = sae.decode(f)
            sse += float((x - x_hat).double().pow(2).sum())
            xd = x.double()
            sums = xd.sum(0) if sums is None else sums + xd.sum(0)
            sq = xd.pow(2).sum() if sq is None else sq + xd.pow(2).sum()
            n += x.shape[0]
            l0 += float((f != 0).sum())
            fired |= (f != 0).any(0)
        if n == 0:
            raise ValueError("validation data is empty")
        tss = float(sq - sums.pow(2).sum() / n)
        fvu = sse / tss if tss > 0 else float("nan")
        out = {"fvu": fvu, "r2": 1.0 - fvu, "l0": l0 / n, "dead_frac_val": float((~fired).float().mean())}
        if prefix_sse is not None:
            for m, e in zip(sae.prefix_sizes, prefix_sse.tolist()):
                out[f"r2_prefix_{m}"] = 1.0 - e / tss if tss > 0 else float("nan")
        return out
    finally:
        sae.train(was_training)


# ----- checkpoints -----------------------------------------------------------------------------

# ----- trainer ---------------------------------------------------------------------------------

def _validate(sae_type, expansion, k, group_fractions, steps, batch_size, d):
    if sae_type not in SAE_TYPES:
        raise ValueError(f"unknown sae_type {sae_type!r}; valid: {', '.join(SAE_TYPES)}")
    if not (isinstance(expansion, (int, float)) and expansion > 0):
        raise ValueError(f"expansion must be > 0, got {expansion!r}")
    dict_size = int(round(expansion * d))
    if dict_size < 1:
        raise ValueError(f"expansion {expansion} × d={d} gives an empty dictionary")
    if sae_type != "relu" and not (isinstance(k, int) and 1 <= k <= dict_size):
        raise ValueError(f"k must be an integer in [1, dict_size={dict_size}], got {k!r}")
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    group_sizes = None
    if sae_type == "matryoshka_batch_top_k":
        group_sizes = group_sizes_from_fractions(group_fractions or DEFAULT_GROUP_FRACTIONS, dict_size)
    elif group_fractions is not None:
        raise ValueError(f"group_fractions only apply to 'matryoshka_batch_top_k', not {sae_type!r}")
    return dict_size, group_sizes


def train_sae(data, sae_type: str = "batch_top_k", expansion: float = 8, k: int = 20,
              group_fractions: list[float] | None = None, steps: int = 1000, batch_size: int = 4096,
              lr: float | None = None, seed: int = 0, device: str = "cpu", val_data=None,
              eval_every: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int | None = None, progress: bool = True, warmup_steps: int | None = None,
              decay_start: int | None = None, threshold_start_step: int | None = None,
              threshold_beta: float = 0.999, dead_tokens: int = 10_000_000, aux_alpha: float = 1 / 32,
              k_aux: int | None = None, l1_coeff: float = 1e-1, grad_clip: float = 1.0,
              resume: bool = True, stop_after: int | None = None) -> tuple[BaseSAE, pd.DataFrame]:
    """Train an SAE of ``sae_type`` on ``data`` (tensor [N, d] or ActivationStore); return (sae, history).

    ``history`` has one row per evaluation (every ``eval_every`` steps and at the end): step, lr,
    loss, l2, aux, train L0, dead fraction (no firing within ``dead_tokens`` tokens), threshold
    and, with ``val_data``, val FVU/R²/L0 (+ per-prefix R² for Matryoshka). With ``checkpoint_dir``,
    resumable checkpoints are written atomically; a rerun resumes and ends identically.
    ``stop_after`` stops early after that many total steps (for tests / interrupted runs).
    """
    from tqdm.auto import tqdm

    d = _data_dim(data)
    dict_size, group_sizes = _validate(sae_type, expansion, k, group_fractions, steps, batch_size, d)
    if val_data is not None:
        vd = _data_dim(val_data)
        if vd != d:
            raise ValueError(f"val_data has dim {vd}, training data has dim {d}")
        if isinstance(val_data, torch.Tensor):
            _check_finite(val_data, "validation data")
    n_rows = len(data)
    if n_rows < 1:
        raise ValueError("training data is empty")
    steps, batch_size = int(steps), int(batch_size)
    lr = default_lr(dict_size) if lr is None else float(lr)
    warmup_steps = min(1000, max(1, steps // 20)) if warmup_steps is None else int(warmup_steps)
    decay_start = int(0.8 * steps) if decay_start is None else decay_start
    threshold_start_step = min(1000, steps // 4) if threshold_start_step is None else int(threshold_start_step)
    eval_every = max(1, steps // 20) if eval_every is None else int(eval_every)
    checkpoint_every = eval_every if checkpoint_every is None else int(checkpoint_every)
    dev = torch.device(device)
    autocast = dev.type == "cuda"

    batches = _Batches(data, batch_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = make_sae(sae_type, d, dict_size, k if sae_type != "relu" else None, group_sizes)
    sae.to(dev).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, steps, warmup_steps, decay_start))
    since_fired = torch.zeros(dict_size, dtype=torch.long, device=dev)
    history: list[dict] = []
    start = 0
    run_cfg = {"sae_type": sae_type, "activation_dim": d, "dict_size": dict_size, "k": k, "group_sizes": group_sizes,
               "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    if ckpt_path is not None and resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config"] != run_cfg:
            diff = {kk: (ck["config"].get(kk), v) for kk, v in run_cfg.items() if ck["config"].get(kk) != v}
            raise ValueError(f"checkpoint {ckpt_path} was written with different settings (checkpoint, now): {diff}")
        sae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        since_fired = ck["since_fired"].to(dev)
        batches.load_state(ck["batches"])
        history = list(ck["history"])
        start = int(ck["step"])
    else:
        # input normalisation and geometric-median b_dec from the first batch
        scale = estimate_input_scale(data, batch_size=batch_size)
        first = _Batches(data, batch_size, seed).next()
        with torch.no_grad():
            sae.input_scale.fill_(scale)
            sae.b_dec.copy_(geometric_median(first * scale).to(dev))

    def save_ckpt(step: int) -> None:
        if ckpt_path is None:
            return
        atomic_torch_save({"config": run_cfg, "step": step, "model": sae.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "since_fired": since_fired.cpu(),
                            "batches": batches.state(), "history": history}, ckpt_path)

    end = steps if stop_after is None else min(steps, int(stop_after))
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"{sae_type} ε={expansion}")
    last: dict[str, Any] = {}
    for step in range(start, end):
        x = batches.next().to(dev, non_blocking=True)
        dead = since_fired >= dead_tokens if sae_type != "relu" else None
        out = sae_loss(sae, x, dead_mask=dead, aux_alpha=aux_alpha, k_aux=k_aux, l1_coeff=l1_coeff, autocast=autocast)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        project_decoder_grad(sae.W_dec)
        if grad_clip is not None and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
        opt.step()
        sched.step()
        sae.normalize_decoder()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out["fired"]] = 0
            if sae.uses_threshold and step >= threshold_start_step and out["min_kept"] is not None:
                mk = out["min_kept"]
                th = float(sae.threshold)
                sae.threshold.fill_(mk if th < 0 else threshold_beta * th + (1 - threshold_beta) * mk)
        last = {"loss": float(out["loss"].detach()), "l2": float(out["l2"]), "aux": float(out["aux"]), "l0": out["l0"]}
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"training diverged at step {step + 1}: loss={last['loss']}")
        done = step + 1
        if done % 10 == 0 or done == end:
            bar.set_postfix(loss=f"{last['loss']:.4g}", L0=f"{last['l0']:.1f}", refresh=False)
        bar.update(1)
        if done % eval_every == 0 or done == steps:
            row = {"step": done, "lr": opt.param_groups[0]["lr"], **last,
                   "dead_frac": float((since_fired >= dead_tokens).float().mean()),
                   "threshold": float(sae.threshold)}
            if val_data is not None:
                row.update({f"val_{kk}": v for kk, v in evaluate_sae(sae, val_data, batch_size, dev).items()})
            history.append(row)
        if ckpt_path is not None and (done % checkpoint_every == 0 or done == end):
            save_ckpt(done)
    bar.close()
    sae.eval()
    return sae, pd.DataFrame(history)


# ----- grids of SAEs (notebook 02 and sweeps) ---------------------------------------------------

SAE_LABELS = {"batch_top_k": "BatchTopK", "matryoshka_batch_top_k": "Matryoshka", "top_k": "TopK", "relu": "ReLU"}


def run_name(sae_type: str, expansion: float, k: int) -> str:
    """Folder name of one trained SAE, e.g. ``matryoshka_batch_top_k_x4_k20``."""
    return f"{sae_type}_x{expansion:g}_k{k}"


def train_grid(train_data, val_data, sae_types: list[str], expansions: list[float], out_dir: str | os.PathLike,
               **train_kwargs) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train every (SAE type × expansion) on the same data, save each SAE and its history under
    ``out_dir/<run_name>/``, and return a results table (R², L0, dead %) and the histories."""
    from .sae import save_sae

    if not sae_types or not expansions:
        raise ValueError("sae_types and expansions must each list at least one value")
    unknown = [t for t in sae_types if t not in SAE_TYPES]
    if unknown:
        raise ValueError(f"unknown sae_types {unknown}; valid: {', '.join(SAE_TYPES)}")
    out = Path(out_dir)
    k = train_kwargs.get("k", 20)
    rows, histories = [], {}
    for sae_type in sae_types:
        kwargs = dict(train_kwargs)
        if sae_type != "matryoshka_batch_top_k":
            kwargs.pop("group_fractions", None)
        for expansion in expansions:
            name = run_name(sae_type, expansion, k)
            sae, history = train_sae(train_data, sae_type, expansion, val_data=val_data,
                                     checkpoint_dir=out / name / "checkpoint", **kwargs)
            save_sae(sae, out / name)
            history.to_csv(out / name / "history.csv", index=False)
            final = evaluate_sae(sae, val_data if val_data is not None else train_data)
            rows.append({"SAE": SAE_LABELS[sae_type], "sae_type": sae_type, "expansion": expansion,
                         "latents": sae.dict_size, "k": k, "R² %": 100 * final["r2"], "L0": final["l0"],
                         "dead %": 100 * final.get("dead_frac_val", float("nan")), "path": str(out / name)})
            histories[name] = history
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    return results, histories
