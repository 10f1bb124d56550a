"""Steering LLaVA through an SAE in its vision tower: exact splicing, restoration, batching, scores."""

from __future__ import annotations

import re

import pytest
import torch

from vlmsae_utils import hooks, labels, steering
from vlmsae_utils.metrics import SparseCodes
from vlmsae_utils.sae import BatchTopKSAE, load_sae, save_sae

LAYER = 2  # the fixture LLaVA reads block 2 (vision_feature_layer = -2 of 4 blocks)


@pytest.fixture(scope="module")
def llava(fixture):
    return steering.load_llava("fixture:llava")


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    model = BatchTopKSAE(32, 64, k=4)
    model.threshold.fill_(0.05)
    return model.eval()


@pytest.fixture(scope="module")
def pixels(llava, val_images):
    _, processor = llava
    return processor.image_processor(images=val_images[:3], return_tensors="pt")["pixel_values"]


def _hidden_states(model, pixels):
    with torch.inference_mode():
        return model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states


def _logits(model, processor, images):
    inputs = steering.prepare_inputs(processor, images, steering.DEFAULT_PROMPT)
    with torch.inference_mode():
        return model(**inputs).logits


def test_feature_block_of_the_fixture(llava):
    assert steering.feature_block(llava[0]) == LAYER


def test_only_the_chosen_block_changes(llava, sae, pixels):
    model, _ = llava
    before = _hidden_states(model, pixels)
    with steering.steer(model, sae, LAYER, {5: 3.0}):
        during = _hidden_states(model, pixels)
    for i in range(LAYER + 1):  # hidden_states[i] is the input of block i
        assert torch.equal(during[i], before[i])
    h = before[LAYER + 1].reshape(-1, 32)
    codes = sae.encode(h)
    codes[:, 5] = 3.0
    expected = sae.decode(codes).reshape(before[LAYER + 1].shape)
    torch.testing.assert_close(during[LAYER + 1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(during[LAYER + 1], before[LAYER + 1])


def test_model_is_restored_exactly_also_after_an_error(llava, sae, val_images):
    model, processor = llava
    hooks_before = len(steering.vision_tower(model).blocks[LAYER]._forward_hooks)
    reference = _logits(model, processor, val_images[:2])
    with steering.steer(model, sae, LAYER, {1: 10.0}):
        steered = _logits(model, processor, val_images[:2])
    assert not torch.equal(steered, reference)
    assert torch.equal(_logits(model, processor, val_images[:2]), reference)
    with pytest.raises(RuntimeError, match="boom"), steering.steer(model, sae, LAYER, {1: 10.0}):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, processor, val_images[:2]), reference)
    assert len(steering.vision_tower(model).blocks[LAYER]._forward_hooks) == hooks_before


def test_error_preserving_with_the_latents_own_value_changes_nothing(llava, sae, pixels, val_images):
    model, processor = llava
    h = _hidden_states(model, pixels)[LAYER + 1].reshape(-1, 32)
    silent = int((sae.encode(h) == 0).all(dim=0).nonzero()[0])  # a latent that is 0 on every token
    reference = _logits(model, processor, val_images[:3])
    with steering.steer(model, sae, LAYER, {silent: 0.0}, mode="error_preserving"):
        assert torch.equal(_logits(model, processor, val_images[:3]), reference)
    with steering.steer(model, sae, LAYER, {silent: 0.0}, mode="replace"):
        assert not torch.equal(_logits(model, processor, val_images[:3]), reference)  # the SAE error is lost


def test_pre_zero_keeps_only_the_clamped_latent(sae):
    hidden = torch.randn(2, 3, 32)
    out = steering.steered_block_output(hidden, sae, [{7: 2.0}, {}], "pre_zero")
    expected_row0 = sae.decode(torch.zeros(64).index_fill(0, torch.tensor([7]), 2.0))
    torch.testing.assert_close(out[0], expected_row0.expand(3, 32), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1], sae.decode(torch.zeros(64)).expand(3, 32), atol=1e-6, rtol=1e-6)


