"""Latent names (issue 31 item 3): the vocabulary method by hand, and measured on the fixture,
whose attributes (shape, colour, texture) are the truth, against names drawn at random."""

from __future__ import annotations

import pytest
import torch

from vlmsae_utils.llava import ClipTextImage
from vlmsae_utils.naming import attribute_vocabulary, name_accuracy, name_by_vocabulary, name_latents

WORDS = ["red", "blue", "round"]


def _judge() -> ClipTextImage:
    """Words are the axes of a 3-d space; an 'image' is its own embedding (a tensor)."""
    axes = {w: torch.eye(3)[i] for i, w in enumerate(WORDS)}
    return ClipTextImage(lambda words: torch.stack([axes[w] for w in words]), lambda images: torch.stack(images))


def test_the_name_is_the_word_nearest_the_mean_top_image_and_the_score_is_against_random_images():
    red_ish = [torch.tensor([1.0, 0.0, 0.2]), torch.tensor([0.8, 0.0, 0.6])]
    baseline = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])]
    table = name_by_vocabulary(_judge(), [red_ish], WORDS, baseline, [7])
    row = table.iloc[0]
    assert (row.latent, row.label, row.runner_up, row.method) == (7, "red", "round", "vocabulary")
    unit = [v / v.norm() for v in red_ish]
    expected = float(torch.stack([u[0] for u in unit]).mean()) - (0.0 + 0.6) / 2  # cos with "red" vs baseline
    assert row.score == pytest.approx(expected, abs=1e-6)


def test_bad_naming_inputs_are_named():
    image = [torch.ones(3)]
    with pytest.raises(ValueError, match="at least two distinct words"):
        name_by_vocabulary(_judge(), [image], ["red", "red"], image)
    with pytest.raises(ValueError, match="baseline_images is empty"):
        name_by_vocabulary(_judge(), [image], WORDS, [])
    with pytest.raises(ValueError, match="latent 3 has no top images"):
        name_by_vocabulary(_judge(), [[]], WORDS, image, [3])
    assert {"red", "grey", "striped", "zigzagged"} <= set(attribute_vocabulary()) and len(attribute_vocabulary()) == 58


@pytest.mark.slow
def test_fixture_latents_are_named_by_the_attribute_their_top_images_share(fixture):
    from vlmsae_utils import defaults
    from vlmsae_utils.fixtures.fit import attribute_truths, attribute_words
    from vlmsae_utils.llava import load_clip_text_image

    store = defaults.default_store("train")
    vocabulary = attribute_words()
    named = name_latents(
        defaults.default_sae(), store, load_clip_text_image("fixture:mini_clip", device="cpu"), vocabulary, device="cpu"
    )
    truths = attribute_truths([[store.class_names[i] for i in named.top_indices[j]] for j in named.names.latent])
    measured = name_accuracy(named.names, truths, vocabulary)
    assert measured["latents"] >= 10
    assert measured["accuracy"] > max(0.6, 2 * measured["random names"])
    sae, judge = defaults.default_sae(), load_clip_text_image("fixture:mini_clip", device="cpu")
    first = name_latents(sae, store, judge, vocabulary, order=range(sae.dict_size - 1, -1, -1), limit=3, device="cpu")
    assert list(first.names.latent) == sorted(named.names.latent, reverse=True)[:3]  # in the order given, 3 of them
    # each distinct top image embedded once, names and scores as latent-by-latent naming gives them
    from vlmsae_utils.naming import random_images
    from vlmsae_utils.scoring import store_image_loader

    embedded = []
    counting = ClipTextImage(
        judge.embed_text, lambda images: embedded.append(len(images)) or judge.embed_images(images)
    )
    once = name_latents(sae, store, counting, vocabulary, limit=12, device="cpu")
    distinct = {i for tops in once.top_indices.values() for i in tops}
    assert sum(embedded) == len(distinct) + 64 < 16 * len(once.names) + 64  # + the 64 baseline images
    load = store_image_loader(store)
    one_by_one = name_by_vocabulary(
        judge,
        [[load(i) for i in once.top_indices[j]] for j in once.names.latent],
        vocabulary,
        random_images(load, len(store.image_ids), 64, 0),
        list(once.names.latent),
    )
    assert list(once.names.label) == list(one_by_one.label) and list(once.names.runner_up) == list(one_by_one.runner_up)
    assert once.names.score.to_numpy() == pytest.approx(one_by_one.score.to_numpy(), abs=1e-5)


def test_a_steered_answer_names_its_latent_scored_like_a_vocabulary_name():
    from vlmsae_utils.naming import name_by_steering

    tops = {3: [torch.tensor([0.0, 0.0, 1.0])], 5: [torch.tensor([1.0, 0.0, 0.0])]}
    baseline = [torch.tensor([0.0, 1.0, 0.0])]
    table = name_by_steering(_judge(), {3: "round thing", 5: "red"}, tops, baseline).set_index("latent")
    assert list(table.label) == ["round", "red"] and set(table.method) == {"steering"}
    assert table.loc[3, "score"] == pytest.approx(1.0) and table.loc[5, "score"] == pytest.approx(1.0)
