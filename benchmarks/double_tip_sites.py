"""Sites proposed on double-tip frames: the realistic preset with a double tip on every frame (drawn pixel
size, bias, offsets 0.3-2 nm), scored like ``stm-feedback evaluate`` (``stm_feedback.planner_eval``).
Prints, per planner variant, frames flagged by the quality check, frames with a truth window, frames with a
site found, false-safe sites and frames, and which truth rule each false-safe site breaks (step edge or
defect margin).

    python benchmarks/double_tip_sites.py FIRST_SEED N [--setting NAME=VALUE ...]   # 760000 60

``--setting`` overrides a ``PlannerSettings`` field (several: one variant each, plus the shipped settings).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import numpy as np

from simulator.frame import SimConfig
from stm_feedback.config import PlannerSettings, load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.pipeline import Pipeline
from stm_feedback.planner import distance_px
from stm_feedback.planner_eval import score_sites, truth_avoid_masks


def breaks(site_xy_px: np.ndarray, truth, ps: PlannerSettings) -> list[str]:  # noqa: ANN001
    """Names of the truth rules the site's dimers break ("step", or the defect margin classes)."""
    s = truth.pixel_size_nm
    h, w = truth.height_px, truth.width_px
    c = np.clip(np.rint(site_xy_px[:, 0]).astype(int), 0, w - 1)
    r = np.clip(np.rint(site_xy_px[:, 1]).astype(int), 0, h - 1)
    out = []
    off = np.asarray(truth.step_mask, bool) | (np.asarray(truth.terrace_labels) < 0)
    if ((distance_px(off)[r, c] * s) < ps.step_margin_nm).any():
        out.append("step")
    for margin, mask in truth_avoid_masks(truth, ps).items():
        if ((distance_px(mask)[r, c] * s) < margin).any():
            out.append(f"defect margin {margin}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--setting", action="append", default=[], help="PlannerSettings NAME=VALUE")
    ap.add_argument("--p-double", type=float, default=1.0)
    args = ap.parse_args()
    base = load_settings()
    variants = [("shipped", base)]
    for kv in args.setting:
        name, value = kv.split("=", 1)
        planner = base.planner.model_copy(update={name: type(getattr(base.planner, name))(json.loads(value))})
        variants.append((kv, base.model_copy(update={"planner": planner})))
    cfg = dataclasses.replace(SimConfig.preset("realistic"), p_double=args.p_double)
    runner = Pipeline(base).runner
    pipes = [(name, Pipeline(st, runner=runner)) for name, st in variants]  # one set of networks
    stats = {name: collections.Counter() for name, _ in pipes}
    for fr in simulated_frames(cfg, args.first_seed, args.n):
        maps = runner.predict(fr.image_nm.astype(np.float32), fr.pixel_size_nm, bias_v=fr.bias_v)
        for name, p in pipes:
            a = p.analyze_maps(fr.image_nm.astype(np.float32), maps, fr.pixel_size_nm, bias_v=fr.bias_v)
            ps = p.settings.planner
            sc = score_sites(fr.truth, a, ps)
            st = stats[name]
            st["frames"] += 1
            st["flagged"] += bool(a.quality.double_tip_suspected)
            st["window"] += sc.has_window
            st["found"] += sc.found
            st["sites"] += sc.sites
            st["false_safe_sites"] += sc.false_safe
            st["false_safe_frames"] += sc.false_safe > 0
            if sc.false_safe:
                for site in a.sites:
                    for rule in breaks(np.asarray(site.dimers, float).reshape(-1, 2), fr.truth, ps):
                        st[f"breaks {rule}"] += 1
                print(f"  {name}: seed {fr.seed} false-safe {sc.false_safe}", flush=True)
    for name, st in stats.items():
        print(json.dumps({"variant": name, **{k: v for k, v in st.items()}}))


if __name__ == "__main__":
    main()
