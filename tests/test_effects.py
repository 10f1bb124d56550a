"""The embedded default shows the paper's effects (issue 9), measured on the chapters' default runs.

Margins are loose on purpose: they hold across fixture seeds, so a failure means an effect is
gone, not that a number moved.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pandas as pd
import pytest

from vlmsae_utils import hierarchy
from vlmsae_utils.paths import outputs_root
from vlmsae_utils.steering import first_word


def _mean(cell: str) -> float:
    """The mean of a ``mean ± std`` table cell."""
    return float(cell.split("±")[0])


@pytest.mark.slow
def test_sae_latents_are_more_monosemantic_than_neurons(executed_chapters):
    summary = pd.read_csv(outputs_root() / "ms/fixture_mini_clip/ms_summary.csv", index_col=0)
    raw = summary[summary.index.str.startswith("raw")].iloc[0]
    for name, row in summary[~summary.index.str.startswith("raw")].iterrows():
        assert row["MS mean"] > raw["MS mean"] + 0.1, name
        assert row["MS max"] > 0.8 and row["MS max"] > raw["MS max"] + 0.3, name


@pytest.mark.slow
def test_few_latents_share_their_top_images(executed_chapters):
    overlap = pd.read_csv(outputs_root() / "ms/fixture_mini_clip/uniqueness.csv", index_col=0)
    for name, row in overlap[~overlap.index.str.startswith("raw")].iterrows():
        # 3 of 153-171 BatchTopK pairs (1.8-2.0 %) on the fixture, whose SAEs keep only ~18 latents
        # with 16 positive val images: a 2 % bound flipped with float-level changes of the models
        assert row["J > 0.5"] < 0.03 * row["pairs"], name
        assert row["J > 0.8"] == 0, name


@pytest.mark.slow
def test_matryoshka_levels_go_from_broad_to_narrow(executed_chapters):
    levels = pd.read_csv(outputs_root() / "hierarchy/fixture_mini_clip/levels.csv", index_col=0)
    breadth = levels["fires on %"].tolist()
    assert all(a > b for a, b in itertools.pairwise(breadth)), breadth
    assert breadth[0] > 50 and breadth[-1] < 10
    ms = levels["MS mean"].dropna()
    # finer levels are more monosemantic than the coarsest, as in the paper: their mean, since a
    # single level of few live latents moves by ±0.03 with float-level changes of the models
    assert ms.iloc[1:].mean() > ms.iloc[0] + 0.05, ms.tolist()


@pytest.mark.slow
def test_clamping_a_latent_steers_the_answer(executed_chapters):
    folder = outputs_root() / "steer/fixture_mini_llava"
    scores = pd.read_csv(folder / "steering_scores.csv", index_col=0)
    images = scores.iloc[1]
    assert _mean(images["steered"]) > _mean(images["not steered"]) + 0.05
    sweep = pd.read_csv(folder / "alpha_sweep.csv")
    concepts = pd.read_csv(folder / "latent_concepts.csv").set_index("latent")
    strongest = sweep[sweep.alpha == sweep.alpha.max()].set_index("latent").answer
    plain = first_word(scores_plain_answer(folder))
    named = []
    for latent, classes in concepts["top image classes"].items():
        shapes = Counter(hierarchy.parse_taxonomy(c)[2].lower() for c in classes.split())
        answer, most = first_word(strongest[latent]), max(shapes.values())
        # the answer moved away from the plain one to a most common shape of the latent's top images,
        # held by more of them than the 1-in-4 chance (a fixed count of 10 of 16 was a knife edge: on
        # other machines and preprocessing the best latent's shape held 7 or 8 of its 16 images)
        if answer != plain and shapes.get(answer, 0) == most > len(classes.split()) / 4:
            named.append((latent, answer))
    assert named, (plain, strongest.to_dict())


def scores_plain_answer(folder) -> str:
    """The unsteered answer on the white image, as chapter 5 recorded it."""
    return (folder / "plain_answer.txt").read_text()
