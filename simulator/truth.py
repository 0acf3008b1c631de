"""Ground truth of one simulated frame. Positions in pixels of the rendered image (x = column, y = row)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TerraceTruth:
    """One terrace: id (>= 0, as in ``terrace_labels``), row angle and phase (see package docstring)."""

    id: int
    row_angle_deg: float
    row_phase_nm: float
    height_nm: float


@dataclass
class DefectTruth:
    """One defect instance; ``id`` is its value in ``defect_instances`` (ids start at 1)."""

    id: int
    cls: str  # a key of stm_feedback.physics.DEFECT_CLASSES
    kind: str  # "protrusion" | "depression"
    must_avoid: bool
    x_px: float  # centre of the footprint
    y_px: float
    terrace: int
    n_dimers: int  # footprint size in dimers


@dataclass
class GroundTruth:
    """Everything known about a rendered frame.

    Arrays of positions are float64 (N, 2) holding (x_px, y_px). Atoms and dimers listed are the ones inside the
    frame, on intact (H-terminated or depassivated) dimers; atoms under vacancies/adatoms are not listed.
    ``atom_resolved`` marks atoms outside unresolved regions (a network should abstain elsewhere).
    """

    pixel_size_nm: float
    height_px: int
    width_px: int
    atoms_xy_px: np.ndarray  # (N, 2)
    atom_terrace: np.ndarray  # (N,) int
    atom_resolved: np.ndarray  # (N,) bool
    dimers_xy_px: np.ndarray  # (M, 2)
    dimer_terrace: np.ndarray  # (M,) int
    dimer_row: np.ndarray  # (M,) int row index within its terrace
    dimer_bare: np.ndarray  # (M,) bool: depassivated (dangling bonds)
    defects: list[DefectTruth]
    defect_instances: np.ndarray  # (H, W) int32, 0 = none, else DefectTruth.id
    terrace_labels: np.ndarray  # (H, W) int32, -1 = step edge, else TerraceTruth.id
    step_mask: np.ndarray  # (H, W) bool, pixels within ~0.4 nm of a step edge
    unresolved_mask: np.ndarray  # (H, W) bool: atoms not resolved there (blunt tip patch)
    terraces: list[TerraceTruth]
    tip_state: str  # "sharp" | "blunt" | "double" | "tip_change"
    tip_change_lines: list[int] = field(default_factory=list)
    bias_v: float = -2.0
    params: dict = field(default_factory=dict)  # every sampled simulator parameter (JSON-serialisable)
