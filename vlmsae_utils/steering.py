"""Steer a multimodal LLM (LLaVA) by clamping SAE latents inside its vision tower.

:func:`steer` splices an SAE into the output of one vision block through
:meth:`VisionEncoder.splice` (a forward hook, always removed). Clamps can differ per
image of a batch, so a sweep over many latents is one batched generation. The steering
score (Pach et al. 2025) compares the CLIP text embedding of the model's one-word answer with
the mean CLIP image embedding of the latent's top images.

**Units of α.** A clamp value α is in *raw activation units*, as in the authors' code: the code
a dictionary_learning SAE (``input_scale`` = 1, its normalisation folded into the biases) gives
for the raw block output. Our SAEs encode ``x · input_scale``, so their codes are ``input_scale``
times the raw-unit codes of the same function; :func:`clamp_codes` therefore writes
``α · input_scale`` into them. The same α on an imported checkpoint and on the same weights saved
by us with any ``input_scale`` steers identically.

**Concept images.** :func:`concept_top_images` ranks images by a latent's code averaged over
the image's token rows (``pool="mean"``, the authors' ``--mean_pool``), or by its maximum
(``pool="max"``, our earlier variant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import generation
from .exemplars import TopK, top_k_images
from .generation import DEFAULT_PROMPT, chat_prompt, first_word, pixel_values, prepare_inputs, verbatim_first_word
from .hooks import DEFAULT_HOOK, check_steerable
from .llava import ClipTextImage, feature_block, load_clip_text_image, load_llava, vision_tower
from .metrics import SparseCodes
from .sae import BaseSAE
from .sae.provenance import check_provenance

# Loading (.llava) and prompting (.generation) live in their own modules; their names stay importable from here.
from .steering_scores import (
    class_name_baseline,
    class_pure_latents,
    concept_embeddings,
    latent_concepts,
    mean_std,
    names_class,
    score_answers,
    steering_scores,
    sweep_rows,
    top_class,
)

__all__ = [
    "ALPHA_SCALES",
    "CONCEPT_POOLS",
    "DEFAULT_PROMPT",
    "STEER_MODES",
    "Clamp",
    "ClipTextImage",
    "add_vector",
    "alpha_units",
    "block_mean",
    "chat_prompt",
    "clamp_codes",
    "class_name_baseline",
    "class_pure_latents",
    "code_scale",
    "concept_embeddings",
    "concept_top_images",
    "diffmean_vector",
    "diffmean_vectors",
    "feature_block",
    "first_word",
    "generate",
    "latent_concepts",
    "latent_max_activation",
    "latent_sweep",
    "load_clip_text_image",
    "load_llava",
    "mean_std",
    "names_class",
    "pixel_values",
    "prepare_inputs",
    "score_answers",
    "steer",
    "steered_block_output",
    "steering_scores",
    "sweep_rows",
    "top_class",
    "verbatim_first_word",
    "vision_tower",
]

STEER_MODES = ("replace", "pre_zero", "error_preserving")
CONCEPT_POOLS = ("mean", "max")
ALPHA_SCALES = ("absolute", "max")
Clamp = Mapping[int, float]


def _check_sae(sae: BaseSAE, width: int, clamps: Sequence[Clamp]) -> None:
    """The SAE must read the block's width, and every clamped latent must exist."""
    if sae.activation_dim != width:
        raise ValueError(f"SAE reads {sae.activation_dim}-d activations but the vision block outputs {width}-d")
    for clamp in clamps:
        bad = [j for j in clamp if not 0 <= int(j) < sae.dict_size]
        if bad:
            raise ValueError(
                f"latent(s) {bad} out of range: the SAE has {sae.dict_size} latents (0..{sae.dict_size - 1})"
            )


def code_scale(sae: BaseSAE) -> float:
    """Factor from raw activation units to the SAE's code units: its ``input_scale`` (1 for
    imported dictionary_learning checkpoints and SAEs without the buffer)."""
    scale = getattr(sae, "input_scale", None)
    return 1.0 if scale is None else float(scale)


def clamp_codes(codes: torch.Tensor, clamps: Sequence[Clamp], mode: str, scale: float = 1.0) -> torch.Tensor:
    """Codes ``[B, T, ω]`` with latent j set to ``α · scale`` on every token of row b (``clamps[b]``).

    α is in raw activation units and ``scale`` (:func:`code_scale`) converts it to the codes'
    units; with ``scale = 1`` α is written as given.
    """
    out = torch.zeros_like(codes) if mode == "pre_zero" else codes.clone()
    for row, clamp in enumerate(clamps):
        for latent, alpha in clamp.items():
            out[row, :, int(latent)] = float(alpha) * float(scale)
    return out


