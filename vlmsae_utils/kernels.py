"""Warm kernels for runs of many notebooks: the next notebook's kernel starts, and imports the
libraries every chapter imports, while the current notebook executes.

A fresh kernel spends seconds on start-up and on ``import torch`` and friends before a notebook's
first cell does any work; a sweep of twenty cells or ``run --all`` pays that twenty times. Inside
``with warm_kernels():`` each :func:`vlmsae_utils.runner.run_notebook` takes the spare kernel (when
it was started for the same kernel, folder and environment; otherwise a fresh one, as papermill
would) and starts the next spare. The spare has run nothing but imports, without history or
output, so an executed notebook is the same as one run in a fresh kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENGINE_NAME", "WARM_IMPORTS", "register_engine", "take_kernel", "warm_kernels"]

#: The papermill engine that executes a notebook in a given (warm) kernel and shuts it down after.
ENGINE_NAME = "vlmsae-warm"

#: What a spare kernel imports before its notebook arrives (the heavy imports of the chapters).
WARM_IMPORTS = """
import numpy, pandas, torch, matplotlib.pyplot, seaborn, transformers, IPython.display
import vlmsae_utils.defaults, vlmsae_utils.encoders, vlmsae_utils.extract, vlmsae_utils.hierarchy
import vlmsae_utils.plots, vlmsae_utils.scoring, vlmsae_utils.train, vlmsae_utils.widgets
"""
#: The kernel arguments nbclient gives the kernels it starts (history kept in memory, not on disk).
KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:"]


@dataclass
class _Spare:
    """A started kernel, the client that sent its warm-up imports, and what it was started for."""

    manager: Any  # jupyter_client.AsyncKernelManager
    client: Any  # jupyter_client.BlockingKernelClient
    key: tuple


_pool: dict[str, Any] = {"active": 0, "spare": None}


def _key(kernel_name: str, cwd: Path) -> tuple:
    """What a spare must match to stand in for a fresh kernel: kernel, folder and environment."""
    return kernel_name, str(Path(cwd).resolve()), tuple(sorted(os.environ.items()))


def _start_spare(kernel_name: str, cwd: Path) -> _Spare:
    """Start a kernel in ``cwd`` and send it the warm-up imports (returns at once; the kernel works alone)."""
    from jupyter_client import AsyncKernelManager
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_core.utils import run_sync

    manager = AsyncKernelManager(kernel_name=kernel_name)
    run_sync(manager.start_kernel)(extra_arguments=list(KERNEL_ARGUMENTS), cwd=str(cwd))
    client = BlockingKernelClient()
    client.load_connection_info(manager.get_connection_info())
    client.start_channels()
    client.execute(WARM_IMPORTS, silent=True, store_history=False)  # queued until the kernel listens
    return _Spare(manager, client, _key(kernel_name, cwd))


def _discard(spare: _Spare) -> None:
    """Shut a spare kernel down (it was not wanted, or the pool closes)."""
    from jupyter_core.utils import run_sync

    spare.client.stop_channels()
    with contextlib.suppress(Exception):
        run_sync(spare.manager.shutdown_kernel)(now=True)


def take_kernel(kernel_name: str, cwd: Path) -> Any | None:
    """Inside :func:`warm_kernels`: the spare kernel manager when it matches (``None`` otherwise, and
    outside), after starting the next spare for the notebook that follows."""
    if not _pool["active"]:
        return None
    spare, _pool["spare"] = _pool["spare"], None
    manager = None
    if spare is not None and spare.key == _key(kernel_name, cwd):
        spare.client.stop_channels()
        manager = spare.manager
    elif spare is not None:
        _discard(spare)
    _pool["spare"] = _start_spare(kernel_name, cwd)
    return manager


@contextlib.contextmanager
def warm_kernels() -> Iterator[None]:
    """Within the block, notebooks run by :func:`vlmsae_utils.runner.run_notebook` take pre-started kernels."""
    _pool["active"] += 1
    try:
        yield
    finally:
        _pool["active"] -= 1
        if not _pool["active"]:
            _close()


def _close() -> None:
    """Shut down the spare kernel, if any."""
    spare, _pool["spare"] = _pool["spare"], None
    if spare is not None:
        _discard(spare)


def register_engine() -> str:
    """Register (once) the papermill engine that takes ``km=`` (a started kernel) and shuts that
    kernel down when the notebook is done, as papermill does with kernels it starts; its name."""
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    class WarmKernelEngine(NBClientEngine):
        """papermill's nbclient engine, executing in the kernel ``km`` it is given."""

        @classmethod
        def execute_managed_notebook(
            cls, nb_man, kernel_name, km=None, start_timeout=60, execution_timeout=None, **kwargs
        ):
            kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
            settings = merge_kwargs(
                kwargs, timeout=execution_timeout, startup_timeout=start_timeout, kernel_name=kernel_name, log=logger
            )
            return PapermillNotebookClient(nb_man, km=km, **settings).execute(cleanup_kc=True)

    papermill_engines.register(ENGINE_NAME, WarmKernelEngine)
    return ENGINE_NAME


atexit.register(_close)
