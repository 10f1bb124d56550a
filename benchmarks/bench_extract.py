"""Extraction overhead vs a bare forward pass, and store read throughput vs one numpy.load.

Run: ``python benchmarks/bench_extract.py [--device cuda] [--only fixture|workers|full]``. Prints
ratios measured in the same run:

- fixture: overhead of extract_activations vs load + preprocess + bare forward (goal ≤ 1.10) and
  store read vs numpy.load (goal ≥ 0.8);
- workers: decoding + CLIP preprocessing of 384-px JPEGs (to 336 px) with ``num_workers`` 2 vs 0;
- full: extraction with the rehearsal CLIP ViT-L/14-336 (block 22, CLS) end to end vs the bare
  forward on preloaded pixel tensors (goal on a GPU: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmsae_utils import encoders, extract
from vlmsae_utils.store import StorePlan, StoreWriter


def best_of(repeats: int, fn) -> float:
    """Fastest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_extraction(tmp: Path, batch_size: int = 64) -> None:
    """Images/s of extract_activations (load + forward + store) vs load + preprocess + bare forward."""
    dataset = extract.open_dataset("fixture", "train")
    encoder = encoders.load_encoder("fixture:clip")
    batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                encoder.model(pixel_values=encoder.preprocess([dataset.load(i) for i in batch]))

    runs = iter(range(100))

    def ours(layer: int) -> None:
        extract.extract_activations(
            encoder, dataset, tmp / f"run{next(runs)}", layer=layer, batch_size=batch_size, progress=False
        )

    base = best_of(3, bare)
    last = best_of(3, lambda: ours(-1))
    early = best_of(3, lambda: ours(-2))
    n = len(dataset)
    print(f"extraction, {n} fixture images, batch {batch_size}:")
    print(f"  bare forward (load+preprocess+full model): {n / base:8.0f} img/s")
    print(f"  extract_activations, last block          : {n / last:8.0f} img/s  overhead ratio {last / base:.2f}")
    print(f"  extract_activations, block -2 (stops early): {n / early:6.0f} img/s  overhead ratio {early / base:.2f}")


def bench_store_read(tmp: Path, rows: int = 131072, dim: int = 256, shard_rows: int = 16384) -> None:
    """GB/s of a full ordered pass over a store vs numpy.load of one contiguous array."""
    data = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    plan = StorePlan({"bench": True}, [f"img{i}" for i in range(rows)], [""] * rows, dim, "float32", 1, shard_rows)
    writer = StoreWriter(tmp / "store", plan)
    writer.begin()
    for shard in range(plan.num_shards):
        part = plan.shard_range(shard)
        writer.write_shard(shard, data[part.start : part.stop], list(part), [])
    store = writer.finalize()
    np.save(tmp / "flat.npy", data)
    gigabytes = data.nbytes / 1e9

    def read_store() -> None:
        total = 0.0
        for batch in store.iter_batches(4096):
            total += float(batch[0, 0])

    flat = best_of(5, lambda: np.load(tmp / "flat.npy"))
    ours = best_of(5, read_store)
    tensor = best_of(5, store.to_tensor)
    shuffled = best_of(2, lambda: sum(1 for _ in store.iter_batches(4096, shuffle=True)))
    print(f"store read, {rows}×{dim} float32 = {gigabytes:.2f} GB in {plan.num_shards} shards (page cache warm):")
    print(f"  numpy.load contiguous : {gigabytes / flat:6.2f} GB/s")
    print(f"  iter_batches(4096)    : {gigabytes / ours:6.2f} GB/s  ratio {flat / ours:.2f}")
    print(f"  to_tensor()           : {gigabytes / tensor:6.2f} GB/s  ratio {flat / tensor:.2f}")
    print(f"  shuffled batches      : {gigabytes / shuffled:6.2f} GB/s  ratio {flat / shuffled:.2f}")


