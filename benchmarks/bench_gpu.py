"""Every stage's speed on one card, in one command: ``make bench-gpu`` (about 8 minutes on an H100).

Each part runs in its own process under its own time limit, so one slow or stuck part cannot eat
the others' time; its figures (or why it has none) become rows of one CSV, printed as a table with
the card's name. Parts, each timed against a baseline measured in the same process:

- ``extract``: extraction end to end (decode, preprocess, forward, store) vs the bare forward on
  preloaded pixels, float32 and float16 (rehearsal CLIP ViT-L/14-336, block 22; goal ≥ 0.9).
- ``decode``: ``decode: gpu`` vs the default CPU workers — JPEG decode + preprocessing alone, and on
  CUDA the whole extraction with each.
- ``train``: one Matryoshka training step vs one encoder GEMM (d = 1024, ε = 64, B = 4096, k = 20),
  float32 and bf16 autocast (goal ≤ 1.5x).
- ``ms``: MS + top-16 in one pass vs one [K,N]x[N,D] GEMM (N = 10,000, K = 65,536, D = 1024).
- ``uniqueness``: Jaccard overlap of K = 65,536 top-16 sets (seconds; goal ≤ 20 s).
- ``steer``: one steered LLaVA batch (SAE on vision block 22) vs the same batch unsteered.

``--tiny`` runs every part at fixture sizes, all in one process (seconds, any device; the test suite runs it on the
CPU so the script cannot rot). Usage: ``python benchmarks/bench_gpu.py [--device cuda] [--tiny]
[--parts train,ms] [--out FILE]``; the CSV goes to ``--out`` (default: the file chapter 7 reads,
:func:`vlmsae_utils.scale.gpu_benchmark_csv`, under the data home).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

FIELDS = ("card", "part", "measure", "seconds", "baseline", "baseline_seconds", "ratio", "goal", "status")
#: Seconds each part may take at full size (sum 480 s: the whole run stays under 8 minutes).
LIMITS_S = {"extract": 75, "decode": 60, "train": 105, "ms": 80, "uniqueness": 40, "steer": 120}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _row(part: str, measure: str, seconds: float, baseline: str, baseline_s: float, goal: str = "") -> dict:
    """One CSV row: a measured time, its baseline from the same process, and their ratio."""
    return {"part": part, "measure": measure, "seconds": _sig(seconds), "baseline": baseline,
            "baseline_seconds": _sig(baseline_s), "ratio": _sig(seconds / baseline_s), "goal": goal,
            "status": "ok"}  # fmt: skip


def _images(tiny: bool, count: int):
    """The first ``count`` train images: the fixture's (tiny) or the rehearsal's 384-px JPEGs."""
    from vlmsae_utils import extract
    from vlmsae_utils.data import ImageFolderDataset
    from vlmsae_utils.rehearsal import rehearsal_images

    dataset = extract.open_dataset("fixture", "train") if tiny else ImageFolderDataset(rehearsal_images(384), "train")
    dataset.records = dataset.records[:count]
    return dataset


def part_extract(device: str, tiny: bool) -> list[dict]:
    """Extraction end to end vs the bare forward on preloaded pixels, float32 and float16 (CUDA only)."""
    from bench_extract import time_extraction

    dataset = _images(tiny, 16 if tiny else 64)
    name = "fixture:clip" if tiny else "rehearsal:openai/clip-vit-large-patch14-336"
    layer = 2 if tiny else 22
    dtypes = ["float32", "float16"] if torch.device(device).type == "cuda" else ["float32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            r = time_extraction(Path(tmp), name, dataset, layer, device, model_dtype=dtype)
            measure = f"{r['images']} images end to end ({dtype})"
            base = "bare forward, preloaded pixels"
            rows.append(_row("extract", measure, r["ours_s"], base, r["bare_s"], "≤ 1.11x (≥ 0.9 of bare)"))
    return rows


def part_decode(device: str, tiny: bool) -> list[dict]:
    """``decode: gpu`` against the default CPU workers: the decode and preprocessing of JPEGs alone
    (tensor path on the device vs PIL + processor, one process), and on CUDA the whole extraction."""
    from bench_extract import best_of, time_extraction

    from vlmsae_utils import data, encoders, extract, gpu_decode
    from vlmsae_utils.device import cuda_synchronize, resolve_device
    from vlmsae_utils.rehearsal import rehearsal_images

    dataset = data.ImageFolderDataset(rehearsal_images(64 if tiny else 384, 2 if tiny else 8), "train")
    name = "fixture:clip" if tiny else "rehearsal:openai/clip-vit-large-patch14-336"
    dev = resolve_device(device)
    encoder = encoders.load_encoder(name, dev)
    paths = [r.path for r in dataset.records]
    to_device = gpu_decode.DevicePixels(gpu_decode.pixel_recipe(encoder.processor), dev)

    def on_device() -> None:
        to_device([gpu_decode.read_raw(p) for p in paths], list(range(len(paths))), dataset.records)
        cuda_synchronize(dev)

    def pil() -> None:
        encoder.processor([data.load_image(p) for p in paths])

    on_device()  # warm-up (CUDA context, decoder)
    rows = [_row("decode", f"{len(paths)} JPEGs decoded + preprocessed on {dev.type}", best_of(2, on_device),
                 "PIL + processor, one CPU process", best_of(2, pil))]  # fmt: skip
    if dev.type == "cuda":
        workers = extract.default_num_workers()
        with tempfile.TemporaryDirectory() as tmp:
            gpu = time_extraction(Path(tmp), name, dataset, 22, device, decode="gpu", num_workers=workers)
            cpu = time_extraction(Path(tmp), name, dataset, 22, device, decode="cpu", num_workers=workers)
        measure = f"{gpu['images']} images end to end, decode: gpu"
        rows.append(_row("decode", measure, gpu["ours_s"], f"decode: cpu, {workers} workers", cpu["ours_s"]))
    return rows


def part_train(device: str, tiny: bool) -> list[dict]:
    """One Matryoshka training step vs one encoder GEMM, float32 and (CUDA) bf16 autocast."""
    from bench_train import profile_step

    shape = (32, 4, 64, 4) if tiny else (1024, 64, 4096, 20)
    modes = [False, True] if torch.device(device).type == "cuda" else [False]
    rows = []
    for autocast in modes:
        r = profile_step(*shape, steps=3, device=device, autocast=autocast)
        label = "bf16 autocast" if autocast else "float32"
        d, eps, b, k = shape
        rows.append(_row("train", f"Matryoshka step d={d} ε={eps} B={b} k={k} ({label})", r["step_s"],
                         "one encoder GEMM", r["gemm_s"], "≤ 1.5x"))  # fmt: skip
    return rows


def part_ms(device: str, tiny: bool) -> list[dict]:
    """MS alone and MS + top-16 in one pass vs one [K,N]x[N,D] GEMM."""
    from bench_ms import time_ms_topk

    n, k, d = (300, 64, 16) if tiny else (10_000, 65_536, 1_024)
    r = time_ms_topk(n, k, d, device)
    if not r["same"]:
        raise AssertionError("one pass and the separate functions disagree")
    base = f"one [K,N]x[N,D] GEMM (N={n} K={k} D={d})"
    return [
        _row("ms", "MS alone", r["ms_s"], base, r["gemm_s"], "≤ 1.3x (CPU)"),
        _row("ms", "MS + top-16, one pass", r["both_s"], base, r["gemm_s"], "≤ 1.6x (CPU)"),
    ]


def part_uniqueness(device: str, tiny: bool) -> list[dict]:
    """Overlap counts of K top-16 sets (the paper's uniqueness; CPU code whatever the device)."""
    from bench_ms import random_top_sets

    from vlmsae_utils.exemplars import uniqueness

    k = 256 if tiny else 65_536
    sets = random_top_sets(k, 10_000)
    t0 = time.perf_counter()
    uniqueness(sets)
    seconds = time.perf_counter() - t0
    return [_row("uniqueness", f"K={k} top-16 sets", seconds, "20 s budget", 20.0, "≤ 20 s")]


def part_steer(device: str, tiny: bool) -> list[dict]:
    """One steered LLaVA batch (a random SAE on vision block 22, one latent clamped) vs unsteered."""
    from vlmsae_utils.hooks import DEFAULT_HOOK
    from vlmsae_utils.llava import feature_block, load_llava, vision_tower
    from vlmsae_utils.sae import make_sae
    from vlmsae_utils.steering import generate

    name = "fixture:llava" if tiny else "rehearsal:llava-hf/llava-1.5-7b-hf"
    model, processor = load_llava(name, device=device)
    layer = feature_block(model)
    width = vision_tower(model).output_dim(DEFAULT_HOOK)
    sae = make_sae("batch_top_k", width, width * (4 if tiny else 64), k=20).to(device)
    sae.threshold.fill_(0.0)
    dataset = _images(tiny, 8)
    images = [dataset.load(i) for i in range(len(dataset))]

    def plain() -> None:
        generate(model, processor, images, max_new_tokens=5)

    def steered() -> None:
        generate(model, processor, images, max_new_tokens=5, sae=sae, layer=layer, clamp={0: 100.0})

    plain()  # warm-up
    times = {}
    for label, fn in (("plain", plain), ("steered", steered)):
        t0 = time.perf_counter()
        fn()
        times[label] = time.perf_counter() - t0
    measure = f"{len(images)} images, 5 new tokens, SAE x{sae.dict_size // width} on block {layer}"
    return [_row("steer", measure, times["steered"], "the same batch unsteered", times["plain"])]


PARTS: dict[str, Callable[[str, bool], list[dict]]] = {
    "extract": part_extract,
    "decode": part_decode,
    "train": part_train,
    "ms": part_ms,
    "uniqueness": part_uniqueness,
    "steer": part_steer,
}


def card_name(device: str) -> str:
    """The card's name (or the CPU's, with its thread count)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def run_part(name: str, device: str, tiny: bool, limit_s: float) -> list[dict]:
    """One part (or several, comma-separated) in a fresh process under its time limit; a row saying
    why when it has no figures."""
    cmd = [sys.executable, __file__, "--child", name, "--device", device] + (["--tiny"] if tiny else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return [{"part": name, "status": f"timeout after {limit_s:.0f} s"}]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"part": name, "status": f"failed: {tail[:200]}"}]
    return json.loads(lines[-1])["rows"]


def run_all(device: str, tiny: bool, parts: list[str], out: Path) -> list[dict]:
    """Every part in turn; the CSV at ``out`` and the table on stdout."""
    card = card_name(device)
    rows = []
    # full size: each part alone under its limit; tiny (the suite's rot check): all in one process
    groups = [(name, LIMITS_S[name]) for name in parts] if not tiny else [(",".join(parts), 120.0 * len(parts))]
    for name, limit in groups:
        for row in run_part(name, device, tiny, limit):
            rows.append({field: row.get(field, "") for field in FIELDS} | {"card": card})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{card}: {out}")
    for r in rows:
        figures = f"{r['seconds']} s vs {r['baseline_seconds']} s = {r['ratio']}x" if r["status"] == "ok" else ""
        print(f"  {r['part']:10s} {r['measure']:58s} {figures:34s} {r['goal']:12s} {r['status']}")
    return rows


def main() -> None:
    from vlmsae_utils.scale import gpu_benchmark_csv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="fixture sizes (seconds; the test suite's CPU form)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--out", type=Path, default=None, help="CSV path (default: the one chapter 7 reads)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(
            json.dumps({"rows": [row for part in args.child.split(",") for row in PARTS[part](args.device, args.tiny)]})
        )
        return
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; valid: {', '.join(PARTS)}")
    run_all(args.device, args.tiny, parts, args.out or gpu_benchmark_csv())


if __name__ == "__main__":
    main()
