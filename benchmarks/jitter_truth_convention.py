"""Suite scores under the two conventions for where a feature on jittered scan lines is (models/MODEL_CARD.md,
session 12): its recorded blob's centre (``ScanGeometry.feature_pixels``, ``jitter.feature_offset_px``; the
convention since session 12) or its nearest line's offset (before). Both the simulator's truth and the
pipeline's move back of jitter-corrected results (``pipeline.unshift_analysis``) switch together; ``mixed``
scores the nearest-line truth with the blob-centre pipeline and ``--oracle-jitter`` hands the pipeline the
simulator's true line offsets instead of its estimate (the headroom of a perfect estimate).

    python benchmarks/jitter_truth_convention.py SUITE N [--oracle-jitter]     # hard 30 in the card

One JSON line per convention and method: atom / dimer / defect F1, site-found rate and false-safe sites of
the nets and of the classical baseline (which has no jitter correction: its peaks sit on the brightest
slice of a blob, which is the nearest line's, so the nearest-line convention suits it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import simulator.frame as sim
import simulator.scan as scan
from stm_feedback import jitter
from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings
from stm_feedback.evaluation import baseline_analyzer, evaluate_frames, suite_frames

KEYS = ("atom_f1", "dimer_f1", "defect_f1", "site_found_rate", "false_safe_sites")
_captured: dict[str, np.ndarray] = {}
_jitter_lines = sim.jitter_lines


def _capture_jitter(rng: np.random.Generator, h: int, lam: float) -> np.ndarray:
    _captured["j"] = _jitter_lines(rng, h, lam)
    return _captured["j"]


def _nearest_unshift_x(x: np.ndarray, y: np.ndarray, o: np.ndarray, pixel_size_nm: float) -> np.ndarray:
    r = np.clip(np.rint(np.asarray(y, np.float64)).astype(np.int64), 0, len(o) - 1)
    return np.asarray(x, np.float64) - np.asarray(o, np.float64)[r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("n", type=int)
    ap.add_argument("--oracle-jitter", action="store_true")
    args = ap.parse_args()
    sim.jitter_lines = _capture_jitter
    feature_pixels, unshift_x = scan.ScanGeometry.feature_pixels, pl.unshift_x
    pipe = pl.Pipeline(load_settings())
    base = baseline_analyzer()
    if args.oracle_jitter:

        def oracle(*_a: object, **_k: object) -> jitter.LineJitter:
            j = _captured["j"] - np.median(_captured["j"])
            return jitter.LineJitter(offsets_px=j.astype(float), gain=1.0 if j.any() else 0.0)

        pl.estimate_line_jitter = oracle
    for name, nearest_truth, nearest_pipeline in (
        ("blob centre (now)", False, False),
        ("nearest line (before)", True, True),
        ("mixed: nearest-line truth, blob-centre pipeline", True, False),
    ):
        scan.ScanGeometry.feature_pixels = scan.ScanGeometry.to_pixels if nearest_truth else feature_pixels
        pl.unshift_x = _nearest_unshift_x if nearest_pipeline else unshift_x
        methods = {"nets": lambda f: pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)}
        if nearest_truth == nearest_pipeline and not args.oracle_jitter:  # the baseline has no pipeline side
            methods["baseline"] = lambda f: base(f.image_nm, f.pixel_size_nm, f.bias_v)
        for method, run in methods.items():
            _captured["j"] = np.zeros(1)
            m = evaluate_frames(suite_frames(args.suite, args.n), run, args.suite, method).metrics
            row = {"convention": name, "method": method, "oracle_jitter": args.oracle_jitter}
            print(json.dumps({**row, **{k: round(m[k], 4) for k in KEYS}}), flush=True)


if __name__ == "__main__":
    main()