def bench_decode_workers(per_class: int = 16, batch_size: int = 32) -> None:
    """Images/s of the extraction input pipeline alone (decode + preprocess) by number of workers."""
    from vlmsae_utils.data import ImageFolderDataset
    from vlmsae_utils.rehearsal import rehearsal_images

    dataset = ImageFolderDataset(rehearsal_images(384, train_per_class=per_class), "train")
    encoder = encoders.load_encoder("rehearsal:openai/clip-vit-large-patch14-336", device="cpu")
    work = [(0, list(range(i, min(i + batch_size, len(dataset))))) for i in range(0, len(dataset), batch_size)]

    def decode(workers: int) -> None:
        for _ in extract.decoded_batches(dataset, encoder.processor, work, workers, pin_memory=False):
            pass

    serial, parallel = best_of(2, lambda: decode(0)), best_of(2, lambda: decode(2))
    n = len(dataset)
    print(f"input pipeline, {n} JPEGs 384 px → 336 px CLIP preprocessing, batch {batch_size}:")
    print(f"  num_workers=0: {n / serial:7.1f} img/s")
    print(f"  num_workers=2: {n / parallel:7.1f} img/s  speed-up {serial / parallel:.2f}×")


def time_extraction(
    tmp: Path,
    encoder_name: str,
    dataset,
    layer: int,
    device: str,
    model_dtype: str = "auto",
    batch_size: int = 8,
    decode: str = "cpu",
    num_workers: int = 2,
) -> dict:
    """Seconds of ``extract_activations`` end to end (decode, preprocess, forward, store) against the
    bare forward on the same images' pixels preloaded on the device (best of 2 each)."""
    from vlmsae_utils.device import cuda_synchronize, resolve_device

    dev = resolve_device(device)
    encoder = encoders.load_encoder(encoder_name, device=dev, model_dtype=model_dtype)
    images = len(dataset)
    pixels = [
        encoder.preprocess([dataset.load(i) for i in range(s, min(s + batch_size, images))])
        for s in range(0, images, batch_size)
    ]
    runs = iter(range(100))

    def bare() -> None:
        for batch in pixels:
            encoder.capture(batch, "post_mlp_residual", layer)
        cuda_synchronize(dev)

    def ours() -> None:
        extract.extract_activations(
            encoder,
            dataset,
            tmp / f"full{next(runs)}",
            layer=layer,
            batch_size=batch_size,
            num_workers=num_workers,
            decode=decode,
            progress=False,
        )
        cuda_synchronize(dev)

    bare()  # warm-up (CUDA kernels, allocator)
    return {"device": str(dev), "dtype": str(encoder.dtype), "images": images, "bare_s": best_of(2, bare),
            "ours_s": best_of(2, ours)}  # fmt: skip


def bench_full_width(tmp: Path, device: str, images: int = 16, batch_size: int = 8) -> None:
    """Rehearsal CLIP-L/14-336 block 22: extract_activations end to end vs bare forward on preloaded pixels."""
    from vlmsae_utils.data import ImageFolderDataset
    from vlmsae_utils.rehearsal import rehearsal_images

    dataset = ImageFolderDataset(rehearsal_images(384), "train")
    dataset.records = dataset.records[:images]
    r = time_extraction(tmp, "rehearsal:openai/clip-vit-large-patch14-336", dataset, 22, device, batch_size=batch_size)
    base, end_to_end = r["bare_s"], r["ours_s"]
    print(f"full width on {r['device']} ({r['dtype']}), rehearsal CLIP ViT-L/14-336 block 22, {images} images:")
    print(f"  bare forward on preloaded pixels: {images / base:7.2f} img/s")
    print(
        f"  extract_activations end to end  : {images / end_to_end:7.2f} img/s  ratio {base / end_to_end:.2f} of bare"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=("fixture", "workers", "full"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "fixture"):
            bench_extraction(Path(folder))
            bench_store_read(Path(folder))
        if args.only in (None, "workers"):
            bench_decode_workers()
        if args.only in (None, "full"):
            bench_full_width(Path(folder), args.device)
