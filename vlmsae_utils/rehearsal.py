"""Rehearsal at full width: the paper's models with their exact architectures and random weights.

``rehearsal:HUB_ID`` (e.g. ``rehearsal:openai/clip-vit-large-patch14-336``) names a model
built from the configuration below — the same widths, depths, heads, patch sizes, image sizes
and preprocessing as the hub checkpoint, but randomly initialised and written to the data
home once, with no download. Every loader reads it through ``from_pretrained`` like the real
model, so shapes, memory and dtypes at the paper's scale (d = 1024, 577 tokens, 65,536
latents, LLaVA's 576 image tokens) are exercised on any machine. Random weights mean the
*numbers* (MS, R², answers) are meaningless; only that everything runs, and how fast.

The architectures live in :mod:`.rehearsal_models` (LLaVA-1.5-7B with its language model cut to
:data:`~vlmsae_utils.rehearsal_models.LLAVA_REHEARSAL_LAYERS` decoder layers).

``python -m vlmsae_utils.rehearsal`` (``make rehearsal``) runs every chapter on these models
over generated images at each model's resolution and writes what it measured (images/s,
peak memory, bytes per image) to ``results/rehearsal/measurements.csv``, which chapter 7 shows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import data_home, safe_stem
from .rehearsal_models import LLAVA_REHEARSAL_LAYERS, REHEARSAL_MODELS, RehearsalSpec, write_rehearsal_model

if TYPE_CHECKING:
    import pandas as pd

REHEARSAL_VERSION = "v1"

__all__ = [
    "LLAVA_REHEARSAL_LAYERS",
    "REHEARSAL_MODELS",
    "RehearsalSpec",
    "main",
    "rehearsal_images",
    "rehearsal_model",
    "rehearsal_stages",
    "run_rehearsal",
]


def rehearsal_dir() -> Path:
    """Where rehearsal models and images are cached (inside the data home)."""
    return data_home() / "rehearsal" / REHEARSAL_VERSION


def rehearsal_model(hub_id: str, *, seed: int = 0) -> Path:
    """Folder of the rehearsal model of ``hub_id`` (written on first use, atomically)."""
    if hub_id not in REHEARSAL_MODELS:
        raise ValueError(f"no rehearsal model for {hub_id!r}; available: {', '.join(REHEARSAL_MODELS)}")
    folder = rehearsal_dir() / "models" / safe_stem(hub_id)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        import torch

        from .hf import quiet_transformers

        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(seed)
            write_rehearsal_model(hub_id, staging)
        (staging / "rehearsal.json").write_text(
            json.dumps({"hub_id": hub_id, "version": REHEARSAL_VERSION, "weights": "random", "seed": seed})
        )
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def rehearsal_images(size: int = 384, train_per_class: int = 2, val_per_class: int = 1, seed: int = 0) -> Path:
    """Generated JPEGs of the fixture's 16 classes (iNaturalist-style folder names) at ``size`` px."""
    from .fixtures import write_images

    root = rehearsal_dir() / f"images_{size}px_{train_per_class}x{val_per_class}"
    if (root / "done").is_file():
        return root
    write_images(root, seed, size=size, train_per_class=train_per_class, val_per_class=val_per_class, suffix=".jpg")
    (root / "done").write_text("")
    return root


# ----------------------------------------------------------------------------- the full-width run

HIERARCHY_FRACTIONS = [0.002, 0.009, 0.035, 0.189, 0.765]  # the paper's 5 Matryoshka levels (§ hierarchy)


def rehearsal_stages(images: Path, device: str) -> list[dict]:
    """Every chapter at the paper's widths, as notebook runs (stage name, notebook, parameters).

    CLIP-L/14-336 block 22 (the paper's steering layer) with every token of the training images
    (577 rows per image) trains a ×64 Matryoshka SAE (65,536 latents); its CLS rows of the
    validation images, with DINOv2-B embeddings, are scored; the other encoders are extracted
    with the remaining token modes; LLaVA-1.5's tower is steered at block 22.
    """
    common = {"data_dir": str(images), "device": device, "batch_size": 8}
    stages = _extraction_stages(common, images) + _downstream_stages(images, device)
    return [{"stage": name, "notebook": notebook, "parameters": params} for name, notebook, params in stages]


