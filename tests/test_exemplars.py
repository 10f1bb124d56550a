"""Tests of vlmsae_utils.exemplars against torch.topk and brute-force loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import TensorStore

from vlmsae_utils.exemplars import TopK, image_grid, top_k_images, uniqueness
from vlmsae_utils.metrics import SparseCodes


def _positive_data(n=400, k=30, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g) + 0.01  # continuous, all positive: no ties, no absent


def test_dense_matches_torch_topk():
    a = _positive_data()
    ref = torch.topk(a.T, 16, dim=1)
    for src, bs in ((a, 37), (a.numpy(), 1000), (TensorStore(a), 64)):
        out = top_k_images(src, top_k=16, batch_size=bs)
        assert isinstance(out, TopK)
        torch.testing.assert_close(out.values, ref.values)
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.count_positive, torch.full((30,), 400))
        assert not out.flagged.any()


def test_sparse_codes_match_torch_topk():
    g = torch.Generator().manual_seed(1)
    dense = torch.relu(torch.randn(500, 40, generator=g) - 0.5)
    out = top_k_images(SparseCodes.from_dense(dense), top_k=8)
    ref = torch.topk(dense.T, 8, dim=1)
    pos = ref.values > 0
    assert torch.equal(out.indices[pos], ref.indices[pos])
    torch.testing.assert_close(out.values[pos], ref.values[pos])
    assert torch.equal(out.count_positive, (dense > 0).sum(0))
    dense_out = top_k_images(dense, top_k=8, batch_size=33)
    assert torch.equal(dense_out.indices, out.indices)
    torch.testing.assert_close(dense_out.values, out.values, equal_nan=True)


def test_absent_entries_and_flags():
    a = torch.zeros(50, 3)
    a[:, 0] = torch.linspace(1, 2, 50)  # 50 positive images
    a[[4, 9, 30], 1] = torch.tensor([0.5, 3.0, 1.0])  # 3 positives, rest 0
    a[:, 2] = -torch.rand(50)  # never positive
    a[10, 2] = 0.0
    for src in (a, SparseCodes.from_dense(a)):
        out = top_k_images(src, top_k=5)
        assert out.flagged.tolist() == [False, True, True]
        assert out.count_positive.tolist() == [50, 3, 0]
        assert out.indices[0].tolist() == [49, 48, 47, 46, 45]
        assert out.indices[1].tolist() == [9, 30, 4, -1, -1]
        assert out.values[1, :3].tolist() == [3.0, 1.0, 0.5]
        assert torch.isnan(out.values[1, 3:]).all()
        assert out.indices[2].tolist() == [-1] * 5 and torch.isnan(out.values[2]).all()


def test_per_image_max_with_row_image_index():
    g = torch.Generator().manual_seed(2)
    n_img, rows_per = 60, 3
    a = torch.randn(n_img * rows_per, 10, generator=g)
    a[:, 9] = -1.0
    a[7, 9] = 2.0  # image 2 only
    img = np.repeat(np.arange(n_img), rows_per)
    per_image = a.view(n_img, rows_per, 10).amax(1)  # brute force
    ref = torch.topk(per_image.T, 6, dim=1)
    for src, bs in ((a, 7), (TensorStore(a), 5), (a, 1000)):  # batches split images
        out = top_k_images(src, top_k=6, row_image_index=img, batch_size=bs)
        ok = ref.values > 0
        assert torch.equal(out.indices[ok], ref.indices[ok])
        torch.testing.assert_close(out.values[ok], ref.values[ok])
        assert torch.equal(out.count_positive, (per_image > 0).sum(0))
        assert out.indices[9].tolist() == [2, -1, -1, -1, -1, -1]
    sp = top_k_images(SparseCodes.from_dense(torch.relu(a)), top_k=6, row_image_index=img)
    pim = torch.relu(per_image)
    ref2 = torch.topk(pim.T, 6, dim=1)
    ok = ref2.values > 0
    assert torch.equal(sp.indices[ok], ref2.indices[ok])
    assert torch.equal(sp.count_positive, (pim > 0).sum(0))


def test_top_k_validation():
    with pytest.raises(ValueError, match="k must be"):
        top_k_images(torch.rand(5, 2), top_k=0)
    with pytest.raises(ValueError, match="row_image_index"):
        top_k_images(torch.rand(5, 2), top_k=2, row_image_index=[0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        top_k_images(torch.rand(3, 2), top_k=2, row_image_index=[1, 0, 0])
    bad = torch.rand(5, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_k_images(bad, top_k=2)


def _brute_jaccard(ind: np.ndarray):
    sets = [set(int(x) for x in row if x >= 0) for row in ind]
    out = {}
    for i, j in itertools.combinations(range(len(sets)), 2):
        u = sets[i] | sets[j]
        out[(i, j)] = len(sets[i] & sets[j]) / len(u) if u else 0.0
    return out


def test_uniqueness_matches_double_loop():
    g = np.random.default_rng(3)
    ind = g.integers(0, 25, size=(40, 4))
    ind[5] = ind[6]  # identical sets → J = 1
    ind[7, :2] = -1  # partly absent
    ind[8] = -1  # empty set
    ind[9] = [1, 1, 2, 3]  # duplicate id counts once
    ref = _brute_jaccard(ind)
    out = uniqueness(ind, thresholds=(0.3, 0.5, 1.0), top=5, chunk=7)
    vals = np.array(list(ref.values()))
    assert out["num_pairs"] == 40 * 39 // 2
    assert out["num_overlapping"] == int((vals > 0).sum())
    for t in (0.3, 0.5, 1.0):
        assert out["counts"][t] == int((vals >= t - 1e-9).sum()), t
    best = sorted(ref.values(), reverse=True)[:5]
    assert [p[2] for p in out["top_pairs"]] == pytest.approx(best, abs=1e-6)
    assert out["top_pairs"][0][:2] == (5, 6)
    for i, j, v in out["top_pairs"]:
        assert ref[(i, j)] == pytest.approx(v, abs=1e-6)
    max_ref = [max(ref[tuple(sorted((i, j)))] for j in range(40) if j != i) for i in range(40)]
    np.testing.assert_allclose(out["max_jaccard"].numpy(), max_ref, atol=1e-6)


def _brute_protocol(ind: np.ndarray, thresholds, *, drop_partial: bool, strict: bool):
    """The authors' kind of loop: drop incomplete sets (optional), then every kept pair i < j."""
    k = ind.shape[1]
    sets = [set(int(x) for x in row if x >= 0) for row in ind]
    kept = [i for i, s in enumerate(sets) if not drop_partial or len(s) >= k]
    jac = {}
    for a, b in itertools.combinations(kept, 2):
        inter = len(sets[a] & sets[b])
        if inter:
            jac[(a, b)] = inter / len(sets[a] | sets[b])
    counts = {t: sum(1 for v in jac.values() if (v > t if strict else v >= t)) for t in thresholds}
    max_j = [
        float("nan") if i not in kept else max([v for (a, b), v in jac.items() if i in (a, b)], default=0.0)
        for i in range(len(sets))
    ]
    return len(kept), jac, counts, max_j


