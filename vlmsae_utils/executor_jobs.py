"""Sweep cells as submitit jobs: the job that runs a cell, the plan of cells and job arrays, the job
records beside each cell's outputs, and the protocol every executor implements."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import submitit

from . import extract, sweep
from .executor_config import ExecutorConfig, Resources, add_executor_name, remove_executor_name
from .io import FolderLockedError, atomic_write_json, folder_lock, read_json, sha256_json
from .sweep_schema import SweepConfig

__all__ = [
    "ACTIVE_STATES",
    "ASSEMBLY_DIR",
    "JOBS_DIR",
    "JOB_FILE",
    "POLL_SECONDS",
    "Cell",
    "CellFailed",
    "CellJob",
    "CellPlan",
    "Executor",
    "ExecutorError",
    "JobExecutor",
    "JobGroup",
    "Options",
    "cell_states",
    "executor_named",
    "group_jobs",
    "job_table",
    "plan_cells",
    "register_executor",
    "unregister_executor",
    "with_finished",
]


JOB_FILE = sweep.JOB_FILE  # in a cell's folder: the job that runs or ran it
JOBS_DIR = "_jobs"  # in the sweep folder: submitit's pickles and the jobs' logs
POLL_SECONDS = 0.5
ASSEMBLY_DIR = "_assembly"  # in a split extraction's folder: locked by the task that runs notebook 01


class ExecutorError(RuntimeError):
    """The executor cannot run here (no ``sbatch``, a queued job for other parameters, …)."""


class CellFailed(RuntimeError):
    """A cell's notebook failed; raised inside its job so that Slurm never starts its dependents."""


class CellJob(submitit.helpers.Checkpointable):
    """One sweep cell as a submitit job. On a timeout or preemption submitit calls ``checkpoint``
    (inherited) and requeues the same cell: the notebook then resumes from what it wrote. An
    extraction job with several tasks shares the shards out (one GPU each) before notebook 01."""

    def __init__(self, run: sweep.Run, root: str, runner: Callable[[str, dict, Path], Any] | None = None) -> None:
        self.run = run
        self.root = root
        self.runner = runner

    def __call__(self) -> str:
        root = Path(self.root)
        unfinished = [dep for dep in self.run.depends if not (root / dep / sweep.DONE_FILE).is_file()]
        if unfinished:
            raise CellFailed(f"{self.run.id}: its input {unfinished[0]} is not finished")
        env = submitit.JobEnvironment() if "SUBMITIT_EXECUTOR" in os.environ else None
        if env is not None and env.num_tasks > 1:
            return self._shared_extraction(env, root)
        return self._run_notebook(root)

    def _run_notebook(self, root: Path) -> str:
        state, message = sweep.execute_run(self.run, root, self.runner)
        if state != "ran":
            _update_record(root / self.run.out_dir, error=message)
            raise CellFailed(f"{self.run.id}: {message}")
        return self.run.id

    def _shared_extraction(self, env: submitit.JobEnvironment, root: Path) -> str:
        """This task writes its shards of the cell's store; the task that writes the last one runs
        notebook 01, which finds the store complete and only opens and summarises it."""
        folder = root / self.run.out_dir
        with folder_lock(folder, "run folder", blocking=True):
            sweep.start_run(self.run, root)  # a stale folder is cleared once, before any task writes
        params = sweep.resolved_parameters(self.run, root)
        if not extract.extract_share(params, env.global_rank, env.num_tasks, env.local_rank):
            return self.run.id  # other tasks still write theirs
        try:
            with folder_lock(folder / ASSEMBLY_DIR, "store assembly"):
                return self.run.id if sweep.is_complete(self.run, root) else self._run_notebook(root)
        except FolderLockedError:
            return self.run.id  # another task saw the last shard at the same moment and runs it


# ----------------------------------------------------------------------------- planning


@dataclass
class Cell:
    """A run that needs a job, the cells it waits for, and what its job asks for."""

    run: sweep.Run
    resources: Resources
    after: list[str] = field(default_factory=list)


@dataclass
class JobGroup:
    """Cells submitted together: one job array on Slurm (one job when it holds one cell)."""

    name: str
    kind: str
    cells: list[Cell]
    after: list[str]  # ids of the cells every member waits for


def plan_cells(runs: list[sweep.Run], root: Path, config: ExecutorConfig) -> list[Cell]:
    """The runs to (re)do, in dependency order: unfinished ones and every run downstream of them
    (a redone input makes its dependents stale, as in the inline runner)."""
    complete = sweep.complete_runs(runs, root)
    return [
        Cell(run, config.resources_for(run.kind), [dep for dep in run.depends if dep not in complete])
        for run in runs
        if run.id not in complete
    ]


