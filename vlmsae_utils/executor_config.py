"""Where a sweep's cells run: the ``executor:`` block of a sweep file, validated into one frozen object.

A sweep file may carry, beside what it computes, how to dispatch it (:mod:`.executor`)::

    executor:
      type: slurm            # inline (one process), local (subprocess jobs) or slurm
      partition: gpu
      account: my-lab
      gpus_per_node: 1       # GPUs of each job: a cell's notebook uses one device (extraction: see tasks)
      cpus_per_task: 8       # also the image decoders of an extraction
      mem_gb: 64
      timeout_min: 240
      array_parallelism: 32  # tasks of one job array running at once (local: jobs at once)
      max_requeue: 3         # requeues after a timeout or a preemption
      sbatch: {qos: normal}  # any other sbatch option, written as --qos=normal
      resources:             # per kind of cell, overriding the values above
        train: {timeout_min: 1440}
        extract: {tasks: 4, gpus: 4}   # one extraction shared by 4 processes, one GPU each

None of it is part of a run's fingerprint: a sweep finished inline is not redone on Slurm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .stages import cell_kinds, stage

__all__ = [
    "EXECUTORS",
    "EXECUTOR_KEYS",
    "RESOURCE_KEYS",
    "ExecutorConfig",
    "Resources",
    "add_executor_name",
    "parse_executor",
    "remove_executor_name",
]

#: The executors a sweep file or ``--executor`` may name (live: :func:`vlmsae_utils.executor.register_executor`
#: adds one). The built-ins are listed here so a sweep file is checked without importing the job machinery.
EXECUTORS: list[str] = ["inline", "local", "slurm"]


def add_executor_name(name: str) -> None:
    """Accept ``name`` as an executor (called by ``register_executor``)."""
    if name not in EXECUTORS:
        EXECUTORS.append(name)


def remove_executor_name(name: str) -> None:
    """Stop accepting ``name`` (called by ``unregister_executor``)."""
    if name in EXECUTORS:
        EXECUTORS.remove(name)


#: An ``sbatch:`` option name (``qos``, ``mail-type``, ``gres``) and a value written into a job script.
SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SCRIPT_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/|&!*()\[\]-]+")  # constraints use | & ! * ( ) [ ]
RESOURCE_KEYS = ("gpus", "cpus", "mem_gb", "timeout_min", "tasks")


@dataclass(frozen=True)
class Resources:
    """What one job asks for."""

    gpus: int = 1
    cpus: int = 8
    mem_gb: float = 64.0
    timeout_min: int = 240
    tasks: int = 1  # processes sharing one extraction (one GPU each when gpus > 0)

    def describe(self) -> str:
        """``1 GPU, 8 CPUs, 64 GB, 4:00 h``: one cell of a dry-run table (``2 × …`` for two tasks)."""
        hours, minutes = divmod(self.timeout_min, 60)
        each = f"{self.gpus} GPU, {self.cpus} CPUs, {self.mem_gb:g} GB, {hours}:{minutes:02d} h"
        return each if self.tasks == 1 else f"{self.tasks} tasks: {each}"


@dataclass(frozen=True)
class ExecutorConfig:
    """The validated ``executor:`` block; ``resources_for(kind)`` gives a cell's job resources."""

    type: str = "inline"
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float = 64.0
    timeout_min: int = 240
    array_parallelism: int = 32
    max_requeue: int = 3
    sbatch: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resources_for(self, kind: str) -> Resources:
        """The block's defaults with the kind's own overrides applied."""
        base = Resources(self.gpus_per_node, self.cpus_per_task, float(self.mem_gb), self.timeout_min)
        return replace(base, **self.resources.get(kind, {}))

    def with_type(self, executor: str | None) -> ExecutorConfig:
        """The same block with another executor (the command line's ``--executor`` wins)."""
        if executor is None:
            return self
        if executor not in EXECUTORS:
            raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
        return replace(self, type=executor)


EXECUTOR_KEYS = {f.name: f for f in fields(ExecutorConfig)}


