"""Sweeps on a Slurm cluster: the whole grid in one submission, job arrays with ``afterok`` dependencies."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import submitit

from . import sweep
from .executor_config import ExecutorConfig
from .executor_jobs import (
    ACTIVE_STATES,
    JOBS_DIR,
    Cell,
    CellJob,
    CellPlan,
    ExecutorError,
    JobExecutor,
    JobGroup,
    Options,
    _read_record,
    _run_hash,
    _write_record,
    cell_states,
    group_jobs,
)

__all__ = [
    "SlurmExecutor",
    "slurm_states",
    "submit_slurm",
]


def _query(command: list[str]) -> list[str]:
    """Output lines of a Slurm query; none when the command is missing or fails (no accounting)."""
    if shutil.which(command[0]) is None:
        return []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return result.stdout.splitlines() if result.returncode == 0 else []


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job (``PENDING``, ``RUNNING``, ``FAILED``, …): ``squeue`` for queued and running
    jobs (array tasks one per line), then ``sacct`` for finished ones; ``ENDED`` when neither knows."""
    if not job_ids:
        return {}
    bases = ",".join(sorted({job_id.split("_")[0] for job_id in job_ids}))
    states: dict[str, str] = {}
    for line in _query(["squeue", "-h", "-r", "-o", "%i|%T", "-j", bases]):
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip().upper()
    unknown = [job_id for job_id in job_ids if job_id not in states]
    if unknown:
        for line in _query(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", bases]):
            job_id, _, state = line.partition("|")
            if job_id.strip() in unknown:
                states[job_id.strip()] = (state.split() or ["ENDED"])[0].upper()
    return {job_id: states.get(job_id, "ENDED") for job_id in job_ids}


def _active_jobs(cells: list[Cell], root: Path) -> dict[str, str]:
    """Cells whose recorded Slurm job is still queued or running (not to be submitted again);
    a queued job for other parameters is an error (the user cancels it, or waits)."""
    records = {cell.run.id: _read_record(root / cell.run.out_dir) for cell in cells}
    recorded = {run_id: r for run_id, r in records.items() if r.get("executor") == "slurm"}
    states = slurm_states([r["job_id"] for r in recorded.values()])
    active = {}
    for cell in cells:
        record = recorded.get(cell.run.id)
        if record and states[record["job_id"]] in ACTIVE_STATES:
            if record.get("run_hash") != _run_hash(cell.run):
                raise ExecutorError(
                    f"{cell.run.id}: job {record['job_id']} is still queued for other parameters; "
                    f"cancel it (scancel {record['job_id']}) or wait for it, then rerun"
                )
            active[cell.run.id] = record["job_id"]
    return active


def _slurm_executor(root: Path, config: ExecutorConfig, group: JobGroup, after: list[str], name: str):
    """A submitit Slurm executor for one group: its kind's resources and its dependencies."""
    resources = group.cells[0].resources
    executor = submitit.SlurmExecutor(folder=root / JOBS_DIR / group.kind / "%j", max_num_timeout=config.max_requeue)
    parameters: dict[str, Any] = {
        "job_name": f"{name}-{group.kind}",
        "time": resources.timeout_min,
        "cpus_per_task": resources.cpus,
        "mem": f"{round(resources.mem_gb * 1024)}MB",
        "array_parallelism": config.array_parallelism,
        "additional_parameters": {"kill-on-invalid-dep": "yes", **config.sbatch},
    }
    if resources.tasks > 1:  # a split extraction: one process per task, one GPU each
        parameters["ntasks_per_node"] = resources.tasks
        if resources.gpus:
            parameters["gpus_per_task"] = 1
    elif resources.gpus:
        parameters["gpus_per_node"] = resources.gpus
    if config.partition:
        parameters["partition"] = config.partition
    if config.account:
        parameters["account"] = config.account
    if after:
        parameters["dependency"] = "afterok:" + ":".join(after)
    executor.update_parameters(**parameters)
    return executor


def submit_slurm(
    cells: list[Cell], root: Path, config: ExecutorConfig, name: str, runner: Callable | None = None
) -> pd.DataFrame:
    """Submit every cell not already queued, as job arrays with ``afterok`` dependencies; returns
    one row per cell with its job id and whether it was submitted now or was already queued."""
    job_ids = _active_jobs(cells, root)
    rows = [{"run": run_id, "job": job_id, "status": "queued earlier"} for run_id, job_id in job_ids.items()]
    for group in group_jobs([c for c in cells if c.run.id not in job_ids]):
        after = sorted({job_ids[dep] for dep in group.after})
        executor = _slurm_executor(root, config, group, after, name)
        with executor.batch():
            jobs = [executor.submit(CellJob(cell.run, str(root), runner)) for cell in group.cells]
        for cell, job in zip(group.cells, jobs):
            job_ids[cell.run.id] = job.job_id
            _write_record(root / cell.run.out_dir, "slurm", job, cell.run)
            rows.append({"run": cell.run.id, "job": job.job_id, "status": "submitted"})
    return pd.DataFrame(rows, columns=["run", "job", "status"])


class SlurmExecutor(JobExecutor):
    """The whole grid in one submission; ``--wait`` polls the queue until nothing is queued or running."""

    name = "slurm"

    def check(self, options: Options) -> None:
        if not options.dry_run and shutil.which("sbatch") is None:
            raise ExecutorError("--executor slurm: sbatch is not on PATH; run this on the cluster's login node")

    def run_cells(self, plan: CellPlan, options: Options) -> pd.DataFrame:
        submitted = submit_slurm(plan.cells, plan.root, plan.settings, plan.config.name, options.runner)
        if options.wait:
            return _wait_for_slurm(plan.runs, plan.root)
        return _submitted_states(plan.runs, plan.root, submitted)

    def job_states(self, records: list[dict[str, Any]]) -> dict[str, str]:
        return slurm_states([r["job_id"] for r in records])


def _submitted_states(runs: list[sweep.Run], root: Path, submitted: pd.DataFrame) -> pd.DataFrame:
    """Each cell's state right after a submission: ``submitted`` for the cells sent now."""
    status = cell_states(runs, root)
    now = status.run.isin(submitted.run[submitted.status == "submitted"]) & ~status.status.eq("done")
    status.loc[now, "status"] = "submitted"
    return status


def _wait_for_slurm(runs: list[sweep.Run], root: Path, every_s: float = 60.0) -> pd.DataFrame:
    """Poll the queue until no cell is queued or running; the final states."""
    while True:
        states = cell_states(runs, root)
        if not states.status.isin(["queued", "running"]).any():
            return states
        time.sleep(every_s)
