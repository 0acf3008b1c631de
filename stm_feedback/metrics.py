"""Metrics comparing one ``Analysis`` with the simulator's ``GroundTruth`` (pure functions on numpy arrays).

Matching: points are matched one-to-one by Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on
Euclidean distance; only pairs closer than the tolerance may match. The candidate pairs come from a KD-tree
(``cKDTree.sparse_distance_matrix``), the bipartite graph is split into connected components and each
component is solved densely, so frames with thousands of atoms stay fast. In a component a non-edge costs
more than the sum of all edge costs, so the assignment first maximises the number of matches, then minimises
the total distance.

Scoring rules (also written down in docs/evaluation.md):

- **Exclusion zone for atoms and dimers.** A truth atom is *excluded* when ``atom_resolved`` is False or it
  lies within ``border_nm`` (0.3 nm) of the frame border (distance to the outermost pixel centres). A truth
  dimer is excluded when its pixel is in ``unresolved_mask`` or it lies within ``border_nm`` of the border.
  A predicted point is *excluded* when it lies within ``border_nm`` of the border, or on a pixel of
  ``unresolved_mask``, or within the match tolerance of an excluded truth point. Matching runs on all points;
  then a matched pair whose truth point is excluded counts nowhere, an unmatched excluded truth point is not a
  false negative, an unmatched excluded prediction is not a false positive. (A network should abstain there;
  abstaining or not is neither rewarded nor punished.)
- **Defects**: truth = footprint centres of ``GroundTruth.defects``; class-agnostic F1 at 0.40 nm; the border
  exclusion applies (same rule). Unresolved regions do not exclude defects (they stay visible with a blunt
  tip), except those of ``ATOMIC_SCALE_DEFECT_CLASSES`` (dihydrides), whose footprint centre pixel is in
  ``unresolved_mask``: a dihydride is only a 0.1 nm shift of its dimer's atoms plus a -0.005 to -0.02 nm line,
  which the simulator's unresolved-patch blur (sigma 0.35 nm) flattens to a few pm, below the noise, like the
  atoms there (same treatment: not a false negative when missed, a prediction on it is not a false positive).
  Kind accuracy = fraction of matched (scored) pairs whose predicted kind equals the truth kind.
- **Terrace ARI**: on the pixels with truth label >= 0 (truth step-edge pixels, label -1, are not scored)
  whose truth terrace covers at least ``MIN_TERRACE_AREA_NM2`` (4 nm^2) in the frame (corner slivers are not
  scored: ARI drops to 0 when any such sliver is merged, whatever its size).
  Predicted -1 pixels (step edge / unknown) are first given the label of the nearest predicted terrace pixel
  (Euclidean distance transform); if the prediction has no terrace pixel at all the whole frame is one label.
  The fraction of scored pixels predicted -1 is reported separately (``terrace_unknown_fraction``) so this
  leniency stays visible. If truth has >= 2 terraces on the scored pixels the score is
  ``sklearn.metrics.adjusted_rand_score``. ARI is degenerate for a single truth cluster (it is 0 for *any*
  split, however small), so for single-terrace frames the score is the fraction of scored pixels carrying the
  prediction's most common label (1.0 when no spurious terrace is predicted).
- **Row-angle error** (degrees, modulo 180, in [0, 90]): for each truth terrace with at least
  ``min_terrace_area_nm2`` scored pixels, the predicted terrace with the largest pixel overlap (after the -1
  reassignment above) and its ``Terrace.row_angle_undistorted_deg`` when given (drift shear removed: the
  truth angle is drift-free), else its ``Terrace.row_angle_deg``. A truth terrace without such a predicted
  terrace (or whose predicted terrace has no ``Terrace`` entry) scores the maximal error, 90 degrees, and
  counts as missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score

from simulator.truth import GroundTruth
from stm_feedback.errors import InputError
from stm_feedback.schema import Analysis, Terrace

ATOM_TOL_NM = 0.10
DIMER_TOL_NM = 0.15
DEFECT_TOL_NM = 0.40
BORDER_NM = 0.3
MIN_TERRACE_AREA_NM2 = 4.0
MISSING_ANGLE_ERR_DEG = 90.0


# ----------------------------------------------------------------------------------------------------
# matching


def _as_xy(points: np.ndarray | list, name: str) -> np.ndarray:
    """(N, 2) float64 array of finite (x, y) positions, or a clear InputError."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{name} must have shape (N, 2) of (x, y); got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains non-finite positions")
    return arr


