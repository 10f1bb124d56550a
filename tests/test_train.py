"""Tests of vlmsae_utils.train: sparse-gradient loss vs dense autograd, training tricks, determinism, resume."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import TensorStore, write_store

from vlmsae_utils.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from vlmsae_utils.train import (
    DECAY_LAST_20PCT,
    data_fingerprint,
    dead_after_batch,
    evaluate_sae,
    geometric_median,
    group_sizes_from_fractions,
    lr_lambda,
    project_decoder_grad,
    resolve_decay_start,
    sae_loss,
    train_sae,
    training_batch_rows,
)

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
        l2 = sum(losses) / len(losses) ** 2  # dictionary_learning: weight 1/G, then mean over G
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


def test_matryoshka_loss_is_weighted_sum_of_prefix_errors():
    sae = _rand_sae(MatryoshkaBatchTopKSAE(D, W, k=3, group_sizes=[4, 12, 32]), seed=2)
    x = torch.randn(8, D)
    out = sae_loss(sae, x)
    with torch.no_grad():
        xs = x * 0.8
        z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
        keep = torch.zeros(z.numel())
        keep[z.flatten().topk(24).indices] = 1
        f = z * keep.view_as(z)
        brute = [
            float(((xs[i] - sae.b_dec - f[i, :m] @ sae.W_dec[:m]) ** 2).sum()) for m in (4, 16, 48) for i in range(8)
        ]
    assert float(out["loss"].detach()) == pytest.approx(sum(brute) / 8 / 3**2, rel=1e-5)
    assert out["prefix_l2"].shape == (3,)
    assert float(out["prefix_l2"].sum()) == pytest.approx(sum(brute) / 8, rel=1e-5)


def test_matryoshka_loss_and_grads_match_dictionary_learning_weighting():
    """dictionary_learning's MatryoshkaBatchTopKTrainer.loss: l2_m · (1/G) per prefix, then the mean
    over the G prefixes, i.e. Σ_m l2_m / G² — written out here with dense ops, G = 4."""
    torch.manual_seed(3)
    sae = _rand_sae(MatryoshkaBatchTopKSAE(D, W, k=4, group_sizes=[3, 6, 12, 27]), seed=4)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(6))
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    out = sae_loss(sae, x)  # no dead latents: the loss is the reconstruction term only
    grads = torch.autograd.grad(out["loss"], params)

    G, B = 4, x.shape[0]
    xs = x * 0.8
    z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    keep = torch.zeros(z.numel(), dtype=torch.bool)
    keep[z.detach().flatten().topk(4 * B).indices] = True
    f = z * keep.view_as(z)
    x_hat = sae.b_dec.expand(B, -1)
    weighted = []
    for start, size in ((0, 3), (3, 6), (9, 12), (21, 27)):
        x_hat = x_hat + f[:, start : start + size] @ sae.W_dec[start : start + size]
        l2_m = (xs - x_hat).pow(2).sum(dim=-1).mean()  # mean over the batch of ||x − x̂_m||² (scaled inputs)
        weighted.append(l2_m * (1.0 / G))
    ref = torch.stack(weighted).mean()
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the former weighting (one mean over G) was exactly G times larger
    assert float(out["prefix_l2"].mean()) == pytest.approx(G * float(ref.detach()), rel=1e-5)


def test_aux_weight_default_is_the_authors():
    import inspect

    from vlmsae_utils.train import TrainConfig

    assert TrainConfig().aux_alpha == 0.03  # train_sae's settings and their defaults are TrainConfig's fields
    assert inspect.signature(sae_loss).parameters["aux_alpha"].default == 0.03
    sae = _rand_sae(BatchTopKSAE(D, W, k=4), seed=1)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(W, dtype=torch.bool)
    dead[::2] = True
    out = sae_loss(sae, x, dead_mask=dead)
    assert float(out["aux"]) > 0
    assert float(out["loss"].detach()) == pytest.approx(float(out["l2"]) + 0.03 * float(out["aux"]), rel=1e-6)


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
    grid = torch.stack(
        torch.meshgrid(torch.linspace(-0.5, 1.5, 401), torch.linspace(-0.5, 1.5, 401), indexing="ij"), -1
    )
    cost = (grid.view(-1, 1, 2) - pts).norm(dim=-1).sum(-1)
    best = grid.view(-1, 2)[cost.argmin()]
    assert float((gm - best).norm()) < 0.02
    assert lr_lambda(0, 100, 10, 80) == 0.0  # dictionary_learning's step / warmup_steps
    assert lr_lambda(5, 100, 10, 80) == pytest.approx(0.5)
    assert lr_lambda(50, 100, 10, 80) == 1.0
    assert lr_lambda(90, 100, 10, 80) == pytest.approx(0.5)
    assert lr_lambda(99, 100, 10, None) == 1.0
    assert group_sizes_from_fractions([0.0625, 0.125, 0.25, 0.5625], 6144) == [384, 768, 1536, 3456]


def test_threshold_ema_follows_definition():
    x, _ = _planted(512, d=D, n_atoms=W, seed=3)
    beta, bs, steps = 0.5, 64, 4
    sae, _ = train_sae(
        x,
        "batch_top_k",
        expansion=2,
        k=3,
        steps=steps,
        batch_size=bs,
        lr=0.0,
        seed=7,
        threshold_start_step=1,
        threshold_beta=beta,
        progress=False,
    )
    theta = -1.0
    for step in range(steps):
        b = x[torch.from_numpy(training_batch_rows(x.shape[0], bs, 7, step))]
        if step <= 1:  # dictionary_learning: `if step > threshold_start_step`
            continue
        with torch.no_grad():
            f = sae.encode(b, use_threshold=False)
        m = float(f[f > 0].min())
        theta = m if theta < 0 else beta * theta + (1 - beta) * m
    assert float(sae.threshold) == pytest.approx(theta, rel=1e-5)


def test_planted_atoms_recovered_and_r2():
    x, atoms = _planted(8192)
    val, _ = _planted(1024, seed=1)
    sae, hist = train_sae(
        x,
        "batch_top_k",
        expansion=4,
        k=3,
        steps=300,
        batch_size=256,
        lr=1e-2,
        val_data=val,
        eval_every=150,
        dead_tokens=5000,
        progress=False,
    )
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
    sae, hist = train_sae(
        x,
        "matryoshka_batch_top_k",
        expansion=2,
        k=3,
        group_fractions=[0.125, 0.25, 0.625],
        steps=120,
        batch_size=256,
        lr=3e-3,
        val_data=val,
        eval_every=120,
        progress=False,
    )
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
    kw = dict(
        expansion=2,
        k=3,
        steps=30,
        batch_size=64,
        val_data=val,
        eval_every=10,
        progress=False,
        dead_tokens=300,
        threshold_start_step=5,
    )
    full, hf = train_sae(x, "batch_top_k", **kw)
    train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, stop_after=13, **kw)
    assert (tmp_path / "checkpoint.pt").is_file()
    res, hr = train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **kw)
    for n, t in full.state_dict().items():
        assert torch.equal(t, res.state_dict()[n]), n
    assert hf.equals(hr)
    with pytest.raises(ValueError, match="different settings"):
        train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **{**kw, "k": 4})
    for setting, other in {"threshold_beta": 0.9, "grad_clip": None, "k_aux": 5, "l1_coeff": 0.5}.items():
        with pytest.raises(ValueError, match=f"different settings.*'{setting}'"):  # not the old SAE returned
            train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **{**kw, setting: other})
    train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **{**kw, "checkpoint_every": 7})  # how, not what
    with pytest.raises(ValueError, match="different settings"):
        train_sae(x[:, :-1], "batch_top_k", checkpoint_dir=tmp_path, **{**kw, "val_data": val[:, :-1]})
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # a checkpoint of the former trainer
    del ck["config"]["trainer_version"]
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="trainer_version"):
        train_sae(x, "batch_top_k", checkpoint_dir=tmp_path, **kw)


def test_store_input_and_resume(tmp_path):
    x, _ = _planted(300, d=D, n_atoms=W)
    store, val = TensorStore(x), TensorStore(x[:100])
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
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB .* lower the expansion"):
        train_sae(x, "batch_top_k", 1e9, k=3, **kw)  # refused before the allocator is asked


def test_fast_batch_topk_indices_exact():
    from vlmsae_utils.train import batch_topk_indices

    g = torch.Generator().manual_seed(0)
    # (613, 1001): a size that is no multiple of the 64-entry blocks the cut is applied in.
    for shape, n in [((512, 1536), 512 * 5), ((256, 2048), 256 * 20), ((600, 1000), 300), ((613, 1001), 613 * 7)]:
        pre = torch.relu(torch.randn(shape, generator=g))
        got = batch_topk_indices(pre, n)
        ref = pre.flatten().topk(n).indices
        assert torch.equal(got.sort().values, ref.sort().values)
    from vlmsae_utils.sae.base import _entries_above

    flat = torch.randn(64 * 500, generator=g)
    for cut in (-10.0, 0.5, 2.5, 10.0):  # every block hot, some, few, none
        assert torch.equal(_entries_above(flat, cut), (flat > cut).nonzero().squeeze(1))
    pre = torch.zeros(512, 1536)
    pre[0, :10] = 1.0  # fewer positives than n: fallback path
    assert batch_topk_indices(pre, 100).numel() == 100


# ----- device, data paths, input scale, LR decay, authors' R² (issues 12 and 14) -----------------


def test_reshuffled_batch_rows_are_epoch_permutations():
    n, bs, order = 50, 16, "reshuffled"
    rows = np.concatenate([training_batch_rows(n, bs, 3, s, order) for s in range(25)])  # 400 rows = 8 epochs
    assert all(len(training_batch_rows(n, bs, 3, s, order)) == bs for s in range(25))
    for e in range(8):
        assert sorted(rows[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(rows[:n], rows[n : 2 * n])
    assert np.array_equal(training_batch_rows(n, bs, 3, 7, order), rows[7 * bs : 8 * bs])  # a function of the step
    assert not np.array_equal(training_batch_rows(n, bs, 4, 0, order), rows[:bs])
    big = training_batch_rows(5, 12, 0, 0, order)  # batch larger than the data: spans epochs
    assert len(big) == 12 and sorted(big[:5].tolist()) == list(range(5))


def test_cycled_batch_rows_replay_the_authors_loader():
    """Transcription of ``itertools.cycle(DataLoader(shuffle=True))``: the first pass's batches (the
    last one short) replayed in the same order."""
    n, bs, seed = 50, 16, 3
    perm = np.random.default_rng([seed, 0, 0]).permutation(n)
    first_pass = [perm[i : i + bs] for i in range(0, n, bs)]  # 16, 16, 16, 2
    expected = [batch for _ in range(3) for batch in first_pass]
    got = [training_batch_rows(n, bs, seed, s) for s in range(len(expected))]
    assert [len(b) for b in got[:4]] == [16, 16, 16, 2]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert len(training_batch_rows(5, 12, 0, 1)) == 5  # a batch larger than the data is the whole data
    with pytest.raises(ValueError, match="batch_order must be one of"):
        training_batch_rows(n, bs, seed, 0, "sorted")


def test_dead_latents_counted_after_the_batch():
    """dictionary_learning's order: add the batch's tokens, reset the latents it fired, then
    ``num_tokens_since_fired >= dead_feature_threshold``."""
    since = torch.tensor([0, 5, 9, 9, 10, 3])
    fired = torch.tensor([False, False, True, False, False, False])
    expected = since + 2
    expected[fired] = 0
    mask = dead_after_batch(since, dead_tokens=10, n_rows=2)(fired)
    assert mask.tolist() == (expected >= 10).tolist() == [False, False, False, True, True, False]


def test_default_init_is_the_authors_kaiming_uniform():
    """With ``lr=0`` the trained decoder is its initial one: kaiming-uniform ``[ω, d]`` rows made unit
    norm (dictionary_learning's Matryoshka SAE), the encoder its transpose; ``init="gaussian"`` differs."""
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    sae, _ = train_sae(x, "batch_top_k", W / D, k=4, steps=2, batch_size=32, lr=0.0, seed=11, progress=False)
    torch.manual_seed(11)
    w = torch.nn.init.kaiming_uniform_(torch.empty(W, D))
    w = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.W_enc.detach(), w.T)
    gauss, _ = train_sae(
        x, "batch_top_k", W / D, k=4, steps=2, batch_size=32, lr=0.0, seed=11, progress=False, init="gaussian"
    )
    assert torch.allclose(gauss.W_dec.norm(dim=1), torch.ones(W)) and not torch.allclose(gauss.W_dec, sae.W_dec)


