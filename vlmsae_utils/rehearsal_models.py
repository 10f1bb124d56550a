"""The paper's models as architectures with random weights (``rehearsal:HUB_ID``): each checkpoint's
widths, depths, heads, patch and image sizes and preprocessing, built without a download.

LLaVA-1.5-7B keeps its full vision tower (CLIP ViT-L/14-336) and projector, but its language
model is cut to :data:`LLAVA_REHEARSAL_LAYERS` of its 32 decoder layers so that it fits a
laptop (≈1 B instead of 7 B parameters); a word-level tokenizer stands in for LLaMA's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LLAVA_REHEARSAL_LAYERS", "REHEARSAL_MODELS", "RehearsalSpec", "write_rehearsal_model"]

LLAVA_REHEARSAL_LAYERS = 2  # of LLaMA-7B's 32 decoder layers


# ----------------------------------------------------------------------------- configurations


def _clip_vision_config_l14_336(projection: bool = True):
    """CLIP ViT-L/14 at 336 px (also LLaVA-1.5's vision tower): 24 blocks, width 1024, 577 tokens."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _clip_processor(size: int):
    """OpenAI CLIP preprocessing: resize the short side, centre crop, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _clip_l14_336():
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(_clip_vision_config_l14_336())


def _siglip_so400m():
    """SigLIP so400m/14 at 384 px: 27 blocks, width 1152, 729 tokens, attention-pool head."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        )
    )


def _siglip_processor(path: Path) -> None:
    from transformers import SiglipImageProcessor

    SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(path)


def _dinov2_base():
    """DINOv2 ViT-B/14: 12 blocks, width 768."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(
        Dinov2Config(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=518,
            patch_size=14,
        )
    )


def _dinov2_processor(path: Path) -> None:
    """Resize 256, centre crop 224, ImageNet mean/std (DINOv2's own preprocessing)."""
    from transformers import BitImageProcessor

    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


def _dinov3_vitb16():
    """DINOv3 ViT-B/16: 12 blocks, width 768, 4 register tokens, rotary positions."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    return DINOv3ViTModel(
        DINOv3ViTConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            num_register_tokens=4,
        )
    )


def _dinov3_processor(path: Path) -> None:
    """Resize to 224 × 224, ImageNet mean/std."""
    from transformers import DINOv3ViTImageProcessor

    DINOv3ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)


def _clip_b32():
    """CLIP ViT-B/32 with its text tower (the steering score's judge): projection 512."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        projection_dim=512,
        hidden_act="quick_gelu",
        **_special_token_ids(),
    )
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
        hidden_act="quick_gelu",
    )
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512))


def _clip_b32_processor(path: Path) -> None:
    from transformers import CLIPProcessor

    from .fixtures import build_tokenizer

    CLIPProcessor(image_processor=_clip_processor(224), tokenizer=build_tokenizer()).save_pretrained(path)


def _special_token_ids() -> dict[str, int]:
    """pad/bos/eos ids of the stand-in word-level tokenizer (LLaMA's and CLIP's BPE are not shipped)."""
    from .fixtures import build_tokenizer

    tokenizer = build_tokenizer()
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _aimv2_large():
    """AIMv2-L/14 at 224 px: 24 blocks, width 1024, SwiGLU 2816, RMSNorm, no CLS token."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    return Aimv2VisionModel(
        Aimv2VisionConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=8,
            image_size=224,
            patch_size=14,
            rms_norm_eps=1e-5,
            qkv_bias=False,
            mlp_bias=False,
        )
    )


def _webssl_mae300m():
    """Web-SSL MAE ViT-L/14 (300 M) at 224 px: 24 blocks, width 1024, CLS token (transformers ``ViTModel``)."""
    from transformers import ViTConfig, ViTModel

    return ViTModel(
        ViTConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        add_pooling_layer=False,
    )


def _webssl_processor(path: Path) -> None:
    from transformers import ViTImageProcessor

    ViTImageProcessor(
        size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(path)


def _llava_15_7b():
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 tower, 2-layer GELU projector 1024 → 4096, LLaMA-7B widths
    (4096, 32 heads, MLP 11008, vocabulary 32064) with :data:`LLAVA_REHEARSAL_LAYERS` decoder layers."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .fixtures import build_tokenizer

    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=LLAVA_REHEARSAL_LAYERS,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        **_special_token_ids(),
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config_l14_336().to_dict(),
        text_config=text.to_dict(),
        image_token_index=build_tokenizer().convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def _llava_processor(path: Path) -> None:
    from transformers import LlavaProcessor

    from .fixtures import CHAT_TEMPLATE, build_tokenizer

    LlavaProcessor(
        image_processor=_clip_processor(336),
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)


@dataclass(frozen=True)
class RehearsalSpec:
    """How to build one paper model's architecture (random weights) and write its preprocessing."""

    build: Callable[[], nn.Module]
    write_processor: Callable[[Path], None]
    save_dtype: str = "float32"  # LLaVA is stored in float16, as on the hub


#: hub id → the architecture of that checkpoint; ``rehearsal:HUB_ID`` loads it with random weights.
REHEARSAL_MODELS: dict[str, RehearsalSpec] = {
    "openai/clip-vit-large-patch14-336": RehearsalSpec(
        _clip_l14_336, lambda p: _clip_processor(336).save_pretrained(p)
    ),
    "google/siglip-so400m-patch14-384": RehearsalSpec(_siglip_so400m, _siglip_processor),
    "facebook/dinov2-base": RehearsalSpec(_dinov2_base, _dinov2_processor),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": RehearsalSpec(_dinov3_vitb16, _dinov3_processor),
    # SigLIP 2 FixRes so400m/14-384 has SigLIP's architecture (model type siglip), so its rehearsal is SigLIP's
    "google/siglip2-so400m-patch14-384": RehearsalSpec(_siglip_so400m, _siglip_processor),
    "openai/clip-vit-base-patch32": RehearsalSpec(_clip_b32, _clip_b32_processor),
    "apple/aimv2-large-patch14-224": RehearsalSpec(_aimv2_large, lambda p: _clip_processor(224).save_pretrained(p)),
    "facebook/webssl-mae300m-full2b-224": RehearsalSpec(_webssl_mae300m, _webssl_processor),
    "llava-hf/llava-1.5-7b-hf": RehearsalSpec(_llava_15_7b, _llava_processor, save_dtype="float16"),
}


def write_rehearsal_model(hub_id: str, path: Path) -> None:
    """Build ``hub_id``'s architecture with random weights and save it with its preprocessing."""
    import torch

    spec = REHEARSAL_MODELS[hub_id]
    model = spec.build().to(getattr(torch, spec.save_dtype))
    cast(Callable, model.save_pretrained)(path)  # a transformers model (nn.Module to the checker)
    spec.write_processor(path)
