"""Physical constants of H-Si(100)-2x1 and the defect taxonomy shared by the simulator and the analysis.

Lengths are in nanometres, heights in nanometres (apparent STM height), angles in degrees.
Sources: ../shared/design/hsi-physics.md (values marked there with a double dagger are calibration defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

SI_LATTICE_NM = 0.5431  # cubic lattice constant a0
SURFACE_LATTICE_NM = 0.384  # a0/sqrt(2): dimer pitch along a row
ROW_SPACING_NM = 0.768  # dimer-row period (2x the surface lattice)
DIMER_ATOM_SEPARATION_NM = 0.24  # apparent separation of the two Si atoms of one dimer (bond 0.247 nm)
STEP_HEIGHT_NM = 0.1358  # single-height step a0/4
ROW_SHIFT_ACROSS_STEP_NM = 0.192  # a quarter row period
UNIT_CELL_AREA_NM2 = 0.295  # 2x1 cell: 0.384 nm x 0.768 nm


@dataclass(frozen=True)
class DefectClass:
    """One defect class: its name, apparent-height kind and the planner's rule for it."""

    name: str
    kind: str  # "protrusion" | "depression"
    must_avoid: bool  # a write site may not touch it (with the configured margin)
    description: str


DEFECT_CLASSES: dict[str, DefectClass] = {
    c.name: c
    for c in (
        DefectClass("db_single", "protrusion", False, "single dangling bond (one missing H)"),
        DefectClass("db_pair", "protrusion", False, "dangling-bond pair / bare dimer"),
        DefectClass("litho_patch", "protrusion", False, "lithographically depassivated patch of k dimers"),
        DefectClass("adatom_cluster", "protrusion", True, "raised Si adatom / ad-dimer / contamination cluster"),
        DefectClass("dv1", "depression", True, "single-dimer vacancy (1-DV)"),
        DefectClass("dv2", "depression", True, "double-dimer vacancy (2-DV)"),
        DefectClass("dv1p2", "depression", True, "1+2-DV with split-off dimer"),
        DefectClass("etch_pit", "depression", True, "etch pit, several missing dimers"),
        DefectClass("dihydride", "depression", True, "dihydride (SiH2) unit or pair"),
    )
}
DEFECT_CLASS_NAMES: tuple[str, ...] = tuple(DEFECT_CLASSES)
KINDS: tuple[str, str] = ("protrusion", "depression")
