"""The CONTRIBUTING recipe "add an encoder family", followed from a test: one registered builder,
no edit to the package, and the new family extracts like the built-in ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlmsae_utils import encoders
from vlmsae_utils.extract import extract_activations, open_dataset


@pytest.fixture()
def toy_family():
    """A family "toy" for transformers model type "toy_vit" (a ViT without pooler, CLS token)."""

    @encoders.register_family("toy", ["toy_vit"])
    def build_toy(source: str, preprocess) -> encoders.VisionEncoder:
        from transformers import ViTConfig, ViTModel

        config = ViTConfig.from_pretrained(source)  # reads the renamed model type as a ViT
        model = ViTModel.from_pretrained(source, config=config, add_pooling_layer=False)
        return encoders.pooled_by_first_token(model, source, "toy", preprocess)

    yield build_toy
    encoders.unregister_family("toy")


def _toy_model(fixture, tmp_path):
    """The fixture's Web-SSL ViT copied under a model type no built-in family knows."""
    target = tmp_path / "toy"
    shutil.copytree(fixture.model("webssl"), target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "toy_vit"}))
    return target


def test_an_unknown_model_type_lists_the_registered_families(fixture, tmp_path):
    with pytest.raises(ValueError, match=r"model type 'toy_vit' is not a supported vision encoder.*dinov2"):
        encoders.load_encoder(_toy_model(fixture, tmp_path), device="cpu")


def test_a_registered_family_loads_and_extracts_like_the_built_in_vit(fixture, tmp_path, toy_family, val_images):
    toy = encoders.load_encoder(_toy_model(fixture, tmp_path), device="cpu")
    vit = encoders.load_encoder(fixture.model("webssl"), device="cpu")
    assert toy.family == "toy" and toy.has_cls_token and toy.num_layers == vit.num_layers
    pixels = vit.preprocess(val_images)
    for hook, layer in (("post_mlp_residual", 1), ("post_projection", None)):
        assert torch.equal(toy.activations(pixels, hook, layer, "cls"), vit.activations(pixels, hook, layer, "cls"))
    store = extract_activations(
        toy, open_dataset("fixture", "val"), tmp_path / "store", layer=1, progress=False, device="cpu", num_workers=0
    )
    assert store.params["encoder"].endswith("toy") and store.dim == toy.hidden_size


def test_a_family_or_model_type_is_not_taken_twice(toy_family):
    with pytest.raises(ValueError, match="already registered"):
        encoders.register_family("toy", ["other"])(toy_family)
    with pytest.raises(ValueError, match=r"model types \['vit'\] already registered"):
        encoders.register_family("vit2", ["vit"])(toy_family)
