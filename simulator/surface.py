"""Terraces and step edges of a vicinal H-Si(100) surface in the sample frame (nm).

Steps are near-parallel lines with a common normal m; terrace index increases by one across each step
along +m.
An edge is S_A (smooth: parallel to the upper terrace's rows, rare whole-row kinks) or S_B (perpendicular
to the
upper terrace's rows, kinked every row by whole dimers), decided by the lattice of the terrace above it.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from simulator.lattice import TerraceLattice, terrace_lattice
from stm_feedback.physics import ROW_SPACING_NM, STEP_HEIGHT_NM, SURFACE_LATTICE_NM

# Surface.terrace_at: a step farther than this many ramp widths from every point is saturated there
FAR_STEP_WIDTHS = 40.0


@dataclass
class StepEdge:
    """One single-height step: the points with ``signed_distance == 0``; the upper terrace is on the +
    side."""

    normal: np.ndarray  # (2,) unit m, pointing to the upper terrace
    offset_nm: float  # position of the mean edge along m
    kink_breaks_nm: np.ndarray  # (K,) sorted positions along the tangent where the edge jumps
    kink_offsets_nm: np.ndarray  # (K + 1,) edge displacement along m on each segment
    kind: str  # "S_A" | "S_B"
    upper_terrace: int

    @property
    def tangent(self) -> np.ndarray:
        return np.array([-self.normal[1], self.normal[0]])

    def signed_distance_nm(self, x_nm: np.ndarray, y_nm: np.ndarray) -> np.ndarray:
        """Distance (nm, along m) of points from the kinked edge; > 0 on the upper terrace."""
        m = self.normal
        s = x_nm * (-m[1]) + y_nm * m[0]
        kink = self.kink_offsets_nm[np.searchsorted(self.kink_breaks_nm, s)]
        return x_nm * m[0] + y_nm * m[1] - self.offset_nm - kink


    def signed_distance_bounds_nm(
        self, x_min_nm: float, x_max_nm: float, y_min_nm: float, y_max_nm: float
    ) -> tuple[float, float]:
        """(lower, upper) bounds (nm) of ``signed_distance_nm`` over the box [x_min, x_max] x [y_min, y_max]
        (projection extremes at the box corners, kinks at their extremes, 1e-6 nm safety margin)."""
        m0, m1, _, offsets = self._point_params
        px = (x_min_nm * m0, x_max_nm * m0)
        py = (y_min_nm * m1, y_max_nm * m1)
        proj_lo, proj_hi = min(px) + min(py), max(px) + max(py)
        k_lo, k_hi = self._kink_range
        return proj_lo - self.offset_nm - k_hi - 1e-6, proj_hi - self.offset_nm - k_lo + 1e-6

    @cached_property
    def _kink_range(self) -> tuple[float, float]:
        return float(np.min(self.kink_offsets_nm)), float(np.max(self.kink_offsets_nm))

    @cached_property
    def _point_params(self) -> tuple[float, float, list[float], list[float]]:
        """(m_x, m_y, kink breaks, kink offsets) as Python floats/lists for point-by-point queries."""
        return (
            float(self.normal[0]),
            float(self.normal[1]),
            [float(v) for v in self.kink_breaks_nm],
            [float(v) for v in self.kink_offsets_nm],
        )

    def signed_distance_point_nm(self, x_nm: float, y_nm: float) -> float:
        """``signed_distance_nm`` of one point with Python floats (same arithmetic, no array overhead)."""
        m0, m1, breaks, offsets = self._point_params
        s = x_nm * (-m1) + y_nm * m0
        kink = offsets[bisect_left(breaks, s)]  # == np.searchsorted(breaks, s) (side="left")
        return x_nm * m0 + y_nm * m1 - self.offset_nm - kink


@dataclass
class Surface:
    """Terraces n0 .. n0 + len(steps) separated by ``steps`` (sorted along the common normal)."""

    n0: int
    steps: list[StepEdge]
    step_width_nm: float = 0.1  # width of the smooth height ramp at an edge (before tip smearing)

    def lattice(self, n: int) -> TerraceLattice:
        return terrace_lattice(n)

    @property
    def terrace_ids(self) -> list[int]:
        return list(range(self.n0, self.n0 + len(self.steps) + 1))

    def terrace_at(
        self, x_nm: np.ndarray, y_nm: np.ndarray, max_dist_nm: float = np.inf
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(terrace index (int64), distance to the nearest edge (nm, inf without steps), base height (nm)).

        With a finite ``max_dist_nm`` the distance is clipped at it, and steps provably farther than
        max(max_dist_nm, 40 step widths) from every point are not evaluated point by point (their logistic
        ramp is saturated there: exactly 0.1358 nm above, < 1e-18 nm below) -- a large speed-up on the 1 um
        sample of ``SimulatedSTM``, whose frames see few of its steps.
        """
        idx = np.full(np.shape(x_nm), self.n0, dtype=np.int64)
        dist = np.full(np.shape(x_nm), np.inf)
        height = np.full(np.shape(x_nm), self.n0 * STEP_HEIGHT_NM)
        far_nm = max(float(max_dist_nm), FAR_STEP_WIDTHS * self.step_width_nm)
        bbox = None
        if np.isfinite(far_nm) and np.size(x_nm) > 0:
            bbox = (float(np.min(x_nm)), float(np.max(x_nm)), float(np.min(y_nm)), float(np.max(y_nm)))
        for step in self.steps:
            if bbox is not None:
                lo, hi = step.signed_distance_bounds_nm(*bbox)
                if lo > far_nm:  # every point far on the upper side
                    idx += 1
                    height += STEP_HEIGHT_NM
                    continue
                if hi < -far_nm:  # every point far below
                    continue
            s = step.signed_distance_nm(x_nm, y_nm)
            idx += s > 0
            np.minimum(dist, np.abs(s), out=dist)
            # logistic ramp: the tip convolution later widens it further
            height += STEP_HEIGHT_NM / (1.0 + np.exp(np.clip(-s / self.step_width_nm, -50, 50)))
        if np.isfinite(max_dist_nm):
            np.minimum(dist, max_dist_nm, out=dist)
        return idx, dist, height

    def possible_terraces(self, x_min_nm: float, x_max_nm: float, y_min_nm: float, y_max_nm: float) -> range:
        """Terrace ids that may occur in the box (conservative: a superset of those ``terrace_at`` finds)."""
        bounds = [st.signed_distance_bounds_nm(x_min_nm, x_max_nm, y_min_nm, y_max_nm) for st in self.steps]
        surely_above = sum(lo > 0 for lo, _ in bounds)
        maybe_above = sum(hi > 0 for _, hi in bounds)
        return range(self.n0 + surely_above, self.n0 + maybe_above + 1)

    def terrace_at_point(self, x_nm: float, y_nm: float) -> tuple[int, float]:
        """(terrace index, distance to the nearest edge (nm, inf without steps)) of one point: the scalar
        version of ``terrace_at`` for defect placement, which asks point by point."""
        idx = self.n0
        dist = np.inf
        for step in self.steps:
            s = step.signed_distance_point_nm(x_nm, y_nm)
            idx += s > 0
            dist = min(dist, abs(s))
        return idx, dist


