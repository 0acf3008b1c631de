"""Safe-to-write planning: a per-pixel safe mask and ranked sites of k adjacent dimers on one row (or k x r).

Rules (``PlannerSettings``, defaults from ../shared/design/hsi-physics.md section 5):

- must-avoid defects keep a class-dependent margin: depressions ``depression_margin_nm``, adatoms/clusters
  ``adatom_margin_nm``, dihydrides ``dihydride_margin_nm``, unknown/unclassified ``unknown_margin_nm``;
- step edges keep ``step_margin_nm``; terrace -1 pixels (step or unknown) too;
- unresolved regions (terrace pixels outside every defect footprint and farther than ``resolved_radius_nm``
  from any detected atom) keep ``unknown_margin_nm``; the frame border keeps ``border_margin_nm``;
- writable defects (single DBs, DB pairs, earlier litho patches) impose nothing;
- holes (``lattice_holes``: a lattice position next to detected dimers without a dimer of its own) keep
  ``hole_margin_nm``; step and defect margins of detected features are widened by ``detection_pad_nm``;
- suspect dimers (``suspect_dimers``: sub-threshold NN-2 depression probability or a dark row centre line
  under a detected dimer, i.e. a defect the nets did not report) keep ``suspect_margin_nm``; stretched dimers
  (``lattice_anomalies``) keep ``anomaly_margin_nm``; the pipeline adds the orientation band
  (``orientation_band``) and NN-0 step probability >= ``step_prob_plan`` to the step pixels;
- a site's dimers are *detected* dimers, consecutive ones 0.384 nm (+- ``dimer_pitch_tol_nm``) apart along the
  terrace's fitted row direction, adjacent rows 0.768 nm apart along the row normal; every dimer of a site
  must be on a safe pixel.

Distances are Euclidean between pixel centres (cv2.distanceTransform, DIST_MASK_PRECISE; one transform per
margin class), converted to nm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from scipy.spatial import cKDTree

from stm_feedback.config import PlannerSettings
from stm_feedback.errors import InputError
from stm_feedback.physics import DEFECT_CLASSES, ROW_SPACING_NM, SURFACE_LATTICE_NM
from stm_feedback.preprocess import fast_median
from stm_feedback.schema import Site

HALF_PIXEL_DIAGONAL = math.sqrt(0.5)  # worst-case offset (px) of a point from its nearest pixel centre
HOLE_TOL_NM = 0.15  # a predicted lattice position with a detected dimer within this is not a hole


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
    src = np.logical_not(feature).view(np.uint8)  # 0 on the feature, 1 elsewhere: a view, no copy
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def border_distance_px(shape: tuple[int, int]) -> np.ndarray:
    """Distance (px) of each pixel centre from the outermost pixel centres of the frame."""
    h, w = shape
    ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32)
    xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32)
    return np.minimum(ys[:, None], xs[None, :])


@lru_cache(maxsize=64)
def _near_kernel(radius_nm: float, pixel_size_nm: float, inclusive: bool) -> np.ndarray:
    """uint8 kernel of the pixel offsets o with f32(dist(o)) * s < radius_nm (``inclusive``: <=), evaluated
    with exactly the float32 arithmetic of ``distance_px(mask) * s - radius_nm`` (the distances come from
    cv2.distanceTransform itself), so dilating a mask with it gives the same pixels as thresholding the
    distance map."""
    r = int(math.ceil(radius_nm / pixel_size_nm)) + 1
    src = np.full((2 * r + 1, 2 * r + 1), 255, np.uint8)
    src[r, r] = 0
    d_nm = cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * pixel_size_nm
    return ((d_nm <= radius_nm) if inclusive else (d_nm - radius_nm < 0)).astype(np.uint8)


# above this kernel radius (px) one exact distance transform of the frame is cheaper than a dilation
_MAX_DILATE_RADIUS_PX = 14


def near_mask(
    feature: np.ndarray, radius_nm: float, pixel_size_nm: float, inclusive: bool = False
) -> np.ndarray:
    """Pixels whose centre is closer than ``radius_nm`` (``inclusive``: or exactly at) to a True pixel of
    ``feature``: identical to ``distance_px(feature) * s - radius_nm < 0`` (or ``... * s <= radius_nm``),
    computed by a dilation with an exact disk kernel when that is cheaper than the distance transform."""
    if radius_nm <= 0 and not inclusive:
        return np.zeros(feature.shape, bool)
    if not feature.any():
        return np.zeros(feature.shape, bool)
    if int(math.ceil(radius_nm / pixel_size_nm)) + 1 > _MAX_DILATE_RADIUS_PX:
        d_nm = distance_px(feature) * pixel_size_nm
        return (d_nm <= radius_nm) if inclusive else (d_nm - radius_nm < 0)
    kernel = _near_kernel(float(radius_nm), float(pixel_size_nm), inclusive)
    return cv2.dilate(feature.astype(np.uint8), kernel) > 0


@dataclass
class Clearance:
    """Planning maps, all (H, W): ``safe`` bool = terrace pixel with slack >= 0; ``raw_nm`` float32 = distance
    to the nearest must-avoid thing (defect footprint, step/unknown pixel, unresolved pixel), margins not
    applied; ``slack_nm`` float32 = smallest (distance - margin) over all rules including the border.
    ``at(rows, cols)`` reads (raw_nm, slack_nm) at given pixels."""

    safe: np.ndarray
    raw_nm: np.ndarray
    slack_nm: np.ndarray
    pixel_size_nm: float

    def at(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw_nm, slack_nm) float32 at pixels (rows, cols)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        return self.raw_nm[rows, cols], self.slack_nm[rows, cols]


def upper_side_mask(
    height: np.ndarray, off_terrace: np.ndarray, pixel_size_nm: float, smooth_nm: float = 0.6
) -> np.ndarray:
    """(H, W) bool: pixels higher than the step band next to them, i.e. on the *upper* terrace side of their
    nearby step: the smoothed ``height`` (Gaussian sigma ``smooth_nm``) at the pixel is at least the local
    mean smoothed height of the off-terrace pixels (``off_terrace``) around it (weights: a Gaussian of sigma
    ``BAND_LEVEL_SIGMA_NM``; ties count as upper, the larger margin). Far from any off-terrace pixel the answer is meaningless; callers use it
    near steps only. Computed on a grid of ~0.3 nm pixels: a side decision, not a position.

    Why: the tip images a step where its lowest apex first reaches the upper terrace, so a finite or double
    tip makes the upper terrace look wider and moves the apparent edge into the lower terrace by up to the
    tip's lateral reach (a double tip: its apex offset, 0.3-2 nm in our simulator). The true edge can lie on
    the upper side of the detected one, never on the lower side. ``height``: levelled topography (upper
    terraces higher, whatever the bias polarity); the smoothing removes the 0.77 nm row corrugation."""
    h, w = off_terrace.shape
    out = np.zeros((h, w), bool)
    if not off_terrace.any():
        return out
    f = max(1, int(UPPER_GRID_NM / pixel_size_nm))  # coarse grid: f x f pixels per cell
    hs, ws = max(1, h // f), max(1, w // f)
    small_s = pixel_size_nm * w / ws
    z = cv2.resize(np.asarray(height, np.float32), (ws, hs), interpolation=cv2.INTER_AREA)
    band = cv2.resize(off_terrace.astype(np.float32), (ws, hs), interpolation=cv2.INTER_AREA)
    z = cv2.GaussianBlur(z, (0, 0), max(0.3, smooth_nm / small_s))
    sig = BAND_LEVEL_SIGMA_NM / small_s
    level = cv2.GaussianBlur(z * band, (0, 0), sig) / np.maximum(cv2.GaussianBlur(band, (0, 0), sig), 1e-6)
    up = (z >= level).astype(np.uint8)  # ties count as upper (the larger margin)
    return cv2.resize(up, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


UPPER_GRID_NM = 0.3  # cell of the coarse grid of upper_side_mask
BAND_LEVEL_SIGMA_NM = 1.5  # reach of the step-band level a pixel is compared with


def clearance_maps(
    terrace_labels: np.ndarray,
    step_mask: np.ndarray,
    unresolved: np.ndarray,
    avoid_masks: dict[float, np.ndarray],
    pixel_size_nm: float,
    settings: PlannerSettings,
    height: np.ndarray | None = None,
) -> Clearance:
    """Build the planning maps. ``avoid_masks``: margin_nm -> (H, W) bool union of must-avoid footprints
    with that margin; ``unresolved`` (H, W) bool; ``step_mask`` (H, W) bool (step edges).

    Every step and ``avoid_masks`` margin is widened by ``settings.detection_pad_nm`` (detected footprints
    and step masks are slightly smaller than the truth; 0 when planning on truth masks), steps by
    ``settings.step_extra_pad_nm`` more.
    One exact distance transform per margin class (cv2.distanceTransform, DIST_MASK_PRECISE; masks with
    equal margins are merged): slack = min over rules of (distance * s - margin) and the border slack
    (float32), raw = min distance; safe = on a terrace and slack >= 0 (identical to thresholding each rule's
    distance map, ``near_mask``).

    ``height`` (levelled topography of the frame, detected maps only): step pixels also keep
    ``step_margin_nm + detection_pad_nm + step_upper_extra_nm`` on the upper-terrace side
    (``upper_side_mask``).
    """
    s = float(pixel_size_nm)  # a Python float keeps the float32 maps float32 (NEP 50)
    pad = max(0.0, settings.detection_pad_nm)
    off_terrace = (terrace_labels < 0) | step_mask
    rules: dict[float, np.ndarray] = {}
    step_pad = pad + max(0.0, settings.step_extra_pad_nm)
    rule_list = [(off_terrace, settings.step_margin_nm + step_pad), (unresolved, settings.unknown_margin_nm)]
    for m, g in rule_list + [(mask, margin + pad) for margin, mask in avoid_masks.items()]:
        m = np.asarray(m, bool)
        if m.any():
            g = float(g)
            rules[g] = (rules[g] | m) if g in rules else m
    slack = (border_distance_px(terrace_labels.shape) * s - settings.border_margin_nm).astype(np.float32)
    raw = np.full(slack.shape, np.float32(1e6) * s, np.float32)  # distance_px of an empty mask
    step_d_nm = None  # distance to the off-terrace pixels alone, when that rule was not merged with others
    for margin, mask in rules.items():
        d_nm = distance_px(mask) * s
        np.minimum(raw, d_nm, out=raw)
        np.minimum(slack, d_nm - margin, out=slack)
        if mask is off_terrace:
            step_d_nm = d_nm
    if height is not None and settings.step_upper_extra_nm > 0 and off_terrace.any():
        upper_margin = settings.step_margin_nm + step_pad + settings.step_upper_extra_nm
        d_off = step_d_nm if step_d_nm is not None else distance_px(off_terrace) * s
        near = (d_off < upper_margin) & upper_side_mask(height, off_terrace, s)
        np.minimum(slack, np.where(near, d_off - upper_margin, np.float32(np.inf)), out=slack)
    safe = (slack >= 0) & ~off_terrace
    return Clearance(safe, raw, slack, s)


def lattice_holes(
    dimers_xy_px: np.ndarray,
    dimer_angle_deg: np.ndarray,
    dimer_terrace: np.ndarray,
    terrace_labels: np.ndarray,
    pixel_size_nm: float,
    tol_nm: float,
) -> np.ndarray:
    """(H, W) bool: pixels of *holes*, single lattice positions without a detected dimer between two
    detected ones: for each dimer and each of its directions +-0.384 nm along its row (``dimer_angle_deg``)
    and +-0.768 nm across, the neighbour position is a hole when no dimer lies within ``tol_nm`` of it but
    one lies within ``tol_nm`` of the next position beyond, on the same terrace (``terrace_labels``); marked
    at its nearest pixel. A dihydride or a single missing dimer the defect net does not report looks exactly
    like this; the ragged edge of a region where dimers were not detected does not (that is the unresolved
    rule's job)."""
    h, w = terrace_labels.shape
    out = np.zeros((h, w), bool)
    xy = np.asarray(dimers_xy_px, float).reshape(-1, 2)
    ang = np.asarray(dimer_angle_deg, float).reshape(-1)
    ter = np.asarray(dimer_terrace, int).reshape(-1)
    ok = np.isfinite(ang)
    if ok.sum() < 2:
        return out
    xy_nm, ang, ter = xy[ok] * pixel_size_nm, np.deg2rad(ang[ok]), ter[ok]
    u = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    n = np.stack([-np.sin(ang), np.cos(ang)], axis=1)
    step = np.concatenate(
        [SURFACE_LATTICE_NM * u, -SURFACE_LATTICE_NM * u, ROW_SPACING_NM * n, -ROW_SPACING_NM * n]
    )
    base = np.tile(xy_nm, (4, 1))
    tree = cKDTree(xy_nm)
    d1, _ = tree.query(base + step, k=1, distance_upper_bound=tol_nm)
    sel = ~np.isfinite(d1)
    d2, _ = tree.query(base[sel] + 2 * step[sel], k=1, distance_upper_bound=tol_nm)
    hole = (base[sel] + step[sel])[np.isfinite(d2)] / pixel_size_nm
    src_ter = np.tile(ter, 4)[sel][np.isfinite(d2)]
    c = np.rint(hole[:, 0]).astype(np.int64)
    r = np.rint(hole[:, 1]).astype(np.int64)
    inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    c, r, src_ter = c[inside], r[inside], src_ter[inside]
    same = terrace_labels[r, c] == src_ter
    out[r[same], c[same]] = True
    return out


def lattice_anomalies(
    atoms_xy_px: np.ndarray,
    dimer_pairs: np.ndarray,
    shape: tuple[int, int],
    pixel_size_nm: float,
    max_bond_nm: float,
    max_split_nm: float = 0.55,
    atom_angle_deg: np.ndarray | None = None,
    max_tilt_deg: float = 30.0,
) -> np.ndarray:
    """(H, W) bool: midpoints of *stretched dimers*: accepted dimers whose bond is longer than
    ``max_bond_nm``, and mutually nearest pairs of atoms that are in no dimer, between ``max_bond_nm`` and
    ``max_split_nm`` apart along the dimer bond direction (within ``max_tilt_deg`` of the row normal given
    by ``atom_angle_deg``, the row direction at each atom; pairs of atoms without a finite angle do not
    count): a dimer's atoms are 0.24 nm apart, neighbours along a row 0.384 nm. A dihydride
    (SiH2: the dimer's two atoms pushed ~0.1 nm apart towards the troughs), which the defect net does not
    report, looks like this; single stray atoms (edges of resolved regions, noise) do not count."""
    h, w = shape
    out = np.zeros((h, w), bool)
    xy = np.asarray(atoms_xy_px, float).reshape(-1, 2)
    pairs = np.asarray(dimer_pairs, np.int64).reshape(-1, 2)
    if len(xy) < 2:
        return out
    s = pixel_size_nm
    bond_nm = np.hypot(*(xy[pairs[:, 1]] - xy[pairs[:, 0]]).T) * s
    mids = [(xy[pairs[bond_nm > max_bond_nm, 0]] + xy[pairs[bond_nm > max_bond_nm, 1]]) / 2]
    paired = np.zeros(len(xy), bool)
    paired[pairs.ravel()] = True
    lone = np.flatnonzero(~paired)
    if len(lone) >= 2:
        d, j = cKDTree(xy[lone] * s).query(xy[lone] * s, k=2)
        nn = j[:, 1]
        mutual = (j[nn, 1] == np.arange(len(lone))) & (np.arange(len(lone)) < nn)
        split = mutual & (d[:, 1] > max_bond_nm) & (d[:, 1] <= max_split_nm)
        ang = np.full(len(xy), np.nan) if atom_angle_deg is None else np.asarray(atom_angle_deg, float)
        a = np.deg2rad(ang[lone])
        v = xy[lone[nn]] - xy[lone]
        along = np.abs(v[:, 0] * np.cos(a) + v[:, 1] * np.sin(a)) / np.maximum(
            np.hypot(v[:, 0], v[:, 1]), 1e-9
        )
        split &= along <= np.sin(np.deg2rad(max_tilt_deg))  # NaN angle -> False
        mids.append((xy[lone[split]] + xy[lone[nn[split]]]) / 2)
    pts = np.concatenate(mids)
    c = np.clip(np.rint(pts[:, 0]).astype(np.int64), 0, w - 1)
    r = np.clip(np.rint(pts[:, 1]).astype(np.int64), 0, h - 1)
    out[r, c] = True
    return out


# sample points of the dark-centre-line test (nm, row frame): 3 along the row (-0.1, 0, 0.1) on the centre
# line and on the lines 0.2 nm to either side; weights: centre-line mean minus the mean of both side lines
_SUSPECT_ALONG_NM = np.array([-0.1, 0.0, 0.1] * 3, np.float32)
_SUSPECT_ACROSS_NM = np.repeat(np.array([0.0, -0.2, 0.2], np.float32), 3)
_SUSPECT_WEIGHTS = np.where(_SUSPECT_ACROSS_NM == 0, 1 / 3, -1 / 6).astype(np.float32)


def suspect_dimers(
    dimers_xy_px: np.ndarray,
    dimer_angle_deg: np.ndarray,
    dimer_terrace: np.ndarray,
    image_norm: np.ndarray,
    depression_prob: np.ndarray,
    pixel_size_nm: float,
    depression_prob_min: float,
    radius_nm: float,
    centre_z_min: float,
) -> np.ndarray:
    """(M,) bool: detected dimers that look like an undetected defect (a dihydride, a vacancy) under them.

    Two independent pieces of evidence, either suffices (< 0 switches one off):

    - *sub-threshold depression*: the defect net's ``depression_prob`` reaches ``depression_prob_min``
      within ``radius_nm`` of the dimer centre (NN-2 gives dihydrides 0.1-0.7 but rarely the 0.5 of its
      blob threshold);
    - *dark centre line*: in the polarity-corrected ``image_norm`` (rows bright), the mean along the row
      centre line (0, +-0.1 nm along the row ``dimer_angle_deg``, on the centre) minus the mean 0.2 nm to
      either side across the row, as a robust z-score against all dimers of the same terrace
      ((median - value) / (1.4826 MAD)) is >= ``centre_z_min``: a dihydride pushes its atoms ~0.1 nm apart
      towards the troughs and leaves a dark line along the row centre.

    Dimers without a finite angle get only the first test. Bilinear sampling (cv2.remap)."""
    xy = np.asarray(dimers_xy_px, np.float64).reshape(-1, 2)
    out = np.zeros(len(xy), bool)
    if not len(xy):
        return out
    h, w = depression_prob.shape
    cols = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, w - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, h - 1)
    if depression_prob_min >= 0:
        r = max(0, int(math.floor(radius_nm / pixel_size_nm)))
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        # max over the disk's pixels around each dimer's pixel (in the frame): one dilation of the map, read
        # at the dimers (cheaper than gathering the disk at ~1000 dimers; max is exact either way)
        dep = np.ascontiguousarray(depression_prob)
        if dep.dtype not in (np.float32, np.float64):  # dtypes cv2.dilate takes; ints stay exact in float64
            dep = dep.astype(np.float64)
        grown = cv2.dilate(dep, disk)
        out |= grown[rows, cols] >= depression_prob_min
    ang = np.asarray(dimer_angle_deg, float).reshape(-1)
    ter = np.asarray(dimer_terrace, np.int64).reshape(-1)
    ok = np.isfinite(ang)
    if centre_z_min >= 0 and ok.sum() >= 10:
        a = np.deg2rad(ang[ok]).astype(np.float32)
        ca, sa = np.cos(a)[:, None] / pixel_size_nm, np.sin(a)[:, None] / pixel_size_nm  # px per nm
        x0 = xy[ok, 0].astype(np.float32)[:, None]
        y0 = xy[ok, 1].astype(np.float32)[:, None]
        # x = x0 + along * u_x + across * n_x, y = y0 + along * u_y + across * n_y; u = (c, s), n = (-s, c)
        mx = x0 + _SUSPECT_ALONG_NM * ca - _SUSPECT_ACROSS_NM * sa
        my = y0 + _SUSPECT_ALONG_NM * sa + _SUSPECT_ACROSS_NM * ca
        # cv2.remap needs maps narrower and shorter than 32767: 256 dimers per map row, zero-padded
        n_pts, per_row = mx.shape[0], 256
        n_rows = -(-n_pts // per_row)
        maps_xy = np.zeros((2, n_rows * per_row, len(_SUSPECT_WEIGHTS)), np.float32)
        maps_xy[0, :n_pts], maps_xy[1, :n_pts] = mx, my
        v = cv2.remap(
            np.ascontiguousarray(image_norm, np.float32),
            maps_xy[0].reshape(n_rows, -1),
            maps_xy[1].reshape(n_rows, -1),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        ).reshape(-1, len(_SUSPECT_WEIGHTS))[:n_pts]
        contrast = v @ _SUSPECT_WEIGHTS  # centre-line mean minus the mean of the two side lines
        t = ter[ok]
        z = np.zeros(len(t))
        for tid in np.unique(t).tolist():
            sel = t == tid
            if sel.sum() < 10:  # too few dimers for a terrace reference
                continue
            c = contrast[sel]
            med = c.dtype.type(fast_median(c))  # = np.median(c), bit for bit, at ~1/2 of its cost
            mad = 1.4826 * c.dtype.type(fast_median(np.abs(c - med)))
            z[sel] = (med - c) / max(mad, 1e-6)
        flag = np.zeros(len(xy), bool)
        flag[np.flatnonzero(ok)] = z >= centre_z_min
        out |= flag
    return out


def step_continuations(
    step_mask: np.ndarray,
    pixel_size_nm: float,
    min_length_nm: float,
    fit_nm: float = 3.0,
    max_elongation: float = 0.5,
) -> np.ndarray:
    """(H, W) bool: straight continuations of detected steps that end inside the frame.

    A step edge separates two terraces, so it cannot end on a terrace: it leaves the frame or closes on
    itself. Where a detected step stops short of the border, NN-0 lost it (most often within ~1.5 nm of the
    border, where it sees too little of the far terrace; models/MODEL_CARD.md session 11). Each 8-connected
    component of ``step_mask`` at least ``min_length_nm`` long and elongated (minor / major principal
    standard deviation <= ``max_elongation``: rings around islands and blobs are left alone) is followed to
    its two ends along its principal axis; each end is continued as a 1 px line from the end, in the
    direction fitted (principal axis) to the component's pixels within ``fit_nm`` of that end, until it
    leaves the frame (an end on the border pixels is where the step leaves it: nothing to continue).
    Pixels in image coordinates (row = y, col = x)."""
    m = np.asarray(step_mask, bool)
    h, w = m.shape
    out = np.zeros((h, w), np.uint8)
    # components and directions on a 2x coarser grid (block any): step bands are several pixels wide, and
    # it is ~4x cheaper; the lines are drawn on the full grid
    f = 2
    hc, wc = -(-h // f), -(-w // f)
    padded = m
    if (h % f) or (w % f):
        padded = np.zeros((hc * f, wc * f), bool)
        padded[:h, :w] = m
    mc = padded[0::2, 0::2] | padded[1::2, 0::2] | padded[0::2, 1::2] | padded[1::2, 1::2]
    s = float(pixel_size_nm) * f  # nm per coarse pixel
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mc.view(np.uint8), connectivity=8)
    min_px = min_length_nm / s
    diag = math.hypot(h, w)
    for k in range(1, n):
        if max(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]) < min_px * 0.7:
            continue  # shorter than min_length along any direction (0.7: the box of a diagonal line)
        x0, y0 = stats[k, cv2.CC_STAT_LEFT], stats[k, cv2.CC_STAT_TOP]
        sub = lab[y0 : y0 + stats[k, cv2.CC_STAT_HEIGHT], x0 : x0 + stats[k, cv2.CC_STAT_WIDTH]] == k
        ys, xs = np.nonzero(sub)
        pts = np.stack([xs + x0, ys + y0], axis=1).astype(np.float64)
        centre = pts.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov((pts - centre).T))
        if evals[1] <= 0 or math.sqrt(max(evals[0], 0.0) / evals[1]) > max_elongation:
            continue
        axis = evecs[:, 1]
        t = (pts - centre) @ axis
        if t.max() - t.min() < min_px:
            continue
        for sign in (1.0, -1.0):
            ts = sign * t
            near = ts >= ts.max() - fit_nm / s
            local = pts[near]
            if len(local) < 3:
                continue
            tip = pts[ts >= ts.max() - 1.0].mean(axis=0)  # the outermost pixels
            if min(tip[0], tip[1], wc - 1 - tip[0], hc - 1 - tip[1]) <= 1.0:
                continue  # the step leaves the frame here
            lc = local.mean(axis=0)
            le, lv = np.linalg.eigh(np.cov((local - lc).T))
            d = lv[:, 1] if le[1] > 0 else axis
            if np.dot(d, tip - centre) < 0:
                d = -d  # outward, away from the component
            tip = tip * f + 0.5 * (f - 1)  # coarse pixel centre -> full-grid pixel coordinates
            a = (int(round(tip[0])), int(round(tip[1])))
            b = (int(round(tip[0] + d[0] * diag)), int(round(tip[1] + d[1] * diag)))
            cv2.line(out, a, b, 1, thickness=1)
    return out.astype(bool)