@pytest.mark.parametrize("kind", ["batch_top_k", "matryoshka_batch_top_k"])
def test_data_paths_train_bit_identically(tmp_path, monkeypatch, kind):
    """Resident and streamed data (tensor, float16 and float32 stores) give the same SAE; resume across paths."""
    import vlmsae_utils.train.batches as train_mod

    monkeypatch.setattr(train_mod, "CHUNK_BATCHES", 3)  # several chunks, resume inside one
    x, _ = _planted(700, d=D, n_atoms=W)
    x16 = x.half().float()  # values a float16 store holds exactly
    store16 = write_store(tmp_path / "s16", x16, "float16", shard_images=128)
    store32 = write_store(tmp_path / "s32", x16, "float32", shard_images=200)
    gf = [0.25, 0.75] if kind == "matryoshka_batch_top_k" else None
    kw = dict(
        expansion=2,
        k=3,
        group_fractions=gf,
        steps=11,
        batch_size=96,
        lr=3e-3,
        seed=5,
        device="cpu",
        eval_every=4,
        progress=False,
        dead_tokens=400,
        threshold_start_step=2,
    )
    ref, h_ref = train_sae(x16, kind, data_on_device=True, **kw)
    assert (h_ref.attrs["device"], h_ref.attrs["data_on_device"]) == ("cpu", True)
    assert h_ref.attrs["training"]["data"] == data_fingerprint(x16) and h_ref.attrs["training"]["steps"] == 11
    runs = {
        "tensor streamed": train_sae(x16, kind, data_on_device=False, **kw),
        "f16 store resident": train_sae(store16, kind, data_on_device=True, **kw),
        "f16 store streamed": train_sae(store16, kind, data_on_device=False, **kw),
        "f32 store auto": train_sae(store32, kind, **kw),
    }
    assert runs["f16 store streamed"][1].attrs["data_on_device"] is False
    assert runs["f32 store auto"][1].attrs["data_on_device"] is True  # tiny: fits in half the free RAM
    for name, (sae, hist) in runs.items():
        for n, t in ref.state_dict().items():
            assert torch.equal(t, sae.state_dict()[n]), (name, n)
        assert hist.equals(h_ref), name
    ck = tmp_path / "ck"
    train_sae(store16, kind, data_on_device=False, checkpoint_dir=ck, stop_after=5, **kw)
    res, h_res = train_sae(store16, kind, data_on_device=True, checkpoint_dir=ck, **kw)
    for n, t in ref.state_dict().items():
        assert torch.equal(t, res.state_dict()[n]), n
    assert h_res.equals(h_ref)