def steered_block_output(hidden: torch.Tensor, sae: BaseSAE, clamps: Sequence[Clamp], mode: str) -> torch.Tensor:
    """New block output for ``hidden`` ``[B, T, D]``: SAE decode of the clamped code, or (mode
    ``error_preserving``) ``hidden`` plus the change the clamp makes to the reconstruction.
    Clamp values α are in raw activation units (converted with the SAE's ``input_scale``)."""
    batch, length, width = hidden.shape
    flat = hidden.reshape(batch * length, width).float()
    codes = sae.encode(flat).reshape(batch, length, -1)
    clamped = clamp_codes(codes, clamps, mode, code_scale(sae))
    decoded = sae.decode(clamped.reshape(batch * length, -1)).reshape(batch, length, width)
    if mode == "error_preserving":
        delta = decoded - sae.decode(codes.reshape(batch * length, -1)).reshape(batch, length, width)
        return (hidden.float() + delta).to(hidden.dtype)
    return decoded.to(hidden.dtype)


def _per_row(clamp: Clamp | Sequence[Clamp] | None, batch: int) -> list[Clamp]:
    """One clamp per batch row (a single mapping applies to every row)."""
    if clamp is None:
        return [{}] * batch
    if isinstance(clamp, Mapping):
        return [clamp] * batch
    if len(clamp) != batch:
        raise ValueError(f"{len(clamp)} per-row clamps for a batch of {batch} images")
    return list(clamp)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    sae: BaseSAE,
    layer: int,
    clamp: Clamp | Sequence[Clamp] | None = None,
    mode: str = "replace",
    hook: str = DEFAULT_HOOK,
) -> Iterator[None]:
    """Within the block, vision block ``layer``'s output (at ``hook``, a steerable hook of
    :mod:`.hooks`) is replaced by the SAE's clamped reconstruction.

    ``clamp`` maps latent → α for every image, or is a list with one mapping per image of the
    batch. α is in raw activation units, as the authors' α = 100 (for ``alpha_scale: absolute``):
    latent j's code is set to ``α · sae.input_scale``, the same intervention on an imported
    dictionary_learning SAE (scale 1) and on the same function saved by us with another scale.
    Modes: ``replace`` (the paper), ``pre_zero`` (other latents zeroed), and
    ``error_preserving`` (the SAE error is added back, so only the clamped latent changes).
    """
    if mode not in STEER_MODES:
        raise ValueError(f"unknown steering mode {mode!r}; valid: {', '.join(STEER_MODES)}")
    check_steerable(hook)
    tower = vision_tower(model)
    block = tower.block_index(layer)
    if block > feature_block(model):
        raise ValueError(
            f"vision block {block} comes after the block LLaVA reads its image features from "
            f"({feature_block(model)}): steering it cannot change the answer"
        )
    rows = [clamp] if isinstance(clamp, Mapping) or clamp is None else list(clamp)
    _check_sae(sae, tower.output_dim(hook), [r or {} for r in rows])
    # the tower's name is LLaVA's, not the CLIP model its SAE's store names: compare hook and block only
    check_provenance(sae, {"hook": hook, "layer": block}, f"vision block {block} ({hook}) of {tower.name}")
    sae_param = next(sae.parameters())

    def replace(hidden: torch.Tensor) -> torch.Tensor:
        # the SAE runs in its own precision (float32); the block output keeps the tower's (float16 on CUDA)
        with torch.no_grad():
            new = steered_block_output(
                hidden.to(sae_param.device, sae_param.dtype), sae, _per_row(clamp, hidden.shape[0]), mode
            )
        return new.to(hidden.device, hidden.dtype)

    was_training = sae.training
    sae.eval()  # inference encoding: the learned threshold, not the batch top-k
    try:
        with tower.splice(hook, layer, replace):
            yield
    finally:
        sae.train(was_training)


@contextlib.contextmanager
def add_vector(
    model: nn.Module, layer: int, vector: torch.Tensor, scale: float = 1.0, hook: str = DEFAULT_HOOK
) -> Iterator[None]:
    """Within the block, ``scale · vector`` is added to every token of vision block ``layer`` at ``hook``
    (DiffMean steering); ``vector`` is ``[D]`` for every image or ``[B, D]`` with one vector per image of the batch."""
    check_steerable(hook)
    tower = vision_tower(model)
    width = tower.output_dim(hook)
    if vector.shape[-1:] != (width,) or vector.ndim not in (1, 2):
        raise ValueError(f"steering vector has shape {tuple(vector.shape)}; expected [{width}] or [batch, {width}]")

    def shift(hidden: torch.Tensor) -> torch.Tensor:
        v = vector.to(hidden.device, hidden.dtype)
        if v.ndim == 2 and v.shape[0] != hidden.shape[0]:
            raise ValueError(f"{v.shape[0]} steering vectors for a batch of {hidden.shape[0]} images")
        return hidden + scale * (v[:, None, :] if v.ndim == 2 else v)

    with tower.splice(hook, layer, shift):
        yield


