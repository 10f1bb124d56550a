"""Steering LLaVA through an SAE in its vision tower: exact splicing, restoration, batching, scores."""
from __future__ import annotations

import pytest
import torch

from vlmsae_utils import steering
from vlmsae_utils.sae import BatchTopKSAE

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
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(model, sae, LAYER, {1: 10.0}):
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
    sweep = steering.latent_sweep(model, processor, sae, LAYER, images, latents=[3, 9], alphas=[-20.0, 20.0],
                                  max_new_tokens=3, batch_size=8)
    assert len(sweep) == 8
    for row in sweep:
        single = steering.generate(model, processor, [images[row["image"]]], max_new_tokens=3, sae=sae,
                                   layer=LAYER, clamp={row["latent"]: row["alpha"]})
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
    concepts = steering.concept_embeddings(images, top)
    torch.testing.assert_close(concepts, torch.tensor([[0.5, 0.5], [2 ** -0.5, 2 ** -0.5]]))
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = steering.steering_scores(texts, concepts)
    torch.testing.assert_close(scores, torch.tensor([2 ** -0.5, 2 ** -0.5]))
    base = steering.class_name_baseline(images, torch.eye(2), labels=[0, 1, 1], seed=0)
    torch.testing.assert_close(base["true class"], torch.tensor([1.0, 1.0, 2 ** -0.5]))
    torch.testing.assert_close(base["shuffled class"], torch.tensor([0.0, 0.0, 2 ** -0.5]))
    assert steering.first_word("  Triangle, red.") == "triangle" and steering.first_word("...") == ""


def test_bad_latent_width_mode_and_block(llava, sae):
    model, _ = llava
    with pytest.raises(ValueError, match="out of range"):
        with steering.steer(model, sae, LAYER, {64: 1.0}):
            pass
    with pytest.raises(ValueError, match="reads 16-d"):
        with steering.steer(model, BatchTopKSAE(16, 32, k=2), LAYER, {0: 1.0}):
            pass
    with pytest.raises(ValueError, match="unknown steering mode"):
        with steering.steer(model, sae, LAYER, {0: 1.0}, mode="add"):
            pass
    with pytest.raises(ValueError, match="cannot change the answer"):
        with steering.steer(model, sae, 3, {0: 1.0}):
            pass
