"""Latency of each net's engine alone, INT8 IRs against bf16/fp32, at the bench's 256 x 256 px frame (0.1
nm/px: NN-0 128 px, NN-1 256 px, NN-2 176 px inputs). Wall time per call, median of 200 after 20 warm-up calls,
2 threads, two rounds; a micro-benchmark for choosing which nets to quantise (docs/performance.md, session 8).

    python benchmarks/int8_latency.py [MODELS_DIR ...]     # default: models (the shipped IRs)

Each MODELS_DIR is run with its INT8 IRs (``MODELS_DIR/int8``) and, once, without (``int8=False``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from stm_feedback.runner import ModelRunner

SHAPES = {"terraces": (128, 128), "atoms": (256, 256), "defects": (176, 176)}


def main() -> None:
    dirs = sys.argv[1:] or ["models"]
    runners = {d: ModelRunner.from_dir(d, device="cpu", backend="openvino", threads=2) for d in dirs}
    runners["no int8"] = ModelRunner.from_dir(dirs[0], device="cpu", backend="openvino", threads=2, int8=False)
    rng = np.random.default_rng(0)
    for rnd in range(2):
        for name, shape in SHAPES.items():
            x = rng.random(shape).astype(np.float32)
            for label, runner in runners.items():
                engine = runner.engines[name]
                for _ in range(20):
                    engine(x)
                ts = []
                for _ in range(200):
                    t = time.perf_counter()
                    engine(x)
                    ts.append(time.perf_counter() - t)
                prec = getattr(engine, "precision", "?")
                print(f"round {rnd} {name:9s} {label:24s} {prec:5s} {1e3 * np.median(ts):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
