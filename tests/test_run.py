"""The papermill runner: parameters, failures, unknown names."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from vlmsae_utils import cli, run

BROKEN = """---
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
# Broken

```{code-cell} ipython3
:tags: [parameters]
answer = 41
```

```{code-cell} ipython3
raise ZeroDivisionError(f"answer was {answer}")
```
"""


def _outputs_text(notebook) -> str:
    return json.dumps([cell.get("outputs", []) for cell in notebook.cells])


@pytest.mark.slow
def test_notebook_00_runs_with_override(executed_00):
    notebook = nbformat.read(executed_00, as_version=4)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "images_per_class = 2" in injected[0].source
    text = _outputs_text(notebook)
    assert "image/png" in text  # the class grid was drawn
    assert "(12, 32)" in text  # random_k = 3 on 4 images with the 32-wide fixture models
    assert executed_00.with_suffix(".log").is_file()


def test_unknown_parameter_is_refused_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['imagez_per_class'\]"):
        run.run_notebook("00", {"imagez_per_class": 3}, tmp_path)
    assert not (tmp_path / "00_data_and_models.ipynb").exists()


def test_broken_notebook_fails_loudly_with_cell_and_error(tmp_path, capsys):
    source = tmp_path / "99_broken.md"
    source.write_text(BROKEN)
    with pytest.raises(run.NotebookError, match="ZeroDivisionError: answer was 7") as err:
        run.run_notebook(source, {"answer": 7}, tmp_path / "out")
    assert "raise ZeroDivisionError" in str(err.value)
    assert cli.main([str(source), "--out", str(tmp_path / "out")]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_cli_parses_yaml_values_and_rejects_bad_combinations():
    assert cli.parse_value("3") == 3 and cli.parse_value("0.5") == 0.5
    assert cli.parse_value("[1, 2]") == [1, 2] and cli.parse_value("true") is True
    assert cli.parse_value("fixture:clip") == "fixture:clip"
    with pytest.raises(SystemExit):
        cli.main(["00", "--all"])


@pytest.mark.parametrize("module", ["vlmsae_utils", "vlmsae_utils.run", "vlmsae_utils.cli"])
def test_command_line_entry_points(module):
    """``python -m vlmsae_utils.run`` (the documented command), ``-m vlmsae_utils`` and ``-m vlmsae_utils.cli`` are one CLI."""
    result = subprocess.run([sys.executable, "-m", module, "00", "--all"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "give exactly one of NOTEBOOK or --all" in result.stderr
    assert "usage: python -m vlmsae_utils.run" in result.stderr


def test_unknown_notebook_lists_available():
    with pytest.raises(FileNotFoundError, match="00_data_and_models"):
        run.find_notebook("42")


def test_every_notebook_declares_parameters():
    for source in run.all_notebooks():
        text = source.read_text()
        assert text.count(":tags: [parameters]") == 1, source.name
        assert text.startswith("---\njupytext:"), source.name


def test_papermill_parses_every_parameter_line(tmp_path):
    """A comment papermill cannot parse silently drops the parameter from `inspect_notebook`."""
    import papermill

    for source in run.all_notebooks():
        notebook = run.to_ipynb(source, tmp_path / f"{source.stem}.ipynb")
        cell = next(c for c in nbformat.read(notebook, 4).cells if "parameters" in c.metadata.get("tags", []))
        names = [line.split("=")[0].strip() for line in cell.source.splitlines() if line and not line.startswith("#")]
        assert sorted(papermill.inspect_notebook(str(notebook))) == sorted(names), source.name


def test_command_line_values_are_numbers_lists_or_text():
    assert cli.parse_value("2e-4") == pytest.approx(2e-4)  # YAML 1.1 would keep this as text
    assert cli.parse_value("") == "" and cli.parse_value("null") is None
    with pytest.raises(ValueError, match="not valid YAML"):
        cli.parse_value("[1, 2")


def test_a_notebook_whose_out_dir_is_being_written_elsewhere_fails_before_running(tmp_path):
    """Two runs of notebook 02 into one folder (two terminals, a hand run beside a sweep cell) used to
    interleave their files; the second now fails at once, naming the first."""
    from helpers import lock_held_elsewhere

    from vlmsae_utils.io import FolderLockedError

    folder = tmp_path / "train_run"
    with lock_held_elsewhere(folder) as pid, pytest.raises(FolderLockedError, match=f"written by pid {pid}"):
        run.run_notebook("02", {"out_dir": str(folder)}, tmp_path / "executed")
    assert not (tmp_path / "executed" / "02_train.ipynb").exists()


def test_runs_into_different_out_dirs_keep_their_own_executed_notebooks(tmp_path, monkeypatch):
    """Issue 32: two runs with different out_dirs and no --out wrote the same executed notebook."""
    from vlmsae_utils.runner import default_notebook_folder

    monkeypatch.setenv("VLMSAE_OUTPUTS", str(tmp_path / "outputs"))
    first, second = default_notebook_folder({"out_dir": "runs/a"}), default_notebook_folder({"out_dir": "runs/b"})
    assert first == tmp_path / "outputs" / "runs" / "a" and second == tmp_path / "outputs" / "runs" / "b"
    assert default_notebook_folder({"out_dir": str(tmp_path / "abs")}) == tmp_path / "abs"
    assert default_notebook_folder({}) == tmp_path / "outputs" / "notebooks"


def test_training_notebook_parameters_are_the_training_settings(tmp_path):
    """Notebook 02 declares every TrainConfig setting once, with the fixture preset's value: one
    default per setting, each reachable from ``-p`` and from a sweep's ``sae`` section."""
    import ast

    from vlmsae_utils import train_config
    from vlmsae_utils.train_config import TrainConfig

    ipynb = run.to_ipynb(run.find_notebook("02"), tmp_path / "02.ipynb")
    declared = {name: ast.literal_eval(value) for name, value in run.notebook_parameters(ipynb).items()}
    preset = TrainConfig.fixture()
    settings = {name: declared[name] for name in TrainConfig.setting_names() if name in declared}
    assert settings == {name: getattr(preset, name) for name in TrainConfig.setting_names()}
    assert preset.expansion in declared["expansions"] and preset.sae_type in declared["sae_types"]
    namespace = dict(declared, k=3, init="gaussian", group_fractions=[0.5, 0.5], unrelated=1)
    settings = TrainConfig.settings_in(namespace)
    assert settings == {name: getattr(preset, name) for name in TrainConfig.setting_names()} | {
        "k": 3,
        "init": "gaussian",
        "group_fractions": [0.5, 0.5],
    }
    grid = train_config.grid_configs(["batch_top_k", "matryoshka_batch_top_k"], [2], **settings)
    assert grid["matryoshka_batch_top_k", 2].group_fractions == (0.5, 0.5)  # only where the type has groups
    assert grid["batch_top_k", 2].group_fractions is None and grid["batch_top_k", 2].k == 3
