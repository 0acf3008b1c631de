"""Cache simulator frames with their truth and the networks' maps (planner studies without the networks).

``python benchmarks/planner_cache.py --preset realistic --first-seed 700000 --n 150 \\
    --out /tmp/pc/train-realistic``
``python benchmarks/planner_cache.py --suite hard --n 100 --out /tmp/pc/suite-hard``
``python benchmarks/planner_cache.py --preset realistic --first-seed 780000 --n 100 \\
    --pixel-size-nm 0.05,0.2 --out /tmp/pc/wide`` (pixel sizes drawn per frame; one value = fixed)

``--suite`` takes the frames of ``stm-feedback evaluate --suite`` (seeds >= 1_000_000: report only, never
calibrate on them); ``--preset`` + ``--first-seed`` simulates that preset at any seeds (calibration: training
range, < 1_000_000). One pickle per frame: ``{"seed", "image_nm", "pixel_size_nm", "bias_v", "truth", "maps",
"models"}``; ``maps`` is the runner's ``NetworkMaps`` (the model versions are stored so a stale cache is
visible). ``benchmarks/planner_study.py`` reads these files.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from pathlib import Path

from tqdm import tqdm

from simulator.frame import SimConfig
from stm_feedback.config import load_settings
from stm_feedback.evaluation import SUITES, simulated_frames, suite_frames
from stm_feedback.pipeline import Pipeline


def preset_config(preset: str, pixel_size_nm: str | None) -> SimConfig:
    """The simulator preset, with its pixel-size range replaced by ``"LO,HI"`` or ``"S"`` (nm) when given."""
    cfg = SimConfig.preset(preset)
    if pixel_size_nm:
        v = [float(x) for x in pixel_size_nm.split(",")]
        cfg = dataclasses.replace(cfg, pixel_size_nm=(v[0], v[-1]))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--suite", choices=sorted(SUITES))
    src.add_argument("--preset", help="simulator preset (with --first-seed)")
    ap.add_argument("--first-seed", type=int, default=500_000)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pixel-size-nm", help="LO,HI (or one value): override the preset's pixel-size range")
    args = ap.parse_args()
    if args.pixel_size_nm and not args.preset:
        ap.error("--pixel-size-nm needs --preset")
    if args.preset and args.first_seed + args.n > 1_000_000:
        ap.error("calibration frames must stay in the training seed range (< 1_000_000)")
    frames = (
        suite_frames(args.suite, args.n)
        if args.suite
        else simulated_frames(preset_config(args.preset, args.pixel_size_nm), args.first_seed, args.n)
    )
    pipe = Pipeline(load_settings())
    runner = pipe.runner
    models = pipe.models()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in tqdm(frames, total=args.n, unit="frame"):
        maps = runner.predict(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v)
        rec = {
            "seed": f.seed,
            "image_nm": f.image_nm,
            "pixel_size_nm": f.pixel_size_nm,
            "bias_v": f.bias_v,
            "truth": f.truth,
            "maps": maps,
            "models": models,
        }
        (args.out / f"{f.seed}.pkl").write_bytes(pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    main()
