"""Where a latent fires: per-patch SAE codes mapped back onto the image as the model saw it.

For an SAE trained at a block (on CLS or patch tokens), the encoder runs once per batch of images
to that block; the CLS and register tokens are dropped, the SAE encodes every patch token, and the
chosen latents' codes form a ``[rows, cols]`` grid per image. The grid covers the part of the image
the model was shown: a processor that resizes the short side and crops the centre (CLIP, DINOv2,
open_clip) shows a centred region; one that resizes to a fixed size (SigLIP, AIMv2's, DINOv3) shows
the whole image, stretched. :func:`model_view_box` computes that region from the processor's own
settings, so a heatmap lands on the right pixels at 224, 336 or 384 px and for non-square images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import hooks
from .sae.provenance import check_provenance
from .vision_encoder import VisionEncoder

__all__ = [
    "TOKEN_CHUNK",
    "PatchHeatmaps",
    "box_mass",
    "heatmaps_for",
    "mass_inside",
    "model_view_box",
    "patch_heatmaps",
    "prefix_tokens",
    "strongest_latents",
    "upsample",
]

Box = tuple[float, float, float, float]  # left, top, right, bottom in the original image's pixels


def prefix_tokens(encoder: VisionEncoder) -> int:
    """Tokens before the patches: the CLS token (where the model has one) and register tokens."""
    config = getattr(encoder.model, "config", None)
    registers = int(getattr(getattr(config, "vision_config", config), "num_register_tokens", 0) or 0)
    return int(encoder.has_cls_token) + registers


def _field(size, key: str):
    """``size[key]`` of a processor's size setting (a dict, or transformers' ``SizeDict``)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


Resize = tuple[str, int | tuple[int, int]]


def _resize_and_crop(encoder: VisionEncoder) -> tuple[Resize | None, tuple[int, int] | None]:
    """The processor's resize (``("short", S)`` or ``("fixed", (h, w))``) and centre crop ``(h, w)``."""
    processor = getattr(encoder.processor, "image_processor", None)
    if processor is None:
        return _torchvision_steps(getattr(encoder.processor, "transform", None))
    size, resize = processor.size, None
    if getattr(processor, "do_resize", True):
        short = _field(size, "shortest_edge")
        resize = (
            ("short", int(short)) if short else ("fixed", (int(_field(size, "height")), int(_field(size, "width"))))
        )
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    return resize, None if crop is None else (int(_field(crop, "height")), int(_field(crop, "width")))


def _torchvision_steps(transform) -> tuple[Resize | None, tuple[int, int] | None]:
    """Resize and CenterCrop of a torchvision ``Compose`` (open_clip's preprocessing)."""
    from torchvision import transforms

    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise ValueError("this encoder's preprocessing is neither a transformers processor nor a torchvision Compose")
    resize: Resize | None = None
    crop: tuple[int, int] | None = None
    for step in steps:
        if isinstance(step, transforms.Resize):
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            resize = ("short", int(size[0])) if len(size) == 1 else ("fixed", (int(size[0]), int(size[1])))
        elif isinstance(step, transforms.CenterCrop):
            crop = (int(step.size[0]), int(step.size[1]))
    return resize, crop


def model_view_box(encoder: VisionEncoder, width: int, height: int) -> Box:
    """The region of a ``width × height`` image that the model is shown, in that image's pixels."""
    resize, crop = _resize_and_crop(encoder)
    if resize is None:
        sx = sy = 1.0
    elif resize[0] == "short":
        sx = sy = float(resize[1]) / min(width, height)  # type: ignore[arg-type]
    else:
        fixed_h, fixed_w = resize[1]  # type: ignore[misc]
        sx, sy = fixed_w / width, fixed_h / height
    shown_w, shown_h = width * sx, height * sy
    if crop is None:
        return (0.0, 0.0, float(width), float(height))
    crop_h, crop_w = crop
    left, top = (shown_w - crop_w) / 2 / sx, (shown_h - crop_h) / 2 / sy
    return (left, top, left + crop_w / sx, top + crop_h / sy)


