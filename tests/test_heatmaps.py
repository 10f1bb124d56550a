"""Patch heatmaps (issue 31 item 1): the grid lands on the pixels the model saw, the codes are the
SAE's on each patch token, and a latent that reads an object puts its mass on the object's box."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmsae_utils.encoders import load_encoder
from vlmsae_utils.heatmaps import (
    PatchHeatmaps,
    box_mass,
    mass_inside,
    model_view_box,
    patch_heatmaps,
    prefix_tokens,
    upsample,
)
from vlmsae_utils.sae import ProvenanceError, make_sae


def _coordinate_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y (0–255 across the image): a processed pixel says where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


@pytest.mark.parametrize(
    "make, size",
    [
        ("CLIPImageProcessor", {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}),
        ("BitImageProcessor", {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}),
        ("SiglipImageProcessor", {"size": {"height": 384, "width": 384}}),
    ],
)
@pytest.mark.parametrize("width, height", [(300, 200), (180, 420)])
def test_the_view_box_is_where_the_processor_takes_its_pixels(make, size, width, height):
    import transformers

    processor = getattr(transformers, make)(do_normalize=False, do_rescale=False, **size)
    encoder = SimpleNamespace(processor=SimpleNamespace(image_processor=processor))
    left, top, right, bottom = model_view_box(encoder, width, height)
    shown = processor(images=[_coordinate_image(width, height)], return_tensors="pt")["pixel_values"][0]
    # the first and last processed pixels come from the box's edges (within a couple of pixels)
    assert float(shown[0, 0, 0]) / 255 * (width - 1) == pytest.approx(left, abs=2.5)
    assert float(shown[0, 0, -1]) / 255 * (width - 1) == pytest.approx(right - 1, abs=2.5)
    assert float(shown[1, 0, 0]) / 255 * (height - 1) == pytest.approx(top, abs=2.5)
    assert float(shown[1, -1, 0]) / 255 * (height - 1) == pytest.approx(bottom - 1, abs=2.5)


def test_codes_are_the_saes_on_each_patch_token_and_registers_are_dropped(fixture, val_images, monkeypatch):
    from vlmsae_utils import heatmaps

    monkeypatch.setattr(heatmaps, "TOKEN_CHUNK", 5)  # 48 patch tokens encoded in chunks across images
    for name, skip in (("clip", 1), ("siglip", 0), ("dinov3", 5)):
        encoder = load_encoder(f"fixture:{name}")
        assert prefix_tokens(encoder) == skip
        sae = make_sae("relu", encoder.output_dim("post_mlp_residual"), 12).eval()
        maps = patch_heatmaps(encoder, sae, val_images[:3], [4, 7], layer=1, batch_size=2)
        tokens = encoder.capture(encoder.preprocess(val_images[:3]), "post_mlp_residual", 1)[:, skip:]
        expected = sae.encode(tokens.reshape(-1, tokens.shape[-1])).reshape(3, 4, 4, -1)[..., [4, 7]]
        torch.testing.assert_close(maps.codes, expected.permute(0, 3, 1, 2))
        assert maps.image_map(0, 7).shape == val_images[0].size[::-1]


def test_a_latent_reading_an_object_puts_its_mass_on_the_objects_box(fixture):
    """A one-latent SAE whose encoder row is the difference between object and background patch
    activations (learned on 8 images) finds the red square on 8 new non-square images: its share of
    mass inside the square's box is well above the same share for a box moved elsewhere."""
    encoder = load_encoder("fixture:clip")
    rng = np.random.default_rng(0)

    def scene(n):
        images, boxes = [], []
        for _ in range(n):
            image = Image.new("RGB", (48, 32), (128, 128, 128))
            x, y = int(rng.integers(8, 28)), int(rng.integers(0, 16))
            image.paste((220, 30, 30), (x, y, x + 12, y + 16))
            images.append(image)
            boxes.append((x, y, x + 12, y + 16))
        return images, boxes

    train, train_boxes = scene(8)
    tokens = encoder.capture(encoder.preprocess(train), "post_mlp_residual", 1)[:, 1:]  # [8, 16, d]
    probe = make_sae("relu", tokens.shape[-1], 1)
    grid = [upsample(np.eye(16)[i].reshape(4, 4), model_view_box(encoder, 48, 32), (48, 32)) for i in range(16)]
    on = torch.tensor([[mass_inside(g, b) > 0.5 for g in grid] for b in train_boxes])
    direction = tokens[on].mean(0) - tokens[~on].mean(0)
    with torch.no_grad():
        probe.W_enc.copy_(direction[:, None] / direction.norm())
        probe.b_dec.copy_(tokens[~on].mean(0))
        probe.b_enc.zero_()
    test, test_boxes = scene(8)
    maps = patch_heatmaps(encoder, probe.eval(), test, [0], layer=1)
    inside = np.mean([mass_inside(maps.image_map(i, 0), b) for i, b in enumerate(test_boxes)])
    moved = np.mean([mass_inside(maps.image_map(i, 0), test_boxes[(i + 4) % 8]) for i in range(8)])
    assert inside > 0.5 and inside > 2 * moved


def test_box_mass_against_the_shuffled_position_baseline_by_hand():
    """Two 8x8 images, a 2x2 grid each; latent 5 fires only on the top-left patch of image 0 and the
    bottom-right patch of image 1, where their objects are: all mass inside the own box, none in the
    other image's box; the boxes cover a quarter of each image; an empty map is left out."""
    codes = torch.zeros(3, 1, 2, 2)
    codes[0, 0, 0, 0], codes[1, 0, 1, 1] = 2.0, 3.0
    maps = PatchHeatmaps([5], codes, [(0.0, 0.0, 8.0, 8.0)] * 3, [(8, 8)] * 3)
    measured = box_mass(maps, [5, 5, 5], [(0, 0, 4, 4), (4, 4, 8, 8), (0, 4, 4, 8)])
    assert measured == {
        "images": 2.0,
        "mass inside the object's box": 1.0,
        "inside another image's box": 0.0,  # image 0 against image 1's box, image 1 against image 2's
        "box share of the image": 0.25,
    }
    with pytest.raises(ValueError, match="at least 2 images"):
        box_mass(maps, [5], [(0, 0, 4, 4)])


