"""How often the scan-line jitter estimate gets a line's offset right (models/MODEL_CARD.md, session 12).

The pipeline analyses each frame once; the inputs of its ``jitter.estimate_line_jitter`` call and the
simulator's true line offsets are captured, then the estimate is rerun on them with each set of keyword
overrides. Scored on the jittered frames only: the fraction of lines whose whole-pixel offset (the pipeline
moves lines by ``rint`` of the estimate) equals the true one (median removed, as the estimate's), and the
fraction within 1 px.

    python benchmarks/line_jitter_accuracy.py PRESET FIRST_SEED N [OVERRIDES ...]
    # hard 800000 40 "" "prior=0.0" "prior=0.05" "sigma_lines=6.0" "sigma_lines=20.0" "iters=5" in the card
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import simulator.frame as sim
from stm_feedback import pipeline as pl
from stm_feedback.config import load_settings
from stm_feedback.evaluation import simulated_frames
from stm_feedback.jitter import estimate_line_jitter

_jitter_lines = sim.jitter_lines
_captured: dict[str, Any] = {}


def _capture_jitter(rng: np.random.Generator, h: int, lam: float) -> np.ndarray:
    _captured["j"] = _jitter_lines(rng, h, lam)
    return _captured["j"]


def _capture_call(*args: Any, **kw: Any) -> Any:
    _captured["call"] = (args, kw)
    return estimate_line_jitter(*args, **kw)


def main() -> None:
    preset, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    overrides = sys.argv[4:] or [""]
    sim.jitter_lines = _capture_jitter
    pl.estimate_line_jitter = _capture_call
    pipe = pl.Pipeline(load_settings())
    cases = []
    for f in simulated_frames(preset, first, n):
        _captured.pop("call", None)
        pipe.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
        j = _captured["j"]
        if "call" in _captured and j.any():
            cases.append((j - np.median(j), *_captured["call"]))
    print(f"{len(cases)} jittered frames of {n}")
    for text in overrides:
        over = {k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
        exact = within1 = lines = 0
        for truth, args, kw in cases:
            est = np.rint(estimate_line_jitter(*args, **{**kw, **over}).offsets_px)
            exact += int(np.sum(est == truth))
            within1 += int(np.sum(np.abs(est - truth) <= 1))
            lines += len(truth)
        print(f"{text or 'defaults'}: exact {exact / lines:.3f}, within 1 px {within1 / lines:.3f}")


if __name__ == "__main__":
    main()
