"""Point defects of H-Si(100)-2x1: footprints on the dimer lattice, placement, and apparent-height templates.

Footprints are lists of dimer indices (i along the row, j = row) on one terrace. Heights (nm, filled state,
relative to the local row maximum) and footprints follow ../shared/design/hsi-physics.md sections 2.2 and 5.1.
Protrusions stay bright and depressions dark in empty states; charged-defect halos change sign with bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from simulator.lattice import Appearance, TerraceLattice, dimer_height
from simulator.surface import Surface
from stm_feedback.physics import DEFECT_CLASSES, DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, SURFACE_LATTICE_NM

DimerIndex = tuple[int, int]
# half extents (nm) of the footprint rectangle of one dimer, along / across the row
FOOT_HALF_ALONG_NM = 0.5 * SURFACE_LATTICE_NM
FOOT_HALF_ACROSS_NM = 0.3
# removed-dimer atoms are evaluated within this many atom-Gaussian widths of the footprint (exp(-32) beyond)
NEAR_SIGMAS = 8.0
# a template Gaussian is negligible below this height (nm): sets the render box of tall templates
CUT_NM = 2e-4


@dataclass
class Defect:
    """One defect on terrace ``terrace``; ``dimers`` is its footprint, ``removed``/``bare`` subsets of it.

    Core template (filled-state heights, nm): an anisotropic Gaussian of amplitude ``amp_nm`` (widths
    ``sigma_along_nm`` along the row, ``sigma_across_nm`` across it) on every removed or bare footprint dimer,
    combined as a soft union ``amp * (1 - prod(1 - g))`` so multi-dimer pits have a flat floor at ``amp_nm``;
    ``kept_amp_nm`` on the other footprint dimers (the split-off dimer of a 1+2-DV). Removed dimers lose their
    atoms; with ``atom_shift_nm`` > 0 the atoms are drawn again, pushed apart across the row by that much on
    each side (dihydride: the broken dimer's SiH2 units lean towards the troughs, leaving a dark line).
    ``blob``: one round Gaussian of amplitude ``amp_nm`` and width ``sigma_blob_nm`` at the footprint centre
    instead.
    ``halo_amp_nm``/``halo_lambda_nm`` add a screened-Coulomb halo (charged defects, filled-state sign).
    """

    cls: str
    terrace: int
    dimers: list[DimerIndex]
    removed: list[DimerIndex] = field(default_factory=list)
    bare: list[DimerIndex] = field(default_factory=list)
    amp_nm: float = 0.0
    sigma_along_nm: float = 0.2
    sigma_across_nm: float = 0.3
    kept_amp_nm: float = 0.0
    atom_shift_nm: float = 0.0
    blob: bool = False
    sigma_blob_nm: float = 0.4
    atom_side: int = 0  # db_single: +1 / -1 = which atom of the dimer lost its H
    halo_amp_nm: float = 0.0
    halo_lambda_nm: float = 2.0
    id: int = 0

    @property
    def kind(self) -> str:
        return DEFECT_CLASSES[self.cls].kind


def footprint(
    rng: np.random.Generator, cls: str
) -> tuple[list[DimerIndex], list[DimerIndex], list[DimerIndex]]:
    """(footprint, removed, bare) dimer offsets of a new defect of class cls, relative to its seed dimer."""
    if cls in ("db_single",):
        return [(0, 0)], [], []
    if cls == "db_pair":
        return [(0, 0)], [], [(0, 0)]
    if cls == "litho_patch":
        k = int(rng.integers(2, 7))
        rows = 2 if rng.random() < 0.2 else 1
        f = [(i, j) for j in range(rows) for i in range(k if rows == 1 else 3)]
        return f, [], list(f)
    if cls == "adatom_cluster":
        shape = int(rng.integers(0, 3))
        f = [[(0, 0)], [(0, 0), (1, 0)], [(0, 0), (1, 0), (0, 1), (1, 1)]][shape]
        return f, list(f), []
    if cls == "dv1":
        return [(0, 0)], [(0, 0)], []
    if cls == "dv2":
        return [(0, 0), (1, 0)], [(0, 0), (1, 0)], []
    if cls == "dv1p2":  # 1-DV, split-off dimer (kept), 2-DV along one row
        return [(0, 0), (1, 0), (2, 0), (3, 0)], [(0, 0), (2, 0), (3, 0)], []
    if cls == "etch_pit":
        k1 = int(rng.integers(2, 5))
        k2 = int(rng.integers(1, 4))
        s2 = int(rng.integers(0, max(1, k1 - k2 + 1)))
        f = [(i, 0) for i in range(k1)] + [(s2 + i, 1) for i in range(k2)]
        return f, list(f), []
    if cls == "dihydride":
        f = [(0, 0)] if rng.random() < 0.6 else [(0, 0), (1, 0)]
        return f, list(f), []
    raise KeyError(cls)


def appearance_for(rng: np.random.Generator, d: Defect) -> None:
    """Draw the apparent-height template parameters of d in place (filled-state values, nm).

    Values from ../shared/design/hsi-physics.md section 2.2 (heights relative to the local row maximum; a
    removed dimer also loses its atom bumps, ~0.02-0.035 nm, so vacancy Gaussians are that much shallower
    than the quoted depth):

    * db_single: round blob on ONE atom (off the dimer centre), FWHM 0.8-1.2 nm, with a bright
      screened-Coulomb halo 0.02-0.04 nm, lambda 1.8-2.1 nm (negative charge, filled state) that adds its
      amplitude at the core: core + halo = +0.10-0.15 nm;
    * db_pair: bean on the bare dimer, +0.06-0.10 nm, long axis along the dimer bond (across the row);
    * litho_patch: +0.10-0.15 nm on k bare dimers of one row;
    * adatom_cluster: raised Si (85 %): an ad-dimer bean on each covered dimer, +0.15-0.20 nm, flat-topped
      where they join; gunk (15 %): round, +0.25-1.0 nm, FWHM 1.2-2 nm;
    * dv1: -0.05 to -0.09 nm Gaussian (total -0.07 to -0.125 nm); dv2 / dv1p2: -0.06 to -0.10 nm, flat floor;
      dv1p2's split-off dimer a small protrusion (+0.02-0.04 nm);
    * etch_pit: flat floor -0.09 to -0.12 nm (with the atoms about -0.11 to -0.155 nm), wider; 15 % charged
      (halo lambda 5.9 nm, 0.01-0.03 nm, the sign of the DB's: both are negatively charged);
    * dihydride: the dimer's atoms pushed 0.08-0.11 nm apart towards the troughs, leaving a narrow dark
      line along the row centre, -0.005 to -0.02 nm (total about -0.025 to -0.055 nm).
    """
    c = d.cls
    if c == "db_single":
        d.atom_side = int(rng.choice([-1, 1]))
        # the halo adds its full amplitude at the core: core + halo = +0.10-0.15 nm
        d.halo_amp_nm, d.halo_lambda_nm = rng.uniform(0.02, 0.04), rng.uniform(1.8, 2.1)
        d.amp_nm = rng.uniform(0.10, 0.15) - d.halo_amp_nm
        d.blob, d.sigma_blob_nm = True, rng.uniform(0.8, 1.2) / 2.355
    elif c == "db_pair":
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = rng.uniform(0.06, 0.10), 0.2, 0.38
    elif c == "litho_patch":
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = rng.uniform(0.10, 0.15), 0.22, 0.33
    elif c == "adatom_cluster":
        if rng.random() < 0.15:  # "gunk": higher, wider, round, not resolved
            d.blob = True
            d.amp_nm = rng.uniform(0.25, 1.0)
            d.sigma_blob_nm = rng.uniform(1.2, 2.0) / 2.355
        else:  # raised Si: one ad-dimer bean on each covered dimer, flat-topped where they join
            d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = rng.uniform(0.15, 0.20), 0.25, 0.40
    elif c == "dv1":
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = -rng.uniform(0.05, 0.09), 0.2, 0.3
    elif c in ("dv2", "dv1p2"):
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = -rng.uniform(0.06, 0.10), 0.2, 0.3
        if c == "dv1p2":
            d.kept_amp_nm = rng.uniform(0.02, 0.04)
    elif c == "etch_pit":
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = -rng.uniform(0.09, 0.12), 0.25, 0.35
        if rng.random() < 0.15:  # charged Si vacancy: long screening length
            d.halo_amp_nm, d.halo_lambda_nm = rng.uniform(0.01, 0.03), 5.9
    elif c == "dihydride":
        d.amp_nm, d.sigma_along_nm, d.sigma_across_nm = -rng.uniform(0.005, 0.02), 0.25, 0.1
        d.atom_shift_nm = rng.uniform(0.08, 0.11)
    else:
        raise KeyError(c)


def core_radius_nm(d: Defect) -> float:
    """Distance (nm) from the footprint centre beyond which d's core template (footprint Gaussians, removed
    dimers, blob) is negligible; the charged halo (``halo_radius_nm``) reaches further."""
    # Gaussians are cut where they fall below CUT_NM (at least 3 sigma): tall gunk needs > 4 sigma
    n_sigma = max(3.0, math.sqrt(2.0 * math.log(max(abs(d.amp_nm), abs(d.kept_amp_nm), CUT_NM) / CUT_NM)))
    sigmas = (d.sigma_blob_nm,) if d.blob else (d.sigma_along_nm, d.sigma_across_nm)
    r = 0.5 * SURFACE_LATTICE_NM * len(d.dimers) + n_sigma * max(sigmas)
    return r + ROW_SPACING_NM


def halo_radius_nm(d: Defect) -> float:
    """Distance (nm) from the footprint centre at which d's screened-Coulomb halo is cut (0 without halo)."""
    if not d.halo_amp_nm:
        return 0.0
    return 3.0 * d.halo_lambda_nm + ROW_SPACING_NM


def template_radius_nm(d: Defect) -> float:
    """Distance (nm) from the footprint centre beyond which d's template is negligible."""
    return max(core_radius_nm(d), halo_radius_nm(d))


def footprint_centre_nm(d: Defect, lat: TerraceLattice) -> np.ndarray:
    """Sample-frame centre (nm) of d's footprint (for db_single: the depassivated atom)."""
    ij = np.array(d.dimers, dtype=np.float64)
    c = lat.dimer_centres_nm(ij[:, 0], ij[:, 1]).mean(axis=0)
    if d.cls == "db_single":
        c = c + d.atom_side * 0.5 * DIMER_ATOM_SEPARATION_NM * lat.bond_dir
    return c


def _split_dimer_height(
    a_loc_nm: np.ndarray, b_loc_nm: np.ndarray, app: Appearance, shift_nm: float
) -> np.ndarray:
    """Height (nm) of a dimer's two atoms at +-(half the atom separation + shift_nm) across the row from its
    centre (a broken dimer: ``dimer_height`` with the atoms pushed apart)."""
    half = 0.5 * DIMER_ATOM_SEPARATION_NM + shift_nm
    inv_a = -0.5 / app.atom_sigma_along_nm**2
    inv_b = -0.5 / app.atom_sigma_across_nm**2
    g = np.exp(inv_a * a_loc_nm**2) * (
        np.exp(inv_b * (b_loc_nm - half) ** 2) + np.exp(inv_b * (b_loc_nm + half) ** 2)
    )
    return (-0.5 if app.empty_state else 1.0) * app.atom_amp_nm * g


def render_defect_core(
    d: Defect,
    lat: TerraceLattice,
    x_nm: np.ndarray,
    y_nm: np.ndarray,
    app: Appearance,
    centre_nm: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(core height contribution (nm), footprint mask) of d at sample points x/y (same shape), no halo.

    ``centre_nm`` is ``footprint_centre_nm(d, lat)`` if the caller already has it.
    """
    a, b = lat.to_lattice(x_nm, y_nm)
    z = np.zeros_like(a)
    foot = np.zeros(a.shape, dtype=bool)
    # footprint rectangles and removed atoms are evaluated only on the points near the footprint (gathered
    # once): the atom Gaussians (sigma <= 0.1 nm) are < exp(-32) of their peak outside NEAR_SIGMAS widths
    i_idx = [i for i, _ in d.dimers]
    j_idx = [j for _, j in d.dimers]
    a_lo, a_hi = min(i_idx) * SURFACE_LATTICE_NM, max(i_idx) * SURFACE_LATTICE_NM
    b_lo, b_hi = min(j_idx) * ROW_SPACING_NM, max(j_idx) * ROW_SPACING_NM
    wa = max(FOOT_HALF_ALONG_NM, NEAR_SIGMAS * app.atom_sigma_along_nm)
    wb = max(
        FOOT_HALF_ACROSS_NM,
        0.5 * DIMER_ATOM_SEPARATION_NM + d.atom_shift_nm + NEAR_SIGMAS * app.atom_sigma_across_nm,
    )
    near = np.nonzero((a >= a_lo - wa) & (a <= a_hi + wa) & (b >= b_lo - wb) & (b <= b_hi + wb))
    a_n, b_n = a[near], b[near]
    foot_n = np.zeros(a_n.shape, dtype=bool)
    z_n = np.zeros_like(a_n)
    removed = set(d.removed)
    changed = removed | set(d.bare)  # dimers under the amp_nm template; the rest get kept_amp_nm
    miss = None if d.blob else np.ones_like(a)  # soft union: prod(1 - g) over the changed dimers
    for i, j in d.dimers:
        da_n = a_n - i * SURFACE_LATTICE_NM
        db_n = b_n - j * ROW_SPACING_NM
        foot_n |= (np.abs(da_n) <= FOOT_HALF_ALONG_NM) & (np.abs(db_n) <= FOOT_HALF_ACROSS_NM)
        if (i, j) in removed:
            z_n -= dimer_height(da_n, db_n, app)
            if d.atom_shift_nm:  # the same two atoms, each pushed outwards across the row
                z_n += _split_dimer_height(da_n, db_n, app, d.atom_shift_nm)
        if miss is not None:
            da = a - i * SURFACE_LATTICE_NM
            db = b - j * ROW_SPACING_NM
            g = np.exp(-0.5 * ((da / d.sigma_along_nm) ** 2 + (db / d.sigma_across_nm) ** 2))
            if (i, j) in changed:
                miss *= 1.0 - g
            elif d.kept_amp_nm:
                z += d.kept_amp_nm * g
    z[near] += z_n
    foot[near] = foot_n
    if miss is not None:
        z += d.amp_nm * (1.0 - miss)
    if d.blob:
        c = footprint_centre_nm(d, lat) if centre_nm is None else centre_nm
        dx, dy = x_nm - c[0], y_nm - c[1]
        r2 = (dx * dx + dy * dy) * (1.0 / d.sigma_blob_nm**2)
        core = d.amp_nm * np.exp(-0.5 * r2)
        z += core
        foot |= np.abs(core) > 0.5 * abs(d.amp_nm)
    return z, foot


def render_defect_halo(
    d: Defect,
    lat: TerraceLattice,
    x_nm: np.ndarray,
    y_nm: np.ndarray,
    app: Appearance,
    centre_nm: np.ndarray | None = None,
) -> np.ndarray:
    """Screened-Coulomb halo (nm) of a charged defect d at sample points x/y; zeros without a halo.

    Negative charge: bright halo in filled states, dark in empty states (sign flips with bias).
    """
    if not d.halo_amp_nm:
        return np.zeros(np.shape(x_nm))
    c = footprint_centre_nm(d, lat) if centre_nm is None else centre_nm
    dx, dy = x_nm - c[0], y_nm - c[1]
    r = np.sqrt(dx * dx + dy * dy)  # np.hypot is ~2x slower here; same value to ~1 ulp
    halo_sign = -1.0 if app.empty_state else 1.0
    r0 = 0.5
    return (halo_sign * d.halo_amp_nm) * np.exp(r * (-1.0 / d.halo_lambda_nm)) * (r0 / (r + r0))


def render_defect(
    d: Defect, lat: TerraceLattice, x_nm: np.ndarray, y_nm: np.ndarray, app: Appearance
) -> tuple[np.ndarray, np.ndarray]:
    """(height contribution (nm), footprint mask) of d at sample points x/y (same shape): core + halo."""
    c = footprint_centre_nm(d, lat)
    z, foot = render_defect_core(d, lat, x_nm, y_nm, app, centre_nm=c)
    if d.halo_amp_nm:
        z += render_defect_halo(d, lat, x_nm, y_nm, app, centre_nm=c)
    return z, foot


_MARGIN = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]


def _blocked_cells(d: Defect) -> list[DimerIndex]:
    """Footprint plus a one-dimer margin along and across the row (no touching defects)."""
    return [(i + di, j + dj) for i, j in d.dimers for di, dj in _MARGIN]


def _lattice_floats(lat: TerraceLattice) -> tuple[float, float, float, float, float, float]:
    """(origin x, origin y, row_dir x, row_dir y, bond_dir x, bond_dir y) of a lattice as Python floats."""
    return (
        float(lat.origin_nm[0]),
        float(lat.origin_nm[1]),
        float(lat.row_dir[0]),
        float(lat.row_dir[1]),
        float(lat.bond_dir[0]),
        float(lat.bond_dir[1]),
    )


def _on_terrace(surface: Surface, x_nm: float, y_nm: float, n: int, clearance_nm: float) -> bool:
    """Whether the point lies on terrace n at least clearance_nm from every step edge."""
    idx, dist = surface.terrace_at_point(x_nm, y_nm)
    return idx == n and not dist < clearance_nm


def place_defects(
    rng: np.random.Generator,
    surface: Surface,
    box_nm: tuple[float, float, float, float],
    densities_per_100nm2: dict[str, float],
    density_scale: float = 1.0,
    nb_dispersion: float = 2.0,
    p_cluster: float = 0.3,
    step_clearance_nm: float = 0.8,
    occupied: set[tuple[int, int, int]] | None = None,
) -> list[Defect]:
    """Random non-overlapping defects with seed dimers inside the sample-frame box (x0, x1, y0, y1), nm.

    Per-class counts are negative-binomial (mean = density x area x scale, shape ``nb_dispersion``); with
    probability ``p_cluster`` a defect is seeded within a few dimers of an earlier one (defects cluster).
    ``occupied`` holds (terrace, i, j) already taken (updated in place). Ids are left 0 (the caller
    numbers them).
    """
    x0, x1, y0, y1 = box_nm
    area_100nm2 = (x1 - x0) * (y1 - y0) / 100.0
    occupied = set() if occupied is None else occupied
    classes = []
    for cls, dens in densities_per_100nm2.items():
        mu = dens * density_scale * area_100nm2
        if mu <= 0:
            continue
        k = nb_dispersion
        classes += [cls] * int(rng.negative_binomial(k, k / (k + mu)))
    rng.shuffle(classes)
    placed: list[Defect] = []
    # point-by-point arithmetic in Python floats below is the same IEEE arithmetic as the array versions
    # (TerraceLattice.to_lattice / dimer_centres_nm, Surface.terrace_at) without numpy's per-call overhead,
    # which dominated this loop; the random draws happen in exactly the same order
    for cls in classes:
        for _attempt in range(8):
            if placed and rng.random() < p_cluster:
                near = placed[int(rng.integers(len(placed)))]
                n = near.terrace
                i0, j0 = near.dimers[0]
                i = i0 + int(rng.integers(-8, 9))
                j = j0 + int(rng.integers(-3, 4))
                lat = surface.lattice(n)
                ox, oy, rx, ry, bx, by = _lattice_floats(lat)
            else:
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                n = surface.terrace_at_point(x, y)[0]
                lat = surface.lattice(n)
                ox, oy, rx, ry, bx, by = _lattice_floats(lat)
                dx, dy = x - ox, y - oy
                i = int(round((dx * rx + dy * ry) / SURFACE_LATTICE_NM))  # round half even, as np.round
                j = int(round((dx * bx + dy * by) / ROW_SPACING_NM))
            rel, removed, bare = footprint(rng, cls)
            cells = [(i + di, j + dj) for di, dj in rel]
            centres = [
                (
                    ox + (ci * SURFACE_LATTICE_NM) * rx + (cj * ROW_SPACING_NM) * bx,
                    oy + (ci * SURFACE_LATTICE_NM) * ry + (cj * ROW_SPACING_NM) * by,
                )
                for ci, cj in cells
            ]
            cx, cy = centres[0]
            if not (x0 <= cx < x1 and y0 <= cy < y1):
                continue
            if not all(_on_terrace(surface, px, py, n, step_clearance_nm) for px, py in centres):
                continue
            if any((n, ci, cj) in occupied for ci, cj in cells):
                continue
            d = Defect(
                cls=cls,
                terrace=n,
                dimers=cells,
                removed=[(i + di, j + dj) for di, dj in removed],
                bare=[(i + di, j + dj) for di, dj in bare],
            )
            appearance_for(rng, d)
            occupied.update([(n, ci, cj) for ci, cj in _blocked_cells(d)])
            placed.append(d)
            break
    return placed
