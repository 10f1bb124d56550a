"""Stage 1: run a frozen vision encoder over an image set and write its activations to a store.

Batched, under ``torch.inference_mode``, resumable after an interruption (complete shards
are kept), with images decoded and preprocessed by ``num_workers`` DataLoader workers (pinned
memory and prefetch on CUDA, so the decoder does not set the pace of a GPU), and splittable
over processes (``torchrun --nproc_per_node N``): process ``r``
writes shards ``r, r+N, …`` and rank 0 assembles the manifest, so the store is identical to
a single-process run. Random tokens are drawn with a per-image seed, so they do not depend
on batching, resumption or the number of processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import encoders as enc
from . import hooks
from .data import ImageFolderDataset, exif_transpose_enabled, load_batch
from .device import resolve_device, resolve_model_dtype
from .gpu_decode import DevicePixels, RawBatches, check_decode, pixel_recipe
from .io import check_writable
from .paths import portable_path
from .sources import data_root
from .store import ActivationStore, StorePlan, StoreWriter, check_dtype

__all__ = [
    "DEFAULT_SHARD_BATCHES",
    "batch_loader",
    "batch_rows",
    "check_num_workers",
    "decoded_batches",
    "default_num_workers",
    "extract_activations",
    "extract_embeddings",
    "extract_share",
    "image_seed",
    "open_dataset",
    "random_token_rows",
    "store_summary",
    "validate_extraction",
]

log = logging.getLogger(__name__)
DEFAULT_SHARD_BATCHES = 16  # a shard holds this many batches of images


def default_num_workers() -> int:
    """Image-decoding workers by default: ``min(8, os.cpu_count())``."""
    return min(8, os.cpu_count() or 1)


def check_num_workers(num_workers: int | None) -> int:
    """``None`` → :func:`default_num_workers`; negative or non-integer values are an error."""
    if num_workers is None:
        return default_num_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 (0 decodes in the main process), got {num_workers!r}")
    return num_workers


def validate_extraction(
    encoder: enc.VisionEncoder, hook: str, layer: int | None, tokens: str, random_k: int, dtype: str, batch_size: int
) -> None:
    """Every parameter check that can fail, done before any image is read. A global hook
    (``post_projection``) ignores ``layer``: the sweep's ``last`` layer passes -1 to notebook 01."""
    spec = hooks.hook_spec(hook)
    enc.check_tokens(tokens, random_k)
    check_dtype(dtype)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if spec.per_block:
        hooks.check_layer(hook, layer)
        encoder.block_index(layer)
    hooks.check_token_mode(hook, tokens)
    if spec.layout == hooks.TOKENS and tokens == "cls" and not encoder.has_cls_token:
        raise ValueError(
            f"{encoder.name} has no CLS token: use tokens='mean' or 'random_k' (the paper uses 2 random tokens)"
        )


def image_seed(seed: int, image_index: int) -> int:
    """Seed of one image's random token draw, independent of how images are batched."""
    return (seed * 1_000_003 + image_index) % (2**63 - 1)


def random_token_rows(hidden: torch.Tensor, image_indices: Sequence[int], random_k: int, seed: int) -> torch.Tensor:
    """``random_k`` tokens per image drawn with replacement using each image's own seed; rows image-major."""
    batch, length, dim = hidden.shape
    picks = torch.stack(
        [
            torch.randint(0, length, (random_k,), generator=torch.Generator().manual_seed(image_seed(seed, i)))
            for i in image_indices
        ]
    ).to(hidden.device)
    return torch.gather(hidden, 1, picks[..., None].expand(-1, -1, dim)).reshape(batch * random_k, dim)


def batch_rows(
    encoder: enc.VisionEncoder,
    pixel_values: torch.Tensor,
    hook: str,
    layer: int | None,
    tokens: str,
    random_k: int,
    image_indices: Sequence[int],
    seed: int,
) -> torch.Tensor:
    """Activation rows of one batch (image-major) for the chosen hook and token mode."""
    if tokens != "random_k":
        return encoder.activations(pixel_values, hook, layer, tokens)
    return random_token_rows(encoder.capture(pixel_values, hook, layer), image_indices, random_k, seed)