@dataclass
class PatchHeatmaps:
    """Per-patch codes of chosen latents: ``codes[image, latent_position, row, col]`` and the box of
    each original image the grid covers."""

    latents: list[int]
    codes: torch.Tensor
    boxes: list[Box]
    sizes: list[tuple[int, int]]  # (width, height) of each original image
    patch: tuple[int, int] | None = None  # (row, col) the latents were chosen at, if one patch

    def patch_box(self, index: int, row: int, col: int) -> Box:
        """Where patch ``(row, col)`` of image ``index`` lies on the original image."""
        left, top, right, bottom = self.boxes[index]
        rows, cols = self.codes.shape[-2:]
        w, h = (right - left) / cols, (bottom - top) / rows
        return (left + col * w, top + row * h, left + (col + 1) * w, top + (row + 1) * h)

    def scale(self, latent: int) -> float:
        """One colour scale per latent across all its images: its largest code (1 when it never fires)."""
        peak = float(self.codes[:, self.latents.index(latent)].max())
        return peak if peak > 0 else 1.0

    def image_map(self, index: int, latent: int) -> np.ndarray:
        """Latent ``latent`` on image ``index`` as an ``[height, width]`` array over the original image."""
        grid = self.codes[index, self.latents.index(latent)].numpy()
        return upsample(grid, self.boxes[index], self.sizes[index])


