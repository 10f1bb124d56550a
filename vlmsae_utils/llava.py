"""Loading the models of chapter 5: a transformers LLaVA (and its CLIP vision tower, wrapped for
splicing) and the CLIP text + image towers that judge the steering score.

Sources are hub ids, folders, ``fixture:NAME`` or ``rehearsal:HUB_ID``
(:func:`vlmsae_utils.sources.model_source`). Prompting and generation are in :mod:`.generation`,
the steering itself in :mod:`.steering`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .device import resolve_device, resolve_model_dtype
from .encoders import VisionEncoder, wrap_clip_vision
from .hf import image_processor, quiet_transformers
from .sources import model_source

__all__ = [
    "ClipTextImage",
    "feature_block",
    "load_clip_text_image",
    "load_llava",
    "vision_tower",
]


def vision_tower(model: nn.Module) -> VisionEncoder:
    """The CLIP vision tower of a transformers LLaVA model, wrapped for splicing."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower: expected a LlavaForConditionalGeneration")
    return wrap_clip_vision(tower, processor=_no_preprocess, name="llava.vision_tower")


def load_llava(
    name_or_path: str = "fixture:llava",
    device: str | torch.device | None = "auto",
    model_dtype: str | torch.dtype | None = "auto",
):
    """A transformers LLaVA model and its processor from a hub id, a folder, ``fixture:NAME`` or
    ``rehearsal:llava-hf/llava-1.5-7b-hf``. ``model_dtype="auto"`` is float16 on CUDA, as the
    authors run LLaVA-1.5-7B (14 GB instead of 28 GB), float32 on the CPU."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dev = resolve_device(device)
    dtype = resolve_model_dtype(model_dtype, dev, "llava")
    source = model_source(name_or_path)
    with quiet_transformers():
        model = cast(nn.Module, LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype)).to(dev).eval()
        processor = AutoProcessor.from_pretrained(source)
        processor.image_processor = image_processor(source)  # on the book's backend (PIL, as the authors)
    return model, processor


def feature_block(model: nn.Module) -> int:
    """0-based vision block whose output LLaVA feeds to the language model (``vision_feature_layer``)."""
    layer: Any = cast(Any, model).config.vision_feature_layer  # an int, or a list of them
    if isinstance(layer, (list, tuple)):
        layer = max(layer, key=lambda h: h % (vision_tower(model).num_layers + 1))
    num_blocks = vision_tower(model).num_layers
    return num_blocks + layer if layer < 0 else layer - 1


def _no_preprocess(images):
    raise RuntimeError("use the LLaVA processor to prepare images")


# ----------------------------------------------------------------------------- the CLIP judge


@dataclass
class ClipTextImage:
    """A CLIP model's text and image towers: unit-norm embeddings (``embed_images(images, unit=False)``:
    the raw ``image_embeds``, which the authors average into a concept)."""

    embed_text: Callable[[list[str]], torch.Tensor]
    embed_images: Callable[..., torch.Tensor]


def load_clip_text_image(
    name_or_path: str, device: str | torch.device | None = "auto", model_dtype: str | torch.dtype | None = "auto"
) -> ClipTextImage:
    """CLIP text + image embedders from a transformers ``CLIPModel`` (hub id, folder, ``fixture:NAME``
    or ``rehearsal:openai/clip-vit-base-patch32``); embeddings come back as float32 on the CPU.
    ``model_dtype="auto"`` is float32, as the authors run this judge."""
    from transformers import CLIPModel, CLIPProcessor

    dev = resolve_device(device)
    dtype = resolve_model_dtype(model_dtype, dev, "judge")
    source = model_source(name_or_path)
    with quiet_transformers():
        model = cast(Any, CLIPModel.from_pretrained(source, dtype=dtype)).to(dev).eval()  # dynamic towers
        processor = CLIPProcessor.from_pretrained(source)
        processor.image_processor = image_processor(source)

    def texts(words: list[str]) -> torch.Tensor:
        tokens = processor(text=list(words), return_tensors="pt", padding=True).to(dev)
        with torch.inference_mode():
            return _unit(model.get_text_features(**tokens)).cpu()

    def pictures(images: Sequence, unit: bool = True) -> torch.Tensor:
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(dev, dtype)
        with torch.inference_mode():
            features = _features(model.get_image_features(pixel_values=pixels))
            return (_unit(features) if unit else features.float()).cpu()

    return ClipTextImage(texts, pictures)


def _features(x) -> torch.Tensor:
    """The projected embeddings of a ``get_*_features`` call (a tensor, or a ModelOutput's ``pooler_output``)."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def _unit(x) -> torch.Tensor:
    """Rows scaled to unit norm (accepts ModelOutput-style returns)."""
    return torch.nn.functional.normalize(_features(x).float(), dim=-1)
