"""Tests of vlmsae_utils.neuron_pass: MS and top-k from one read of the activations, against the
brute-force pair loop (`ms_brute_force`) and a full sort per neuron."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TensorStore

from vlmsae_utils import neuron_pass
from vlmsae_utils.metrics import SparseCodes, ms_brute_force
from vlmsae_utils.neuron_pass import scan_neurons

N, K, D, TOP = 150, 10, 5, 6


def _hard_columns() -> tuple[torch.Tensor, torch.Tensor]:
    """Activations whose running minimum falls batch after batch (so the sums are rebased), whose
    every later entry beats the current k-th value (many candidates per batch), with ties, zeros,
    negatives, a dead neuron and a neuron positive on fewer than k images."""
    g = torch.Generator().manual_seed(7)
    a = torch.rand(N, K, generator=g)
    rows = torch.arange(N, dtype=torch.float32)
    a[:, 0] = -rows * 0.3 + torch.rand(N, generator=g)  # minimum falls in every batch
    a[:, 1] = rows * 0.01  # increasing: each batch is all candidates
    a[:, 2] = torch.randint(0, 3, (N,), generator=g).float()  # heavy ties
    a[:, 3] = 0.0
    a[[5, 60, 140], 3] = torch.tensor([0.5, 2.0, 1.0])  # three positive images < k
    a[:, 4] = -2.0  # constant: dead
    a[:, 5] = torch.randn(N, generator=g) * 4 - 1  # mostly negative, offset
    e = torch.randn(N, D, generator=g) + 0.3
    return a, e


def _brute_top(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: the k largest positive values (descending, NaN where absent) by a full sort, and
    how many images are positive."""
    values = torch.full((a.shape[1], k), float("nan"))
    for j in range(a.shape[1]):
        pos = a[:, j][a[:, j] > 0]
        top = torch.sort(pos, descending=True).values[:k]
        values[j, : top.numel()] = top
    return values, (a > 0).sum(0)


def _assert_top_exact(top, a: torch.Tensor, k: int) -> None:
    """Values equal a full sort's; every index points at an image holding its value (ties may swap)."""
    ref_values, ref_count = _brute_top(a, k)
    torch.testing.assert_close(top.values, ref_values, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(top.count_positive, ref_count)
    present = top.indices >= 0
    assert torch.equal(present, ~torch.isnan(ref_values))
    neurons = torch.arange(a.shape[1])[:, None].expand_as(top.indices)
    assert torch.equal(a[top.indices[present], neurons[present]], top.values[present])
    for j in range(a.shape[1]):  # no image twice in a neuron's list
        ids = top.indices[j][present[j]]
        assert ids.unique().numel() == ids.numel()


@pytest.fixture(scope="module")
def hard():
    a, e = _hard_columns()
    return a, e, ms_brute_force(a, e)


@pytest.mark.parametrize("layout", ["tensor", "numpy", "store", "neuron_chunk", "column_blocks"])
def test_one_pass_matches_brute_force(hard, layout, monkeypatch):
    a, e, ms_ref = hard
    source = {"numpy": a.numpy(), "store": TensorStore(a, allow_shuffle=False)}.get(layout, a)
    if layout == "column_blocks":  # in-memory tensors are scanned in blocks of neurons
        monkeypatch.setattr(neuron_pass, "_MEMORY_BLOCK", 4)
    kwargs = {"neuron_chunk": 3} if layout == "neuron_chunk" else {}
    out = scan_neurons(source, e, top_k=TOP, chunk_size=23, matmul_dtype=torch.float64, device="cpu", **kwargs)
    torch.testing.assert_close(out.ms, ms_ref, atol=1e-10, rtol=0, equal_nan=True)
    assert torch.isnan(out.ms[4]) and not torch.isnan(out.ms[:4]).any()
    _assert_top_exact(out.top, a, TOP)
    if layout == "store":
        assert source.batches_served == math.ceil(N / 23)  # one read for MS and top-k together


def test_float32_products_and_default_batching(hard):
    a, e, ms_ref = hard
    out = scan_neurons(a, e, top_k=TOP, device="cpu")
    torch.testing.assert_close(out.ms, ms_ref, atol=1e-5, rtol=0, equal_nan=True)
    _assert_top_exact(out.top, a, TOP)


def test_sparse_codes_one_pass_equal_dense():
    g = torch.Generator().manual_seed(3)
    dense = torch.relu(torch.randn(N, K, generator=g) - 0.4)
    dense[:, 0] = 0.0  # dead latent
    dense[: N // 2, 1] = torch.arange(N // 2, dtype=torch.float32)  # increasing: many candidates
    e = torch.randn(N, D, generator=g)
    sparse = scan_neurons(SparseCodes.from_dense(dense), e, top_k=TOP, chunk_size=19, device="cpu")
    torch.testing.assert_close(sparse.ms, ms_brute_force(dense, e), atol=1e-10, rtol=0, equal_nan=True)
    _assert_top_exact(sparse.top, dense, TOP)


def test_one_part_only_and_its_accessors(hard):
    a, e, ms_ref = hard
    ms_only = scan_neurons(a, e, top_k=0, matmul_dtype=torch.float64, device="cpu")
    assert ms_only.top is None
    torch.testing.assert_close(ms_only.ms, ms_ref, atol=1e-10, rtol=0, equal_nan=True)
    top_only = scan_neurons(a, top_k=TOP, device="cpu")
    assert top_only.ms is None
    _assert_top_exact(top_only.top_images(), a, TOP)
    with pytest.raises(ValueError, match="top_k=0"):
        ms_only.top_images()
    with pytest.raises(ValueError, match="without embeddings"):
        top_only.both()


def test_bad_inputs_raise_clear_errors():
    a, e = _hard_columns()
    bad = a.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN|non-finite"):
        scan_neurons(bad, e, device="cpu")
    with pytest.raises(ValueError, match="rows"):
        scan_neurons(a, e[:-1], device="cpu")
    e_zero = e.clone()
    e_zero[3] = 0.0
    with pytest.raises(ValueError, match="zero norm"):
        scan_neurons(a, e_zero, device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        scan_neurons(a, e, top_k=-1, device="cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        scan_neurons(a, e, chunk_size=0, device="cpu")
    with pytest.raises(ValueError, match="at least 2 images"):
        scan_neurons(a[:1], e[:1], device="cpu")
    assert scan_neurons(np.zeros((1, 3), np.float32), top_k=2, device="cpu").top.indices.eq(-1).all()
