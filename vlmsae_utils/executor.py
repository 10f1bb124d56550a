"""Sweeps as jobs: every grid cell a submitit job, on local processes or on a Slurm cluster.

``python -m vlmsae_utils.run --config FILE --executor {inline,local,slurm}`` runs the same cells
with the same markers and fingerprints (:mod:`.sweep`) three ways:

- ``inline``: one process, in order (:func:`.sweep.run_sweep`).
- ``local``: each cell a subprocess job (``submitit.LocalExecutor``), started once its inputs are
  finished, one per GPU at a time (one at a time on a CPU).
- ``slurm``: the whole grid in one submission. Cells of one kind waiting for the same inputs form
  a job array (``array_parallelism`` tasks at once); every array waits for its inputs' tasks
  (``afterok``), and Slurm cancels the dependents of a failed cell (``kill-on-invalid-dep``).
  A timed-out or preempted cell is requeued by submitit (extraction and training resume from
  what they wrote). Rerunning the command submits only cells that are neither finished nor
  queued; ``--status`` reads the markers and the queue; once every cell is finished the same
  command gathers ``results/<name>/`` as the inline runner does.

Each way is an :class:`~vlmsae_utils.executor_jobs.Executor` registered by name
(:func:`register_executor`; CONTRIBUTING, "Recipe: add an executor"): :class:`InlineExecutor` here,
:class:`~vlmsae_utils.executor_local.LocalExecutor` and
:class:`~vlmsae_utils.executor_slurm.SlurmExecutor` beside it.

Each cell's folder keeps, beside its outputs and executed notebook, ``_job.json`` (which job ran
it) and links ``job.out`` / ``job.err`` to its log files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from . import sweep
from .executor_config import ExecutorConfig, Resources
from .executor_jobs import (
    ACTIVE_STATES,
    ASSEMBLY_DIR,
    JOB_FILE,
    JOBS_DIR,
    Cell,
    CellFailed,
    CellJob,
    CellPlan,
    Executor,
    ExecutorError,
    JobExecutor,
    JobGroup,
    Options,
    cell_states,
    executor_named,
    group_jobs,
    job_table,
    plan_cells,
    register_executor,
    unregister_executor,
)
from .executor_local import LocalExecutor, run_local
from .executor_slurm import SlurmExecutor, slurm_states, submit_slurm
from .sweep_schema import SweepConfig

__all__ = [
    "ACTIVE_STATES",
    "ASSEMBLY_DIR",
    "JOBS_DIR",
    "JOB_FILE",
    "Cell",
    "CellFailed",
    "CellJob",
    "CellPlan",
    "Executor",
    "ExecutorError",
    "InlineExecutor",
    "JobExecutor",
    "JobGroup",
    "LocalExecutor",
    "Options",
    "Resources",
    "SlurmExecutor",
    "cell_states",
    "dispatch",
    "executor_named",
    "group_jobs",
    "job_table",
    "plan_cells",
    "register_executor",
    "run_local",
    "slurm_states",
    "submit_slurm",
    "unregister_executor",
]


class InlineExecutor:
    """Every cell in this process, in order (:func:`.sweep.run_sweep`)."""

    name = "inline"

    def dispatch(
        self, config: SweepConfig, config_path: Path, settings: ExecutorConfig, options: Options
    ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        return sweep.run_sweep(config_path, dry_run=options.dry_run, progress=options.progress, runner=options.runner)

    def job_states(self, records: list[dict[str, Any]]) -> dict[str, str]:
        return {}


for _builtin in (InlineExecutor(), LocalExecutor(), SlurmExecutor()):
    register_executor(_builtin)


def dispatch(
    config_path: str | Path,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    wait: bool = False,
    progress: bool = True,
    runner=None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Run a sweep file on the executor its ``executor:`` block (or ``executor``) names; returns the
    status table and, once every cell is finished, the gathered results tables."""
    config = sweep.load_config(config_path)
    settings = config.executor.with_type(executor)
    options = Options(dry_run=dry_run, wait=wait, progress=progress, runner=runner)
    return executor_named(settings.type).dispatch(config, Path(config_path), settings, options)