def upsample(grid: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """A ``[rows, cols]`` patch grid spread over ``box`` of an image of ``size`` (width, height):
    each pixel takes its patch's value (nearest), pixels outside the shown region are 0."""
    width, height = size
    left, top, right, bottom = box
    out = np.zeros((height, width), dtype=np.float32)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    rows = np.floor((ys - top) / (bottom - top) * grid.shape[0]).astype(int)
    cols = np.floor((xs - left) / (right - left) * grid.shape[1]).astype(int)
    inside_r = (rows >= 0) & (rows < grid.shape[0])
    inside_c = (cols >= 0) & (cols < grid.shape[1])
    out[np.ix_(inside_r, inside_c)] = grid[np.ix_(rows[inside_r], cols[inside_c])]
    return out


def mass_inside(heatmap: np.ndarray, box: Box) -> float:
    """Share of a heatmap's total inside ``box`` (NaN for an empty map)."""
    total = float(heatmap.sum())
    left, top, right, bottom = (round(v) for v in box)
    return float(heatmap[top:bottom, left:right].sum()) / total if total > 0 else float("nan")


def box_mass(maps: PatchHeatmaps, latent_of_image: Sequence[int], boxes: Sequence[Box]) -> dict[str, float]:
    """Where the heatmaps lie against known object boxes: the mean share of each image's map (of
    ``latent_of_image[i]``) inside its own object's box, beside the same share inside the box of
    another image (boxes shifted by half the list: the shuffled-position baseline) and the mean
    share of the image the boxes cover. Images whose map is empty are left out."""
    n = len(boxes)
    if n < 2 or len(latent_of_image) != n:
        raise ValueError(f"need at least 2 images with one latent and one box each, got {len(latent_of_image)}, {n}")
    own, moved, area = [], [], []
    for i, (latent, box) in enumerate(zip(latent_of_image, boxes)):
        heatmap = maps.image_map(i, latent)
        if heatmap.sum() <= 0:
            continue
        own.append(mass_inside(heatmap, box))
        moved.append(mass_inside(heatmap, boxes[(i + n // 2) % n]))
        area.append(mass_inside(np.ones_like(heatmap), box))
    return {
        "images": float(len(own)),
        "mass inside the object's box": float(np.mean(own)) if own else float("nan"),
        "inside another image's box": float(np.mean(moved)) if own else float("nan"),
        "box share of the image": float(np.mean(area)) if own else float("nan"),
    }


def _check_latents(sae, latents: Sequence[int]) -> list[int]:
    chosen = [int(j) for j in latents]
    if not chosen:
        raise ValueError("patch_heatmaps needs at least one latent")
    bad = [j for j in chosen if not 0 <= j < sae.dict_size]
    if bad:
        raise ValueError(f"latent(s) {bad} out of range: the SAE has {sae.dict_size} latents (0..{sae.dict_size - 1})")
    return chosen


def _grid_shape(pixels: torch.Tensor, patches: int) -> tuple[int, int]:
    """Rows and columns of the patch grid of a ``[B, 3, H, W]`` input with ``patches`` square patches."""
    height, width = pixels.shape[-2:]
    side = math.sqrt(height * width / patches)
    rows, cols = round(height / side), round(width / side)
    if rows * cols != patches:
        raise ValueError(f"{patches} patch tokens do not tile a {height}×{width} input")
    return rows, cols


#: Patch tokens encoded at once: the codes of one chunk are ``[chunk, ω]`` (256 MiB at ω = 65,536).
TOKEN_CHUNK = 1024


def _chosen_codes(sae, tokens: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """Inference codes of the ``chosen`` latents on every row of ``tokens``, encoded in chunks of
    :data:`TOKEN_CHUNK` rows so a 65,536-latent SAE never holds all patches' full codes at once."""
    return torch.cat([sae.encode(part)[:, chosen].float() for part in tokens.split(TOKEN_CHUNK)])


@torch.no_grad()
def patch_heatmaps(
    encoder: VisionEncoder,
    sae,
    images: Sequence[Image.Image],
    latents: Sequence[int],
    *,
    layer: int,
    hook: str = hooks.DEFAULT_HOOK,
    batch_size: int = 16,
) -> PatchHeatmaps:
    """Codes of ``latents`` on every patch of ``images`` (encoder run once per batch to ``hook`` of
    ``layer``; the SAE on the encoder's device). An SAE of another width, hook or block is refused."""
    sae = _checked_sae(encoder, sae, hook, layer)
    chosen = _check_latents(sae, latents)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    parts = []
    for start in range(0, len(images), batch_size):
        pixels, tokens = _patch_tokens(encoder, images[start : start + batch_size], hook, layer)
        parts.append(_grid_codes(sae, pixels, tokens, chosen))
    return _heatmaps(encoder, chosen, torch.cat(parts), images)


def _checked_sae(encoder: VisionEncoder, sae, hook: str, layer: int):
    """The SAE on the encoder's device, after refusing one of another width, hook or block."""
    width = encoder.output_dim(hook)
    if sae.activation_dim != width:
        raise ValueError(f"SAE reads {sae.activation_dim}-d activations but {encoder.name} {hook} gives {width}-d")
    block = encoder.block_index(layer)
    check_provenance(sae, {"hook": hook, "layer": block}, f"block {block} ({hook}) of {encoder.name}")
    return sae.to(encoder.device).eval()


def _patch_tokens(
    encoder: VisionEncoder, images: Sequence[Image.Image], hook: str, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels ``[B, 3, H, W]`` and patch tokens ``[B, P, d]`` (CLS and registers dropped) of ``images``."""
    pixels = encoder.preprocess([image.convert("RGB") for image in images])
    return pixels, encoder.capture(pixels, hook, layer)[:, prefix_tokens(encoder) :].float()


def _grid_codes(sae, pixels: torch.Tensor, tokens: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """Codes of the ``chosen`` latents as ``[B, latents, rows, cols]`` grids on the CPU."""
    rows, cols = _grid_shape(pixels, tokens.shape[1])
    codes = _chosen_codes(sae, tokens.reshape(-1, tokens.shape[-1]), chosen)
    return codes.reshape(len(pixels), rows, cols, len(chosen)).permute(0, 3, 1, 2).cpu()


def _heatmaps(
    encoder: VisionEncoder,
    chosen: list[int],
    codes: torch.Tensor,
    images: Sequence[Image.Image],
    patch: tuple[int, int] | None = None,
) -> PatchHeatmaps:
    """Codes with the view box and size of each original image (and the patch the latents were chosen at)."""
    sizes = [image.size for image in images]
    return PatchHeatmaps(chosen, codes, [model_view_box(encoder, w, h) for w, h in sizes], sizes, patch)


def _encoder_of(params: dict, device: str | torch.device) -> VisionEncoder | None:
    """The encoder a store was extracted from, or ``None`` with a logged note for a pooled hook
    (``post_projection`` has no patch tokens to map)."""
    import logging

    from .encoders import load_encoder

    if not hooks.hook_spec(params["hook"]).per_block:
        logging.getLogger(__name__).warning("no heatmaps: %s activations have no patch tokens", params["hook"])
        return None
    return load_encoder(params["encoder"], device)


def heatmaps_for(
    params: dict, sae, images: Sequence[Image.Image], latents: Sequence[int], *, device: str | torch.device = "auto"
) -> PatchHeatmaps | None:
    """Heatmaps with the encoder, hook and block a store was extracted from (its ``params``); ``None``
    with a logged note for a store of a pooled hook (``post_projection`` has no patches), and ``None``
    for no latents (nothing to show)."""
    if not latents or not images:
        return None
    encoder = _encoder_of(params, device)
    if encoder is None:
        return None
    return patch_heatmaps(encoder, sae, images, latents, layer=int(params["layer"]), hook=params["hook"])


@torch.no_grad()
def strongest_latents(
    params: dict,
    sae,
    image: Image.Image,
    n: int = 6,
    *,
    point: tuple[float, float] | None = None,
    device: str | torch.device = "auto",
) -> PatchHeatmaps | None:
    """The ``n`` latents with the largest code on any patch of ``image`` ("which latents fire here,
    and where"), or on the one patch under ``point`` (``(x, y)`` as fractions of the image's width and
    height: "click a patch, see its latents"), as heatmaps on that image; ``None`` for a pooled hook."""
    encoder = _encoder_of(params, device)
    if encoder is None:
        return None
    hook, layer = params["hook"], int(params["layer"])
    sae = _checked_sae(encoder, sae, hook, layer)
    pixels, tokens = _patch_tokens(encoder, [image], hook, layer)  # one forward serves the choice and the maps
    patch = None
    if point is None:
        peak = torch.stack([sae.encode(part).amax(0) for part in tokens[0].split(TOKEN_CHUNK)]).amax(0)
    else:
        rows, cols = _grid_shape(pixels, tokens.shape[1])
        patch = _patch_under(model_view_box(encoder, *image.size), image.size, point, (rows, cols))
        peak = sae.encode(tokens[0, patch[0] * cols + patch[1]][None])[0]
    chosen = [int(j) for j in peak.topk(min(n, sae.dict_size)).indices if float(peak[j]) > 0]
    codes = _grid_codes(sae, pixels, tokens, chosen) if chosen else torch.zeros(1, 0, 1, 1)
    return _heatmaps(encoder, chosen, codes, [image], patch)


def _patch_under(
    view: Box, size: tuple[int, int], point: tuple[float, float], grid: tuple[int, int]
) -> tuple[int, int]:
    """(row, col) of the patch under ``point`` (fractions of the image); outside the model's view → error."""
    x, y = point[0] * size[0], point[1] * size[1]
    left, top, right, bottom = view
    if not (0 <= point[0] <= 1 and 0 <= point[1] <= 1) or not (left <= x <= right and top <= y <= bottom):
        raise ValueError(f"point {point} lies outside the part of the image the model sees ({view} of {size})")
    row = min(int((y - top) / (bottom - top) * grid[0]), grid[0] - 1)
    col = min(int((x - left) / (right - left) * grid[1]), grid[1] - 1)
    return row, col