def test_float16_store_batches_are_float32_and_nan_rows_reported(tmp_path, monkeypatch):
    import vlmsae_utils.train.batches as train_mod

    monkeypatch.setattr(train_mod, "CHUNK_BATCHES", 2)
    x = torch.randn(90, D).half().float()
    store = write_store(tmp_path / "s", x, "float16", shard_images=32)
    for resident in (True, False):
        stream = train_mod._TrainingStream(store, 16, 1, torch.device("cpu"), data_on_device=resident)
        batches = list(stream.batches(0, 9))  # 6 batches an epoch (the last of 10 rows): crosses an epoch
        assert [b.shape[0] for b in batches] == [16] * 5 + [10] + [16] * 3
        assert all(b.dtype == torch.float32 and b.shape[1] == D for b in batches)
        for s, b in enumerate(batches):
            assert torch.equal(b, x[torch.from_numpy(training_batch_rows(90, 16, 1, s))])
    bad = x.clone()
    bad[37, 2] = float("nan")
    bad_store = write_store(tmp_path / "bad", bad, "float16", shard_images=32)
    kw = dict(expansion=2, k=3, steps=3, batch_size=90, progress=False, device="cpu")
    for resident in (True, False):
        with pytest.raises(ValueError, match=r"NaN/inf values; first bad rows: \[37\]"):
            train_sae(bad_store, "batch_top_k", data_on_device=resident, **kw)
    for resident in (True, False):  # the path's own check (rows outside the input-scale sample)
        stream = train_mod._TrainingStream(bad_store, 16, 1, torch.device("cpu"), data_on_device=resident)
        with pytest.raises(ValueError, match=r"training data contains NaN/inf values; first bad rows: \[37\]"):
            list(stream.batches(0, 6))
    with pytest.raises(ValueError, match="data_on_device"):
        train_sae(x, "batch_top_k", data_on_device="yes", **kw)
    sae, _ = train_sae(x, "batch_top_k", **kw)  # NaN rows in the validation store: named, not a NaN R²
    with pytest.raises(ValueError, match=r"evaluation data contains NaN/inf values; first bad rows: \[37\]"):
        evaluate_sae(sae, bad_store, batch_size=16, device="cpu")


