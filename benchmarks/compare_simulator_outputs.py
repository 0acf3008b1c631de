"""Dump whole simulator outputs (images and every truth array) to an .npz, and compare two dumps: checks that
a performance change leaves what the simulator renders unchanged.

    # the simulator to compare against, e.g. commit ac2b86a:
    git archive ac2b86a simulator | tar -x -C /tmp/oldsim
    cd /tmp && PYTHONPATH=/tmp/oldsim /work/main/.venv/bin/python \
        /work/main/benchmarks/compare_simulator_outputs.py dump /tmp/before.npz --n 40
    cd /work/main && .venv/bin/python benchmarks/compare_simulator_outputs.py dump /tmp/after.npz --n 40
    .venv/bin/python benchmarks/compare_simulator_outputs.py compare /tmp/before.npz /tmp/after.npz

Frames: n seeds (5000..) per preset at 256 px (0.1 nm/px; odd training seeds with a drawn pixel size) and 18
SimulatedSTM scans (3 seeds/presets x 6 frames after moves, zooms, rotations and one lithographic write).
"""

from __future__ import annotations

import argparse

import numpy as np

from simulator.config import SimConfig
from simulator.frame import SimFrame, simulate_frame
from simulator.instrument import SimulatedSTM


def _arrays(key: str, f: SimFrame) -> dict[str, np.ndarray]:
    t = f.truth
    return {
        f"{key}/image_nm": f.image_nm,
        f"{key}/defect_instances": t.defect_instances,
        f"{key}/terrace_labels": t.terrace_labels,
        f"{key}/step_mask": t.step_mask,
        f"{key}/unresolved_mask": t.unresolved_mask,
        f"{key}/atoms_xy_px": t.atoms_xy_px,
        f"{key}/atom_terrace": t.atom_terrace,
        f"{key}/atom_resolved": t.atom_resolved,
        f"{key}/dimers_xy_px": t.dimers_xy_px,
        f"{key}/dimer_terrace": t.dimer_terrace,
        f"{key}/dimer_row": t.dimer_row,
        f"{key}/dimer_bare": t.dimer_bare,
        f"{key}/defects": np.array([[d.x_px, d.y_px, d.terrace, d.n_dimers] for d in t.defects]).reshape(
            -1, 4
        ),
        f"{key}/terraces": np.array([[tt.id, tt.row_angle_deg, tt.row_phase_nm] for tt in t.terraces]),
    }


def dump(path: str, n: int) -> None:
    out: dict[str, np.ndarray] = {}
    for preset in ("clean", "realistic", "hard", "training"):
        cfg = SimConfig.preset(preset)
        for k in range(n):
            px = None if (preset == "training" and k % 2) else 0.1
            out |= _arrays(f"{preset}_{k}", simulate_frame(5000 + k, 256, px, cfg))
    for seed, preset in ((3, "realistic"), (7, "hard"), (11, "training")):
        stm = SimulatedSTM(seed=seed, config=SimConfig.preset(preset))
        for k in range(6):
            size_nm, pixels = ((25.6, 256), (12.8, 128), (40.0, 200))[k % 3]
            stm.set_frame(-300.0 + 97.0 * k, 200.0 - 61.0 * k, size_nm, pixels, 15.0 * k)
            frame = stm.scan()
            if k == 2:
                stm.depassivate_px(np.array([[50.0, 60.0], [54.0, 60.0], [58.0, 60.0]]))
                frame = stm.scan()
            out |= _arrays(f"stm{seed}_{k}", frame)
    np.savez_compressed(path, **out)
    print(f"{path}: {len({k.split('/')[0] for k in out})} frames")


def compare(path_a: str, path_b: str) -> int:
    """Print the largest difference per array kind; return 1 if shapes or discrete arrays differ."""
    a, b = np.load(path_a), np.load(path_b)
    if set(a.files) != set(b.files):
        print("different frame sets")
        return 1
    worst: dict[str, float] = {}
    bad = 0
    for key in sorted(a.files):
        x, y = a[key], b[key]
        kind = key.split("/")[1]
        if x.shape != y.shape:
            print(f"{key}: shape {x.shape} != {y.shape}")
            bad = 1
            continue
        if x.dtype == bool or x.dtype.kind in "iu":
            diff = float((x != y).sum())
            bad |= int(diff > 0)
        else:
            diff = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
        worst[kind] = max(worst.get(kind, 0.0), diff)
    n_frames = len({k.split("/")[0] for k in a.files})
    print(f"{n_frames} frames; largest |difference| (float arrays) or count of differing entries (discrete):")
    for kind, v in worst.items():
        print(f"  {kind:18s} {v:.3g}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--n", type=int, default=40)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.n)
    else:
        raise SystemExit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