def test_batched_sweep_equals_one_at_a_time(llava, sae, val_images):
    model, processor = llava
    images = val_images[:2]
    sweep = steering.latent_sweep(
        model, processor, sae, LAYER, images, latents=[3, 9], alphas=[-20.0, 20.0], max_new_tokens=3, batch_size=8
    )
    assert len(sweep) == 8
    for row in sweep:
        single = steering.generate(
            model,
            processor,
            [images[row["image"]]],
            max_new_tokens=3,
            sae=sae,
            layer=LAYER,
            clamp={row["latent"]: row["alpha"]},
        )
        assert single == [row["answer"]], row


def test_diffmean_vector_is_the_difference_of_block_means(llava, pixels):
    model, _ = llava
    vector = steering.diffmean_vector(model, pixels[:2], pixels[2:], LAYER)
    states = _hidden_states(model, pixels)[LAYER + 1]
    torch.testing.assert_close(vector, states[:2].mean((0, 1)) - states[2:].mean((0, 1)), atol=1e-6, rtol=1e-6)
    with steering.add_vector(model, LAYER, vector, scale=2.0):
        shifted = _hidden_states(model, pixels)[LAYER + 1]
    torch.testing.assert_close(shifted, states + 2.0 * vector, atol=1e-5, rtol=1e-5)


def test_steering_score_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    top = torch.tensor([[0, 1], [2, -1]])
    concepts = steering.concept_embeddings(images, top)  # raw embeddings averaged, as the authors
    torch.testing.assert_close(concepts, torch.tensor([[0.5, 1.0], [3.0, 3.0]]))
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = steering.steering_scores(texts, concepts)
    torch.testing.assert_close(scores, torch.tensor([0.5 / 1.25**0.5, 2**-0.5]))
    base = steering.class_name_baseline(images, torch.eye(2), labels=[0, 1, 1], seed=0)
    torch.testing.assert_close(base["true class"], torch.tensor([1.0, 1.0, 2**-0.5]))
    torch.testing.assert_close(base["shuffled class"], torch.tensor([0.0, 0.0, 2**-0.5]))
    assert steering.first_word("  Triangle, red.") == "triangle" and steering.first_word("...") == ""
    # the score embeds the authors' split(" ")[0], verbatim
    assert [steering.verbatim_first_word(a) for a in ("Triangle, red.", "Dog.", "", "a\nb c")] == [
        "Triangle,",
        "Dog.",
        "",
        "a\nb",
    ]


def test_bad_latent_width_mode_and_block(llava, sae):
    model, _ = llava
    with pytest.raises(ValueError, match="out of range"), steering.steer(model, sae, LAYER, {64: 1.0}):
        pass
    with (
        pytest.raises(ValueError, match="reads 16-d"),
        steering.steer(model, BatchTopKSAE(16, 32, k=2), LAYER, {0: 1.0}),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown steering mode"),
        steering.steer(model, sae, LAYER, {0: 1.0}, mode="add"),
    ):
        pass
    with pytest.raises(ValueError, match="cannot change the answer"), steering.steer(model, sae, 3, {0: 1.0}):
        pass


def test_an_sae_trained_at_another_block_is_refused(llava):
    """Issue 32: an SAE from block 1 has the width of block 2's output but was never trained there."""
    from vlmsae_utils.sae import ProvenanceError

    model, _ = llava
    elsewhere = BatchTopKSAE(32, 64, k=4).eval()
    elsewhere.provenance = {"encoder": "fixture:llava-tower", "hook": "post_mlp_residual", "layer": 1}
    message = re.escape("layer 1 (SAE) vs 2")
    with pytest.raises(ProvenanceError, match=message), steering.steer(model, elsewhere, LAYER, {0: 1.0}):
        pass
    elsewhere.provenance["layer"] = LAYER  # the block it was trained at: steering goes ahead
    with steering.steer(model, elsewhere, LAYER, {0: 1.0}):
        pass


# ----------------------------------------------------------------------------- α units (issue 14, item 1)