def group_jobs(cells: list[Cell]) -> list[JobGroup]:
    """Cells of one kind that wait for exactly the same cells share an array, so a failed cell
    blocks only its own dependents; groups come in an order where inputs precede their users."""
    level: dict[str, int] = {}
    for cell in cells:
        level[cell.run.id] = 1 + max((level[dep] for dep in cell.after), default=-1)
    groups: dict[tuple, JobGroup] = {}
    for cell in sorted(cells, key=lambda c: level[c.run.id]):
        key = (level[cell.run.id], cell.run.kind, tuple(sorted(cell.after)))
        if key not in groups:
            groups[key] = JobGroup(f"{cell.run.kind}-{len(groups)}", cell.run.kind, [], sorted(cell.after))
        groups[key].cells.append(cell)
    return list(groups.values())


def job_table(groups: list[JobGroup]) -> pd.DataFrame:
    """The dry run: one row per cell with its job (``array[task]``), resources and the jobs it waits for."""
    label = {
        cell.run.id: f"{group.name}[{index}]" if len(group.cells) > 1 else group.name
        for group in groups
        for index, cell in enumerate(group.cells)
    }
    rows = [
        {
            "job": label[cell.run.id],
            "run": cell.run.id,
            "resources": cell.resources.describe(),
            "after": " ".join(label[dep] for dep in cell.after) or "-",
        }
        for group in groups
        for cell in group.cells
    ]
    return pd.DataFrame(rows, columns=["job", "run", "resources", "after"])


# ----------------------------------------------------------------------------- job records


def _record_path(folder: Path) -> Path:
    return folder / JOB_FILE