def orientation_band(
    dimers_xy_px: np.ndarray,
    dimer_angle_deg: np.ndarray,
    shape: tuple[int, int],
    pixel_size_nm: float,
    reach_nm: float,
) -> np.ndarray:
    """(H, W) bool: pixels within ``reach_nm`` of detected dimers of *both* row orientations (rows of
    adjacent Si(100) terraces are 90 deg apart, so two orientations meeting means a step lies between them,
    detected or not). Orientation of a dimer: its ``dimer_angle_deg`` closer to theta0 or to theta0 + 90,
    theta0 = the circular median of all angles modulo 90. Computed on a 2x coarser grid, so the band may be up
    to ~1.5 px wider than the exact one (never narrower)."""
    h, w = shape
    out = np.zeros((h, w), bool)
    ang = np.asarray(dimer_angle_deg, float).reshape(-1)
    xy = np.asarray(dimers_xy_px, float).reshape(-1, 2)
    ok = np.isfinite(ang)
    if ok.sum() < 2:
        return out
    xy, ang = xy[ok], ang[ok]
    z = np.exp(1j * np.deg2rad(4.0 * ang))  # period 90 deg
    theta0 = np.rad2deg(np.angle(np.median(z.real) + 1j * np.median(z.imag))) / 4.0
    rel = (ang - theta0) % 180.0
    other = np.abs(rel - 90.0) < 45.0
    if not other.any() or other.all():
        return out
    s = pixel_size_nm
    # only whether any pair is that close counts, so the cheaper unbalanced tree build (same distances)
    tree = cKDTree(xy[other] * s, balanced_tree=False, compact_nodes=False)
    d, _ = tree.query(xy[~other] * s, k=1, distance_upper_bound=2.0 * reach_nm)
    if not np.isfinite(d).any():  # no two dimers of different orientation within 2 reach: no band
        return out
    # on a grid coarsened by f (block max), widened by the block's half diagonal: a superset of the exact
    # band (conservative), at 1/f^2 of the cost
    f = 2
    hc, wc = -(-h // f), -(-w // f)
    c = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, w - 1) // f
    r = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, h - 1) // f
    a = np.zeros((hc, wc), bool)
    b = np.zeros((hc, wc), bool)
    a[r[~other], c[~other]] = True
    b[r[other], c[other]] = True
    reach_c = reach_nm + 2.0 * HALF_PIXEL_DIAGONAL * (f - 1) * s  # both ends may sit anywhere in a block
    band = near_mask(a, reach_c, f * s) & near_mask(b, reach_c, f * s)
    return np.repeat(np.repeat(band, f, axis=0), f, axis=1)[:h, :w]


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
    dimer_angle_deg: np.ndarray | None = None,
) -> list[Site]:
    """Ranked sites (best first, at most ``max_sites``, no two sharing a dimer) of the configured pattern.

    ``dimer_angle_deg`` (optional, (M,)): each dimer's local row direction (NaN = use its terrace's); with
    it, terraces missing from ``row_angles_deg`` are searched too.
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
    xy_nm = xy_px * pixel_size_nm
    per_dimer = np.full(len(xy_px), np.nan)
    if dimer_angle_deg is not None:
        per_dimer[:] = np.asarray(dimer_angle_deg, float).reshape(-1)
    terraces = list(row_angles_deg) + sorted(
        int(t) for t in np.unique(ter[np.isfinite(per_dimer)]) if int(t) not in row_angles_deg
    )
    groups: list[np.ndarray] = []  # (n, k*r) global dimer indices of the candidate chains, terrace by terrace
    for t in terraces:
        idx = np.flatnonzero((ter == t) & safe)
        ang = np.where(np.isfinite(per_dimer[idx]), per_dimer[idx], row_angles_deg.get(t, np.nan))
        idx, ang = idx[np.isfinite(ang)], np.deg2rad(ang[np.isfinite(ang)])
        if len(idx) < k * r:
            continue
        u = np.stack([np.cos(ang), np.sin(ang)], axis=1)  # (N, 2) row direction at each dimer
        n = np.stack([-np.sin(ang), np.cos(ang)], axis=1)
        sub = xy_nm[idx]
        tree = cKDTree(sub)
        nxt = _neighbour(tree, sub, SURFACE_LATTICE_NM * u, settings.dimer_pitch_tol_nm)
        # the neighbours across the row only for patterns of several rows (the default 3x1 has one)
        acr = _neighbour(tree, sub, ROW_SPACING_NM * n, settings.dimer_pitch_tol_nm) if r > 1 else None
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
        if ok.any():
            groups.append(idx[members[ok]])
    if not groups:
        return []
    cand = np.concatenate(groups)  # (C, k*r)
    # distances only at the dimers of candidate chains
    used = np.zeros(len(xy_px), bool)
    used[cand.ravel()] = True
    used_d = np.flatnonzero(used)  # = np.unique(cand), without the sort
    raw_d, slack_d = clearance.at(rows[used_d], cols[used_d])
    raw = np.full(len(xy_px), np.nan, np.float32)
    slack = np.full(len(xy_px), np.nan, np.float32)
    raw[used_d] = raw_d - HALF_PIXEL_DIAGONAL * pixel_size_nm
    slack[used_d] = slack_d
    c_raw = raw[cand].min(axis=1)
    c_slack = slack[cand].min(axis=1)
    # best clearance first, then slack, then position of the first dimer (y, x); stable like list.sort
    order = np.lexsort((xy_px[cand[:, 0], 0], xy_px[cand[:, 0], 1], -c_slack, -c_raw))
    # greedy, best first: a candidate is taken when none of its dimers is taken yet (Python lists: the loop
    # may scan thousands of overlapping chains)
    taken = [False] * len(xy_px)
    chosen: list[int] = []
    for i, g in zip(order.tolist(), cand[order].tolist(), strict=True):
        if any(taken[j] for j in g):
            continue
        for j in g:
            taken[j] = True
        chosen.append(i)
        if len(chosen) >= settings.max_sites:
            break
    if not chosen:
        return []
    sel = np.asarray(chosen)
    pts = xy_px[cand[sel]]  # (n, k*r, 2)
    centre = pts.mean(axis=1)
    clear_nm = [round(v, 4) for v in c_raw[sel].astype(np.float64).tolist()]
    score = [round(v, 4) for v in c_slack[sel].astype(np.float64).tolist()]
    terr = ter[cand[sel, 0]].tolist()
    pattern = f"{k}x{r}"
    sites = [
        Site(
            center_x_px=cx,
            center_y_px=cy,
            dimers=p,
            terrace=t,
            clearance_nm=cl,
            pattern=pattern,
            score=sc,
        )
        for (cx, cy), p, t, cl, sc in zip(centre.tolist(), pts.tolist(), terr, clear_nm, score, strict=True)
    ]
    return sites
