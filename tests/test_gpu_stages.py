"""CUDA against CPU for extraction, MS, top-k and steering (``make test-gpu``; skipped without CUDA).

Tolerances: float32 on both devices agrees to 1e-4 (different GEMM kernels and reduction
orders); float16 models (``model_dtype="float16"``, an option; auto is float32) agree with float32 to
about 1e-2 relative on block outputs; MS accumulates in float64 on both and agrees to 1e-6.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vlmsae_utils import extract, metrics, steering
from vlmsae_utils.exemplars import top_k_images

log = logging.getLogger(__name__)
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    log.warning("CUDA is not available: the GPU tests are skipped")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (make test-gpu on a GPU machine)"),
]


def _extract(tmp_path, name: str, device: str, model_dtype: str, num_workers: int = 0):
    dataset = extract.open_dataset("fixture", "val")
    return extract.extract_activations(
        "fixture:clip",
        dataset,
        tmp_path / name,
        layer=-2,
        tokens="random_k",
        random_k=2,
        batch_size=16,
        device=device,
        model_dtype=model_dtype,
        num_workers=num_workers,
        progress=False,
    )


def test_extraction_on_cuda_matches_cpu(fixture, tmp_path):
    cpu = _extract(tmp_path, "cpu", "cpu", "float32").to_tensor()
    cuda32 = _extract(tmp_path, "cuda32", "cuda", "float32", num_workers=2).to_tensor()
    cuda16 = _extract(tmp_path, "cuda16", "cuda", "float16", num_workers=2).to_tensor()
    torch.testing.assert_close(cuda32, cpu, atol=1e-4, rtol=1e-4)
    relative = (cuda16 - cpu).norm() / cpu.norm()
    assert relative < 1e-2, f"float16 extraction differs by {relative:.2e} (relative norm)"


def test_gpu_decoding_matches_cpu_workers_on_jpegs(tmp_path):
    """``decode: gpu`` (nvJPEG + tensor preprocessing) against PIL workers on generated JPEGs: the
    same images kept, rows within resampling and IDCT noise (5 % of the smallest row norm)."""
    from vlmsae_utils import data
    from vlmsae_utils.rehearsal import rehearsal_images

    dataset = data.ImageFolderDataset(rehearsal_images(64), "train")
    stores = {
        decode: extract.extract_activations(
            "fixture:clip", dataset, tmp_path / decode, batch_size=8, device="cuda", decode=decode, progress=False
        )
        for decode in ("cpu", "gpu")
    }
    assert stores["gpu"].image_ids == stores["cpu"].image_ids and not stores["gpu"].skipped
    ours, theirs = stores["gpu"].to_tensor(), stores["cpu"].to_tensor()
    assert (ours - theirs).norm(dim=1).max() < 0.05 * theirs.norm(dim=1).min()


def test_ms_and_top_k_on_cuda_match_cpu():
    generator = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(3000, 512, generator=generator))
    emb = torch.randn(3000, 64, generator=generator)
    cpu = metrics.monosemanticity_score(acts, emb, device="cpu")
    cuda = metrics.monosemanticity_score(acts, emb, device="cuda")
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-6, rtol=1e-6)
    codes = metrics.SparseCodes.from_dense(acts * (acts > 1.5))
    torch.testing.assert_close(
        metrics.monosemanticity_score(codes, emb, device="cuda").cpu(),
        metrics.monosemanticity_score(codes, emb, device="cpu"),
        atol=1e-6,
        rtol=1e-6,
    )
    top_cpu, top_cuda = top_k_images(acts, 16, device="cpu"), top_k_images(acts, 16, device="cuda")
    assert top_cuda.values.device.type == "cpu"
    torch.testing.assert_close(top_cuda.values, top_cpu.values, equal_nan=True)
    assert torch.equal(top_cuda.indices, top_cpu.indices) and torch.equal(
        top_cuda.count_positive, top_cpu.count_positive
    )


def test_steered_generation_on_cuda_matches_cpu(fixture):
    from vlmsae_utils.defaults import default_sae, default_store

    store = default_store("train", tokens="random_k", random_k=16, layer=2)
    sae = default_sae("matryoshka_batch_top_k", store=store, name="tokens16_L2")
    images = [extract.open_dataset("fixture", "val").load(0)]
    answers = {}
    for device in ("cpu", "cuda"):
        model, processor = steering.load_llava("fixture:mini_llava", device=device, model_dtype="float32")
        sae.to(device)
        answers[device] = steering.generate(model, processor, images, sae=sae, layer=2, clamp={0: 3.0})
    assert answers["cuda"] == answers["cpu"]
