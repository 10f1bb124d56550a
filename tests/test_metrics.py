"""Tests of vlmsae_utils.metrics against independent expectations (brute force, hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TensorStore

from vlmsae_utils.metrics import (
    SparseCodes,
    encode_to_sparse,
    monosemanticity_score,
    ms_brute_force,
    ms_user_agreement,
    summarize_ms,
)


def _tricky_activations(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random activations with negatives, a constant neuron, a one-image neuron, ties, duplicated images."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 9, generator=g)
    a[:, 1] = torch.relu(a[:, 1])  # many ties at 0
    a[:, 2] = 3.5  # constant → dead
    a[:, 3] = 0.0
    a[7, 3] = 2.0  # one active image → zero weight sum → dead
    a[:, 4] = torch.randint(0, 3, (n,), generator=g).float()  # heavy ties
    a[:, 5] = -torch.rand(n, generator=g) * 5  # all negative
    a[:, 6] = 0.0
    a[[3, 9], 6] = 1.0  # exactly two active images
    a[:, 8] = -0.7
    a[5, 8] = 0.31  # one active image with awkward values → dead in float32 too
    e = torch.randn(n, 6, generator=g) + 0.4
    e[10] = e[11] * 3.0  # duplicated image (scaled embedding: cosine 1)
    a[10] = a[11]
    return a, e


def _exact_ms_suffix(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Independent float64 evaluation Σ_n ã_n ê_n·(Σ_{m>n} ã_m ê_m) with suffix sums (no ||S||² identity)."""
    a = a.double()
    e = e.double()
    e = e / e.norm(dim=1, keepdim=True)
    lo, hi = a.min(0).values, a.max(0).values
    t = (a - lo) / (hi - lo)
    out = []
    for k in range(a.shape[1]):
        w = t[:, k : k + 1] * e  # [N, D]
        suffix = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0])  # Σ_{m>=n}
        after = torch.zeros_like(suffix)
        after[:-1] = suffix[1:]  # Σ_{m>n}
        num = (w * after).sum()
        tk = t[:, k]
        ts = torch.flip(torch.cumsum(torch.flip(tk, [0]), 0), [0])
        den = (tk[:-1] * ts[1:]).sum()
        out.append(num / den)
    return torch.stack(out)


def test_hand_computed_four_images():
    # e1=(1,0), e2=(0,1), e3=(1,1) (scaled), e4=(-1,0); ã = (0, .5, 1, 1).
    # pairs: (2,3) .5·1/√2, (2,4) .5·0, (3,4) 1·(−1/√2) → num = −.5/√2, den = .5+.5+1 = 2.
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-2.0, 0.0]])
    a = torch.tensor([[0.0, 7.0], [1.0, 7.0], [2.0, 7.0], [2.0, 7.0]])
    ms = monosemanticity_score(a, e, matmul_dtype=torch.float64)
    assert ms.dtype == torch.float64 and ms.shape == (2,)
    assert ms[0].item() == pytest.approx(-0.25 / math.sqrt(2), abs=1e-12)
    assert monosemanticity_score(a, e)[0].item() == pytest.approx(-0.25 / math.sqrt(2), abs=1e-6)
    assert math.isnan(ms[1].item())  # constant neuron is dead


def test_closed_form_matches_brute_force_with_edge_cases():
    a, e = _tricky_activations()
    ours = monosemanticity_score(a, e, matmul_dtype=torch.float64)
    ref = ms_brute_force(a, e)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.isnan(ours[2]) and torch.isnan(ours[3])  # constant, one-active → dead
    assert not torch.isnan(ours[6])
    torch.testing.assert_close(ours[~torch.isnan(ref)], ref[~torch.isnan(ref)], atol=1e-12, rtol=0)
    # float32 batch products (the default) stay within 1e-6.
    ours32 = monosemanticity_score(a, e)
    assert torch.equal(torch.isnan(ours32), torch.isnan(ref))
    assert torch.isnan(ref[8])
    torch.testing.assert_close(ours32[~torch.isnan(ref)], ref[~torch.isnan(ref)], atol=1e-6, rtol=0)


def test_brute_force_literal_pair_loop_tiny():
    # Check the reference itself against a literal Python double loop.
    g = torch.Generator().manual_seed(3)
    a, e = torch.randn(7, 3, generator=g), torch.randn(7, 4, generator=g)
    ref = ms_brute_force(a, e)
    for k in range(3):
        t = (a[:, k].double() - a[:, k].min()) / (a[:, k].max() - a[:, k].min())
        num = den = 0.0
        for n in range(7):
            for m in range(n + 1, 7):
                s = torch.nn.functional.cosine_similarity(e[n].double(), e[m].double(), dim=0)
                num += float(t[n] * t[m] * s)
                den += float(t[n] * t[m])
        assert ref[k].item() == pytest.approx(num / den, abs=1e-12)


