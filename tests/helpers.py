"""Test doubles shared by several test modules (written once; import as ``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmsae_utils import run, sweep
from vlmsae_utils.stages import stages_of_notebook


class TensorStore:
    """An in-memory stand-in for :class:`vlmsae_utils.store.ActivationStore`: ``len``, ``dim``,
    ``to_tensor`` and ``iter_batches`` (seeded shuffle), counting the batches it serves.

    ``allow_shuffle=False`` makes a shuffled read an error, for code that must read in store order.
    """

    def __init__(self, data: torch.Tensor, *, allow_shuffle: bool = True):
        self.data, self.dim, self.allow_shuffle = data, data.shape[1], allow_shuffle
        self.batches_served = 0

    def __len__(self) -> int:
        return self.data.shape[0]

    def to_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.data.to(dtype)

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        assert self.allow_shuffle or not shuffle, "this reader must not shuffle"
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            self.batches_served += 1
            yield self.data[order[start : start + batch_size]].clone()


def write_shards(path, x: torch.Tensor, dtype: str = "float32", shard_images: int = 64):
    """A :class:`~vlmsae_utils.store.StoreWriter` at ``path`` with every shard of ``x`` written in
    ``dtype`` (one row per image) but no manifest yet, as an extraction leaves it before finalizing."""
    from vlmsae_utils.store import StorePlan, StoreWriter

    n = x.shape[0]  # written as an extraction writes (no check of the values: a model may give NaN)
    ids, classes = [f"row{i:07d}" for i in range(n)], ["c"] * n
    plan = StorePlan({"test": str(path)}, ids, classes, int(x.shape[1]), dtype, 1, shard_images)
    writer = StoreWriter(path, plan)
    writer.begin()
    for shard in range(plan.num_shards):
        span = plan.shard_range(shard)
        writer.write_shard(shard, x[span.start : span.stop].numpy(), list(span), [])
    return writer


def write_store(path, x: torch.Tensor, dtype: str = "float32", shard_images: int = 64):
    """A real :class:`~vlmsae_utils.store.ActivationStore` at ``path`` (one row per image, several
    shards of ``shard_images``) holding the rows of ``x`` in ``dtype``."""
    return write_shards(path, x, dtype, shard_images).finalize()


class FakeRunner:
    """Stands in for a notebook run in sweep tests: writes the outputs a run of that kind is
    expected to leave, and records the call (in ``calls``, and in ``log`` when given, so calls made in
    subprocess jobs are seen too). A run whose folder ends with one of ``fail`` raises a
    NotebookError; one ending with one of ``kill`` SIGKILLs its own process (a killed job)."""

    def __init__(self, fail: set[str] = frozenset(), *, kill: set[str] = frozenset(), log: Path | None = None):
        self.calls: list[str] = []
        self.fail, self.kill, self.log = fail, kill, log

    def __call__(self, notebook: str, params: dict, out: Path) -> None:
        self.calls.append(str(out))
        if self.log is not None:
            with open(self.log, "a") as handle:
                handle.write(f"{out}\n")
        if any(str(out).endswith(f) for f in self.kill):
            os.kill(os.getpid(), signal.SIGKILL)
        if any(str(out).endswith(f) for f in self.fail):
            raise run.NotebookError("cell 3 failed with ValueError: injected")
        for name in dict.fromkeys(name for stage in stages_of_notebook(notebook) for name in stage.outputs):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("x")


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[int]:
    """Another process holding ``folder``'s lock (as a second sweep or notebook would); yields its pid."""
    code = (
        "import sys; from vlmsae_utils.io import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


class KillAfterNotebook:
    """The real notebook runner, then SIGKILL for runs whose folder ends with one of ``kill``: a job
    killed after its notebook wrote new files but before the sweep marked it complete."""

    def __init__(self, kill: set[str]):
        self.kill = kill

    def __call__(self, notebook: str, params: dict, out: Path) -> None:
        sweep.notebook_runner(notebook, params, out)
        if any(str(out).endswith(f) for f in self.kill):
            os.kill(os.getpid(), signal.SIGKILL)
