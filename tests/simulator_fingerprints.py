"""Numeric fingerprints of a few seeded simulator frames (image statistics, block means, sampled pixels, truth
counts and sums), used to prove that performance work leaves the simulator's output unchanged.

Regenerate (only when the physics is changed on purpose, never to make a speed change pass):
    .venv/bin/python tests/simulator_fingerprints.py > tests/data/simulator_fingerprints.json
The stored file was regenerated when the defect templates were changed on purpose (simulator/defects.py
appearance_for, to the physics note's per-class heights and shapes), and again when the truth's feature
positions on jittered lines became the recorded blob's centre (session 12, ``ScanGeometry.feature_pixels``;
every image key unchanged, only truth positions, counts at the border and row phases); before that it came
from the simulator of commit ac2b86a (before the speed work), e.g. for a new case:
    git archive ac2b86a simulator | tar -x -C /tmp/oldsim && cd /tmp && \
    PYTHONPATH=/tmp/oldsim:/work/main /work/main/.venv/bin/python /work/main/tests/simulator_fingerprints.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np

from simulator.config import SimConfig
from simulator.frame import SimFrame, simulate_frame
from simulator.instrument import SimulatedSTM


@dataclass(frozen=True)
class Case:
    """One seeded frame: preset, seed, size (H, W) px, pixel size nm (None = drawn), bias V (None = drawn)."""

    name: str
    preset: str
    seed: int
    size_px: tuple[int, int]
    pixel_size_nm: float | None = 0.1
    bias_v: float | None = None


CASES: list[Case] = [
    Case("clean_a", "clean", 11, (128, 128)),
    Case("clean_256", "clean", 12, (256, 256)),
    Case("realistic_a", "realistic", 21, (128, 128)),
    Case("realistic_b", "realistic", 22, (96, 160)),
    Case("hard_a", "hard", 31, (128, 128)),
    Case("hard_256", "hard", 32, (256, 256)),
    Case("hard_empty", "hard", 33, (128, 128), bias_v=1.6),
    Case("training_a", "training", 41, (128, 128)),
    Case("training_drawn_px", "training", 42, (128, 128), pixel_size_nm=None),
    Case("training_b", "training", 43, (160, 96), pixel_size_nm=0.05),
]
INSTRUMENT_SEED = 5


def _fingerprint(frame: SimFrame) -> dict:
    """JSON-serialisable numbers that change if any pixel or truth entry changes noticeably."""
    z = frame.image_nm.astype(np.float64)
    t = frame.truth
    h, w = z.shape
    rng = np.random.default_rng(h * 10007 + w)
    pick = rng.integers(0, h * w, 48)
    by, bx = h // 8, w // 8
    blocks = z[: by * 8, : bx * 8].reshape(8, by, 8, bx).mean(axis=(1, 3))
    return {
        "image_mean": float(z.mean()),
        "image_std": float(z.std()),
        "image_min": float(z.min()),
        "image_max": float(z.max()),
        "block_means": blocks.ravel().tolist(),
        "pixels": z.ravel()[pick].tolist(),
        "n_atoms": int(len(t.atoms_xy_px)),
        "n_dimers": int(len(t.dimers_xy_px)),
        "n_defects": int(len(t.defects)),
        "atoms_xy_sum": t.atoms_xy_px.sum(axis=0).tolist(),
        "dimers_xy_sum": t.dimers_xy_px.sum(axis=0).tolist(),
        "n_atom_resolved": int(t.atom_resolved.sum()),
        "n_dimer_bare": int(t.dimer_bare.sum()),
        "dimer_row_sum": int(t.dimer_row.sum()),
        "defects": [[d.cls, d.x_px, d.y_px, d.terrace, d.n_dimers] for d in t.defects],
        "defect_pixels": int((t.defect_instances > 0).sum()),
        "defect_instance_sum": int(t.defect_instances.astype(np.int64).sum()),
        "terrace_label_sum": int(t.terrace_labels.astype(np.int64).sum()),
        "step_pixels": int(t.step_mask.sum()),
        "unresolved_pixels": int(t.unresolved_mask.sum()),
        "terraces": [[tt.id, tt.row_angle_deg, tt.row_phase_nm] for tt in t.terraces],
        "tip_state": t.tip_state,
        "tip_change_lines": list(t.tip_change_lines),
    }


def render_case(case: Case) -> SimFrame:
    return simulate_frame(
        case.seed, case.size_px, case.pixel_size_nm, SimConfig.preset(case.preset), bias_v=case.bias_v
    )


def render_instrument() -> SimFrame:
    """Two scans of a small frame with a lithographic write between them (exercises tiles and drift)."""
    stm = SimulatedSTM(seed=INSTRUMENT_SEED, config=SimConfig.preset("realistic"))
    stm.set_frame(12.0, -7.0, 9.6, 96, 20.0)
    stm.scan()
    stm.depassivate_px(np.array([[40.0, 40.0], [44.0, 40.0]]))
    return stm.scan()


def render_instrument_moves() -> SimFrame:
    """Fifth frame after four moves of the training-preset instrument: strong piezo creep compresses the slow
    axis (a pixel box of nm radius / pixel size is then too small for a template)."""
    stm = SimulatedSTM(seed=11, config=SimConfig.preset("training"))
    frame = None
    for k in range(5):
        stm.set_frame(-300 + 97 * k, 200 - 61 * k, [25.6, 12.8, 40.0][k % 3], [96, 128, 64][k % 3], 15.0 * k)
        frame = stm.scan()
    assert frame is not None
    return frame


def all_fingerprints() -> dict[str, dict]:
    out = {c.name: _fingerprint(render_case(c)) for c in CASES}
    out["instrument"] = _fingerprint(render_instrument())
    out["instrument_moves"] = _fingerprint(render_instrument_moves())
    return out


if __name__ == "__main__":
    json.dump(all_fingerprints(), sys.stdout, indent=1)
    sys.stdout.write("\n")
