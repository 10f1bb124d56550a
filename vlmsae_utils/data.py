"""Image datasets over ImageFolder-style trees and flat folders, with safe image loading.

Every image is loaded as RGB whatever its PIL mode (as the authors' ``convert("RGB")``; turned
upright by its EXIF orientation only on request, :func:`exif_transpose_enabled`), and a file that
cannot be used (unreadable, truncated, empty, not an image) is reported with a reason instead of
crashing a long extraction or silently vanishing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DECODE_CHOICES",
    "EXIF_TRANSPOSE_ENV",
    "FLAT_CLASS",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageLoadError",
    "ImageRecord",
    "class_counts",
    "exif_transpose_enabled",
    "file_stamp",
    "first_image_of_each_class",
    "images_by_class",
    "is_image_file",
    "load_batch",
    "load_image",
    "open_image",
    "to_rgb",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
FLAT_CLASS = ""  # class name of images in a flat folder (no class sub-folders)
#: ``VLMSAE_EXIF_TRANSPOSE=1`` turns photos upright by their EXIF orientation, as a viewer shows
#: them; unset or ``0`` (default) reads the pixels as stored, as the authors' loader does.
EXIF_TRANSPOSE_ENV = "VLMSAE_EXIF_TRANSPOSE"
#: How extraction decodes images: ``cpu``, PIL and the model's processor in DataLoader workers (the
#: default, as the authors); ``gpu``, JPEGs decoded and preprocessed on the encoder's CUDA device
#: (:mod:`.gpu_decode`).
DECODE_CHOICES = ("cpu", "gpu")


def exif_transpose_enabled() -> bool:
    """Whether :func:`load_image` applies EXIF orientation (:data:`EXIF_TRANSPOSE_ENV`)."""
    value = os.environ.get(EXIF_TRANSPOSE_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{EXIF_TRANSPOSE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class ImageLoadError(Exception):
    """A file that looked like an image could not be used; ``reason`` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: its file, stable id (path relative to the root) and class."""

    path: Path
    image_id: str
    class_name: str


def file_stamp(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns]`` of a file, ``[-1, -1]`` when it cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return [-1, -1]
    return [info.st_size, info.st_mtime_ns]


def is_image_file(path: Path) -> bool:
    """Candidate image: a known extension and not hidden (``.DS_Store``, ``._x.jpg`` …)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, …) → RGB; alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grey images: rescale their value range to 0–255."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low) * 255.0
    grey = Image.fromarray(scaled.round().astype("uint8"), mode="L")
    return grey.convert("RGB")


def load_image(path: str | os.PathLike, exif_transpose: bool | None = None) -> Image.Image:
    """Open, fully decode and convert one image to RGB, or raise :class:`ImageLoadError`; EXIF
    orientation is applied when ``exif_transpose`` (``None``: :func:`exif_transpose_enabled`)."""
    if exif_transpose is None:
        exif_transpose = exif_transpose_enabled()
    with open_image(path) as image:
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        if image.width == 0 or image.height == 0:
            raise ImageLoadError(Path(path), "zero-sized image")
        return to_rgb(image)


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open one image lazily (header read); every failure, also in the ``with`` body, becomes an
    :class:`ImageLoadError` with a reason (empty, not an image, truncated, too large, …)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(path, f"unreadable: {err.strerror or err}") from None
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err)
        reason = "truncated image" if "truncated" in message.lower() else f"unreadable image: {message}"
        raise ImageLoadError(path, reason) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"too large: {err}") from None


