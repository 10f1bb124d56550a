"""Every chapter runs headless on its defaults (fixture) and shows what it promises.

The chapters are executed once per test session, exactly as `make demo` runs them (no
parameter overrides); the book test builds the whole book from the same executed notebooks.
"""

from __future__ import annotations

import nbformat
import pandas as pd
import pytest

from vlmsae_utils import run
from vlmsae_utils.paths import outputs_root


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


def _chapter(chapters, stem: str):
    return chapters / f"{stem}.ipynb"


@pytest.mark.slow
def test_01_extract_on_defaults(executed_chapters):
    text, figures = _outputs(_chapter(executed_chapters, "01_extract"))
    assert figures == 2
    assert "320 image files in 16 classes" in text
    for store in ("activations", "embeddings"):
        assert (outputs_root() / "extract/fixture_mini_clip" / store / "manifest.json").is_file()


@pytest.mark.slow
def test_01_refuses_a_bad_layer_before_work(tmp_path, fixture):
    with pytest.raises(run.NotebookError, match="layer 9 is out of range"):
        run.run_notebook("01", {"out_dir": str(tmp_path / "x"), "layer": 9}, tmp_path)
    assert not (tmp_path / "x" / "activations" / "plan.json").exists()


@pytest.mark.slow
def test_02_train_on_defaults(executed_chapters):
    text, figures = _outputs(_chapter(executed_chapters, "02_train"))
    assert figures == 1
    assert "R² %" in text and "Matryoshka" in text and "BatchTopK" in text
    results = pd.read_csv(outputs_root() / "train/fixture_mini_clip" / "results.csv")
    assert len(results) == 4 and (results["R² %"] > 50).all()
    assert (outputs_root() / "train/fixture_mini_clip" / "matryoshka_batch_top_k_x4_k8" / "sae.safetensors").is_file()


@pytest.mark.slow
def test_03_monosemanticity_on_defaults(executed_chapters):
    text, figures = _outputs(_chapter(executed_chapters, "03_monosemanticity"))
    assert figures >= 6  # curves, distributions, neuron cards, overlaps, browser card
    assert "MS max" in text and "Matryoshka ×4" in text and "J > 0.5" in text
    summary = pd.read_csv(outputs_root() / "ms/fixture_mini_clip" / "ms_summary.csv", index_col=0)
    assert len(summary) == 3 and summary["MS max"].between(-1, 1).all()


@pytest.mark.slow
def test_04_hierarchy_on_defaults(executed_chapters):
    text, figures = _outputs(_chapter(executed_chapters, "04_hierarchy"))
    assert figures == 2 and "LCA depth (mean)" in text
    levels = pd.read_csv(outputs_root() / "hierarchy/fixture_mini_clip" / "levels.csv", index_col=0)
    assert levels.latents.tolist() == [2, 4, 10, 28, 84]
    assert levels["LCA depth (mean)"].dropna().between(0, 7).all()
    control = pd.read_csv(outputs_root() / "hierarchy/fixture_mini_clip" / "nested_control_levels.csv", index_col=0)
    depth = control["LCA depth (mean)"]  # concepts that nest by construction: Table A8's trend
    assert "MS mean" not in control and depth.iloc[-1] > depth.iloc[0] + 1.5, depth.tolist()


@pytest.mark.slow
def test_05_steer_on_defaults(executed_chapters):
    text, _ = _outputs(_chapter(executed_chapters, "05_steer"))
    assert "not steered" in text and "DiffMean" in text and "true class" in text
    scores = pd.read_csv(outputs_root() / "steer/fixture_mini_llava" / "steering_scores.csv", index_col=0)
    assert scores.pairs.tolist() == [6, 24]


@pytest.mark.slow
def test_05_steer_with_overrides(tmp_path, fixture):
    run.run_notebook(
        "05", {"out_dir": str(tmp_path / "s"), "num_images": 2, "alphas": [100], "latents": [0, 1]}, tmp_path
    )
    scores = pd.read_csv(tmp_path / "s" / "steering_scores.csv", index_col=0)
    assert scores.pairs.tolist() == [2, 4]


@pytest.mark.slow
def test_06_results_on_defaults(executed_chapters, fixture_results):
    text, figures = _outputs(_chapter(executed_chapters, "06_results"))
    assert figures == 4  # best MS, mean MS, R²/L0, raw vs SAE
    assert "sweep fixture: 8 SAE runs" in text and "hierarchy:" in text and "steering:" in text


