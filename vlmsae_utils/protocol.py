"""Where this book's code and the authors' (ExplainableML/sae-for-vlm) differ, in one registry.

Each :class:`Deviation` names a setting, reads this book's current default from the code (so the
table cannot drift from it), states the authors' way, the option we offer, why, and its measured
effect. Chapter 7 prints :func:`deviations_table`. A new option that departs from the authors, or a
difference found in their code, adds one row here (CONTRIBUTING, "The authors' protocol").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

__all__ = ["DEVIATIONS", "Deviation", "deviations_table"]


@dataclass(frozen=True)
class Deviation:
    """One setting where the authors' code and this book can differ."""

    setting: str
    read_default: Callable[[], Any]  # this book's default, read from the code
    authors: Any  # the authors' way, as a value comparable with the default
    option: str  # what else this book offers ("—": no other value)
    why: str
    effect: str  # the measured effect of the option, or what bounds it

    def default(self) -> Any:
        return self.read_default()

    def follows_authors(self) -> bool:
        return self.default() == self.authors


def _default_of(function: Callable, name: str) -> Any:
    """The default of parameter ``name`` of ``function`` (as its signature declares it)."""
    return inspect.signature(function).parameters[name].default


def _train_default(name: str) -> Any:
    from .train_config import TrainConfig

    return getattr(TrainConfig(), name)


def _auto_dtype(role: str) -> str:
    from .device import AUTO_CUDA_DTYPES

    return str(AUTO_CUDA_DTYPES[role]).removeprefix("torch.")


def _steering(name: str) -> Any:
    from . import steering_study

    return _default_of(steering_study.prepare, name)


def _baseline_names() -> str:
    from . import steering_study

    return _default_of(steering_study.class_name_baselines, "names")


def _image_backend() -> str:
    from .hf import image_backend

    return image_backend()


def _exif_transpose() -> bool:
    from .data import exif_transpose_enabled

    return exif_transpose_enabled()


def _uniqueness_protocol() -> bool:
    from . import scoring

    return _default_of(scoring.uniqueness_table, "paper_protocol")


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "SAE encoder forward (TrainConfig.autocast)",
        lambda: _train_default("autocast"),
        False,
        "True / None: bf16 on CUDA",
        "the dense B·d·ω product about twice as fast on a GPU",
        "not measured here (no GPU lent); tests/test_gpu.py bounds a short run's R² change at 0.04",
    ),
    Deviation(
        "encoders, DINOv2 and the CLIP judge (model_dtype='auto' on CUDA)",
        lambda: _auto_dtype("encoder") + " / " + _auto_dtype("judge"),
        "float32 / float32",
        "float16, bfloat16",
        "half the memory and about twice the extraction speed",
        "float16 extraction within 1e-2 relative norm of float32 (tests/test_gpu_stages.py); MS not measured",
    ),
    Deviation(
        "LLaVA-1.5 (model_dtype='auto' on CUDA)",
        lambda: _auto_dtype("llava"),
        "float16",
        "float32, bfloat16",
        "float32 doubles LLaVA's 14 GB",
        "—",
    ),
    Deviation(
        "R² of the results tables ('R² %')",
        lambda: "per batch, store order, short last batch included",
        "per batch, store order, short last batch included",
        "'global R² %' (1 − FVU over all rows) beside it",
        "the global value does not depend on batching; a one-row last batch (NaN for the authors) is left out",
        "fixture sweep: see chapter 6's table, both columns",
    ),
    Deviation(
        "steering concept images (concept_tokens, concept_shortlist)",
        lambda: f"{_steering('concept_tokens')} tokens, shortlist {_steering('concept_shortlist')}",
        "all tokens, shortlist 0",
        "shortlist N: re-rank each latent's N best by the stored rows; 'stored': the stored rows only",
        "an all-token pass over every training image costs one more pass of the tower",
        "fixture (320 images, 6 latents): top-16 agreement with the full pass 79 % (N = 64), "
        "89 % (N = 192), 39 % (stored rows only)",
    ),
    Deviation(
        "concept pooling over an image's token rows (concept_pool)",
        lambda: _steering("concept_pool"),
        "mean",
        "max: the largest single token",
        "max picks images where the concept fills one patch",
        "—",
    ),
    Deviation(
        "steering α units (alpha_scale)",
        lambda: _steering("alpha_scale"),
        "absolute",
        "max: multiples of each latent's largest activation",
        "the fixture's SAE codes are not on the paper's scale; configs/paper_steering.yaml sets absolute",
        "—",
    ),
    Deviation(
        "class-name baseline names",
        _baseline_names,
        "authors",
        "clip: open_clip's curated names (391 of 1000 equal the authors')",
        "curated names read as English ('great white shark' for 'great_white_shark')",
        "not measured (needs ImageNet and CLIP-B/32)",
    ),
    Deviation(
        "uniqueness of top images (paper_protocol)",
        _uniqueness_protocol,
        True,
        "False: every neuron kept, J ≥ t counted",
        "shows identical top sets of neurons with few positive images",
        "—",
    ),
    Deviation(
        "transformers image-processor backend (VLMSAE_IMAGE_BACKEND)",
        _image_backend,
        "pil",
        "torchvision (transformers 5's default)",
        "resizes tensors instead of PIL images: faster preprocessing",
        "fixture (64 val images): pixels max abs diff 0.015, mean 1e-5; block −2 CLS relative diff ≤ 3e-4 "
        "(the fixture images need little resizing; photos will differ more)",
    ),
    Deviation(
        "EXIF orientation of photos (VLMSAE_EXIF_TRANSPOSE)",
        lambda: "applied" if _exif_transpose() else "not applied",
        "not applied",
        "1: photos turned upright by their EXIF orientation (recorded in the store's parameters)",
        "a photo stored on its side is read as a viewer shows it",
        "none on the fixture (no EXIF); on ImageNet only the few files with an orientation tag",
    ),
    Deviation(
        "SAE initialisation (TrainConfig.init)",
        lambda: _train_default("init"),
        "uniform",
        "gaussian: Gaussian rows made unit norm",
        "Gaussian rows give directions uniform on the sphere; cube-uniform rows favour its diagonals",
        "fixture (block −2 CLS, ε = 4, K = 8, 600 steps of 256, mean of 3 seeds; seed spread ±0.4): R² % "
        "BatchTopK 92.29 → 92.20, Matryoshka 94.28 → 94.30; L0 7.58 → 7.55, 8.76 → 8.81",
    ),
    Deviation(
        "order of the training batches (TrainConfig.batch_order)",
        lambda: _train_default("batch_order"),
        "cycled",
        "reshuffled: a new permutation each epoch, every batch full",
        "the authors' itertools.cycle replays one shuffled pass, its short last batch included",
        "fixture (as above; 320 rows: batches of 256 and 64): R² % BatchTopK 92.29 → 92.57, "
        "Matryoshka 94.28 → 94.46; L0 7.58 → 7.32, 8.76 → 8.42",
    ),
)


def deviations_table() -> pd.DataFrame:
    """Every :data:`DEVIATIONS` row with the default read from the code and whether it is the authors'."""
    rows = [
        {
            "setting": d.setting,
            "this book's default": str(d.default()),
            "the authors": str(d.authors),
            "default is the authors'": "yes" if d.follows_authors() else "no",
            "option": d.option,
            "why": d.why,
            "measured effect": d.effect,
        }
        for d in DEVIATIONS
    ]
    return pd.DataFrame(rows).set_index("setting")
