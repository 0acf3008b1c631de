"""Time simulate_frame (image + full truth) per preset on one core.

Run: .venv/bin/python benchmarks/bench_simulator.py [--n 20] [--size 256]  (pins BLAS/OpenMP to 1 thread)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from simulator.frame import SimConfig, simulate_frame  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", default="clean,realistic,hard,training")
    args = ap.parse_args()
    simulate_frame(0, 64, 0.1, SimConfig.preset("clean"))  # warm caches/imports
    for preset in args.presets.split(","):
        cfg = SimConfig.preset(preset)
        ms = []
        for seed in range(args.n):
            t = time.perf_counter()
            simulate_frame(1000 + seed, args.size, 0.1, cfg)
            ms.append((time.perf_counter() - t) * 1000.0)
        a = np.array(ms)
        print(
            f"{preset:10s} {args.size}x{args.size}: median {np.median(a):6.1f} ms, "
            f"p90 {np.percentile(a, 90):6.1f} ms, max {a.max():6.1f} ms (n={args.n})"
        )


if __name__ == "__main__":
    main()
