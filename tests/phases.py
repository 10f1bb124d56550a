"""Wall-clock time of the suite's shared set-up, phase by phase, printed at the end of `make test`.

A session fixture wraps each expensive step in ``with phase("name"):``; the terminal summary then
lists every phase and the time spent in each test file, so a slow suite says where its minutes go.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

PHASES: dict[str, float] = {}
FILES: defaultdict[str, float] = defaultdict(float)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the wall-clock seconds of the enclosed block under ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - start


def record_report(report) -> None:
    """Add a test phase's duration (setup, call or teardown) to its file's total."""
    FILES[report.nodeid.split("::")[0]] += report.duration


def summary_lines(top_files: int = 12) -> list[str]:
    """The phase table and the slowest files, as lines for the terminal summary."""
    lines = [f"{seconds:8.1f} s  {name}" for name, seconds in PHASES.items()]
    lines.append(f"{sum(PHASES.values()):8.1f} s  shared set-up in all")
    lines.append("time per test file (set-up of shared fixtures counted where first requested):")
    slowest = sorted(FILES.items(), key=lambda item: -item[1])[:top_files]
    lines += [f"{seconds:8.1f} s  {name}" for name, seconds in slowest]
    return lines
