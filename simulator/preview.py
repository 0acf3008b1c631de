"""PNG previews of simulated frames: plane-levelled, percentile-stretched grey image, optional truth
overlay."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from simulator.truth import GroundTruth


def level_plane(z_nm: np.ndarray) -> np.ndarray:
    """z minus its least-squares plane (nm)."""
    h, w = z_nm.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.c_[xx.ravel(), yy.ravel(), np.ones(h * w)]
    coef, *_ = np.linalg.lstsq(a, z_nm.ravel().astype(np.float64), rcond=None)
    return z_nm - (a @ coef).reshape(h, w)


def to_grey(z_nm: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """uint8 grey image of the plane-levelled heights, stretched between two percentiles."""
    z = level_plane(z_nm)
    lo, hi = np.percentile(z, [lo_pct, hi_pct])
    return (np.clip((z - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def render_preview(z_nm: np.ndarray, truth: GroundTruth | None = None, scale: int = 2) -> np.ndarray:
    """BGR uint8 preview, upscaled by ``scale``; with truth: step mask darkened, defect footprints outlined
    (green protrusions, magenta depressions), unresolved areas outlined in yellow."""
    g = cv2.resize(to_grey(z_nm), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    img = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    if truth is None:
        return img

    def up(mask: np.ndarray) -> np.ndarray:
        return (
            cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) > 0
        )

    img[up(truth.step_mask)] = (img[up(truth.step_mask)] * 0.6).astype(np.uint8)
    kinds = {d.id: d.kind for d in truth.defects}
    for kind, colour in (("protrusion", (0, 220, 0)), ("depression", (220, 0, 220))):
        ids = [k for k, v in kinds.items() if v == kind]
        m = up(np.isin(truth.defect_instances, ids)).astype(np.uint8)
        cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, cnts, -1, colour, 1)
    m = up(truth.unresolved_mask).astype(np.uint8)
    cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, cnts, -1, (0, 220, 220), 1)
    return img


def write_preview(
    path: str | Path, z_nm: np.ndarray, truth: GroundTruth | None = None, scale: int = 2
) -> None:
    """Write render_preview(...) to a PNG file."""
    if not cv2.imwrite(str(path), render_preview(z_nm, truth, scale)):
        raise OSError(f"could not write {path}")
