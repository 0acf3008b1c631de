"""Planner stage latency on cached network maps (no networks, no simulator in the loop).

``python benchmarks/bench_planner.py /tmp/pc/suite-realistic --n 30 --repeats 5 [--set field=value ...]``

Reads the pickles of ``benchmarks/planner_cache.py`` and runs ``pipeline.postprocess_maps`` ``--repeats``
times per frame; per frame it keeps the *minimum* of the ``planner`` stage's wall-clock time (the stage's
own timer, as ``stm-feedback bench`` reports it; the minimum because on a shared machine the rest is other
jobs) and prints p50 / p90 over the frames in ms, the CPU time (``time.process_time``, all threads) of the
whole post-processing p50 (min of the repeats: the
trees compared differ only in the planner, so the difference is the planner's), and the 1-minute load
average before and after. Run it from
two trees alternately (``PYTHONPATH=<tree>``) for an A/B comparison. ``--parts`` adds the CPU ms of each
planner function the pipeline's step 7 calls (p50 over frames of the per-frame minimum).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np

from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings

PARTS = (
    "near_mask",
    "lattice_anomalies",
    "orientation_band",
    "suspect_dimers",
    "clearance_maps",
    "propose_sites",
)


def _instrument() -> dict[str, list[float]]:
    """Wrap the planner functions step 7 of the pipeline calls (those present in this tree) with CPU timers
    (``time.process_time``, ms); returns name -> per-frame list the wrappers add to."""
    acc: dict[str, list[float]] = {}
    for name in PARTS:
        f = getattr(pl, name, None)
        if f is None:
            continue
        acc[name] = []

        def g(*a, _f=f, _v=acc[name], **k):  # noqa: ANN002, ANN003, ANN202
            t = time.process_time()
            try:
                return _f(*a, **k)
            finally:
                _v[-1] += (time.process_time() - t) * 1e3

        setattr(pl, name, g)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="planner field=value (repeatable)")
    ap.add_argument("--parts", action="store_true", help="also CPU ms per planner function (p50 over frames)")
    args = ap.parse_args()
    parts = _instrument() if args.parts else {}
    settings = load_settings()
    if args.set:
        upd = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        settings = settings.model_copy(update={"planner": settings.planner.model_copy(update=upd)})
    params = pl.pp.PostprocessParams()
    paths = sorted(args.dir.glob("*.pkl"), key=lambda q: int(q.stem))[: args.n]
    recs = [pickle.loads(p.read_bytes()) for p in paths]
    load0 = os.getloadavg()[0]
    best, cpu = [], []
    for rec in recs:
        img = rec["image_nm"].astype(np.float32)
        ms, cpu_ms = [], []
        for v in parts.values():
            v.append(np.inf)
        for _ in range(args.repeats):
            for v in parts.values():
                v.append(0.0)
            t0 = time.process_time()
            an = pl.postprocess_maps(
                img, rec["maps"], rec["pixel_size_nm"], rec["bias_v"], None, settings, params
            )
            cpu_ms.append((time.process_time() - t0) * 1e3)
            ms.append(an.timings_ms["planner"])
            for v in parts.values():  # keep the frame's minimum over the repeats in its slot
                last = v.pop()
                v[-1] = min(v[-1], last)
        best.append(min(ms))
        cpu.append(min(cpu_ms))
    print(
        f"{pl.__file__}: planner stage p50 {np.median(best):.2f} ms, p90 {np.percentile(best, 90):.2f} ms "
        f"({len(best)} frames, min of {args.repeats}); "
        f"whole post-processing CPU p50 {np.median(cpu):.2f} ms; "
        + "".join(f"{k} {np.median(v):.2f}, " for k, v in parts.items())
        + f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
