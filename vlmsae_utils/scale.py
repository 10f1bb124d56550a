"""Disk sizes and compute of the paper's experiments, computed from shapes (for the real-scale page).

Sizes are exact products of counts and widths. Times divide a FLOP count by a sustained
throughput that the reader sets (an assumption, stated next to every time), so the numbers
scale with the reader's hardware rather than being guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .sweep_schema import SweepConfig
from .train_config import TrainConfig

__all__ = [
    "BYTES",
    "CLIP_B_32",
    "CLIP_L_336",
    "DINOV2_B",
    "KNOWN_MODELS",
    "PAPER_CONFIGS",
    "VisionModel",
    "cell_seconds",
    "cluster_plan",
    "forward_flops",
    "gib",
    "gpu_benchmark_csv",
    "gpu_benchmarks",
    "gpu_commands",
    "human",
    "ms_flops",
    "paper_plan",
    "rehearsal_measurements",
    "sae_parameters",
    "store_bytes",
    "training_flops",
]

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
IMAGENET_TRAIN, IMAGENET_VAL, INAT2021_TRAIN = 1_281_167, 50_000, 2_686_843


@dataclass(frozen=True)
class VisionModel:
    """What the estimates need to know about a ViT: parameters, width, projection and tokens per image."""

    name: str
    parameters: float
    width: int
    projection_dim: int
    tokens: int
    blocks: int = 24


CLIP_L_336 = VisionModel("CLIP ViT-L/14-336", 304e6, 1024, 768, 577)
DINOV2_B = VisionModel("DINOv2 ViT-B/14", 86e6, 768, 768, 257, blocks=12)
CLIP_B_32 = VisionModel("CLIP ViT-B/32", 88e6, 768, 512, 50, blocks=12)
PAPER_CONFIGS = ("paper_clip_vitl14", "paper_hierarchy", "paper_steering")  # configs/NAME.yaml, in order
#: The paper configs' encoders by hub id, for the cluster estimates.
KNOWN_MODELS = {
    "openai/clip-vit-large-patch14-336": CLIP_L_336,
    "facebook/dinov2-base": DINOV2_B,
    "openai/clip-vit-base-patch32": CLIP_B_32,
}


def store_bytes(images: int, dim: int, rows_per_image: int = 1, dtype: str = "float16") -> int:
    """Size of an activation store: images × rows per image × width × bytes per value."""
    return images * rows_per_image * dim * BYTES[dtype]


def forward_flops(model: VisionModel, images: int) -> float:
    """Forward FLOPs of a ViT over ``images`` (≈ 2 × parameters × tokens; attention adds a few %)."""
    return 2.0 * model.parameters * model.tokens * images


def sae_parameters(dim: int, expansion: float) -> int:
    """Weights of an SAE: encoder and decoder matrices plus biases."""
    latents = int(dim * expansion)
    return 2 * dim * latents + latents + dim


def training_flops(dim: int, expansion: float, steps: int, batch: int, k: int) -> float:
    """Dense encoder forward + backward (3 × 2·B·d·ω) and sparse decoder (3 × 2·B·k·d) per step."""
    latents = dim * expansion
    return steps * (6.0 * batch * dim * latents + 6.0 * batch * k * dim)


def ms_flops(images: int, neurons: int, embedding_dim: int) -> float:
    """The closed-form MS: one [K, N] × [N, D] product (the reference loop is N/2 times more per neuron)."""
    return 2.0 * images * neurons * embedding_dim


def human(seconds: float) -> str:
    """A duration in the largest sensible unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def gib(n_bytes: float) -> str:
    """Bytes as GiB (or MiB below one GiB)."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def paper_plan(
    sustained_tflops: float = 100.0,
    expansions=(1, 2, 4, 8, 16, 64),
    blocks=(11, 17, 22, 23, None),
    num_blocks: int = 24,
    steps: int = 100_000,
    batch: int = 4096,
    k: int = TrainConfig.k,
) -> pd.DataFrame:
    """Disk and compute of each stage of the paper's MS grid on CLIP-L/14-336 (see configs/paper_clip_vitl14.yaml).

    ``blocks``: hooked blocks (``None`` = post_projection). The sweep runs one extraction per layer
    and each stops after its block, so a layer costs ``(block + 1) / num_blocks`` forward passes.
    """
    rate = sustained_tflops * 1e12
    m = CLIP_L_336
    layers = len(blocks)
    passes = sum(1.0 if b is None else (b + 1) / num_blocks for b in blocks)
    rows = []
    for split, images in (("train", IMAGENET_TRAIN), ("val", IMAGENET_VAL)):
        size = sum(store_bytes(images, m.projection_dim if b is None else m.width) for b in blocks)
        rows.append(
            {
                "stage": f"1 · extract {split} (CLS, {layers} layers, fp16)",
                "disk": gib(size),
                "compute": human(passes * forward_flops(m, images) / rate),
            }
        )
    for scorer in (DINOV2_B, CLIP_B_32):
        rows.append(
            {
                "stage": f"1 · {scorer.name} embeddings of val",
                "disk": gib(store_bytes(IMAGENET_VAL, scorer.projection_dim)),
                "compute": human(forward_flops(scorer, IMAGENET_VAL) / rate),
            }
        )
    for expansion in expansions:
        weights = layers * 2 * sae_parameters(m.width, expansion) * BYTES["float32"]
        flops = layers * 2 * training_flops(m.width, expansion, steps, batch, k)
        rows.append(
            {
                "stage": f"2 · train 2 SAE types × {layers} layers, ε = {expansion}",
                "disk": gib(weights),
                "compute": human(flops / rate),
            }
        )
    neurons = layers * 2 * sum(m.width * e for e in expansions)
    rows.append(
        {
            "stage": "3 · MS of every latent, 2 scorers",
            "disk": "—",
            "compute": human(2 * ms_flops(IMAGENET_VAL, neurons, 768) / rate),
        }
    )
    return pd.DataFrame(rows).set_index("stage")


def rehearsal_measurements() -> pd.DataFrame | None:
    """What ``make rehearsal`` measured on this machine (``results/rehearsal/measurements.csv``), if run."""
    from .paths import results_root

    path = results_root() / "rehearsal" / "measurements.csv"
    return pd.read_csv(path, dtype={"notebook": str}) if path.is_file() else None


def gpu_benchmark_csv() -> Path:
    """Where ``make bench-gpu`` (``benchmarks/bench_gpu.py``) writes its table and chapter 7 reads it."""
    from .paths import results_root

    return results_root() / "benchmarks" / "bench-gpu.csv"


def gpu_benchmarks() -> pd.DataFrame | None:
    """The last ``make bench-gpu`` table on this machine (card, part, seconds, baseline, ratio), if run."""
    path = gpu_benchmark_csv()
    return pd.read_csv(path) if path.is_file() else None


def gpu_commands(device: str = "cuda") -> list[str]:
    """The commands a GPU user runs for the paper's three experiments (sweeps resume when rerun)."""
    run = "python -m vlmsae_utils.run"
    return [
        f"{run} --config configs/{name}.yaml --dry-run   # list the runs"
        if i == 0
        else f"{run} --config configs/{name}.yaml"
        for name in PAPER_CONFIGS
        for i in (0, 1)
    ] + [
        f"python -m vlmsae_utils.rehearsal --device {device}   # every chapter at full width, random weights",
        "make bench-gpu   # every stage's speed on the card against its baseline, about 8 minutes",
    ]


