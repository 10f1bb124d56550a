"""Tests of vlmsae_utils.train: sparse-gradient loss vs dense autograd, training tricks, determinism, resume."""
from __future__ import annotations

import math

import pytest
import torch

from vlmsae_utils.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from vlmsae_utils.train import (evaluate_sae, geometric_median, group_sizes_from_fractions, lr_lambda,
                                project_decoder_grad, sae_loss, train_sae)

D, W = 16, 48


def _planted(n, d=64, n_atoms=128, active=3, seed=0, noise=0.01):
    """Inputs = sparse non-negative combinations of known unit atoms + noise."""
    g = torch.Generator().manual_seed(1234)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :active]
    coef = torch.rand(n, active, generator=g) + 0.5
    x = (coef[:, :, None] * atoms[idx]).sum(1) + noise * torch.randn(n, d, generator=g)
    return x, atoms


def _rand_sae(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_enc.add_(0.2)
        sae.input_scale.fill_(0.8)
    return sae


def _dense_reference_loss(sae, x, dead, k_aux, alpha):
    """Brute-force loss of the reference trainer with dense autograd (no sparse tricks)."""
    xs = x * sae.input_scale
    z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    B = x.shape[0]
    if sae.sae_type == "top_k":
        keep = torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(sae.k, dim=1).indices, True)
    else:
        flat = torch.zeros(z.numel(), dtype=torch.bool)
        flat[z.detach().flatten().topk(sae.k * B).indices] = True
        keep = flat.view_as(z)
    f = z * keep
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        losses = [(xs - (sae.b_dec + f[:, :m] @ sae.W_dec[:m])).pow(2).sum(-1).mean() for m in sae.prefix_sizes]
        l2 = sum(losses) / len(losses)
    else:
        l2 = (xs - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    x_hat = f @ sae.W_dec + sae.b_dec
    aux = torch.zeros(())
    if dead is not None and dead.any():
        ka = min(k_aux, int(dead.sum()))
        masked = torch.where(dead[None], z, torch.tensor(-math.inf))
        top = masked.topk(ka, dim=1)
        a = torch.zeros_like(z).scatter(1, top.indices, top.values)
        r = (xs - x_hat).detach()
        aux = (r - a @ sae.W_dec).pow(2).sum(-1).mean() / (r - r.mean(0)).pow(2).sum(-1).mean()
    return l2 + alpha * aux


@pytest.mark.parametrize("kind", ["batch_top_k", "matryoshka_batch_top_k", "top_k"])
def test_sparse_loss_and_grads_equal_dense_reference(kind):
    torch.manual_seed(0)
    if kind == "matryoshka_batch_top_k":
        sae = MatryoshkaBatchTopKSAE(D, W, k=4, group_sizes=[6, 10, 32])
    elif kind == "top_k":
        sae = TopKSAE(D, W, k=4)
    else:
        sae = BatchTopKSAE(D, W, k=4)
    _rand_sae(sae)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(W, dtype=torch.bool)
    dead[::3] = True
    out = sae_loss(sae, x, dead_mask=dead, k_aux=5, aux_alpha=0.5)
    grads = torch.autograd.grad(out["loss"], [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    ref = _dense_reference_loss(sae, x, dead, 5, 0.5)
    ref_grads = torch.autograd.grad(ref, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    assert float(out["aux"]) > 0
    torch.testing.assert_close(out["loss"], ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_matryoshka_loss_is_sum_of_prefix_errors():
    sae = _rand_sae(MatryoshkaBatchTopKSAE(D, W, k=3, group_sizes=[4, 12, 32]), seed=2)
    x = torch.randn(8, D)
    out = sae_loss(sae, x)
    with torch.no_grad():
        xs = x * 0.8
        z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
        keep = torch.zeros(z.numel())
        keep[z.flatten().topk(24).indices] = 1
        f = z * keep.view_as(z)
        brute = [float(((xs[i] - sae.b_dec - f[i, :m] @ sae.W_dec[:m]) ** 2).sum()) for m in (4, 16, 48) for i in range(8)]
    assert float(out["loss"].detach()) == pytest.approx(sum(brute) / 8 / 3, rel=1e-5)
    assert out["prefix_l2"].shape == (3,)


def test_gradient_projection_orthogonal_and_unit_norm_after_steps():
    W_dec = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(W, D), dim=1))
    W_dec.grad = torch.randn(W, D)
    project_decoder_grad(W_dec)
    assert float((W_dec.grad * W_dec.data).sum(1).abs().max()) < 1e-5
    x, _ = _planted(1024, d=D, n_atoms=W)
    sae, _ = train_sae(x, "batch_top_k", expansion=2, k=3, steps=15, batch_size=128, lr=1e-2, progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(2 * D), atol=1e-5, rtol=0)


def test_geometric_median_and_schedule():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts, max_iter=500, tol=1e-9)
    # brute force: grid search of the sum of distances
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.5, 1.5, 401), torch.linspace(-0.5, 1.5, 401), indexing="ij"), -1)
    cost = (grid.view(-1, 1, 2) - pts).norm(dim=-1).sum(-1)
    best = grid.view(-1, 2)[cost.argmin()]
    assert float((gm - best).norm()) < 0.02
    assert lr_lambda(0, 100, 10, 80) == pytest.approx(0.1)
    assert lr_lambda(50, 100, 10, 80) == 1.0
    assert lr_lambda(90, 100, 10, 80) == pytest.approx(0.5)
    assert group_sizes_from_fractions([0.0625, 0.125, 0.25, 0.5625], 6144) == [384, 768, 1536, 3456]