def _same_function_two_formats(tmp_path, scale: float):
    """One SAE as a dictionary_learning ``ae.pt`` (input_scale 1) and as our folder with
    ``input_scale = scale``: our biases and threshold are ``scale`` times theirs, so both compute
    the same reconstruction of raw inputs and our codes are ``scale`` times theirs."""
    torch.manual_seed(1)
    d, w, theta = 32, 64, 0.05
    W_enc, W_dec = torch.randn(d, w) / d**0.5, torch.randn(w, d) / d**0.5
    b_enc, b_dec = 0.1 * torch.randn(w), 0.1 * torch.randn(d)
    torch.save(
        {
            "encoder.weight": W_enc.T.contiguous(),
            "encoder.bias": b_enc,
            "decoder.weight": W_dec.T.contiguous(),
            "b_dec": b_dec,
            "k": torch.tensor(4),
            "threshold": torch.tensor(theta),
        },
        tmp_path / "ae.pt",
    )
    imported = load_sae(tmp_path / "ae.pt")
    ours = BatchTopKSAE(d, w, k=4)
    with torch.no_grad():
        ours.W_enc.copy_(W_enc), ours.W_dec.copy_(W_dec)
        ours.b_enc.copy_(b_enc * scale), ours.b_dec.copy_(b_dec * scale)
        ours.threshold.fill_(theta * scale), ours.input_scale.fill_(scale)
    ours = load_sae(save_sae(ours, tmp_path / "ours"))
    reference = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "theta": theta}
    return imported, ours, reference


def test_clamp_codes_converts_raw_alpha_to_code_units():
    codes = torch.arange(24.0).reshape(2, 3, 4)
    out = steering.clamp_codes(codes, [{1: 2.0}, {3: -4.0}], "replace", scale=0.5)
    expected = codes.clone()
    expected[0, :, 1], expected[1, :, 3] = 1.0, -2.0
    assert torch.equal(out, expected)
    zeroed = steering.clamp_codes(codes, [{1: 2.0}, {}], "pre_zero", scale=3.0)
    assert zeroed[0, :, 1].tolist() == [6.0] * 3 and zeroed.abs().sum() == 18.0


