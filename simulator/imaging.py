"""Acquisition of one frame from a scene: sample the ideal surface along the raster, apply tip and electronics
artefacts in scan-time order, and assemble the GroundTruth in frame pixels.
"""

from __future__ import annotations

import numpy as np

from simulator import artefacts as art
from simulator.defects import Defect
from simulator.lattice import Appearance
from simulator.render import STEP_MASK_HALF_WIDTH_NM, lattice_truth, render_ideal
from simulator.scan import ScanGeometry
from simulator.surface import Surface
from simulator.truth import DefectTruth, GroundTruth, TerraceTruth
from stm_feedback.physics import DEFECT_CLASSES, ROW_SPACING_NM, STEP_HEIGHT_NM

# a Gaussian tip wider than this (nm) no longer separates the two atoms of a dimer (0.24 nm apart)
UNRESOLVED_TIP_SIGMA_NM = 0.1
UNRESOLVED_PATCH_SIGMA_NM = 0.35


def appearance(params: dict, empty_state: bool) -> Appearance:
    """Lattice appearance from one frame's sampled parameters."""
    return Appearance(
        atom_amp_nm=params["atom_amp_nm"],
        atom_sigma_along_nm=params["atom_sigma_along_nm"],
        atom_sigma_across_nm=params["atom_sigma_across_nm"],
        row_amp_nm=params["row_amp_nm"],
        row_sigma_empty_nm=params["row_sigma_empty_nm"],
        empty_state=empty_state,
    )


