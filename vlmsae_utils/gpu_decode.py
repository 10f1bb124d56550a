"""Image decoding on the encoder's GPU (``decode: gpu``), an option beside the default CPU workers.

The default (``decode: cpu``, as the authors) decodes every image with PIL and runs the model's own
processor in DataLoader workers. With ``decode: gpu`` the workers only read JPEG bytes (and the
header: format, mode, EXIF orientation); the JPEGs are decoded by torchvision's ``decode_jpeg`` on
the encoder's CUDA device, and resized, cropped and normalised there by a :class:`PixelRecipe` read
from the same processor. Files that are not baseline RGB/grey JPEGs (PNG, CMYK, a missing end
marker, …) are decoded on the CPU exactly as by default, then moved; a JPEG the GPU cannot decode is
skipped with its reason, as a corrupt file is by default. Pixels differ from PIL's by resampling
round-off (measured in ``tests/test_gpu_decode.py``), so the store records ``decode: gpu``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import data
from .data import DECODE_CHOICES

__all__ = [
    "DECODE_CHOICES",
    "DevicePixels",
    "PixelRecipe",
    "RawBatches",
    "RawImage",
    "check_decode",
    "decode_on_device",
    "orient",
    "pixel_recipe",
    "read_raw",
]

_EXIF_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"


def check_decode(decode: str, device: torch.device | None = None) -> str:
    """``decode`` if valid; ``gpu`` also needs the encoder on a CUDA device (``device``)."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "gpu" and device is not None and device.type != "cuda":
        raise ValueError(
            f"decode='gpu' decodes JPEGs on the encoder's CUDA device, but the encoder is on {device}; "
            "use decode='cpu' (the default) or run the encoder on a GPU"
        )
    return decode


# -- the processor as tensor operations ---------------------------------------------------------

_RESAMPLE = {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}  # PIL resample codes torchvision can do