def test_large_n_matches_float64_to_1e5():
    g = torch.Generator().manual_seed(1)
    n = 50_000
    a = torch.rand(n, 8, generator=g) ** 4 * 3  # skewed like real activations
    a[:, 0] = torch.relu(torch.randn(n, generator=g) - 2.5)  # sparse neuron
    a[:, 1] = torch.randn(n, generator=g)  # negative values
    e = torch.randn(n, 16, generator=g) + 0.8  # shared direction: cosines ~0.4, strong cancellation
    ours = monosemanticity_score(a, e)
    ref = _exact_ms_suffix(a, e)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.slow
def test_large_n_matches_chunked_pairwise_brute_force():
    g = torch.Generator().manual_seed(2)
    n = 50_000
    a = torch.rand(n, 2, generator=g) ** 3
    e = (torch.randn(n, 8, generator=g) + 0.5).double()
    e = e / e.norm(dim=1, keepdim=True)
    t = ((a - a.min(0).values) / (a.max(0).values - a.min(0).values)).double()
    num = torch.zeros(2, dtype=torch.float64)
    den = torch.zeros(2, dtype=torch.float64)
    blk = 250
    for s in range(0, n, blk):
        pairs = torch.ones(min(blk, n - s), n - s, dtype=torch.float64).triu_(1)  # (n, m): n in block, m > n
        sim = (e[s : s + blk] @ e[s:].T) * pairs
        rows, cols = t[s : s + blk].T, t[s:].T  # [2, block], [2, n - s]
        num += ((rows @ sim) * cols).sum(1)  # per neuron: sum over pairs of t_n t_m s_nm
        den += ((rows @ pairs) * cols).sum(1)  # and of t_n t_m
    ours = monosemanticity_score(a, e.float())
    assert (ours - num / den).abs().max().item() < 1e-5


def test_streaming_store_equals_in_memory():
    a, e = _tricky_activations(n=203, seed=4)
    store = TensorStore(a, allow_shuffle=False)
    mem = monosemanticity_score(a, e, matmul_dtype=torch.float64)
    streamed = monosemanticity_score(store, e, chunk_size=17, matmul_dtype=torch.float64)
    assert store.batches_served == math.ceil(203 / 17)  # one pass: the running minimum is rebased, not re-read
    torch.testing.assert_close(streamed, mem, atol=1e-12, rtol=0, equal_nan=True)
    chunked = monosemanticity_score(a, e, neuron_chunk=4, chunk_size=50, matmul_dtype=torch.float64)
    torch.testing.assert_close(chunked, mem, atol=1e-12, rtol=0, equal_nan=True)
    # Default float32 batch products: same up to float32 rounding, whatever the batching.
    fast = monosemanticity_score(TensorStore(a, allow_shuffle=False), e, chunk_size=17)
    torch.testing.assert_close(fast, mem, atol=1e-6, rtol=0, equal_nan=True)


def test_scaling_and_shift_invariance():
    a, e = _tricky_activations(n=120, seed=5)
    base = monosemanticity_score(a, e, matmul_dtype=torch.float64)
    moved = monosemanticity_score(a.double() * 7.5 - 3.0, e.double() * 0.1, matmul_dtype=torch.float64)
    torch.testing.assert_close(moved, base, atol=1e-10, rtol=0, equal_nan=True)


