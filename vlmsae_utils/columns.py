"""The results tables' column names, one spelling each, shared by the code that writes the tables
and the plots and notebooks that read them; :func:`with_current_names` reads tables written
before the spellings were unified (finished sweeps are gathered again, never redone for a name)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEAD_PERCENT",
    "GLOBAL_R2",
    "L0",
    "MS_MAX",
    "MS_MEAN",
    "MS_MIN",
    "MS_STD",
    "NEURONS",
    "NEURON_COUNT",
    "R2",
    "K",
    "with_current_names",
]

NEURONS = "neurons"  # which set of neurons a row of an MS summary scores (raw:…, an SAE's name)
NEURON_COUNT = "neuron count"  # how many neurons that set has (a layer's width, an SAE's latents)
K = "K"  # the SAE's sparsity: active latents per input (never a count of neurons or of top images)
MS_MEAN = "MS mean"
MS_STD = "MS std"
MS_MAX = "MS max"
MS_MIN = "MS min"
R2 = "R² %"  # the paper's per-batch R² (Section 4.1)
GLOBAL_R2 = "global R² %"  # 1 − FVU over the whole validation set
L0 = "L0"
DEAD_PERCENT = "dead %"

#: Spellings earlier versions wrote, by the table that wrote them: ``ms_summary.csv`` ("K" was its
#: neuron count) and ``levels.csv``.
_OLD_NAMES = {
    "ms_summary": {"K": NEURON_COUNT, "best MS": MS_MAX, "mean MS": MS_MEAN, "std": MS_STD},
    "levels": {"MS avg": MS_MEAN},
}


def with_current_names(table: Any, kind: str) -> Any:
    """``table`` (a DataFrame read from a ``kind`` file: ``ms_summary`` or ``levels``) with the
    columns an earlier version spelled otherwise renamed; a table already current is unchanged."""
    old = _OLD_NAMES[kind]
    if kind == "ms_summary" and "best MS" not in table.columns:
        return table  # current: its columns never include the old "K"
    return table.rename(columns={name: new for name, new in old.items() if name in table.columns})
