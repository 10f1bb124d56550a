"""Experiment grids: a YAML config → papermill runs of notebooks 01–05, resumable, gathered into tables.

``python -m vlmsae_utils.run --config configs/fixture.yaml [--dry-run]`` expands models × layers ×
SAE types × expansions × scorers into notebook runs, skips runs whose outputs are complete,
runs the rest in dependency order (extract → train → score → hierarchy / steer), keeps each
executed notebook and log beside its outputs, and writes ``results/<name>/*.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import columns, kernels
from .data import ImageFolderDataset
from .io import LOCK_FILE, FolderLockedError, atomic_write_json, folder_lock, read_json, remove_entry, sha256_json
from .paths import outputs_root, results_root
from .sae.base import WEIGHTS_FILE
from .stages import GatherContext, result_tables, stage
from .store import image_list_changed, images_changed
from .store_format import MANIFEST_FILE, PLAN_FILE
from .sweep_config import (
    EXECUTION_ONLY,
    RESULTS_NOTEBOOK,
    RUNS_FILE,
    SWEEP_RELATIVE_PATHS,
    ConfigError,
    load_config,
    slug,
)
from .sweep_plan import Run, expand
from .sweep_schema import SweepConfig

__all__ = [
    "DONE_FILE",
    "EXECUTION_ONLY",
    "JOB_FILE",
    "KEPT_ON_REDO",
    "LOCK_FILE",
    "RESULTS_NOTEBOOK",
    "RUNS_FILE",
    "STARTED_FILE",
    "ConfigError",
    "Run",
    "SweepConfig",
    "SweepLockedError",
    "SweepResults",
    "complete_runs",
    "ensure_fixture_results",
    "execute",
    "execute_results_chapter",
    "execute_run",
    "expand",
    "gather",
    "is_complete",
    "load_config",
    "load_results",
    "notebook_runner",
    "resolved_parameters",
    "run_sweep",
    "slug",
    "start_run",
    "sweep_dir",
    "sweep_lock",
]

DONE_FILE = "_sweep_run.json"
STARTED_FILE = "_sweep_started.json"  # written when a run starts: which parameters and inputs it is making
JOB_FILE = "_job.json"  # written by the executor: the job that runs the cell
#: What a run folder keeps when its outputs are cleared for a redo: the lock, the job record and its logs.
KEPT_ON_REDO = (LOCK_FILE, JOB_FILE, "job.out", "job.err")
log = logging.getLogger(__name__)


class SweepLockedError(FolderLockedError):
    """Another process is running the same sweep."""


# ----------------------------------------------------------------------------- execution


def sweep_dir(name: str) -> Path:
    """Folder of a sweep's runs under the outputs root."""
    return outputs_root() / "sweeps" / name


def is_complete(run: Run, root: Path) -> bool:
    """Finished with the same parameters, its key outputs still there and, for a stage that reads
    images, its store still describing the image folder (no image added, removed or replaced)."""
    folder = root / run.out_dir
    marker = folder / DONE_FILE
    if not marker.is_file() or read_json(marker).get("fingerprint") != _fingerprint(run, root):
        return False
    if not all((folder / name).exists() for name in stage(run.kind).outputs) or _saes_missing(run, folder):
        return False
    reason = stale_images(run, root)
    if reason:
        log.warning("%s: %s; it runs again", run.id, reason)
    return not reason


def _saes_missing(run: Run, folder: Path) -> list[str]:
    """The SAE folders a finished training run's ``results.csv`` lists whose weights are gone."""
    if run.kind != "train":
        return []
    with open(folder / "results.csv", newline="") as table:
        listed = [row["path"] for row in csv.DictReader(table) if row.get("path")]
    missing = [Path(path).name for path in listed if not (folder / Path(path).name / WEIGHTS_FILE).is_file()]
    if missing:
        log.warning("%s: the weights of %s are gone; it runs again", run.id, missing[:3])
    return missing


def _image_store(run: Run, root: Path) -> Path | None:
    """The store an image stage wrote (``None`` for other stages, or before its plan exists)."""
    store = root / run.out_dir / "activations"
    return store if stage(run.kind).reads_images and (store / PLAN_FILE).is_file() else None


