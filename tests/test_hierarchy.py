"""Taxonomy parsing, LCA depths of top images, per-level aggregates and level links."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from vlmsae_utils import hierarchy as h

A = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax")
B = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "pica")
C = ("Animalia", "Chordata", "Mammalia", "Carnivora", "Felidae", "Felis", "catus")
D = ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina")


def test_parse_inaturalist_folder_names():
    assert h.parse_taxonomy("00042_" + "_".join(A)) == A
    assert h.parse_taxonomy("a/b/c", separator="/", id_prefix=False, num_ranks=3) == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"'00001_Animalia_Chordata_Aves'.*3 taxonomy ranks"):
        h.parse_taxonomy("00001_Animalia_Chordata_Aves")
    with pytest.raises(ValueError, match="numeric id"):
        h.parse_taxonomy("birds_" + "_".join(A))


def test_lca_depth_by_hand():
    assert h.lca_depth(A, A) == 7
    assert h.lca_depth(A, B) == 5
    assert h.lca_depth(A, C) == 2
    assert h.lca_depth(A, D) == 0
    assert h.lca_depth(("x", "y", "z"), ("q", "y", "z")) == 0  # shared later ranks do not count


def test_taxonomy_map_files(tmp_path):
    (tmp_path / "map.csv").write_text("class,path\ncrow,Animalia/Aves/Corvus\nrose,Plantae/Rosales/Rosa\n")
    assert h.load_taxonomy_map(tmp_path / "map.csv")["rose"] == ("Plantae", "Rosales", "Rosa")
    (tmp_path / "map.json").write_text(json.dumps({"crow": ["Animalia", "Aves", "Corvus"]}))
    assert h.load_taxonomy_map(tmp_path / "map.json") == {"crow": ("Animalia", "Aves", "Corvus")}
    (tmp_path / "bad.csv").write_text("crow,Animalia/Aves,extra\n")
    with pytest.raises(ValueError, match="two columns"):
        h.load_taxonomy_map(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="missing from the taxonomy map"):
        h.taxonomy_of_classes(["crow", "owl"], {"crow": ("Animalia",)})


def test_pair_depths_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    paths = [tuple(rng.choice(["a", "b"], size=5)) for _ in range(30)]
    top = rng.integers(0, 30, size=(12, 6))
    depths = h.pair_depths(top, h.rank_codes(paths))
    for latent in range(12):
        expected = [h.lca_depth(paths[top[latent, i]], paths[top[latent, j]]) for i, j in combinations(range(6), 2)]
        assert depths[latent].tolist() == expected


def test_mean_and_majority_depth_on_a_constructed_latent():
    paths = [A, B, C, A, D]
    # latent 0: images A, A, C → pair depths (A,A)=7, (A,C)=2, (A,C)=2 → mean 11/3, rounded 4, majority 2
    # latent 1: images A, B, D → 5, 0, 0 → mean 5/3 → 2, majority 0
    # latent 2: fewer than k positive images (−1) → excluded
    top = np.array([[0, 3, 2], [0, 1, 4], [0, 1, -1]])
    table = h.latent_depths(top, paths)
    assert table.depth_mean[0] == pytest.approx(11 / 3) and table.depth_rounded[0] == 4 and table.depth_majority[0] == 2
    assert table.depth_rounded[1] == 2 and table.depth_majority[1] == 0
    assert table.excluded.tolist() == [False, False, True] and np.isnan(table.depth_mean[2])


def test_majority_ties_follow_counter_most_common():
    """The authors take ``Counter(pair depths).most_common(1)``: a tie goes to the depth seen first."""
    rng = np.random.default_rng(3)
    paths = [tuple(rng.choice(["a", "b", "c"], size=4)) for _ in range(12)]
    top = rng.integers(0, 12, size=(200, 4))  # 6 pairs per latent: ties are common
    table = h.latent_depths(top, paths)
    expected = [
        Counter(h.lca_depth(paths[row[i]], paths[row[j]]) for i, j in combinations(range(4), 2)).most_common(1)[0][0]
        for row in top
    ]
    assert table.depth_majority.astype(int).tolist() == expected


def test_level_summary_equals_a_brute_force_groupby():
    rng = np.random.default_rng(1)
    group_sizes = [2, 5, 9]
    depths = pd.DataFrame(
        {
            "latent": range(16),
            "depth_mean": rng.uniform(0, 7, 16),
            "depth_majority": rng.integers(0, 8, 16).astype(float),
            "excluded": rng.random(16) < 0.25,
        }
    )
    depths["depth_rounded"] = depths.depth_mean.round()
    ms = rng.uniform(-0.1, 1, 16)
    breadth = rng.uniform(0, 1, 16)
    table = h.level_summary(depths, ms, group_sizes, breadth)
    level = np.repeat([0, 1, 2], group_sizes)
    for lv in range(3):
        keep = (level == lv) & ~depths.excluded.to_numpy()
        assert table.loc[lv, "latents"] == group_sizes[lv]
        assert table.loc[lv, "excluded %"] == pytest.approx(100 * depths.excluded[level == lv].mean())
        assert table.loc[lv, "LCA depth (mean)"] == pytest.approx(depths.depth_rounded[keep].mean())
        assert table.loc[lv, "MS max"] == pytest.approx(ms[keep].max())
        assert table.loc[lv, "MS mean"] == pytest.approx(ms[keep].mean())
        assert table.loc[lv, "fires on %"] == pytest.approx(100 * breadth[level == lv].mean())  # excluded too
    assert table.prefix.tolist() == [2, 7, 16]
    with pytest.raises(ValueError, match="cover 15 latents"):
        h.level_summary(depths, ms, [2, 5, 8])


def test_parent_links_find_the_direction_a_child_refines():
    torch.manual_seed(0)
    parents = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    children = torch.stack(
        [parents[1] + 0.1 * torch.randn(8), parents[0] + 0.1 * torch.randn(8), parents[1] + 0.1 * torch.randn(8)]
    )
    decoder = torch.cat([parents, torch.nn.functional.normalize(children, dim=1)])
    codes = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 1.0]])
    links = h.parent_links(decoder, [2, 3], codes)
    assert links.parent.tolist() == [1, 0, 1] and links.child.tolist() == [2, 3, 4]
    # child 2 fires on images 0, 1, both with parent 1 → 1.0; child 4 fires on 1 and 3, parent 1 only on 1 → 0.5
    assert links.coactivation.tolist() == [1.0, 1.0, 0.5]
    assert h.shared_prefix([A, B, A]) == A[:5] and h.shared_prefix([A, D]) == ()


def test_fixture_taxonomy_has_four_informative_ranks(fixture):
    folders = sorted(p.name for p in (fixture.images / "train").iterdir())
    paths = [h.parse_taxonomy(f) for f in folders]
    distinct = [len({p[: r + 1] for p in paths}) for r in range(7)]
    assert distinct[:5] == [1, 2, 4, 8, 16]  # kingdom, then 2 families, 4 shapes, 8 colours, 16 textures


def test_level_trends_state_both_directions_from_the_table():
    table = pd.DataFrame({"LCA depth (mean)": [np.nan, 2.0, 3.5], "fires on %": [90.0, 40.0, 5.0]})
    assert h.level_trends(table) == [
        "LCA depth, coarsest → finest scored level: 2.00 → 3.50 (deeper)",  # the NaN level is skipped
        "fires on % of images, coarsest → finest level: 90.0 → 5.0 (narrower)",
    ]
    flat = pd.DataFrame({"LCA depth (mean)": [3.0, 2.0], "fires on %": [10.0, 30.0]})
    assert [line.split("(")[-1] for line in h.level_trends(flat)] == ["not deeper)", "not narrower)"]


def test_a_sae_without_levels_is_refused_by_name():
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="my/sae is not a Matryoshka SAE"):
        h.matryoshka_group_sizes(plain, "my/sae")
    plain.group_sizes = [2, 6]
    assert h.matryoshka_group_sizes(plain) == [2, 6]


def test_nested_activations_follow_their_taxonomy():
    rows, folders = h.nested_activations((2, 1, 2, 1), per_leaf=6, dim=8, noise=0.0, seed=4)
    paths = h.image_paths_of(folders)
    assert rows.shape == (24, 8) and len(set(folders)) == 4 and all(len(p) == 7 for p in paths)
    assert {p[1] for p in paths} == {"P0", "P1"} and paths[0][:4] == ("Nestia", "P0", "C00", "O000")
    # without noise the 6 rows of a leaf mix only its path's 4 directions; the first two leaves share
    # phylum and class and each adds its own order and family: 6 (float32 rows, hence the tolerance)
    assert int(torch.linalg.matrix_rank(rows[:6], rtol=1e-4)) == 4
    assert int(torch.linalg.matrix_rank(rows[:12], rtol=1e-4)) == 6
    again, _ = h.nested_activations((2, 1, 2, 1), per_leaf=6, dim=8, noise=0.0, seed=4)
    assert torch.equal(rows, again)
    with pytest.raises(ValueError, match="4 positive branching factors"):
        h.nested_activations((2, 3, 3))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_lca_depth_grows_with_the_level_when_concepts_nest_by_construction(tmp_path, seed):
    """Known answer for the whole pipeline (Matryoshka training, top-16 images, LCA depth per level),
    through the public API: on rows whose concepts nest along the taxonomy the first level holds
    phyla (top images from many leaves) and the last the leaves, the trend of the paper's Table A8."""
    from vlmsae_utils.defaults import matryoshka_or_default
    from vlmsae_utils.store import write_rows

    rows, folders = h.nested_activations(seed=seed)
    store = write_rows(tmp_path / "store", rows, folders, params={"nested": seed})
    sae = matryoshka_or_default("", store=store, name=f"nested{seed}")  # chapter 4's settings: ×2, K = 8, 5 levels
    analysis = h.analyse_levels(sae, store, None, h.image_paths_of(store.class_names), device="cpu")
    depth = analysis.table["LCA depth (mean)"]
    assert "MS mean" not in analysis.table
    assert depth.iloc[-1] > depth.iloc[0] + 1.5, depth.tolist()
    # The trend, level by level up to one swap of neighbours: the first levels hold 2 and 4 latents,
    # so their means are noisy (Spearman ρ ≥ 0.9 of depth against level).
    ranks = depth.rank().to_numpy()
    levels = np.arange(1, len(ranks) + 1)
    rho = 1 - 6 * ((ranks - levels) ** 2).sum() / (len(ranks) * (len(ranks) ** 2 - 1))
    assert rho >= 0.9, depth.tolist()
