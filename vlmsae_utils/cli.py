"""Command line of the notebook runner and of sweeps.

``python -m vlmsae_utils.run NOTEBOOK [-p NAME VALUE]... [--out DIR]`` (or ``python -m
vlmsae_utils.cli``, the same) converts a jupytext MyST notebook to ``.ipynb``, checks the
parameter names against the notebook's ``parameters`` cell, executes it and writes the executed
notebook beside a run log. ``--all`` runs every notebook in order on its defaults;
``--config FILE [--executor inline|local|slurm] [--dry-run | --status] [--wait]`` runs a sweep file
(:mod:`.sweep`, :mod:`.executor`). A failing cell exits non-zero
and prints the cell and the error.
"""

# This module sits above .run and .sweep (which runs its notebooks through .run): neither imports it.
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from . import kernels
from .executor_config import EXECUTORS
from .io import FolderLockedError, read_yaml
from .runner import NotebookError, all_notebooks, run_notebook

__all__ = [
    "build_parser",
    "main",
    "parse_value",
]


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """A command-line parameter value: YAML scalars and lists (``3``, ``0.5``, ``[1, 2]``, ``true``)."""
    try:
        value = read_yaml(text)
    except yaml.YAMLError as err:
        raise ValueError(f"parameter value {text!r} is not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 2e-4 as text; a learning rate means the number
    return text if value is None and text.strip() not in ("null", "~") else value


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m vlmsae_utils.run``."""
    parser = argparse.ArgumentParser(
        prog="python -m vlmsae_utils.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebook", nargs="?", help="notebook path, name or number (e.g. 00)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter (value parsed as YAML)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for executed notebooks and logs (default: the run's out_dir, else outputs/notebooks)",
    )
    parser.add_argument("--all", action="store_true", help="run every notebook in order on its defaults")
    parser.add_argument("--config", help="run a sweep file (configs/*.yaml) instead of one notebook")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --config: list what would run (jobs, resources, dependencies)"
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,  # live: an executor registered before the parser is built is a choice
        help="with --config: run cells in this process, as local subprocess jobs or as Slurm jobs "
        "(default: the config's executor block, else inline)",
    )
    parser.add_argument("--status", action="store_true", help="with --config: each cell's state (markers and jobs)")
    parser.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs, then gather")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.config:
        return _sweep_main(args)
    if args.all == bool(args.notebook):
        build_parser().error("give exactly one of NOTEBOOK or --all")
    if args.all and args.parameter:
        build_parser().error("--all runs notebooks on their defaults; -p needs a single NOTEBOOK")
    targets = all_notebooks() if args.all else [args.notebook]
    try:
        parameters = {name: parse_value(value) for name, value in args.parameter}
        with kernels.warm_kernels() if len(targets) > 1 else contextlib.nullcontext():
            for target in targets:
                print(f"running {Path(target).stem} ...", flush=True)
                executed = run_notebook(target, parameters, args.out)
                print(f"  wrote {executed}", flush=True)
    except (NotebookError, FolderLockedError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _sweep_main(args: argparse.Namespace) -> int:
    """``--config FILE [--executor E] [--dry-run | --status] [--wait]``: run or inspect a sweep, print
    its status and where the results went."""
    from .executor import ExecutorError, cell_states, dispatch
    from .sweep import ConfigError, SweepLockedError, expand, load_config, sweep_dir

    if args.notebook or args.all or args.parameter:
        build_parser().error("--config runs a sweep file; do not combine it with a notebook, --all or -p")
    try:
        if args.status:
            config = load_config(args.config, check_data=False)
            print(cell_states(expand(config), sweep_dir(config.name)).to_string(index=False))
            return 0
        status, results = dispatch(args.config, executor=args.executor, dry_run=args.dry_run, wait=args.wait)
    except (ConfigError, ExecutorError, SweepLockedError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(status.to_string(index=False))
    if "status" in status and status.status.isin(["submitted", "queued", "running"]).any():
        print("jobs are queued: follow them with --status; rerun the same command once they end to gather results")
        return 0
    return _finish_sweep(args, status, results)


def _finish_sweep(args: argparse.Namespace, status, results: dict) -> int:
    """Report the gathered tables and execute the results chapter on them (chapter 6)."""
    from .sweep import RESULTS_NOTEBOOK, execute_results_chapter, load_config, sweep_dir

    for name, table in results.items():
        print(f"results: {name}.csv ({len(table)} rows)")
    failed = "status" in status and status.status.isin(["failed", "blocked"]).any()
    if "sae" in results:
        try:
            print(f"results chapter: {execute_results_chapter(load_config(args.config).name)}")
        except (NotebookError, ValueError, FileNotFoundError) as err:
            print(f"error: the results chapter failed: {err}", file=sys.stderr)
            return 1
    elif not args.dry_run:  # no SAE table: an older results chapter must not outlive its tables
        (sweep_dir(load_config(args.config).name) / "results" / f"{RESULTS_NOTEBOOK}_results.ipynb").unlink(
            missing_ok=True
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
