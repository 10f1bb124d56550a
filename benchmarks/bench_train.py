"""Training speed of our Matryoshka BatchTopK trainer vs a dense baseline of the reference loop.

The baseline mimics dictionary_learning's ``MatryoshkaBatchTopKTrainer.update``: dense encoder
with autograd, batch top-k by scatter into a dense [B, ω] tensor, a Python loop over groups with
dense chunk matmuls, dense auxiliary-K loss, gradient projection, clipping, Adam, decoder
renormalisation, threshold EMA. Both run on the same data, threads and hardware in one run.

Usage: ``python benchmarks/bench_train.py [--d 768] [--expansion 8] [--batch 4096] [--k 20]
[--steps 3] [--threads 1] [--recovery]``; prints steps/s and the ratio.

``--profile`` instead times the real training step (``train.loop._training_step``) against one
encoder GEMM ``[B, d] x [d, ω]`` measured alternately in the same process, and splits one step
into its named sections (``step.*`` ranges: encoder GEMM, selection, aux-K, decode + loss,
backward, projection, optimiser, normalisation, bookkeeping) with ``torch.profiler``. E.g. the
paper's shape: ``--profile --d 1024 --expansion 64 --batch 4096 --k 20 --threads 2``;
``--dead-fraction 0.1`` marks a tenth of the latents dead so the aux-K loss runs.

``--dl-site DIR`` also times dictionary_learning's own ``MatryoshkaBatchTopKTrainer.update`` (the
authors' trainer) on the same batches: install it outside the project, e.g.
``pip install --no-deps --target DIR dictionary_learning==0.1.0 einops``; it is never a dependency.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
import types
from pathlib import Path

import torch

from vlmsae_utils.train import DEFAULT_GROUP_FRACTIONS, default_lr, group_sizes_from_fractions, loop, train_sae

STEP_SECTIONS = (
    "step.encoder_gemm",
    "step.select",
    "step.aux_select",
    "step.decode_loss",
    "step.backward",
    "step.project_grad",
    "step.optimizer",
    "step.normalize_decoder",
    "step.bookkeeping",
)


class NaiveMatryoshka(torch.nn.Module):
    """Dense reference formulation (dictionary_learning layout W_enc [d, ω], W_dec [ω, d])."""

    def __init__(self, d: int, w: int, k: int, group_sizes: list[int]):
        super().__init__()
        W_dec = torch.nn.functional.normalize(torch.randn(w, d), dim=1)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(w))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k, self.group_sizes = k, group_sizes
        self.threshold = -1.0

    def encode(self, x):
        post_relu = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        flat = post_relu.flatten()
        top = flat.topk(self.k * x.size(0), sorted=False, dim=-1)
        f = torch.zeros_like(flat).scatter_(-1, top.indices, top.values).reshape(post_relu.shape)
        return f, post_relu


def naive_update(ae, opt, sched, x, since_fired, dead_tokens=10_000_000, k_aux=None, alpha=1 / 32):
    """One step of the reference loop (dense, per-group Python loop)."""
    f, post_relu = ae.encode(x)
    W_chunks = torch.split(ae.W_dec, ae.group_sizes, dim=0)
    f_chunks = torch.split(f, ae.group_sizes, dim=1)
    x_rec = torch.zeros_like(x) + ae.b_dec
    total = 0.0
    for Wc, fc in zip(W_chunks, f_chunks):
        x_rec = x_rec + fc @ Wc
        total = total + (x - x_rec).pow(2).sum(dim=-1).mean() / len(ae.group_sizes)
    active = f.sum(0) > 0
    since_fired += x.size(0)
    since_fired[active] = 0
    dead = since_fired >= dead_tokens
    aux = torch.zeros(())
    if dead.any():
        ka = min(k_aux or x.shape[1] // 2, int(dead.sum()))
        lat = torch.where(dead[None], post_relu, -torch.inf)
        acts, idx = lat.topk(ka, sorted=False)
        buf = torch.zeros_like(post_relu).scatter_(-1, idx, acts)
        r = (x - x_rec).detach()
        aux = ((r - buf @ ae.W_dec).pow(2).sum(-1).mean() / (r - r.mean(0)).pow(2).sum(-1).mean()).nan_to_num(0.0)
    loss = total + alpha * aux
    loss.backward()
    with torch.no_grad():
        ae.W_dec.grad -= (ae.W_dec.grad * ae.W_dec).sum(1, keepdim=True) * ae.W_dec
    torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    with torch.no_grad():
        ae.W_dec /= ae.W_dec.norm(dim=1, keepdim=True)
        pos = f[f > 0]
        m = float(pos.min()) if pos.numel() else 0.0
        ae.threshold = m if ae.threshold < 0 else 0.999 * ae.threshold + 0.001 * m
    return float(loss.detach())


def bench_naive(x, d, w, k, group_sizes, batch, steps, seed=0):
    torch.manual_seed(seed)
    ae = NaiveMatryoshka(d, w, k, group_sizes)
    opt = torch.optim.Adam(ae.parameters(), lr=default_lr(w), betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1000))
    since = torch.zeros(w, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(float(x.pow(2).sum(1).mean()))
    naive_update(ae, opt, sched, x[torch.randint(len(x), (batch,), generator=g)] * scale, since)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        naive_update(ae, opt, sched, x[torch.randint(len(x), (batch,), generator=g)] * scale, since)
    return steps / (time.perf_counter() - t)


def bench_ours(x, d, expansion, k, batch, steps, seed=0):
    kw = dict(
        sae_type="matryoshka_batch_top_k",
        expansion=expansion,
        k=k,
        group_fractions=list(DEFAULT_GROUP_FRACTIONS),
        batch_size=batch,
        seed=seed,
        progress=False,
        eval_every=10**9,
        device="cpu",
    )  # baseline is CPU-only
    train_sae(x, steps=1, **kw)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    train_sae(x, steps=1, **kw)
    setup_and_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_sae(x, steps=steps + 1, **kw)
    total = time.perf_counter() - t0
    per_step = max(1e-9, (total - setup_and_one) / steps)
    return 1.0 / per_step, total


def _dl_trainer_class(site: str):
    """dictionary_learning's Matryoshka trainer from ``site``, loading only its trainer modules (its
    package ``__init__`` imports an activation buffer that needs nnsight)."""
    sys.path.insert(0, site)
    for name in ("dictionary_learning", "dictionary_learning.trainers"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(site, *name.split(".")))]
        sys.modules[name] = pkg
    module = importlib.import_module("dictionary_learning.trainers.matryoshka_batch_top_k")
    return module.MatryoshkaBatchTopKTrainer


def bench_dictionary_learning(x, d, expansion, k, batch, steps, site, seed=0):
    """Steps/s of dictionary_learning's ``MatryoshkaBatchTopKTrainer.update`` (CPU) on random batches of ``x``."""
    trainer = _dl_trainer_class(site)(
        steps=10**6,
        activation_dim=d,
        dict_size=d * expansion,
        k=k,
        layer=0,
        lm_name="bench",
        group_fractions=list(DEFAULT_GROUP_FRACTIONS),
        device="cpu",
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed)
    trainer.update(0, x[torch.randint(len(x), (batch,), generator=g)])  # warm-up (and its geometric median)
    t = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.update(step, x[torch.randint(len(x), (batch,), generator=g)])
    return steps / (time.perf_counter() - t)


