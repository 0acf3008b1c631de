"""A tiny stand-alone renderer of H-Si(100)-2x1-like frames with exact truth, for evaluation/baseline tests.

Independent of the simulator on purpose: two terraces split by a step, orthogonal dimer rows, one vacancy-like
depression and one protrusion, tilt and white noise. Lengths in nm, heights in nm.
"""

from __future__ import annotations

import numpy as np

from simulator.truth import DefectTruth, GroundTruth, TerraceTruth
from stm_feedback.physics import DIMER_ATOM_SEPARATION_NM, ROW_SPACING_NM, STEP_HEIGHT_NM, SURFACE_LATTICE_NM


def _lattice(angle_deg: float, phase_nm: float, extent_nm: float) -> np.ndarray:
    """Dimer centres (nm) of one terrace's lattice covering [-1, extent + 1]^2."""
    a = np.radians(angle_deg)
    u, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    m = int(extent_nm * 2 / SURFACE_LATTICE_NM) + 4
    i, j = np.meshgrid(np.arange(-m, m), np.arange(-m, m))
    c = extent_nm / 2
    base = np.array([c, c]) + n * (phase_nm - np.dot([c, c], n))
    pts = base + i.reshape(-1, 1) * SURFACE_LATTICE_NM * u + j.reshape(-1, 1) * ROW_SPACING_NM * n
    keep = np.all((pts > -1) & (pts < extent_nm + 1), axis=1)
    return pts[keep]


def render(
    seed: int = 0,
    size_px: int = 128,
    pixel_size_nm: float = 0.1,
    angle_deg: float = 12.0,
    noise_nm: float = 0.004,
) -> tuple[np.ndarray, GroundTruth]:
    """(image_nm (H, W) float32, GroundTruth); filled-state contrast (rows bright)."""
    rng = np.random.default_rng(seed)
    ext = size_px * pixel_size_nm
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float64)
    step_x_px = size_px * 0.55 + 0.08 * yy  # slightly tilted step line
    labels = np.where(xx < step_x_px, 0, 1).astype(np.int32)
    angles = [angle_deg % 180, (angle_deg + 90) % 180]
    phases = [0.1, 0.3]
    dimers_l, atoms_l, dt, at = [], [], [], []
    for t in (0, 1):
        d_nm = _lattice(angles[t], phases[t], ext)
        d_px = d_nm / pixel_size_nm
        a = np.radians(angles[t])
        n_px = np.array([-np.sin(a), np.cos(a)]) * DIMER_ATOM_SEPARATION_NM / 2 / pixel_size_nm
        inside = (
            (d_px[:, 0] >= 0) & (d_px[:, 0] <= size_px - 1) & (d_px[:, 1] >= 0) & (d_px[:, 1] <= size_px - 1)
        )
        d_px = d_px[inside]
        on_t = labels[np.rint(d_px[:, 1]).astype(int), np.rint(d_px[:, 0]).astype(int)] == t
        d_px = d_px[on_t]
        dimers_l.append(d_px)
        atoms_l += [d_px + n_px, d_px - n_px]
        dt.append(np.full(len(d_px), t))
        at += [np.full(len(d_px), t)] * 2
    dimers = np.concatenate(dimers_l)
    atoms = np.concatenate(atoms_l)
    dimer_t, atom_t = np.concatenate(dt), np.concatenate(at)
    # defects: a depression on terrace 0, a protrusion on terrace 1; their dimers are removed
    dep = np.array([size_px * 0.25, size_px * 0.4])
    pro = np.array([size_px * 0.8, size_px * 0.7])
    r_px = 0.45 / pixel_size_nm
    gone_d = (np.hypot(*(dimers - dep).T) < r_px) | (np.hypot(*(dimers - pro).T) < r_px)
    gone_a = (np.hypot(*(atoms - dep).T) < r_px + 1.2) | (np.hypot(*(atoms - pro).T) < r_px + 1.2)
    dimers, dimer_t = dimers[~gone_d], dimer_t[~gone_d]
    atoms, atom_t = atoms[~gone_a], atom_t[~gone_a]
    img = STEP_HEIGHT_NM * labels.astype(np.float64)
    s_px = 0.07 / pixel_size_nm
    for x, y in atoms:
        x0, x1 = int(max(0, x - 4 * s_px)), int(min(size_px, x + 4 * s_px + 2))
        y0, y1 = int(max(0, y - 4 * s_px)), int(min(size_px, y + 4 * s_px + 2))
        img[y0:y1, x0:x1] += 0.04 * np.exp(
            -((xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2) / (2 * s_px**2)
        )
    for c, amp in ((dep, -0.12), (pro, 0.15)):
        img += amp * np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * (0.3 / pixel_size_nm) ** 2))
    # soften the step over ~0.3 nm like a tip would
    from scipy import ndimage

    img = ndimage.gaussian_filter(img, 0.5)
    img += 0.002 * xx + 0.001 * yy + rng.normal(0, noise_nm, img.shape)
    truth_labels = labels.copy()
    truth_labels[np.abs(xx - step_x_px) < 0.4 / pixel_size_nm] = -1
    resolved = np.ones(len(atoms), bool)
    truth = GroundTruth(
        pixel_size_nm=pixel_size_nm,
        height_px=size_px,
        width_px=size_px,
        atoms_xy_px=atoms,
        atom_terrace=atom_t,
        atom_resolved=resolved,
        dimers_xy_px=dimers,
        dimer_terrace=dimer_t,
        dimer_row=np.zeros(len(dimers), int),
        dimer_bare=np.zeros(len(dimers), bool),
        defects=[
            DefectTruth(1, "dv1", "depression", True, float(dep[0]), float(dep[1]), 0, 1),
            DefectTruth(2, "adatom_cluster", "protrusion", True, float(pro[0]), float(pro[1]), 1, 2),
        ],
        defect_instances=np.zeros((size_px, size_px), np.int32),
        terrace_labels=truth_labels,
        step_mask=truth_labels < 0,
        unresolved_mask=np.zeros((size_px, size_px), bool),
        terraces=[TerraceTruth(t, angles[t], phases[t], t * STEP_HEIGHT_NM) for t in (0, 1)],
        tip_state="sharp",
        bias_v=-2.0,
    )
    return img.astype(np.float32), truth