def _check_truncation_policy() -> None:
    """Truncated files must fail loudly: refuse to run with PIL's global LOAD_TRUNCATED_IMAGES set."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would load silently")


class ImageFolderDataset:
    """Images under ``root/<split>/<class>/<image>`` (or ``root/<class>/…`` or a flat folder), sorted.

    ``split=None`` reads ``root`` itself. If the folder holds image files directly and no
    class sub-folders, it is a flat folder and every image has class ``""``. Nested
    sub-folders inside a class folder are included (iNaturalist-style trees keep the
    class at the first level).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train"):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data_dir {str(self.root)!r} is not a folder")
        base = self.root / split if split else self.root
        if not base.is_dir():
            splits = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(f"split {split!r} not found under {self.root} (folders there: {splits})")
        self.split = split
        self.base = base
        self.records = _scan(base, self.root)
        if not self.records:
            raise ValueError(f"no image files under {base} (looked for {sorted(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def image_ids(self) -> list[str]:
        """Stable ids (paths relative to the root, POSIX separators), dataset order."""
        return [r.image_id for r in self.records]

    @property
    def class_names(self) -> list[str]:
        """Class of each image, dataset order."""
        return [r.class_name for r in self.records]

    @property
    def classes(self) -> list[str]:
        """Distinct class names, sorted."""
        return sorted(set(self.class_names))

    def stamps(self, indices: Iterable[int]) -> list[list[int]]:
        """``[size, mtime_ns]`` of each image file (``[-1, -1]`` when it is gone): what identifies a file's
        content for the store, so an image replaced under the same name is read again."""
        return [file_stamp(self.records[i].path) for i in indices]

    def load(self, index: int, read: Callable[[Path], Any] = load_image) -> Any:
        """The RGB image at ``index`` (raises :class:`ImageLoadError` for a bad file); ``read`` reads
        the file another way with the same errors (``gpu_decode.read_raw``: bytes for the device)."""
        _check_truncation_policy()
        return read(self.records[index].path)

    def try_load(self, index: int, read: Callable[[Path], Any] = load_image) -> Any:
        """The RGB image (or what ``read`` makes of the file), or the reason it cannot be used (logged once)."""
        try:
            return self.load(index, read)
        except ImageLoadError as err:
            log.warning("skipping %s: %s", self.records[index].image_id, err.reason)
            return err.reason


def _scan(base: Path, root: Path) -> list[ImageRecord]:
    """All candidate image files below ``base`` in sorted order, with their class folder."""
    records: list[ImageRecord] = []
    seen: set[Path] = set()  # real folders already walked: a link loop is walked once, never forever
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):  # symlinked class folders count
        real = Path(dirpath).resolve()
        if real in seen:
            log.warning("skipping %s: it links back to %s, already read", dirpath, real)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        relative_to_base = here.relative_to(base)
        class_name = relative_to_base.parts[0] if relative_to_base.parts else FLAT_CLASS
        for name in sorted(filenames):
            path = here / name
            if is_image_file(path):
                records.append(ImageRecord(path, path.relative_to(root).as_posix(), class_name))
    records.sort(key=lambda r: r.image_id)
    _report_outside_links(records, root)
    return records


def _report_outside_links(records: list[ImageRecord], root: Path) -> None:
    """Image files that are links to files outside the data root are read (shared copies of a data set
    are often assembled that way), but never silently: one warning counts them and names the first."""
    real_root = root.resolve()
    outside = [r for r in records if r.path.is_symlink() and not r.path.resolve().is_relative_to(real_root)]
    if outside:
        log.warning(
            "%d image file(s) under %s link to files outside it (e.g. %s -> %s); they are read as images of this set",
            len(outside),
            root,
            outside[0].image_id,
            outside[0].path.resolve(),
        )


def images_by_class(dataset: ImageFolderDataset, per_class: int) -> dict[str, list[Image.Image]]:
    """The first ``per_class`` usable images of each class, in class order (bad files skipped)."""
    if per_class < 1:
        raise ValueError(f"per_class must be ≥ 1, got {per_class}")
    samples: dict[str, list[Image.Image]] = {}
    for index, record in enumerate(dataset.records):
        bucket = samples.setdefault(record.class_name, [])
        if len(bucket) < per_class:
            image = dataset.try_load(index)
            if not isinstance(image, str):
                bucket.append(image)
    return {name: images for name, images in sorted(samples.items()) if images}


def first_image_of_each_class(dataset: ImageFolderDataset) -> list[int]:
    """Index of the first image (sorted by file name) of each class, in class order: the authors'
    steering test images are the first ImageNet train image of every class (Pach et al., §4.3)."""
    firsts: dict[str, int] = {}
    for index, record in enumerate(dataset.records):
        firsts.setdefault(record.class_name, index)
    return [firsts[name] for name in sorted(firsts)]


def class_counts(dataset: ImageFolderDataset) -> dict[str, int]:
    """Number of image files per class, sorted by class name."""
    return dict(sorted(Counter(dataset.class_names).items()))


def load_batch(
    dataset: ImageFolderDataset, indices: Sequence[int], read: Callable[[Path], Any] = load_image
) -> tuple[list[Any], list[int], list[tuple[str, str]]]:
    """Load ``indices`` (with ``read``, default :func:`load_image`); returns the good images, their
    indices, and ``(image_id, reason)`` for bad ones."""
    images, kept, skipped = [], [], []
    for index in indices:
        result = dataset.try_load(index, read)
        if isinstance(result, str):
            skipped.append((dataset.records[index].image_id, result))
        else:
            images.append(result)
            kept.append(index)
    return images, kept, skipped
