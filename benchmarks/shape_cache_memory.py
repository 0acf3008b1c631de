"""Memory and latency of the compiled-shape cache: one ModelRunner, passes over NSIZES frame pixel sizes
(0.05-0.2 nm/px, random order) on a 256 px frame; RSS and mean predict time after each pass
(docs/performance.md, session 5).

    NSIZES=24 python benchmarks/shape_cache_memory.py
"""

import gc
import os
import time

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.runner import ModelRunner


def rss():
    with open(f"/proc/{os.getpid()}/status") as f:
        for l in f:
            if l.startswith("VmRSS"):
                return int(l.split()[1]) / 1024


r = ModelRunner.from_settings(load_settings().models)
img = np.random.default_rng(0).normal(0, 0.02, (256, 256)).astype(np.float32)
r.predict(img, 0.1, bias_v=-2.0)
out = [round(rss())]
sizes = np.random.default_rng(1).permutation(np.linspace(0.05, 0.2, int(os.environ.get("NSIZES", "24"))))
for _pass in range(3):
    t = time.perf_counter()
    for s in sizes:
        r.predict(img, float(s), bias_v=-2.0)
    gc.collect()
    out.append((round(rss()), round((time.perf_counter() - t) / len(sizes) * 1e3)))
print("RSS MiB at start, then (RSS, mean predict ms) after each pass over the pixel sizes:", out)
