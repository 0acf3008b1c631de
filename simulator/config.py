"""Simulator parameter ranges (``SimConfig``) and their presets. Every range is (low, high) in the unit
of its name;
probabilities are per frame. ``sample_params`` draws one frame's parameters (a JSON-serialisable dict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from stm_feedback.errors import InputError

Range = tuple[float, float]

# defect densities per 100 nm^2 at density_scale 1 (../shared/design/hsi-physics.md section 2.3,
# Wolkow-group map:
# db 0.23; missing_dimer 0.40; raised_silicon + gunk 0.62; etch_pit + charged vacancy 0.64; dihydride 0.62).
# Double and 1+2 vacancies are not separated in that map; 0.1 each is our assumption.
DEFAULT_DENSITY_PER_100NM2: dict[str, float] = {
    "db_single": 0.23,
    "db_pair": 0.10,
    "litho_patch": 0.0,
    "adatom_cluster": 0.62,
    "dv1": 0.40,
    "dv2": 0.10,
    "dv1p2": 0.10,
    "etch_pit": 0.64,
    "dihydride": 0.62,
}


@dataclass
class SimConfig:
    """Ranges of every sampled simulator parameter. Build with ``SimConfig.preset(name)``."""

    name: str = "realistic"
    pixel_size_nm: Range = (0.08, 0.12)  # used when simulate_frame gets pixel_size_nm=None
    n_steps: tuple[int, int] = (0, 2)  # inclusive
    p_empty_state: float = 0.0  # probability of a positive (empty-state) bias when bias_v is None
    bias_filled_v: Range = (-2.5, -1.5)
    bias_empty_v: Range = (1.3, 2.0)
    # lattice appearance (filled-state values; empty state uses the same amplitudes inverted)
    atom_amp_nm: Range = (0.02, 0.035)
    atom_sigma_along_nm: Range = (0.08, 0.10)
    atom_sigma_across_nm: Range = (0.065, 0.08)
    row_amp_nm: Range = (0.02, 0.05)
    row_sigma_empty_nm: Range = (0.12, 0.18)
    step_width_nm: Range = (0.08, 0.15)
    # defects
    density_scale: Range = (0.5, 1.5)
    density_per_100nm2: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DENSITY_PER_100NM2))
    nb_dispersion: float = 2.0  # negative-binomial shape k (smaller = more clustered counts)
    p_cluster: float = 0.3  # probability a defect is placed near an earlier one
    # scan geometry
    line_time_s: Range = (0.1, 0.4)
    drift_nm_per_min: Range = (0.0, 0.5)
    creep_nm: Range = (0.0, 0.3)
    creep_tau_s: Range = (5.0, 30.0)
    p_jitter: float = 0.3
    jitter_lambda_px: Range = (0.0, 0.5)
    # z artefacts
    tilt_deg: Range = (0.0, 0.5)
    hump_nm: Range = (0.0, 0.05)
    feedback_gain: Range = (0.7, 1.0)  # per-pixel PI response along the fast axis (1 = perfect)
    line_offset_nm: Range = (0.0, 0.01)
    white_noise_nm: Range = (0.002, 0.006)
    pink_noise_nm: Range = (0.0, 0.005)
    spike_fraction: Range = (0.0, 0.001)
    # tip
    tip_sigma_sharp_nm: Range = (0.0, 0.03)
    p_blunt: float = 0.1
    tip_sigma_blunt_nm: Range = (0.12, 0.4)
    p_double: float = 0.05
    double_offset_nm: Range = (0.3, 2.0)
    double_dz_nm: Range = (0.0, 0.05)
    p_tip_change: float = 0.1
    tip_change_dz_nm: Range = (0.01, 0.1)
    p_unresolved: float = 0.1
    unresolved_patches: tuple[int, int] = (1, 2)
    unresolved_radius_nm: Range = (1.5, 4.0)

    @staticmethod
    def preset(name: str) -> SimConfig:
        """One of "clean", "realistic", "realistic_empty", "hard", "training", "defect_rich",
        "defect_rich_empty" (see
        docs/simulator.md)."""
        if name not in PRESETS:
            raise InputError(f"unknown simulator preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], density_per_100nm2=dict(PRESETS[name].density_per_100nm2))

    def to_dict(self) -> dict:
        """All ranges as a JSON-serialisable dict."""
        return asdict(self)


PRESETS: dict[str, SimConfig] = {
    "clean": SimConfig(
        name="clean",
        n_steps=(0, 1),
        density_scale=(0.3, 0.8),
        drift_nm_per_min=(0.0, 0.1),
        creep_nm=(0.0, 0.05),
        p_jitter=0.0,
        tilt_deg=(0.0, 0.3),
        hump_nm=(0.0, 0.01),
        feedback_gain=(0.9, 1.0),
        line_offset_nm=(0.0, 0.003),
        white_noise_nm=(0.001, 0.003),
        pink_noise_nm=(0.0, 0.002),
        spike_fraction=(0.0, 0.0),
        tip_sigma_sharp_nm=(0.0, 0.02),
        p_blunt=0.0,
        p_double=0.0,
        p_tip_change=0.0,
        p_unresolved=0.0,
    ),
    "realistic": SimConfig(name="realistic"),
    # the realistic preset imaged in empty states only (positive bias: rows dark, defects keep their kind,
    # charge halos flip): the real tiles in ../shared/data are empty-state frames
    "realistic_empty": SimConfig(name="realistic_empty", p_empty_state=1.0),
    "hard": SimConfig(
        name="hard",
        n_steps=(2, 3),
        p_empty_state=0.2,
        density_scale=(1.0, 2.5),
        drift_nm_per_min=(0.3, 2.0),
        creep_nm=(0.1, 0.8),
        p_jitter=0.7,
        jitter_lambda_px=(0.5, 2.0),
        tilt_deg=(0.5, 2.0),
        hump_nm=(0.02, 0.2),
        feedback_gain=(0.4, 0.8),
        line_offset_nm=(0.005, 0.03),
        white_noise_nm=(0.005, 0.012),
        pink_noise_nm=(0.003, 0.012),
        spike_fraction=(0.0005, 0.005),
        tip_sigma_sharp_nm=(0.02, 0.05),
        p_blunt=0.2,
        p_double=0.5,
        p_tip_change=0.5,
        p_unresolved=0.7,
        unresolved_patches=(1, 4),
    ),
    "training": SimConfig(
        name="training",
        pixel_size_nm=(0.05, 0.2),
        n_steps=(0, 3),
        p_empty_state=0.5,
        atom_amp_nm=(0.01, 0.04),
        row_amp_nm=(0.01, 0.06),
        density_scale=(0.0, 3.0),
        density_per_100nm2={**DEFAULT_DENSITY_PER_100NM2, "litho_patch": 0.3},
        drift_nm_per_min=(0.0, 2.0),
        creep_nm=(0.0, 0.8),
        p_jitter=0.5,
        jitter_lambda_px=(0.0, 3.0),
        tilt_deg=(0.0, 2.0),
        hump_nm=(0.0, 0.3),
        feedback_gain=(0.3, 1.0),
        line_offset_nm=(0.0, 0.03),
        white_noise_nm=(0.0005, 0.015),
        pink_noise_nm=(0.0, 0.015),
        spike_fraction=(0.0, 0.005),
        tip_sigma_sharp_nm=(0.0, 0.05),
        p_blunt=0.15,
        tip_sigma_blunt_nm=(0.12, 0.6),
        p_double=0.25,
        double_dz_nm=(0.0, 0.1),
        p_tip_change=0.3,
        p_unresolved=0.4,
        unresolved_patches=(1, 4),
        unresolved_radius_nm=(1.0, 6.0),
    ),
    # realistic artefacts, 2-4x the defect density and 3x the dihydrides: a training mix component for NN-2,
    # whose misses are mostly faint dihydrides (the planner's false-safe sites sat next to them)
    "defect_rich": SimConfig(
        name="defect_rich",
        pixel_size_nm=(0.07, 0.15),
        n_steps=(0, 2),
        p_empty_state=0.3,
        density_scale=(2.0, 4.0),
        density_per_100nm2={
            **DEFAULT_DENSITY_PER_100NM2,
            "dihydride": 3 * DEFAULT_DENSITY_PER_100NM2["dihydride"],
        },
        white_noise_nm=(0.001, 0.01),
        pink_noise_nm=(0.0, 0.008),
    ),
}
# defect_rich imaged in empty states only: an NN-2 training component for the empty-state dihydrides
# (a dark line and two shifted atom dips inside the dark row line; models/MODEL_CARD.md, session 7)
PRESETS["defect_rich_empty"] = replace(PRESETS["defect_rich"], name="defect_rich_empty", p_empty_state=1.0)


def uniform(rng: np.random.Generator, r: Range) -> float:
    """One draw from the closed range r (returns r[0] when the range is empty)."""
    lo, hi = float(r[0]), float(r[1])
    return lo if hi <= lo else float(rng.uniform(lo, hi))


def sample_params(rng: np.random.Generator, cfg: SimConfig) -> dict:
    """Draw one frame's appearance, defect, scan, z-artefact and tip parameters (plain
    floats/ints/bools/strs)."""
    u = lambda r: uniform(rng, r)  # noqa: E731
    p: dict = {"preset": cfg.name}
    p["empty_state_draw"] = bool(rng.random() < cfg.p_empty_state)
    p["bias_filled_v"] = u(cfg.bias_filled_v)
    p["bias_empty_v"] = u(cfg.bias_empty_v)
    p["atom_amp_nm"] = u(cfg.atom_amp_nm)
    p["atom_sigma_along_nm"] = u(cfg.atom_sigma_along_nm)
    p["atom_sigma_across_nm"] = u(cfg.atom_sigma_across_nm)
    p["row_amp_nm"] = u(cfg.row_amp_nm)
    p["row_sigma_empty_nm"] = u(cfg.row_sigma_empty_nm)
    p["step_width_nm"] = u(cfg.step_width_nm)
    p["n_steps"] = int(rng.integers(cfg.n_steps[0], cfg.n_steps[1] + 1))
    p["density_scale"] = u(cfg.density_scale)
    p["line_time_s"] = u(cfg.line_time_s)
    p["drift_nm_per_min"] = u(cfg.drift_nm_per_min)
    p["drift_angle_deg"] = float(rng.uniform(0, 360))
    p["creep_nm"] = u(cfg.creep_nm)
    p["creep_tau_s"] = u(cfg.creep_tau_s)
    p["creep_angle_deg"] = float(rng.uniform(0, 360))
    p["jitter_lambda_px"] = u(cfg.jitter_lambda_px) if rng.random() < cfg.p_jitter else 0.0
    p["tilt_deg"] = u(cfg.tilt_deg)
    p["tilt_azimuth_deg"] = float(rng.uniform(0, 360))
    p["hump_nm"] = u(cfg.hump_nm) * float(rng.choice([-1.0, 1.0]))
    p["feedback_gain"] = u(cfg.feedback_gain)
    p["line_offset_nm"] = u(cfg.line_offset_nm)
    p["white_noise_nm"] = u(cfg.white_noise_nm)
    p["pink_noise_nm"] = u(cfg.pink_noise_nm)
    p["spike_fraction"] = u(cfg.spike_fraction)
    blunt = bool(rng.random() < cfg.p_blunt)
    p["tip_sigma_nm"] = u(cfg.tip_sigma_blunt_nm) if blunt else u(cfg.tip_sigma_sharp_nm)
    p["double_tip"] = bool(rng.random() < cfg.p_double)
    p["double_offset_nm"] = u(cfg.double_offset_nm)
    p["double_angle_deg"] = float(rng.uniform(0, 360))
    p["double_dz_nm"] = u(cfg.double_dz_nm)
    p["tip_change"] = bool(rng.random() < cfg.p_tip_change)
    p["tip_change_fraction"] = float(rng.uniform(0.15, 0.85))
    p["tip_change_dz_nm"] = u(cfg.tip_change_dz_nm) * float(rng.choice([-1.0, 1.0]))
    p["tip_change_sigma_nm"] = u(cfg.tip_sigma_blunt_nm) if rng.random() < 0.5 else u(cfg.tip_sigma_sharp_nm)
    p["unresolved_patches"] = (
        int(rng.integers(cfg.unresolved_patches[0], cfg.unresolved_patches[1] + 1))
        if rng.random() < cfg.p_unresolved
        else 0
    )
    p["unresolved_radius_nm"] = [float(cfg.unresolved_radius_nm[0]), float(cfg.unresolved_radius_nm[1])]
    p["tip_state"] = (
        "tip_change" if p["tip_change"] else "double" if p["double_tip"] else "blunt" if blunt else "sharp"
    )
    return p
