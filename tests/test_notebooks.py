"""Every chapter runs headless on its defaults (fixture) and shows what it promises."""
from __future__ import annotations

import nbformat
import pytest

from vlmsae_utils import run


def _outputs(executed) -> tuple[str, int]:
    """All text outputs of an executed notebook, and how many figures it shows."""
    notebook = nbformat.read(executed, as_version=4)
    text, figures = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/plain", ""))
            figures += "image/png" in data
    return "\n".join(text), figures


@pytest.mark.slow
def test_01_extract_on_defaults(tmp_path, fixture):
    executed = run.run_notebook("01", {"out_dir": str(tmp_path / "x")}, tmp_path)
    text, figures = _outputs(executed)
    assert figures == 2
    assert "320 image files in 16 classes" in text
    assert (tmp_path / "x" / "activations" / "manifest.json").is_file()
    assert (tmp_path / "x" / "embeddings" / "manifest.json").is_file()


@pytest.mark.slow
def test_01_refuses_a_bad_layer_before_work(tmp_path, fixture):
    with pytest.raises(run.NotebookError, match="layer 9 is out of range"):
        run.run_notebook("01", {"out_dir": str(tmp_path / "x"), "layer": 9}, tmp_path)
    assert not (tmp_path / "x" / "activations" / "plan.json").exists()


@pytest.mark.slow
def test_02_train_on_defaults(tmp_path, fixture):
    executed = run.run_notebook("02", {"out_dir": str(tmp_path / "t"), "steps": 200}, tmp_path)
    text, figures = _outputs(executed)
    assert figures == 1
    assert "R² %" in text and "Matryoshka" in text and "BatchTopK" in text
    import pandas as pd

    results = pd.read_csv(tmp_path / "t" / "results.csv")
    assert len(results) == 4 and (results["R² %"] > 50).all()
    assert (tmp_path / "t" / "matryoshka_batch_top_k_x4_k8" / "sae.safetensors").is_file()


@pytest.mark.slow
def test_03_monosemanticity_on_defaults(tmp_path, fixture):
    executed = run.run_notebook("03", {"out_dir": str(tmp_path / "m")}, tmp_path)
    text, figures = _outputs(executed)
    assert figures >= 6  # curves, distributions, neuron cards, overlaps, browser card
    assert "best MS" in text and "Matryoshka ×4" in text and "J ≥ 0.5" in text
    import pandas as pd

    summary = pd.read_csv(tmp_path / "m" / "ms_summary.csv", index_col=0)
    assert len(summary) == 3 and summary["best MS"].between(-1, 1).all()


@pytest.mark.slow
def test_04_hierarchy_on_defaults(tmp_path, fixture):
    executed = run.run_notebook("04", {"out_dir": str(tmp_path / "h"), "top_k": 8}, tmp_path)
    text, figures = _outputs(executed)
    assert figures == 2 and "LCA depth (mean)" in text
    import pandas as pd

    levels = pd.read_csv(tmp_path / "h" / "levels.csv", index_col=0)
    assert levels.latents.tolist() == [2, 4, 10, 28, 84]
    kept = levels["LCA depth (mean)"].dropna()
    assert kept.between(0, 7).all()


@pytest.mark.slow
def test_05_steer_on_defaults(tmp_path, fixture):
    executed = run.run_notebook("05", {"out_dir": str(tmp_path / "s"), "num_images": 2, "alphas": [100]}, tmp_path)
    text, _ = _outputs(executed)
    assert "not steered" in text and "DiffMean" in text and "true class" in text
    import pandas as pd

    scores = pd.read_csv(tmp_path / "s" / "steering_scores.csv", index_col=0)
    assert scores.pairs.tolist() == [6, 12]
