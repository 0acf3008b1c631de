"""Why frames with a truth 3-dimer window get no site: for each frame of a suite where the planner run on
the truth finds a window (``stm_feedback.planner_eval``), the reason the analysis found none: a suspected
double tip or an empty-state bias (sites withheld by the planner's safety rules), no atomic resolution, or
no site left (the safe area is too small). Prints the counts and one line per "no site" frame.

    python benchmarks/site_misses.py SUITE N        # hard 30
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import suite_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner_eval import score_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("n", type=int)
    args = ap.parse_args()
    pipe = Pipeline(load_settings())
    counts: collections.Counter = collections.Counter()
    for fr in suite_frames(args.suite, args.n):
        a = pipe.analyze(fr.image_nm.astype(np.float32), fr.pixel_size_nm, bias_v=fr.bias_v)
        sc = score_sites(fr.truth, a, pipe.settings.planner)
        if not sc.has_window:
            continue
        if sc.found:
            why = "found"
        elif a.quality.double_tip_suspected:
            why = "withheld: double tip suspected"
        elif fr.bias_v > 0:
            why = "withheld: empty state"
        elif not a.quality.atomically_resolved:
            why = "not atomically resolved"
        else:
            why = "no site"
            p = fr.truth.params
            print(
                f"seed {fr.seed}: true double tip {p.get('double_tip')}, jitter "
                f"{p.get('jitter_lambda_px', 0):.2f} px, safe fraction {a.safe_mask.mean():.3f}"
            )
        counts[why] += 1
        if why.startswith("withheld: double"):
            counts["  of which a true double tip"] += bool(fr.truth.params.get("double_tip"))
    n = sum(v for k, v in counts.items() if not k.startswith(" "))
    print(dict(counts), "frames with a truth window:", n)


if __name__ == "__main__":
    main()
