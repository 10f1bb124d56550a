"""Real-scale estimates are products of shapes: check them by hand."""

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
