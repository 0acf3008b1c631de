"""Post-processing stages timed on cached network maps, in thread CPU time, and compared between two trees.

Wall-clock stage timings on a loaded 2-core machine are mostly queueing for a core; the CPU time of the
analysing thread is the steadier number for A/B comparisons of the post-processing (issue 6). Steps:

1. ``make``: simulate frames (realistic seeds 2 000 000+, as ``stm-feedback bench``; hard seeds 1 200 000+),
   run the networks once and pickle the maps (the nets are not part of what is compared).
2. ``run``: ``Pipeline.analyze_maps`` on every cached frame, ``--repeats`` times after the heap is frozen
   (as the bench and the daemon do), with the pipeline's stage timer counting this thread's CPU time;
   prints p50 / p95 / p99 per stage and of the post-processing without the planner (``--clock wall``: wall
   time instead, which includes OpenCV's worker threads and any wait for a core), and pickles the stage
   samples and the first repeat's outputs (JSON dict without timings, terrace labels, safe mask, features).
3. ``compare A B``: the largest difference between the outputs of two ``run`` pickles.

A/B: run ``run`` alternately with PYTHONPATH set to each tree (e.g. a ``git archive`` of main and the
branch), several rounds, and compare the medians.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_postprocess.py make --maps /tmp/maps.pkl --frames 30
    PYTHONPATH=<tree> .venv/bin/python benchmarks/bench_postprocess.py run --maps /tmp/maps.pkl \\
        --preset realistic --repeats 2 --out /tmp/<tree>.pkl
    .venv/bin/python benchmarks/bench_postprocess.py compare /tmp/a.pkl /tmp/b.pkl
"""

from __future__ import annotations

import argparse
import pickle
import time

import numpy as np


def _fields(maps: object) -> dict:
    """The maps' fields, without unset optional ones (a tree older than the field can still read them)."""
    return {k: v for k, v in vars(maps).items() if v is not None or k != "atom_prob_net"}


def make(maps_path: str, n: int) -> None:
    from stm_feedback.benchmark import simulated_frames
    from stm_feedback.pipeline import Pipeline

    pipe = Pipeline()
    frames = []
    for preset, n_, seed0 in (("realistic", n, 2_000_000), ("hard", n // 2, 1_200_000)):
        for f in simulated_frames(n_, 256, seed0, preset=preset):
            maps = pipe.runner.predict(f.image_nm.astype(np.float32), f.pixel_size_nm, bias_v=f.bias_v)
            frames.append(
                dict(img=f.image_nm, s=f.pixel_size_nm, b=f.bias_v, preset=preset, maps=_fields(maps))
            )
    with open(maps_path, "wb") as fh:
        pickle.dump(frames, fh)


def run(maps_path: str, out_path: str, repeats: int, preset: str | None, clock: str = "thread") -> None:
    if clock == "thread":  # the pipeline's stage timer now counts this thread's CPU time
        time.perf_counter = time.thread_time  # (OpenCV's worker threads, e.g. of distanceTransform, not)
    from stm_feedback.maps import NetworkMaps
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.server import freeze_heap

    pipe = Pipeline(runner=object())
    with open(maps_path, "rb") as fh:
        frames = pickle.load(fh)
    if preset:
        frames = [f for f in frames if f["preset"] == preset]
    for f in frames[:3]:  # warm-up
        pipe.analyze_maps(f["img"], NetworkMaps(**f["maps"]), f["s"], f["b"])
    freeze_heap()
    stages: dict[str, list[float]] = {}
    outputs = []
    for r in range(repeats):
        for f in frames:
            a = pipe.analyze_maps(f["img"], NetworkMaps(**f["maps"]), f["s"], f["b"])
            for k, v in a.timings_ms.items():
                stages.setdefault(k, []).append(float(v))
            if r == 0:
                d = a.to_json_dict()
                d.pop("timings_ms", None)
                outputs.append(
                    dict(json=d, labels=a.terrace_labels, safe=a.safe_mask, feats=a.defect_features)
                )
    stages["total-planner"] = list(np.subtract(stages["total"], stages["planner"]))
    with open(out_path, "wb") as fh:
        pickle.dump({"stages": stages, "outputs": outputs}, fh)
    unit = "CPU" if clock == "thread" else "wall"
    for k, v in stages.items():
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        print(f"{k:14s} p50 {p50:7.2f}  p95 {p95:7.2f}  p99 {p99:7.2f} ms {unit}")


def compare(a_path: str, b_path: str) -> None:
    with open(a_path, "rb") as fh:
        a = pickle.load(fh)["outputs"]
    with open(b_path, "rb") as fh:
        b = pickle.load(fh)["outputs"]
    worst = {"float": 0.0, "features": 0.0}
    other: list[str] = []

    def walk(x: object, y: object, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            if list(x) != list(y):
                other.append(path + " keys")
            for k in x:
                walk(x[k], y.get(k), f"{path}.{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                other.append(f"{path} length {len(x)} != {len(y)}")
                return
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, float) and isinstance(y, float):
            if x != y and not (np.isnan(x) and np.isnan(y)):
                worst["float"] = max(worst["float"], abs(x - y))
        elif x != y:
            other.append(f"{path}: {x!r} != {y!r}")

    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        walk(x["json"], y["json"], f"frame {i}")
        for name in ("labels", "safe"):
            if not np.array_equal(x[name], y[name]):
                other.append(f"frame {i} {name}")
        if x["feats"].shape != y["feats"].shape:
            other.append(f"frame {i} feature shape")
        elif x["feats"].size:
            worst["features"] = max(worst["features"], float(np.nanmax(np.abs(x["feats"] - y["feats"]))))
    print(
        f"{len(a)} frames; largest float difference in the JSON {worst['float']:.3g}, in the features "
        f"{worst['features']:.3g}; other differences: {len(other)}"
    )
    for line in other[:20]:
        print("  " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--maps", required=True)
    m.add_argument("--frames", type=int, default=30)
    r = sub.add_parser("run")
    r.add_argument("--maps", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--preset", default="realistic", help="realistic | hard | '' for all")
    r.add_argument(
        "--clock", default="thread", choices=["thread", "wall"], help="stage timer: thread CPU or wall"
    )
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.maps, args.frames)
    elif args.cmd == "run":
        run(args.maps, args.out, args.repeats, args.preset or None, args.clock)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