def match_points(true_xy: np.ndarray, pred_xy: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of points closer than ``tol`` (any length unit, same for all three).

    Returns index arrays ``(true_idx, pred_idx)`` of equal length: ``true_xy[true_idx[k]]`` matches
    ``pred_xy[pred_idx[k]]``. Maximises the number of matches, then minimises the summed distance.
    """
    t = _as_xy(true_xy, "true_xy")
    p = _as_xy(pred_xy, "pred_xy")
    if not (np.isfinite(tol) and tol > 0):
        raise InputError(f"match tolerance must be a positive finite number; got {tol!r}")
    if len(t) == 0 or len(p) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(t).sparse_distance_matrix(cKDTree(p), max_distance=tol, output_type="ndarray")
    rows, cols, vals = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # bipartite graph on nodes [0, nt) = truth and [nt, nt + np) = predictions
    nt, n_p = len(t), len(p)
    adj = coo_matrix((np.ones(len(rows)), (rows, cols + nt)), shape=(nt + n_p, nt + n_p))
    _, comp = connected_components(adj, directed=False)
    edge_comp = comp[rows]
    order = np.argsort(edge_comp, kind="stable")
    rows, cols, vals, edge_comp = rows[order], cols[order], vals[order], edge_comp[order]
    bounds = np.flatnonzero(np.diff(edge_comp)) + 1
    out_t: list[np.ndarray] = []
    out_p: list[np.ndarray] = []
    for r, c, v in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(vals, bounds), strict=True):
        if len(r) == 1:
            out_t.append(r)
            out_p.append(c)
            continue
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        big = (v.sum() + tol) * 2.0 + 1.0  # a non-edge costs more than all edges together
        cost = np.full((len(ur), len(uc)), big)
        cost[ri, ci] = v
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] < big
        out_t.append(ur[a[ok]])
        out_p.append(uc[b[ok]])
    return np.concatenate(out_t).astype(np.int64), np.concatenate(out_p).astype(np.int64)


@dataclass
class MatchCounts:
    """Counts of one matching (after exclusions); ``sq_err_sum_nm2``: summed squared TP distances (nm^2)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    sq_err_sum_nm2: float = 0.0

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.sq_err_sum_nm2 + other.sq_err_sum_nm2,
        )

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else (1.0 if self.fp == 0 else 0.0)

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0  # nothing to find and nothing found: perfect

    @property
    def rmse_nm(self) -> float:
        return float(np.sqrt(self.sq_err_sum_nm2 / self.tp)) if self.tp else float("nan")


def score_matching(
    true_xy_px: np.ndarray,
    pred_xy_px: np.ndarray,
    tol_nm: float,
    pixel_size_nm: float,
    true_excluded: np.ndarray | None = None,
    pred_excluded: np.ndarray | None = None,
) -> tuple[MatchCounts, np.ndarray, np.ndarray]:
    """Match (tolerance in nm) and count TP/FP/FN with the exclusion rules of the module docstring.

    ``true_excluded``/``pred_excluded`` are boolean (N,) masks of points that are not scored on their own.
    Predictions within the tolerance of an excluded truth point are excluded too. Returns the counts and the
    scored matched index pairs (truth, prediction).
    """
    t = _as_xy(true_xy_px, "true_xy_px")
    p = _as_xy(pred_xy_px, "pred_xy_px")
    tol_px = tol_nm / pixel_size_nm
    t_ex = np.zeros(len(t), bool) if true_excluded is None else np.asarray(true_excluded, bool)
    p_ex = np.zeros(len(p), bool) if pred_excluded is None else np.asarray(pred_excluded, bool).copy()
    if t_ex.any() and len(p):
        d, _ = cKDTree(t[t_ex]).query(p, k=1, distance_upper_bound=tol_px)
        p_ex |= np.isfinite(d)
    ti, pi = match_points(t, p, tol_px)
    # a prediction matched to an excluded truth point is excluded as well (neither TP nor FP)
    p_ex[pi[t_ex[ti]]] = True
    scored = ~t_ex[ti]
    ti, pi = ti[scored], pi[scored]
    matched_t = np.zeros(len(t), bool)
    matched_p = np.zeros(len(p), bool)
    matched_t[ti] = True
    matched_p[pi] = True
    fn = int(np.sum(~matched_t & ~t_ex))
    fp = int(np.sum(~matched_p & ~p_ex))
    err_nm = (t[ti] - p[pi]) * pixel_size_nm
    counts = MatchCounts(tp=len(ti), fp=fp, fn=fn, sq_err_sum_nm2=float(np.sum(err_nm**2)))
    return counts, ti, pi


