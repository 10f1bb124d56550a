"""The authors' metric benchmark as a check (issue 30 item 3), on a small folder in their layout
whose published MS are the brute-force formula of the paper (§4), computed here independently."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vlmsae_utils.benchmark import benchmark_check
from vlmsae_utils.metrics import ms_brute_force

IDS = [3, 7, 11, 20, 42]
PAIRS = [(3, 7, 1.0), (11, 20, 0.0), (42, 3, 2 / 3), (7, 20, 1 / 3)]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.standard_normal((30, len(IDS))), 0) * rng.uniform(0.5, 3, len(IDS))
    embeddings = {"dino": rng.standard_normal((30, 8)), "clip": rng.standard_normal((30, 6))}
    table = pd.DataFrame(acts.T, columns=[f"a_{i + 1}" for i in range(30)]).assign(k=IDS)
    table[["k", *table.columns[:-1]]].to_csv(tmp_path / "activations.csv", index=False)
    ms = {
        s: dict(zip(IDS, ms_brute_force(torch.tensor(acts), torch.tensor(e)).tolist())) for s, e in embeddings.items()
    }
    rows = [
        {
            "k_x": x,
            "k_y": y,
            "R_user": r,
            **{f"MS_{side}_{s}": ms[s][n] for s in ms for side, n in (("x", x), ("y", y))},
        }
        for x, y, r in PAIRS
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path, embeddings


def test_our_ms_matches_the_published_one_and_a_changed_value_shows(folder):
    path, embeddings = folder
    report = benchmark_check(path, embeddings, device="cpu").set_index("scorer")
    assert list(report.index) == ["dino", "clip"] and (report["neurons"] == 5).all()
    assert (report["max |Δ MS|"] < 1e-6).all()  # float32 products against the float64 brute force
    assert (report["agreement (authors' MS)"] == report["agreement (our MS)"]).all()
    pairs = pd.read_csv(path / "pairs.csv")
    pairs.loc[pairs.k_x == 3, "MS_x_dino"] += 0.1  # the authors' value of neuron 3, everywhere it appears
    pairs.loc[pairs.k_y == 3, "MS_y_dino"] += 0.1
    pairs.to_csv(path / "pairs.csv", index=False)
    report = benchmark_check(path, {"dino": embeddings["dino"]}, device="cpu").iloc[0]
    assert report["max |Δ MS|"] == pytest.approx(0.1, abs=1e-6)
    assert report["mean |Δ MS|"] == pytest.approx(0.1 / 5, abs=1e-6)


def test_bad_benchmark_folders_are_named(folder, tmp_path):
    path, embeddings = folder
    with pytest.raises(ValueError, match="the benchmark has 30 images"):
        benchmark_check(path, {"dino": embeddings["dino"][:29]}, device="cpu")
    pairs = pd.read_csv(path / "pairs.csv")
    pairs.loc[0, "MS_x_dino"] += 0.5  # neuron 3 given two values
    pairs.to_csv(path / "pairs.csv", index=False)
    with pytest.raises(ValueError, match=r"neuron\(s\) \[3\] different MS_dino values"):
        benchmark_check(path, {"dino": embeddings["dino"]}, device="cpu")
    (path / "activations.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"activations\.csv is missing"):
        benchmark_check(path, embeddings, device="cpu")
