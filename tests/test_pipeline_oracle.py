"""Oracle network maps from simulator truth (what perfect networks would output) and the pipeline run on them.

``oracle_maps`` is imported by the planner/lattice tests and by the measurement scripts quoted in
docs/analysis-schema.md. It stands in for ``stm_feedback.targets`` (networks subsystem) in these tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from stm_feedback.config import Settings
from stm_feedback.lattice import angle_diff_deg, phase_diff_nm, row_offset_nm
from stm_feedback.maps import NetworkMaps
from stm_feedback.pipeline import Pipeline

ATOM_SIGMA_NM = 0.05


def splat_gaussians(shape: tuple[int, int], xy_px: np.ndarray, sigma_px: float) -> np.ndarray:
    """(H, W) float32 map: max over unit-height Gaussians centred at sub-pixel positions (x_px, y_px)."""
    out = np.zeros(shape, np.float32)
    xy = np.asarray(xy_px, float).reshape(-1, 2)
    if len(xy) == 0:
        return out
    r = max(1, int(np.ceil(3 * sigma_px)))
    offs = np.arange(-r, r + 1)
    cx, cy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    yy = cy[:, None, None] + offs[None, :, None]
    xx = cx[:, None, None] + offs[None, None, :]
    g = np.exp(-((xx - xy[:, 0, None, None]) ** 2 + (yy - xy[:, 1, None, None]) ** 2) / (2 * sigma_px**2))
    ok = (yy >= 0) & (yy < shape[0]) & (xx >= 0) & (xx < shape[1])
    yy, xx = np.broadcast_arrays(yy, xx)
    np.maximum.at(out, (yy[ok], xx[ok]), g[ok].astype(np.float32))
    return out


def oracle_maps(image_nm: np.ndarray, truth, bias_v: float) -> NetworkMaps:  # noqa: ANN001
    """Perfect network outputs from a GroundTruth: resolved atoms as Gaussians (sigma 0.05 nm), truth step
    mask, truth defect footprints split by kind, polarity-corrected standardised image."""
    s = truth.pixel_size_nm
    shape = image_nm.shape
    ok = np.asarray(truth.atom_resolved, bool)
    atom = splat_gaussians(shape, np.asarray(truth.atoms_xy_px)[ok], ATOM_SIGMA_NM / s)
    inst = np.asarray(truth.defect_instances)
    prot = np.zeros(shape, np.float32)
    dep = np.zeros(shape, np.float32)
    ids_p = [d.id for d in truth.defects if d.kind == "protrusion"]
    ids_d = [d.id for d in truth.defects if d.kind == "depression"]
    prot[np.isin(inst, ids_p)] = 1.0
    dep[np.isin(inst, ids_d)] = 1.0
    z = np.asarray(image_nm, np.float32) * (-1.0 if bias_v > 0 else 1.0)
    z = (z - z.mean()) / (z.std() + 1e-9)
    polarity = "empty" if bias_v > 0 else "filled"
    return NetworkMaps(
        np.asarray(truth.step_mask, np.float32), atom, prot, dep, z.astype(np.float32), s, polarity, "bias"
    )


def simulate(
    seed: int, size_px: int = 192, pixel_size_nm: float = 0.1, preset: str = "realistic", **overrides: object
):  # noqa: ANN201
    """A simulated frame; ``overrides`` replace SimConfig fields (e.g. drift_nm_per_min=(0.0, 0.0))."""
    import dataclasses

    from simulator.frame import SimConfig, simulate_frame

    cfg = dataclasses.replace(SimConfig.preset(preset), **overrides)
    return simulate_frame(seed, size_px, pixel_size_nm, cfg)


NO_DRIFT = {"drift_nm_per_min": (0.0, 0.0), "creep_nm": (0.0, 0.0)}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(Settings())


def _truth_terrace(a, f, t):  # noqa: ANN001, ANN202
    """The truth terrace under most of predicted terrace t."""
    tl = f.truth.terrace_labels[a.terrace_labels == t.id]
    tl = tl[tl >= 0]
    return {tt.id: tt for tt in f.truth.terraces}[int(np.bincount(tl).argmax())]


@pytest.mark.parametrize("seed", [1_000_001, 1_000_002, 1_000_004])
def test_oracle_lattice_matches_truth_without_drift(pipe: Pipeline, seed: int) -> None:
    """No drift/creep: image lattice = nominal one; angle within 0.5 deg, phase within 0.05 nm."""
    f = simulate(seed, **NO_DRIFT)
    a = pipe.analyze_maps(f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), f.pixel_size_nm, f.bias_v)
    checked = 0
    for t in a.terraces:
        if t.n_atoms < 200:
            continue
        tt = _truth_terrace(a, f, t)
        assert angle_diff_deg(t.row_angle_deg, tt.row_angle_deg) <= 0.5
        assert phase_diff_nm(t.row_phase_nm, tt.row_phase_nm, t.row_angle_deg, tt.row_angle_deg) <= 0.05
        checked += 1
    assert checked >= 1 or not f.truth.atom_resolved.any()


@pytest.mark.parametrize("seed", [1_000_002, 1_000_004])
def test_oracle_lattice_explains_drifted_dimers(pipe: Pipeline, seed: int) -> None:
    """With drift the image rows are sheared away from the nominal truth lattice; the fitted lattice must
    place the truth dimer centres on its row lines at least as well as the nominal lattice does."""
    f = simulate(seed)
    a = pipe.analyze_maps(f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), f.pixel_size_nm, f.bias_v)
    s = f.pixel_size_nm
    for t in a.terraces:
        if t.n_atoms < 200:
            continue
        tt = _truth_terrace(a, f, t)
        d = f.truth.dimers_xy_px[f.truth.dimer_terrace == tt.id] * s
        ours = np.sqrt(np.mean(row_offset_nm(d, t.row_angle_deg, t.row_phase_nm) ** 2))
        nominal = np.sqrt(np.mean(row_offset_nm(d, tt.row_angle_deg, tt.row_phase_nm) ** 2))
        assert ours <= nominal + 0.01, (ours, nominal)


def bench(n_frames: int = 10, repeats: int = 3, size_px: int = 256, preset: str = "realistic") -> dict:
    """Post-processing wall time (ms) of ``analyze_maps`` on oracle maps of simulated frames (0.1 nm/px):
    median / p90 / min over n_frames x repeats runs after one warm-up per frame, per-stage medians, and the
    median numbers of atoms and defects (what the time is for)."""
    import time

    pipe_ = Pipeline(Settings())
    tot, stages, n_atoms, n_defects = [], {}, [], []
    for seed in range(1_000_010, 1_000_010 + n_frames):
        f = simulate(seed, size_px, 0.1, preset)
        m = oracle_maps(f.image_nm, f.truth, f.bias_v)
        a = pipe_.analyze_maps(f.image_nm, m, 0.1, f.bias_v)  # warm-up
        n_atoms.append(len(a.atoms))
        n_defects.append(len(a.defects))
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = pipe_.analyze_maps(f.image_nm, m, 0.1, f.bias_v)
            tot.append((time.perf_counter() - t0) * 1e3)
            for k, v in a.timings_ms.items():
                stages.setdefault(k, []).append(v)
    return {
        "wall_ms_median": round(float(np.median(tot)), 2),
        "wall_ms_p90": round(float(np.percentile(tot, 90)), 2),
        "wall_ms_min": round(float(np.min(tot)), 2),
        "stages_ms_median": {k: round(float(np.median(v)), 2) for k, v in stages.items()},
        "atoms_median": int(np.median(n_atoms)),
        "defects_median": int(np.median(n_defects)),
    }


if __name__ == "__main__":  # timing of the post-processing (docs/analysis-schema.md)
    import argparse
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size-px", type=int, default=256)
    ap.add_argument("--preset", default="realistic")
    args = ap.parse_args()
    res = bench(args.frames, args.repeats, args.size_px, args.preset)
    res["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(res)
