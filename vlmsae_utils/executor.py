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

Each cell's folder keeps, beside its outputs and executed notebook, ``_job.json`` (which job ran
it) and links ``job.out`` / ``job.err`` to its log files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import submitit

from . import extract, sweep
from .executor_config import ExecutorConfig, Resources
from .io import FolderLockedError, atomic_write_json, folder_lock, read_json, sha256_json

__all__ = [
    "ACTIVE_SLURM_STATES",
    "ASSEMBLY_DIR",
    "JOBS_DIR",
    "JOB_FILE",
    "Cell",
    "CellFailed",
    "CellJob",
    "ExecutorError",
    "JobGroup",
    "cell_states",
    "dispatch",
    "group_jobs",
    "job_table",
    "plan_cells",
    "run_local",
    "slurm_states",
    "submit_slurm",
]

JOB_FILE = sweep.JOB_FILE  # in a cell's folder: the job that runs or ran it
JOBS_DIR = "_jobs"  # in the sweep folder: submitit's pickles and the jobs' logs
ACTIVE_SLURM_STATES = {
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


# ----------------------------------------------------------------------------- Slurm


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
        if record and states[record["job_id"]] in ACTIVE_SLURM_STATES:
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


# ----------------------------------------------------------------------------- local processes


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


# ----------------------------------------------------------------------------- status


def _job_state(record: dict[str, Any], slurm: dict[str, str]) -> str:
    """A recorded job's state: Slurm's, or ``RUNNING`` for a local job whose process is alive."""
    if record.get("executor") == "slurm":
        return slurm.get(record.get("job_id", ""), "")
    if record.get("executor") == "local" and str(record.get("job_id", "")).isdigit():
        try:
            os.kill(int(record["job_id"]), 0)
        except OSError:
            return ""
        return "RUNNING"
    return ""


def cell_states(runs: list[sweep.Run], root: Path) -> pd.DataFrame:
    """Each cell's status from its marker, its job and its inputs: ``done``, ``queued``/``running``
    (Slurm), ``failed`` (with the error or the job's final state), ``blocked`` (an input failed) or
    ``not submitted``; with the job id and the log of the job that ran it."""
    records = {run.id: _read_record(root / run.out_dir) for run in runs}
    slurm = slurm_states([r["job_id"] for r in records.values() if r.get("executor") == "slurm"])
    complete = sweep.complete_runs(runs, root)
    states: dict[str, str] = {}
    rows = []
    for run in runs:
        record = records[run.id]
        failed_inputs = [dep for dep in run.depends if states.get(dep) in ("failed", "blocked")]
        job_state = _job_state(record, slurm)
        if run.id in complete:
            state, message = "done", ""
        elif failed_inputs:
            state, message = "blocked", f"needs {failed_inputs[0]}"
        elif job_state in ACTIVE_SLURM_STATES:
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


# ----------------------------------------------------------------------------- entry point


def dispatch(
    config_path: str | os.PathLike,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    wait: bool = False,
    progress: bool = True,
    runner: Callable[[str, dict, Path], Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Run a sweep file on the executor its ``executor:`` block (or ``executor``) names; returns the
    status table and, once every cell is finished, the gathered results tables."""
    config = sweep.load_config(config_path)
    settings = sweep.executor_settings(config, Path(config_path).name).with_type(executor)
    if settings.type == "inline":
        return sweep.run_sweep(config_path, dry_run=dry_run, progress=progress, runner=runner)
    if settings.type == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ExecutorError("--executor slurm: sbatch is not on PATH; run this on the cluster's login node")
    runs, root = sweep.expand(config), sweep.sweep_dir(config["name"])
    cells = plan_cells(runs, root, settings)
    if dry_run:
        return job_table(group_jobs(cells)), {}
    root.mkdir(parents=True, exist_ok=True)
    with sweep.sweep_lock(root):
        if settings.type == "local":
            status = _with_finished(runs, run_local(cells, root, settings, runner, progress))
        else:
            submitted = submit_slurm(cells, root, settings, config["name"], runner)
            status = _wait_for_slurm(runs, root) if wait else _submitted_states(runs, root, submitted)
        status.to_csv(root / sweep.RUNS_FILE, index=False)
        unfinished = status.status.isin(["submitted", "queued", "running"]).any()
        return status, ({} if unfinished else sweep.gather(config, runs, root))


def _with_finished(runs: list[sweep.Run], ran: pd.DataFrame) -> pd.DataFrame:
    """The inline runner's status table: the cells that ran here, and ``done earlier`` for the rest."""
    by_run = ran.set_index("run")
    rows = [
        by_run.loc[run.id].to_dict() | {"run": run.id}
        if run.id in by_run.index
        else {"run": run.id, "notebook": run.notebook, "status": "done earlier", "message": ""}
        for run in runs
    ]
    return pd.DataFrame(rows, columns=["run", "notebook", "status", "message"])


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
