"""Safe-to-write planning: a per-pixel safe mask and ranked sites of k adjacent dimers on one row (or k x r).

Rules (``PlannerSettings``, defaults from ../shared/design/hsi-physics.md section 5):

- must-avoid defects keep a class-dependent margin: depressions ``depression_margin_nm``, adatoms/clusters
  ``adatom_margin_nm``, dihydrides ``dihydride_margin_nm``, unknown/unclassified ``unknown_margin_nm``;
- step edges keep ``step_margin_nm``; terrace -1 pixels (step or unknown) too;
- unresolved regions (terrace pixels outside every defect footprint and farther than ``resolved_radius_nm``
  from any detected atom) keep ``unknown_margin_nm``; the frame border keeps ``border_margin_nm``;
- writable defects (single DBs, DB pairs, earlier litho patches) impose nothing;
- a site's dimers are *detected* dimers, consecutive ones 0.384 nm (+- ``dimer_pitch_tol_nm``) apart along the
  terrace's fitted row direction, adjacent rows 0.768 nm apart along the row normal; every dimer of a site
  must be on a safe pixel.

Distances are Euclidean between pixel centres (cv2.distanceTransform, DIST_MASK_PRECISE), converted to nm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.config import PlannerSettings
from stm_feedback.errors import InputError
from stm_feedback.lattice import unit_vectors
from stm_feedback.physics import DEFECT_CLASSES, ROW_SPACING_NM, SURFACE_LATTICE_NM
from stm_feedback.schema import Site

HALF_PIXEL_DIAGONAL = math.sqrt(0.5)  # worst-case offset (px) of a point from its nearest pixel centre


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Pattern "KxR" -> (K dimers along the row, R adjacent rows): "3x1" = the single-donor window, "3x2" =
    2 rows x 3 dimers (the issue's "2x3 window")."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", pattern or "")
    if not m:
        raise InputError(f"planner pattern must look like '3x1' or '3x2', got {pattern!r}")
    k, r = int(m.group(1)), int(m.group(2))
    if not (1 <= k <= 20 and 1 <= r <= 5):
        raise InputError(f"planner pattern {pattern!r} out of range (1..20 dimers x 1..5 rows)")
    return k, r


def defect_rule(
    kind: str, label: str, height_rel: float, area_cells: float, settings: PlannerSettings
) -> tuple[bool, float]:
    """(must_avoid, margin_nm) of one defect.

    A class label (``physics.DEFECT_CLASSES``, e.g. from the supervised library classifier) decides by its
    ``must_avoid``; otherwise depressions are must-avoid, and a protrusion is writable (a DB / DB pair like
    blob) only when ``area_cells <= writable_max_area_cells`` and ``height_rel <= writable_max_height_rel``
    (both finite); larger or higher protrusions are adatom/cluster-like. Unknown kinds are must-avoid.
    """
    cls = DEFECT_CLASSES.get(label)
    if cls is not None:
        if not cls.must_avoid:
            return False, 0.0
        if cls.name == "adatom_cluster":
            return True, settings.adatom_margin_nm
        if cls.name == "dihydride":
            return True, settings.dihydride_margin_nm
        return True, settings.depression_margin_nm
    if kind == "depression":
        return True, settings.depression_margin_nm
    if kind == "protrusion":
        small = math.isfinite(area_cells) and area_cells <= settings.writable_max_area_cells
        low = math.isfinite(height_rel) and height_rel <= settings.writable_max_height_rel
        if small and low:
            return False, 0.0
        return True, settings.adatom_margin_nm
    return True, settings.unknown_margin_nm


def distance_px(feature: np.ndarray) -> np.ndarray:
    """Euclidean distance (px, float32) from every pixel centre to the nearest True pixel of ``feature``
    (a large number everywhere when ``feature`` is empty)."""
    if not feature.any():
        return np.full(feature.shape, 1e6, np.float32)
    src = np.where(feature, 0, 255).astype(np.uint8)
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def border_distance_px(shape: tuple[int, int]) -> np.ndarray:
    """Distance (px) of each pixel centre from the outermost pixel centres of the frame."""
    h, w = shape
    ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32)
    xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32)
    return np.minimum(ys[:, None], xs[None, :])


@dataclass
class Clearance:
    """Per-pixel planning maps (H, W): ``raw_nm`` = distance to the nearest must-avoid thing (defect footprint
    step/unknown pixel, unresolved pixel), margins not applied; ``slack_nm`` = smallest (distance - margin)
    over all rules including the border; ``safe`` = slack_nm >= 0 on a terrace."""

    raw_nm: np.ndarray
    slack_nm: np.ndarray
    safe: np.ndarray


def clearance_maps(
    terrace_labels: np.ndarray,
    step_mask: np.ndarray,
    unresolved: np.ndarray,
    avoid_masks: dict[float, np.ndarray],
    pixel_size_nm: float,
    settings: PlannerSettings,
) -> Clearance:
    """Build the planning maps. ``avoid_masks``: margin_nm -> (H, W) bool union of must-avoid footprints
    with that margin; ``unresolved`` (H, W) bool; ``step_mask`` (H, W) bool (step edges)."""
    off_terrace = (terrace_labels < 0) | step_mask
    d_step = distance_px(off_terrace) * pixel_size_nm
    d_unres = distance_px(unresolved) * pixel_size_nm
    raw = np.minimum(d_step, d_unres)
    slack = np.minimum(d_step - settings.step_margin_nm, d_unres - settings.unknown_margin_nm)
    for margin_nm, mask in avoid_masks.items():
        if mask.any():
            d = distance_px(mask) * pixel_size_nm
            raw = np.minimum(raw, d)
            slack = np.minimum(slack, d - margin_nm)
    slack = np.minimum(
        slack, border_distance_px(terrace_labels.shape) * pixel_size_nm - settings.border_margin_nm
    )
    safe = (slack >= 0) & ~off_terrace
    return Clearance(raw.astype(np.float32), slack.astype(np.float32), safe)


def _neighbour(tree: cKDTree, xy_nm: np.ndarray, step_nm: np.ndarray, tol_nm: float) -> np.ndarray:
    """Index of the dimer at xy + step (within tol), -1 where none."""
    d, j = tree.query(xy_nm + step_nm, k=1, distance_upper_bound=tol_nm)
    return np.where(np.isfinite(d), j, -1).astype(np.int64)


def propose_sites(
    dimers_xy_px: np.ndarray,
    dimer_terrace: np.ndarray,
    row_angles_deg: dict[int, float],
    clearance: Clearance,
    pixel_size_nm: float,
    settings: PlannerSettings,
) -> list[Site]:
    """Ranked sites (best first, at most ``max_sites``, no two sharing a dimer) of the configured pattern.

    Candidates: every chain of k detected dimers along +u (and r adjacent rows along +n) on one terrace whose
    dimers all sit on safe pixels. Rank by ``clearance_nm`` (largest first), ties by position (deterministic).
    ``clearance_nm`` = min over the site's dimers of ``raw_nm`` at the dimer's nearest pixel minus half
    a pixel diagonal (conservative point-to-footprint distance); ``score`` = min slack (nm) of its dimers.
    """
    k, r = parse_pattern(settings.pattern)
    xy_px = np.asarray(dimers_xy_px, float).reshape(-1, 2)
    ter = np.asarray(dimer_terrace, int).reshape(-1)
    if len(xy_px) == 0:
        return []
    h, w = clearance.safe.shape
    cols = np.clip(np.rint(xy_px[:, 0]).astype(int), 0, w - 1)
    rows = np.clip(np.rint(xy_px[:, 1]).astype(int), 0, h - 1)
    safe = clearance.safe[rows, cols]
    raw = clearance.raw_nm[rows, cols] - HALF_PIXEL_DIAGONAL * pixel_size_nm
    slack = clearance.slack_nm[rows, cols]
    xy_nm = xy_px * pixel_size_nm
    cands: list[tuple[float, float, float, list[int]]] = []  # (clearance, score, -position key, members)
    for t, angle in row_angles_deg.items():
        idx = np.flatnonzero((ter == t) & safe)
        if len(idx) < k * r:
            continue
        u, n = unit_vectors(angle)
        sub = xy_nm[idx]
        tree = cKDTree(sub)
        nxt = _neighbour(tree, sub, SURFACE_LATTICE_NM * u, settings.dimer_pitch_tol_nm)
        acr = _neighbour(tree, sub, ROW_SPACING_NM * n, settings.dimer_pitch_tol_nm)
        # chains: members[j] = local index of the j-th dimer along the row from each start
        chain = [np.arange(len(sub))]
        for _ in range(k - 1):
            prev = chain[-1]
            chain.append(np.where(prev >= 0, nxt[np.maximum(prev, 0)], -1))
        rows_of = [np.stack(chain, axis=1)]  # (N, k) for row 0
        for _ in range(r - 1):
            prev = rows_of[-1]
            rows_of.append(np.where(prev >= 0, acr[np.maximum(prev, 0)], -1))
        members = np.concatenate(rows_of, axis=1)  # (N, k*r) local indices, -1 = missing
        ok = np.all(members >= 0, axis=1)
        for m in members[ok]:
            g = idx[m]
            cands.append((float(raw[g].min()), float(slack[g].min()), g.tolist()))
    cands.sort(key=lambda c: (-c[0], -c[1], xy_px[c[2][0], 1], xy_px[c[2][0], 0]))
    used: set[int] = set()
    sites: list[Site] = []
    for clear, score, g in cands:
        if used.intersection(g):
            continue
        used.update(g)
        pts = xy_px[g]
        c = pts.mean(axis=0)
        sites.append(
            Site(
                center_x_px=float(c[0]),
                center_y_px=float(c[1]),
                dimers=[[float(x), float(y)] for x, y in pts],
                terrace=int(ter[g[0]]),
                clearance_nm=round(clear, 4),
                pattern=f"{k}x{r}",
                score=round(score, 4),
            )
        )
        if len(sites) >= settings.max_sites:
            break
    return sites
