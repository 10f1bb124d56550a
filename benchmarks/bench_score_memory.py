"""Peak memory of scoring a store's raw neurons: streamed from the shards (``scoring.score_all``, today)
against the whole store read into memory first (its former path), each in a fresh process, same MS.

    python benchmarks/bench_score_memory.py                 # N = 25,000 images × 1,024 neurons (102 MB of rows)
    python benchmarks/bench_score_memory.py --n 5000        # smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mib() -> float:
    """VmHWM of this process in MiB (peak resident memory since exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(folder: str, mode: str) -> None:
    from vlmsae_utils import scoring
    from vlmsae_utils.store import ActivationStore

    acts, emb = ActivationStore.open(Path(folder) / "acts"), ActivationStore.open(Path(folder) / "emb")
    before, start = _peak_rss_mib(), time.perf_counter()
    if mode == "streamed":
        report = scoring.score_all(acts, emb, {}, device="cpu")[0]
    else:
        report = scoring.score_neurons("raw", acts.to_tensor(), emb.to_tensor(), 16, "cpu")
    seconds = time.perf_counter() - start
    np.save(Path(folder) / f"ms_{mode}.npy", report.ms.numpy())
    print(json.dumps({"before": before, "peak": _peak_rss_mib(), "seconds": seconds}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=25_000, help="images (rows)")
    parser.add_argument("--k", type=int, default=1_024, help="neurons (store width)")
    parser.add_argument("--d", type=int, default=768, help="scorer embedding width")
    args = parser.parse_args()
    from vlmsae_utils.store import write_rows

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        classes = [f"c{i % 100}" for i in range(args.n)]
        rows = rng.standard_normal((args.n, args.k), dtype=np.float32)
        write_rows(Path(tmp) / "acts", rows, classes, params={"encoder": "bench"}, shard_images=4096)
        del rows
        embeddings = rng.standard_normal((args.n, args.d), dtype=np.float32)
        write_rows(Path(tmp) / "emb", embeddings, classes, params={"encoder": "judge"}, shard_images=4096)
        del embeddings
        result = {}
        for mode in ("whole", "streamed"):
            run = subprocess.run([sys.executable, __file__, "--child", tmp, mode], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-2000:])
            result[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        same = np.allclose(np.load(Path(tmp) / "ms_whole.npy"), np.load(Path(tmp) / "ms_streamed.npy"), equal_nan=True)
    mb = args.n * args.k * 4 / 1e6
    added = {m: r["peak"] - r["before"] for m, r in result.items()}
    print(
        f"scoring {args.n} × {args.k} raw neurons ({mb:.0f} MB of rows, embeddings {args.n} × {args.d}), torch "
        f"{torch.__version__}: whole store in memory adds {added['whole']:.0f} MiB ({result['whole']['seconds']:.1f} s), "
        f"streamed from the shards adds {added['streamed']:.0f} MiB ({result['streamed']['seconds']:.1f} s): "
        f"{added['whole'] / max(added['streamed'], 1):.1f}x less memory; same MS: {same}"
    )


if __name__ == "__main__":
    main()