def _listed_images(run: Run, root: Path) -> ImageFolderDataset | str:
    """The image folder an image stage reads, listed now, or why it cannot be listed."""
    from .extract import open_dataset

    params = resolved_parameters(run, root)
    try:
        return open_dataset(params["data_dir"], params.get("split"))
    except (FileNotFoundError, ValueError) as err:
        return f"its images cannot be listed ({err})"


def stale_images(run: Run, root: Path) -> str:
    """Why an image stage's store no longer matches its image folder ("" when it does, and for
    other stages): the check a rerun of the extraction makes before it reuses a shard."""
    store = _image_store(run, root)
    if store is None:
        return ""
    dataset = _listed_images(run, root)
    return dataset if isinstance(dataset, str) else images_changed(store, dataset.image_ids, dataset.stamps)


def _image_list_changed(run: Run, root: Path) -> bool:
    """An image stage whose folder gained or lost images: its store is planned anew, not resumed."""
    store = _image_store(run, root)
    dataset = _listed_images(run, root) if store is not None else ""
    return store is not None and not isinstance(dataset, str) and bool(image_list_changed(store, dataset.image_ids))


def _made_content(run: Run, root: Path) -> str:
    """What a finished image stage made, as the stages after it see it: its store's content hash
    (so a re-extraction of replaced images makes every later stage stale); "" for other stages."""
    store = _image_store(run, root)
    manifest = store / MANIFEST_FILE if store is not None else None
    return str(read_json(manifest).get("content_hash", "")) if manifest is not None and manifest.is_file() else ""


def complete_runs(runs: list[Run], root: Path) -> set[str]:
    """Runs complete *with complete inputs* (``runs`` in dependency order). A run whose input was
    re-run with new parameters but not finished (killed, failed) still matches the old input's
    marker; it must not be gathered beside the half-redone input's new files."""
    done: set[str] = set()
    for run in runs:
        if all(dep in done for dep in run.depends) and is_complete(run, root):
            done.add(run.id)
    return done


def _fingerprint(run: Run, root: Path) -> str:
    """What determines a run's outputs: notebook, resolved parameters and the fingerprints its
    inputs were made with (chained: a redone training run makes its score run stale)."""
    params = {k: v for k, v in resolved_parameters(run, root).items() if k not in EXECUTION_ONLY}
    inputs = {dep: _marker_fingerprint(root / dep) for dep in run.depends}
    return sha256_json({"notebook": run.notebook, "parameters": params, "inputs": inputs})


def _marker_fingerprint(folder: Path) -> str:
    """The fingerprint a finished run recorded, with the content it made where it recorded one
    ("" for a run not finished). Markers without content (written before it was recorded, or by
    stages other than extraction) give their fingerprint alone, so finished sweeps stay finished."""
    marker = folder / DONE_FILE
    if not marker.is_file():
        return ""
    recorded = read_json(marker)
    fingerprint, content = str(recorded.get("fingerprint", "")), recorded.get("content")
    return sha256_json([fingerprint, content]) if content else fingerprint


def resolved_parameters(run: Run, root: Path) -> dict[str, Any]:
    """Parameters with sweep-relative store and SAE paths made absolute, and the run's own out_dir."""
    params = dict(run.parameters)
    for key in SWEEP_RELATIVE_PATHS:
        if params.get(key):
            params[key] = str(root / params[key])
    if "sae_paths" in params:
        params["sae_paths"] = [str(root / p) for p in params["sae_paths"]]
    params["out_dir"] = str(root / run.out_dir)
    return params


def notebook_runner(notebook: str, params: dict[str, Any], out: Path) -> Path:
    """How a cell runs by default: its notebook through papermill, executed copy and log in ``out``."""
    from .runner import run_notebook

    return run_notebook(notebook, params, out)


