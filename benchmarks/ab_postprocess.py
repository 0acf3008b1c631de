"""Interleaved A/B of the post-processing stages of two source trees on cached network maps.

Runs ``bench_postprocess.py run`` alternately with PYTHONPATH = tree A and tree B (``--rounds`` times each,
A first in odd rounds, B first in even ones, so a load change hits both), then prints per stage the median
over rounds of each run's p50 (thread CPU ms, or wall ms with ``--clock wall``; see bench_postprocess.py),
B - A, and checks with
``bench_postprocess.py compare`` that both trees gave the same outputs.

    git archive main | tar -x -C /tmp/main-tree
    PYTHONPATH=. .venv/bin/python benchmarks/bench_postprocess.py make --maps /tmp/maps.pkl --frames 30
    .venv/bin/python benchmarks/ab_postprocess.py /tmp/main-tree . --maps /tmp/maps.pkl --rounds 4
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="source tree A (its stm_feedback package is imported)")
    ap.add_argument("b", help="source tree B")
    ap.add_argument("--maps", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", default="realistic", help="realistic | hard | '' for all")
    ap.add_argument("--clock", default="thread", choices=["thread", "wall"])
    args = ap.parse_args()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    tmp = tempfile.mkdtemp(prefix="ab_pp_")
    p50: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    last: dict[str, str] = {}
    for r in range(args.rounds):
        for tag in "AB" if r % 2 == 0 else "BA":
            tree = os.path.abspath(args.a if tag == "A" else args.b)
            out = os.path.join(tmp, f"{tag}{r}.pkl")
            cmd = [sys.executable, os.path.join(HERE, "bench_postprocess.py"), "run", "--maps", args.maps]
            cmd += [
                "--out",
                out,
                "--repeats",
                str(args.repeats),
                "--preset",
                args.preset,
                "--clock",
                args.clock,
            ]
            subprocess.run(cmd, env=dict(env, PYTHONPATH=tree), check=True, stdout=subprocess.DEVNULL)
            with open(out, "rb") as fh:
                stages = pickle.load(fh)["stages"]
            for k, v in stages.items():
                p50[tag].setdefault(k, []).append(float(np.percentile(v, 50)))
            last[tag] = out
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    unit = "ms CPU" if args.clock == "thread" else "ms wall"
    head = f"{'stage':14s} {'A p50':>8s} {'B p50':>8s} {'B - A':>8s}"
    print(f"{head}   (median over {args.rounds} rounds, {unit})")
    for k in p50["A"]:
        a, b = float(np.median(p50["A"][k])), float(np.median(p50["B"][k]))
        print(f"{k:14s} {a:8.2f} {b:8.2f} {b - a:+8.2f}")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "bench_postprocess.py"), "compare", last["A"], last["B"]],
        check=True,
    )


if __name__ == "__main__":
    main()