def test_same_clamp_on_imported_and_rescaled_sae_gives_the_same_block_output(tmp_path, llava, pixels):
    scale = 0.125
    imported, ours, ref = _same_function_two_formats(tmp_path, scale)
    assert float(imported.input_scale) == 1.0 and float(ours.input_scale) == scale
    hidden = _hidden_states(llava[0], pixels)[LAYER + 1]
    flat = hidden.reshape(-1, 32)
    torch.testing.assert_close(ours.encode(flat), scale * imported.encode(flat), atol=1e-5, rtol=1e-5)

    # Hand-computed from the dictionary_learning formulas in raw units: latent 5 set to α = 100.
    z = torch.relu((flat - ref["b_dec"]) @ ref["W_enc"] + ref["b_enc"])
    z = z * (z > ref["theta"])
    z[:, 5] = 100.0
    by_hand = (z @ ref["W_dec"] + ref["b_dec"]).reshape(hidden.shape)
    for mode in steering.STEER_MODES:
        a = steering.steered_block_output(hidden, imported, [{5: 100.0}] * len(hidden), mode)
        b = steering.steered_block_output(hidden, ours, [{5: 100.0}] * len(hidden), mode)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        steering.steered_block_output(hidden, ours, [{5: 100.0}] * len(hidden), "replace"),
        by_hand,
        atol=1e-4,
        rtol=1e-5,
    )
    # Through the LLaVA hook: the steered block output (and hence the answer) is the same.
    model = llava[0]
    with steering.steer(model, imported, LAYER, {5: 100.0}):
        via_imported = _hidden_states(model, pixels)[LAYER + 1]
    with steering.steer(model, ours, LAYER, {5: 100.0}):
        via_ours = _hidden_states(model, pixels)[LAYER + 1]
    torch.testing.assert_close(via_ours, via_imported, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(via_ours, by_hand, atol=1e-4, rtol=1e-5)


def test_alpha_units_max_is_the_largest_code_in_raw_units():
    sae = BatchTopKSAE(4, 3, k=1)
    sae.input_scale.fill_(0.25)
    dense = torch.tensor([[0.0, 2.0, 0.0], [8.0, 0.0, 0.0], [4.0, 6.0, 0.0]])
    codes = SparseCodes.from_dense(dense)
    assert steering.alpha_units(sae, codes, [0, 1, 2], "max") == {0: 32.0, 1: 24.0, 2: 0.0}
    assert steering.alpha_units(sae, codes, [0, 2], "absolute") == {0: 1.0, 2: 1.0}
    # α = 1 in these units clamps at exactly the largest code, whatever the scale
    clamped = steering.clamp_codes(torch.zeros(1, 1, 3), [{0: 1.0 * 32.0}], "replace", steering.code_scale(sae))
    assert float(clamped[0, 0, 0]) == 8.0
    with pytest.raises(ValueError, match="alpha_scale"):
        steering.alpha_units(sae, codes, [0], "relative")


# ----------------------------------------------------------------------------- concept images (item 2)


def _random_codes(seed: int):
    """Sparse non-negative codes of 11 images with 0–4 rows each (image 3 has none)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [2, 1, 4, 0, 3, 2, 1, 4, 2, 3, 1]
    image = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
    dense = torch.rand(len(image), 9, generator=generator)
    dense = dense * (torch.rand(dense.shape, generator=generator) < 0.35)
    return dense, image, rows


def _brute_force_top(dense, image, rows, k, pool):
    """Per image pooled dense codes, then per latent the positive images sorted by value."""
    pooled = torch.zeros(len(rows), dense.shape[1], dtype=torch.float64)
    for i, n in enumerate(rows):
        block = dense[image == i].double()
        if n:
            pooled[i] = block.mean(0) if pool == "mean" else block.max(0).values
    tops = []
    for j in range(dense.shape[1]):
        ranked = sorted(((float(pooled[i, j]), i) for i in range(len(rows)) if pooled[i, j] > 0), reverse=True)[:k]
        tops.append(ranked)
    return pooled, tops


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_concept_top_images_against_dense_brute_force(pool):
    for seed in range(3):
        dense, image, rows = _random_codes(seed)
        top = steering.concept_top_images(SparseCodes.from_dense(dense), image.numpy(), top_k=5, pool=pool)
        _, expected = _brute_force_top(dense, image, rows, 5, pool)
        for j, ranked in enumerate(expected):
            got = [(float(v), int(i)) for v, i in zip(top.values[j], top.indices[j]) if i >= 0]
            assert [i for _, i in got] == [i for _, i in ranked], (seed, j)
            torch.testing.assert_close(
                torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in ranked]), atol=1e-6, rtol=1e-6
            )
            assert top.indices[j, len(ranked) :].eq(-1).all() and int(top.count_positive[j]) == sum(
                1 for i in range(len(rows)) if (dense[image == i, j] > 0).any()
            )


def test_mean_pool_in_small_chunks_equals_the_dense_mean():
    dense, image, rows = _random_codes(7)
    pooled, _ = _brute_force_top(dense, image, rows, 1, "mean")
    for chunk in (1, 3, 1000):
        got = steering._mean_pool(SparseCodes.from_dense(dense), image, chunk_rows=chunk).to_dense()
        torch.testing.assert_close(got.double(), pooled, atol=1e-6, rtol=1e-6)


def test_mean_and_max_pool_rank_differently_by_hand():
    # image 0: a single strong token (5, 0) → mean 2.5, max 5; image 1: covered (3, 3) → mean 3, max 3
    codes = SparseCodes.from_dense(torch.tensor([[5.0], [0.0], [3.0], [3.0]]))
    image = [0, 0, 1, 1]
    mean = steering.concept_top_images(codes, image, top_k=2)  # the authors' default
    assert mean.indices[0].tolist() == [1, 0] and mean.values[0].tolist() == [3.0, 2.5]
    peak = steering.concept_top_images(codes, image, top_k=2, pool="max")
    assert peak.indices[0].tolist() == [0, 1] and peak.values[0].tolist() == [5.0, 3.0]
    with pytest.raises(ValueError, match="pool"):
        steering.concept_top_images(codes, image, pool="sum")
    with pytest.raises(ValueError, match="non-decreasing"):
        steering.concept_top_images(codes, [1, 1, 0, 0])


# ----------------------------------------------------------------------------- class names (item 3)


def test_class_text_is_readable_on_real_folders(fixture):
    from vlmsae_utils.fixtures import fixture_classes

    first = fixture_classes()[0]
    assert labels.class_text(first.folder) == first.caption
    assert labels.class_text("n01440764") == "tench"
    assert labels.class_text("n04326547") == "stone wall"
    assert (
        labels.class_text("00001_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus")
        == "Danaus plexippus"
    )
    assert labels.class_text("007_red_fox") == "red fox"
    assert steering.names_class("Tench.", "n01440764") and not steering.names_class("goldfish", "n01440764")


# ----------------------------------------------------------------------------- hook points as data (issue 13, item 4)


def test_default_hook_is_bit_identical_to_naming_the_block_output(llava, sae, pixels, val_images):
    model, processor = llava
    images = val_images[:2]
    with steering.steer(model, sae, LAYER, {5: 3.0}):
        implicit = _logits(model, processor, images)
    with steering.steer(model, sae, LAYER, {5: 3.0}, hook="post_mlp_residual"):
        explicit = _logits(model, processor, images)
    assert torch.equal(implicit, explicit)
    vector = steering.diffmean_vector(model, pixels[:2], pixels[2:], LAYER)
    assert torch.equal(vector, steering.diffmean_vector(model, pixels[:2], pixels[2:], LAYER, hook="post_mlp_residual"))
    assert torch.equal(
        steering.block_mean(model, pixels, LAYER), steering.block_mean(model, pixels, LAYER, hook="post_mlp_residual")
    )
    with steering.add_vector(model, LAYER, vector, 2.0):
        implicit = _logits(model, processor, images)
    with steering.add_vector(model, LAYER, vector, 2.0, hook="post_mlp_residual"):
        explicit = _logits(model, processor, images)
    assert torch.equal(implicit, explicit)
    kwargs = {"latents": [3], "alphas": [20.0], "max_new_tokens": 2}
    assert steering.latent_sweep(model, processor, sae, LAYER, images, **kwargs) == steering.latent_sweep(
        model, processor, sae, LAYER, images, hook="post_mlp_residual", **kwargs
    )


def test_steering_refuses_a_hook_it_cannot_clamp_at(llava, sae, pixels, val_images):
    model, processor = llava
    message = r"cannot clamp at hook 'post_projection'.*valid steering hooks: post_mlp_residual"
    with pytest.raises(ValueError, match=message), steering.steer(model, sae, LAYER, {0: 1.0}, hook="post_projection"):
        pass
    with (
        pytest.raises(ValueError, match=message),
        steering.add_vector(model, LAYER, torch.zeros(32), 1.0, hook="post_projection"),
    ):
        pass
    with pytest.raises(ValueError, match=message):
        steering.block_mean(model, pixels, LAYER, hook="post_projection")
    with pytest.raises(ValueError, match=message):
        steering.latent_sweep(model, processor, sae, LAYER, val_images[:1], [0], [1.0], hook="post_projection")
    with pytest.raises(ValueError, match="unknown hook 'pre_mlp'; valid hooks: post_mlp_residual, post_projection"):
        steering.block_mean(model, pixels, LAYER, hook="pre_mlp")


def test_steering_at_a_registered_hook_splices_that_module(llava, pixels):
    """A vector added to the MLP output inside block ℓ reaches the block output unchanged (residual add)."""
    model, _ = llava
    before = _hidden_states(model, pixels)[LAYER + 1]
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    hooks.register_hook(
        hooks.HookSpec(
            "mlp_output", per_block=True, layout=hooks.TOKENS, locate=hooks.block_child("mlp"), steerable=True
        )
    )
    try:
        with steering.add_vector(model, LAYER, vector, hook="mlp_output"):
            shifted = _hidden_states(model, pixels)[LAYER + 1]
        mean = steering.block_mean(model, pixels, LAYER, hook="mlp_output")
    finally:
        hooks.unregister_hook("mlp_output")
    torch.testing.assert_close(shifted, before + vector, atol=1e-5, rtol=1e-5)
    assert mean.shape == (32,) and not torch.allclose(mean, before.float().mean((0, 1)))


def test_test_images_are_spread_evenly_and_never_repeated():
    from vlmsae_utils.steering_study import evenly_spaced

    assert evenly_spaced(10, 4) == [0, 3, 6, 9]
    assert evenly_spaced(3, 5) == [0, 1, 2]  # fewer images than asked: each once
    with pytest.raises(ValueError, match="at least one item"):
        evenly_spaced(0, 4)


def test_test_images_are_the_first_train_image_of_each_class(tmp_path):
    """The authors' imagenet_subset.py: sorted class folders, the first sorted file of each."""
    from PIL import Image

    from vlmsae_utils.data import ImageFolderDataset
    from vlmsae_utils.steering_study import pick_test_images

    names = {"n02": ["b.png", "a.png"], "n01": ["z.png", "c.png", "d.png"], "n03": ["x.png"]}
    for folder, files in names.items():
        (tmp_path / "train" / folder).mkdir(parents=True)
        for file in files:
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / folder / file)
    dataset = ImageFolderDataset(tmp_path, "train")
    ids = [dataset.records[i].image_id for i in pick_test_images(dataset, 1000)]
    assert ids == ["train/n01/c.png", "train/n02/a.png", "train/n03/x.png"]
    assert [dataset.records[i].image_id for i in pick_test_images(dataset, 2)] == ids[::2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in ("q.png", "p.png", "r.png"):
        Image.new("RGB", (4, 4)).save(flat / file)
    assert pick_test_images(ImageFolderDataset(flat, None), 2) == [0, 2]  # no classes: spread over all


def test_all_token_concept_images_are_the_full_pass_ranking(llava, sae, val_images):
    """The authors rank a latent's concept images by its code averaged over all tokens of an image.
    With every image shortlisted, the re-ranking equals that brute force over the tower's block
    output; a shortlist of two images ranks only those two."""
    from vlmsae_utils.exemplars import TopK
    from vlmsae_utils.hooks import DEFAULT_HOOK
    from vlmsae_utils.steering_study import all_token_top_images

    model, processor = llava
    pixels = processor.image_processor(images=val_images, return_tensors="pt")["pixel_values"]
    hidden = _hidden_states(model, pixels)[LAYER + 1]  # block LAYER's output, every token
    with torch.inference_mode():
        means = sae.encode(hidden.reshape(-1, 32)).view(len(val_images), hidden.shape[1], -1).mean(1)
    latents = [j for j in range(64) if int((means[:, j] > 0).sum()) >= 2][:5]
    assert len(latents) >= 3
    n = len(val_images)
    top = all_token_top_images(
        model, processor, sae, LAYER, DEFAULT_HOOK, latents, val_images.__getitem__, n, top_k=3, batch_size=2
    )
    for row, j in enumerate(latents):
        order = torch.argsort(means[:, j], descending=True, stable=True).tolist()
        expected = [i for i in order if means[i, j] > 0][:3]
        assert top.indices[row, : len(expected)].tolist() == expected
        torch.testing.assert_close(top.values[row, : len(expected)], means[expected, j], atol=1e-5, rtol=1e-5)
        assert int(top.count_positive[row]) == int((means[:, j] > 0).sum())
    pair = TopK(torch.zeros(64, 2), torch.tensor([[3, 1]]).repeat(64, 1), torch.full((64,), 2))
    short = all_token_top_images(
        model, processor, sae, LAYER, DEFAULT_HOOK, latents, val_images.__getitem__, n, pair, top_k=3
    )
    assert set(short.indices[short.indices >= 0].tolist()) <= {1, 3}
    for row, j in enumerate(latents):  # the shortlisted images keep their full-pass order
        expected = [i for i in torch.argsort(means[[1, 3], j], descending=True).tolist() if means[[1, 3][i], j] > 0]
        assert short.indices[row, : len(expected)].tolist() == [[1, 3][i] for i in expected]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"concept_tokens": "some"}, "concept_tokens must be one of all, stored, got 'some'"),
        ({"concept_shortlist": -1}, "concept_shortlist must be 0 .every training image. or a positive count"),
        ({"concept_shortlist": 2.5}, "concept_shortlist must be 0"),
    ],
)
def test_bad_concept_settings_fail_before_any_model_loads(bad, message):
    from vlmsae_utils.steering_study import prepare

    with pytest.raises(ValueError, match=message):
        prepare("no-such-llava", **bad)  # refused before the (missing) model would be loaded