def test_threshold_ema_follows_definition():
    x, _ = _planted(512, d=D, n_atoms=W, seed=3)
    beta, bs, steps = 0.5, 64, 4
    sae, _ = train_sae(x, "batch_top_k", expansion=2, k=3, steps=steps, batch_size=bs, lr=0.0, seed=7,
                       threshold_start_step=1, threshold_beta=beta, progress=False)
    g = torch.Generator().manual_seed(7)
    theta = -1.0
    for step in range(steps):
        b = x[torch.randint(x.shape[0], (bs,), generator=g)]
        if step < 1:
            continue
        with torch.no_grad():
            f = sae.encode(b, use_threshold=False)
        m = float(f[f > 0].min())
        theta = m if theta < 0 else beta * theta + (1 - beta) * m
    assert float(sae.threshold) == pytest.approx(theta, rel=1e-5)


def test_planted_atoms_recovered_and_r2():
    x, atoms = _planted(8192)
    val, _ = _planted(1024, seed=1)
    sae, hist = train_sae(x, "batch_top_k", expansion=4, k=3, steps=300, batch_size=256, lr=1e-2, val_data=val,
                          eval_every=150, dead_tokens=5000, progress=False)
    assert hist["val_r2"].iloc[-1] > 0.9
    assert list(hist["step"]) == [150, 300]
    best_cos = (atoms @ sae.W_dec.detach().T).max(dim=1).values.mean()
    assert float(best_cos) > 0.95
    # input normalisation: unit mean squared norm
    assert float((x * sae.input_scale).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-3)
    ev = evaluate_sae(sae, val)
    assert ev["r2"] == pytest.approx(hist["val_r2"].iloc[-1], rel=1e-6)


def test_matryoshka_prefix_r2_increases():
    x, _ = _planted(4096)
    val, _ = _planted(1024, seed=1)
    sae, hist = train_sae(x, "matryoshka_batch_top_k", expansion=2, k=3, group_fractions=[0.125, 0.25, 0.625],
                          steps=120, batch_size=256, lr=3e-3, val_data=val, eval_every=120, progress=False)
    assert sae.group_sizes == [16, 32, 80]
    r2 = [hist[f"val_r2_prefix_{m}"].iloc[-1] for m in (16, 48, 128)]
    assert r2[0] < r2[1] < r2[2]
    assert r2[2] == pytest.approx(hist["val_r2"].iloc[-1])


def test_same_seed_same_weights_and_different_seed_differs():
    x, _ = _planted(2048, d=D, n_atoms=W)
    kw = dict(expansion=2, k=3, steps=20, batch_size=128, progress=False)
    a, ha = train_sae(x, "matryoshka_batch_top_k", seed=1, group_fractions=[0.25, 0.75], **kw)
    b, hb = train_sae(x, "matryoshka_batch_top_k", seed=1, group_fractions=[0.25, 0.75], **kw)
    c, _ = train_sae(x, "matryoshka_batch_top_k", seed=2, group_fractions=[0.25, 0.75], **kw)
    for n, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[n]), n
    assert not torch.equal(a.W_dec, c.W_dec)
    assert ha.equals(hb)