@dataclass(frozen=True)
class PixelRecipe:
    """Resize (shortest edge or exact size), centre crop, rescale and normalise, as a processor does.

    ``crop_rounding`` is how the crop's offset is rounded: ``floor`` (transformers) or ``round``
    (torchvision's ``CenterCrop``, open_clip); they differ by a pixel on odd margins.
    """

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255
    crop_rounding: str = "floor"

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) of the resize: the processors' own rule (long side truncated)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        edge = self.shortest_edge
        if height <= width:
            return edge, int(edge * width / height)
        return int(edge * height / width), edge

    def one(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` → resized and cropped uint8 ``[3, h, w]`` on the image's device."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        shape = self.resized_shape(*image.shape[-2:])
        if shape != tuple(image.shape[-2:]):
            mode = InterpolationMode[self.interpolation]
            image = F.resize(image, list(shape), interpolation=mode, antialias=True)
        if self.crop is not None:
            image = self._crop(image)
        return image

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """Centre crop to ``crop`` (an image smaller than the crop is refused: the processors pad it)."""
        assert self.crop is not None
        (height, width), (crop_h, crop_w) = image.shape[-2:], self.crop
        if height < crop_h or width < crop_w:
            raise ValueError(f"resized image {height}x{width} is smaller than the crop {crop_h}x{crop_w}")
        if self.crop_rounding == "round":
            top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
        else:
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[..., top : top + crop_h, left : left + crop_w]

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 images ``[3, H, W]`` (any sizes) → normalised float32 pixel batch ``[B, 3, h, w]``."""
        batch = torch.stack([self.one(image) for image in images]).float().mul_(self.scale)
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def pixel_recipe(processor: Any) -> PixelRecipe:
    """The :class:`PixelRecipe` of an encoder's processor: a transformers image processor (either
    backend) or open_clip's torchvision ``Compose``; anything else is refused by name."""
    inner = getattr(processor, "image_processor", None)
    if inner is not None:
        return _recipe_of_image_processor(inner)
    transform = getattr(processor, "transform", None)
    if transform is not None and hasattr(transform, "transforms"):
        return _recipe_of_compose(transform.transforms)
    raise ValueError(f"decode='gpu' cannot read the preprocessing of {type(processor).__name__}; use decode='cpu'")


def _interpolation(resample: Any, owner: str) -> str:
    """transformers' PIL resample code → a torchvision interpolation name."""
    code = int(getattr(resample, "value", resample))
    if code not in _RESAMPLE:
        raise ValueError(f"decode='gpu': {owner} resamples with PIL code {code}, which torchvision cannot; use 'cpu'")
    return _RESAMPLE[code]


def _recipe_of_image_processor(ip: Any) -> PixelRecipe:
    """Read size, crop, resample, rescale and normalisation from a transformers image processor."""
    name = type(ip).__name__
    size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
    shortest = exact = None
    if getattr(ip, "do_resize", True) and size is not None:
        shortest = getattr(size, "shortest_edge", None) or _get(size, "shortest_edge")
        height, width = _get(size, "height"), _get(size, "width")
        if shortest is None and (height is None or width is None):
            raise ValueError(f"decode='gpu': {name} has a resize rule it cannot copy ({size}); use decode='cpu'")
        exact = (int(height), int(width)) if shortest is None else None
    crop_hw = None
    if getattr(ip, "do_center_crop", False) and crop is not None:
        crop_hw = (int(_get(crop, "height")), int(_get(crop, "width")))
    normalise = getattr(ip, "do_normalize", True)
    channels = 3
    return PixelRecipe(
        shortest_edge=int(shortest) if shortest is not None else None,
        size=exact,
        crop=crop_hw,
        interpolation=_interpolation(getattr(ip, "resample", 3), name),
        mean=tuple(float(m) for m in ip.image_mean) if normalise else (0.0,) * channels,
        std=tuple(float(s) for s in ip.image_std) if normalise else (1.0,) * channels,
        scale=float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0,
    )


def _get(mapping: Any, key: str) -> Any:
    """A key of a transformers ``SizeDict`` or a plain dict (``None`` when absent)."""
    if isinstance(mapping, dict):
        return mapping.get(key)
    return getattr(mapping, key, None)


def _recipe_of_compose(transforms: Sequence[Any]) -> PixelRecipe:
    """Read Resize, CenterCrop and Normalize from open_clip's torchvision ``Compose``."""
    from torchvision import transforms as T

    fields: dict[str, Any] = {"shortest_edge": None, "size": None, "crop": None, "crop_rounding": "round"}
    for step in transforms:
        kind = type(step).__name__
        if isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else list(step.size)
            if isinstance(size, list) and len(size) == 1:
                size = size[0]
            fields["shortest_edge" if isinstance(size, int) else "size"] = (
                size if isinstance(size, int) else tuple(size)
            )
            fields["interpolation"] = step.interpolation.name
        elif isinstance(step, T.CenterCrop):
            fields["crop"] = tuple(int(s) for s in step.size)
        elif isinstance(step, T.Normalize):
            fields["mean"], fields["std"] = tuple(map(float, step.mean)), tuple(map(float, step.std))
        elif "ToTensor" not in kind and "Convert" not in kind and "rgb" not in kind.lower():
            raise ValueError(f"decode='gpu' cannot copy the transform {kind}; use decode='cpu'")
    if "mean" not in fields or "interpolation" not in fields:
        raise ValueError("decode='gpu' needs a Resize and a Normalize in the transform; use decode='cpu'")
    if fields["interpolation"] not in _RESAMPLE.values():
        raise ValueError(f"decode='gpu': interpolation {fields['interpolation']} is not supported; use 'cpu'")
    return PixelRecipe(**fields)


# -- reading in workers, decoding on the device -------------------------------------------------


@dataclass
class RawImage:
    """One file as a worker hands it over: JPEG bytes to decode on the device, or pixels already
    decoded on the CPU (every other file), with the EXIF orientation still to apply to the bytes."""

    jpeg: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    orientation: int = 1


def read_raw(path: str | os.PathLike, exif_transpose: bool | None = None) -> RawImage:
    """Read one file for ``decode: gpu``; raises :class:`.data.ImageLoadError` as :func:`.data.load_image`."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    exif = data.exif_transpose_enabled() if exif_transpose is None else exif_transpose
    with data.open_image(path) as image:
        plain_jpeg = image.format == "JPEG" and image.mode in ("RGB", "L") and image.width and image.height
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1)) if plain_jpeg and exif else 1
    if plain_jpeg:
        raw = Path(path).read_bytes()
        if raw.rstrip(b"\x00").endswith(_JPEG_END):  # a truncated JPEG goes the CPU way (skipped there)
            return RawImage(jpeg=torch.frombuffer(bytearray(raw), dtype=torch.uint8), orientation=orientation)
    return RawImage(pixels=pil_to_tensor(data.load_image(path, exif)))


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1–8) to ``[C, H, W]`` as PIL's ``ImageOps.exif_transpose`` does."""
    steps = {
        1: lambda t: t,
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(-1, -2),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-1, -2),
        6: lambda t: torch.rot90(t, -1, dims=(-2, -1)),
        7: lambda t: t.transpose(-1, -2).flip(-1, -2),
        8: lambda t: torch.rot90(t, 1, dims=(-2, -1)),
    }
    return steps.get(orientation, steps[1])(image).contiguous()


def decode_on_device(
    raws: Sequence[RawImage], device: torch.device
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode the JPEG bytes of ``raws`` on ``device`` (one batched call; one by one if it fails):
    per image its uint8 ``[3, H, W]`` on ``device``, or ``None`` and the reason it was refused."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[torch.Tensor | None] = [None] * len(raws)
    reasons: list[str | None] = [None] * len(raws)
    jpegs = [i for i, raw in enumerate(raws) if raw.jpeg is not None]
    try:
        decoded = decode_jpeg([raws[i].jpeg for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:
        decoded = [_decode_one(raws[i].jpeg, device) for i in jpegs]
    for i, result in zip(jpegs, decoded):
        if isinstance(result, str):
            reasons[i] = result
        else:
            images[i] = orient(result, raws[i].orientation)
    for i, raw in enumerate(raws):
        if raw.pixels is not None:
            images[i] = raw.pixels.to(device, non_blocking=True)
    return images, reasons


def _decode_one(jpeg: Any, device: torch.device) -> torch.Tensor | str:
    """One JPEG on ``device``, or the reason it cannot be decoded there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        return f"unreadable image (JPEG decode on {device.type}): {str(err).splitlines()[0]}"


class RawBatches(Dataset):
    """Item ``i`` = batch ``i`` of the work list read by a worker for ``decode: gpu``:
    ``(shard, [RawImage], kept indices, [(image_id, reason)] of skipped files)``."""

    def __init__(self, dataset: data.ImageFolderDataset, batches: list[tuple[int, list[int]]]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int):
        shard, indices = self.batches[item]
        return shard, *data.load_batch(self.dataset, indices, read_raw)  # bad files skipped and logged as by default


@dataclass
class DevicePixels:
    """Turns a worker's :class:`RawImage` batch into the model's pixel batch on ``device``."""

    recipe: PixelRecipe
    device: torch.device

    def __call__(
        self, raws: list[RawImage], good: list[int], records: Sequence[data.ImageRecord]
    ) -> tuple[torch.Tensor | None, list[int], list[tuple[str, str]]]:
        """(pixels of the decoded images or None, their indices, ``(image_id, reason)`` of refused ones)."""
        images, reasons = decode_on_device(raws, self.device)
        kept = [index for index, image in zip(good, images) if image is not None]
        refused = [(records[index].image_id, r) for index, r in zip(good, reasons) if r is not None]
        decoded = [image for image in images if image is not None]
        return (self.recipe(decoded) if decoded else None), kept, refused
