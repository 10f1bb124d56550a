"""Real-scale estimates are products of shapes: check them by hand."""

import pytest

from vlmsae_utils import scale


def test_sizes_by_hand():
    assert scale.store_bytes(50_000, 1024, 1, "float16") == 50_000 * 1024 * 2
    assert scale.store_bytes(10, 4, 2, "float32") == 320
    assert scale.sae_parameters(1024, 64) == 2 * 1024 * 65536 + 65536 + 1024
    assert scale.ms_flops(2, 3, 4) == 48
    assert scale.training_flops(2, 2, steps=1, batch=1, k=1) == 6 * 2 * 4 + 6 * 2
    assert scale.human(90) == "1.5 min" and scale.human(7200) == "2.0 h" and scale.gib(2**31) == "2.0 GiB"


def test_plan_counts_early_stopping_passes():
    plan = scale.paper_plan(sustained_tflops=1.0, blocks=(None,), expansions=(1,))
    seconds = scale.forward_flops(scale.CLIP_L_336, scale.IMAGENET_VAL) / 1e12
    assert plan.loc["1 · extract val (CLS, 1 layers, fp16)", "compute"] == scale.human(seconds)


def test_cluster_plan_counts_the_grids_jobs_and_sums_their_flops():
    plan = scale.cluster_plan("paper_clip_vitl14", sustained_tflops=100.0)
    assert plan.jobs.to_dict() == {"embed": 2, "extract": 10, "train": 60, "score": 10}
    assert plan.loc["train", "each job asks for"] == "1 GPU, 8 CPUs, 64 GB, 12:00 h"  # the config's executor block
    widths = [1024] * 4 + [768]  # blocks 11, 17, 22, 23 of CLIP-L, then its 768-d projection
    flops = sum(
        2 * 100_000 * 6.0 * 4096 * (w * w * e + 20 * w) for w in widths for e in (1, 2, 4, 8, 16, 64)
    )  # 2 SAE types; dense encoder and sparse decoder, forward and backward
    assert float(plan.loc["train", "GPU-hours"]) == pytest.approx(flops / 100e12 / 3600, abs=0.05)
    steering = scale.cluster_plan("paper_steering")
    assert steering.loc["steer", "GPU-hours"] == "—"  # generation is not estimated


def test_the_hierarchy_cell_scores_its_one_matryoshka_sae():
    """The hierarchy run scores one SAE (ε = 2 on CLIP-L's 768-d projection) on iNaturalist train,
    however many SAE types the grid has."""
    import dataclasses
    from pathlib import Path

    from vlmsae_utils import sweep

    config = sweep.load_config(
        Path(__file__).resolve().parents[1] / "configs" / "paper_hierarchy.yaml", check_data=False
    )
    two_types = dataclasses.replace(config, sae=dataclasses.replace(config.sae, types=("batch_top_k", "top_k")))
    (run,) = [r for r in sweep.expand(config) if r.kind == "hierarchy"]
    expected = 2.0 * scale.INAT2021_TRAIN * (768 * 2) * 768 / 100e12
    assert scale.cell_seconds(run, two_types, 100.0) == pytest.approx(expected)
