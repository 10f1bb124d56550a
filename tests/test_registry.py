"""The SAE registry and TrainConfig: a type defined here, with no package edit, trains, saves, loads and
is scored; training settings are validated in one place and their defaults live there once."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_store

from vlmsae_utils import metrics, scoring, sweep
from vlmsae_utils.sae import (
    SAE_CLASSES,
    SAE_LABELS,
    SAE_TYPES,
    BaseSAE,
    BatchTopKSAE,
    load_sae,
    make_sae,
    register_sae,
    sae_class,
    save_sae,
    unregister_sae,
)
from vlmsae_utils.train import TrainConfig, sae_loss, train_grid, train_sae

D = 16
THETA = 0.05


class ThresholdSAE(BaseSAE):
    """Toy JumpReLU-like type: a latent fires when its pre-activation exceeds a fixed θ, in training and inference."""

    sae_type = "toy_threshold"
    label = "Threshold"
    needs_k = False

    def select(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z > THETA)


@pytest.fixture
def toy_type():
    """Register the toy type for one test and remove it afterwards, so other tests never see it."""
    register_sae(ThresholdSAE)
    yield ThresholdSAE
    unregister_sae(ThresholdSAE.sae_type)
    assert ThresholdSAE.sae_type not in SAE_TYPES


def _planted(n: int, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of 32 unit atoms in R^16, plus noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=1)
    idx = torch.rand(n, 32, generator=g).argsort(dim=1)[:, :3]
    coef = torch.rand(n, 3, generator=g) + 0.5
    return (coef[:, :, None] * atoms[idx]).sum(1) + 0.01 * torch.randn(n, D, generator=g)


def _toy_codes(sae: BaseSAE, x: torch.Tensor) -> torch.Tensor:
    """The toy rule by hand: ``z = ReLU((x·s − b_dec) W_enc + b_enc)``, kept where ``z > θ``."""
    with torch.no_grad():
        z = torch.relu((x * sae.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return z * (z > THETA)


def test_registered_type_is_known_everywhere(toy_type):
    assert "toy_threshold" in SAE_TYPES and SAE_TYPES[-1] == "toy_threshold"
    assert SAE_CLASSES["toy_threshold"] is toy_type and sae_class("toy_threshold") is toy_type
    assert SAE_LABELS["toy_threshold"] == "Threshold"
    assert TrainConfig(sae_type="toy_threshold", k=None).k is None  # a type without k takes none
    sae = make_sae("toy_threshold", D, 32)
    assert type(sae) is toy_type and sae.k is None


def test_toy_type_trains_saves_loads_and_is_scored(tmp_path, toy_type):
    x = _planted(600)
    store = write_store(tmp_path / "store", x, shard_images=200)
    sae, hist = train_sae(
        store, "toy_threshold", 2, steps=80, batch_size=64, lr=3e-3, eval_every=10, progress=False, device="cpu"
    )
    assert type(sae) is toy_type and sae.dict_size == 2 * D
    assert hist["loss"].iloc[-1] < 0.5 * hist["loss"].iloc[0]  # it learns
    assert (hist["threshold"] == -1.0).all()  # no threshold EMA for a type without uses_threshold

    save_sae(sae, tmp_path / "toy")
    back = load_sae(tmp_path / "toy")
    assert type(back) is toy_type
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name

    codes = scoring.sae_codes(back, store, batch_size=128, device="cpu")
    expected = _toy_codes(back, x)
    assert 0 < codes.nnz < expected.numel()  # sparse, not empty
    torch.testing.assert_close(codes.to_dense(), expected, rtol=1e-5, atol=1e-6)

    emb = torch.randn(len(x), 5, generator=torch.Generator().manual_seed(3))
    report = scoring.score_neurons("toy", codes, emb, top_k=3, device="cpu")
    torch.testing.assert_close(
        report.ms, metrics.monosemanticity_score(expected, emb, device="cpu"), equal_nan=True, rtol=1e-6, atol=1e-6
    )


def test_toy_type_sparse_loss_equals_dense_autograd(toy_type):
    """The default sparse path (nonzeros of select, gradient only through them) is the dense loss."""
    sae = make_sae("toy_threshold", D, 32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.input_scale.fill_(0.8)
    x = torch.randn(12, D, generator=g)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::4] = True
    out = sae_loss(sae, x, dead_mask=dead, k_aux=3, aux_alpha=0.0)
    grads = torch.autograd.grad(out["loss"], params)
    xs = x * 0.8
    z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = z * (z > THETA).detach()
    ref = (xs - (f @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert out["l0"] == pytest.approx(float((f > 0).sum()) / 12)


def test_train_grid_labels_a_registered_type(tmp_path, toy_type):
    x = _planted(200)
    results, _ = train_grid(
        x, x[:64], ["toy_threshold"], [2], tmp_path / "grid", device="cpu", steps=3, batch_size=32, progress=False
    )
    assert results["SAE"].tolist() == ["Threshold"] and results["k"].tolist() == [TrainConfig().k]


def test_register_sae_is_a_decorator_and_checks_the_class():
    try:

        @register_sae
        class Tmp(BaseSAE):
            sae_type = "tmp_dense"
            label = "Tmp"
            needs_k = False
            sparse_training = False

        assert sae_class("tmp_dense") is Tmp and SAE_LABELS["tmp_dense"] == "Tmp"
        assert register_sae(Tmp) is Tmp  # registering the same class again is harmless
    finally:
        unregister_sae("tmp_dense")
    assert "tmp_dense" not in SAE_TYPES and "tmp_dense" not in SAE_LABELS
    with pytest.raises(ValueError, match="unknown sae_type 'tmp_dense'"):
        make_sae("tmp_dense", D, 32)

    class Clash(BatchTopKSAE):
        sae_type = "batch_top_k"
        label = "Other"

    class NoLabel(BatchTopKSAE):  # would inherit "BatchTopK" as its table label
        sae_type = "no_label"

    class NoName(BaseSAE):
        label = "No name"

    class SameDL(BatchTopKSAE):
        sae_type = "same_dl"
        label = "Same DL"
        dl_class = "BatchTopKSAE"

    with pytest.raises(
        ValueError, match=r"'batch_top_k' is already registered by vlmsae_utils\.sae\.registry\.BatchTopKSAE"
    ):
        register_sae(Clash)
    with pytest.raises(ValueError, match="NoLabel must declare its own label"):
        register_sae(NoLabel)
    with pytest.raises(ValueError, match="NoName must declare its own sae_type"):
        register_sae(NoName)
    with pytest.raises(ValueError, match="dictionary_learning class 'BatchTopKSAE' already loads as 'batch_top_k'"):
        register_sae(SameDL)
    with pytest.raises(TypeError, match="subclass of BaseSAE"):
        register_sae(torch.nn.Linear)
    assert list(SAE_TYPES) == ["batch_top_k", "matryoshka_batch_top_k", "top_k", "relu"]
    assert SAE_TYPES == ("batch_top_k", "matryoshka_batch_top_k", "top_k", "relu")


def test_builtin_registry_entries():
    assert dict(SAE_LABELS) == {
        "batch_top_k": "BatchTopK",
        "matryoshka_batch_top_k": "Matryoshka",
        "top_k": "TopK",
        "relu": "ReLU",
    }
    from vlmsae_utils.sae.registry import _DL_DICT_CLASS_TO_TYPE

    assert dict(_DL_DICT_CLASS_TO_TYPE) == {
        "BatchTopKSAE": "batch_top_k",
        "MatryoshkaBatchTopKSAE": "matryoshka_batch_top_k",
        "AutoEncoderTopK": "top_k",
        "AutoEncoder": "relu",
    }
    with pytest.raises(TypeError):
        SAE_CLASSES["x"] = BatchTopKSAE  # read-only: types are added with register_sae


# ----- TrainConfig --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sae_type": "gated"}, r"unknown sae_type 'gated'; valid: batch_top_k, matryoshka_batch_top_k, top_k, relu"),
        ({"k": 0}, r"k must be an integer >= 1, got 0"),
        ({"k": 2.5}, r"k must be an integer >= 1, got 2.5"),
        ({"k": True}, r"k must be an integer >= 1, got True"),
        ({"k": None}, r"k must be an integer >= 1, got None"),  # batch_top_k needs k
        ({"expansion": 0}, r"expansion must be a number > 0, got 0"),
        ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
        ({"batch_size": "big"}, r"batch_size must be an integer >= 1, got 'big'"),
        ({"lr": -1e-3}, r"lr must be a number >= 0 or None, got -0.001"),
        ({"group_fractions": [1.0]}, r"group_fractions only apply to 'matryoshka_batch_top_k', not 'batch_top_k'"),
        ({"sae_type": "matryoshka_batch_top_k", "group_fractions": [0.5, 0.4]}, r"must sum to 1"),
        ({"sae_type": "matryoshka_batch_top_k", "group_fractions": [0.5, -0.5, 1.0]}, r"must be positive"),
        ({"decay_start": 1.5}, r"decay_start as a fraction of steps must be in \[0, 1\], got 1.5"),
        ({"threshold_beta": 1.5}, r"threshold_beta must be a number in \[0, 1\], got 1.5"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0 or None, got -1"),
        ({"eval_every": 0}, r"eval_every must be an integer >= 1 or None, got 0"),
        ({"aux_alpha": float("nan")}, r"aux_alpha must be a number >= 0, got nan"),
        ({"autocast": "yes"}, r"autocast must be None, True or False, got 'yes'"),
        ({"data_on_device": "yes"}, r"data_on_device must be 'auto', True or False, got 'yes'"),
        ({"memory_fraction": 0}, r"memory_fraction must be a number in \(0, 1\], got 0"),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_train_config_width_checks_frozen_and_unknown_fields():
    cfg = TrainConfig(sae_type="matryoshka_batch_top_k", expansion=2, k=3, group_fractions=[0.25, 0.75])
    assert cfg.group_fractions == (0.25, 0.75)  # normalised to a tuple
    assert cfg.sizes(16) == (32, [8, 24])
    assert TrainConfig(sae_type="matryoshka_batch_top_k", expansion=2).sizes(16)[1] == [2, 4, 8, 18]  # paper groups
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, dict_size=32\], got 33"):
        TrainConfig(expansion=2, k=33).sizes(16)
    with pytest.raises(ValueError, match="empty group"):
        TrainConfig(sae_type="matryoshka_batch_top_k", group_fractions=[0.01, 0.99]).sizes(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 4
    with pytest.raises(TypeError, match=r"unknown training setting\(s\) \['kk'\]; TrainConfig fields: sae_type"):
        cfg.updated(kk=4)
    with pytest.raises(TypeError, match="unknown training setting"):
        train_sae(torch.randn(64, D), "batch_top_k", kk=4)
    assert cfg.updated(k=5) == dataclasses.replace(cfg, k=5) and cfg.k == 3


def test_every_default_lives_in_train_config_once():
    """No other signature carries a training default: train_sae without k trains TrainConfig().k, the
    SAE classes and make_sae require k, and TrainConfig's defaults are the authors'."""
    defaults = TrainConfig()
    assert (defaults.k, defaults.aux_alpha, defaults.decay_start, defaults.lr) == (20, 0.03, None, None)
    x = _planted(256)
    sae, _ = train_sae(x, "batch_top_k", 2, steps=1, batch_size=32, progress=False, device="cpu")
    assert sae.k == defaults.k
    sae, _ = train_sae(
        x, TrainConfig(sae_type="top_k", expansion=2, k=5, steps=1, batch_size=32), progress=False, device="cpu"
    )
    assert sae.k == 5 and sae.sae_type == "top_k"
    for cls in SAE_CLASSES.values():
        if cls.needs_k:
            assert inspect.signature(cls).parameters["k"].default is inspect.Parameter.empty, cls
    assert "k" not in inspect.signature(train_sae).parameters
    with pytest.raises(ValueError, match="sae_type 'top_k' needs k"):
        make_sae("top_k", D, 32)
    assert make_sae("relu", D, 32).k is None


def test_sweep_sae_section_is_typed_and_checked_by_train_config(tmp_path):
    # every key besides the grid's is a TrainConfig setting, typed by TrainConfig's annotation
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "fixture.yaml").read_text())
    for changes, message in (
        ({"k": 0}, r"bad.yaml.sae: k must be an integer >= 1, got 0"),
        ({"types": ["gated"]}, r"bad.yaml.sae.types: unknown SAE type\(s\) \['gated'\]"),
        ({"group_fractions": [0.5, 0.4]}, r"bad.yaml.sae: group_fractions must sum to 1"),
        ({"k": "eight"}, r"bad.yaml.sae.k: expected int or list of int, got 'eight'"),
        ({"lr": "fast"}, r"bad.yaml.sae.lr: expected number or null, got 'fast'"),
        ({"data_on_device": 2}, r"bad.yaml.sae.data_on_device: expected bool or str, got 2"),
        ({"l1": 0.1}, r"bad.yaml.sae: unknown key\(s\) \['l1'\]"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**config, "sae": {**config["sae"], **changes}}))
        with pytest.raises(sweep.ConfigError, match=message):
            sweep.load_config(path)
