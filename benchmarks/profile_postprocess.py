"""Where the post-processing time goes, per function, on cached network maps (see bench_postprocess.py).

``functions``: ``Pipeline.analyze_maps`` on the cached frames (3 repeats after 3 warm-up frames and a frozen
heap) with the main post-processing functions wrapped by a timer of this thread's CPU time: ms per frame
and calls per frame of each (nested functions count in their callers too; OpenCV's worker threads, e.g. of
cv2.distanceTransform, are not counted).

``capture`` + ``replay``: pickle the arguments of every call of those functions on the cached frames, then
time each function alone on them (wall ms per frame, median of ``--repeats`` passes), with the tree that
PYTHONPATH imports: an A/B of one function is ``replay`` alternately with PYTHONPATH = tree A and tree B.
Line-level profiles (line_profiler) of single functions were misleading on this loaded machine: they
charged preemption to whatever line was running.

    P=benchmarks/profile_postprocess.py
    PYTHONPATH=. .venv/bin/python $P functions --maps /tmp/maps.pkl
    PYTHONPATH=. .venv/bin/python $P capture --maps /tmp/maps.pkl --out /tmp/c.pkl
    PYTHONPATH=<tree> .venv/bin/python $P replay /tmp/c.pkl --names suspect_dimers
"""

from __future__ import annotations

import argparse
import collections
import functools
import pickle
import time
from typing import Any

import numpy as np

# (module, names): functions the pipeline calls through these module namespaces
TARGETS = {
    "stm_feedback.postprocess": (
        "segment_terraces close_step_gaps find_atoms pair_dimers split_by_orientation lattice_dimers "
        "find_blobs blob_terraces blob_features _ring_levels"
    ).split(),
    "stm_feedback.lattice": "fit_row_lattice undistorted_row_angle_deg local_fit_tiles".split(),
    "stm_feedback.planner": (
        "near_mask lattice_anomalies suspect_dimers orientation_band clearance_maps propose_sites distance_px "
        "upper_side_mask"
    ).split(),
    "stm_feedback.quality": "assess tip_change_lines".split(),
}


def _frames(maps_path: str, preset: str) -> list[dict[str, Any]]:
    with open(maps_path, "rb") as fh:
        frames = pickle.load(fh)
    return [f for f in frames if not preset or f["preset"] == preset]


def _wrap_all(hook: Any) -> None:
    """Replace each target function, in its module and wherever the pipeline imported it by name, by
    ``hook(name, function)``."""
    import importlib

    from stm_feedback import pipeline

    for mod_name, names in TARGETS.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            f = getattr(mod, name)
            g = hook(name, f)
            setattr(mod, name, g)
            if getattr(pipeline, name, None) is f:
                setattr(pipeline, name, g)


def functions(maps_path: str, preset: str, repeats: int) -> None:
    acc: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)

    def hook(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def g(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                acc[name] += time.thread_time() - t
                cnt[name] += 1

        return g

    _wrap_all(hook)
    from stm_feedback.maps import NetworkMaps
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.server import freeze_heap

    frames = _frames(maps_path, preset)
    pipe = Pipeline(runner=object())
    for f in frames[:3]:
        pipe.analyze_maps(f["img"], NetworkMaps(**f["maps"]), f["s"], f["b"])
    freeze_heap()
    acc.clear()
    cnt.clear()
    t0 = time.thread_time()
    for _ in range(repeats):
        for f in frames:
            pipe.analyze_maps(f["img"], NetworkMaps(**f["maps"]), f["s"], f["b"])
    n = repeats * len(frames)
    print(f"analyze_maps {(time.thread_time() - t0) / n * 1e3:.2f} ms/frame thread CPU ({n} frames)")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"{k:28s} {v / n * 1e3:6.2f} ms/frame  {cnt[k] / n:5.1f} calls/frame")


def capture(maps_path: str, preset: str, out_path: str) -> None:
    calls: dict[str, list[tuple[tuple, dict]]] = collections.defaultdict(list)

    def hook(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def g(*a: Any, **k: Any) -> Any:
            calls[name].append((a, k))
            return f(*a, **k)

        return g

    _wrap_all(hook)
    from stm_feedback.maps import NetworkMaps
    from stm_feedback.pipeline import Pipeline

    frames = _frames(maps_path, preset)
    pipe = Pipeline(runner=object())
    for f in frames:
        pipe.analyze_maps(f["img"], NetworkMaps(**f["maps"]), f["s"], f["b"])
    with open(out_path, "wb") as fh:
        pickle.dump({"n_frames": len(frames), "calls": dict(calls)}, fh)
    print({k: len(v) for k, v in calls.items()})


def replay(capture_path: str, names: list[str], repeats: int) -> None:
    import importlib

    with open(capture_path, "rb") as fh:
        cap = pickle.load(fh)
    n_frames = cap["n_frames"]
    modules = {n: importlib.import_module(m) for m, ns in TARGETS.items() for n in ns}
    for name in names or list(cap["calls"]):
        fn = getattr(modules[name], name)
        calls = cap["calls"][name]
        for a, k in calls[:3]:  # warm-up (kernel caches, imports)
            fn(*a, **k)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for a, k in calls:
                fn(*a, **k)
            ts.append((time.perf_counter() - t) / n_frames * 1e3)
        per_frame = len(calls) / n_frames
        print(
            f"{name:28s} {np.median(ts):7.3f} ms/frame wall, median of {repeats}, {per_frame:.1f} calls/frame"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("functions")
    f.add_argument("--maps", required=True)
    f.add_argument("--preset", default="realistic", help="realistic | hard | '' for all")
    f.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("capture")
    c.add_argument("--maps", required=True)
    c.add_argument("--preset", default="realistic")
    c.add_argument("--out", required=True)
    r = sub.add_parser("replay")
    r.add_argument("capture")
    r.add_argument("--names", default="", help="comma-separated function names (default: all captured)")
    r.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "functions":
        functions(args.maps, args.preset, args.repeats)
    elif args.cmd == "capture":
        capture(args.maps, args.preset, args.out)
    else:
        replay(args.capture, [n for n in args.names.split(",") if n], args.repeats)


if __name__ == "__main__":
    main()
