"""Rehearsal models: the paper's architectures at full width, built without a download."""

from __future__ import annotations

import pytest
import torch

from vlmsae_utils import rehearsal
from vlmsae_utils.run import check_parameters, find_notebook, to_ipynb

# Published sizes and token counts of the hub checkpoints (model cards / configs): parameters in
# millions, transformer blocks, width, tokens per image at the model's own resolution.
EXPECTED = {
    "openai/clip-vit-large-patch14-336": (304.3, 24, 1024, (336 // 14) ** 2 + 1),
    "google/siglip-so400m-patch14-384": (428.2, 27, 1152, (384 // 14) ** 2),
    "facebook/dinov2-base": (86.6, 12, 768, (224 // 14) ** 2 + 1),
    "openai/clip-vit-base-patch32": (151.3, 12, 768, (224 // 32) ** 2 + 1),
    "apple/aimv2-large-patch14-224": (312.3, 24, 1024, (224 // 14) ** 2),
    "facebook/webssl-mae300m-full2b-224": (303.2, 24, 1024, (224 // 14) ** 2 + 1),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": (85.7, 12, 768, (224 // 16) ** 2 + 1 + 4),  # card: 86M
    "google/siglip2-so400m-patch14-384": (428.2, 27, 1152, (384 // 14) ** 2),  # SigLIP's so400m tower
}


def _on_meta(hub_id: str) -> torch.nn.Module:
    """The architecture without allocating weights."""
    with torch.device("meta"):
        return rehearsal.REHEARSAL_MODELS[hub_id].build()


@pytest.mark.parametrize("hub_id", sorted(EXPECTED))
def test_architectures_have_the_papers_sizes(hub_id):
    millions, blocks, width, _ = EXPECTED[hub_id]
    model = _on_meta(hub_id)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    config = getattr(model.config, "vision_config", model.config)
    assert (config.num_hidden_layers, config.hidden_size) == (blocks, width)


def test_clip_b32_has_the_exact_parameter_count_of_the_hub_checkpoint():
    assert sum(p.numel() for p in _on_meta("openai/clip-vit-base-patch32").parameters()) == 151_277_313


def test_llava_keeps_the_full_tower_and_projector_and_cuts_the_language_model():
    model = _on_meta("llava-hf/llava-1.5-7b-hf")
    vision = model.config.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (24, 1024, 336, 14)
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.vocab_size) == (4096, 11008, 32064)
    assert text.num_hidden_layers == rehearsal.LLAVA_REHEARSAL_LAYERS
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert projector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


@pytest.mark.slow
def test_rehearsal_dinov2_loads_by_name_and_runs_at_full_width(fixture):
    from PIL import Image

    from vlmsae_utils.encoders import load_encoder

    encoder = load_encoder("rehearsal:facebook/dinov2-base", device="cpu")
    assert encoder.name == "rehearsal:facebook/dinov2-base"
    pixels = encoder.preprocess([Image.new("RGB", (500, 375), (120, 30, 200))])
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    _, _, width, tokens = EXPECTED["facebook/dinov2-base"]
    assert tuple(encoder.capture(pixels, "post_mlp_residual", 11).shape) == (1, tokens, width)
    assert tuple(encoder.embed_images(pixels).shape) == (1, width)


def test_unknown_rehearsal_model_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: openai/clip-vit-large-patch14-336"):
        rehearsal.rehearsal_model("openai/clip-vit-huge")


@pytest.mark.parametrize(
    "stage", rehearsal.rehearsal_stages(rehearsal.rehearsal_dir() / "images", "cpu"), ids=lambda s: s["stage"]
)
def test_every_rehearsal_stage_names_real_notebook_parameters(stage, tmp_path):
    ipynb = to_ipynb(find_notebook(stage["notebook"]), tmp_path / "nb.ipynb")
    check_parameters(ipynb, stage["parameters"])  # raises on an unknown name