@pytest.mark.parametrize("seed", range(6))
def test_uniqueness_sparse_matches_brute_force(seed):
    g = np.random.default_rng(seed)
    n_neurons, k, n_img = int(g.integers(1, 60)), int(g.integers(1, 7)), int(g.integers(1, 40))
    ind = g.integers(0, n_img, size=(n_neurons, k))
    ind[g.random(ind.shape) < 0.15] = -1  # absent slots
    ind[g.random(n_neurons) < 0.1] = -1  # empty sets
    if n_neurons > 3:
        ind[1] = ind[2]  # identical sets
        ind[3, :] = ind[3, 0]  # one image repeated: counts once
    thresholds = (0.0, 0.2, 1 / 3, 0.5, 1.0)
    for drop_partial, strict, chunk in itertools.product((False, True), (False, True), (1, 5, 1 << 20)):
        n_kept, jac, counts, max_j = _brute_protocol(ind, thresholds, drop_partial=drop_partial, strict=strict)
        out = uniqueness(ind, thresholds, top=8, chunk=chunk, drop_partial=drop_partial, strict=strict)
        assert out["num_neurons"] == n_neurons
        assert out["num_dropped"] == n_neurons - n_kept
        assert out["num_pairs"] == n_kept * (n_kept - 1) // 2
        assert out["num_overlapping"] == len(jac)
        assert out["counts"] == counts
        want = sorted(jac.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        assert [(i, j) for i, j, _ in out["top_pairs"]] == [ij for ij, _ in want]
        assert [v for *_, v in out["top_pairs"]] == pytest.approx([v for _, v in want], abs=1e-12)
        np.testing.assert_allclose(out["max_jaccard"].numpy(), max_j, atol=1e-6)


def test_uniqueness_protocol_options_by_hand():
    ind = np.array(
        [
            [0, 1, 2, 3],
            [0, 1, 2, 3],  # J(0,1) = 1
            [0, 1, -1, -1],  # 2 of 4 images: J(0,2) = J(1,2) = 2/4
            [2, 3, 4, 5],  # J(0,3) = J(1,3) = 2/6, J(2,3) = 0
            [6, 7, 8, 9],  # overlaps nothing
            [-1, -1, -1, -1],
        ]
    )  # no positive image
    ours = uniqueness(ind, (0.5, 1.0), top=3)
    assert (ours["num_pairs"], ours["num_overlapping"], ours["num_dropped"]) == (15, 5, 0)
    assert ours["counts"] == {0.5: 3, 1.0: 1}
    assert [(i, j) for i, j, _ in ours["top_pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert [v for *_, v in ours["top_pairs"]] == [1.0, 0.5, 0.5]
    np.testing.assert_allclose(ours["max_jaccard"].numpy(), [1, 1, 0.5, 1 / 3, 0, 0], atol=1e-7)
    assert uniqueness(ind, (0.5, 1.0), strict=True)["counts"] == {0.5: 1, 1.0: 0}
    paper = uniqueness(ind, (0.5, 1.0), drop_partial=True, strict=True)
    assert (paper["num_pairs"], paper["num_overlapping"], paper["num_dropped"]) == (6, 3, 2)
    assert paper["counts"] == {0.5: 1, 1.0: 0}
    np.testing.assert_allclose(paper["max_jaccard"].numpy(), [1, 1, np.nan, 1 / 3, 0, np.nan], atol=1e-7)
    assert uniqueness(ind, (0.5, 1.0), drop_partial=True)["counts"] == {0.5: 1, 1.0: 1}


def test_uniqueness_degenerate_shapes():
    for ind in (np.zeros((0, 4), dtype=int), np.zeros((3, 0), dtype=int), -np.ones((3, 2), dtype=int), np.array([[7]])):
        out = uniqueness(ind)
        assert out["num_overlapping"] == 0 and out["top_pairs"] == []
        assert out["num_pairs"] == ind.shape[0] * (ind.shape[0] - 1) // 2
        assert out["max_jaccard"].tolist() == [0.0] * ind.shape[0]


def test_uniqueness_validation():
    with pytest.raises(ValueError, match="2-D"):
        uniqueness(np.arange(4))
    with pytest.raises(ValueError, match="thresholds"):
        uniqueness(np.zeros((3, 2), dtype=int), thresholds=(1.5,))
    with pytest.raises(ValueError, match=r">= -1|-1 for absent"):
        uniqueness(np.array([[0, -2]]))
    with pytest.raises(ValueError, match="chunk"):
        uniqueness(np.zeros((3, 2), dtype=int), chunk=0)


def test_image_grid_captions_and_absent():
    imgs = [np.full((8, 8, 3), i * 20, dtype=np.uint8) for i in range(5)] + [None]
    vals = [3.25, 2.0, 1.5, 1.0, 0.5, float("nan")]
    fig = image_grid(imgs, vals, title="neuron 7", ncols=4)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:6] == ["3.25", "2", "1.5", "1", "0.5", "—"]
    assert fig._suptitle.get_text() == "neuron 7"
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(ValueError, match="values"):
        image_grid(imgs, [1.0])