def execute(
    runs: list[Run],
    root: Path,
    *,
    dry_run: bool = False,
    progress: bool = True,
    runner: Callable[[str, dict, Path], Any] | None = None,
) -> pd.DataFrame:
    """Run what is not complete, in order; a failure blocks only the runs that depend on it."""
    from tqdm.auto import tqdm

    status: dict[str, str] = {}
    rows = []
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress or dry_run)
    with bar, kernels.warm_kernels():  # each cell's kernel starts while the previous cell runs
        for run in runs:
            blocked = [d for d in run.depends if status.get(d) in ("failed", "blocked")]
            if blocked:
                state, message = "blocked", f"needs {blocked[0]}"
            elif dry_run and any(status.get(d) == "would run" for d in run.depends):
                state, message = "would run", "an input is redone"
            elif is_complete(run, root):
                state, message = "done earlier", ""
            elif dry_run:
                state, message = "would run", ""
            else:
                state, message = execute_run(run, root, runner)
            status[run.id] = state
            rows.append({"run": run.id, "notebook": run.notebook, "status": state, "message": message})
            bar.set_postfix_str(run.id[-40:])
            bar.update()
    return pd.DataFrame(rows)


def execute_run(run: Run, root: Path, runner: Callable[[str, dict, Path], Any] | None = None) -> tuple[str, str]:
    """One cell, its folder locked: runs the notebook and marks it complete (``"ran"``), or returns
    ``("failed", first line of the error)``. A second process on the same cell fails, naming the holder."""
    from .runner import NotebookError

    folder = root / run.out_dir
    try:
        with folder_lock(folder, "run folder"):
            start_run(run, root)
            (runner or notebook_runner)(run.notebook, resolved_parameters(run, root), folder)
            _mark_complete(run, root)
    except (NotebookError, FolderLockedError, ValueError, FileNotFoundError) as err:
        return "failed", str(err).splitlines()[0]
    return "ran", ""


def start_run(run: Run, root: Path) -> None:
    """Before a run: outputs left by a run with other parameters or inputs (finished, or killed
    half-way) are cleared, so the notebook starts afresh instead of refusing (or resuming) them;
    outputs of an interrupted run with the same ones are kept, so it resumes."""
    folder, fingerprint = root / run.out_dir, _fingerprint(run, root)
    markers = [folder / name for name in (DONE_FILE, STARTED_FILE)]
    recorded = [read_json(marker).get("fingerprint") for marker in markers if marker.is_file()]
    if any(value != fingerprint for value in recorded) or _image_list_changed(run, root):
        log.warning("%s was made with other parameters, inputs or images: clearing it to run again", run.id)
        for child in folder.iterdir():
            if child.name not in KEPT_ON_REDO:
                remove_entry(child)
    atomic_write_json(folder / STARTED_FILE, {"fingerprint": fingerprint})


def _mark_complete(run: Run, root: Path) -> None:
    """The marker that makes a run complete: its fingerprint (chained to its inputs'), parameters,
    labels and, for an image stage, the content hash of the store it made."""
    marker = {
        "fingerprint": _fingerprint(run, root),
        "notebook": run.notebook,
        "parameters": resolved_parameters(run, root),
        "labels": run.labels,
    }
    content = _made_content(run, root)
    atomic_write_json(root / run.out_dir / DONE_FILE, marker | ({"content": content} if content else {}))


# ----------------------------------------------------------------------------- results


def gather(config: SweepConfig, runs: list[Run], root: Path) -> dict[str, pd.DataFrame]:
    """Collect the finished runs' tables into ``results/<name>/<table>.csv``: each stage's ``gather``
    (:mod:`.stages`) turns a finished run into rows of its tables."""
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in result_tables()}
    complete = complete_runs(runs, root)
    for run in runs:
        collect = stage(run.kind).gather
        if run.id not in complete or collect is None:
            continue
        for name, frame in collect(GatherContext(run, root / run.out_dir, runs, root)).items():
            tables.setdefault(name, []).append(frame)
    out = results_root() / config.name
    out.mkdir(parents=True, exist_ok=True)
    gathered = {}
    for name, frames in tables.items():
        if frames:
            gathered[name] = pd.concat(frames, ignore_index=True)
            gathered[name].to_csv(out / f"{name}.csv", index=False)
        else:
            (out / f"{name}.csv").unlink(missing_ok=True)  # no stale table from an earlier config
    return gathered