# ----------------------------------------------------------------------------------------------------
# exclusion helpers


def near_border(
    xy_px: np.ndarray, height_px: int, width_px: int, border_nm: float, pixel_size_nm: float
) -> np.ndarray:
    """(N,) bool: points closer than ``border_nm`` to the border (outermost pixel centres) or outside."""
    xy = _as_xy(xy_px, "xy_px")
    b = border_nm / pixel_size_nm
    x, y = xy[:, 0], xy[:, 1]
    return (x < b) | (y < b) | (x > width_px - 1 - b) | (y > height_px - 1 - b)


def on_mask(xy_px: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N,) bool: the nearest pixel of each point is set in ``mask`` (points outside the frame: False)."""
    xy = _as_xy(xy_px, "xy_px")
    col = np.rint(xy[:, 0]).astype(np.int64)
    row = np.rint(xy[:, 1]).astype(np.int64)
    h, w = mask.shape
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.zeros(len(xy), bool)
    out[inside] = mask[row[inside], col[inside]]
    return out


# ----------------------------------------------------------------------------------------------------
# terraces


def _fill_unknown(labels: np.ndarray) -> np.ndarray:
    """Labels with every -1 pixel given the label of the nearest pixel >= 0 (unchanged if none is >= 0)."""
    unknown = labels < 0
    if not unknown.any() or unknown.all():
        return labels
    _, (ri, ci) = ndimage.distance_transform_edt(unknown, return_indices=True)
    return labels[ri, ci]


def predicted_labels(analysis: Analysis) -> np.ndarray:
    """(H, W) int predicted terrace labels; a missing map counts as all -1, or all one terrace if exactly one
    ``Terrace`` is reported."""
    h, w = analysis.image.height_px, analysis.image.width_px
    if analysis.terrace_labels is not None:
        labels = np.asarray(analysis.terrace_labels)
        if labels.shape != (h, w):
            raise InputError(f"terrace_labels has shape {labels.shape}, image is {(h, w)}")
        return labels.astype(np.int64)
    fill = analysis.terraces[0].id if len(analysis.terraces) == 1 else -1
    return np.full((h, w), fill, np.int64)


def terrace_ari(
    truth_labels: np.ndarray, pred_labels: np.ndarray, min_pixels: int = 0
) -> tuple[float, float]:
    """(score, unknown_fraction) per the module docstring: ARI on pixels with truth label >= 0 whose truth
    terrace has >= ``min_pixels`` pixels (majority-label fraction if a single truth terrace remains);
    unknown_fraction = share of those pixels predicted -1."""
    if truth_labels.shape != pred_labels.shape:
        raise InputError(f"label maps differ in shape: {truth_labels.shape} vs {pred_labels.shape}")
    scored = truth_labels >= 0
    if min_pixels > 0 and scored.any():
        ids, counts = np.unique(truth_labels[scored], return_counts=True)
        scored &= np.isin(truth_labels, ids[counts >= min_pixels])
    if not scored.any():
        return float("nan"), float("nan")
    unknown_fraction = float(np.mean(pred_labels[scored] < 0))
    filled = _fill_unknown(pred_labels)
    t = truth_labels[scored]
    p = filled[scored]
    if len(np.unique(t)) >= 2:
        return float(adjusted_rand_score(t, p)), unknown_fraction
    _, counts = np.unique(p, return_counts=True)
    return float(counts.max() / counts.sum()), unknown_fraction


def angle_diff_deg(a_deg: float, b_deg: float) -> float:
    """Smallest difference of two row directions, modulo 180, in [0, 90] degrees."""
    d = (a_deg - b_deg) % 180.0
    return float(min(d, 180.0 - d))


def lattice_angle_deg(terrace: Terrace) -> float:
    """The predicted angle compared with the truth's: the drift-corrected ``row_angle_undistorted_deg`` when
    the analysis gives one, else ``row_angle_deg`` (the image-frame rows). The truth angle is the lattice's
    angle in the scan frame without drift (simulator/imaging.py), so scoring only the image-frame angle
    charges a perfect answer with the drift shear (median 0.17 deg on the realistic suite, measured with the
    truth atom positions)."""
    u = terrace.row_angle_undistorted_deg
    return float(u) if u is not None and np.isfinite(u) else float(terrace.row_angle_deg)


def row_angle_errors(
    truth: GroundTruth,
    analysis: Analysis,
    pred_labels: np.ndarray,
    min_area_nm2: float = MIN_TERRACE_AREA_NM2,
) -> tuple[list[float], int]:
    """Per-truth-terrace row-angle errors (deg) and the number of truth terraces with no predicted terrace."""
    filled = _fill_unknown(pred_labels)
    by_id = {t.id: t for t in analysis.terraces}
    px_area = truth.pixel_size_nm**2
    errors: list[float] = []
    missing = 0
    for tt in truth.terraces:
        region = truth.terrace_labels == tt.id
        if region.sum() * px_area < min_area_nm2:
            continue
        ids, counts = np.unique(filled[region], return_counts=True)
        best = int(ids[np.argmax(counts)])
        pred = by_id.get(best)
        if pred is None or not np.isfinite(pred.row_angle_deg):
            errors.append(MISSING_ANGLE_ERR_DEG)
            missing += 1
        else:
            errors.append(angle_diff_deg(lattice_angle_deg(pred), tt.row_angle_deg))
    return errors, missing


# ----------------------------------------------------------------------------------------------------
# one frame


@dataclass
class FrameScore:
    """Every metric of one frame; counts are kept so a suite can micro-average."""

    atoms: MatchCounts
    dimers: MatchCounts
    defects: MatchCounts
    kind_correct: int
    kind_total: int
    terrace_ari: float
    terrace_unknown_fraction: float
    angle_errors_deg: list[float]
    angles_missing: int
    defect_class_found: dict[str, list[int]] = field(default_factory=dict)  # class -> [found, scored truth]
    # (kind of the truth defect, its true class, the reported defect's cluster id) of every matched, scored
    # defect whose report has a cluster (>= 0): the suite's mean-shift class ARI (issue 4 item 10)
    class_pairs: list[tuple[str, str, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("atoms", "dimers", "defects"):
            c: MatchCounts = getattr(self, key)
            d[key].update(precision=c.precision, recall=c.recall, f1=c.f1, rmse_nm=c.rmse_nm)
        return d


def _check_frame(truth: GroundTruth, analysis: Analysis) -> None:
    if (analysis.image.height_px, analysis.image.width_px) != (truth.height_px, truth.width_px):
        raise InputError(
            f"analysis image {analysis.image.height_px}x{analysis.image.width_px} differs from truth "
            f"{truth.height_px}x{truth.width_px}"
        )
    if not np.isclose(analysis.image.pixel_size_nm, truth.pixel_size_nm, rtol=1e-6):
        raise InputError(
            f"pixel size {analysis.image.pixel_size_nm} nm differs from truth {truth.pixel_size_nm} nm"
        )


# defect classes whose whole signature is at the atomic scale: excluded from scoring in unresolved regions
ATOMIC_SCALE_DEFECT_CLASSES = frozenset({"dihydride"})


def match_defects(
    truth: GroundTruth, analysis: Analysis, border_nm: float = BORDER_NM
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every truth defect against every reported one, nothing excluded (for error analyses;
    ``score_frame`` applies the scoring exclusions): matched index pairs (truth ``ti``, reported ``pi``;
    Hungarian on centres within ``DEFECT_TOL_NM``) and which truth / reported centres lie within
    ``border_nm`` of the frame edge."""
    s, h, w = truth.pixel_size_nm, truth.height_px, truth.width_px
    tf = np.array([[d.x_px, d.y_px] for d in truth.defects], np.float64).reshape(-1, 2)
    pf = np.array([[d.x_px, d.y_px] for d in analysis.defects], np.float64).reshape(-1, 2)
    ti, pi = match_points(tf, pf, DEFECT_TOL_NM / s)
    return ti, pi, near_border(tf, h, w, border_nm, s), near_border(pf, h, w, border_nm, s)


