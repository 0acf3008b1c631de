"""INT8 post-training quantisation of the three nets for the OpenVINO backend (``stm-feedback quantize``).

What it writes, per net, into ``<models_dir>/int8/``: ``<stem>.xml`` + ``<stem>.bin`` (an OpenVINO IR with
dynamic (h, w) input, INT8 weights and activations where NNCF placed quantisers) and ``<stem>.json`` (where
it came from: the fingerprint of the prepared fp32 module it was quantised from, the net version, the
calibration frames, package versions). ``backends.int8_ir`` accepts an IR only when that fingerprint
matches the weights being loaded, so retrained weights never run with stale INT8 copies.

Calibration: the real network inputs (normalised, resampled, high-passed, padded exactly as
``ModelRunner.predict`` prepares them) of simulator frames at seeds ``CALIBRATION_SEED``+, outside every
training, suite and benchmark seed range, drawn from the training / realistic / hard presets at their own
pixel sizes and biases. NNCF's min-max statistics + fast bias correction; no retraining.

NNCF is needed here only (``pip install nncf``); running INT8 IRs needs OpenVINO alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.errors import ModelError
from stm_feedback.nets import NET_NAMES

log = logging.getLogger(__name__)

CALIBRATION_SEED = 4_000_000  # simulator seeds 4_000_000+: not used by training (< 1e6), suites or benches
CALIBRATION_PRESETS: tuple[str, ...] = ("training", "realistic", "hard")
# NN-2 stays bf16: INT8 (with the first and last convolutions kept float) cost 0.003-0.008 defect F1 on
# every suite and took the unseen seeds 700100-700199 below the 0.90 target (docs/performance.md, session 8)
DEFAULT_NETS: tuple[str, ...] = ("terraces", "atoms")
DEFAULT_PRESET = "performance"
# layers left in bf16/fp32 (regular expressions on OpenVINO node names of the converted nets)
KEEP_FLOAT_PATTERNS: tuple[str, ...] = (r".*\.head/.*", r".*\.enc1?\.0/.*")


def _import_nncf():  # noqa: ANN202 - module
    try:
        import nncf
    except ImportError as e:
        raise ModelError(f"INT8 quantisation needs NNCF ({e}); install it with `pip install nncf`") from e
    return nncf


def calibration_inputs(
    runner: Any, n_frames: int, seed0: int = CALIBRATION_SEED, size_px: int = 256
) -> dict[str, list[np.ndarray]]:
    """net name -> list of padded network inputs (1, 1, h, w) float32 that ``runner.predict`` (a
    ``ModelRunner``) feeds its engines on ``n_frames`` simulator frames (presets cycled through
    ``CALIBRATION_PRESETS``, seeds seed0 ...; each frame's own pixel size and bias)."""
    from simulator.frame import SimConfig, simulate_frame

    captured: dict[str, list[np.ndarray]] = {n: [] for n in runner.engines}
    originals = dict(runner.engines)

    def recorder(name: str, engine: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def call(x: np.ndarray) -> np.ndarray:
            captured[name].append(np.array(x, np.float32)[None, None])
            return engine(x)

        return call

    runner.engines = {n: recorder(n, e) for n, e in originals.items()}
    try:
        for i in range(n_frames):
            cfg = SimConfig.preset(CALIBRATION_PRESETS[i % len(CALIBRATION_PRESETS)])
            f = simulate_frame(seed0 + i, size_px, None, cfg)
            runner.predict(f.image_nm, f.truth.pixel_size_nm, f.bias_v)
    finally:
        runner.engines = originals
    return captured


def quantize_models(
    models_dir: Path,
    n_frames: int = 60,
    seed0: int = CALIBRATION_SEED,
    out_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    size_px: int = 256,
    nets: tuple[str, ...] = DEFAULT_NETS,
    preset: str = DEFAULT_PRESET,
) -> dict[str, Path]:
    """Quantise the nets of ``models_dir`` to INT8 OpenVINO IRs in ``out_dir`` (default
    ``<models_dir>/int8``) from ``n_frames`` calibration frames of ``size_px``^2; returns net name -> IR .xml
    path, for ``nets`` only (the others keep running in bf16/fp32). ``preset``: NNCF's "performance"
    (symmetric activation quantisers) or "mixed" (asymmetric activations). ModelError when NNCF or OpenVINO
    is missing, or a net or preset name is unknown."""
    from stm_feedback.backends import (
        INT8_DIRNAME,
        WithActivation,
        _import_openvino,
        convert_dynamic,
        int8_fingerprint,
        int8_paths,
    )
    from stm_feedback.nets import model_paths
    from stm_feedback.runner import ModelRunner

    unknown = sorted(set(nets) - set(NET_NAMES))
    if unknown or not nets:
        raise ModelError(f"nets to quantise must be some of {NET_NAMES}, got {list(nets)}")
    if preset not in ("performance", "mixed"):
        raise ModelError(f"quantisation preset must be 'performance' or 'mixed', got {preset!r}")
    ov = _import_openvino()  # BackendUnavailable (a ModelError) when missing
    nncf = _import_nncf()
    say = progress or log.info
    out = Path(out_dir) if out_dir is not None else Path(models_dir) / INT8_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    runner = ModelRunner.from_dir(models_dir, device="cpu", backend="torch-eager")  # fp32 reference inputs
    t0 = time.perf_counter()
    inputs = calibration_inputs(runner, n_frames, seed0, size_px)
    say(f"calibration inputs from {n_frames} frames in {time.perf_counter() - t0:.1f} s")
    written: dict[str, Path] = {}
    for name in nets:
        spec = runner.specs[name]
        model = convert_dynamic(ov, WithActivation(runner.modules[name], spec.out_channels).eval().float())
        xs = inputs[name]
        t1 = time.perf_counter()
        quantized = nncf.quantize(
            model,
            nncf.Dataset(xs),
            preset=nncf.QuantizationPreset(preset),
            subset_size=len(xs),
            fast_bias_correction=True,
            ignored_scope=nncf.IgnoredScope(patterns=list(KEEP_FLOAT_PATTERNS), validate=False),
        )
        xml, meta_path = int8_paths(out, model_paths(models_dir, name)[0].stem)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        meta = {
            "fingerprint": int8_fingerprint(runner.modules[name], spec.out_channels),
            "net_version": spec.version,
            "calibration": {
                "frames": n_frames,
                "first_seed": seed0,
                "presets": list(CALIBRATION_PRESETS),
                "inputs": len(xs),
            },
            "nncf": nncf.__version__,
            "openvino": ov.__version__,
            "preset": preset,
        }
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        say(f"{name}: {len(xs)} calibration inputs, quantised in {time.perf_counter() - t1:.1f} s -> {xml}")
        written[name] = xml
    return written