@pytest.mark.slow
def test_07_real_scale_on_defaults(executed_chapters):
    text, _ = _outputs(_chapter(executed_chapters, "07_real_scale"))
    assert "extract train (CLS, 5 layers, fp16)" in text and "GiB" in text


@pytest.mark.slow
def test_chapters_1_and_3_run_on_a_model_named_by_a_nested_folder(fixture, tmp_path):
    """A model named by a folder (with '/') must never become part of an output path; hub ids are
    checked at unit level (test_scoring) and through every chapter by `make rehearsal`."""
    import shutil

    from vlmsae_utils.defaults import open_store
    from vlmsae_utils.sae import save_sae
    from vlmsae_utils.train import train_sae

    model = tmp_path / "models" / "openai" / "clip copy"
    shutil.copytree(fixture.model("clip"), model)
    model = str(model)
    stores = tmp_path / "stores"
    run.run_notebook(
        "01",
        {
            "model": model,
            "split": "val",
            "scorer": "fixture:scorer",
            "out_dir": str(stores),
            "batch_size": 32,
            "device": "cpu",
        },
        tmp_path / "nb01",
    )
    activations = open_store(stores / "activations")
    assert activations.params["encoder"] == model  # the real name is kept in the manifest
    sae, _ = train_sae(activations, "batch_top_k", 2, k=4, steps=20, batch_size=64, progress=False, device="cpu")
    save_sae(sae, tmp_path / "sae")
    ms = tmp_path / "ms"
    run.run_notebook(
        "03",
        {
            "activations_store": str(stores / "activations"),
            "scorer_store": str(stores / "embeddings"),
            "sae_paths": [str(tmp_path / "sae")],
            "out_dir": str(ms),
            "device": "cpu",
        },
        tmp_path / "nb03",
    )
    written = sorted(p.name for p in ms.iterdir())
    assert "ms_summary.csv" in written and len([n for n in written if n.startswith("ms_raw")]) == 1
    raw = pd.read_csv(ms / next(n for n in written if n.startswith("ms_raw")))
    assert set(raw["neurons"]) == {f"raw {model}"}


MAX_CELL_LINES = 12  # CONTRIBUTING: notebooks orchestrate and show; logic lives in the package


def _code_cells(source) -> list[tuple[list[str], str]]:
    """(tags, code) of every code cell of a MyST notebook, without blank lines."""
    import jupytext

    notebook = jupytext.read(source)
    return [
        (cell.metadata.get("tags", []), "\n".join(line for line in cell.source.splitlines() if line.strip()))
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]


@pytest.mark.parametrize("source", run.all_notebooks(), ids=lambda p: p.stem)
def test_notebook_cells_are_short_and_define_nothing(source):
    for tags, code in _code_cells(source):
        if "parameters" in tags:
            continue  # one assignment per line: data, not logic
        lines = code.splitlines()
        assert len(lines) <= MAX_CELL_LINES, f"{source.name}: a cell of {len(lines)} lines:\n{code}"
        assert not any(line.lstrip().startswith(("def ", "class ", "lambda")) for line in lines), (
            f"{source.name}: defines a function:\n{code}"
        )


@pytest.mark.parametrize("source", run.all_notebooks(), ids=lambda p: p.stem)
def test_every_labelled_figure_is_cited_and_every_citation_has_a_figure(source):
    import re

    import jupytext

    notebook = jupytext.read(source)
    labels = [
        cell.metadata["mystnb"]["figure"]["name"]
        for cell in notebook.cells
        if cell.cell_type == "code" and "figure" in cell.metadata.get("mystnb", {})
    ]
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    cited = set(re.findall(r"\{numref\}`(fig-[\w-]+)`", text))
    assert len(labels) == len(set(labels)), f"{source.name}: a figure label is used twice: {labels}"
    for cell in notebook.cells:  # a label applies to every output of its cell: the figure must be the only one
        if "figure" in cell.metadata.get("mystnb", {}):
            lines = [line for line in cell.source.splitlines() if line.strip()]
            assert lines[-1].startswith("fig = ") and "display(" not in cell.source and "print(" not in cell.source, (
                f"{source.name}: a labelled figure cell must output only its figure:\n{cell.source}"
            )
    assert set(labels) <= cited, f"{source.name}: figures never cited in the text: {set(labels) - cited}"
    assert cited <= set(labels), f"{source.name}: citations of figures that do not exist: {cited - set(labels)}"
