"""Tests of vlmsae_utils.sae against hand-written reference formulas (Pach et al. 2025)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from vlmsae_utils.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, ReLUSAE, TopKSAE, load_sae, make_sae, save_sae

D, W = 12, 40


def _randomise(sae, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.input_scale.fill_(scale)
    return sae


def _ref_pre(x, W_enc, b_enc, b_dec, s=1.0):
    # z = ReLU((x·s − b_dec) W_enc + b_enc), written element by element
    B, d = x.shape
    out = torch.zeros(B, W_enc.shape[1], dtype=torch.float64)
    for b in range(B):
        for j in range(W_enc.shape[1]):
            v = sum((float(x[b, i]) * s - float(b_dec[i])) * float(W_enc[i, j]) for i in range(d)) + float(b_enc[j])
            out[b, j] = max(v, 0.0)
    return out


def _ref_dec(f, W_dec, b_dec, s=1.0):
    return (f.double() @ W_dec.double() + b_dec.double()) / s


def test_encode_decode_match_reference_formulas():
    sae = _randomise(TopKSAE(D, W, k=W), scale=0.7)  # k = ω keeps everything: encode = plain ReLU
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    z = _ref_pre(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), 0.7)
    f = sae.encode(x)
    torch.testing.assert_close(f.double(), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sae.decode(f).double(), _ref_dec(z, sae.W_dec.detach(), sae.b_dec.detach(), 0.7), atol=1e-5, rtol=1e-5
    )
    x_hat, f2 = sae(x, output_features=True)
    torch.testing.assert_close(f2, f)
    torch.testing.assert_close(x_hat, sae.decode(f))


def test_batch_topk_keeps_exactly_Bk_in_training_mode():
    sae = BatchTopKSAE(D, W, k=3).train()
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all pre-activations positive
    x = torch.randn(7, D)
    f = sae.encode(x)
    assert int((f != 0).sum()) == 7 * 3
    z = sae.pre_acts(x)
    # kept entries are the 21 largest of the whole batch
    kth = z.flatten().sort(descending=True).values[20]
    assert bool((f[f != 0] >= kth).all())
    assert int((z > kth).sum()) == 20


def test_topk_keeps_k_per_row():
    sae = TopKSAE(D, W, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)
    f = sae.encode(torch.randn(6, D))
    assert (f != 0).sum(1).tolist() == [4] * 6


def test_threshold_inference():
    sae = _randomise(BatchTopKSAE(D, W, k=2)).eval()
    x = torch.randn(9, D)
    z = _ref_pre(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    # threshold unset (-1): falls back to batch top-k even in eval mode
    assert int((sae.encode(x) != 0).sum()) == min(18, int((z > 0).sum()))
    sae.threshold.fill_(0.4)
    f = sae.encode(x)
    torch.testing.assert_close(f.double(), z * (z > 0.4), atol=1e-5, rtol=1e-5)
    # training mode ignores the threshold; explicit use_threshold overrides
    sae.train()
    assert int((sae.encode(x) != 0).sum()) == min(18, int((z > 0).sum()))
    torch.testing.assert_close(sae.encode(x, use_threshold=True), f)


def test_decode_sparse_equals_dense():
    sae = _randomise(BatchTopKSAE(D, W, k=3), scale=2.0).eval()
    x = torch.randn(8, D)
    f = sae.encode(x, use_threshold=False)
    idx, vals = sae.encode_sparse(x, use_threshold=False)
    torch.testing.assert_close(sae.decode_sparse(idx, vals), sae.decode(f), atol=1e-5, rtol=1e-5)
    # hand-made sparse codes with padding (value 0)
    idx = torch.tensor([[0, 5, 39], [7, 7, 0]])
    vals = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 0.0]])
    dense = torch.zeros(2, W)
    dense[0, 0], dense[0, 5], dense[0, 39], dense[1, 7] = 1.0, -2.0, 0.5, 2.0
    torch.testing.assert_close(sae.decode_sparse(idx, vals), sae.decode(dense), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="indices"):
        sae.decode_sparse(torch.tensor([[W]]), torch.tensor([[1.0]]))


def test_matryoshka_prefix_decoding():
    sae = _randomise(MatryoshkaBatchTopKSAE(D, W, k=5, group_sizes=[4, 8, 28]), scale=1.5)
    f = torch.relu(torch.randn(3, W))
    recs = sae.decode_prefixes(f)
    assert len(recs) == 3 and sae.prefix_sizes == [4, 12, 40]
    for m, r in zip([4, 12, 40], recs):
        ref = _ref_dec(f[:, :m], sae.W_dec.detach()[:m], sae.b_dec.detach(), 1.5)
        torch.testing.assert_close(r.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode_prefix(f, m), r)
    torch.testing.assert_close(recs[-1], sae.decode(f))
    with pytest.raises(ValueError, match="group_sizes"):
        MatryoshkaBatchTopKSAE(D, W, k=5, group_sizes=[4, 8])


@pytest.mark.parametrize("kind", ["batch_top_k", "matryoshka_batch_top_k", "top_k", "relu"])
def test_save_load_round_trip(tmp_path, kind):
    sae = _randomise(make_sae(kind, D, W, 3, [10, 30] if kind.startswith("m") else None), scale=0.25)
    sae.threshold.fill_(0.125)
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["type"] == kind and cfg["input_scale"] == 0.25 and cfg["threshold"] == 0.125
    back = load_sae(tmp_path / "s")
    assert type(back) is type(sae) and back.k == sae.k
    assert getattr(back, "group_sizes", None) == getattr(sae, "group_sizes", None)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "input_scale"):
        torch.testing.assert_close(getattr(back, n), getattr(sae, n))
    x = torch.randn(4, D)
    torch.testing.assert_close(back.eval()(x), sae.eval()(x))


def test_dictionary_learning_batchtopk_layout(tmp_path):
    g = torch.Generator().manual_seed(3)
    enc_w, enc_b = torch.randn(W, D, generator=g), torch.randn(W, generator=g) * 0.1
    dec_w, b_dec = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    state = {
        "encoder.weight": enc_w,
        "encoder.bias": enc_b,
        "decoder.weight": dec_w,
        "b_dec": b_dec,
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.3),
    }
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 4}}))
    sae = load_sae(tmp_path)
    assert isinstance(sae, BatchTopKSAE) and sae.k == 4 and float(sae.threshold) == pytest.approx(0.3)
    x = torch.randn(6, D, generator=g)
    z = _ref_pre(x, enc_w.T, enc_b, b_dec)  # ReLU((x − b_dec) W_enc + b_enc), W_enc = encoder.weightᵀ
    f_ref = z * (z > 0.3)
    f = sae.encode(x)
    torch.testing.assert_close(f.double(), f_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.decode(f).double(), f_ref @ dec_w.T.double() + b_dec.double(), atol=1e-4, rtol=1e-4)


def test_dictionary_learning_matryoshka_layout(tmp_path):
    g = torch.Generator().manual_seed(4)
    W_enc, b_enc = torch.randn(D, W, generator=g), torch.randn(W, generator=g) * 0.1
    W_dec, b_dec = torch.randn(W, D, generator=g), torch.randn(D, generator=g)
    state = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "k": torch.tensor(5),
        "threshold": torch.tensor(0.2),
        "group_sizes": torch.tensor([8, 12, 20]),
    }
    torch.save(state, tmp_path / "ae_100.pt")
    sae = load_sae(tmp_path / "ae_100.pt")
    assert isinstance(sae, MatryoshkaBatchTopKSAE) and sae.group_sizes == [8, 12, 20] and sae.k == 5
    x = torch.randn(6, D, generator=g)
    z = _ref_pre(x, W_enc, b_enc, b_dec)
    f_ref = z * (z > 0.2)
    torch.testing.assert_close(sae.encode(x).double(), f_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x).double(), f_ref @ W_dec.double() + b_dec.double(), atol=1e-4, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "empty")
    # pickled object refused
    torch.save({"encoder.weight": torch.zeros(2, 2), "obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_sae(tmp_path / "evil.pt")
    # unknown keys
    base = {
        "W_enc": torch.zeros(D, W),
        "b_enc": torch.zeros(W),
        "W_dec": torch.zeros(W, D),
        "b_dec": torch.zeros(D),
        "k": torch.tensor(3),
    }
    torch.save({**base, "extra": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unknown keys"):
        load_sae(tmp_path / "extra.pt")
    # shape mismatch
    torch.save({**base, "b_dec": torch.zeros(D + 1)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape"):
        load_sae(tmp_path / "shape.pt")
    # unrelated layout
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pt")
    with pytest.raises(ValueError, match="layout"):
        load_sae(tmp_path / "foo.pt")


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="k must"):
        BatchTopKSAE(D, W, k=W + 1)
    with pytest.raises(ValueError, match="k must"):
        TopKSAE(D, W, k=0)
    with pytest.raises(ValueError, match="unknown sae_type"):
        make_sae("jumprelu", D, W)
    with pytest.raises(ValueError, match="activation_dim"):
        BatchTopKSAE(D, W, k=2).encode(torch.randn(2, D + 1))
    assert ReLUSAE(D, W).k is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dict_size": None}, "'dict_size' must be a positive integer, got None"),
        ({"k": None}, "'k' must be a positive integer, got None"),
        ({"k": True}, "'k' must be a positive integer, got True"),
        ({"k": 99}, "'k' must be at most dict_size 16"),
        ({"input_scale": 0}, "'input_scale' must be a positive finite number, got 0"),
        ({"threshold": float("nan")}, "'threshold' must be a finite number"),
    ],
)
def test_a_saved_config_is_checked_key_by_key_on_load(tmp_path, change, message):
    import json

    from vlmsae_utils.sae import BatchTopKSAE, load_sae, save_sae

    folder = save_sae(BatchTopKSAE(4, 16, k=2), tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sae(folder)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmsae_utils.sae import BatchTopKSAE, load_sae, save_sae

    folder = save_sae(BatchTopKSAE(4, 16, k=2), tmp_path / "sae")
    state = load_file(str(folder / "sae.safetensors"))
    state["W_dec"][3, 1] = float("nan")
    save_file(state, str(folder / "sae.safetensors"))
    config = json.loads((folder / "config.json").read_text())  # the digest of the NaN file: it passes
    config["weights_sha256"] = hashlib.sha256((folder / "sae.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensor 'W_dec' holds NaN or infinite values"):
        load_sae(folder)
