"""Execute the book's MyST notebooks headless with papermill.

:func:`run_notebook` converts a jupytext MyST notebook to ``.ipynb``, checks the parameter names
against the notebook's ``parameters`` cell, executes it and writes the executed notebook beside a
run log; a failing cell raises :class:`NotebookError` with the cell and the error. The command
line (``python -m vlmsae_utils.run NOTEBOOK [-p NAME VALUE]... [--out DIR]``, ``--all``,
``--config``, or ``python -m vlmsae_utils``) is :mod:`vlmsae_utils.cli`; it imports this module,
never the other way round.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import kernels
from .io import folder_lock
from .paths import outputs_root, repo_root, resolve_out_dir

__all__ = [
    "INLINE_BACKEND",
    "KERNEL_NAME",
    "NotebookError",
    "all_notebooks",
    "check_parameters",
    "default_notebook_folder",
    "find_notebook",
    "notebook_parameters",
    "notebooks_dir",
    "run_notebook",
    "to_ipynb",
]

KERNEL_NAME = "python3"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


class NotebookError(RuntimeError):
    """A notebook cell failed; the message holds the cell source and the error."""


def notebooks_dir() -> Path:
    """The folder with the MyST notebooks of the book."""
    root = repo_root()
    if root is None:
        raise FileNotFoundError("notebooks/ not found: run from a source checkout (pip install -e .)")
    return root / "notebooks"


def all_notebooks() -> list[Path]:
    """Every ``NN_*.md`` notebook in book order."""
    return sorted(p for p in notebooks_dir().glob("[0-9][0-9]_*.md"))


def find_notebook(name: str | Path) -> Path:
    """A notebook by path, file name, stem or number prefix (``00``, ``00_data_and_models``)."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    matches = [p for p in all_notebooks() if p.stem == path.stem or p.name.startswith(f"{path.stem}_")]
    if len(matches) != 1:
        names = ", ".join(p.stem for p in all_notebooks())
        raise FileNotFoundError(f"notebook {str(name)!r} not found (or ambiguous); available: {names}")
    return matches[0]


def to_ipynb(source: Path, target: Path) -> Path:
    """Write the jupytext MyST notebook ``source`` as an unexecuted ``.ipynb``."""
    import jupytext

    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    jupytext.write(notebook, target, fmt="ipynb")
    return target


def notebook_parameters(ipynb: Path) -> dict[str, Any]:
    """Names and defaults declared in the notebook's ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(ipynb))
    return {name: info.get("default") for name, info in declared.items()}


def check_parameters(ipynb: Path, parameters: dict[str, Any], declared: dict[str, Any] | None = None) -> None:
    """Refuse names the notebook does not declare (papermill would inject them silently);
    ``declared`` is :func:`notebook_parameters` when the caller has it already."""
    declared = notebook_parameters(ipynb) if declared is None else declared
    if not declared and parameters:
        raise ValueError(f"{ipynb.stem} has no cell tagged 'parameters'; cannot set {sorted(parameters)}")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {ipynb.stem}; valid: {sorted(declared)}")


def default_notebook_folder(parameters: dict[str, Any]) -> Path:
    """Where an executed notebook and its log go when no folder is named: the run's own ``out_dir``
    when the parameters give one (as a sweep cell keeps them), so two runs into different folders
    never overwrite each other's notebook; else ``<outputs>/notebooks``."""
    out_dir = parameters.get("out_dir")
    return resolve_out_dir(out_dir) if out_dir else outputs_root() / "notebooks"


def run_notebook(
    source: str | Path,
    parameters: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> Path:
    """Execute one notebook with ``parameters``; returns the executed ``.ipynb`` (log beside it)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = find_notebook(source)
    parameters = dict(parameters or {})
    out = Path(out_dir) if out_dir is not None else default_notebook_folder(parameters)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{source.stem}.ipynb"
    log_path = out / f"{source.stem}.log"
    with tempfile.TemporaryDirectory() as tmp:
        unexecuted = to_ipynb(source, Path(tmp) / f"{source.stem}.ipynb")
        declared = notebook_parameters(unexecuted)
        check_parameters(unexecuted, parameters, declared)
        with _run_folder_lock(declared, parameters), _log_to(log_path), _inline_figures():
            warm = kernels.take_kernel(KERNEL_NAME, source.parent)  # None outside kernels.warm_kernels()
            try:
                papermill.execute_notebook(
                    str(unexecuted),
                    str(executed),
                    parameters=parameters,
                    kernel_name=KERNEL_NAME,
                    cwd=str(source.parent),
                    log_output=True,
                    progress_bar=progress,
                    **({"engine_name": kernels.register_engine(), "km": warm} if warm is not None else {}),
                )
            except PapermillExecutionError as err:
                raise NotebookError(_describe_failure(executed, err)) from None
    return executed


def _run_folder_lock(declared: dict[str, Any], parameters: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The notebook's ``out_dir`` locked while it runs: a second run writing the same folder (two
    terminals, a sweep cell and a hand run) fails naming the first, instead of mixing their files."""
    out_dir = parameters["out_dir"] if "out_dir" in parameters else _literal(declared.get("out_dir"))
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        return contextlib.nullcontext()
    return folder_lock(resolve_out_dir(out_dir), "run folder")


def _literal(source: str | None) -> Any:
    """A parameter's default as written in the notebook (papermill reports source text), or None."""
    try:
        return ast.literal_eval(source) if source else None
    except (ValueError, SyntaxError):
        return None


@contextlib.contextmanager
def _inline_figures() -> Iterator[None]:
    """Kernels inherit the environment: make sure figures are captured inline, not sent to Agg."""
    previous = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = previous


def _describe_failure(executed: Path, err) -> str:
    """The failing cell's source and the error, for the terminal."""
    import nbformat

    cell_source = "?"
    if executed.is_file():  # papermill inserts a banner cell, so find the cell holding the error
        cells = nbformat.read(executed, as_version=4).cells
        failed = [c for c in cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
        cell_source = failed[0].source if failed else cell_source
    return (
        f"{executed.stem}: cell {err.exec_count} failed with {err.ename}: {err.evalue}\n"
        f"--- cell source ---\n{cell_source}\n--- executed notebook: {executed}"
    )


class _log_to:
    """Context manager that copies papermill's log (cell outputs included) to a file."""

    def __init__(self, path: Path) -> None:
        self.handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("papermill")

    def __enter__(self) -> None:
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous_level)
        self.handler.close()