def test_sparse_codes_equal_dense():
    g = torch.Generator().manual_seed(6)
    n, k = 150, 12
    dense = torch.relu(torch.randn(n, k, generator=g) - 1.0)
    dense[:, 0] = 0.0  # never active → dead
    dense[:, 1] = 0.0
    dense[4, 1] = 2.0  # one image → dead
    dense[:, 2] = torch.rand(n, generator=g) + 0.5  # active everywhere: min > 0
    dense[:, 3] = torch.randn(n, generator=g)  # negative codes mixed with implicit zeros
    dense[::3, 3] = 0.0
    e = torch.randn(n, 5, generator=g) + 0.3
    codes = SparseCodes.from_dense(dense)
    assert codes.nnz == int((dense != 0).sum())
    torch.testing.assert_close(codes.to_dense(), dense)
    sp = monosemanticity_score(codes, e, chunk_size=32)
    ref = ms_brute_force(dense, e)
    assert torch.equal(torch.isnan(sp), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(sp[ok], ref[ok], atol=1e-10, rtol=0)


def test_encode_to_sparse_and_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(90, 6, generator=g)
    w = torch.randn(6, 20, generator=g)

    def encode(b):
        return torch.relu(b @ w - 1.0)

    codes = encode_to_sparse(encode, (x[s : s + 25] for s in range(0, 90, 25)), 20)
    torch.testing.assert_close(codes.to_dense(), encode(x))
    assert len(codes) == 90 and codes.dim == 20
    path = codes.save(tmp_path / "codes.npz")
    back = SparseCodes.load(path)
    torch.testing.assert_close(back.to_dense(), codes.to_dense())
    with pytest.raises(ValueError, match="expected"):
        encode_to_sparse(encode, [x[:5]], 19)
    with pytest.raises(FileNotFoundError):
        SparseCodes.load(tmp_path / "missing.npz")


def test_input_validation():
    e = torch.randn(5, 3)
    with pytest.raises(ValueError, match="at least 2"):
        monosemanticity_score(torch.randn(1, 4), torch.randn(1, 3))
    with pytest.raises(ValueError, match="rows"):
        monosemanticity_score(torch.randn(6, 4), e)
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        monosemanticity_score(bad, e)
    e0 = e.clone()
    e0[3] = 0
    with pytest.raises(ValueError, match="zero norm"):
        monosemanticity_score(torch.randn(5, 4), e0)
    with pytest.raises(ValueError, match="2-D"):
        monosemanticity_score(torch.randn(5), e)
    with pytest.raises(ValueError, match="SparseCodes"):
        monosemanticity_score("not activations", e)
    with pytest.raises(ValueError, match="indices"):
        SparseCodes(torch.tensor([0, 1]), torch.tensor([5]), torch.tensor([1.0]), 3)


def test_summarize_ms():
    s = torch.tensor([0.1, float("nan"), 0.5, -0.2, float("nan"), 0.3], dtype=torch.float64)
    out = summarize_ms(s, top=2)
    live = np.array([0.1, 0.5, -0.2, 0.3])
    assert out["num_dead"] == 2 and out["num_neurons"] == 6
    assert out["mean"] == pytest.approx(live.mean())
    assert out["std"] == pytest.approx(live.std())
    assert out["top_ids"] == [2, 5] and out["bottom_ids"] == [3, 0]


def test_user_agreement_hand_table(tmp_path):
    # gap bins (0,.2], (.2,.4], ..., (.8,1]; R_user = share of raters preferring x.
    rows = [
        # k_x, k_y, R_user, MS_x_dino, MS_y_dino  -> gap, agrees?
        (1, 2, 1.0, 0.50, 0.45, 0.3, 0.2),  # .05, yes
        (3, 4, 0.0, 0.50, 0.40, 0.3, 0.2),  # .10, no
        (5, 6, 2 / 3, 0.10, 0.20, 0.3, 0.2),  # .10, no
        (7, 8, 1 / 3, 0.10, 0.25, 0.3, 0.2),  # .15, yes
        (9, 10, 0.0, 0.10, 0.40, 0.3, 0.2),  # .30, yes
        (11, 12, 1.0, 0.95, 0.05, 0.3, 0.2),  # .90, yes
        (13, 14, 0.5, 0.90, 0.10, 0.3, 0.2),  # tie of raters → dropped
    ]
    df = pd.DataFrame(rows, columns=["k_x", "k_y", "R_user", "MS_x_dino", "MS_y_dino", "MS_x_clip", "MS_y_clip"])
    out = ms_user_agreement(df).set_index("bin")
    first = out.iloc[0]
    assert first["n_pairs"] == 4 and first["agreement"] == pytest.approx(0.5)
    assert out.iloc[1]["n_pairs"] == 1 and out.iloc[1]["agreement"] == 1.0
    assert out.iloc[2]["n_pairs"] == 0 and math.isnan(out.iloc[2]["agreement"])
    assert out.iloc[4]["agreement"] == 1.0
    assert out.loc["overall", "n_pairs"] == 6
    assert out.loc["overall", "agreement"] == pytest.approx(4 / 6)
    assert out.loc["uniform over bins", "agreement"] == pytest.approx((0.5 + 1 + 1) / 3)
    # CLIP scorer: MS_x > MS_y everywhere → agreement = share with R_user > .5 = 3/6.
    clip = ms_user_agreement(df, scorer="clip").set_index("bin")
    assert clip.loc["overall", "agreement"] == pytest.approx(3 / 6)
    path = tmp_path / "pairs.csv"
    df.to_csv(path, index=False)
    pd.testing.assert_frame_equal(ms_user_agreement(path).set_index("bin"), out)
    with pytest.raises(ValueError, match="lacks columns"):
        ms_user_agreement(df.drop(columns=["MS_x_dino"]))
    with pytest.raises(FileNotFoundError):
        ms_user_agreement(tmp_path / "nope.csv")