def block_mean(model: nn.Module, pixel_values: torch.Tensor, layer: int, hook: str = DEFAULT_HOOK) -> torch.Tensor:
    """Mean activation of vision block ``layer`` at ``hook`` over images and tokens."""
    check_steerable(hook)
    return vision_tower(model).capture(pixel_values, hook, layer).float().mean(dim=(0, 1))


def diffmean_vector(
    model: nn.Module, with_concept: torch.Tensor, without_concept: torch.Tensor, layer: int, hook: str = DEFAULT_HOOK
) -> torch.Tensor:
    """DiffMean steering vector: mean block output on images with the concept minus without it."""
    return block_mean(model, with_concept, layer, hook) - block_mean(model, without_concept, layer, hook)


# ----------------------------------------------------------------------------- generation


def generate(
    model: nn.Module,
    processor,
    images: Sequence,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 5,
    *,
    sae: BaseSAE | None = None,
    layer: int | None = None,
    clamp: Clamp | Sequence[Clamp] | None = None,
    mode: str = "replace",
    steering: Callable[[], contextlib.AbstractContextManager] | None = None,
    hook: str = DEFAULT_HOOK,
) -> list[str]:
    """Greedy answers for a batch of images (:func:`vlmsae_utils.generation.generate`); with ``sae`` and
    ``clamp`` the vision tower is steered (one clamp for all images, or one per image), with
    ``steering`` any other context (DiffMean)."""
    if not images:
        return []
    if sae is not None:
        if layer is None:
            raise ValueError("steering with an SAE needs the vision block index `layer`")
        steering = lambda: steer(model, sae, layer, clamp, mode, hook)
    return generation.generate(model, processor, images, prompt, max_new_tokens, steering=steering)


def latent_sweep(
    model: nn.Module,
    processor,
    sae: BaseSAE,
    layer: int,
    images: Sequence,
    latents: Sequence[int],
    alphas: Sequence[float],
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 5,
    mode: str = "replace",
    batch_size: int = 16,
    alpha_units: Mapping[int, float] | None = None,
    hook: str = DEFAULT_HOOK,
) -> list[dict]:
    """Answers for every (image, latent, α), batching different clamps on different rows.

    With ``alpha_units`` the clamp of latent j is ``α · alpha_units[j]`` raw activation units
    (e.g. α in multiples of the latent's largest activation, :func:`alpha_units`); the table
    keeps α as given.
    """
    check_steerable(hook)
    units = alpha_units or {}
    jobs = [(i, latent, alpha) for i in range(len(images)) for latent in latents for alpha in alphas]
    rows = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        clamps = [{latent: alpha * units.get(latent, 1.0)} for _, latent, alpha in chunk]
        answers = generate(
            model,
            processor,
            [images[i] for i, _, _ in chunk],
            prompt,
            max_new_tokens,
            sae=sae,
            layer=layer,
            clamp=clamps,
            mode=mode,
            hook=hook,
        )
        rows += [
            {"image": i, "latent": latent, "alpha": alpha, "answer": answer}
            for (i, latent, alpha), answer in zip(chunk, answers)
        ]
    return rows


# ----------------------------------------------------------------------------- concepts and α units


def _as_sparse(codes) -> SparseCodes:
    if isinstance(codes, SparseCodes):
        return codes
    return SparseCodes.from_dense(torch.as_tensor(codes).float())