def planted_recovery(steps=600, d=128, n_atoms=256, active=4, expansion=4, k=4, seed=0):
    """Mean over true atoms of the best cosine with a learned decoder row (BatchTopK)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    n = 32768
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    x = ((torch.rand(n, active, generator=g) + 0.5)[:, :, None] * atoms[idx]).sum(1) + 0.01 * torch.randn(
        n, d, generator=g
    )
    sae, hist = train_sae(
        x,
        "batch_top_k",
        expansion=expansion,
        k=k,
        steps=steps,
        batch_size=1024,
        lr=1e-2,
        val_data=x[:4096],
        eval_every=steps,
        dead_tokens=50_000,
        progress=False,
        seed=seed,
        device="cpu",
    )
    cos = (atoms @ sae.W_dec.detach().T).max(1).values.mean()
    return float(cos), float(hist["val_r2"].iloc[-1])


def _profiled_state(d: int, expansion: int, batch: int, k: int, dead_fraction: float, device: str, autocast: bool):
    """A fresh Matryoshka training state (the package's own), its resolved settings and one batch."""
    cfg = loop.make_config(
        "matryoshka_batch_top_k",
        expansion,
        k=k,
        batch_size=batch,
        steps=10**6,
        dead_tokens=10**9,
        eval_every=10**9,
        autocast=autocast,
    )
    dev = torch.device(device)
    dict_size, group_sizes = cfg.sizes(d)
    res = loop._resolve(cfg, dict_size, dev)
    state = loop._new_state(cfg, d, dict_size, group_sizes, res, dev)
    x = (torch.randn(batch, d, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.0).to(dev)
    state.sae.input_scale.fill_(1.0 / math.sqrt(float(x.pow(2).sum(1).mean())))
    n_dead = int(dead_fraction * dict_size)
    state.since_fired[dict_size - n_dead :] = cfg.dead_tokens  # the last latents count as dead
    return state, cfg, res, x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(d, expansion, batch, k, steps, dead_fraction=0.0, device="cpu", autocast=False) -> dict[str, float]:
    """Seconds per training step and per encoder GEMM (medians, measured alternately; both in bf16
    with ``autocast`` on CUDA), and each section's share of one profiled step; prints the table and
    returns the figures."""
    from torch.profiler import ProfilerActivity, profile

    state, cfg, res, x = _profiled_state(d, expansion, batch, k, dead_fraction, device, autocast)
    sae, dev = state.sae, x.device
    xs = (x * sae.input_scale - sae.b_dec).detach()

    def gemm() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=res.autocast):
            torch.addmm(sae.b_enc.detach(), xs, sae.W_enc.detach())

    def step() -> None:
        loop._training_step(state, x, 0, cfg, res)

    times: dict[str, list[float]] = {"gemm": [], "step": []}
    for i in range(steps + 1):  # the first round warms both up
        for name, fn in (("gemm", gemm), ("step", step)):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i:
                times[name].append(time.perf_counter() - t0)
    t_gemm, t_step = (sorted(times[n])[len(times[n]) // 2] for n in ("gemm", "step"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(dev)
    device_time = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
    totals = {e.key: getattr(e, device_time) / 1e6 for e in prof.key_averages() if e.key in STEP_SECTIONS}
    profiled = sum(totals.values())
    print(f"one step {t_step:.3f} s = {t_step / t_gemm:.2f}x one encoder GEMM ({t_gemm:.3f} s) on {dev}")
    print(f"{'section':26s} {'s (profiled)':>12s} {'share':>7s} {'x GEMM':>7s}")
    for name in STEP_SECTIONS:
        sec = totals.get(name, 0.0)
        print(f"{name:26s} {sec:12.3f} {sec / max(profiled, 1e-12):7.1%} {sec / t_gemm:7.2f}")
    return {"step_s": t_step, "gemm_s": t_gemm, **totals}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recovery", action="store_true", help="also run the planted-atom recovery check")
    ap.add_argument("--profile", action="store_true", help="time the real step against one GEMM, by section")
    ap.add_argument("--dead-fraction", type=float, default=0.0, help="with --profile: latents counted dead")
    ap.add_argument("--dl-site", help="folder holding dictionary_learning 0.1.0 (+ einops): time it too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.profile:
        print(f"Matryoshka step d={a.d} ε={a.expansion} B={a.batch} k={a.k} threads={torch.get_num_threads()}")
        profile_step(a.d, a.expansion, a.batch, a.k, a.steps, a.dead_fraction)
        return
    w = a.d * a.expansion
    gs = group_sizes_from_fractions(DEFAULT_GROUP_FRACTIONS, w)
    x = torch.randn(4 * a.batch, a.d, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.0
    print(
        f"Matryoshka BatchTopK d={a.d} ω={w} (ε={a.expansion}) B={a.batch} k={a.k} groups={gs} "
        f"threads={torch.get_num_threads()} steps={a.steps}"
    )
    naive = bench_naive(x, a.d, w, a.k, gs, a.batch, a.steps)
    print(f"baseline (dense, per-group loop): {naive:.3f} steps/s")
    ours, _ = bench_ours(x, a.d, a.expansion, a.k, a.batch, a.steps)
    print(f"ours (train_sae, sparse grads):   {ours:.3f} steps/s")
    print(f"speed-up: {ours / naive:.2f}x")
    if a.dl_site:
        dl = bench_dictionary_learning(x, a.d, a.expansion, a.k, a.batch, a.steps, a.dl_site)
        print(f"dictionary_learning 0.1.0 update: {dl:.3f} steps/s; ours {ours / dl:.2f}x faster")
    if a.recovery:
        t = time.perf_counter()
        cos, r2 = planted_recovery()
        print(
            f"planted recovery (BatchTopK, d=128, 256 atoms, 4 active, ε=4, 600 steps): "
            f"mean best cosine {cos:.4f}, val R² {r2:.4f} ({time.perf_counter() - t:.1f}s)"
        )


if __name__ == "__main__":
    main()