def score_frame(truth: GroundTruth, analysis: Analysis, border_nm: float = BORDER_NM) -> FrameScore:
    """All metrics of one analysed frame against its truth (rules: module docstring)."""
    _check_frame(truth, analysis)
    h, w, ps = truth.height_px, truth.width_px, truth.pixel_size_nm
    unres = np.asarray(truth.unresolved_mask, bool)

    def pred_ex(xy: np.ndarray, use_unresolved: bool) -> np.ndarray:
        ex = near_border(xy, h, w, border_nm, ps)
        return ex | on_mask(xy, unres) if use_unresolved else ex

    pa = np.array([[a.x_px, a.y_px] for a in analysis.atoms], np.float64).reshape(-1, 2)
    ta = _as_xy(truth.atoms_xy_px, "truth atoms")
    ta_ex = ~np.asarray(truth.atom_resolved, bool) | near_border(ta, h, w, border_nm, ps)
    atoms, _, _ = score_matching(ta, pa, ATOM_TOL_NM, ps, ta_ex, pred_ex(pa, True))

    pd = np.array([[d.x_px, d.y_px] for d in analysis.dimers], np.float64).reshape(-1, 2)
    td = _as_xy(truth.dimers_xy_px, "truth dimers")
    td_ex = on_mask(td, unres) | near_border(td, h, w, border_nm, ps)
    dimers, _, _ = score_matching(td, pd, DIMER_TOL_NM, ps, td_ex, pred_ex(pd, True))

    pf = np.array([[d.x_px, d.y_px] for d in analysis.defects], np.float64).reshape(-1, 2)
    tf = np.array([[d.x_px, d.y_px] for d in truth.defects], np.float64).reshape(-1, 2)
    atomic = np.array([d.cls in ATOMIC_SCALE_DEFECT_CLASSES for d in truth.defects], bool)
    tf_ex = near_border(tf, h, w, border_nm, ps) | (atomic & on_mask(tf, unres))
    defects, ti, pi = score_matching(tf, pf, DEFECT_TOL_NM, ps, tf_ex, pred_ex(pf, False))
    class_found: dict[str, list[int]] = {}
    found = set(ti.tolist())
    for i, d in enumerate(truth.defects):
        if not tf_ex[i]:
            c = class_found.setdefault(d.cls, [0, 0])
            c[0] += int(i in found)
            c[1] += 1
    kind_correct = int(
        sum(truth.defects[i].kind == analysis.defects[j].kind for i, j in zip(ti, pi, strict=True))
    )
    class_pairs = [
        (truth.defects[i].kind, truth.defects[i].cls, int(analysis.defects[j].cluster))
        for i, j in zip(ti.tolist(), pi.tolist(), strict=True)
        if analysis.defects[j].cluster >= 0
    ]

    labels = predicted_labels(analysis)
    min_px = int(np.ceil(MIN_TERRACE_AREA_NM2 / ps**2))
    ari, unknown = terrace_ari(np.asarray(truth.terrace_labels), labels, min_px)
    errs, missing = row_angle_errors(truth, analysis, labels)
    return FrameScore(
        atoms, dimers, defects, kind_correct, len(ti), ari, unknown, errs, missing, class_found, class_pairs
    )
