"""Heatmaps and names at the paper's width, through the rehearsal models (random weights, no download).

CLIP ViT-L/14-336 (577 tokens, width 1024) at block 22 with a random ×64 Matryoshka SAE (65,536
latents): patch heatmaps of 8 latents on 4 images, the 5 strongest latents of one image, and
vocabulary names of 64 latents (16 top images each, one by one) and of all 65,536 latents (16 top
images each drawn from ``--distinct-images`` images, each embedded once) with the CLIP ViT-B/32 judge
over ImageNet's 1,000 class names plus the colour and texture words. Time and peak resident memory of each part,
against one forward pass of the encoder on the same images (the floor of a heatmap).

    python benchmarks/bench_heatmaps.py --full-width        # the paper's widths (minutes on 2 CPU cores)
    python benchmarks/bench_heatmaps.py                     # fixture models (seconds)
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (360, 480, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-width", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distinct-images", type=int, default=1000, help="images the top images are drawn from")
    args = parser.parse_args()
    from vlmsae_utils.encoders import load_encoder
    from vlmsae_utils.heatmaps import patch_heatmaps, strongest_latents
    from vlmsae_utils.llava import load_clip_text_image
    from vlmsae_utils.naming import attribute_vocabulary, name_by_vocabulary, name_top_images
    from vlmsae_utils.sae import make_sae

    if args.full_width:
        model, judge_name, layer, expansion = (
            "rehearsal:openai/clip-vit-large-patch14-336",
            "rehearsal:openai/clip-vit-base-patch32",
            22,
            64,
        )
    else:
        model, judge_name, layer, expansion = "fixture:clip", "fixture:mini_clip", 1, 8
    rows = {}
    start = time.perf_counter()
    encoder = load_encoder(model, args.device)
    width = encoder.output_dim("post_mlp_residual")
    sae = make_sae("matryoshka_batch_top_k", width, width * expansion, 20, None).eval()
    sae.threshold.fill_(0.0)
    rows["load encoder + SAE"] = time.perf_counter() - start
    images = _images(4)
    start = time.perf_counter()
    with torch.no_grad():
        encoder.capture(encoder.preprocess(images), "post_mlp_residual", layer)
    rows["one forward to the block (floor)"] = time.perf_counter() - start
    start = time.perf_counter()
    maps = patch_heatmaps(encoder, sae, images, list(range(0, sae.dict_size, sae.dict_size // 8)), layer=layer)
    rows["heatmaps, 8 latents × 4 images"] = time.perf_counter() - start
    params = {"encoder": model, "hook": "post_mlp_residual", "layer": layer}
    start = time.perf_counter()
    strongest_latents(params, sae, images[0], 5, device=args.device)
    rows["5 strongest latents of 1 image"] = time.perf_counter() - start
    judge = load_clip_text_image(judge_name, args.device)
    classes = json.loads((Path(__file__).parents[1] / "vlmsae_utils" / "imagenet_keras_names.json").read_text())
    words = [name.replace("_", " ") for name in classes["names"].values()] if args.full_width else []
    words += attribute_vocabulary()
    tops = [_images(16, seed) for seed in range(1, 9)] * 8  # 64 latents, 16 top images each
    start = time.perf_counter()
    names = name_by_vocabulary(judge, tops, words, _images(64, 99))
    rows[f"names of {len(names)} latents, one by one"] = time.perf_counter() - start
    pool = _images(args.distinct_images, 7)  # every latent's 16 top images drawn from these
    picks = np.random.default_rng(0).integers(0, len(pool), (sae.dict_size, 16))
    start = time.perf_counter()
    everyone = name_top_images(judge, pool.__getitem__, dict(enumerate(picks.tolist())), words, _images(64, 99))
    rows[f"names of all {len(everyone):,} latents ({len(pool)} images)"] = time.perf_counter() - start
    print(
        f"{model} block {layer}, SAE {sae.dict_size:,} latents, grid {tuple(maps.codes.shape[-2:])}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    floor = rows["one forward to the block (floor)"]
    for name, seconds in rows.items():
        print(f"  {name:45s} {seconds:7.2f} s  ({seconds / floor:5.2f}x the forward)")
    print(f"  peak resident memory of the process: {_peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
