"""Post-processing of network maps into objects: terraces, atoms, dimers, defect blobs and their features.

Pure functions on numpy arrays (pixel coordinates of the input frame: x = column, y = row, (0, 0) = centre of
the top-left pixel). The Pipeline (pipeline.py) strings them together; planner.py uses the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback.classify import FEATURE_NAMES, row_aligned_patch
from stm_feedback.errors import InputError
from stm_feedback.lattice import angle_diff_deg
from stm_feedback.physics import (
    DIMER_ATOM_SEPARATION_NM,
    ROW_SPACING_NM,
    SURFACE_LATTICE_NM,
    UNIT_CELL_AREA_NM2,
)
from stm_feedback.preprocess import fast_percentiles

_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)  # 4-neighbour structuring element


@dataclass(frozen=True)
class PostprocessParams:
    """Thresholds of the post-processing (probabilities 0..1, lengths in nm, areas in nm^2)."""

    # step/atom/defect thresholds: `stm-feedback nets-calibrate` (training-range seeds, models/MODEL_CARD.md)
    step_threshold: float = 0.25  # step_prob above this is step edge
    min_terrace_area_nm2: float = 4.0  # smaller non-step components become -1 (unknown) ...
    # ... unless they touch the frame border and reach this: a terrace the frame cuts off. NN-0's step band is
    # wider than the truth's, so a corner sliver of a few nm^2 beyond a found step kept < 4 nm^2 and joined
    # the big terrace; inside the frame a 2-4 nm^2 component is mostly a defect ringed by false step pixels
    min_border_terrace_area_nm2: float = 2.0
    # a terrace smaller than this (nm^2) with at least defect_terrace_min_fraction of its pixels within 1 nm
    # of NN-2's defect maps (> 0.5) is a defect's top or inside ringed by false step pixels (NN-0 rims big
    # adatom clusters), not a terrace: -1 (drop_defect_terraces; 0 = off)
    defect_terrace_max_nm2: float = 15.0
    defect_terrace_min_fraction: float = 0.8
    step_gap_close_nm: float = 6.0  # bridge step-mask gaps up to this length (close_step_gaps; 0 = off)
    orientation_split: bool = True  # split terraces whose dimer bonds turn by 90 deg (split_by_orientation)
    # a terrace without a lattice fit (its angle the FFT's) whose fitted neighbours agree, and whose FFT angle
    # is theirs, gets their angle + 90 (alternate_across_steps): the rows turn across a single step
    alternate_across_steps: bool = True
    atom_threshold: float = 0.2  # atom_prob peaks below this are dropped (the network abstains)
    # atoms are also looked for on step-edge pixels (terrace label -1) where step_prob is below this (None:
    # terrace pixels only) and join the nearest terrace within atom_step_terrace_nm (else terrace -1). The
    # segmented step band is wider than the edge: 61 % of the truth atoms within 0.5 nm of a step were lost
    # there (benchmarks/atom_misses.py realistic 100, session 5). 0.8, not 1.0 (every band pixel): the core of
    # the band adds more false atoms than true ones (clean suite atom precision 0.994 -> 0.992, below the
    # classical baseline's 0.993, for realistic F1 +0.001; models/MODEL_CARD.md session 5)
    atom_step_max_prob: float | None = 0.8
    atom_step_terrace_nm: float = 1.0
    atom_peak_radius_nm: float = (
        0.09  # local-maximum window half-width (< half the 0.24 nm dimer-atom distance)
    )
    # frames coarser than NN-1's grid (maps.atom_prob_net kept): atoms are found on that grid
    # (find_atoms_on_net_grid); at 0.2 nm/px on the frame's grid a dimer's two atoms give one peak
    atoms_on_net_grid: bool = True
    # scan-line jitter (Pipeline.analyze, jitter.py): each line's offset along x is estimated against the
    # frame's lattice (searched within +-max px, prior * offset^2 against large ones); when the offsets gain
    # at least min_gain and the analysis of the corrected image has a mean atom score higher by
    # min_score_gain (relative), that analysis is moved back onto the recorded image and reported
    line_jitter_correction: bool = True
    line_jitter_max_px: float = 5.0
    line_jitter_prior: float = 0.02
    line_jitter_min_gain: float = 0.03
    line_jitter_min_score_gain: float = 0.01
    dimer_tol_nm: float = 0.08  # partner atom at 0.24 +- tol nm (bond pairs: the lattice fit's search prior)
    # dimers on the lattice (lattice_dimers): atom within tol of an atom line (0.12 nm from a row centre
    # line), partner's implied centre within the radius; unpaired atoms from this score on are dimers
    dimer_line_tol_nm: float = 0.1
    dimer_pair_radius_nm: float = 0.15
    dimer_single_min_score: float = 0.3
    dimer_bond_pairs_first: bool = True
    # each atom is moved onto the local mean lattice phase of the atoms of its terrace around it (Gaussian of
    # sigma nm; lattice_smooth_atoms), unless that moves it more than max_move nm; 0 = off. The atoms' own
    # position noise averages away: atom F1 on training-range seeds hard 800000+40 0.660 -> 0.720, 800040+60
    # 0.632 -> 0.694, realistic 700000+30 0.976 -> 0.982 (sigma 0.45 / 0.8 and max move 0.08 / 0.12 / 0.24
    # scored lower or the same; models/MODEL_CARD.md, session 13)
    atom_smooth_sigma_nm: float = 0.6
    atom_smooth_max_move_nm: float = 0.16
    # of two reported atoms closer than this (nm) only the higher-scoring one is kept: two peaks moved onto
    # one lattice site, or a partner atom on a detected one (a dimer's atoms are 0.24 nm apart); 0 = off
    atom_min_separation_nm: float = 0.1
    # a dimer seen by one atom only (lattice_dimers) also reports its missing atom, mirrored through the
    # dimer centre, where atom_prob is at least this (< 0 = off; score = that probability). Most missed atoms
    # are such partners (frames coarser than the net's 0.1 nm/px blur the pair); same value as atom_threshold:
    # realistic atom F1 0.914 -> 0.96 (models/MODEL_CARD.md, session 3)
    partner_min_prob: float = 0.2
    # reported atoms inside a detected depression footprint are dropped (vacancies, pits and dihydrides have
    # no intact dimer there; the atom map still peaks on their rims and floors). evaluate --n 30/20
    # (session 3): atom precision clean 0.991 -> 0.995, realistic 0.972 -> 0.978, hard 0.545 -> 0.554
    drop_atoms_in_depressions: bool = True
    # on a double-tip frame (quality.double_tip_pairs) the smaller copy of each protrusion pair at the common
    # offset (quality.ghost_copies) is the second apex's ghost, not a defect: not reported (it stays
    # must-avoid). Hard suite (benchmarks/sweep_postprocess.py hard N drop_double_tip_ghosts false true,
    # session 5, with the side rule of then): defect F1 0.676 -> 0.690 on 30 frames, 0.614 -> 0.620 on 100
    drop_double_tip_ghosts: bool = True
    # depression blobs whose peak probability is below this are not reported as defects (0 = all reported);
    # they stay must-avoid in the planner's masks (sites and safe mask do not change). Chosen on training-range
    # seeds (benchmarks/sweep_postprocess.py ... depression_report_min_score 0 0.85 0.9 0.95 --preset P
    # --first-seed S): defect F1 realistic 700000+ 0.895 -> 0.899, 700100+ 0.871 -> 0.880, hard 800000+ 0.643 ->
    # 0.669 at 0.85 (0.9: 0.894 / 0.883 / 0.671); the dropped true ones are faint dihydrides (session 5)
    depression_report_min_score: float = 0.85
    # the same on frames of pixel size >= depression_report_coarse_px_nm: there the 0.384 nm dimer pitch is
    # sampled by <= 2.1 px and aliases into a moire that NN-2 reads as faint depressions (realistic preset at
    # 0.2 nm/px: 286 false depressions in 20 frames). benchmarks/sweep_postprocess.py realistic 30
    # depression_report_min_score 0.85 0.95 --preset realistic@PX --first-seed 750000 (session 14): defect F1
    # 0.850 -> 0.880 at 0.18, 0.883 -> 0.912 at 0.19, 0.809 -> 0.872 at 0.2; at 0.175 0.881 -> 0.897 but on
    # 710000+20 0.833 -> 0.829, and at 0.1-0.165 0.95 loses (0.947 -> 0.940 at 0.1)
    depression_report_min_score_coarse: float = 0.95
    depression_report_coarse_px_nm: float = 0.18
    # protrusion/depression prob above this is defect footprint. `nets-calibrate --frames 6` on NN-2 s23
    # recommends 0.8 (simulated objective 0.811 vs 0.805), but on the real tiles 0.8 drops 86 -> 65 defects
    # of tile 0007, visible bright protrusions among them (docs/real-data.md): missing a real adatom is worse
    defect_threshold: float = 0.7
    # depressions alone (None = defect_threshold). Measured with NN-2 s23 (session 3): 0.8 raises hard defect
    # precision 0.735 -> 0.759 (baseline 0.745) but lowers defect F1 on every suite (clean 0.971 -> 0.954,
    # realistic 0.916 -> 0.914, hard 0.699 -> 0.697), so it stays off; `nets-calibrate` sweeps it
    depression_threshold: float | None = None
    min_defect_area_nm2: float = 0.05  # smaller blobs are noise
    feature_ring_nm: float = 1.2  # ring around a footprint for the local level (classify.defect_features)
    # local lattice fits (tiles of local_tile_nm, >= local_min_atoms atoms) validate the dimers of terraces
    # whose global fit is missing or has a normalised row coherence below local_fit_below_coherence
    local_fit_below_coherence: float = 0.8
    # terraces whose fit reaches this normalised coherence get row_angle_undistorted_deg
    undistort_min_coherence: float = 0.3
    local_tile_nm: float = 5.0
    local_min_atoms: int = 40
    frame_clustering: bool = (
        False  # mean shift on each frame's own defects (~1 s with sklearn: off in real time)
    )
    # FFT cross-check of every fitted terrace's row angle (~1.5 ms per 256x256 terrace, off in real time);
    # terraces without an atom fit always get it, it is their reported row angle
    fft_check: bool = False
    patch_size_px: int = 24  # row-aligned library patch
    patch_pixel_size_nm: float = 0.125

    @classmethod
    def with_overrides(cls, overrides: dict[str, object]) -> PostprocessParams:
        """The defaults with the named fields replaced (``Settings.postprocess``); InputError for a name that is
        not a field."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown post-processing parameter(s) {unknown}; see PostprocessParams")
        return replace(cls(), **overrides)