def test_resume_equals_uninterrupted(tmp_path):
    x, _ = _planted(2048, d=D, n_atoms=W)
    val, _ = _planted(256, d=D, n_atoms=W, seed=1)
    kw = dict(expansion=2, k=3, steps=30, batch_size=64, val_data=val, eval_every=10, progress=False,
              dead_tokens=300, threshold_start_step=5)
    full, hf = train_sae(x, "batch_top_k", **kw)
    part, _ = train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, stop_after=13, **kw)
    assert (tmp_path / "checkpoint.pt").is_file()
    res, hr = train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **kw)
    for n, t in full.state_dict().items():
        assert torch.equal(t, res.state_dict()[n]), n
    assert hf.equals(hr)
    with pytest.raises(ValueError, match="different settings"):
        train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **{**kw, "k": 4})
    with pytest.raises(ValueError, match="different settings"):
        train_sae(x[:, :-1], "batch_top_k", checkpoint_dir=tmp_path, **{**kw, "val_data": val[:, :-1]})


class _FakeStore:
    """Duck-typed ActivationStore."""

    def __init__(self, x):
        self.x, self.dim = x, x.shape[1]

    def __len__(self):
        return self.x.shape[0]

    def to_tensor(self, dtype=torch.float32):
        return self.x.to(dtype)

    def iter_batches(self, batch_size, shuffle=False, seed=0):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.x[order[i:i + batch_size]]


def test_store_input_and_resume(tmp_path):
    x, _ = _planted(300, d=D, n_atoms=W)
    store, val = _FakeStore(x), _FakeStore(x[:100])
    kw = dict(expansion=2, k=3, steps=12, batch_size=64, val_data=val, eval_every=4, progress=False)
    full, hf = train_sae(store, "top_k", **kw)
    train_sae(store, "top_k", checkpoint_dir=tmp_path, stop_after=7, **kw)
    res, hr = train_sae(store, "top_k", checkpoint_dir=tmp_path, **kw)
    assert torch.equal(full.W_dec, res.W_dec) and hf.equals(hr)
    assert {"val_r2", "val_l0", "dead_frac"} <= set(hf.columns)


def test_bad_parameters_raise():
    x, _ = _planted(256, d=D, n_atoms=W)
    kw = dict(steps=2, batch_size=32, progress=False)
    with pytest.raises(ValueError, match="unknown sae_type"):
        train_sae(x, "gated", 2, **kw)
    with pytest.raises(ValueError, match="k must"):
        train_sae(x, "batch_top_k", 2, k=0, **kw)
    with pytest.raises(ValueError, match="k must"):
        train_sae(x, "top_k", 2, k=2 * D + 1, **kw)
    with pytest.raises(ValueError, match="expansion"):
        train_sae(x, "batch_top_k", 0, **kw)
    with pytest.raises(ValueError, match="sum to 1"):
        train_sae(x, "matryoshka_batch_top_k", 2, k=3, group_fractions=[0.5, 0.4], **kw)
    with pytest.raises(ValueError, match="empty group"):
        train_sae(x, "matryoshka_batch_top_k", 2, k=3, group_fractions=[0.001, 0.999], **kw)
    with pytest.raises(ValueError, match="dim"):
        train_sae(x, "batch_top_k", 2, k=3, val_data=x[:, :-1], **kw)
    bad = x.clone()
    bad[17, 3] = float("nan")
    bad[40, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\[17, 40\]"):
        train_sae(bad, "batch_top_k", 2, k=3, **kw)
    with pytest.raises(ValueError, match="only apply"):
        train_sae(x, "top_k", 2, k=3, group_fractions=[1.0], **kw)


def test_fast_batch_topk_indices_exact():
    from vlmsae_utils.train import batch_topk_indices

    g = torch.Generator().manual_seed(0)
    for shape, n in [((512, 1536), 512 * 5), ((256, 2048), 256 * 20), ((600, 1000), 300)]:
        pre = torch.relu(torch.randn(shape, generator=g))
        got = batch_topk_indices(pre, n)
        ref = pre.flatten().topk(n).indices
        assert torch.equal(got.sort().values, ref.sort().values)
    pre = torch.zeros(512, 1536)
    pre[0, :10] = 1.0  # fewer positives than n: fallback path
    assert batch_topk_indices(pre, 100).numel() == 100
