"""Writing simulated frames to disk: ``<name>.npy`` (float32 nm), ``<name>.json`` (truth without
per-pixel maps),
``<name>.npz`` (masks), ``<name>.meta.json`` ({"pixel_size_nm", "bias_v"}) and ``<name>.png`` (preview)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from simulator.frame import SimFrame
from simulator.preview import write_preview
from simulator.truth import DefectTruth, GroundTruth, TerraceTruth

MASK_FIELDS = ("defect_instances", "terrace_labels", "step_mask", "unresolved_mask")


def _jsonable(v: object) -> object:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def truth_to_json(truth: GroundTruth) -> dict:
    """Every non-mask field of truth as JSON-compatible values (arrays become lists)."""
    out = {}
    for name in truth.__dataclass_fields__:
        if name in MASK_FIELDS:
            continue
        v = getattr(truth, name)
        if name in ("defects", "terraces"):
            v = [asdict(x) for x in v]
        out[name] = _jsonable(v)
    return out


def truth_from_files(json_path: str | Path, npz_path: str | Path) -> GroundTruth:
    """Inverse of write_frame's truth files."""
    d = json.loads(Path(json_path).read_text())
    masks = np.load(npz_path)
    d["defects"] = [DefectTruth(**x) for x in d["defects"]]
    d["terraces"] = [TerraceTruth(**x) for x in d["terraces"]]
    for k in ("atoms_xy_px", "dimers_xy_px"):
        d[k] = np.asarray(d[k], dtype=np.float64).reshape(-1, 2)
    for k in ("atom_terrace", "dimer_terrace", "dimer_row"):
        d[k] = np.asarray(d[k], dtype=np.int64)
    for k in ("atom_resolved", "dimer_bare"):
        d[k] = np.asarray(d[k], dtype=bool)
    for k in MASK_FIELDS:
        d[k] = masks[k]
    return GroundTruth(**d)


def write_frame(out_dir: str | Path, name: str, frame: SimFrame, preview_scale: int = 2) -> list[Path]:
    """Write the five files of one frame; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = frame.truth
    paths = [out / f"{name}{ext}" for ext in (".npy", ".json", ".npz", ".meta.json", ".png")]
    np.save(paths[0], frame.image_nm.astype(np.float32))
    paths[1].write_text(json.dumps(truth_to_json(t)))
    np.savez_compressed(paths[2], **{k: getattr(t, k) for k in MASK_FIELDS})
    paths[3].write_text(json.dumps({"pixel_size_nm": t.pixel_size_nm, "bias_v": frame.bias_v}))
    write_preview(paths[4], frame.image_nm, t, scale=preview_scale)
    return paths