def _check_number(value: Any, where: str, *, minimum: float, integer: bool) -> None:
    """An int (or, where allowed, a float) no smaller than ``minimum``; booleans are not numbers."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{where}: expected {what} >= {minimum:g}, got {value!r}")


def _check_resources(kind: str, overrides: Any, where: str) -> dict[str, Any]:
    """One kind's overrides: known keys, sensible numbers."""
    if kind not in cell_kinds():
        raise ValueError(f"{where}: unknown kind of cell {kind!r}; valid: {', '.join(cell_kinds())}")
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}.{kind}: expected a mapping of {', '.join(RESOURCE_KEYS)}, got {overrides!r}")
    unknown = sorted(set(overrides) - set(RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}.{kind}: unknown key(s) {unknown}; valid: {list(RESOURCE_KEYS)}")
    for key, value in overrides.items():
        minimum = 0 if key == "gpus" else 1
        _check_number(value, f"{where}.{kind}.{key}", minimum=minimum, integer=key != "mem_gb")
    return dict(overrides)


def _check_usable(config: ExecutorConfig, device: str, where: str) -> None:
    """Refuse resources a cell cannot use: a notebook runs on one device, so only an extraction may
    use several GPUs (as that many tasks, one GPU each); a sweep pinned to CUDA needs a GPU per task."""
    for kind in cell_kinds():
        res, own = config.resources_for(kind), config.resources.get(kind, {})
        gpus_key = f"{where}.resources.{kind}.gpus" if "gpus" in own else f"{where}.gpus_per_node"
        splits = stage(kind).splits_over_tasks  # cells whose work several processes of one job can share
        if res.tasks > 1 and not splits:
            raise ValueError(f"{where}.resources.{kind}.tasks: only extraction cells split over tasks, got {res.tasks}")
        if res.gpus > 1 and res.gpus != res.tasks:
            hint = f"set resources.{kind}.tasks: {res.gpus}" if splits else "ask for 1"
            raise ValueError(
                f"{gpus_key}: {res.gpus} GPUs, but {kind} cells run one process per GPU, here {res.tasks} "
                f"task(s); {hint} (the grid's cells also run side by side: array_parallelism)"
            )
        if res.gpus == 1 and res.tasks > 1:
            raise ValueError(f"{gpus_key}: {res.tasks} tasks need {res.tasks} GPUs (one each) or 0 (CPU)")
        if res.gpus == 0 and device.startswith("cuda"):
            raise ValueError(f"{gpus_key}: 0 GPUs for {kind} cells, but the sweep's device is {device!r}")


def _check_script_value(value: Any, where: str) -> None:
    """A value written into the generated job script: one plain token (text or a number), so a
    shared sweep file cannot end the ``#SBATCH`` lines or add a shell command with a newline."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: expected text or a number, got {value!r}")
    if not SCRIPT_VALUE.fullmatch(str(value)):
        raise ValueError(
            f"{where}: {value!r} is not allowed in a job script (one token: no spaces, newlines or other "
            "control characters, quotes, '#', ';', '$' or '`')"
        )


def parse_executor(section: Any, where: str = "executor", *, device: str = "auto") -> ExecutorConfig:
    """Validate an ``executor:`` block (``None`` = inline defaults); errors name the key.

    ``device`` is the sweep's device, to refuse jobs without a GPU for a sweep pinned to CUDA.
    """
    if section is None:
        return ExecutorConfig()
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(EXECUTOR_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(EXECUTOR_KEYS)}")
    values = dict(section)
    if values.get("type", "inline") not in EXECUTORS:
        raise ValueError(f"{where}.type: {values['type']!r} is not one of {', '.join(EXECUTORS)}")
    for key in ("partition", "account"):
        if values.get(key) is not None:
            _check_script_value(values[key], f"{where}.{key}")
    for key in ("gpus_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "max_requeue"):
        if key in values:
            minimum = 0 if key in ("gpus_per_node", "max_requeue") else 1
            _check_number(values[key], f"{where}.{key}", minimum=minimum, integer=True)
    if "mem_gb" in values:
        _check_number(values["mem_gb"], f"{where}.mem_gb", minimum=1, integer=False)
    sbatch = values.get("sbatch") or {}
    if not isinstance(sbatch, dict):
        raise ValueError(f"{where}.sbatch: expected a mapping of sbatch options, got {sbatch!r}")
    for key, value in sbatch.items():
        if not isinstance(key, str) or not SBATCH_OPTION.fullmatch(key):
            raise ValueError(f"{where}.sbatch: {key!r} is not an sbatch option name (letters, digits, '-', '_')")
        _check_script_value(value, f"{where}.sbatch.{key}")
    values["sbatch"] = dict(sbatch)
    resources = values.get("resources") or {}
    if not isinstance(resources, dict):
        raise ValueError(f"{where}.resources: expected a mapping of kinds, got {resources!r}")
    values["resources"] = {
        kind: _check_resources(kind, overrides, f"{where}.resources") for kind, overrides in resources.items()
    }
    config = ExecutorConfig(**values)
    _check_usable(config, device, where)
    return config
