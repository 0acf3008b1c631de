"""Planner on cached network maps: site-found, false-safe sites, and what every false-safe site touches.

``python benchmarks/planner_study.py /tmp/pc/suite-realistic [--set site_check_max=-1 ...] [--list]``

Reads the pickles of ``benchmarks/planner_cache.py``, runs the post-processing (``pipeline.postprocess_maps``,
exactly what ``stm-feedback evaluate --method nets`` runs after the networks) with the planner settings
overridden by ``--set field=value`` (``PlannerSettings`` fields), and scores the sites like ``evaluate``
(``planner_eval.score_sites``). ``--list`` prints every false-safe site: the frame seed, the site centre
(px), the truth rule it violates with the smallest slack (a defect class and its distance / margin in nm, or
the step edge), and whether the analysis had a detection there (nearest detected defect / stretched-dimer
evidence within the margin) — i.e. why it was missed. ``--json FILE`` writes the per-frame numbers.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings
from stm_feedback.planner import distance_px
from stm_feedback.planner_eval import aggregate_sites, score_sites


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load(dirs: list[Path], n: int = 0):
    for d in dirs:
        for p in sorted(d.glob("*.pkl"), key=lambda q: int(q.stem))[: n or None]:
            yield pickle.loads(p.read_bytes())


def violations(truth, settings, xy_px: np.ndarray) -> list[tuple[float, str, float, float]]:
    """Truth rules violated at the dimers ``xy_px`` (N, 2): (slack_nm, what, distance_nm, margin_nm),
    most negative slack first. ``what`` = a defect class, or "step"."""
    s = truth.pixel_size_nm
    h, w = truth.terrace_labels.shape
    c = np.clip(np.rint(xy_px[:, 0]).astype(int), 0, w - 1)
    r = np.clip(np.rint(xy_px[:, 1]).astype(int), 0, h - 1)
    out = []
    off = np.asarray(truth.step_mask, bool) | (np.asarray(truth.terrace_labels) < 0)
    d = float((distance_px(off)[r, c] * s).min())
    if d < settings.step_margin_nm:
        out.append((d - settings.step_margin_nm, "step", d, settings.step_margin_nm))
    inst = np.asarray(truth.defect_instances)
    for dt in truth.defects:
        if not dt.must_avoid:
            continue
        margin = {"adatom_cluster": settings.adatom_margin_nm, "dihydride": settings.dihydride_margin_nm}.get(
            dt.cls, settings.depression_margin_nm
        )
        if np.hypot(dt.x_px - xy_px[:, 0], dt.y_px - xy_px[:, 1]).min() * s > margin + 3.0:
            continue
        dd = float((distance_px(inst == dt.id)[r, c] * s).min())
        if dd < margin:
            out.append((dd - margin, dt.cls, dd, margin))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--set", action="append", default=[], help="planner field=value (repeatable)")
    ap.add_argument("--n", type=int, default=0, help="first N frames of each directory (0 = all)")
    ap.add_argument("--list", action="store_true", help="print every false-safe site and its cause")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = load_settings()
    upd = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    settings = settings.model_copy(update={"planner": settings.planner.model_copy(update=upd)})
    ps = settings.planner
    params = pl.Pipeline(settings, runner=object()).params
    scores, rows, planner_ms = [], [], []
    models = None
    for rec in load(args.dirs, args.n):
        models = rec["models"]
        an = pl.postprocess_maps(
            rec["image_nm"].astype(np.float32),
            rec["maps"],
            rec["pixel_size_nm"],
            rec["bias_v"],
            None,
            settings,
            params,
        )
        planner_ms.append(an.timings_ms.get("planner", np.nan))
        sc = score_sites(rec["truth"], an, ps)
        scores.append(sc)
        rows.append({"seed": rec["seed"], **sc.to_dict()})
        if args.list and sc.false_safe:
            truth = rec["truth"]
            det = np.array([[d.x_px, d.y_px] for d in an.defects]).reshape(-1, 2)
            for site in an.sites:
                pts = np.asarray(site.dimers, float)
                v = violations(truth, ps, pts)
                if not v:
                    continue
                slack, what, dist, margin = v[0]
                c = pts.mean(axis=0)
                near = np.hypot(*(det - c).T).min() * truth.pixel_size_nm if len(det) else np.inf
                print(
                    f"seed {rec['seed']} site ({c[0]:.1f}, {c[1]:.1f}) terrace {site.terrace}: {what} at "
                    f"{dist:.2f} nm (margin {margin:.2f}, slack {slack:+.2f}); nearest detected defect "
                    f"{near:.2f} nm; site clearance {site.clearance_nm:.2f} nm; tip {truth.tip_state}"
                    + ("".join(f"; also {w} {d:.2f}/{m:.2f}" for _, w, d, m in v[1:]))
                )
    agg = aggregate_sites(scores)
    print(f"models {models}")
    print(f"planner settings changed: {upd or 'none'}")
    print(
        f"frames {len(scores)}: found {int(agg['sites_found_frames'])}/{int(agg['site_window_frames'])} "
        f"({agg['site_found_rate']:.3f}), false-safe {int(agg['false_safe_sites'])} sites in "
        f"{int(agg['false_safe_frames'])} frames, sites/frame {agg['sites_per_frame']:.1f}, "
        f"planner ms p50 {np.nanmedian(planner_ms):.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"settings": upd, "aggregate": agg, "frames": rows}, indent=1))


if __name__ == "__main__":
    main()