def test_the_fixture_shape_box_is_where_the_generated_shape_is(fixture):
    from vlmsae_utils.fixtures import shape_box

    for path in sorted((fixture.images / "train").rglob("*.png"))[::97]:
        left, top, right, bottom = shape_box("/".join(path.parts[-3:]), fixture.seed)
        pixels = np.asarray(Image.open(path), dtype=float)
        inside = np.zeros(pixels.shape[:2], bool)
        inside[top:bottom, left:right] = True
        background = pixels[~inside].mean(0)
        assert np.abs(pixels[inside] - background).mean() > 3 * np.abs(pixels[~inside] - background).mean()
    with pytest.raises(ValueError, match="not a generated fixture image"):
        shape_box("train/cats/cat_001.jpg", fixture.seed)


def test_bad_heatmap_inputs_are_named(fixture, val_images):
    encoder = load_encoder("fixture:clip")
    width = encoder.output_dim("post_mlp_residual")
    with pytest.raises(ValueError, match=re.escape(f"SAE reads {width + 1}-d activations")):
        patch_heatmaps(encoder, make_sae("relu", width + 1, 4), val_images[:1], [0], layer=1)
    with pytest.raises(ValueError, match=re.escape("latent(s) [9] out of range: the SAE has 4 latents")):
        patch_heatmaps(encoder, make_sae("relu", width, 4), val_images[:1], [9], layer=1)
    other_block = make_sae("relu", width, 4)
    other_block.provenance = {"hook": "post_mlp_residual", "layer": 0}
    with pytest.raises(ProvenanceError, match=re.escape("layer 0 (SAE) vs 1")):
        patch_heatmaps(encoder, other_block, val_images[:1], [0], layer=1)


def test_the_latents_that_fire_most_on_an_image_and_the_image_explorer(fixture, val_images):
    from vlmsae_utils import widgets
    from vlmsae_utils.heatmaps import strongest_latents

    encoder = load_encoder("fixture:clip")
    sae = make_sae("relu", encoder.output_dim("post_mlp_residual"), 40).eval()
    params = {"encoder": "fixture:clip", "hook": "post_mlp_residual", "layer": 1}
    maps = strongest_latents(params, sae, val_images[0], 3, device="cpu")
    tokens = encoder.capture(encoder.preprocess(val_images[:1]), "post_mlp_residual", 1)[0, 1:]
    peak = sae.encode(tokens).amax(0)
    assert maps.latents == [int(j) for j in peak.topk(3).indices]  # brute force over every patch
    assert strongest_latents({**params, "hook": "post_projection", "layer": None}, sae, val_images[0]) is None
    view = widgets.strongest_latents_view(params, sae, lambda i: val_images[i], {maps.latents[0]: "named"}, 3, "cpu")
    figure = view(0)
    assert [ax.get_title() for ax in figure.axes][:2] == ["image", f"{maps.latents[0]}: named"]
    explorer = widgets.image_explorer(view, 4)
    assert explorer.children[0].max == 3
    # one patch: the latents with the largest code on the patch under the point (brute force), marked
    width, height = val_images[0].size
    left, top, right, bottom = model_view_box(encoder, width, height)
    x, y = (left + 0.6 * (right - left)) / width, (top + 0.3 * (bottom - top)) / height  # row 1, col 2 of 4x4
    at = strongest_latents(params, sae, val_images[0], 3, point=(x, y), device="cpu")
    assert at.patch == (1, 2) and at.latents == [int(j) for j in sae.encode(tokens[1 * 4 + 2][None])[0].topk(3).indices]
    assert view(0, (x, y)).axes[0].get_title() == "image, patch (1, 2)"
    with pytest.raises(ValueError, match="outside the part of the image the model sees"):
        strongest_latents(params, sae, val_images[0], 3, point=(1.2, 0.5), device="cpu")
    assert len(widgets.image_explorer(view, 4, point=True).children) == 3  # image, patch selector, figure


def test_the_neuron_browser_shows_names_and_toggles_heatmaps(fixture, val_images):
    from vlmsae_utils import scoring, widgets

    sae = make_sae("relu", load_encoder("fixture:clip").output_dim("post_mlp_residual"), 40).eval()
    n = len(val_images)
    report = scoring.score_neurons("sae", torch.rand(n, 40), torch.randn(n, 8), top_k=2, device="cpu")
    params = {"encoder": "fixture:clip", "hook": "post_mlp_residual", "layer": 1}
    draw = widgets.neuron_heatmaps(params, {"sae": sae}, {"sae": report}, lambda i: val_images[i], 2, "cpu")
    assert len(draw("sae", 5).axes) == 2 and draw("raw", 0) is None  # raw neurons have no SAE to map
    card = widgets.neuron_card(report, 5, lambda i: val_images[i], name="striped")
    assert "“striped”" in card._suptitle.get_text()
    browser = widgets.neuron_browser(
        {"sae": report}, lambda i: val_images[i], latent_names={"sae": {5: "x"}}, heatmap=draw
    )
    toggle = browser.children[0].children[-1]
    toggle.value = True  # redraws with the heatmaps below the card
    assert toggle.description == "heatmaps" and toggle.layout.display == ""