def test_input_scale_is_estimated_over_the_whole_class_sorted_store(tmp_path):
    """First half of the rows (the first classes) with norm 1, the rest norm 3: the global
    √mean‖x‖² is √5; the first rows in store order would say 1."""
    from vlmsae_utils.train import estimate_input_scale

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20000, 4, generator=g), dim=1)
    x[10000:] *= 3.0
    store = write_store(tmp_path / "sorted", x, "float32", shard_images=2500)
    true_scale = 1.0 / math.sqrt(5.0)
    first_rows_scale = 1.0 / math.sqrt(float(x[: 100 * 50].pow(2).sum(1).mean()))  # the old, in-order estimate
    assert first_rows_scale == pytest.approx(1.0, rel=1e-5)
    est = estimate_input_scale(store, batch_size=50)  # 100 batches of 50 random rows
    assert est == pytest.approx(true_scale, rel=0.03)
    assert est == estimate_input_scale(x, batch_size=50)  # same rows from a tensor
    assert est != estimate_input_scale(store, batch_size=50, seed=1)  # seeded sample
    assert estimate_input_scale(store, batch_size=500) == pytest.approx(true_scale, rel=1e-6)  # all rows
    sae, _ = train_sae(store, "batch_top_k", expansion=2, k=2, steps=1, batch_size=50, progress=False, device="cpu")
    assert float(sae.input_scale) == pytest.approx(est, rel=1e-6)