def run_sweep(
    config_path: str | os.PathLike,
    *,
    dry_run: bool = False,
    progress: bool = True,
    runner: Callable[[str, dict, Path], Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Load, expand, execute and gather a sweep; returns the status table and the results tables."""
    config = load_config(config_path)
    runs = expand(config)
    root = sweep_dir(config.name)
    if dry_run:
        return execute(runs, root, dry_run=True, progress=progress, runner=runner), {}
    root.mkdir(parents=True, exist_ok=True)
    with sweep_lock(root):
        status = execute(runs, root, progress=progress, runner=runner)
        status.to_csv(root / RUNS_FILE, index=False)  # the run order and states, for a book of this sweep
        return status, gather(config, runs, root)


@contextlib.contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """Hold the sweep folder for one process at a time (released when the process dies); a second
    run of the same sweep gets ``SweepLockedError`` naming the holder."""
    with folder_lock(root, "sweep folder", SweepLockedError):
        yield


def execute_results_chapter(name: str) -> Path:
    """Chapter 6 executed on ``results/<name>/`` into the sweep's folder (``results/06_results.ipynb``),
    so a book of the sweep shows its own tables without executing anything at build time."""
    from .runner import run_notebook

    return run_notebook(RESULTS_NOTEBOOK, {"results_dir": str(results_root() / name)}, sweep_dir(name) / "results")


@dataclass
class SweepResults:
    """The gathered tables of one sweep, filtered to one scorer (what chapter 6 draws)."""

    folder: Path
    scorer: str
    sae: pd.DataFrame  # one row per SAE (layer as text)
    raw: pd.DataFrame  # one row per model and layer: the raw neurons' MS
    tables: dict[str, pd.DataFrame]  # every results table by name (sae, raw, hierarchy, steering)

    def describe(self) -> str:
        """One line: which sweep (by folder name, never a machine path), how many runs, which tables."""
        return (
            f"sweep {self.folder.name}: {len(self.sae)} SAE runs, scorer {self.scorer}; "
            f"tables: {', '.join(self.tables)}"
        )


def load_results(folder: str | os.PathLike, scorer: str = "") -> SweepResults:
    """Read ``results/<name>/*.csv`` written by `gather`; ``scorer`` empty means the first in the tables."""
    folder = Path(folder)
    tables = {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}
    for name, written_from in (("raw", "ms_summary"), ("hierarchy", "levels")):  # gathered before one spelling
        if name in tables:
            tables[name] = columns.with_current_names(tables[name], written_from)
    if "sae" not in tables:
        raise FileNotFoundError(
            f"{folder} has no sae.csv: run the sweep first (python -m vlmsae_utils.run --config ...)"
        )
    scorers = tables["sae"].scorer.unique().tolist()
    scorer = scorer or scorers[0]
    if scorer not in scorers:
        raise ValueError(f"scorer {scorer!r} is not in {folder / 'sae.csv'}; it has {', '.join(scorers)}")
    sae = tables["sae"][lambda d: d.scorer == scorer].assign(layer=lambda d: d.layer.astype(str))
    raw = tables["raw"][lambda d: d.scorer == scorer].assign(layer=lambda d: d.layer.astype(str))
    return SweepResults(folder, scorer, sae, raw, tables)


def ensure_fixture_results(config_path: str | os.PathLike | None = None) -> Path:
    """The fixture sweep's results folder, brought up to date first: finished runs with the same
    parameters are skipped, so this costs seconds once the sweep has run (and never shows tables
    left over from an older config); while another process runs the sweep, this waits for it."""
    from .paths import repo_root

    path = Path(config_path) if config_path else (repo_root() or Path.cwd()) / "configs" / "fixture.yaml"
    try:
        status, _ = run_sweep(path, progress=False)
    except SweepLockedError:  # another process runs it (make demo runs it beside the chapters): wait for it
        with folder_lock(sweep_dir(load_config(path).name), "sweep folder", blocking=True):
            pass
        status, _ = run_sweep(path, progress=False)
    failed = status[status.status.isin(["failed", "blocked"])]
    if len(failed):
        raise RuntimeError(f"fixture sweep failed: {failed.iloc[0].run}: {failed.iloc[0].message}")
    return results_root() / load_config(path).name