_CLIP_L, _DINO = "rehearsal:openai/clip-vit-large-patch14-336", "rehearsal:facebook/dinov2-base"
#: Validation images per class (64 in all): enough for latents to fire on 16 of them, so chapter 3
#: scores, ranks and names thousands of latents.
VAL_PER_CLASS = 4


def _outputs(images: Path) -> str:
    """The rehearsal's outputs folder for one image set: a new image set never meets the stores,
    SAEs and checkpoints of another (they would be refused as written from other data)."""
    return f"rehearsal/{images.name}"


def _clip_l_stores(images: Path) -> tuple[str, str]:
    """The two CLIP-L stores the later stages read: every token of the train images, CLS of the val images."""
    return f"{_outputs(images)}/extract/clip_l_all_train", f"{_outputs(images)}/extract/clip_l_cls_val"


def _extraction_stages(common: dict, images: Path) -> list[tuple[str, str, dict]]:
    """Chapter 1 at full width: CLIP-L every token and CLS + DINOv2-B, SigLIP, AIMv2 and Web-SSL."""
    clip_l, dino = _CLIP_L, _DINO
    tokens_all = {
        "model": clip_l,
        "split": "train",
        "layer": 22,
        "tokens": "all",
        "scorer": "",
        "out_dir": _clip_l_stores(images)[0],
    }
    cls_val = {
        "model": clip_l,
        "split": "val",
        "layer": 22,
        "tokens": "cls",
        "scorer": dino,
        "out_dir": _clip_l_stores(images)[1],
    }
    others = [
        ("siglip_mean", "rehearsal:google/siglip-so400m-patch14-384", {"layer": 25, "tokens": "mean"}),
        ("aimv2_random2", "rehearsal:apple/aimv2-large-patch14-224", {"layer": 22, "tokens": "random_k"}),
        (
            "webssl_projection",
            "rehearsal:facebook/webssl-mae300m-full2b-224",
            {"hook": "post_projection", "layer": -1, "tokens": "cls"},
        ),
    ]
    stages = [
        ("extract CLIP-L all tokens", "01", common | tokens_all),
        ("extract CLIP-L CLS + DINOv2-B", "01", common | cls_val),
    ]
    stages += [
        (
            f"extract {name}",
            "01",
            common
            | {"model": model, "split": "val", "scorer": "", "out_dir": f"{_outputs(images)}/extract/{name}"}
            | extra,
        )
        for name, model, extra in others
    ]
    return stages


def _downstream_stages(images: Path, device: str) -> list[tuple[str, str, dict]]:
    """Chapters 2–5 at full width on the CLIP-L stores: ×64 and hierarchy SAEs, MS, the hierarchy, steering."""
    from .train_config import TrainConfig

    all_tokens, cls = _clip_l_stores(images)
    tokens_all, cls_val, out = {"out_dir": all_tokens}, {"out_dir": cls}, _outputs(images)
    train = {
        "train_store": f"{tokens_all['out_dir']}/activations",
        "val_store": f"{cls_val['out_dir']}/activations",
        "sae_types": ["matryoshka_batch_top_k"],
        "k": TrainConfig().k,  # the paper's K (notebook 02's default is the fixture's)
        "steps": 10,
        "batch_size": 1024,
        "device": device,
    }
    stages = [
        ("train ×64 Matryoshka", "02", train | {"expansions": [64], "out_dir": f"{out}/sae"}),
        (
            "train ×2 hierarchy",
            "02",
            train | {"expansions": [2], "group_fractions": HIERARCHY_FRACTIONS, "out_dir": f"{out}/sae_hierarchy"},
        ),
    ]
    x64 = f"{out}/sae/matryoshka_batch_top_k_x64_k20"
    stages += [
        (
            "score 65,536 latents",
            "03",
            {
                "activations_store": f"{cls_val['out_dir']}/activations",
                "scorer_store": f"{cls_val['out_dir']}/embeddings",
                "uniqueness_store": f"{cls_val['out_dir']}/activations",  # timing only: no CLS train store here
                "sae_paths": [x64],
                "named_latents": None,  # every latent that fires on 16 images, with the CLIP-B/32 judge
                "device": device,
                "out_dir": f"{out}/ms",
            },
        ),
        (
            "hierarchy",
            "04",
            {
                "train_store": f"{cls_val['out_dir']}/activations",
                "scorer_store": f"{cls_val['out_dir']}/embeddings",
                "sae_path": f"{out}/sae_hierarchy/matryoshka_batch_top_k_x2_k20",
                "device": device,
                "out_dir": f"{out}/hierarchy",
            },
        ),
        (
            "steer LLaVA-1.5 block 22",
            "05",
            {
                "llava": "rehearsal:llava-hf/llava-1.5-7b-hf",
                "layer": 22,
                "sae_path": x64,
                "train_store": f"{tokens_all['out_dir']}/activations",
                "images_dir": str(images / "train"),  # the first train image of each class, as the authors
                "num_images": 1,
                "alphas": [0, 100],
                "alpha_scale": "absolute",
                "score_alpha": 100,
                "max_new_tokens": 2,
                "image_latents": 2,
                "clip_text_model": "rehearsal:openai/clip-vit-base-patch32",
                "device": device,
                "out_dir": f"{out}/steer",
            },
        ),
    ]
    return stages


