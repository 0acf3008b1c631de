"""The hard preset's variants: one artefact group reset to realistic values at a time, and ``only_listed``
(only the conditions issue 3 lists for its hard suite: heavy noise, double tip, tip changes, unresolved
patches, 3-4 terraces). Shared by the benchmarks that take a PRESET argument."""

from __future__ import annotations

import dataclasses

from simulator.frame import SimConfig

VARIANTS: dict[str, dict] = {
    "hard": {},
    "no_jitter": dict(p_jitter=0.0),
    "no_double": dict(p_double=0.0),
    "gain_ok": dict(feedback_gain=(0.9, 1.0)),
    "no_drift": dict(drift_nm_per_min=(0.0, 0.1), creep_nm=(0.0, 0.05)),
    "noise_real": dict(
        white_noise_nm=(0.002, 0.006),
        pink_noise_nm=(0.0, 0.005),
        spike_fraction=(0.0, 0.001),
        line_offset_nm=(0.0, 0.01),
    ),
    "no_unres": dict(p_unresolved=0.0, p_blunt=0.0),
    "no_tipchange": dict(p_tip_change=0.0),
    "filled": dict(p_empty_state=0.0),
    "only_listed": dict(
        p_jitter=0.0,
        feedback_gain=(0.9, 1.0),
        drift_nm_per_min=(0.0, 0.5),
        creep_nm=(0.0, 0.3),
        tilt_deg=(0.0, 0.5),
        hump_nm=(0.0, 0.05),
    ),
}


def config_of(name: str) -> SimConfig | str:
    """A preset name; ``hard:VARIANT`` for the hard preset with that variant's overrides; either with
    ``@PIXEL_SIZE_NM`` appended for frames at that one pixel size (e.g. ``realistic@0.05``)."""
    name, _, px = name.partition("@")
    if name.startswith("hard:"):
        cfg = dataclasses.replace(SimConfig.preset("hard"), **VARIANTS[name.split(":", 1)[1]])
    elif px:
        cfg = SimConfig.preset(name)
    else:
        return name
    return dataclasses.replace(cfg, pixel_size_nm=(float(px), float(px))) if px else cfg