def test_decay_start_options():
    assert resolve_decay_start(None, 100) is None
    assert resolve_decay_start(DECAY_LAST_20PCT, 100) == 80
    assert resolve_decay_start(30, 100) == 30
    assert resolve_decay_start(109_999, 100_000) is None  # the authors' setting for their kept checkpoint
    for bad in (-1, 1.5, "last", True):
        with pytest.raises(ValueError, match="decay_start"):
            resolve_decay_start(bad, 100)
    x, _ = _planted(512, d=D, n_atoms=W)
    kw = dict(expansion=2, k=3, steps=10, batch_size=64, lr=1e-3, warmup_steps=2, eval_every=5, progress=False)
    _, h_none = train_sae(x, "batch_top_k", **kw)
    _, h_old = train_sae(x, "batch_top_k", decay_start=DECAY_LAST_20PCT, **kw)
    assert list(h_none["lr"]) == pytest.approx([1e-3, 1e-3])  # default: no decay
    assert list(h_old["lr"]) == pytest.approx([1e-3, 0.0])


def test_r2_batch_mean_hand_computed():
    """x̂ = ½x + ½c: the residual ½(x − c) has a quarter of x's variance in every batch, so the
    authors' mean-centred per-batch R² is 0.75 exactly while the global R² counts the offset."""
    sae = TopKSAE(2, 2, k=2)
    c = torch.tensor([-1.0, -2.0])
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(0.5 * torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.copy_(c)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0], [0.0, 2.0]])
    ev = evaluate_sae(sae, x, batch_size=4, device="cpu")
    # residual r = ½(x − c) = [[1, 2], [2, 1], [1.5, 3], [0.5, 2]]
    # global: Σr² = 1+4+4+1+2.25+9+0.25+4 = 25.5; Σ(x − x̄)² with x̄ = (1.5, 2): 0.25+2.25+0.25+2.25 + 0+4+4+0 = 13
    assert ev["r2"] == pytest.approx(1 - 25.5 / 13, rel=1e-9)
    assert ev["r2_batch_mean"] == pytest.approx(0.75, rel=1e-9)
    # several batches: the authors' rule transcribed (dictionary_learning's validation loop over an
    # unshuffled loader): torch.var per batch in store order, the short last batch included
    g = torch.Generator().manual_seed(1)
    xr = torch.rand(10, 2, generator=g) + 2.0
    sae2 = _rand_sae(TopKSAE(2, 3, k=1), seed=3)

    def authors_r2(rows: torch.Tensor) -> float:
        fracs = []
        for act in rows.split(4):
            e = act - sae2(act)
            fracs.append(1 - torch.var(e, dim=0).sum() / torch.var(act, dim=0).sum())
        return float(torch.stack(fracs).mean())

    with torch.no_grad():
        assert evaluate_sae(sae2, xr, batch_size=4, device="cpu")["r2_batch_mean"] == pytest.approx(
            authors_r2(xr), abs=1e-6
        )
        # a last batch of one row has no variance (NaN for the authors): left out
        nine = evaluate_sae(sae2, xr[:9], batch_size=4, device="cpu")["r2_batch_mean"]
        assert nine == pytest.approx(authors_r2(xr[:8]), abs=1e-6)