_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"returncode": code, "seconds": seconds, "peak_mib": peak_kib / 1024}))
"""


def measure(command: list[str]) -> dict:
    """Run ``command`` in a fresh process and return its wall time and the peak resident memory of
    its process tree (the largest process, e.g. the notebook kernel), in MiB."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"measuring {command} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_command(stage: dict, notebooks_out: Path) -> list[str]:
    """``python -m vlmsae_utils.run NN -p NAME VALUE …`` for one stage (values as YAML)."""
    import sys

    import yaml

    command = [sys.executable, "-m", "vlmsae_utils.run", stage["notebook"]]
    for name, value in stage["parameters"].items():
        command += ["-p", name, yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
    return [*command, "--out", str(notebooks_out / safe_stem(stage["stage"]))]


def _images_of(stage: dict) -> tuple[int, int]:
    """Images an extraction stage read and the bytes of the store it wrote."""
    from .paths import resolve_out_dir
    from .store import ActivationStore

    store = ActivationStore.open(resolve_out_dir(stage["parameters"]["out_dir"]) / "activations")
    return len(store.image_ids), store.nbytes


def run_rehearsal(device: str = "auto", only: list[str] | None = None) -> pd.DataFrame:
    """Run every rehearsal stage in order, measured; write and return the measurements table."""
    import pandas as pd

    from .paths import outputs_root, results_root

    images = rehearsal_images(384, val_per_class=VAL_PER_CLASS)
    out = results_root() / "rehearsal"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in rehearsal_stages(images, device):
        if only and not any(word in stage["stage"] for word in only):
            continue
        command = stage_command(stage, outputs_root() / "rehearsal" / "notebooks")
        print("$ python", " ".join(command[1:]), flush=True)
        result = measure(command)
        row = {
            "stage": stage["stage"],
            "notebook": stage["notebook"],
            "seconds": round(result["seconds"], 1),
            "peak MiB": round(result["peak_mib"]),
            "ok": result["returncode"] == 0,
        }
        if row["ok"] and stage["notebook"] == "01":
            count, nbytes = _images_of(stage)
            row |= {
                "images": count,
                "images/s": round(count / result["seconds"], 2),
                "KiB/image": round(nbytes / count / 1024, 1),
            }
        rows.append(row)
        print(row, flush=True)
        _merge_measurements(out / "measurements.csv", row)
    return pd.DataFrame(rows)


def _merge_measurements(path: Path, row: dict) -> None:
    """Replace the stage's row in the measurements table (other stages' rows are kept, in stage order)."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"notebook": str}) if path.is_file() else pd.DataFrame(columns=list(row))
    table = pd.concat([table[table["stage"] != row["stage"]], pd.DataFrame([row])], ignore_index=True)
    order = {stage["stage"]: i for i, stage in enumerate(rehearsal_stages(Path("."), "auto"))}
    table.sort_values("stage", key=lambda s: s.map(order), kind="stable").to_csv(path, index=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmsae_utils.rehearsal [--device D] [--only WORD…]``: every chapter at full width."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--only", nargs="*", help="run only stages whose name contains one of these words")
    args = parser.parse_args(argv)
    table = run_rehearsal(args.device, args.only)
    print(table.to_string(index=False))
    return 0 if table["ok"].all() else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