def _rows_per_image(encoder: enc.VisionEncoder, hook: str, tokens: str, random_k: int) -> int:
    """Rows per image; for ``tokens='all'`` the sequence length is measured on a blank image."""
    num_tokens = None
    spec = hooks.hook_spec(hook)
    if tokens == "all" and spec.layout == hooks.TOKENS:
        blank = encoder.preprocess([Image.new("RGB", (64, 64))])
        num_tokens = encoder.capture(blank, hook, -1 if spec.per_block else None).shape[1]
    return encoder.rows_per_image(hook, tokens, random_k, num_tokens)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: given, or from an initialised ``torch.distributed`` group, or 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    return rank, world_size


def extract_activations(
    encoder: enc.VisionEncoder | str | os.PathLike,
    dataset: ImageFolderDataset,
    out_dir: str | os.PathLike,
    *,
    hook: str = hooks.DEFAULT_HOOK,
    layer: int | None = -2,
    tokens: str = "cls",
    random_k: int = 2,
    dtype: str = "float32",
    batch_size: int = 64,
    shard_images: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    device: str | torch.device | None = "auto",
    model_dtype: str | torch.dtype | None = "auto",
    decode: str = "cpu",
) -> ActivationStore | None:
    """Write the activations of ``encoder`` on ``dataset`` to a store in ``out_dir`` and open it.

    ``dtype`` is how rows are stored on disk; ``device`` and ``model_dtype`` apply when
    ``encoder`` is given by name (a loaded encoder keeps its own). ``num_workers`` DataLoader
    workers decode images (``None``: ``min(8, cpu count)``); the store does not depend on it.
    ``decode="gpu"`` decodes JPEGs on the encoder's CUDA device instead (:mod:`.gpu_decode`).
    Reruns with the same parameters resume (or return the finished store); other parameters
    are refused. With several processes, every rank returns the store once all are done
    (``torch.distributed`` initialised) or ``None`` while other ranks are still writing.
    """
    num_workers = check_num_workers(num_workers)
    if isinstance(encoder, (str, os.PathLike)):
        dev = resolve_device(device)
        encoder = enc.load_encoder(encoder, dev, resolve_model_dtype(model_dtype, dev))
    validate_extraction(encoder, hook, layer, tokens, random_k, dtype, batch_size)
    check_decode(decode, encoder.device)
    rank, world_size = _distributed(rank, world_size)
    shard_images = shard_images or batch_size * DEFAULT_SHARD_BATCHES
    if shard_images % batch_size:
        raise ValueError(f"shard_images ({shard_images}) must be a multiple of batch_size ({batch_size})")
    writer = StoreWriter(
        check_writable(out_dir),
        _plan(encoder, dataset, hook, layer, tokens, random_k, dtype, batch_size, shard_images, seed, decode),
    )
    writer.begin()
    _forget_changed_images(writer, dataset, rank, world_size)
    if writer.is_complete():
        return ActivationStore.open(out_dir)
    _write_my_shards(writer, encoder, dataset, rank, world_size, progress, num_workers)
    return _finish(writer, rank, world_size)


def _plan(
    encoder: enc.VisionEncoder,
    dataset: ImageFolderDataset,
    hook: str,
    layer: int | None,
    tokens: str,
    random_k: int,
    dtype: str,
    batch_size: int,
    shard_images: int,
    seed: int,
    decode: str = "cpu",
) -> StorePlan:
    """The store plan: parameters that fix the content, the image list, the sharding."""
    block = encoder.block_index(layer) if hooks.hook_spec(hook).per_block else None
    params = {
        "encoder": encoder.name,
        "family": encoder.family,
        "hook": hook,
        "layer": block,
        "tokens": tokens,
        "random_k": random_k if tokens == "random_k" else None,
        "seed": seed,
        "batch_size": batch_size,
        "data_root": portable_path(dataset.root),  # a data home moved or copied keeps its stores
        "split": dataset.split,
    }
    if encoder.preprocessing:  # the image-processor backend changes the pixels a transformers model sees
        params["image_backend"] = encoder.preprocessing
    if exif_transpose_enabled():  # recorded only when on: stores read as stored keep their fingerprint
        params["exif_transpose"] = True
    if decode != "cpu":  # GPU decoding resamples slightly differently: recorded, and only then
        params["decode"] = decode
    return StorePlan(
        params,
        dataset.image_ids,
        dataset.class_names,
        encoder.output_dim(hook),
        dtype,
        _rows_per_image(encoder, hook, tokens, random_k),
        shard_images,
    )


