"""Trained fixture models: mini-CLIP zero-shot, scorer similarity structure, mini-LLaVA answers,
determinism and cache reuse. Models are trained once per session (``trained`` fixture, slow)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from vlmsae_utils.fixtures import fit, fixture_classes
from vlmsae_utils.fixtures import training as ft
from vlmsae_utils.io import LOCK_FILE


@pytest.fixture(scope="session")
def trained(trained_models):
    """All trained fixture models, trained once per test session (conftest's `trained_models`)."""
    return trained_models


@pytest.fixture(scope="session")
def val_split(fixture):
    """Every fixture val image with its class index."""
    return ft.load_split(fixture, "val")


def _safetensors(folder):
    """All tensors of a saved transformers model folder."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


# ----------------------------------------------------------------------------- fast unit tests


def test_caption_universe_is_consistent_with_its_attributes():
    universe = dict(ft.caption_universe())
    classes = fixture_classes()
    for cls in classes:  # the full caption of each class is there and true of that class only
        assert ft.consistent(cls, universe[cls.caption])
        assert sum(ft.consistent(c, universe[cls.caption]) for c in classes) == 1
    assert sum(ft.consistent(c, universe["triangle"]) for c in classes) == 4
    assert sum(ft.consistent(c, universe["red"]) for c in classes) == 8
    assert sum(ft.consistent(c, universe["a round shape"]) for c in classes) == 8
    assert not ft.consistent(classes[0], {"shape": "circle"})


def test_augment_keeps_content_and_is_seeded():
    x = torch.zeros(4, 3, 8, 8)
    x[:, 0] = 1.0  # a "red" image stays red-dominant under the colour noise
    a = ft.augment(x, torch.Generator().manual_seed(0))
    b = ft.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert (a[:, 0].mean(dim=(1, 2)) > a[:, 1:].mean(dim=(2, 3)).max(dim=1).values + 0.5).all()
    # a geometric transform only moves pixels: a constant image stays constant per channel
    flat = ft.augment(torch.ones(2, 3, 8, 8), torch.Generator().manual_seed(1))
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))


def test_batches_cover_every_image_each_epoch_and_repeat_for_a_seed():
    first = list(fit._batches(10, 4, 5, torch.Generator().manual_seed(3)))
    again = list(fit._batches(10, 4, 5, torch.Generator().manual_seed(3)))
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert sorted(torch.cat(first)[:10].tolist()) == list(range(10))


def test_unknown_trained_model_is_rejected(fixture):
    with pytest.raises(ValueError, match="mini_clip"):
        ft.trained_dir(fixture, "maxi_clip")
    with pytest.raises(ValueError, match="mini_llava"):
        fixture.model("maxi_llava")


@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [("scorer", 3), ("mini_clip", 4)])
def test_training_is_deterministic(fixture, tmp_path, name, steps):
    ft.train_model(fixture, name, tmp_path / "a", steps=steps)
    ft.train_model(fixture, name, tmp_path / "b", steps=steps)
    a, b = _safetensors(tmp_path / "a"), _safetensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- trained models (slow)


@pytest.mark.slow
def test_mini_clip_zero_shot_far_above_chance(trained, val_split):
    from vlmsae_utils.steering import load_clip_text_image

    images, labels = val_split
    clip = load_clip_text_image("fixture:mini_clip")
    text = clip.embed_text([c.caption for c in fixture_classes()])
    accuracy = float(((clip.embed_images(images) @ text.T).argmax(1) == labels).float().mean())
    assert accuracy > 0.6  # chance is 1/16
    recorded = json.loads((trained["mini_clip"] / ft.METRICS_FILE).read_text())
    assert recorded["zero_shot_val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_mini_clip_single_words_point_at_their_images(trained, val_split):
    from vlmsae_utils.steering import load_clip_text_image

    images, labels = val_split
    clip = load_clip_text_image("fixture:mini_clip")
    embedded = clip.embed_images(images)
    classes = fixture_classes()
    for key in ("shape", "colour"):
        words = sorted({ft.attributes(c)[key] for c in classes})
        owner = torch.tensor([words.index(ft.attributes(classes[int(i)])[key]) for i in labels])
        centroids = torch.stack([embedded[owner == w].mean(0) for w in range(len(words))])
        best = (clip.embed_text(words) @ centroids.T).argmax(dim=1)
        assert best.tolist() == list(range(len(words))), (key, words, best)


@pytest.mark.slow
def test_mini_clip_loads_as_an_encoder(trained):
    from vlmsae_utils.encoders import load_encoder

    encoder = load_encoder("fixture:mini_clip")
    assert (encoder.num_layers, encoder.hidden_size, encoder.has_cls_token) == (4, ft.WIDTH, True)


@pytest.mark.slow
def test_scorer_embeddings_reflect_shared_attributes(trained, val_split):
    from vlmsae_utils.encoders import load_encoder

    images, labels = val_split
    scorer = load_encoder("fixture:scorer")
    sims = ft.attribute_similarity(scorer.embed_images(scorer.preprocess(images)), labels)
    assert sims["shared_3"] - sims["shared_0"] > 0.4
    assert sims["shared_0"] < sims["shared_1"] < sims["shared_2"] < sims["shared_3"]


@pytest.mark.slow
def test_mini_llava_answers_the_one_word_prompt(trained, val_split):
    from vlmsae_utils.steering import DEFAULT_PROMPT, first_word, generate, load_llava

    images, labels = val_split
    model, processor = load_llava("fixture:mini_llava")
    answers = generate(model, processor, images, DEFAULT_PROMPT)
    expected = [fixture_classes()[int(i)].shape.lower() for i in labels]
    accuracy = sum(first_word(a) == e for a, e in zip(answers, expected)) / len(images)
    assert accuracy > 0.7


@pytest.mark.slow
def test_mini_llava_tower_is_the_mini_clip_vision_model(trained):
    from transformers import CLIPVisionModel

    from vlmsae_utils.steering import feature_block, load_llava

    model, _ = load_llava("fixture:mini_llava")
    clip = CLIPVisionModel.from_pretrained(trained["mini_clip"]).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], clip[k]) for k in clip)
    assert feature_block(model) == 2


@pytest.mark.slow
def test_trained_models_are_cached(fixture, trained):
    stamps = {name: (path / ft.METRICS_FILE).stat().st_mtime_ns for name, path in trained.items()}
    start = time.perf_counter()
    again = ft.ensure_all(fixture)
    assert time.perf_counter() - start < 3
    assert again == trained
    assert {name: (path / ft.METRICS_FILE).stat().st_mtime_ns for name, path in again.items()} == stamps
    leftovers = [p.name for p in (fixture.root / "trained").iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
    assert not leftovers  # staging folders are renamed or removed (the lock that serialises trainings stays)