def check_map(name: str, a: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate one (H, W) finite map; raise InputError naming it otherwise. Returns it as float32."""
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{name} must be a 2-D array of at least 2x2, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or inf")
    return arr


# ------------------------------------------------------------------------------------------------ terraces
def segment_terraces(
    step_prob: np.ndarray,
    pixel_size_nm: float,
    threshold: float = 0.5,
    min_area_nm2: float = 4.0,
    close_gaps_nm: float = 0.0,
    min_border_area_nm2: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Terrace labels (H, W) int32 (0..K-1, -1 = step edge or unknown) and the step mask (H, W) bool.

    Terraces are the 4-connected components of the non-step pixels (step_prob <= threshold) after the
    step mask is grown by one pixel (4-neighbours): scan-line jitter breaks a step band into row segments
    that no longer overlap, and without the extra pixel the terraces on both sides joined through the
    gaps (10 of 50 hard and 3 of 30 realistic simulated frames, truth step masks; 0 with it). The grown
    pixels then join the adjacent terrace (the larger id where two meet), so only step pixels are -1.
    Components smaller than ``min_area_nm2`` are set to -1, except those touching the frame border that reach
    ``min_border_area_nm2`` (None: no exception). Ids in raster order of first appearance.
    ``close_gaps_nm`` > 0: first bridge gaps of the step mask up to that length (``close_step_gaps``); the
    bridges are part of the returned step mask.
    """
    step = step_prob > threshold
    if close_gaps_nm > 0:
        step = close_step_gaps(step, pixel_size_nm, reach_nm=close_gaps_nm)
    barrier = cv2.dilate(step.astype(np.uint8), _CROSS) > 0
    lab, n = label_components(~barrier, connectivity=4)  # = ndimage.label(~barrier), ~1/5 of its cost
    if n == 0:
        return np.full(step.shape, -1, np.int32), step
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    area_nm2 = sizes * pixel_size_nm**2
    keep = area_nm2 >= min_area_nm2
    if min_border_area_nm2 is not None and min_border_area_nm2 < min_area_nm2:
        border = np.zeros(n + 1, bool)
        for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
            border[edge] = True
        keep |= border & (area_nm2 >= min_border_area_nm2)
    keep[0] = False
    remap = np.full(n + 1, -1, np.int32)
    remap[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    labels = remap[lab]
    ring = barrier & ~step
    if ring.any():
        grown = cv2.dilate((labels + 1).astype(np.float32), _CROSS).astype(np.int32) - 1
        labels[ring] = grown[ring]
    return labels, step


def alternate_across_steps(
    labels: np.ndarray,
    angles_deg: dict[int, float],
    fitted: set[int],
    pixel_size_nm: float,
    reach_nm: float = 1.5,
    agree_deg: float = 20.0,
) -> dict[int, float]:
    """Row angles (deg, mod 180) of the terraces in ``angles_deg`` that have no lattice fit (not in
    ``fitted``; their angle is the FFT's), corrected by the single-step rule: the dimer rows turn by 90 deg
    across a single-height step. A terrace without a fit whose fitted neighbours (terrace pixels within
    ``reach_nm`` across the step band of ``labels``) all have rows within ``agree_deg`` of each other, and
    whose FFT angle lies within ``agree_deg`` of theirs (not turned), gets their angle + 90: on such small or
    unresolved terraces the FFT picks up the neighbour's rows (hard suite: 9 of 16 FFT-only angles off by more
    than 20 deg, most by 65-90). Returns the changed terraces only (id -> new angle)."""
    out: dict[int, float] = {}
    todo = [t for t in angles_deg if t not in fitted]
    if not todo or not fitted:
        return out
    r = max(1, int(math.ceil(reach_nm / pixel_size_nm)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    for t in todo:
        own = (labels == t).astype(np.uint8)
        near = labels[(cv2.dilate(own, kernel) > 0) & (own == 0)]
        neighbours = [int(n) for n in np.unique(near[near >= 0]) if int(n) in fitted]
        if not neighbours:
            continue
        ref = [angles_deg[n] % 180.0 for n in neighbours]
        if max(angle_diff_deg(a, ref[0]) for a in ref) > agree_deg:  # the neighbours disagree: leave it
            continue
        if angle_diff_deg(angles_deg[t], ref[0]) <= agree_deg:
            out[t] = (ref[0] + 90.0) % 180.0
    return out


def drop_defect_terraces(
    labels: np.ndarray,
    protrusion_prob: np.ndarray,
    depression_prob: np.ndarray,
    pixel_size_nm: float,
    max_area_nm2: float,
    min_fraction: float,
    reach_nm: float = 1.0,
    prob_threshold: float = 0.5,
) -> np.ndarray:
    """Terrace labels (H, W) int32 with every terrace smaller than ``max_area_nm2`` whose pixels lie at
    least ``min_fraction`` within ``reach_nm`` of a defect (either NN-2 map > ``prob_threshold``) set to
    -1 and the others renumbered 0..K-1 in their order. NN-0 rims big adatom clusters and pits with step
    pixels, and the region inside the rim came out as a terrace of its own (clean suite 1000010: ARI
    -0.013, below the classical baseline). ``labels`` is not modified (returned as it is when nothing is
    dropped)."""
    counts = np.bincount(labels.ravel() + 1)[1:]  # per id 0..K-1 (cheaper than np.unique)
    ids = np.flatnonzero(counts)
    small = ids[counts[ids] * pixel_size_nm**2 < max_area_nm2]
    if not len(small):
        return labels
    r = max(1, int(round(reach_nm / pixel_size_nm)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    defect = (protrusion_prob > prob_threshold) | (depression_prob > prob_threshold)
    near = cv2.dilate(defect.view(np.uint8), kernel) > 0
    dropped = [t for t in small.tolist() if near[labels == t].mean() >= min_fraction]
    if not dropped:
        return labels
    remap = np.full(int(ids.max()) + 2, -1, np.int32)  # index 0 = label -1
    kept = ids[~np.isin(ids, dropped)]
    remap[kept + 1] = np.arange(len(kept), dtype=np.int32)  # ids stay 0..K-1 in their raster order
    return remap[labels + 1]


def _border_hit(e: np.ndarray, d: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Where the ray e + t d (t > 0) leaves the pixel-centre box [0, W-1] x [0, H-1], and t there."""
    h, w = shape
    ts = []
    for k, hi in ((0, w - 1), (1, h - 1)):
        if d[k] > 1e-12:
            ts.append((hi - e[k]) / d[k])
        elif d[k] < -1e-12:
            ts.append(-e[k] / d[k])
    t = max(0.0, min(ts)) if ts else math.inf
    return e + t * d, t


def close_step_gaps(
    step: np.ndarray,
    pixel_size_nm: float,
    reach_nm: float = 6.0,
    min_length_nm: float = 3.0,
    end_nm: float = 1.5,
    max_turn_deg: float = 30.0,
    min_elongation: float = 4.0,
) -> np.ndarray:
    """Step mask (H, W) bool with gaps bridged by 3 px wide lines.

    Every elongated piece of the mask (8-connected component >= ``min_length_nm`` long along its principal
    axis, eigenvalue ratio >= ``min_elongation``) is followed beyond both of its ends along its local
    direction d (principal axis of its pixels within ``end_nm`` of the end): it is joined to the nearest pixel
    of another step piece (>= 1 nm long) that lies within ``max_turn_deg`` of d, or else to the frame border
    where the ray along d meets it, if that is at most min(``reach_nm``, the piece's own length) away.

    Why: a step edge cannot end inside a terrace (it runs to the frame border, into another step, or closes
    on itself), but NN-0's step probability fades in short stretches (weak contrast, kinks, near the frame
    border) and one such gap merges the two terraces (ARI 0 on 2 of 30 realistic and 6 of 30 hard suite
    frames). Short or compact blobs (defect rims) are not extended; a gap is never assumed longer than the
    piece that points into it.
    """
    s = pixel_size_nm
    # pieces and their bounding boxes: Wu labelling + find_objects (cv2.connectedComponentsWithStats spent
    # ~0.55 of its ~0.8 ms per 256 x 256 frame on the statistics); the numbering does not matter below
    lab, n = label_components(step, connectivity=8)
    boxes = ndimage.find_objects(lab)
    bw_px = np.array([0] + [sx.stop - sx.start for _, sx in boxes])
    bh_px = np.array([0] + [sy.stop - sy.start for sy, _ in boxes])
    diag_nm = np.hypot(bw_px, bh_px) * s  # [0] = background: 0
    cand = np.flatnonzero(diag_nm >= min_length_nm)
    if len(cand) == 0:
        return step
    cos_max = math.cos(math.radians(max_turn_deg))
    pieces: list[
        tuple[int, np.ndarray, float, np.ndarray, np.ndarray]
    ] = []  # id, pixels (x, y), length, ends
    for k in cand.tolist():
        sy, sx = boxes[k - 1]
        x0, y0 = sx.start, sy.start
        rr, cc = np.nonzero(lab[sy, sx] == k)
        if len(rr) < 6:
            continue
        pts = np.stack([cc + x0, rr + y0], 1).astype(np.float64)
        q = pts - pts.mean(0)
        ev, evec = np.linalg.eigh(q.T @ q)
        proj = q @ evec[:, 1]
        length = float(proj.max() - proj.min())
        if length * s >= min_length_nm and ev[1] >= min_elongation * max(ev[0], 1e-9):
            ends = [pts[int(np.argmin(proj))], pts[int(np.argmax(proj))]]
            h, w = step.shape  # ends on the frame border need nothing
            ends = [e for e in ends if min(e[0], e[1], w - 1 - e[0], h - 1 - e[1]) > 1.5]
            if ends:
                pieces.append((k, pts, length, ends))
    if not pieces:
        return step
    # targets: pixels of step pieces >= 1 nm across (not isolated specks), every second row and column (the
    # 3 px wide bridge covers the 1 px difference; a quarter of the pixels to test per end)
    sub = lab[::2, ::2]
    rows, cols = np.nonzero(sub)
    ids = sub[rows, cols]
    tgt = diag_nm[ids] >= 1.0
    t_xy = np.stack([cols[tgt], rows[tgt]], 1).astype(np.float64) * 2.0
    t_id = ids[tgt]
    out = step.astype(np.uint8)
    for k, pts, length, ends in pieces:
        reach_px = min(reach_nm / s, length)
        for e in ends:
            near = pts[np.hypot(pts[:, 0] - e[0], pts[:, 1] - e[1]) <= end_nm / s]
            if len(near) < 3:
                continue
            cn = near.mean(0)
            d = np.linalg.eigh((near - cn).T @ (near - cn))[1][:, 1]
            if d @ (e - cn) < 0:  # point outwards, away from the piece
                d = -d
            v = t_xy - e
            dist = np.hypot(v[:, 0], v[:, 1])
            ok = (t_id != k) & (dist <= reach_px) & (v @ d >= cos_max * dist)
            if ok.any():
                j = np.flatnonzero(ok)[int(np.argmin(dist[ok]))]
                hit = t_xy[j]
            else:
                hit, t = _border_hit(e, d, step.shape)
                if not (1.0 <= t <= reach_px):
                    continue
            cv2.line(out, (int(e[0]), int(e[1])), (int(round(hit[0])), int(round(hit[1]))), 1, thickness=3)
    return out > 0


def split_by_orientation(
    labels: np.ndarray,
    pixel_size_nm: float,
    bond_mid_xy_px: np.ndarray,
    bond_vec_xy: np.ndarray,
    min_area_nm2: float = 4.0,
    cell_nm: float = 1.5,
    min_bonds: int = 30,
    min_purity: float = 0.7,
) -> np.ndarray:
    """Terrace labels (H, W) int32 with every terrace split where its dimer bonds turn by 90 degrees.

    Across a single-height step of Si(100) the dimer rows turn by 90 deg (2x1 <-> 1x2), so a terrace whose
    bonds (``bond_vec_xy`` (M, 2), midpoints ``bond_mid_xy_px`` (M, 2)) fall into two perpendicular families
    in separate regions is two terraces merged through a step the step map missed entirely (hard suite:
    2 of 30 frames have no step probability at all along a visible step). Per terrace: the bond axis
    theta0 = arg(mean exp(4 i phi)) / 4 classes each bond as A (within 45 deg of theta0) or B; the classes are
    summed on a ``cell_nm`` grid, smoothed over 3x3 cells, cells without bonds take the nearest cell's class,
    regions smaller than ``min_area_nm2`` join the other class. The split is kept only when every resulting
    region of at least ``min_area_nm2`` holds >= ``min_bonds`` bonds of which >= ``min_purity`` are of its
    class (scattered false bonds in a noisy frame do not split a terrace). Ids are renumbered in raster order
    of first appearance, as ``segment_terraces`` numbers them; pixels of remaining small pieces are -1.
    """
    n_ter = int(labels.max()) + 1 if labels.size else 0
    mids = np.asarray(bond_mid_xy_px, float).reshape(-1, 2)
    vec = np.asarray(bond_vec_xy, float).reshape(-1, 2)
    if n_ter == 0 or len(mids) < 2 * min_bonds:
        return labels
    h, w = labels.shape
    s = pixel_size_nm
    c = max(2, int(round(cell_nm / s)))
    gh, gw = -(-h // c), -(-w // c)
    min_px = min_area_nm2 / (s * s)
    col = np.clip(np.rint(mids[:, 0]).astype(np.int64), 0, w - 1)
    row = np.clip(np.rint(mids[:, 1]).astype(np.int64), 0, h - 1)
    b_ter = labels[row, col]
    phi = np.arctan2(vec[:, 1], vec[:, 0])
    out = labels.copy()
    next_id = n_ter
    changed = False
    for t in range(n_ter):
        sel = np.flatnonzero(b_ter == t)
        if len(sel) < 2 * min_bonds:
            continue
        theta0 = np.angle(np.mean(np.exp(4j * phi[sel]))) / 4
        cls = np.where(np.cos(2 * (phi[sel] - theta0)) >= 0, 1.0, -1.0)
        if min((cls > 0).sum(), (cls < 0).sum()) < min_bonds:
            continue
        cell = (row[sel] // c) * gw + col[sel] // c
        acc = np.bincount(cell, cls, minlength=gh * gw).reshape(gh, gw).astype(np.float32)
        cnt = np.bincount(cell, minlength=gh * gw).reshape(gh, gw).astype(np.float32)
        acc = cv2.blur(acc, (3, 3), borderType=cv2.BORDER_CONSTANT)
        cnt = cv2.blur(cnt, (3, 3), borderType=cv2.BORDER_CONSTANT)
        known = cnt > 0
        grid = np.where(acc >= 0, 1, -1).astype(np.int8)
        if not known.all():
            _, (ri, ci) = ndimage.distance_transform_edt(~known, return_indices=True)
            grid = grid[ri, ci]
        # regions of the cell grid smaller than the minimum terrace join the other class
        for v in (1, -1):
            n_c, lab_c, st_c, _ = cv2.connectedComponentsWithStats(
                (grid == v).astype(np.uint8), connectivity=4
            )
            small = np.flatnonzero(st_c[1:, cv2.CC_STAT_AREA] * c * c < min_px) + 1
            if len(small):
                grid[np.isin(lab_c, small)] = -v
        if (grid == 1).all() or (grid == -1).all():
            continue
        # cheap check on the cell grid first (scattered false bonds fail here, before any full-frame work)
        b_grid = grid[row[sel] // c, col[sel] // c]
        if any(
            (b_grid == v).sum() >= min_bonds and np.mean(cls[b_grid == v] == v) < min_purity for v in (1, -1)
        ):
            continue
        px_cls = grid[np.arange(h)[:, None] // c, np.arange(w)[None, :] // c]
        mask = labels == t
        parts: list[np.ndarray] = []
        ok = True
        for v in (1, -1):
            n_p, lab_p, st_p, _ = cv2.connectedComponentsWithStats(
                (mask & (px_cls == v)).astype(np.uint8), connectivity=4
            )
            for k in range(1, n_p):
                in_k = lab_p[row[sel], col[sel]] == k
                if st_p[k, cv2.CC_STAT_AREA] < min_px or in_k.sum() < min_bonds:
                    continue  # too small or too few bonds to tell: joins its neighbours below
                if np.mean(cls[in_k] == v) < min_purity:
                    ok = False
                    break
                parts.append(lab_p == k)
            if not ok:
                break
        if not ok or len(parts) < 2:
            continue
        out[mask] = -1
        for k, part in enumerate(parts):
            out[part] = t if k == 0 else next_id
            next_id += int(k > 0)
        # the rest of the terrace takes the label of the nearest decided pixel
        rest = mask & (out < 0)
        if rest.any():
            decided = np.zeros(mask.shape, bool)
            for part in parts:
                decided |= part
            _, (ri, ci) = ndimage.distance_transform_edt(~decided, return_indices=True)
            out[rest] = out[ri[rest], ci[rest]]
        changed = True
    if not changed:
        return labels
    # renumber in raster order of first appearance
    ids, first = np.unique(out.ravel(), return_index=True)
    keep = ids >= 0
    remap = np.full(int(ids.max()) + 2, -1, np.int32)
    remap[ids[keep][np.argsort(first[keep])] + 1] = np.arange(int(keep.sum()), dtype=np.int32)
    return remap[out + 1]


# ------------------------------------------------------------------------------------------------ atoms
def find_atoms(
    atom_prob: np.ndarray,
    pixel_size_nm: float,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
    peak_radius_nm: float = 0.09,
) -> tuple[np.ndarray, np.ndarray]:
    """Atom centres (N, 2) (x_px, y_px) float64 and scores (N,) = peak probability.

    Peaks = local maxima of ``atom_prob`` in a (2r+1)^2 window (r = peak_radius_nm, >= 1 px) above
    ``threshold``; flat-topped maxima (several equal pixels) are merged with scipy.ndimage.label. Sub-pixel
    position = Gaussian 3-point fit (parabola through log prob) along x and y at each peak (plateau centre
    from scipy.ndimage.center_of_mass), clipped to +-0.5 px. ``valid`` (bool) restricts peaks to those
    pixels (one terrace or all
    terraces: the paper's per-terrace sub-images).
    """
    r = max(1, int(round(peak_radius_nm / pixel_size_nm)))
    prob = np.ascontiguousarray(atom_prob, dtype=np.float32)
    # max filter = grey dilation with a (2r+1)^2 square; BORDER_REPLICATE = scipy's mode="nearest"
    local_max = cv2.dilate(prob, np.ones((2 * r + 1, 2 * r + 1), np.uint8), borderType=cv2.BORDER_REPLICATE)
    peak = (prob == local_max) & (prob > threshold)
    if valid is not None:
        peak &= valid
    rows, cols = np.nonzero(peak)
    if len(rows) == 0:
        return np.empty((0, 2)), np.empty(0)
    # merge flat-topped maxima (8-connected plateaus) into their centre; most peaks are single pixels
    lab, n = label_components(peak, connectivity=8)  # = ndimage.label with a 3x3 structure, cheaper
    if n < len(rows):
        ids = lab[rows, cols] - 1
        cnt = np.bincount(ids, minlength=n)
        r_c = np.bincount(ids, rows.astype(np.float64), minlength=n) / cnt
        c_c = np.bincount(ids, cols.astype(np.float64), minlength=n) / cnt
        rows = np.clip(np.rint(r_c).astype(np.int64), 0, prob.shape[0] - 1)
        cols = np.clip(np.rint(c_c).astype(np.int64), 0, prob.shape[1] - 1)
    # Gaussian 3-point refinement per axis (exact for Gaussian peaks) on the 5 pixels of each peak only
    h, w = prob.shape

    def _lp(rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        v = prob[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)].astype(np.float64)
        return np.log(np.maximum(v, 1e-6))

    def _offset(m: np.ndarray, z0: np.ndarray, p: np.ndarray) -> np.ndarray:
        den = m - 2 * z0 + p
        return np.clip(np.where(den < 0, 0.5 * (m - p) / np.where(den < 0, den, -1.0), 0.0), -0.5, 0.5)

    z0 = _lp(rows, cols)
    x = cols + _offset(_lp(rows, cols - 1), z0, _lp(rows, cols + 1))
    y = rows + _offset(_lp(rows - 1, cols), z0, _lp(rows + 1, cols))
    score = prob[rows, cols].astype(np.float64)
    return np.stack([x, y], axis=1), score


@lru_cache(maxsize=32)
def _disk_offsets(radius_px: int) -> np.ndarray:
    """(K, 2) int (d_row, d_col) offsets within ``radius_px`` of (0, 0), nearest first (stable order)."""
    d = np.arange(-radius_px, radius_px + 1)
    dr, dc = np.meshgrid(d, d, indexing="ij")
    off = np.stack([dr.ravel(), dc.ravel()], axis=1)
    r2 = (off**2).sum(axis=1)
    keep = r2 <= radius_px * radius_px
    return off[keep][np.argsort(r2[keep], kind="stable")]


def nearest_label(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: float) -> np.ndarray:
    """For each pixel (rows[i], cols[i]) the label (>= 0) of the nearest pixel within ``radius_px`` whose
    label is >= 0 (the pixel itself first; ties in a fixed offset order), else -1. ``labels`` (H, W) int."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    out = np.full(len(rows), -1, labels.dtype)
    if not len(rows):
        return out
    h, w = labels.shape
    off = _disk_offsets(max(0, int(radius_px)))
    # rings of growing radius: most points find a label within 2-4 px, so few ever see the full disk (the
    # offsets are sorted by distance, so this is the same first hit as one pass over the disk)
    todo = np.arange(len(rows))
    r2 = (off**2).sum(axis=1)
    cuts = [0, *np.searchsorted(r2, [4 + 1, 16 + 1]).tolist(), len(off)]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if hi <= lo:
            continue
        rr = rows[todo, None] + off[None, lo:hi, 0]
        cc = cols[todo, None] + off[None, lo:hi, 1]
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        lab = np.where(inside, labels[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)], -1)
        ok = lab >= 0
        hit = ok.any(axis=1)
        out[todo[hit]] = lab[np.flatnonzero(hit), ok[hit].argmax(axis=1)]
        todo = todo[~hit]
        if not len(todo):
            break
    return out


def find_atoms_on_net_grid(
    atom_prob_net: np.ndarray,
    shape: tuple[int, int],
    pixel_size_nm: float,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
    peak_radius_nm: float = 0.09,
) -> tuple[np.ndarray, np.ndarray]:
    """``find_atoms`` on an atom map sampled finer than the frame: centres (N, 2) (x_px, y_px) in the
    frame's pixels and scores (N,).

    ``atom_prob_net`` (h, w) covers the same field of view as the frame ``shape`` (H, W) at ``pixel_size_nm``
    (the frame's nm/px), with pixel centres mapped as in ``preprocess.resize``: x_frame = (x_net + 0.5) * W /
    w - 0.5. ``valid`` (H, W) bool is read at each net pixel's nearest frame pixel. On a 0.2 nm/px frame a
    dimer's two atoms (0.24 nm apart) fall on neighbouring pixels and give one peak; on NN-1's 0.1 nm/px grid
    they are two (models/MODEL_CARD.md, session 9)."""
    hn, wn = atom_prob_net.shape
    h, w = shape
    fy, fx = hn / h, wn / w
    v = None
    if valid is not None:
        ri = np.clip(np.floor((np.arange(hn) + 0.5) / fy).astype(np.int64), 0, h - 1)
        ci = np.clip(np.floor((np.arange(wn) + 0.5) / fx).astype(np.int64), 0, w - 1)
        v = np.asarray(valid, bool)[np.ix_(ri, ci)]
    xy, score = find_atoms(atom_prob_net, pixel_size_nm / math.sqrt(fx * fy), v, threshold, peak_radius_nm)
    return (xy + 0.5) / np.array([fx, fy]) - 0.5, score


def pair_dimers(atoms_xy_nm: np.ndarray, tol_nm: float = 0.08, tree: cKDTree | None = None) -> np.ndarray:
    """Index pairs (M, 2) (first < second) of atoms that are mutual nearest neighbours at 0.24 +- tol nm (one
    dimer); ``tree``: an optional cKDTree of ``atoms_xy_nm`` to reuse."""
    n_at = len(atoms_xy_nm)
    if n_at < 2:
        return np.empty((0, 2), np.int64)
    tree = tree if tree is not None else cKDTree(atoms_xy_nm)
    # a partner farther than 0.24 + tol cannot pair, and a mutual partner within it is always found: the pairs
    # within that radius give each atom's nearest neighbour there (query_pairs: ~3x faster than a k=2 query)
    nn, dist = _nearest_within(np.asarray(atoms_xy_nm, float), tree, DIMER_ATOM_SEPARATION_NM + tol_nm)
    i = np.arange(n_at)
    ok = (nn > i) & (nn[np.maximum(nn, 0)] == i) & (np.abs(dist - DIMER_ATOM_SEPARATION_NM) < tol_nm)
    return np.stack([i[ok], nn[ok]], axis=1)


def _nearest_within(xy: np.ndarray, tree: cKDTree, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Each point's nearest other point within ``r`` (index, -1 if none; distance, inf if none), from the
    KD-tree's pairs within r (an exact tie keeps the smaller index)."""
    n = len(xy)
    nn = np.full(n, -1, np.int64)
    dist = np.full(n, np.inf)
    ij = tree.query_pairs(r, output_type="ndarray").astype(np.int64)
    if len(ij) == 0:
        return nn, dist
    d = np.hypot(*(xy[ij[:, 0]] - xy[ij[:, 1]]).T)
    src = np.concatenate([ij[:, 0], ij[:, 1]])
    dst = np.concatenate([ij[:, 1], ij[:, 0]])
    dd = np.concatenate([d, d])
    np.minimum.at(dist, src, dd)
    best = dd == dist[src]
    nn[:] = n
    np.minimum.at(nn, src[best], dst[best])
    nn[nn == n] = -1
    return nn, dist


def _wrap(phase: np.ndarray) -> np.ndarray:
    """Phases (radians) wrapped into [-pi, pi)."""
    return (phase + np.pi) % (2 * np.pi) - np.pi


def _blurred_sums(
    ij: np.ndarray, group: np.ndarray, parts: np.ndarray, sigma_cells: float, max_values: int = 1 << 22
) -> np.ndarray:
    """Gaussian-weighted (``sigma_cells``) sums of ``parts`` (N, P) over the points of the same ``group``
    ((N,) small ints; -1 = left out, sums 0), read at each point's own cell (``ij`` (N, 2) int cell column,
    row >= 0). The values are splatted on a grid with one channel per group and part (one bincount) and
    blurred (cv2.GaussianBlur). When that grid would exceed ``max_values`` values or 128 channels (OpenCV
    5's limit; a large frame cut into many terraces), each group gets a grid of its own extent instead:
    memory follows the groups' areas, not their number times the frame's. Returns (N, P) float32."""
    out = np.zeros(parts.shape, np.float32)
    n_p = parts.shape[1]
    pad = int(math.ceil(3 * sigma_cells)) + 1
    ok = group >= 0
    if not ok.any():
        return out
    present = np.bincount(group[ok]) > 0  # group ids are small (terrace ids, x2 for the dimer sides)
    gid = (np.cumsum(present) - 1)[group[ok]]  # dense group index of the ok points
    gw, gh = (int(v) + pad + 1 for v in ij[ok].max(axis=0))
    n_ch = n_p * int(present.sum())
    if n_ch <= 128 and gh * gw * n_ch <= max_values:  # the usual frame: a few terraces, one grid
        sel = [np.flatnonzero(ok)]
        chans = [gid * n_p]
        boxes = [(np.zeros(2, np.int64), gw, gh, n_ch)]
    else:
        order = np.argsort(gid, kind="stable")
        sel = np.split(np.flatnonzero(ok)[order], np.flatnonzero(np.diff(gid[order])) + 1)
        chans = [np.zeros(len(x), np.int64) for x in sel]
        boxes = []
        for x in sel:
            lo = ij[x].min(axis=0) - pad
            w_, h_ = (int(v) + pad + 1 for v in (ij[x] - lo).max(axis=0))
            boxes.append((lo, w_, h_, n_p))
    for x, ch, (lo, w_, h_, n_c) in zip(sel, chans, boxes, strict=True):
        loc = ij[x] - lo
        idx = ((loc[:, 1] * w_ + loc[:, 0]) * n_c + ch)[:, None] + np.arange(n_p)  # (n, P)
        grid = np.bincount(idx.ravel(), parts[x].ravel(), minlength=h_ * w_ * n_c).astype(np.float32)
        grid = cv2.GaussianBlur(grid.reshape(h_, w_, n_c), (0, 0), sigma_cells)
        out[x] = grid.reshape(-1)[idx]
    return out


def lattice_smooth_atoms(
    atoms_xy_nm: np.ndarray,
    group: np.ndarray,
    row_angle_deg: np.ndarray,
    sigma_nm: float,
    max_move_nm: float,
    cell_nm: float = 0.35,
) -> np.ndarray:
    """Atom positions (N, 2) (x, y) nm moved onto the mean lattice phase of the atoms around them.

    Each atom's phase along its rows (period 0.384 nm) and across them (period 0.768 nm) is compared with the
    Gaussian-weighted (``sigma_nm``) mean of the unit phasors of the atoms of its ``group`` (small ints >= 0,
    e.g. its terrace; -1 = not moved) around it; ``row_angle_deg`` (N,) is the row direction at each atom
    (NaN = not moved). Across the rows the two atoms of a dimer sit on two sub-lattices 0.24 nm apart: each
    atom's side is read off the local mean across-row phase (the two sides lie either side of it), and only
    its own side's mean counts. Phasors wrap, so a slowly distorted lattice (drift, creep) keeps its local
    phase while each atom's own position noise is averaged away. An atom whose move would exceed
    ``max_move_nm`` does not fit the local lattice and keeps its position (so do defect rims and anomalies
    far off it). Scan-line jitter moves each line's features by that line's own offset, which the neighbours
    do not share: run it on an image whose lines are put back (``Pipeline`` does, jitter.py). The means are
    taken on a grid of ``cell_nm`` cells (an atom's weights are those of its cell's centre).
    """
    xy = np.asarray(atoms_xy_nm, float)
    out = xy.copy()
    a = np.deg2rad(np.asarray(row_angle_deg, float))
    grp = np.where(np.isfinite(a), np.asarray(group), -1)
    if len(xy) < 2 or not (grp >= 0).any():
        return out
    # cells with a margin of the blur's reach on every side (the grids start at the lowest point minus that)
    pad = int(math.ceil(3 * sigma_nm / cell_nm)) + 1
    ij = np.floor((xy - xy.min(axis=0)) / cell_nm).astype(np.int64) + pad
    c, sn = np.cos(a), np.sin(a)
    ph_al = 2 * np.pi / SURFACE_LATTICE_NM * (xy[:, 0] * c + xy[:, 1] * sn)
    ph_ac = 2 * np.pi / ROW_SPACING_NM * (-xy[:, 0] * sn + xy[:, 1] * c)
    cs = np.stack([np.cos(ph_al), np.sin(ph_al), np.cos(ph_ac), np.sin(ph_ac)], axis=1)
    sig = sigma_nm / cell_nm
    m = _blurred_sums(ij, grp, cs, sig)
    # both sides of a dimer share the along-row phase; across it they sit at +-0.12 nm from the mean
    side = _wrap(ph_ac - np.arctan2(m[:, 3], m[:, 2])) >= 0
    m_side = _blurred_sums(ij, np.where(grp >= 0, 2 * grp + side, -1), cs[:, 2:], sig)
    d_al = _wrap(np.arctan2(m[:, 1], m[:, 0]) - ph_al) / (2 * np.pi) * SURFACE_LATTICE_NM
    d_ac = _wrap(np.arctan2(m_side[:, 1], m_side[:, 0]) - ph_ac) / (2 * np.pi) * ROW_SPACING_NM
    move = (grp >= 0) & (np.hypot(d_al, d_ac) <= max_move_nm)
    out[move, 0] += (d_al * c - d_ac * sn)[move]
    out[move, 1] += (d_al * sn + d_ac * c)[move]
    return out


def keep_separated(xy: np.ndarray, score: np.ndarray, min_dist: float) -> np.ndarray:
    """(N,) bool: the points ``xy`` (N, 2) to keep so that no two kept points are closer than ``min_dist``
    (same units): of each close pair the one with the lower ``score`` goes (ties: the later one). One pass
    over the close pairs, strongest first, so a chain of three close points keeps its ends."""
    keep = np.ones(len(xy), bool)
    if len(xy) < 2 or min_dist <= 0:
        return keep
    ij = cKDTree(xy, balanced_tree=False, compact_nodes=False).query_pairs(min_dist, output_type="ndarray")
    if not len(ij):
        return keep
    sc = np.asarray(score, float)
    weak = np.where(sc[ij[:, 1]] > sc[ij[:, 0]], ij[:, 0], ij[:, 1])
    strong = ij[:, 0] + ij[:, 1] - weak
    for k in np.argsort(-sc[strong], kind="stable").tolist():  # few pairs: a short loop
        if keep[strong[k]]:
            keep[weak[k]] = False
    return keep


def dimers_on_lattice(
    atoms_xy_nm: np.ndarray,
    pairs: np.ndarray,
    row_angle_deg: float | np.ndarray,
    row_phase_nm: float | np.ndarray,
    max_bond_tilt_deg: float = 30.0,
    max_row_offset_nm: float = 0.2,
) -> np.ndarray:
    """Bool (M,): pairs whose bond runs across the rows (within ``max_bond_tilt_deg`` of n) and whose midpoint
    lies within ``max_row_offset_nm`` of a fitted row centre line. Angle and phase: one lattice, or one per
    pair (arrays (M,))."""
    if len(pairs) == 0:
        return np.zeros(0, bool)
    a, b = atoms_xy_nm[pairs[:, 0]], atoms_xy_nm[pairs[:, 1]]
    bond = b - a
    ang = np.deg2rad(np.broadcast_to(np.asarray(row_angle_deg, float), (len(pairs),)))
    n = np.stack([-np.sin(ang), np.cos(ang)], axis=1)
    cos_t = np.abs(np.sum(bond * n, axis=1)) / np.maximum(np.hypot(bond[:, 0], bond[:, 1]), 1e-12)
    mid = (a + b) / 2
    sn = np.sum(mid * n, axis=1)
    off = np.abs((sn - row_phase_nm + ROW_SPACING_NM / 2) % ROW_SPACING_NM - ROW_SPACING_NM / 2)
    return (cos_t >= math.cos(math.radians(max_bond_tilt_deg))) & (off <= max_row_offset_nm)


def lattice_dimers(
    atoms_xy_nm: np.ndarray,
    atom_score: np.ndarray,
    row_angle_deg: np.ndarray,
    row_phase_nm: np.ndarray,
    line_tol_nm: float = 0.07,
    pair_radius_nm: float = 0.15,
    single_min_score: float = 0.5,
    bond_pairs: np.ndarray | None = None,
    max_bond_tilt_deg: float = 30.0,
    max_row_offset_nm: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Dimers from atoms on a known row lattice: (atom index pairs (M, 2) int64, second index -1 for a dimer
    seen by one atom only; centres (M, 2) nm).

    ``row_angle_deg``/``row_phase_nm`` (N,): the lattice at each atom (NaN = none known: the atom is not
    used). An atom belongs to a dimer when its distance from the nearest row centre line is within
    ``line_tol_nm`` of half the dimer-atom separation (0.12 nm); the dimer centre it implies is the atom
    moved by 0.12 nm along the row normal, towards that line (a shift by the physical half-bond rather than a
    projection onto the fitted line, so a locally bent row or a phase error < 0.12 nm does not move the
    centre). Atoms on opposite sides whose implied centres are mutual nearest neighbours within
    ``pair_radius_nm`` (half the 0.384 nm along-row pitch is the hard limit) form one dimer at their
    midpoint; an unpaired atom with score >= ``single_min_score`` is a dimer whose partner atom the network
    missed (most lost dimers: 12946 of 18230 missed realistic-suite dimers had exactly one atom detected).

    ``bond_pairs`` (K, 2): atom pairs already bonded (``pair_dimers``: mutual nearest neighbours 0.24 nm
    apart); those whose bond is within ``max_bond_tilt_deg`` of the row normal and whose midpoint is within
    ``max_row_offset_nm`` of a row centre line are dimers first, at their midpoint (independent of the
    fitted phase, which drift can bend by more than the line tolerance); their atoms are not reused.
    """
    xy = np.asarray(atoms_xy_nm, float).reshape(-1, 2)
    ang = np.deg2rad(np.asarray(row_angle_deg, float))
    ok = np.isfinite(ang) & np.isfinite(np.asarray(row_phase_nm, float))
    first: list[np.ndarray] = []
    if bond_pairs is not None and len(bond_pairs):
        bp = np.asarray(bond_pairs, np.int64).reshape(-1, 2)
        bp = bp[ok[bp[:, 0]] & ok[bp[:, 1]]]
        bond = xy[bp[:, 1]] - xy[bp[:, 0]]
        a0 = ang[bp[:, 0]]
        cos_t = np.abs(-bond[:, 0] * np.sin(a0) + bond[:, 1] * np.cos(a0)) / np.maximum(
            np.hypot(bond[:, 0], bond[:, 1]), 1e-12
        )
        mid = (xy[bp[:, 0]] + xy[bp[:, 1]]) / 2
        sn = -mid[:, 0] * np.sin(a0) + mid[:, 1] * np.cos(a0)
        ph = np.asarray(row_phase_nm, float)[bp[:, 0]]
        off = np.abs((sn - ph + ROW_SPACING_NM / 2) % ROW_SPACING_NM - ROW_SPACING_NM / 2)
        bp = bp[(cos_t >= math.cos(math.radians(max_bond_tilt_deg))) & (off <= max_row_offset_nm)]
        first = [bp]
        ok[bp.ravel()] = False
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        bp = first[0] if first else np.empty((0, 2), np.int64)
        return bp, (xy[bp[:, 0]] + xy[bp[:, 1]]) / 2
    n = np.stack([-np.sin(ang[idx]), np.cos(ang[idx])], axis=1)
    sn = np.sum(xy[idx] * n, axis=1)
    off = (
        sn - np.asarray(row_phase_nm, float)[idx] + ROW_SPACING_NM / 2
    ) % ROW_SPACING_NM - ROW_SPACING_NM / 2
    half = DIMER_ATOM_SEPARATION_NM / 2
    on_line = np.abs(np.abs(off) - half) <= line_tol_nm
    idx, n, side = idx[on_line], n[on_line], np.sign(off[on_line])
    centre = xy[idx] - (side * half)[:, None] * n
    paired = np.zeros(len(idx), bool)
    pairs = np.empty((0, 2), np.int64)
    if len(idx) >= 2:
        tree = cKDTree(centre, balanced_tree=False, compact_nodes=False)
        nb, _ = _nearest_within(centre, tree, pair_radius_nm)
        found = nb >= 0
        nb = np.where(found, nb, np.arange(len(idx)))
        i = np.arange(len(idx))
        mutual = found & (nb[nb] == i) & (i < nb) & (side != side[nb])
        pairs = np.stack([i[mutual], nb[mutual]], axis=1)
        paired[pairs.ravel()] = True
    single = np.flatnonzero(~paired & (np.asarray(atom_score, float)[idx] >= single_min_score))
    both = np.concatenate([*first, np.stack([idx[pairs[:, 0]], idx[pairs[:, 1]]], 1)]).astype(np.int64)
    out_pairs = np.concatenate([both, np.stack([idx[single], -np.ones(len(single), np.int64)], 1)])
    out_centre = np.concatenate([(xy[both[:, 0]] + xy[both[:, 1]]) / 2, centre[single]])
    return out_pairs, out_centre


# ------------------------------------------------------------------------------------------------ defects
@dataclass
class Blobs:
    """Footprints of one defect kind: labels (H, W) int32 (0 = none, k = blob k) + per-blob arrays."""

    labels: np.ndarray
    slices: list[tuple[slice, slice]]
    centre_xy_px: np.ndarray  # (K, 2) probability-weighted centre of mass
    score: np.ndarray  # (K,) max probability in the blob
    area_px: np.ndarray  # (K,)
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (rows, cols, ids) of all blob pixels

    def pixel_lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, ids >= 1) of every blob pixel in raster order (cached)."""
        if self.pixels is None:
            self.pixels = _blob_pixels(self.labels)
        return self.pixels


def _blob_pixels(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, ids) of every labelled pixel (label > 0), raster order."""
    flat = np.flatnonzero(lab)
    rows, cols = np.divmod(flat, lab.shape[1])
    return rows, cols, lab.ravel()[flat]


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool (H, W) mask: (labels int32 (H, W), 0 = background, 1..n), n).

    The same labels as ``scipy.ndimage.label`` (8-connectivity: a 3x3 structure; 4: its default cross),
    numbered in raster order of each component's first pixel; computed with OpenCV's Wu (SAUF) labelling,
    which numbers components that way (tests/test_pipeline_postprocess.py compares it with scipy), at
    ~1/5 of scipy's cost. The other OpenCV algorithms (block-based) number them differently."""
    m = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    n, lab = cv2.connectedComponentsWithAlgorithm(m, connectivity, cv2.CV_32S, cv2.CCL_WU)
    return lab, int(n) - 1


def _group_bounds(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): a stable argsort of ``ids`` (1..n, every id present) and where each id's run
    starts in it (n + 1 entries, the last = len(ids))."""
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(1, n + 2))
    return order, starts


def find_blobs(
    prob: np.ndarray, pixel_size_nm: float, threshold: float = 0.5, min_area_nm2: float = 0.05
) -> Blobs:
    """Blobs of ``prob > threshold`` (8-connected) of at least ``min_area_nm2``; centres by the
    probability-weighted centre of mass inside each blob (what scipy.ndimage.center_of_mass computes, here
    with bincounts over the blob pixels only). Blob ids in raster order of first pixel (scipy's order);
    the pixel lists are kept (``Blobs.pixels``) for ``blob_terraces`` and ``blob_features``."""
    mask = prob > threshold
    lab, n = label_components(mask, 8)
    if n == 0:
        return Blobs(np.zeros(prob.shape, np.int32), [], np.empty((0, 2)), np.empty(0), np.empty(0))
    w = prob.shape[1]
    flat = np.flatnonzero(mask)  # raster order
    ids = lab.ravel()[flat]
    area = np.bincount(ids, minlength=n + 1)[1:]
    keep = area * pixel_size_nm**2 >= min_area_nm2
    if not keep.all():
        remap = np.zeros(n + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        n = int(keep.sum())
        ids = remap[ids]
        on = ids > 0
        flat, ids = flat[on], ids[on]
        lab = np.zeros(prob.shape, np.int32)
        lab.ravel()[flat] = ids  # relabel only the kept pixels (cheaper than remapping every pixel)
        if n == 0:
            return Blobs(lab, [], np.empty((0, 2)), np.empty(0), np.empty(0))
        area = area[keep]
    rows, cols = np.divmod(flat, w)
    p = prob.ravel()[flat].astype(np.float64)
    wsum = np.bincount(ids, p, minlength=n + 1)[1:]
    cx = np.bincount(ids, p * cols, minlength=n + 1)[1:] / wsum
    cy = np.bincount(ids, p * rows, minlength=n + 1)[1:] / wsum
    # per-blob max probability and bounding box from the pixels grouped by blob (raster order kept)
    order, starts = _group_bounds(ids, n)
    st = starts[:-1]
    score = np.maximum.reduceat(p[order], st)
    c_sorted = cols[order]
    r0 = rows[order][st].tolist()
    r1 = rows[order][starts[1:] - 1].tolist()
    c0 = np.minimum.reduceat(c_sorted, st).tolist()
    c1 = np.maximum.reduceat(c_sorted, st).tolist()
    slices = [(slice(a, b + 1), slice(c, d + 1)) for a, b, c, d in zip(r0, r1, c0, c1, strict=True)]
    return Blobs(
        lab.astype(np.int32, copy=False),
        slices,
        np.stack([cx, cy], axis=1),
        score,
        area.astype(np.float64),
        (rows, cols, ids),
    )


def footprint_blob(mask: np.ndarray) -> Blobs:
    """One defect footprint as ``Blobs`` with a single blob: the largest 4-connected component of the bool
    (H, W) ``mask`` (ties: the first in raster order), for ``blob_features`` on a single given footprint
    (``classify.defect_features``). InputError when the mask is empty."""
    lab, n = label_components(mask, 4)
    if n == 0:
        raise InputError("defect mask is empty")
    flat = np.flatnonzero(lab)
    comp = lab.ravel()[flat]
    biggest = int(np.argmax(np.bincount(comp, minlength=n + 1)[1:])) + 1  # argmax: first of equal sizes
    flat = flat[comp == biggest]
    labels = np.zeros(mask.shape, np.int32)
    labels.ravel()[flat] = 1
    rows, cols = np.divmod(flat, mask.shape[1])
    sl = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    ids = np.ones(len(flat), np.int32)
    centre = np.array([[cols.mean(), rows.mean()]])
    return Blobs(labels, [sl], centre, np.ones(1), np.array([float(len(flat))]), (rows, cols, ids))


def blob_terraces(terrace_labels: np.ndarray, blobs: Blobs) -> np.ndarray:
    """Most common terrace label (>= 0) under each blob (K,) int, -1 where a blob lies only on step/unknown
    pixels; ties go to the smaller terrace id."""
    k = len(blobs.slices)
    rows, cols, ids = blobs.pixel_lists()
    ter = terrace_labels[rows, cols].astype(np.int64)
    on = ter >= 0
    n_ter = int(ter.max()) + 1 if on.any() else 1
    counts = np.bincount((ids[on] - 1) * n_ter + ter[on], minlength=k * n_ter).reshape(k, n_ter)
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), -1)


def _has_diagonal_links(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> bool:
    """True when two pixels of the bool (H, W) mask touch only diagonally (neither shared 4-neighbour set):
    the only way an 8-connected component can consist of several 4-connected ones. ``rows``/``cols``: all
    mask pixels (each diagonal pair is checked from its upper pixel, so only those are looked at)."""
    h, w = mask.shape
    m = mask.ravel()
    ok = rows < h - 1
    r, c = rows[ok], cols[ok]
    flat = r * w + c
    below = m[flat + w]
    right = c < w - 1  # pair with the lower-right neighbour
    f = flat[right]
    if (m[f + w + 1] & ~m[f + 1] & ~below[right]).any():
        return True
    left = c > 0  # pair with the lower-left neighbour
    f = flat[left]
    return bool((m[f + w - 1] & ~m[f - 1] & ~below[left]).any())


def _main_components(blobs: Blobs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each blob restricted to its largest 4-connected component (what ``classify.defect_features``
    measures; ties: the component met first in raster order): (labels (H, W) int32, rows, cols, ids)."""
    k_n = len(blobs.slices)
    rows, cols, ids = blobs.pixel_lists()
    fg = blobs.labels > 0
    if not _has_diagonal_links(fg, rows, cols):  # then every 8-connected blob is 4-connected: nothing to cut
        return blobs.labels, rows, cols, ids
    lab4, n4 = label_components(fg, 4)
    if n4 == k_n:
        return blobs.labels, rows, cols, ids
    comp = lab4.ravel()[rows * blobs.labels.shape[1] + cols]
    size = np.bincount(comp, minlength=n4 + 1)
    owner = np.zeros(n4 + 1, np.int64)
    owner[comp] = ids
    c = np.arange(1, n4 + 1)
    order = np.lexsort((c, -size[1:], owner[1:]))  # by owner, then size desc, then raster order
    first = order[np.r_[True, owner[1:][order[1:]] != owner[1:][order[:-1]]]]
    chosen = np.zeros(n4 + 1, bool)
    chosen[c[first]] = True
    keep = chosen[comp]
    main = blobs.labels.copy()
    main[rows[~keep], cols[~keep]] = 0
    return main, rows[keep], cols[keep], ids[keep]


def _disk(radius_px: float) -> np.ndarray:
    """uint8 kernel of the integer offsets with sqrt(dx^2 + dy^2) <= radius_px (float64, as scipy's EDT)."""
    r = int(math.floor(radius_px))
    off = np.arange(-r, r + 1)
    return (np.sqrt((off[:, None] ** 2 + off[None, :] ** 2).astype(np.float64)) <= radius_px).astype(np.uint8)


def _ring_levels(
    height: np.ndarray, main: np.ndarray, slices: list[tuple[slice, slice]], ring_px: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per blob: the heights (float64) of its ring = pixels at Euclidean distance d with 1 < d <= ring_px
    from its footprint (``main`` == k + 1), and the ring sizes (K,).

    All blobs are dilated in one call: their crops are stacked vertically into one atlas with gaps the kernel
    cannot cross, so the cost is one cv2.dilate instead of one distance transform per blob, and each
    blob's ring pixels come out contiguous in raster order."""
    h, w = height.shape
    m = int(math.floor(ring_px)) + 1
    boxes = [
        (max(0, sy.start - m), min(h, sy.stop + m), max(0, sx.start - m), min(w, sx.stop + m))
        for sy, sx in slices
    ]
    starts = np.cumsum([0] + [y1 - y0 + m for y0, y1, _, _ in boxes])
    aw = max(x1 - x0 for _, _, x0, x1 in boxes)
    mask_a = np.zeros((int(starts[-1]), aw), np.uint8)
    valid = np.zeros(mask_a.shape, bool)
    img_a = np.zeros(mask_a.shape, np.result_type(height.dtype, np.float32))  # float64 input stays exact
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        r0 = int(starts[k])
        tile = (slice(r0, r0 + y1 - y0), slice(0, x1 - x0))
        np.equal(main[y0:y1, x0:x1], k + 1, out=valid[tile])
        mask_a[tile] = valid[tile]
        valid[tile] = True
        img_a[tile] = height[y0:y1, x0:x1]
    # cv2 morphology vectorises along rows: dilate the (wide) transpose, the kernels are symmetric
    mask_t = np.ascontiguousarray(mask_a.T)
    ring = (cv2.dilate(mask_t, _disk(ring_px)) > 0).T
    ring &= (cv2.dilate(mask_t, _CROSS) == 0).T
    ring &= valid
    per_row = np.count_nonzero(ring, axis=1)
    counts = np.add.reduceat(per_row, starts[:-1].astype(np.int64))
    vals = img_a[ring].astype(np.float64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [vals[bounds[k] : bounds[k + 1]] for k in range(len(boxes))], counts


def blob_features(
    height_nm: np.ndarray,
    blobs: Blobs,
    pixel_size_nm: float,
    atoms_xy_px: np.ndarray,
    ring_nm: float = 1.2,
    row_angle_deg: list[float | None] | None = None,
    atom_tree_nm: cKDTree | None = None,
) -> np.ndarray:
    """Features (K, F) in ``classify.FEATURE_NAMES`` order per blob, the values ``classify.defect_features``
    gives for each blob's footprint (tested to agree), computed for all blobs at once.

    ``height_nm``: apparent height with its true sign (raw image, nm); ``atoms_xy_px`` (N, 2) detected atom
    centres; ``row_angle_deg[k]``: the blob's terrace row direction for the row-aligned extents (None = 0);
    ``atom_tree_nm``: optional cKDTree of ``atoms_xy_px * pixel_size_nm`` (reused from the dimer pairing).
    Definitions (see classify.defect_features): each blob's largest 4-connected component is measured;
    circularity from its OpenCV contour; height_rel = (z_centre - z_level) / (z_atoms - z_level) with
    z_level = median of the ring 1 < d <= ring_nm around the footprint, z_atoms = mean height at detected
    atoms within ring_nm + 1 nm of the centre and off the footprint (>= 3 of them, else the ring's 90th
    percentile), z_centre = mean height within max(1 px, 0.15 nm) of the centre; NaN without corrugation.
    """
    k_n = len(blobs.slices)
    out = np.full((k_n, len(FEATURE_NAMES)), np.nan)
    if k_n == 0:
        return out
    h, w = height_nm.shape
    s = pixel_size_nm
    main, rows, cols, ids = _main_components(blobs)
    ids0 = ids - 1
    area_px = np.bincount(ids0, minlength=k_n).astype(np.float64)
    cx = np.bincount(ids0, cols.astype(np.float64), minlength=k_n) / area_px
    cy = np.bincount(ids0, rows.astype(np.float64), minlength=k_n) / area_px

    # circularity: one findContours for all (main components of different blobs are not 8-adjacent)
    perim = np.full(k_n, np.nan)
    c_area = np.full(k_n, np.nan)
    contours, _ = cv2.findContours((main > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for c in contours:
        k = int(main[c[0, 0, 1], c[0, 0, 0]]) - 1
        a = cv2.contourArea(c)
        if not np.isfinite(c_area[k]) or a > c_area[k]:
            perim[k], c_area[k] = cv2.arcLength(c, closed=True), a
    for k in np.flatnonzero(~np.isfinite(c_area)):  # enclosed in another blob's hole: measure alone
        sy, sx = blobs.slices[k]
        cs, _ = cv2.findContours(
            (main[sy, sx] == k + 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        c = max(cs, key=cv2.contourArea)
        perim[k], c_area[k] = cv2.arcLength(c, closed=True), cv2.contourArea(c)
    circ = np.ones(len(perim))  # a one-pixel blob's contour has no length: round
    pos = perim > 0
    circ[pos] = np.minimum(1.0, 4.0 * math.pi * c_area[pos] / perim[pos] ** 2)

    # local level: median of the ring; atom level: detected atoms near the centre, off the footprint
    ring_px = max(2.0, ring_nm / s)
    rings, counts = _ring_levels(height_nm, main, blobs.slices, ring_px)
    atom_level = np.full(k_n, np.nan)
    atoms = np.asarray(atoms_xy_px, float).reshape(-1, 2)
    if len(atoms):
        tree = atom_tree_nm if atom_tree_nm is not None else cKDTree(atoms * s)
        reach_nm = (ring_nm + 1.0) * (1 + 1e-9) + 1e-9  # the exact test follows
        near_lists = tree.query_ball_point(np.stack([cx, cy], axis=1) * s, reach_nm)
        kk = np.repeat(np.arange(k_n), [len(x) for x in near_lists])
        if len(kk):
            j = np.concatenate([np.asarray(x, np.int64) for x in near_lists])
            d_nm = np.hypot(atoms[j, 0] - cx[kk], atoms[j, 1] - cy[kk]) * s
            ac = np.clip(np.rint(atoms[j, 0]).astype(np.int64), 0, w - 1)
            ar = np.clip(np.rint(atoms[j, 1]).astype(np.int64), 0, h - 1)
            ok = (d_nm <= ring_nm + 1.0) & (main[ar, ac] != kk + 1)
            n_ok = np.bincount(kk[ok], minlength=k_n)
            z_sum = np.bincount(kk[ok], height_nm[ar[ok], ac[ok]].astype(np.float64), minlength=k_n)
            atom_level = np.where(n_ok >= 3, z_sum / np.maximum(n_ok, 1), np.nan)

    # z_centre: mean height of the pixels within r of the centre
    r_px = max(1.0, 0.15 / s)
    o = np.arange(-int(math.ceil(r_px)) - 1, int(math.ceil(r_px)) + 2)
    px = np.rint(cx)[:, None, None] + o[None, None, :]
    py = np.rint(cy)[:, None, None] + o[None, :, None]
    core = (
        ((px - cx[:, None, None]) ** 2 + (py - cy[:, None, None]) ** 2 <= r_px**2)
        & (px >= 0)
        & (px < w)
        & (py >= 0)
        & (py < h)
    )
    pxi = np.clip(px, 0, w - 1).astype(np.int64)
    pyi = np.clip(py, 0, h - 1).astype(np.int64)
    z = height_nm[np.broadcast_to(pyi, core.shape), np.broadcast_to(pxi, core.shape)].astype(np.float64)
    z_centre = (z * core).sum(axis=(1, 2)) / np.maximum(core.sum(axis=(1, 2)), 1)

    # extents along / across the rows of the pixel footprint
    ang = np.array(
        [math.radians((row_angle_deg[k] if row_angle_deg is not None else None) or 0.0) for k in range(k_n)]
    )
    dx, dy = cols - cx[ids0], rows - cy[ids0]
    along = dx * np.cos(ang)[ids0] + dy * np.sin(ang)[ids0]
    across = -dx * np.sin(ang)[ids0] + dy * np.cos(ang)[ids0]
    ext = []
    for v in (along, across):
        hi_v = np.full(k_n, -np.inf)
        lo_v = np.full(k_n, np.inf)
        np.maximum.at(hi_v, ids0, v)
        np.minimum.at(lo_v, ids0, v)
        ext.append((hi_v - lo_v + 1.0) * s)

    level = np.empty(k_n)
    for k in range(k_n):
        seg = rings[k]
        if counts[k] < 4:  # footprint fills its surroundings: classify's fallback on the blob's own crop
            seg = _fallback_values(height_nm, main, blobs.slices[k], k + 1, ring_nm, s)
        level[k] = _median(seg)
        if not math.isfinite(atom_level[k]) or atom_level[k] - level[k] <= 1e-6:
            atom_level[k] = float(fast_percentiles(seg, (90.0,))[0])  # = np.percentile, ~5x cheaper
    corr = atom_level - level
    height_rel = np.where(corr > 1e-9, (z_centre - level) / np.where(corr > 1e-9, corr, 1.0), np.nan)
    # peak (signed by the footprint's mean) and fill relative to the level, as classify.defect_features
    z_rel = height_nm[rows, cols].astype(np.float64) - level[ids0]
    mean_rel = np.bincount(ids0, z_rel, minlength=k_n) / area_px
    z_hi = np.full(k_n, -np.inf)
    z_lo = np.full(k_n, np.inf)
    np.maximum.at(z_hi, ids0, z_rel)
    np.minimum.at(z_lo, ids0, z_rel)
    peak = np.where(mean_rel >= 0, z_hi, z_lo)
    values = {
        "peak_nm": peak,
        "fill": np.where(peak != 0, mean_rel / np.where(peak != 0, peak, 1.0), np.nan),
        "height_rel": height_rel,
        "area_cells": area_px * s * s / UNIT_CELL_AREA_NM2,
        "circularity": circ,
        "extent_along_nm": ext[0],
        "extent_across_nm": ext[1],
    }
    for j, name in enumerate(FEATURE_NAMES):
        out[:, j] = values[name]
    return out


def _median(v: np.ndarray) -> float:
    """np.median of a 1-D float64 array (same value), without its per-call overhead."""
    n = len(v)
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(v, [lo, hi])
    return float((part[lo] + part[hi]) / 2)


def _fallback_values(
    height: np.ndarray, main: np.ndarray, sl: tuple[slice, slice], k: int, ring_nm: float, s: float
) -> np.ndarray:
    """classify's values when a ring has < 4 pixels: everything outside the footprint in its crop."""
    h, w = height.shape
    pad = int(math.ceil((ring_nm + 1.5) / s))
    sy, sx = sl
    crop = (
        slice(max(0, sy.start - pad), min(h, sy.stop + pad)),
        slice(max(0, sx.start - pad), min(w, sx.stop + pad)),
    )
    outside = main[crop] != k
    sub = height[crop].astype(np.float64)
    return sub[outside] if outside.any() else sub.ravel()


def area_cells(area_nm2: float) -> float:
    """Area in 2x1 unit cells (0.295 nm^2 each)."""
    return area_nm2 / UNIT_CELL_AREA_NM2


def defect_patch(
    height_nm: np.ndarray,
    x_px: float,
    y_px: float,
    pixel_size_nm: float,
    row_angle_deg: float,
    size_px: int = 24,
    patch_pixel_size_nm: float = 0.125,
) -> np.ndarray:
    """Row-aligned (rows horizontal) float32 patch around a defect (cv2.warpAffine)."""
    return row_aligned_patch(
        height_nm, x_px, y_px, pixel_size_nm, row_angle_deg, size_px, patch_pixel_size_nm
    )


def majority_label(labels: np.ndarray, blob_labels: np.ndarray, k: int, sl: tuple[slice, slice]) -> int:
    """Most common terrace label (>= 0) under blob k, -1 if it lies only on step/unknown pixels."""
    sub = labels[sl][blob_labels[sl] == k]
    sub = sub[sub >= 0]
    if sub.size == 0:
        return -1
    vals, counts = np.unique(sub, return_counts=True)
    return int(vals[np.argmax(counts)])
