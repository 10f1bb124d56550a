"""The stage contract: one declaration per kind of sweep cell, read by the sweep, its executors and
gather — its notebook, the files a finished run leaves, whether it reads the image folder, whether
one job's tasks may share it, how its results become tables, and (for a stage added from outside the
package) how a sweep plans its runs.

The built-in stages are the paper's: extraction and scorer embeddings (chapter 1), training
(chapter 2), MS scoring (chapter 3), the hierarchy (chapter 4) and steering (chapter 5). A new
metric or chapter registers a :class:`Stage` (CONTRIBUTING, "A new stage"); nothing else in the
package changes. This module imports no heavy library, so configuration checks can read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import columns

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LEVELS_FILE",
    "MS_SUMMARY_FILE",
    "STAGES",
    "STEERING_SCORES_FILE",
    "TRAIN_RESULTS_FILE",
    "GatherContext",
    "Stage",
    "book_rank",
    "cell_kinds",
    "chapter_of",
    "register_stage",
    "result_tables",
    "stage",
    "stages_of_notebook",
    "unregister_stage",
]

#: What each built-in stage leaves in its run folder (the modules that write them import these).
STORE_MANIFEST = "activations/manifest.json"
TRAIN_RESULTS_FILE = "results.csv"
MS_SUMMARY_FILE = "ms_summary.csv"  # one row per set of neurons
LEVELS_FILE = "levels.csv"  # one row per Matryoshka level
STEERING_SCORES_FILE = "steering_scores.csv"  # the Table 3 rows


@dataclass
class GatherContext:
    """What gathering one finished run may read: the run (a ``sweep_plan.Run``), its folder, every
    run of the sweep (e.g. the training runs a score run's SAEs come from) and the sweep folder."""

    run: Any
    folder: Path
    runs: list[Any]
    root: Path


@dataclass(frozen=True)
class Stage:
    """One kind of sweep cell."""

    kind: str  # the cell's name in run ids, ``--status`` and an ``executor: resources:`` block
    notebook: str  # the chapter: its number (``"03"``) or a path to an ``NN_name.md`` notebook outside the book
    outputs: tuple[str, ...]  # files a finished run leaves (relative to its folder): "finished" needs them all
    reads_images: bool = False  # reads the image folder and writes a store from it (stale when images change)
    splits_over_tasks: bool = False  # several processes of one job may share one cell (extraction)
    tables: tuple[str, ...] = ()  # result tables its runs add to (``results/<sweep>/<table>.csv``)
    gather: Callable[[GatherContext], dict[str, pd.DataFrame]] | None = None  # a finished run → rows per table
    plan: Callable[[Any, list[Any]], list[Any]] | None = None  # (SweepConfig, runs so far) → extra runs (added stages)
    #: Among one chapter's runs, a sweep's book shows the lowest rank first (embeddings rank after
    #: a model's extraction, both notebook 01); ties keep the sweep's order.
    book_rank: int = 0


#: Every stage by kind, in registration order (the built-ins first).
STAGES: dict[str, Stage] = {}


def register_stage(new: Stage) -> Stage:
    """Add a stage (or replace one of the same kind); returns it."""
    if not new.kind.isidentifier():
        raise ValueError(f"a stage's kind must be a plain name, got {new.kind!r}")
    if set(new.tables) and new.gather is None:
        raise ValueError(f"stage {new.kind!r} names result tables {new.tables} but has no gather function")
    if not re.fullmatch(r"\d\d", chapter_of(new.notebook)):
        raise ValueError(
            f"stage {new.kind!r}: its notebook must be a chapter number or an NN_name.md file, got {new.notebook!r}"
        )
    STAGES[new.kind] = new
    return new


def book_rank(run_id: str) -> int:
    """The rank of a run's stage among one chapter's runs in a sweep's book (a run id starts with
    its stage's kind; a page that is no stage's, such as the results chapter, ranks 0)."""
    declared = STAGES.get(run_id.split("/")[0])
    return declared.book_rank if declared is not None else 0


def unregister_stage(kind: str) -> None:
    """Remove a registered stage (tests); the built-ins can be removed too, so take care."""
    STAGES.pop(kind, None)


def stage(kind: str) -> Stage:
    """The stage of a kind of cell, or an error listing the known ones."""
    if kind not in STAGES:
        raise ValueError(f"unknown kind of cell {kind!r}; valid: {', '.join(STAGES)}")
    return STAGES[kind]


def cell_kinds() -> tuple[str, ...]:
    """The kinds of cell a sweep may hold (what an ``executor: resources:`` block may name)."""
    return tuple(STAGES)


def stages_of_notebook(notebook: str) -> list[Stage]:
    """The stages whose runs execute ``notebook``."""
    return [s for s in STAGES.values() if s.notebook == notebook]


def chapter_of(notebook: str) -> str:
    """The chapter number of a stage's notebook: ``"03"`` as it is, ``…/08_norms.md`` → ``"08"``."""
    return Path(notebook).name.split("_")[0]


def result_tables() -> list[str]:
    """Every result table some stage writes, in stage order."""
    return list(dict.fromkeys(t for s in STAGES.values() for t in s.tables))


# ----------------------------------------------------------------------------- the built-in stages


def _gather_score(ctx: GatherContext) -> dict[str, pd.DataFrame]:
    """MS of each SAE beside its training metrics (``sae``), and the raw neurons' MS (``raw``)."""
    import pandas as pd

    summary = columns.with_current_names(pd.read_csv(ctx.folder / MS_SUMMARY_FILE), "ms_summary")
    raw = summary[summary[columns.NEURONS].str.startswith("raw")]
    labels = ctx.run.labels
    return {
        "sae": _score_rows(ctx, summary.set_index(columns.NEURONS)),
        "raw": raw.assign(model=labels["model"], layer=str(labels["layer"]), scorer=labels["scorer"]),
    }


def _r2_columns(trained: Any) -> dict[str, float]:
    """The paper's per-batch "R² %" and the "global R² %" of a training run's results row; a row
    written before the two were separated (global "R² %", shuffled "R² batch-mean %") is relabelled."""
    if "R² batch-mean %" in trained:
        return {columns.R2: trained["R² batch-mean %"], columns.GLOBAL_R2: trained[columns.R2]}
    return {columns.R2: trained[columns.R2], columns.GLOBAL_R2: trained[columns.GLOBAL_R2]}


def _score_rows(ctx: GatherContext, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per SAE of a score run: its training metrics next to its MS (``summary`` by neuron set)."""
    import pandas as pd

    by_sae_dir = {r.labels["sae_dir"]: r for r in ctx.runs if r.kind == "train"}
    labels, rows = ctx.run.labels, []
    for sae_dir in ctx.run.parameters["sae_paths"]:
        trained = pd.read_csv(ctx.root / by_sae_dir[sae_dir].out_dir / TRAIN_RESULTS_FILE).iloc[0]
        ms = summary.loc[Path(sae_dir).name]
        rows.append(
            {
                "model": labels["model"],
                "layer": str(labels["layer"]),
                "scorer": labels["scorer"],
                "SAE": trained["SAE"],
                "expansion": trained["expansion"],
                columns.K: trained["k"],
                "latents": trained["latents"],
                **_r2_columns(trained),
                columns.L0: trained[columns.L0],
                columns.DEAD_PERCENT: trained[columns.DEAD_PERCENT],
                columns.MS_MEAN: ms[columns.MS_MEAN],
                columns.MS_STD: ms[columns.MS_STD],
                columns.MS_MAX: ms[columns.MS_MAX],
                "dead latents (MS)": ms["dead"],
            }
        )
    return pd.DataFrame(rows)


def _gather_levels(ctx: GatherContext) -> dict[str, pd.DataFrame]:
    """The hierarchy's per-level table, labelled with the model and layer."""
    import pandas as pd

    levels = columns.with_current_names(pd.read_csv(ctx.folder / LEVELS_FILE), "levels")
    return {"hierarchy": levels.assign(model=ctx.run.labels["model"], layer=str(ctx.run.labels["layer"]))}


def _gather_steering(ctx: GatherContext) -> dict[str, pd.DataFrame]:
    """The steering scores (Table 3 rows), labelled with the run's labels."""
    import pandas as pd

    return {"steering": pd.read_csv(ctx.folder / STEERING_SCORES_FILE).assign(**ctx.run.labels)}


for _stage in (
    Stage("extract", "01", (STORE_MANIFEST,), reads_images=True, splits_over_tasks=True),
    Stage("embed", "01", (STORE_MANIFEST,), reads_images=True, splits_over_tasks=True, book_rank=1),
    Stage("train", "02", (TRAIN_RESULTS_FILE,)),
    Stage("score", "03", (MS_SUMMARY_FILE,), tables=("sae", "raw"), gather=_gather_score),
    Stage("hierarchy", "04", (LEVELS_FILE,), tables=("hierarchy",), gather=_gather_levels),
    Stage("steer", "05", (STEERING_SCORES_FILE,), tables=("steering",), gather=_gather_steering),
):
    register_stage(_stage)
