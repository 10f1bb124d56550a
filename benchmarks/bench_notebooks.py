"""Notebook runs in fresh kernels vs warm kernels (``vlmsae_utils.kernels.warm_kernels``).

Run: ``python benchmarks/bench_notebooks.py [--runs 4]``. Executes chapter 7 (it needs no trained
model) ``--runs`` times as papermill does by default — a fresh kernel each — and then as a sweep or
``run --all`` does — each run takes the kernel started and warmed up during the one before — in a
temporary outputs root, and prints the seconds per run and the ratio (fresh / warm).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path


def seconds_per_run(runs: int, out: Path, warm: bool) -> float:
    """Mean wall time of ``runs`` executions of chapter 7 (fresh or warm kernels)."""
    from vlmsae_utils import kernels, run

    start = time.perf_counter()
    with kernels.warm_kernels() if warm else contextlib.nullcontext():
        for index in range(runs):
            run.run_notebook("07", {}, out / f"{'warm' if warm else 'fresh'}{index}")
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VLMSAE_OUTPUTS"] = tmp
        fresh = seconds_per_run(args.runs, Path(tmp), warm=False)
        warm = seconds_per_run(args.runs, Path(tmp), warm=True)
    print(f"chapter 7, {args.runs} runs: fresh kernels {fresh:.2f} s/run, warm kernels {warm:.2f} s/run")
    print(f"ratio fresh / warm: {fresh / warm:.2f}")


if __name__ == "__main__":
    main()
