"""``python -m vlmsae_utils.run``: the book's command line (:mod:`.cli`) under its historical name, and
the notebook runner's API (:mod:`.runner`) for code that imports it from here.

``python -m vlmsae_utils`` runs the same command line.
"""

from __future__ import annotations

import sys

from .cli import main
from .runner import (
    INLINE_BACKEND,
    KERNEL_NAME,
    NotebookError,
    all_notebooks,
    check_parameters,
    find_notebook,
    notebook_parameters,
    notebooks_dir,
    run_notebook,
    to_ipynb,
)

__all__ = [
    "INLINE_BACKEND",
    "KERNEL_NAME",
    "NotebookError",
    "all_notebooks",
    "check_parameters",
    "find_notebook",
    "main",
    "notebook_parameters",
    "notebooks_dir",
    "run_notebook",
    "to_ipynb",
]


if __name__ == "__main__":
    sys.exit(main())