def test_device_argument():
    import inspect

    for fn in (train_sae, evaluate_sae):
        assert inspect.signature(fn).parameters["device"].default == "auto"
    x, _ = _planted(256, d=D, n_atoms=W)
    sae, hist = train_sae(
        x, "batch_top_k", expansion=2, k=3, steps=2, batch_size=32, progress=False, device=torch.device("cpu")
    )
    assert hist.attrs["device"] == "cpu" and sae.W_enc.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_sae(x, "batch_top_k", expansion=2, k=3, steps=2, batch_size=32, progress=False, device="cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            evaluate_sae(sae, x, device="cuda:0")
        with pytest.raises(ValueError, match="only used on CUDA"):
            train_sae(x, "batch_top_k", expansion=2, k=3, steps=2, batch_size=32, progress=False, autocast=True)


def test_train_grid_device_and_authors_r2_column(tmp_path):
    """train_grid resolves the device once, puts the store in memory once, and reports both R²s;
    each SAE equals train_sae on the store itself."""
    from vlmsae_utils.sae import load_sae
    from vlmsae_utils.train import train_grid

    x, _ = _planted(400, d=D, n_atoms=W)
    store = write_store(tmp_path / "store", x, "float32", shard_images=150)
    val = x[:96]
    kw = dict(k=3, steps=6, batch_size=64, progress=False, eval_every=3)
    results, histories = train_grid(
        store,
        val,
        ["batch_top_k", "matryoshka_batch_top_k"],
        [2],
        tmp_path / "grid",
        device="cpu",
        group_fractions=[0.5, 0.5],
        **kw,
    )
    assert {"R² %", "global R² %", "L0", "dead %"} <= set(results.columns)
    assert results["global R² %"].between(-100, 100).all()
    direct, _ = train_sae(store, "batch_top_k", 2, device="cpu", val_data=val, **kw)
    saved = load_sae(tmp_path / "grid" / "batch_top_k_x2_k3")
    torch.testing.assert_close(saved.W_dec, direct.W_dec, rtol=0, atol=0)
    assert "val_r2_batch_mean" in histories["batch_top_k_x2_k3"].columns
    recorded = json.loads((tmp_path / "grid" / "matryoshka_batch_top_k_x2_k3" / "config.json").read_text())["training"]
    assert recorded["expansion"] == 2 and recorded["k"] == 3 and recorded["group_fractions"] == [0.5, 0.5]
    assert recorded["lr"] == pytest.approx(2e-4 / math.sqrt(2 * D / 2**14)) and recorded["init"] == "uniform"
    assert saved.provenance["store_hash"] == store.manifest["content_hash"]  # taken before the rows moved


def test_a_checkpoint_is_never_resumed_on_other_data(tmp_path):
    """Issue: a finished or interrupted checkpoint of store A was reused when given store B."""
    from vlmsae_utils.train import train_sae

    first = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    other = first.clone()
    other[3, 5] += 1.0  # one value differs
    kwargs = {
        "sae_type": "batch_top_k",
        "expansion": 2,
        "k": 4,
        "steps": 20,
        "batch_size": 64,
        "checkpoint_dir": tmp_path,
        "progress": False,
        "device": "cpu",
    }
    train_sae(first, stop_after=10, **kwargs)
    with pytest.raises(ValueError, match=r"different settings.*'data'"):
        train_sae(other, **kwargs)
    with pytest.raises(ValueError, match=r"different settings.*'val_data'"):  # its history evaluated other rows
        train_sae(first, val_data=other[:64], **kwargs)
    sae, _ = train_sae(first, **kwargs)  # the same data resumes
    assert sae.dict_size == 32
    checkpoint = next(tmp_path.glob("*.pt"))  # truncated (a full disk, a copy cut short): named, no traceback
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(checkpoint))} cannot be read safely"):
        train_sae(first, **kwargs)
    torch.save({"weights": torch.zeros(2)}, checkpoint)
    with pytest.raises(ValueError, match="is not a checkpoint of this trainer"):
        train_sae(first, **kwargs)


def test_a_grid_resolves_its_device_once_at_its_entry_point(tmp_path, monkeypatch):
    """train_grid hands its resolved device to training and evaluation (CONTRIBUTING: once, at the entry point)."""
    from vlmsae_utils.train import evaluate, grid, loop

    calls = []

    def counting(device):
        calls.append(device)
        return torch.device("cpu")

    for module in (grid, loop, evaluate):
        monkeypatch.setattr(module, "resolve_device", counting)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    grid.train_grid(x, x, ["batch_top_k"], [2], tmp_path, "cpu", k=2, steps=2, batch_size=32, progress=False)
    assert calls == ["cpu"]