def _split_images(config: SweepConfig, split: str) -> int:
    """Images of a config's split: iNaturalist 2021 train where its folder says so, else ImageNet."""
    if "inat" in config.data[split].data_dir.lower() and split == "train":
        return INAT2021_TRAIN
    return IMAGENET_TRAIN if split == "train" else IMAGENET_VAL


def _model_width(model: str, layer: int | str) -> int | None:
    known = KNOWN_MODELS.get(model)
    return None if known is None else known.projection_dim if layer in ("last", -1) else known.width


def cell_seconds(run, config: SweepConfig, sustained_tflops: float) -> float | None:
    """Compute time of one sweep cell from its FLOPs at ``sustained_tflops`` (``None`` where the shapes
    are unknown, e.g. another encoder, or LLaVA's generation in a steering cell)."""
    rate, p, labels = sustained_tflops * 1e12, run.parameters, run.labels
    if run.kind in ("extract", "embed"):
        model = KNOWN_MODELS.get(p["model"])
        if model is None:
            return None
        passes = 1.0 if p["hook"] == "post_projection" else (p["layer"] % model.blocks + 1) / model.blocks
        return passes * forward_flops(model, _split_images(config, labels["split"])) / rate
    if run.kind == "train":
        width = _model_width(labels.get("model", ""), labels.get("layer"))
        if width is None:
            return None
        return training_flops(width, labels["expansion"], p["steps"], p["batch_size"], p["k"]) / rate
    if run.kind in ("score", "hierarchy"):
        width = _model_width(labels["model"], labels["layer"])
        if width is None:
            return None
        if run.kind == "score" or config.hierarchy is None:  # every SAE of the grid on the validation images
            images, latents = IMAGENET_VAL, width * sum(config.sae.expansions) * len(config.sae.types)
        else:  # the hierarchy's one Matryoshka SAE on the training images
            images, latents = _split_images(config, "train"), width * config.hierarchy.expansion
        return ms_flops(images, round(latents), 768) / rate
    return None


def cluster_plan(config: str | os.PathLike = "paper_clip_vitl14", sustained_tflops: float = 100.0) -> pd.DataFrame:
    """The jobs a sweep file (a path, or the name of one in ``configs/``) sends to a cluster, by kind
    of cell: how many, what each asks for (its ``executor:`` block), the longest one and the
    GPU-hours, from FLOPs at ``sustained_tflops``."""
    from .paths import repo_root
    from .sweep import expand, load_config

    path, repo = Path(config), repo_root()
    if not path.is_file() and repo is not None:
        path = repo / "configs" / f"{config}.yaml"
    sweep = load_config(path, check_data=False)
    settings = sweep.executor
    runs = expand(sweep)
    rows = []
    for kind in dict.fromkeys(run.kind for run in runs):
        cells = [run for run in runs if run.kind == kind]
        estimates = [cell_seconds(run, sweep, sustained_tflops) for run in cells]
        seconds = [t for t in estimates if t is not None]
        resources = settings.resources_for(kind)
        known = len(seconds) == len(estimates)
        rows.append(
            {
                "kind": kind,
                "jobs": len(cells),
                "each job asks for": resources.describe(),
                "longest job": human(max(seconds)) if known else "—",
                "GPU-hours": f"{sum(seconds) * resources.gpus / 3600:.1f}" if known else "—",
            }
        )
    return pd.DataFrame(rows).set_index("kind")
