"""One simulated STM frame with exact ground truth: ``simulate_frame(seed, size_px, pixel_size_nm,
config)``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.config import SimConfig, sample_params, uniform
from simulator.defects import place_defects
from simulator.imaging import acquire
from simulator.scan import Drift, ScanGeometry
from simulator.surface import make_surface
from simulator.truth import GroundTruth
from stm_feedback.errors import InputError

__all__ = ["SimConfig", "SimFrame", "simulate_frame"]

MIN_SIZE_PX = 8
MAX_SIZE_PX = 8192


@dataclass
class SimFrame:
    """A rendered frame: ``image_nm`` (H, W) float32 apparent height (nm), its truth, and the sample bias
    (V)."""

    image_nm: np.ndarray
    truth: GroundTruth
    bias_v: float

    @property
    def pixel_size_nm(self) -> float:
        return self.truth.pixel_size_nm


def _check_size(size_px: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size_px, (int, np.integer)):
        h = w = int(size_px)
    else:
        try:
            h, w = (int(v) for v in size_px)
        except (TypeError, ValueError) as exc:
            raise InputError(f"size_px must be an int or (H, W), got {size_px!r}") from exc
    if not (MIN_SIZE_PX <= h <= MAX_SIZE_PX and MIN_SIZE_PX <= w <= MAX_SIZE_PX):
        raise InputError(f"frame size {h}x{w} px outside [{MIN_SIZE_PX}, {MAX_SIZE_PX}]")
    return h, w


def jitter_lines(rng: np.random.Generator, h: int, lam_px: float) -> np.ndarray:
    """Per-line lateral offsets (px): Poisson(lam) magnitudes with random sign (AtomAI-style line roll)."""
    if lam_px <= 0:
        return np.zeros(h)
    return rng.poisson(lam_px, h) * rng.choice([-1.0, 1.0], h)


def simulate_frame(
    seed: int,
    size_px: int | tuple[int, int] = 256,
    pixel_size_nm: float | None = 0.1,
    config: SimConfig | None = None,
    bias_v: float | None = None,
) -> SimFrame:
    """Render one frame of H-Si(100)-2x1 with ground truth, deterministic in ``seed``.

    ``pixel_size_nm`` None draws it from ``config.pixel_size_nm``; ``bias_v`` None draws the polarity
    (``config.p_empty_state``) and the bias from the config ranges. Every drawn value is in ``truth.params``.
    """
    h, w = _check_size(size_px)
    if pixel_size_nm is not None and not (math.isfinite(pixel_size_nm) and 0.005 <= pixel_size_nm <= 2.0):
        raise InputError(f"pixel_size_nm must be in [0.005, 2.0], got {pixel_size_nm!r}")
    if bias_v is not None and not (math.isfinite(bias_v) and bias_v != 0.0):
        raise InputError(f"bias_v must be finite and non-zero, got {bias_v!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    cfg = config if config is not None else SimConfig.preset("realistic")
    rng = np.random.default_rng(int(seed))
    params = sample_params(rng, cfg)
    s = float(pixel_size_nm) if pixel_size_nm is not None else uniform(rng, cfg.pixel_size_nm)
    if bias_v is None:
        bias_v = params["bias_empty_v"] if params["empty_state_draw"] else params["bias_filled_v"]
    angle = float(rng.uniform(0.0, 180.0))
    centre = rng.uniform(-50.0, 50.0, 2)  # random translation of the lattice under the frame
    dv = params["drift_nm_per_min"] / 60.0
    da, ca = np.radians(params["drift_angle_deg"]), np.radians(params["creep_angle_deg"])
    drift = Drift(velocity_nm_per_s=np.array([dv * np.cos(da), dv * np.sin(da)]))
    drift.add_creep(0.0, params["creep_nm"] * np.array([np.cos(ca), np.sin(ca)]), params["creep_tau_s"])
    geom = ScanGeometry(
        centre_nm=centre,
        angle_deg=angle,
        pixel_size_nm=s,
        height_px=h,
        width_px=w,
        t0_s=0.0,
        line_time_s=params["line_time_s"],
        jitter_px=jitter_lines(rng, h, params["jitter_lambda_px"]),
        drift=drift,
    )
    extent = math.hypot(h, w) * s
    surface = make_surface(rng, params["n_steps"], centre, extent, step_width_nm=params["step_width_nm"])
    corners = geom.corners_nm(margin_px=2.0 / s)  # 2 nm margin: defects just outside still show their edges
    box = (corners[:, 0].min(), corners[:, 0].max(), corners[:, 1].min(), corners[:, 1].max())
    defects = place_defects(
        rng,
        surface,
        box,
        cfg.density_per_100nm2,
        density_scale=params["density_scale"],
        nb_dispersion=cfg.nb_dispersion,
        p_cluster=cfg.p_cluster,
    )
    for k, d in enumerate(defects, start=1):
        d.id = k
    params.update(
        seed=int(seed),
        pixel_size_nm=s,
        size_px=[h, w],
        bias_v=float(bias_v),
        scan_angle_deg=angle,
        centre_nm=[float(centre[0]), float(centre[1])],
        jitter_rms_px=float(np.sqrt(np.mean(geom.jitter_px**2))),
        surface_n0=surface.n0,
        steps=[
            {"kind": st.kind, "offset_nm": st.offset_nm, "upper_terrace": st.upper_terrace}
            for st in surface.steps
        ],
        n_defects_placed=len(defects),
    )
    image, truth = acquire(surface, defects, geom, params, rng, float(bias_v))
    return SimFrame(image_nm=image, truth=truth, bias_v=float(bias_v))
