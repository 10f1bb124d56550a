"""Vision encoders behind one interface: preprocess, capture activations at a hook point, embed.

Supported: transformers CLIP (vision tower with projection), SigLIP, DINOv2, AIMv2, ViT
(Web-SSL MAE/DINO checkpoints) and open_clip models, from hub ids, local folders, ``fixture:NAME``
(tiny models of the embedded default) and ``rehearsal:HUB_ID`` (the exact architecture of a
paper model with random weights, see :mod:`.rehearsal`). Activations are captured with forward hooks that are
always removed; the forward pass stops right after the captured block, so extracting an
early layer costs only that part of the network. :meth:`VisionEncoder.splice` replaces a
hook point's output by any callable, which is how SAEs are spliced into a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import hooks
from .device import resolve_device, resolve_model_dtype
from .hf import image_backend, image_processor, quiet_transformers
from .hooks import TOKEN_MODES, HookSpec, check_hook, hook_spec
from .sources import MODEL_SOURCES, model_source
from .vision_encoder import VisionEncoder, check_tokens, select_tokens

__all__ = [
    "FAMILY_BUILDERS",
    "KNOWN_HUB_MODELS",
    "MODEL_TYPE_FAMILY",
    "OPEN_CLIP_PREFIX",
    "TOKEN_MODES",
    "HookSpec",
    "VisionEncoder",
    "activation_shapes",
    "check_hook",
    "check_tokens",
    "describe",
    "hook_spec",
    "load_encoder",
    "model_source",
    "pooled_by_first_token",
    "pooled_by_head",
    "register_family",
    "select_tokens",
    "transformer_blocks",
    "unregister_family",
    "wrap_clip_vision",
]

OPEN_CLIP_PREFIX = "open_clip:"

#: Hub models the paper uses, with the family that loads them.
KNOWN_HUB_MODELS = {
    "openai/clip-vit-large-patch14-336": "clip",
    "openai/clip-vit-base-patch32": "clip",
    "google/siglip-so400m-patch14-384": "siglip",
    "google/siglip2-so400m-patch14-384": "siglip",  # SigLIP 2 FixRes: SigLIP's architecture (model type siglip)
    "facebook/dinov3-vitb16-pretrain-lvd1689m": "dinov3",
    "facebook/dinov2-base": "dinov2",
    "apple/aimv2-large-patch14-224": "aimv2",
    "facebook/webssl-mae300m-full2b-224": "vit",
    "open_clip:ViT-L-14-336/openai": "open_clip",
    "open_clip:ViT-B-32/openai": "open_clip",
}

#: transformers ``model_type`` → encoder family (filled by `register_family`).
MODEL_TYPE_FAMILY: dict[str, str] = {}
#: encoder family → builder ``(source, preprocess) -> VisionEncoder`` (filled by `register_family`).
FAMILY_BUILDERS: dict[str, Callable[[str, Callable], VisionEncoder]] = {}


def register_family(name: str, model_types: Sequence[str], *, replace: bool = False):
    """Decorator: ``builder(source, preprocess) -> VisionEncoder`` loads the vision model of the
    transformers ``model_types`` of family ``name`` from a hub id or folder and wraps it. One entry
    per family is all a new encoder family needs (see CONTRIBUTING.md)."""

    def add(builder: Callable[[str, Callable], VisionEncoder]) -> Callable[[str, Callable], VisionEncoder]:
        taken = [t for t in model_types if MODEL_TYPE_FAMILY.get(t, name) != name]
        if not replace and (name in FAMILY_BUILDERS or taken):
            raise ValueError(f"encoder family {name!r} or model types {taken} already registered; pass replace=True")
        FAMILY_BUILDERS[name] = builder
        MODEL_TYPE_FAMILY.update(dict.fromkeys(model_types, name))
        return builder

    return add


def unregister_family(name: str) -> None:
    """Remove a family and its model types (tests that register their own)."""
    FAMILY_BUILDERS.pop(name, None)
    for model_type in [t for t, family in MODEL_TYPE_FAMILY.items() if family == name]:
        del MODEL_TYPE_FAMILY[model_type]


def __getattr__(name: str) -> Any:
    """``HOOKS``: the live hook names of :mod:`.hooks` (built-in and registered)."""
    if name == "HOOKS":
        return hooks.HOOKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- loading


def load_encoder(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = "auto",
    model_dtype: str | torch.dtype | None = "auto",
) -> VisionEncoder:
    """Load a frozen vision encoder from a hub id, ``open_clip:ARCH/TAG``, a local folder,
    ``fixture:NAME`` (a tiny model of the embedded fixture) or ``rehearsal:HUB_ID``.

    ``device="auto"`` is CUDA when available, else the CPU; ``model_dtype="auto"`` is float32, as
    the authors run the encoders and DINOv2 (:mod:`.device`); half precision on request.
    """
    dev = resolve_device(device)
    dtype = resolve_model_dtype(model_dtype, dev)
    spec = model_source(name_or_path)
    if spec.startswith(OPEN_CLIP_PREFIX):
        encoder = _load_open_clip_hub(spec)
    elif Path(spec).expanduser().is_dir():
        encoder = _load_local(Path(spec).expanduser())
    elif spec in KNOWN_HUB_MODELS or spec.count("/") == 1:
        encoder = _load_transformers(spec, _hub_family(spec))
    else:
        raise ValueError(
            f"unknown encoder {spec!r}: not a local folder, an open_clip spec or a hub id. "
            f"Valid: 'fixture:NAME' (clip, siglip, dinov2, aimv2, webssl, open_clip), 'rehearsal:HUB_ID', a folder with config.json or open_clip_config.json, 'open_clip:ARCH/PRETRAINED', "
            f"or a hub id such as {', '.join(KNOWN_HUB_MODELS)}"
        )
    encoder.model.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    if str(name_or_path).startswith(tuple(MODEL_SOURCES)):
        encoder.name = str(name_or_path)  # a stable name, independent of where the data home lives
    return encoder


def _hub_family(model_id: str) -> str:
    """Family of a hub model, from the known list or its downloaded config."""
    if model_id in KNOWN_HUB_MODELS:
        return KNOWN_HUB_MODELS[model_id]
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_id).model_type
    except Exception as err:  # offline, typo, private repo
        raise ValueError(
            f"could not load the config of hub model {model_id!r} ({err}). Known models: {', '.join(KNOWN_HUB_MODELS)}"
        ) from err
    return _family_of(model_type, model_id)


#: Model types refused with a pointer to what works instead.
_UNSUPPORTED_HINTS = {
    "siglip2": "SigLIP 2 NaFlex (variable resolution) is not supported; its FixRes checkpoints are, e.g. "
    "google/siglip2-so400m-patch14-384 (model type siglip)",
}
_UNSUPPORTED_HINTS["siglip2_vision_model"] = _UNSUPPORTED_HINTS["siglip2"]


def _family_of(model_type: str, where: str) -> str:
    """Encoder family of a transformers ``model_type``, or a clear error."""
    if model_type not in MODEL_TYPE_FAMILY:
        hint = _UNSUPPORTED_HINTS.get(model_type, f"supported types: {', '.join(sorted(MODEL_TYPE_FAMILY))}")
        raise ValueError(f"{where}: model type {model_type!r} is not a supported vision encoder; {hint}")
    return MODEL_TYPE_FAMILY[model_type]


def _load_local(path: Path) -> VisionEncoder:
    """A local folder in transformers or open_clip format."""
    import json

    if (path / "open_clip_config.json").is_file():
        return _load_open_clip(f"local-dir:{path}", None, str(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has neither config.json (transformers) nor open_clip_config.json")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return _load_transformers(str(path), _family_of(model_type, str(path)))


def _load_transformers(source: str, family: str) -> VisionEncoder:
    """transformers CLIP / SigLIP / DINOv2 from a hub id or folder, with the image processor of
    :func:`.hf.image_backend` (PIL by default, as the authors)."""
    backend = image_backend()
    with quiet_transformers():
        encoder = _build_transformers(source, family, image_processor(source, backend))
    encoder.preprocessing = backend  # the backend the processor was built on, recorded in store parameters
    return encoder


def _build_transformers(source: str, family: str, image_processor) -> VisionEncoder:
    """Instantiate the vision model of ``family`` with its registered builder."""
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"{source}: no encoder family {family!r}; registered: {', '.join(sorted(FAMILY_BUILDERS))}")
    return FAMILY_BUILDERS[family](source, _hf_preprocess(image_processor))


@register_family("clip", ["clip", "clip_vision_model"])
def _build_clip(source: str, preprocess: Callable) -> VisionEncoder:
    """CLIP: CLS token; ``post_projection`` is the visual projection of the pooled CLS token."""
    from transformers import CLIPVisionModelWithProjection

    return wrap_clip_vision(CLIPVisionModelWithProjection.from_pretrained(source), preprocess, source)


@register_family("siglip", ["siglip", "siglip_vision_model"])
def _build_siglip(source: str, preprocess: Callable) -> VisionEncoder:
    """SigLIP: no CLS token; ``post_projection`` is the attention-pool head."""
    from transformers import SiglipVisionModel

    model = SiglipVisionModel.from_pretrained(source)
    return pooled_by_head(model, getattr(model, "vision_model", model), source, "siglip", preprocess)


@register_family("aimv2", ["aimv2", "aimv2_vision_model"])
def _build_aimv2(source: str, preprocess: Callable) -> VisionEncoder:
    """AIMv2: no CLS token; ``post_projection`` is the attention-pool head."""
    from transformers import Aimv2VisionModel

    model = Aimv2VisionModel.from_pretrained(source)
    return pooled_by_head(model, model, source, "aimv2", preprocess)


@register_family("vit", ["vit"])
def _build_vit(source: str, preprocess: Callable) -> VisionEncoder:
    """ViT (Web-SSL MAE): CLS token; ``post_projection`` is the final layer norm at the CLS token."""
    from transformers import ViTModel

    return pooled_by_first_token(ViTModel.from_pretrained(source, add_pooling_layer=False), source, "vit", preprocess)


@register_family("dinov2", ["dinov2"])
def _build_dinov2(source: str, preprocess: Callable) -> VisionEncoder:
    """DINOv2 (the paper's MS judge): CLS token; ``post_projection`` is the final layer norm at it."""
    from transformers import Dinov2Model

    return pooled_by_first_token(Dinov2Model.from_pretrained(source), source, "dinov2", preprocess)


@register_family("dinov3", ["dinov3_vit"])
def _build_dinov3(source: str, preprocess: Callable) -> VisionEncoder:
    """DINOv3 ViT: the CLS token, then register tokens, then patches (every token mode reads the whole
    sequence, registers included, as for DINOv2); ``post_projection`` is the final norm at the CLS
    token (its ``pooler_output``)."""
    from transformers import DINOv3ViTModel

    model = DINOv3ViTModel.from_pretrained(source)
    width = model.config.hidden_size
    blocks = transformer_blocks(model.model, source)
    return VisionEncoder(
        source, "dinov3", model, preprocess, blocks, model.norm, True, width, width, take_first_token_of_projection=True
    )


def transformer_blocks(module: nn.Module, source: str) -> nn.ModuleList:
    """The list of transformer blocks of a transformers vision model (``encoder.layer(s)`` or ``layers``)."""
    for owner in (getattr(module, "encoder", None), module):
        for name in ("layers", "layer"):
            blocks = getattr(owner, name, None) if owner is not None else None
            if isinstance(blocks, nn.ModuleList):
                return blocks
    raise ValueError(f"{source}: could not find the transformer blocks of {type(module).__name__}")


def pooled_by_head(model: nn.Module, vision: nn.Module, source: str, family: str, processor) -> VisionEncoder:
    """SigLIP / AIMv2: no CLS token; ``post_projection`` is the attention-pool head's output."""
    head = getattr(vision, "head", None)
    if head is None:
        raise ValueError(f"{source}: {family} model without attention-pool head has no post_projection")
    width = int(cast(Any, model).config.hidden_size)
    return VisionEncoder(
        source, family, model, processor, transformer_blocks(vision, source), head, False, width, width
    )


def pooled_by_first_token(model: nn.Module, source: str, family: str, processor) -> VisionEncoder:
    """DINOv2 / ViT (Web-SSL): CLS token; ``post_projection`` is the final layer norm at the CLS token."""
    width = int(cast(Any, model).config.hidden_size)
    return VisionEncoder(
        source,
        family,
        model,
        processor,
        transformer_blocks(model, source),
        cast(Any, model).layernorm,
        True,
        width,
        width,
        take_first_token_of_projection=True,
    )


def wrap_clip_vision(model: nn.Module, processor: Callable, name: str) -> VisionEncoder:
    """Wrap a transformers CLIP vision model (with or without projection, e.g. LLaVA's tower)."""
    vision: Any = getattr(model, "vision_model", model)
    projection = getattr(model, "visual_projection", None) or vision.post_layernorm
    width = int(cast(Any, model).config.hidden_size)
    projection_dim = (
        getattr(cast(Any, model).config, "projection_dim", width) if projection is not vision.post_layernorm else width
    )
    return VisionEncoder(name, "clip", model, processor, vision.encoder.layers, projection, True, width, projection_dim)


@dataclass
class _HFPreprocess:
    """PIL list → pixel tensor through a transformers image processor (picklable for DataLoader workers)."""

    image_processor: Any

    def __call__(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


@dataclass
class _TransformPreprocess:
    """PIL list → pixel tensor through a per-image torchvision transform (open_clip)."""

    transform: Any

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


def _hf_preprocess(image_processor) -> Callable:
    """PIL list → pixel tensor through a transformers image processor."""
    return _HFPreprocess(image_processor)


def _load_open_clip_hub(spec: str) -> VisionEncoder:
    """``open_clip:ARCH/PRETRAINED`` (e.g. ``open_clip:ViT-L-14-336/openai``)."""
    arch, _, tag = spec[len(OPEN_CLIP_PREFIX) :].partition("/")
    if not arch or not tag:
        raise ValueError(f"open_clip spec must be 'open_clip:ARCH/PRETRAINED', got {spec!r}")
    return _load_open_clip(arch, tag, spec)


def _load_open_clip(model_name: str, pretrained: str | None, name: str) -> VisionEncoder:
    """open_clip model through ``create_model_and_transforms``; only the visual tower is used."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    visual = model.visual
    if not hasattr(visual, "transformer"):
        raise ValueError(f"{name}: only ViT open_clip models are supported (no visual.transformer)")
    width = visual.transformer.width
    embed_dim = visual.output_dim

    run = _TransformPreprocess(preprocess)
    sequence_first = not getattr(visual.transformer, "batch_first", True)
    has_cls = getattr(visual, "pool_type", "tok") == "tok" or getattr(visual, "class_embedding", None) is not None
    return VisionEncoder(
        name,
        "open_clip",
        model,
        run,
        visual.transformer.resblocks,
        visual,
        has_cls,
        width,
        embed_dim,
        sequence_first=sequence_first,
    )


def describe(encoder: VisionEncoder) -> dict:
    """One table row about an encoder: family, blocks, widths, CLS token, hook points."""
    return {
        "encoder": encoder.name,
        "family": encoder.family,
        "blocks": encoder.num_layers,
        "width": encoder.hidden_size,
        "projection dim": encoder.projection_dim,
        "CLS token": encoder.has_cls_token,
        "hooks": ", ".join(encoder.hook_points),
    }


def activation_shapes(encoder: VisionEncoder, pixel_values: torch.Tensor, random_k: int = 2) -> list[dict]:
    """Shapes of the activations per hook point and token mode on one batch (invalid combinations noted)."""
    rows = []
    for spec in hooks.specs():
        hook, layer = spec.name, -1 if spec.per_block else None
        for tokens in TOKEN_MODES:
            shape: tuple[int, ...] | str
            try:
                shape = tuple(encoder.activations(pixel_values, hook, layer, tokens, random_k).shape)
            except ValueError as err:
                shape = f"n/a ({err})"
            rows.append({"encoder": encoder.name, "hook": hook, "layer": layer, "tokens": tokens, "shape": shape})
    return rows
