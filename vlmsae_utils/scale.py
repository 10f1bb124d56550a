"""Disk sizes and compute of the paper's experiments, computed from shapes (for the real-scale page).

Sizes are exact products of counts and widths. Times divide a FLOP count by a sustained
throughput that the reader sets (an assumption, stated next to every time), so the numbers
scale with the reader's hardware rather than being guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = [
    "BYTES",
    "CLIP_B_32",
    "CLIP_L_336",
    "DINOV2_B",
    "VisionModel",
    "forward_flops",
    "gib",
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


CLIP_L_336 = VisionModel("CLIP ViT-L/14-336", 304e6, 1024, 768, 577)
DINOV2_B = VisionModel("DINOv2 ViT-B/14", 86e6, 768, 768, 257)
CLIP_B_32 = VisionModel("CLIP ViT-B/32", 88e6, 768, 512, 50)


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
    k: int = 20,
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


def gpu_commands(device: str = "cuda") -> list[str]:
    """The commands a GPU user runs for the paper's three experiments (sweeps resume when rerun)."""
    run = "python -m vlmsae_utils.run"
    return [
        f"{run} --config configs/{name}.yaml --dry-run   # list the runs"
        if i == 0
        else f"{run} --config configs/{name}.yaml"
        for name in ("paper_clip_vitl14", "paper_hierarchy", "paper_steering")
        for i in (0, 1)
    ] + [f"python -m vlmsae_utils.rehearsal --device {device}   # every chapter at full width, random weights"]
