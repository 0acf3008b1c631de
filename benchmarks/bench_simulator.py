"""Time simulate_frame (image + full truth) per preset, and SimulatedSTM.scan, on one core.

Run: .venv/bin/python benchmarks/bench_simulator.py [--n 20] [--size 256] [--no-instrument]
[--drawn-pixel-size] (pins BLAS/OpenMP to 1 thread). Prints wall-clock (perf_counter) and process CPU time
(process_time) per frame: on a shared, loaded machine the wall figure includes time the process waited for a
core, the CPU figure does not.
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
from simulator.instrument import SimulatedSTM  # noqa: E402


def _line(label: str, wall_ms: list[float], cpu_ms: list[float]) -> str:
    w, c = np.array(wall_ms), np.array(cpu_ms)
    return (
        f"{label:28s} wall median {np.median(w):6.1f} ms, p90 {np.percentile(w, 90):6.1f}, max {w.max():6.1f}"
        f" | cpu median {np.median(c):6.1f} ms, p90 {np.percentile(c, 90):6.1f}, max {c.max():6.1f}"
        f" (n={len(w)})"
    )


def _timed(fn) -> tuple[float, float]:
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t_wall) * 1000.0, (time.process_time() - t_cpu) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", default="clean,realistic,hard,training")
    ap.add_argument("--no-instrument", action="store_true", help="skip the SimulatedSTM.scan timing")
    ap.add_argument(
        "--drawn-pixel-size",
        action="store_true",
        help="also time the training preset with pixel_size_nm=None (0.05-0.2 nm/px), seeds 2000..",
    )
    args = ap.parse_args()
    simulate_frame(0, 64, 0.1, SimConfig.preset("clean"))  # warm caches/imports
    for preset in args.presets.split(","):
        cfg = SimConfig.preset(preset)
        wall, cpu = [], []
        for seed in range(args.n):
            w, c = _timed(lambda seed=seed, cfg=cfg: simulate_frame(1000 + seed, args.size, 0.1, cfg))
            wall.append(w)
            cpu.append(c)
        print(_line(f"{preset} {args.size}x{args.size}", wall, cpu), flush=True)
    if args.drawn_pixel_size:
        cfg = SimConfig.preset("training")
        wall, cpu = [], []
        for seed in range(args.n):
            w, c = _timed(lambda seed=seed: simulate_frame(2000 + seed, args.size, None, cfg))
            wall.append(w)
            cpu.append(c)
        print(_line(f"training {args.size}x{args.size} px=None", wall, cpu), flush=True)
    if not args.no_instrument:
        stm = SimulatedSTM(seed=3, config=SimConfig.preset("realistic"))
        wall, cpu = [], []
        for k in range(args.n):
            stm.set_frame(-200.0 + 30.0 * k, 100.0 - 15.0 * k, 0.1 * args.size, args.size, 0.0)
            w, c = _timed(stm.scan)
            wall.append(w)
            cpu.append(c)
        print(_line(f"SimulatedSTM.scan {args.size}px", wall, cpu), flush=True)


if __name__ == "__main__":
    main()
