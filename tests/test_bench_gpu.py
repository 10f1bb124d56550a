"""`make bench-gpu`'s script at fixture sizes on the CPU: every part runs and writes its rows, so
the GPU command cannot rot between the sessions that have a card."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
sys.path.insert(0, str(BENCH.parent))

import bench_gpu  # noqa: E402


@pytest.mark.slow
def test_every_part_runs_at_tiny_size_and_writes_its_rows(tmp_path):
    out = tmp_path / "bench.csv"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["part"] for r in rows} == set(bench_gpu.PARTS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["card"].startswith("CPU")
        seconds, base, ratio = float(r["seconds"]), float(r["baseline_seconds"]), float(r["ratio"])
        assert seconds > 0 and base > 0
        assert ratio == pytest.approx(seconds / base, rel=2e-3)  # ratio of the 4-digit figures
    assert "bench.csv" in done.stdout and "CPU" in done.stdout


def test_a_part_past_its_limit_becomes_a_timeout_row():
    rows = bench_gpu.run_part("steer", "cpu", True, limit_s=0.05)
    assert rows == [{"part": "steer", "status": "timeout after 0 s"}]


def test_unknown_parts_are_refused():
    done = subprocess.run([sys.executable, str(BENCH), "--parts", "train,warp"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown parts ['warp']" in done.stderr


def test_chapter_7_reads_the_table_where_the_script_writes_it(tmp_path, monkeypatch):
    from vlmsae_utils import scale

    monkeypatch.setenv("VLMSAE_RESULTS", str(tmp_path))
    assert scale.gpu_benchmarks() is None
    bench_gpu.run_all("cpu", True, ["uniqueness"], scale.gpu_benchmark_csv())
    table = scale.gpu_benchmarks()
    assert list(table["part"]) == ["uniqueness"] and table["status"].iloc[0] == "ok"
    assert scale.gpu_benchmark_csv() == tmp_path / "benchmarks" / "bench-gpu.csv"