class _DecodedBatches(Dataset):
    """Item ``i`` = batch ``i`` of the work list, decoded and preprocessed on the CPU (in a worker).

    Returns ``(shard, pixels or None, kept indices, [(image_id, reason)] of skipped files)``.
    """

    def __init__(self, dataset: ImageFolderDataset, preprocess, batches: list[tuple[int, list[int]]]):
        self.dataset, self.preprocess, self.batches = dataset, preprocess, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int):
        shard, indices = self.batches[item]
        images, good, bad = load_batch(self.dataset, indices)
        pixels = self.preprocess(images) if images else None
        return shard, pixels, good, bad


def _batch_plan(plan: StorePlan, shards: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(shard, image indices) of every batch of ``shards``, in store order."""
    work = []
    for shard in shards:
        indices = list(plan.shard_range(shard))
        work += [(shard, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    return work


def decoded_batches(
    dataset: ImageFolderDataset, preprocess, work: list[tuple[int, list[int]]], num_workers: int, pin_memory: bool
) -> DataLoader:
    """An in-order DataLoader over decoded batches; workers prefetch two batches each."""
    return batch_loader(_DecodedBatches(dataset, preprocess, work), num_workers, pin_memory)


def batch_loader(source: Dataset, num_workers: int, pin_memory: bool) -> DataLoader:
    """An in-order DataLoader whose items are whole batches of ``source``; workers prefetch two each."""
    extra: dict[str, Any] = {"prefetch_factor": 2, "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        **extra,
    )


def _write_my_shards(
    writer: StoreWriter,
    encoder: enc.VisionEncoder,
    dataset: ImageFolderDataset,
    rank: int,
    world_size: int,
    progress: bool,
    num_workers: int = 0,
) -> None:
    """Extract every shard of this rank that is not on disk yet; a shard is written once its last batch is in."""
    from tqdm.auto import tqdm

    plan, params = writer.plan, writer.plan.params
    todo = [s for s in range(rank, plan.num_shards, world_size) if not writer.shard_done(s)]
    work = _batch_plan(plan, todo, params["batch_size"])
    remaining = {s: sum(1 for shard, _ in work if shard == s) for s in todo}
    pending: dict[int, tuple[list, list, list]] = {s: ([], [], []) for s in todo}
    on_device = params.get("decode") == "gpu"
    source = RawBatches(dataset, work) if on_device else _DecodedBatches(dataset, encoder.processor, work)
    finish = DevicePixels(pixel_recipe(encoder.processor), encoder.device) if on_device else None
    loader = batch_loader(source, min(num_workers, len(work)), pin_memory=encoder.device.type == "cuda")
    stamps = {s: dataset.stamps(plan.shard_range(s)) for s in todo}  # before reading: a later change is seen
    total = sum(len(plan.shard_range(s)) for s in todo)
    with tqdm(total=total, desc=f"extract {params['hook']} (rank {rank})", unit="img", disable=not progress) as bar:
        for shard, pixels, good, bad in loader:
            rows, kept, skipped = pending[shard]
            if finish is not None:  # decode: gpu — the worker read bytes; decode and preprocess on the device
                pixels, good, refused = finish(pixels, good, dataset.records) if good else (None, [], [])
                bad = bad + refused
            skipped += bad
            if pixels is not None:
                out = batch_rows(
                    encoder,
                    pixels,
                    params["hook"],
                    params["layer"],
                    params["tokens"],
                    params["random_k"] or 1,
                    good,
                    params["seed"],
                )
                rows.append(out.float().cpu().numpy())
                kept += good
            bar.update(len(good) + len(bad))
            remaining[shard] -= 1
            if remaining[shard] == 0:
                array = np.concatenate(rows) if rows else np.zeros((0, plan.dim), np.float32)
                writer.write_shard(shard, array, kept, skipped, stamps[shard])
                del pending[shard]


def _forget_changed_images(writer: StoreWriter, dataset: ImageFolderDataset, rank: int, world_size: int) -> None:
    """Shards of this rank whose image files were replaced, fixed or removed since they were read
    (size or modification time differ) are extracted again, not reused with their old rows or verdicts."""
    changed = writer.changed_shards(range(rank, writer.plan.num_shards, world_size), dataset.stamps)
    if changed:
        log.warning("image files changed since shard(s) %s were written: extracting them again", changed[:10])
        writer.forget_shards(changed)


def _finish(writer: StoreWriter, rank: int, world_size: int) -> ActivationStore | None:
    """Assemble the manifest once all shards exist; with torch.distributed, rank 0 does it after a barrier."""
    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        if rank == 0:
            writer.finalize()
        dist.barrier()
        return ActivationStore.open(writer.path)
    if writer.all_shards_done():
        return writer.finalize()
    log.info("rank %d done; waiting for other ranks to write their shards", rank)
    return None


def extract_share(params: dict, rank: int, world_size: int, local_rank: int = 0) -> bool:
    """One process's shards of a sweep cell's extraction (notebook 01's parameters), for a job whose
    tasks share the work: task ``rank`` writes shards ``rank, rank + world_size, …`` of the store
    notebook 01 writes (the same plan, so the notebook then only opens it). True when every shard is
    written, i.e. this task finished last and assembled the store."""
    from .paths import resolve_out_dir

    device = params.get("device", "auto")
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        device = f"cuda:{local_rank}"  # the job's GPUs are all visible: one per task
    dataset = open_dataset(params["data_dir"], params.get("split"))
    dev = resolve_device(device)
    encoder = enc.load_encoder(params["model"], dev, resolve_model_dtype(params.get("model_dtype", "auto"), dev))
    store = extract_activations(
        encoder,
        dataset,
        resolve_out_dir(params["out_dir"]) / "activations",
        hook=params["hook"],
        layer=params["layer"],
        tokens=params["tokens"],
        random_k=params.get("random_k", 2),
        dtype=params["dtype"],
        batch_size=params["batch_size"],
        num_workers=params.get("num_workers"),
        decode=params.get("decode", "cpu"),
        rank=rank,
        world_size=world_size,
        progress=False,
    )
    return store is not None


def extract_embeddings(
    scorer: enc.VisionEncoder | str | os.PathLike, dataset: ImageFolderDataset, out_dir: str | os.PathLike, **kwargs
) -> ActivationStore | None:
    """Scoring-encoder embeddings (``post_projection``, one per image) in the same store format."""
    return extract_activations(scorer, dataset, out_dir, hook=hooks.EMBEDDING_HOOK, layer=None, tokens="cls", **kwargs)


def store_summary(store: ActivationStore) -> dict:
    """One table row about a store: what produced it, rows, dim, dtype, skipped files."""
    p = store.params
    return {
        "encoder": p["encoder"],
        "hook": p["hook"],
        "layer": p["layer"],
        "tokens": p["tokens"],
        "images": len(store.image_ids),
        "rows": len(store),
        "dim": store.dim,
        "dtype": store.dtype,
        "skipped": len(store.skipped),
        "MB": round(store.nbytes / 2**20, 2),
    }


def open_dataset(data_dir: str | os.PathLike, split: str | None) -> ImageFolderDataset:
    """The image set of a notebook's ``data_dir``/``split`` (``"fixture"`` = the embedded default)."""
    if data_dir in (None, ""):
        raise ValueError("data_dir is empty: give an image folder or 'fixture'")
    return ImageFolderDataset(data_root(data_dir), split or None)