def concept_top_images(codes: SparseCodes, row_image_index, top_k: int = 16, pool: str = "mean") -> TopK:
    """A latent's concept images: its top-``top_k`` images by its code pooled over each image's rows.

    ``pool="mean"`` (default, the authors' ``--mean_pool``): the sum of the latent's code over the
    image's rows divided by the image's number of rows (absent entries count as 0).
    ``pool="max"``: the largest code over the image's rows (this book's earlier variant).
    ``row_image_index`` gives the image of every row (image-major, non-decreasing, e.g.
    ``store.row_image_index()``). Returns :class:`~vlmsae_utils.exemplars.TopK` over image ids
    (``values`` are pooled codes in the SAE's code units; −1 / NaN where fewer than ``top_k`` images
    have a positive pooled code).
    """
    if pool not in CONCEPT_POOLS:
        raise ValueError(f"pool must be one of {', '.join(CONCEPT_POOLS)}, got {pool!r}")
    codes = _as_sparse(codes)
    image = torch.as_tensor(np.asarray(row_image_index), dtype=torch.int64).flatten()
    if image.numel() != len(codes):
        raise ValueError(f"row_image_index has {image.numel()} entries, the codes have {len(codes)} rows")
    if image.numel() and (int(image.min()) < 0 or bool((image[1:] < image[:-1]).any())):
        raise ValueError("row_image_index must be non-negative and non-decreasing (image-major rows)")
    if pool == "max":
        return top_k_images(codes, top_k, row_image_index=image)
    return top_k_images(_mean_pool(codes, image), top_k)


def _mean_pool(codes: SparseCodes, image: torch.Tensor, chunk_rows: int = 1 << 20) -> SparseCodes:
    """Sparse ``[num_images, K]`` codes averaged over each image's rows, in image-aligned row chunks."""
    num_images = int(image.max()) + 1 if image.numel() else 0
    rows_per_image = torch.bincount(image, minlength=num_images).to(torch.float64)
    kdim = codes.num_latents
    img_parts, lat_parts, val_parts = [], [], []
    start, n = 0, len(codes)
    while start < n:
        stop = min(n, start + chunk_rows)
        while stop < n and image[stop] == image[stop - 1]:  # never split an image's rows
            stop += 1
        part = codes.slice_rows(start, stop)
        img = image[start:stop][part.row_ids()]
        key = img * kdim + part.indices
        unique, inverse = torch.unique(key, return_inverse=True)
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, part.values.double())
        u_img = unique // kdim
        keep = sums != 0
        img_parts.append(u_img[keep])
        lat_parts.append((unique % kdim)[keep])
        val_parts.append((sums / rows_per_image[u_img])[keep].float())
        start = stop
    img = torch.cat(img_parts) if img_parts else torch.zeros(0, dtype=torch.int64)
    indptr = torch.zeros(num_images + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(img, minlength=num_images), 0)
    lat = torch.cat(lat_parts) if lat_parts else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(val_parts) if val_parts else torch.zeros(0)
    return SparseCodes(indptr, lat, val, kdim)


def latent_max_activation(codes: SparseCodes) -> torch.Tensor:
    """Largest code of every latent over all rows ``[K]`` (0 for a latent that never fires)."""
    codes = _as_sparse(codes)
    out = torch.zeros(codes.num_latents)
    if codes.nnz:
        out.scatter_reduce_(0, codes.indices, codes.values.float(), reduce="amax", include_self=True)
    return out


def alpha_units(
    sae: BaseSAE, codes: SparseCodes, latents: Sequence[int], alpha_scale: str = "absolute"
) -> dict[int, float]:
    """Raw activation units of one α per latent, for :func:`latent_sweep` and the clamps.

    ``absolute``: 1 (α is in raw activation units, the paper's α = 100). ``max``: latent j's
    largest code over ``codes`` (the SAE's codes, e.g. :func:`scoring.sae_codes`, which are in
    code units) divided by the SAE's ``input_scale``, so that α = 1 clamps at exactly that largest
    code whatever the scale.
    """
    if alpha_scale not in ALPHA_SCALES:
        raise ValueError(f"alpha_scale must be one of {', '.join(ALPHA_SCALES)}, got {alpha_scale!r}")
    if alpha_scale == "absolute":
        return {int(j): 1.0 for j in latents}
    largest = latent_max_activation(codes)
    scale = code_scale(sae)
    return {int(j): float(largest[int(j)]) / scale for j in latents}


def diffmean_vectors(
    model: nn.Module,
    processor,
    layer: int,
    top_indices: torch.Tensor,
    latents: Sequence[int],
    load: Callable[[int], object],
    num_images: int,
    seed: int = 0,
    hook: str = DEFAULT_HOOK,
) -> torch.Tensor:
    """One DiffMean vector per latent ``[L, D]``: block mean over its top images minus over as many others."""
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for latent in latents:
        with_concept = [int(i) for i in top_indices[latent].tolist() if i >= 0]
        others = [i for i in torch.randperm(num_images, generator=generator).tolist() if i not in set(with_concept)]
        without = others[: len(with_concept)]
        vectors.append(
            diffmean_vector(
                model,
                pixel_values(processor, [load(i) for i in with_concept]),
                pixel_values(processor, [load(i) for i in without]),
                layer,
                hook,
            )
        )
    return torch.stack(vectors)
