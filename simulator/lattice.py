"""H-Si(100)-2x1 terrace lattices derived from the bulk diamond structure.

Sample frame: x along bulk [110], y along bulk [-110] (both in the (001) surface), z up along [001];
lengths in nm.
Layer n of the crystal sits at height n * a0/4. Its top atoms form a square net of period a_s =
a0/sqrt(2); each
atom has two dangling bonds whose in-plane projection fixes the dimer-bond direction, and dimer rows run
perpendicular to it. Both the 90 deg rotation and the quarter-row shift between successive terraces
follow from the
diamond basis here; nothing is hand-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stm_feedback.physics import (
    DIMER_ATOM_SEPARATION_NM,
    ROW_SPACING_NM,
    STEP_HEIGHT_NM,
    SURFACE_LATTICE_NM,
)

# diamond = fcc + basis {(0,0,0), (1/4,1/4,1/4)}, in units of a0 (cubic frame)
_FCC = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
_BASIS = np.array([[0, 0, 0], [0.25, 0.25, 0.25]])
# bond vectors from sublattice A (basis 0) to its four neighbours; sublattice B uses the negatives
_BONDS_A = np.array([[1, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1]]) * 0.25
# in-plane axes of the sample frame, expressed in the cubic frame
_E1 = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
_E2 = np.array([-1.0, 1.0, 0.0]) / np.sqrt(2.0)


@dataclass(frozen=True)
class TerraceLattice:
    """Dimer lattice of terrace ``n`` in the sample frame (nm).

    Dimer (i, j) has its centre at ``origin_nm + i * a_s * row_dir + j * 2 a_s * bond_dir``: i counts
    dimers along
    the row, j counts rows. Its two atoms sit at centre +- (0.24 nm / 2) * bond_dir.
    """

    n: int
    origin_nm: np.ndarray  # (2,) centre of dimer (0, 0)
    row_dir: np.ndarray  # (2,) unit vector along the dimer rows
    bond_dir: np.ndarray  # (2,) unit vector along the dimer bonds (across the rows)
    height_nm: float

    @property
    def row_angle_sample_deg(self) -> float:
        """Row direction angle in the sample frame, degrees modulo 180."""
        return float(np.degrees(np.arctan2(self.row_dir[1], self.row_dir[0])) % 180.0)

    def dimer_centres_nm(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Sample-frame centres (N, 2) in nm of dimers with integer indices i (along row) and j (row)."""
        i = np.asarray(i, dtype=np.float64)
        j = np.asarray(j, dtype=np.float64)
        return (
            self.origin_nm[None, :]
            + (i * SURFACE_LATTICE_NM)[:, None] * self.row_dir[None, :]
            + (j * ROW_SPACING_NM)[:, None] * self.bond_dir[None, :]
        )

    def to_lattice(self, x_nm: np.ndarray, y_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (a along the row, b across the rows), nm, relative to dimer (0, 0)."""
        dx = x_nm - self.origin_nm[0]
        dy = y_nm - self.origin_nm[1]
        return dx * self.row_dir[0] + dy * self.row_dir[1], dx * self.bond_dir[0] + dy * self.bond_dir[1]

    def index_range(self, corners_nm: np.ndarray) -> tuple[int, int, int, int]:
        """Inclusive (i_min, i_max, j_min, j_max) of dimers whose centres may fall in the hull of corners
        (K, 2)."""
        a, b = self.to_lattice(corners_nm[:, 0], corners_nm[:, 1])
        return (
            int(np.floor(a.min() / SURFACE_LATTICE_NM)) - 1,
            int(np.ceil(a.max() / SURFACE_LATTICE_NM)) + 1,
            int(np.floor(b.min() / ROW_SPACING_NM)) - 1,
            int(np.ceil(b.max() / ROW_SPACING_NM)) + 1,
        )


def _layer_atom(n: int) -> tuple[np.ndarray, int]:
    """One atom (cubic coords, units a0) of bulk layer n (height n/4) and its sublattice (0 = A, 1 = B)."""
    z_target = (n % 4) * 0.25
    for f in _FCC:
        for s, b in enumerate(_BASIS):
            p = f + b
            if abs((p[2] - z_target) % 1.0) < 1e-9:
                return p, s
    raise AssertionError("every quarter layer of diamond holds atoms")  # pragma: no cover


@lru_cache(maxsize=64)
def _registry(n: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(offset of one top atom in the sample frame (nm, reduced mod a_s), dimer-bond unit vector) for
    layer n."""
    p, sub = _layer_atom(n)
    bonds = _BONDS_A if sub == 0 else -_BONDS_A
    up = bonds[bonds[:, 2] > 0][0]  # a dangling bond once the layer above is removed
    bond_dir = np.array([up @ _E1, up @ _E2])
    bond_dir /= np.linalg.norm(bond_dir)
    bond_dir = bond_dir if (bond_dir[0] > 0.5 or bond_dir[1] > 0.5) else -bond_dir  # sign convention only
    # in units of the surface net period a_s = a0/sqrt(2), reduced to one cell
    offset = np.mod(np.round(np.array([p @ _E1, p @ _E2]) * np.sqrt(2.0), 9), 1.0) * SURFACE_LATTICE_NM
    return (float(offset[0]), float(offset[1])), (float(bond_dir[0]), float(bond_dir[1]))


def terrace_lattice(n: int) -> TerraceLattice:
    """Dimer lattice of the terrace formed by bulk layer n (height n * a0/4) in the sample frame.

    Dimerisation pairs each top atom with its neighbour along +bond_dir (a fixed choice of the two 2x1 phases;
    anti-phase boundaries are not modelled). Cached (the simulator asks for it thousands of times per frame):
    the returned arrays are read-only.
    """
    return _terrace_lattice_cached(int(n))


@lru_cache(maxsize=256)
def _terrace_lattice_cached(n: int) -> TerraceLattice:
    (ox, oy), (bx, by) = _registry(n)
    bond_dir = np.array([bx, by])
    row_dir = np.array([-by, bx])
    if row_dir[0] < -0.5 or row_dir[1] < -0.5:
        row_dir = -row_dir
    origin = np.array([ox, oy]) + 0.5 * SURFACE_LATTICE_NM * bond_dir
    for arr in (origin, row_dir, bond_dir):
        arr.setflags(write=False)
    return TerraceLattice(
        n=n, origin_nm=origin, row_dir=row_dir, bond_dir=bond_dir, height_nm=n * STEP_HEIGHT_NM
    )


@dataclass(frozen=True)
class Appearance:
    """Apparent-height model of an intact H-terminated dimer lattice (nm).

    Filled states: bright rows (row corrugation ``row_amp_nm``) carrying one bump per atom (``atom_amp_nm``,
    Gaussian widths ``atom_sigma_along_nm`` along the row and ``atom_sigma_across_nm`` across it). Empty
    states
    (``empty_state``): contrast inverted, a narrow dark line on every row (width ``row_sigma_empty_nm``)
    and bright
    inter-row valleys.
    """

    atom_amp_nm: float = 0.03
    atom_sigma_along_nm: float = 0.09
    atom_sigma_across_nm: float = 0.07
    row_amp_nm: float = 0.03
    row_sigma_empty_nm: float = 0.15
    empty_state: bool = False


def atom_bumps(a_nm: np.ndarray, b_nm: np.ndarray, app: Appearance) -> np.ndarray:
    """Sum of the two atom Gaussians of the nearest dimer (and its along-row neighbour), unit amplitude.

    ``a_nm``/``b_nm`` are positions relative to that dimer's centre along / across the row.
    """
    half = 0.5 * DIMER_ATOM_SEPARATION_NM
    inv_a = -0.5 / app.atom_sigma_along_nm**2
    inv_b = -0.5 / app.atom_sigma_across_nm**2
    a_far = np.abs(a_nm) - SURFACE_LATTICE_NM  # neighbour dimer along the row
    ga = np.exp(inv_a * a_nm * a_nm) + np.exp(inv_a * a_far * a_far)
    gb = np.exp(inv_b * (b_nm - half) ** 2) + np.exp(inv_b * (b_nm + half) ** 2)
    return ga * gb


def lattice_height(
    a_nm: np.ndarray, b_nm: np.ndarray, app: Appearance
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apparent height (nm) of an intact lattice at lattice coordinates a/b (relative to dimer (0, 0)).

    Returns (height_nm, i, j): the indices of the dimer cell each point falls in.
    """
    i = np.floor(a_nm / SURFACE_LATTICE_NM + 0.5)
    j = np.floor(b_nm / ROW_SPACING_NM + 0.5)
    a_loc = a_nm - i * SURFACE_LATTICE_NM
    b_loc = b_nm - j * ROW_SPACING_NM
    bumps = atom_bumps(a_loc, b_loc, app)
    if app.empty_state:
        z = (
            -app.row_amp_nm * np.exp(-0.5 * (b_loc / app.row_sigma_empty_nm) ** 2)
            - 0.5 * app.atom_amp_nm * bumps
        )
    else:
        z = (
            app.row_amp_nm * 0.5 * (1.0 + np.cos((2.0 * np.pi / ROW_SPACING_NM) * b_loc))
            + app.atom_amp_nm * bumps
        )
    return z, i.astype(np.int64), j.astype(np.int64)


def dimer_height(a_loc_nm: np.ndarray, b_loc_nm: np.ndarray, app: Appearance) -> np.ndarray:
    """Contribution (nm) of one dimer's two atoms at positions relative to its centre (used to remove
    dimers)."""
    half = 0.5 * DIMER_ATOM_SEPARATION_NM
    inv_a = -0.5 / app.atom_sigma_along_nm**2
    inv_b = -0.5 / app.atom_sigma_across_nm**2
    g = np.exp(inv_a * a_loc_nm**2) * (
        np.exp(inv_b * (b_loc_nm - half) ** 2) + np.exp(inv_b * (b_loc_nm + half) ** 2)
    )
    return (-0.5 if app.empty_state else 1.0) * app.atom_amp_nm * g
