"""Can scan-line jitter be measured from the image? A probe of the simplest estimator (not used by the
pipeline): each line is aligned to the mean of its 2k neighbour lines (integer search +- max_px, parabolic
sub-pixel step, a few iterations), and the estimate is compared with the simulator's true per-line offsets
(``simulator.frame.jitter_lines``, captured). Prints, per frame, the true jitter rms, the estimate's error
rms (px, after removing the median) and the fraction of lines within 0.5 px (models/MODEL_CARD.md, session 8).

    python benchmarks/line_jitter_probe.py PRESET FIRST_SEED N [--force-lambda-px L]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from scipy import ndimage

import simulator.frame as sim_frame

_captured: dict[str, np.ndarray] = {}
_jitter_lines = sim_frame.jitter_lines


def _capture(rng: np.random.Generator, h: int, lam_px: float) -> np.ndarray:
    j = _jitter_lines(rng, h, lam_px)
    _captured["jitter_px"] = j
    return j


sim_frame.jitter_lines = _capture  # simulate_frame looks the name up in its module at call time


def shift_rows(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """out[y, x] = a[y, x + d[y]] (px; linear interpolation, edges clamped)."""
    h, w = a.shape
    x = np.clip(np.arange(w)[None, :] + d[:, None], 0, w - 1)
    x0 = np.minimum(np.floor(x).astype(np.intp), w - 2)
    f = x - x0
    r = np.arange(h)[:, None]
    return a[r, x0] * (1 - f) + a[r, x0 + 1] * f


def estimate_line_shifts(img: np.ndarray, max_px: int = 5, k: int = 2, iters: int = 3) -> np.ndarray:
    """Per-line shifts d (px) such that shift_rows(img, d) has aligned lines (d ~ -jitter + const)."""
    a = img - np.median(img, axis=1, keepdims=True)
    a = a - ndimage.gaussian_filter1d(a, 8, axis=1)
    a = a / (a.std() + 1e-12)
    h, w = a.shape
    shifts = np.arange(-max_px, max_px + 1)
    cands = np.stack([shift_rows(a, np.full(h, float(s))) for s in shifts])
    m = slice(max_px, w - max_px)
    rows = np.arange(h)
    d = np.zeros(h)
    for _ in range(iters):
        cur = shift_rows(a, d)
        c = np.cumsum(np.pad(cur, ((k + 1, k), (0, 0)), mode="edge"), axis=0)
        ref = (c[2 * k + 1 :] - c[: -2 * k - 1] - cur) / (2 * k)  # mean of the 2k neighbour lines
        cost = ((cands[:, :, m] - ref[None, :, m]) ** 2).mean(-1)
        i = np.clip(cost.argmin(0), 1, len(shifts) - 2)
        c0, c1, c2 = cost[i - 1, rows], cost[i, rows], cost[i + 1, rows]
        den = c0 - 2 * c1 + c2
        sub = np.where(den > 0, 0.5 * (c0 - c2) / np.where(den > 0, den, 1), 0.0)
        dn = shifts[i] + np.clip(sub, -0.5, 0.5)
        d = dn - np.median(dn)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("first_seed", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--force-lambda-px", type=float, default=None, help="jitter every line: Poisson lambda")
    args = ap.parse_args()
    cfg = sim_frame.SimConfig.preset(args.preset)
    if args.force_lambda_px is not None:
        lam = args.force_lambda_px
        cfg = dataclasses.replace(cfg, p_jitter=1.0, jitter_lambda_px=(lam, lam))
    for seed in range(args.first_seed, args.first_seed + args.n):
        f = sim_frame.simulate_frame(seed, size_px=256, pixel_size_nm=None, config=cfg)
        j = _captured["jitter_px"]
        e = estimate_line_shifts(f.image_nm) + j
        e -= np.median(e)
        print(
            f"{seed} pixel {f.truth.pixel_size_nm:.3f} nm"
            f"  true rms {np.sqrt(np.mean((j - np.median(j)) ** 2)):.2f} px"
            f"  error rms {np.sqrt(np.mean(e**2)):.2f} px  within 0.5 px {np.mean(np.abs(e) < 0.5):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
