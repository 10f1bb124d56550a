"""The stage contract (:mod:`vlmsae_utils.stages`): a new metric stage registered from this test
module is planned by the sweep, run, checked for completeness, gathered into its own results table
and given executor resources — with no edit to the package."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import FakeRunner

from vlmsae_utils import stages, sweep
from vlmsae_utils.executor_config import parse_executor
from vlmsae_utils.sweep_plan import Run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _plan_norms(config: sweep.SweepConfig, runs: list[Run]) -> list[Run]:
    """One norms run beside every score run, on the same stores (notebook 03's parameters)."""
    return [
        Run("norms", "03", f"norms/{r.out_dir}", dict(r.parameters), [r.id], labels=dict(r.labels))
        for r in runs
        if r.kind == "score"
    ]


def _gather_norms(ctx: stages.GatherContext) -> dict[str, pd.DataFrame]:
    size = (ctx.folder / "norms.csv").stat().st_size
    return {"norms": pd.DataFrame({"run": [ctx.run.id], "bytes": [size], "scorer": [ctx.run.labels["scorer"]]})}


@pytest.fixture
def norms_stage():
    added = stages.register_stage(
        stages.Stage("norms", "03", ("norms.csv",), tables=("norms",), gather=_gather_norms, plan=_plan_norms)
    )
    yield added
    stages.unregister_stage("norms")


def test_a_metric_stage_registered_from_a_test_module_runs_through_a_sweep(norms_stage, tmp_path, monkeypatch):
    raw = yaml.safe_load((CONFIGS / "fixture.yaml").read_text()) | {"hierarchy": None, "steering": None}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    config = sweep.load_config(tmp_path / "sweep.yaml")
    runs = sweep.expand(config)
    scores, norms = [r for r in runs if r.kind == "score"], [r for r in runs if r.kind == "norms"]
    assert len(norms) == len(scores) >= 1 and [n.depends for n in norms] == [[s.id] for s in scores]
    assert all(n.parameters["device"] == "auto" for n in norms)  # the sweep's execution settings reach it
    root = tmp_path / "root"
    status = sweep.execute(runs, root, runner=FakeRunner(), progress=False)
    assert set(status.status) == {"ran"}
    # the fake runner's files for the built-in score stage are not tables: gather only the new one
    monkeypatch.setitem(stages.STAGES, "score", dataclasses.replace(stages.stage("score"), gather=None, tables=()))
    tables = sweep.gather(config, runs, root)
    assert list(tables) == ["norms"] and list(tables["norms"].run) == [n.id for n in norms]
    (root / norms[0].out_dir / "norms.csv").unlink()  # its declared output gone: no longer finished
    assert not sweep.is_complete(norms[0], root) and sweep.is_complete(scores[0], root)
    settings = parse_executor({"type": "local", "resources": {"norms": {"cpus": 3}}})
    assert settings.resources_for("norms").cpus == 3


def test_stage_declarations_are_checked_and_the_builtins_are_the_papers():
    assert stages.cell_kinds()[:6] == ("extract", "embed", "train", "score", "hierarchy", "steer")
    assert [s.kind for s in stages.stages_of_notebook("01")] == ["extract", "embed"]
    assert stages.stage("extract").reads_images and not stages.stage("train").reads_images
    with pytest.raises(ValueError, match="unknown kind of cell 'nrms'; valid: extract, embed"):
        stages.stage("nrms")
    with pytest.raises(ValueError, match="has no gather function"):
        stages.register_stage(stages.Stage("bad", "03", ("x.csv",), tables=("bad",)))
    with pytest.raises(ValueError, match="unknown kind of cell 'nrms'"):
        parse_executor({"type": "local", "resources": {"nrms": {"cpus": 3}}})


def test_a_registered_stage_ranks_its_runs_in_a_sweeps_book(tmp_path):
    """The book builder reads the declaration: a stage ranked before the score stage on its chapter is shown."""
    from vlmsae_utils import book

    runs = [book.ExecutedRun("03", run_id, tmp_path / "n.ipynb", "ran") for run_id in ("score/m/L2/d", "norms/m/L2/d")]
    assert [r.run_id for r in book.representatives(runs)] == ["score/m/L2/d"]
    stages.register_stage(stages.Stage("norms", "03", ("norms.csv",), book_rank=-1))
    try:
        assert [r.run_id for r in book.representatives(runs)] == ["norms/m/L2/d"]
    finally:
        stages.unregister_stage("norms")


def test_a_stage_notebook_names_its_chapter():
    with pytest.raises(ValueError, match=r"chapter number or an NN_name.md file, got 'norms.md'"):
        stages.register_stage(stages.Stage("norms", "norms.md", ("norms.csv",)))
    assert "norms" not in stages.STAGES


def test_a_run_folder_starts_with_its_kind():
    with pytest.raises(ValueError, match="must start with its kind: norms/"):
        Run("norms", "03", "score/m/L2/d", {})


NORMS_CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# 8. Norms

```{code-cell} ipython3
:tags: [parameters]

activations_store = ""  # the MS run's validation activations
device = "auto"
out_dir = ""
```

```{code-cell} ipython3
from pathlib import Path

Path(out_dir, "norms.csv").write_text(f"store\\n{Path(activations_store).parent.name}\\n")
```
"""


def test_a_chapter_written_outside_the_book_runs_in_a_sweep_and_its_book(tmp_path):
    """A chapter is a notebook file and a stage declaring it: papermill runs it as a sweep cell, gather
    reads its table, and the sweep's book takes it as chapter 08, with no edit to the package."""
    from vlmsae_utils import book
    from vlmsae_utils.sweep import notebook_runner

    chapter = tmp_path / "08_norms.md"
    chapter.write_text(NORMS_CHAPTER)

    def plan(config, runs):  # the first MS run's store only: one real notebook execution
        score = next(r for r in runs if r.kind == "score")
        params = {"activations_store": score.parameters["activations_store"]}
        return [Run("norms", str(chapter), f"norms/{score.out_dir}", params, [score.id], labels=dict(score.labels))]

    def gather(ctx):
        return {"norms": pd.read_csv(ctx.folder / "norms.csv").assign(run=ctx.run.id)}

    def runner(notebook, params, out):  # the built-in stages faked, the new chapter executed for real
        return (
            notebook_runner(notebook, params, out) if notebook == str(chapter) else FakeRunner()(notebook, params, out)
        )

    stages.register_stage(
        stages.Stage("norms", str(chapter), ("norms.csv",), tables=("norms",), gather=gather, plan=plan)
    )
    try:
        raw = yaml.safe_load((CONFIGS / "fixture.yaml").read_text()) | {"hierarchy": None, "steering": None}
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
        config = sweep.load_config(tmp_path / "sweep.yaml")
        runs, root = sweep.expand(config), tmp_path / "root"
        status = sweep.execute(runs, root, runner=runner, progress=False).set_index("run")
        (norms,) = [r for r in runs if r.kind == "norms"]
        assert status.loc[norms.id, "status"] == "ran" and sweep.is_complete(norms, root)
        assert (root / norms.out_dir / "08_norms.ipynb").is_file()  # the executed chapter, as a book page
        table = stages.stage("norms").gather(stages.GatherContext(norms, root / norms.out_dir, runs, root))["norms"]
        assert table.store.tolist() == ["val"]  # its notebook read its parameters
        executed = [book.ExecutedRun(stages.chapter_of(norms.notebook), norms.id, root / norms.out_dir / "x", "ran")]
        assert [(r.notebook, r.run_id) for r in book.representatives(executed)] == [("08", norms.id)]
        assert book._executed_notebook(root / norms.out_dir, norms.notebook).name == "08_norms.ipynb"
    finally:
        stages.unregister_stage("norms")