def acquire(
    surface: Surface,
    defects: list[Defect],
    geom: ScanGeometry,
    params: dict,
    rng: np.random.Generator,
    bias_v: float,
) -> tuple[np.ndarray, GroundTruth]:
    """Image (H, W) float32 nm and its GroundTruth. ``params`` (sampled by config.sample_params) is updated
    in place with what was drawn here; ``defects`` must carry unique ids > 0."""
    H, W = geom.height_px, geom.width_px
    s = geom.pixel_size_nm
    app = appearance(params, empty_state=bias_v > 0)
    ideal = render_ideal(surface, defects, geom, app)
    z = ideal.z_nm

    # --- tip: blur, tip change mid-frame, double tip, unresolved patches
    tip_change_lines: list[int] = []
    sigma1 = params["tip_sigma_nm"]
    z_tip = art.tip_blur(z, sigma1, s)
    resolved_rows = np.full(H, sigma1 <= UNRESOLVED_TIP_SIGMA_NM)
    k_change = H
    if params["tip_change"]:
        k_change = int(np.clip(round(params["tip_change_fraction"] * H), 1, H - 1))
        sigma2 = params["tip_change_sigma_nm"]
        z_tip[k_change:] = art.tip_blur(z, sigma2, s)[k_change:]
        resolved_rows[k_change:] = sigma2 <= UNRESOLVED_TIP_SIGMA_NM
        tip_change_lines.append(k_change)
    z = z_tip
    if params["double_tip"]:
        ang = np.radians(params["double_angle_deg"])
        off = params["double_offset_nm"] / s
        z = art.double_tip(z, (off * np.cos(ang), off * np.sin(ang)), params["double_dz_nm"])
    unresolved = np.broadcast_to(~resolved_rows[:, None], (H, W)).copy()
    if params["unresolved_patches"] > 0:
        r_nm = params["unresolved_radius_nm"]
        soft = art.random_blobs_mask(rng, (H, W), params["unresolved_patches"], (r_nm[0] / s, r_nm[1] / s))
        z = (1.0 - soft) * z + soft * art.tip_blur(z, UNRESOLVED_PATCH_SIGMA_NM, s)
        unresolved |= soft > 0.5

    # --- real z that the feedback must follow: tilt and background
    z = z + art.plane_tilt((H, W), params["tilt_deg"], params["tilt_azimuth_deg"], s)
    if params["hump_nm"]:
        z = z + art.background_hump(rng, (H, W), params["hump_nm"])
    z = art.feedback_lag(z, params["feedback_gain"])

    # --- electronics and tip instabilities, in acquisition order
    z = z + art.line_offsets(rng, H, params["line_offset_nm"])
    if params["tip_change"]:
        z[k_change:] += params["tip_change_dz_nm"]
        n_streak = int(rng.integers(1, 4))
        for k in range(n_streak):
            y = min(H - 1, k_change + k)
            z[y] += rng.normal(0.0, 2.0 * abs(params["tip_change_dz_nm"]), W).cumsum() / np.sqrt(W)
            if y not in tip_change_lines:
                tip_change_lines.append(y)
    z = z + art.pink_noise(rng, (H, W), params["pink_noise_nm"])
    z = z + rng.normal(0.0, params["white_noise_nm"], (H, W))
    z = art.spikes(rng, z, params["spike_fraction"], 0.15)
    image = z.astype(np.float32)

    # --- truth
    lt = lattice_truth(surface, defects, geom)
    step_mask = ideal.step_dist_nm < STEP_MASK_HALF_WIDTH_NM
    labels = np.where(step_mask, -1, ideal.terrace).astype(np.int32)
    inst = ideal.defect_instances
    seen = set(np.flatnonzero(np.bincount(inst.ravel())).tolist())  # ids present (np.unique, one pass)
    present = [d for d in defects if d.id in seen]
    remap = np.zeros(max([d.id for d in defects], default=0) + 1, dtype=np.int32)
    dtruth: list[DefectTruth] = []
    for k, d in enumerate(present, start=1):
        remap[d.id] = k
        cx, cy = ideal.defect_pixels[d.id]
        c = DEFECT_CLASSES[d.cls]
        dtruth.append(DefectTruth(k, d.cls, c.kind, c.must_avoid, cx, cy, d.terrace, len(d.dimers)))
    inst = remap[inst]
    rows_i = np.clip(np.round(lt.atoms_xy_px[:, 1]).astype(np.int64), 0, H - 1)
    cols_i = np.clip(np.round(lt.atoms_xy_px[:, 0]).astype(np.int64), 0, W - 1)
    atom_resolved = ~unresolved[rows_i, cols_i]
    # atoms under a raised adatom/cluster blob are hidden from the tip: nobody can see them, so nobody is
    # scored on them (evaluation treats atom_resolved=False like an unresolved region)
    covering = np.array([0] + [int(d.cls == "adatom_cluster") for d in present], dtype=bool)
    atom_resolved &= ~covering[inst[rows_i, cols_i]]
    terraces = []
    for n in ideal.terrace_ids:
        lat = surface.lattice(int(n))
        ang_img = (lat.row_angle_sample_deg - geom.angle_deg) % 180.0
        # a dimer of this lattice near the frame centre, mapped to the frame: fixes the row phase
        a, b = lat.to_lattice(np.array(geom.centre_nm[0]), np.array(geom.centre_nm[1]))
        c_nm = lat.dimer_centres_nm(np.array([np.round(a / 0.384)]), np.array([np.round(b / ROW_SPACING_NM)]))
        p_px = geom.feature_pixels(c_nm)[0]
        t = np.radians(ang_img)
        phase = float((p_px[0] * s * -np.sin(t) + p_px[1] * s * np.cos(t)) % ROW_SPACING_NM)
        terraces.append(TerraceTruth(int(n), float(ang_img), phase, float(n * STEP_HEIGHT_NM)))
    truth = GroundTruth(
        pixel_size_nm=float(s),
        height_px=H,
        width_px=W,
        atoms_xy_px=lt.atoms_xy_px,
        atom_terrace=lt.atom_terrace,
        atom_resolved=atom_resolved,
        dimers_xy_px=lt.dimers_xy_px,
        dimer_terrace=lt.dimer_terrace,
        dimer_row=lt.dimer_row,
        dimer_bare=lt.dimer_bare,
        defects=dtruth,
        defect_instances=inst.astype(np.int32),
        terrace_labels=labels,
        step_mask=step_mask,
        unresolved_mask=unresolved,
        terraces=terraces,
        tip_state=params["tip_state"],
        tip_change_lines=sorted(tip_change_lines),
        bias_v=float(bias_v),
        params=params,
    )
    return image, truth
