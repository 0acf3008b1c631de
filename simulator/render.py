"""Ideal (artefact-free, point-tip) apparent height sampled at the tip positions of a raster, plus exact
truth.

The height field is analytic in the sample frame: terrace base heights with smooth step ramps, the
periodic dimer
lattice of each terrace (hard-assigned by the terrace under each point), and local defect templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.defects import (
    Defect,
    core_radius_nm,
    footprint_centre_nm,
    render_defect_core,
    render_defect_halo,
    template_radius_nm,
)
from simulator.lattice import Appearance, lattice_height
from simulator.scan import ScanGeometry
from simulator.surface import Surface
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM

STEP_MASK_HALF_WIDTH_NM = 0.4
RING_POINTS = 24  # points on a template's boundary circle mapped to pixels for its drift-aware box
STEP_DIST_CLIP_NM = 1.0  # IdealRender.step_dist_nm is clipped here (only < STEP_MASK_HALF_WIDTH_NM is used)


@dataclass
class IdealRender:
    """Ideal height (nm) and per-pixel labels of one raster (all (H, W))."""

    z_nm: np.ndarray
    terrace: np.ndarray  # int64 terrace index under each pixel
    step_dist_nm: np.ndarray  # distance to the nearest step edge, nm, clipped at STEP_DIST_CLIP_NM
    defect_instances: np.ndarray  # int32, Defect.id or 0
    defect_pixels: dict[int, tuple[float, float]]  # id -> (x_px, y_px) footprint centre
    terrace_ids: list[int] = field(default_factory=list)  # sorted ids present in ``terrace``


def present_terraces(surface: Surface, terrace: np.ndarray) -> list[int]:
    """Sorted terrace ids occurring in ``terrace`` (as np.unique, but one counting pass: ids are
    surface.n0 .. surface.n0 + len(surface.steps))."""
    if terrace.size == 0:
        return []
    counts = np.bincount((terrace - surface.n0).ravel(), minlength=len(surface.steps) + 1)
    return [surface.n0 + int(k) for k in np.flatnonzero(counts)]


def render_ideal(
    surface: Surface,
    defects: list[Defect],
    geom: ScanGeometry,
    app: Appearance,
    rows: np.ndarray | None = None,
) -> IdealRender:
    """Sample the analytic surface at the raster positions of ``rows`` (default all rows) of ``geom``."""
    rows = np.arange(geom.height_px) if rows is None else np.asarray(rows)
    x, y = geom.sample_coords_nm(rows)
    terrace, dist, z = surface.terrace_at(x, y, max_dist_nm=STEP_DIST_CLIP_NM)
    present = present_terraces(surface, terrace)
    if len(present) == 1:  # most frames: no mask, no gather/scatter copies
        a, b = surface.lattice(present[0]).to_lattice(x, y)
        z += lattice_height(a, b, app)[0]
    else:
        for n in present:
            m = terrace == n
            a, b = surface.lattice(n).to_lattice(x[m], y[m])
            z[m] += lattice_height(a, b, app)[0]
    inst = np.zeros(x.shape, dtype=np.int32)
    centres: dict[int, tuple[float, float]] = {}
    if not defects:
        return IdealRender(z, terrace, dist, inst, centres, present)
    s = geom.pixel_size_nm
    pad = float(np.abs(geom.jitter_px).max(initial=0.0)) + 2.0
    r0, r1 = int(rows[0]), int(rows[-1])
    lats = [surface.lattice(d.terrace) for d in defects]
    c_nm = np.array([footprint_centre_nm(d, lat) for d, lat in zip(defects, lats, strict=True)])
    c_px = geom.to_pixels(c_nm)  # one vectorised inversion for all defects (pointwise, same numbers)
    # the truth's centres: where the recorded blobs are centred (differs from c_px on jittered lines only;
    # c_px, the nearest line's, places the render boxes)
    truth_px = geom.feature_pixels(c_nm) if geom.jitter_px.any() else c_px
    core_px = _halo_core_bounds_px(defects, c_nm, geom)
    for k, (d, lat, c, (cx, cy)) in enumerate(zip(defects, lats, c_nm, c_px, strict=True)):
        cx, cy = float(cx), float(cy)
        centres[d.id] = (float(truth_px[k, 0]), float(truth_px[k, 1]))
        # the core (Gaussians of a few 0.1 nm) and the long charged halo get their own boxes: evaluating the
        # core over the halo box (up to ~18 nm) was the main cost of hard/training frames
        if d.halo_amp_nm:
            halo_rad = template_radius_nm(d) / s + pad
            xl, xh, yl, yh = core_px[k]
            sl = _span(
                max(xl - pad, cx - halo_rad),
                min(xh + pad, cx + halo_rad),
                max(yl - pad, cy - halo_rad),
                min(yh + pad, cy + halo_rad),
                r0,
                r1,
                geom.width_px,
            )
        else:
            rad = core_radius_nm(d) / s + pad
            sl = _span(cx - rad, cx + rad, cy - rad, cy + rad, r0, r1, geom.width_px)
        if sl is not None:
            dz, foot = render_defect_core(d, lat, x[sl], y[sl], app, centre_nm=c)
            _add_on_terrace(z[sl], inst[sl], terrace[sl], d.terrace, dz, foot, d.id)
        if d.halo_amp_nm:
            sl = _span(cx - halo_rad, cx + halo_rad, cy - halo_rad, cy + halo_rad, r0, r1, geom.width_px)
            if sl is not None:
                dz = render_defect_halo(d, lat, x[sl], y[sl], app, centre_nm=c)
                _add_on_terrace(z[sl], None, terrace[sl], d.terrace, dz, None, d.id)
    return IdealRender(z, terrace, dist, inst, centres, present)


def _add_on_terrace(
    z_box: np.ndarray,
    inst_box: np.ndarray | None,
    terrace_box: np.ndarray,
    n: int,
    dz_nm: np.ndarray,
    foot: np.ndarray | None,
    defect_id: int,
) -> None:
    """In place on the box views: z += dz and inst = id on the footprint, only on terrace n (a template never
    spills onto another terrace). Most boxes lie on one terrace: then no masking pass is needed."""
    if (terrace_box == n).all():
        z_box += dz_nm
        if foot is not None and inst_box is not None:
            inst_box[foot] = defect_id
        return
    on = terrace_box == n
    z_box += np.where(on, dz_nm, 0.0)
    if foot is not None and inst_box is not None:
        inst_box[foot & on] = defect_id


def _span(
    x_lo_px: float, x_hi_px: float, y_lo_px: float, y_hi_px: float, r0: int, r1: int, width_px: int
) -> tuple[slice, slice] | None:
    """Slices (rows relative to r0, columns) of the pixels in [x_lo, x_hi] x [y_lo, y_hi] (rounded outwards),
    clipped to rows r0..r1 and columns 0..width_px-1; None if empty."""
    ya, yb = max(int(np.floor(y_lo_px)), r0), min(int(np.ceil(y_hi_px)), r1)
    xa, xb = max(int(np.floor(x_lo_px)), 0), min(int(np.ceil(x_hi_px)), width_px - 1)
    if ya > yb or xa > xb:
        return None
    return slice(ya - r0, yb - r0 + 1), slice(xa, xb + 1)


def _halo_core_bounds_px(defects: list[Defect], c_nm: np.ndarray, geom: ScanGeometry) -> np.ndarray:
    """(N, 4) pixel bounds (x_lo, x_hi, y_lo, y_hi) of the disc of ``core_radius_nm`` around each charged
    defect's centre, through the real raster map (drift can compress or stretch the slow axis, so a radius in
    nm / pixel size is not enough there); NaN rows for defects without a halo.

    Before the core got its own box, charged defects evaluated it over the whole halo box: with these bounds
    the core is dropped only where it is below its value at core_radius_nm (< 1e-6 nm)."""
    out = np.full((len(defects), 4), np.nan)
    idx = [k for k, d in enumerate(defects) if d.halo_amp_nm]
    if not idx:
        return out
    ang = np.linspace(0.0, 2.0 * np.pi, RING_POINTS, endpoint=False)
    ring = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    rad = np.array([core_radius_nm(defects[k]) for k in idx])
    pts = c_nm[idx][:, None, :] + rad[:, None, None] * ring[None, :, :]
    px = geom.to_pixels(pts.reshape(-1, 2)).reshape(len(idx), RING_POINTS, 2)
    # chords between ring points fall inside the circle by at most r (1 - cos(pi / n)); widen by that + 1 px
    m = rad * (1.0 - np.cos(np.pi / RING_POINTS)) / geom.pixel_size_nm + 1.0
    out[idx] = np.stack(
        [px[..., 0].min(1) - m, px[..., 0].max(1) + m, px[..., 1].min(1) - m, px[..., 1].max(1) + m], axis=1
    )
    return out


def _cell_keys(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """One int64 per dimer index pair (i, j) (|i|, |j| < 2**31), for vectorised set membership."""
    return np.asarray(i, dtype=np.int64) * (1 << 32) + np.asarray(j, dtype=np.int64)


@dataclass
class LatticeTruth:
    """Intact dimers and their atoms inside the frame, in frame pixels."""

    dimers_xy_px: np.ndarray
    dimer_terrace: np.ndarray
    dimer_row: np.ndarray
    dimer_bare: np.ndarray
    atoms_xy_px: np.ndarray
    atom_terrace: np.ndarray
    atom_dimer: np.ndarray  # index into the dimer arrays


def lattice_truth(surface: Surface, defects: list[Defect], geom: ScanGeometry) -> LatticeTruth:
    """Dimers (centre, terrace, row index j, bare flag) and atoms whose pixel positions fall inside the frame.

    Dimers removed by vacancies, covered by adatoms or converted to dihydride are omitted; bare dimers
    (db_pair, litho_patch) stay with ``dimer_bare`` set.
    """
    corners = geom.corners_nm()
    removed: dict[int, set] = {}
    bare: dict[int, set] = {}
    for d in defects:
        removed.setdefault(d.terrace, set()).update(d.removed)
        bare.setdefault(d.terrace, set()).update(d.bare)
    H, W = geom.height_px, geom.width_px
    half = 0.5 * DIMER_ATOM_SEPARATION_NM
    out_d, out_t, out_j, out_b, out_a = [], [], [], [], []
    for n in surface.terrace_ids:
        lat = surface.lattice(n)
        i0, i1, j0, j1 = lat.index_range(corners)
        ii, jj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        c = lat.dimer_centres_nm(ii, jj)
        bbox = (c[:, 0].min(), c[:, 0].max(), c[:, 1].min(), c[:, 1].max())
        if n not in surface.possible_terraces(*bbox):  # e.g. the far terraces of the 1 um instrument sample
            continue
        # the lattice index box of a rotated frame holds up to twice its dimers: drop those that cannot map
        # into the frame before the exact (iterative) inversion, which is pointwise, so the rest is unchanged
        keep = geom.may_be_inside(c)
        ii, jj, c = ii[keep], jj[keep], c[keep]
        on = surface.terrace_at(c[:, 0], c[:, 1], max_dist_nm=0.0)[0] == n
        if removed.get(n):
            on &= ~np.isin(_cell_keys(ii, jj), _cell_keys(*np.array(list(removed[n])).T))
        ii, jj, c = ii[on], jj[on], c[on]
        if len(c) == 0:
            continue
        px = geom.feature_pixels(c)
        inside = (px[:, 0] >= -0.5) & (px[:, 0] <= W - 0.5) & (px[:, 1] >= -0.5) & (px[:, 1] <= H - 0.5)
        ii, jj, c = ii[inside], jj[inside], c[inside]
        atoms = np.concatenate([c - half * lat.bond_dir, c + half * lat.bond_dir])
        out_a.append(geom.feature_pixels(atoms).reshape(2, -1, 2))
        out_d.append(px[inside])
        out_t.append(np.full(len(c), n))
        out_j.append(jj)
        bset = bare.get(n)
        if bset:
            out_b.append(np.isin(_cell_keys(ii, jj), _cell_keys(*np.array(list(bset)).T)))
        else:
            out_b.append(np.zeros(len(c), dtype=bool))
    if not out_d:
        e2 = np.zeros((0, 2))
        ei = np.zeros(0, dtype=np.int64)
        return LatticeTruth(e2, ei, ei, np.zeros(0, bool), e2, ei, ei)
    dimers = np.concatenate(out_d)
    atoms2 = np.concatenate(out_a, axis=1)  # (2, M, 2): both atoms of each dimer
    m = len(dimers)
    atoms = atoms2.reshape(-1, 2)
    atom_dimer = np.tile(np.arange(m), 2)
    a_in = (atoms[:, 0] >= -0.5) & (atoms[:, 0] <= W - 0.5) & (atoms[:, 1] >= -0.5) & (atoms[:, 1] <= H - 0.5)
    terr = np.concatenate(out_t).astype(np.int64)
    return LatticeTruth(
        dimers_xy_px=dimers,
        dimer_terrace=terr,
        dimer_row=np.concatenate(out_j).astype(np.int64),
        dimer_bare=np.concatenate(out_b),
        atoms_xy_px=atoms[a_in],
        atom_terrace=terr[atom_dimer[a_in]],
        atom_dimer=atom_dimer[a_in],
    )
