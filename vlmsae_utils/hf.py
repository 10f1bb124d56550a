"""Helpers around Hugging Face transformers shared by the model loaders and writers
(:mod:`.encoders`, :mod:`.llava`, :mod:`.rehearsal`); imports nothing else of the package."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "IMAGE_BACKENDS",
    "IMAGE_BACKEND_ENV",
    "image_backend",
    "image_processor",
    "quiet_transformers",
]

#: transformers' image-processor backends: "pil", the processors the authors' transformers 4 ran
#: (the default here), or "torchvision", transformers 5's default (resizes tensors; faster).
IMAGE_BACKENDS = ("pil", "torchvision")
IMAGE_BACKEND_ENV = "VLMSAE_IMAGE_BACKEND"  # the option: set it to "torchvision" for every model loader


def image_backend() -> str:
    """The image-processor backend every transformers model of the book uses (``VLMSAE_IMAGE_BACKEND``)."""
    backend = os.environ.get(IMAGE_BACKEND_ENV, "pil")
    if backend not in IMAGE_BACKENDS:
        raise ValueError(f"{IMAGE_BACKEND_ENV}={backend!r}; valid: {', '.join(IMAGE_BACKENDS)}")
    return backend


def image_processor(source: str, backend: str | None = None) -> Any:
    """The image processor of a transformers model folder or hub id, on ``backend`` (default
    :func:`image_backend`; ``backend=`` from transformers 5, ``use_fast=`` before)."""
    import transformers
    from transformers import AutoImageProcessor

    backend = image_backend() if backend is None else backend
    major = int(transformers.__version__.split(".")[0])
    choice = {"backend": backend} if major >= 5 else {"use_fast": backend == "torchvision"}
    return AutoImageProcessor.from_pretrained(source, **choice)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading progress bars (unused text towers etc.)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
