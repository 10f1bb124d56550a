"""Sweeps as local subprocess jobs: each cell once its inputs finished, one per GPU at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import submitit

from . import sweep
from .executor_config import ExecutorConfig
from .executor_jobs import (
    JOBS_DIR,
    POLL_SECONDS,
    Cell,
    CellJob,
    CellPlan,
    JobExecutor,
    Options,
    _read_record,
    _write_record,
    with_finished,
)

__all__ = [
    "LocalExecutor",
    "run_local",
]


@dataclass
class _LocalPool:
    """What local jobs may use at once: one job per GPU (an extraction split over N tasks takes N
    GPUs), at most ``array_parallelism`` jobs; one job at a time on a CPU (two PyTorch jobs on the
    same cores only slow each other down)."""

    free_gpus: list[int]
    capacity: int
    has_gpus: bool
    running: int = 0

    @classmethod
    def of_this_machine(cls, config: ExecutorConfig) -> _LocalPool:
        import torch

        gpus = torch.cuda.device_count()
        return cls(list(range(gpus)), min(config.array_parallelism, gpus or 1), gpus > 0)

    def take(self, cell: Cell) -> tuple[int, ...] | None:
        """GPUs for the cell's job (``()`` on a CPU), or None while it does not fit."""
        want = cell.resources.tasks if self.has_gpus and cell.resources.gpus else 0
        if self.running >= self.capacity or len(self.free_gpus) < want:
            return None
        self.running += 1
        taken, self.free_gpus = tuple(self.free_gpus[:want]), self.free_gpus[want:]
        return taken

    def give_back(self, gpus: tuple[int, ...]) -> None:
        self.running -= 1
        self.free_gpus = sorted([*self.free_gpus, *gpus])


def run_local(
    cells: list[Cell], root: Path, config: ExecutorConfig, runner: Callable | None = None, progress: bool = True
) -> pd.DataFrame:
    """Run the cells as local subprocess jobs, each once its inputs finished; a failed cell blocks
    only its dependents. Returns the inline runner's status table (ran, failed, blocked)."""
    from tqdm.auto import tqdm

    pool = _LocalPool.of_this_machine(config)
    state: dict[str, str] = {}
    message: dict[str, str] = {}
    running: dict[str, tuple[submitit.Job, tuple[int, ...]]] = {}
    pending = list(cells)
    with tqdm(total=len(cells), desc="sweep (local jobs)", unit="run", disable=not progress) as bar:
        while pending or running:
            for cell in list(pending):
                failed_inputs = [dep for dep in cell.after if state.get(dep) in ("failed", "blocked")]
                if failed_inputs:
                    state[cell.run.id], message[cell.run.id] = "blocked", f"needs {failed_inputs[0]}"
                    pending.remove(cell)
                    bar.update()
                elif all(state.get(dep) == "ran" for dep in cell.after) and (gpus := pool.take(cell)) is not None:
                    running[cell.run.id] = (_submit_local(cell, root, gpus, runner), gpus)
                    pending.remove(cell)
            for run_id, (job, gpus) in list(running.items()):
                if job.done():
                    cell = next(c for c in cells if c.run.id == run_id)
                    state[run_id], message[run_id] = _local_outcome(cell, job, root)
                    pool.give_back(gpus)
                    del running[run_id]
                    bar.update()
            if running:
                time.sleep(POLL_SECONDS)
    rows = [
        {"run": c.run.id, "notebook": c.run.notebook, "status": state[c.run.id], "message": message[c.run.id]}
        for c in cells
    ]
    return pd.DataFrame(rows, columns=["run", "notebook", "status", "message"])


def _submit_local(cell: Cell, root: Path, gpus: tuple[int, ...], runner: Callable | None) -> submitit.Job:
    executor = submitit.LocalExecutor(folder=root / JOBS_DIR / "local" / "%j")
    executor.update_parameters(
        timeout_min=cell.resources.timeout_min,
        tasks_per_node=cell.resources.tasks,
        gpus_per_node=len(gpus),
        visible_gpus=gpus,
    )
    job = executor.submit(CellJob(cell.run, str(root), runner))
    _write_record(root / cell.run.out_dir, "local", job, cell.run)
    return job


def _local_outcome(cell: Cell, job: submitit.Job, root: Path) -> tuple[str, str]:
    """``ran`` when the job returned and the cell is complete; otherwise ``failed`` with the cell's
    error, or how the job ended (killed, timed out) and where its log is."""
    error = _read_record(root / cell.run.out_dir).get("error")
    if error:
        return "failed", error
    try:
        job.results()  # one per task (an extraction may be split over several)
    except Exception:  # a killed job has no result: report how it ended
        return "failed", f"job {job.job_id} ended ({job.state}) without finishing; log: {job.paths.stderr}"
    return ("ran", "") if sweep.is_complete(cell.run, root) else ("failed", f"job {job.job_id} left no marker")


class LocalExecutor(JobExecutor):
    """Each cell a subprocess job on this machine, started once its inputs finished."""

    name = "local"

    def run_cells(self, plan: CellPlan, options: Options) -> pd.DataFrame:
        ran = run_local(plan.cells, plan.root, plan.settings, options.runner, options.progress)
        return with_finished(plan.runs, ran)

    def job_states(self, records: list[dict[str, Any]]) -> dict[str, str]:
        """``RUNNING`` for a job whose process is alive (its id is the process id), else unknown."""
        return {str(r["job_id"]): "RUNNING" if _process_alive(str(r["job_id"])) else "" for r in records}


def _process_alive(job_id: str) -> bool:
    if not job_id.isdigit():
        return False
    try:
        os.kill(int(job_id), 0)
    except OSError:
        return False
    return True