def _kink_profile(
    rng: np.random.Generator, kind: str, s_min_nm: float, s_max_nm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-constant edge displacement along the tangent: S_B jumps by whole dimers at every row
    (0.768 nm
    segments, mean-reverting random walk); S_A jumps by whole rows after long (mean 8 nm) straight runs."""
    if kind == "S_B":
        start = s_min_nm - rng.uniform(0, ROW_SPACING_NM)
        breaks = np.arange(start, s_max_nm + ROW_SPACING_NM, ROW_SPACING_NM)
        unit, p_move, limit = SURFACE_LATTICE_NM, 0.5, 4
    else:
        lengths = rng.exponential(8.0, size=int((s_max_nm - s_min_nm) / 2.0) + 4)
        breaks = s_min_nm - rng.uniform(0, 8.0) + np.cumsum(lengths)
        breaks = breaks[breaks < s_max_nm + 8.0]
        unit, p_move, limit = ROW_SPACING_NM, 0.3, 1
    level = 0
    offsets = np.empty(len(breaks) + 1)
    for k in range(len(offsets)):
        offsets[k] = level * unit
        if rng.random() < p_move:
            step = int(rng.choice([-1, 1]))
            if abs(level + step) > limit:  # mean reversion keeps the edge near its average line
                step = -step
            level += step
    return breaks, offsets


def make_surface(
    rng: np.random.Generator,
    n_steps: int,
    centre_nm: np.ndarray,
    extent_nm: float,
    step_width_nm: float = 0.1,
    min_terrace_nm: float = 4.0,
) -> Surface:
    """A random vicinal surface whose ``n_steps`` edges cross the disc of diameter ``extent_nm`` around
    centre.

    The common edge tangent is along a lattice axis (x or y of the sample frame) turned by up to +-10
    deg; edge
    positions are uniform with at least ``min_terrace_nm`` between neighbours (fewer steps if they do not
    fit).
    """
    n0 = int(rng.integers(0, 4))
    base = float(rng.choice([0.0, 90.0, 180.0, 270.0]))
    phi = np.radians(base + rng.uniform(-10.0, 10.0))
    normal = np.array([np.cos(phi), np.sin(phi)])
    half = 0.45 * extent_nm
    max_fit = int(2 * half // min_terrace_nm)
    n_steps = min(n_steps, max_fit)
    offsets: np.ndarray = np.array([])
    for _ in range(50):
        offsets = np.sort(rng.uniform(-half, half, size=n_steps))
        if n_steps < 2 or np.diff(offsets).min() >= min_terrace_nm:
            break
    else:
        offsets = np.linspace(-half, half, n_steps)
    offsets = offsets + float(centre_nm @ normal)
    tangent = np.array([-normal[1], normal[0]])
    s_c = float(centre_nm @ tangent)
    steps = []
    for k, off in enumerate(offsets):
        upper = n0 + k + 1
        row_dir = terrace_lattice(upper).row_dir
        kind = "S_A" if abs(float(row_dir @ tangent)) > 0.7 else "S_B"
        breaks, kinks = _kink_profile(rng, kind, s_c - extent_nm, s_c + extent_nm)
        steps.append(StepEdge(normal, float(off), breaks, kinks, kind, upper))
    return Surface(n0=n0, steps=steps, step_width_nm=step_width_nm)