def _write_record(folder: Path, executor: str, job: submitit.Job, run: sweep.Run) -> None:
    """Which job runs a cell (for reruns and ``--status``), with links to its logs beside the outputs."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        _record_path(folder),
        {
            "executor": executor,
            "job_id": job.job_id,
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_hash": _run_hash(run),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        },
    )
    for link, target in (("job.out", job.paths.stdout), ("job.err", job.paths.stderr)):
        (folder / link).unlink(missing_ok=True)
        (folder / link).symlink_to(os.path.relpath(target, folder))


def _update_record(folder: Path, **values: Any) -> None:
    record = _read_record(folder)
    if record:
        atomic_write_json(_record_path(folder), record | values)


def _read_record(folder: Path) -> dict[str, Any]:
    path = _record_path(folder)
    return read_json(path) if path.is_file() else {}


def _run_hash(run: sweep.Run) -> str:
    """What a queued job was submitted to compute (its notebook and parameters)."""
    return sha256_json({"notebook": run.notebook, "parameters": run.parameters})


# ----------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Options:
    """How the command line asked for the sweep: list only, wait for queued jobs, progress bars, the runner."""

    dry_run: bool = False
    wait: bool = False
    progress: bool = True
    runner: Callable[[str, dict, Path], Any] | None = None


class Executor(Protocol):
    """One way to run a sweep's cells (inline, local jobs, Slurm, or one a user registers with
    :func:`vlmsae_utils.executor.register_executor`): every way writes the same markers, so a sweep
    started one way is finished another."""

    #: The name of ``--executor`` and of the ``executor: type:`` key.
    name: str

    def dispatch(
        self, config: SweepConfig, config_path: Path, settings: ExecutorConfig, options: Options
    ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        """Run (or submit) the sweep's unfinished cells: the status table and, once every cell is
        finished, the gathered results tables."""
        ...

    def job_states(self, records: list[dict[str, Any]]) -> dict[str, str]:
        """The state of each job this executor recorded (``_job.json``), by job id: ``RUNNING``,
        ``PENDING`` or another of :data:`ACTIVE_STATES`, else a final state or ``""`` when unknown."""
        ...


#: Job states in which a cell is still queued or running (Slurm's names; a local job is ``RUNNING``).
ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
}


@dataclass(frozen=True)
class CellPlan:
    """A sweep about to run as jobs: its config, every run, the cells to (re)do, its folder and settings."""

    config: SweepConfig
    runs: list[sweep.Run]
    cells: list[Cell]
    root: Path
    settings: ExecutorConfig


class JobExecutor:
    """What every executor that runs cells as submitit jobs shares: plan the unfinished cells, list
    them for a dry run, hold the sweep's lock, record the status table, gather when all finished.
    A subclass sets ``name`` and implements :meth:`check` and :meth:`run_cells`."""

    name = "jobs"

    def check(self, options: Options) -> None:
        """Refuse to start where the executor cannot run, before any work."""

    def run_cells(self, plan: CellPlan, options: Options) -> pd.DataFrame:
        """Run or submit the plan's cells; the status table of every run of the sweep."""
        raise NotImplementedError

    def job_states(self, records: list[dict[str, Any]]) -> dict[str, str]:
        return {}

    def dispatch(
        self, config: SweepConfig, config_path: Path, settings: ExecutorConfig, options: Options
    ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        self.check(options)
        runs, root = sweep.expand(config), sweep.sweep_dir(config.name)
        cells = plan_cells(runs, root, settings)
        if options.dry_run:
            return job_table(group_jobs(cells)), {}
        root.mkdir(parents=True, exist_ok=True)
        with sweep.sweep_lock(root):
            status = self.run_cells(CellPlan(config, runs, cells, root, settings), options)
            status.to_csv(root / sweep.RUNS_FILE, index=False)
            unfinished = status.status.isin(["submitted", "queued", "running"]).any()
            return status, ({} if unfinished else sweep.gather(config, runs, root))


def with_finished(runs: list[sweep.Run], ran: pd.DataFrame) -> pd.DataFrame:
    """The inline runner's status table: the cells that ran here, and ``done earlier`` for the rest."""
    by_run = ran.set_index("run")
    rows = [
        by_run.loc[run.id].to_dict() | {"run": run.id}
        if run.id in by_run.index
        else {"run": run.id, "notebook": run.notebook, "status": "done earlier", "message": ""}
        for run in runs
    ]
    return pd.DataFrame(rows, columns=["run", "notebook", "status", "message"])


# ----------------------------------------------------------------------------- registry

_EXECUTORS: dict[str, Executor] = {}


def register_executor(executor: Executor) -> Executor:
    """Make ``executor`` a choice of ``--executor`` and of the ``executor: type:`` key, under its ``name``."""
    name = getattr(executor, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an executor needs a name (a Python identifier), got {name!r}")
    if name in _EXECUTORS and _EXECUTORS[name] is not executor:
        raise ValueError(f"executor {name!r} is already registered; call unregister_executor first")
    _EXECUTORS[name] = executor
    add_executor_name(name)
    return executor


def unregister_executor(name: str) -> Executor:
    """Remove a registered executor (e.g. a test's); returns it."""
    executor = executor_named(name)
    del _EXECUTORS[name]
    remove_executor_name(name)
    return executor


def executor_named(name: str) -> Executor:
    """The executor registered under ``name``."""
    if name not in _EXECUTORS:
        raise ValueError(f"executor {name!r} is not one of {', '.join(_EXECUTORS)}")
    return _EXECUTORS[name]


def _live_states(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """``(executor, job id)`` → state, each executor asked about the jobs it recorded."""
    by_executor: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("executor") in _EXECUTORS and record.get("job_id"):
            by_executor.setdefault(record["executor"], []).append(record)
    return {
        (name, job_id): state
        for name, mine in by_executor.items()
        for job_id, state in _EXECUTORS[name].job_states(mine).items()
    }


# ----------------------------------------------------------------------------- status


def cell_states(runs: list[sweep.Run], root: Path) -> pd.DataFrame:
    """Each cell's status from its marker, its job and its inputs: ``done``, ``queued``/``running``
    (Slurm), ``failed`` (with the error or the job's final state), ``blocked`` (an input failed) or
    ``not submitted``; with the job id and the log of the job that ran it."""
    records = {run.id: _read_record(root / run.out_dir) for run in runs}
    live = _live_states(list(records.values()))
    complete = sweep.complete_runs(runs, root)
    states: dict[str, str] = {}
    rows = []
    for run in runs:
        record = records[run.id]
        failed_inputs = [dep for dep in run.depends if states.get(dep) in ("failed", "blocked")]
        job_state = live.get((str(record.get("executor")), str(record.get("job_id"))), "")
        if run.id in complete:
            state, message = "done", ""
        elif failed_inputs:
            state, message = "blocked", f"needs {failed_inputs[0]}"
        elif job_state in ACTIVE_STATES:
            state, message = ("running" if job_state == "RUNNING" else "queued"), job_state
        elif record:
            ended = f"job {record['job_id']} ended ({job_state or 'state unknown'}) without finishing"
            state, message = "failed", record.get("error") or ended
        else:
            state, message = "not submitted", ""
        states[run.id] = state
        rows.append(
            {
                "run": run.id,
                "notebook": run.notebook,
                "status": state,
                "message": message,
                "job": record.get("job_id", ""),
                "log": record.get("stderr", ""),
            }
        )
    return pd.DataFrame(rows, columns=["run", "notebook", "status", "message", "job", "log"])
