"""Seeded, randomly initialised nets of the default specs, narrowed so tests stay fast (shared by the tests
that need a models directory without trained weights)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from stm_feedback.nets import NET_NAMES, build_net, save_model, spec_preset


def save_random_nets(
    directory: Path,
    unet_widths: tuple[int, ...] = (4, 8, 8, 8),
    plain_widths: tuple[int, ...] = (6,),
    tag: str = "random",
) -> Path:
    """Write the three nets (<stem>.pt + .json) into ``directory``: U-Nets with ``unet_widths``, NN-2 with
    ``plain_widths``, versions "<name>-<tag>", torch seed 0. Returns ``directory``."""
    torch.manual_seed(0)
    for n in NET_NAMES:
        s = spec_preset(n)
        s = replace(s, widths=unet_widths if s.arch == "unet" else plain_widths, version=f"{n}-{tag}")
        save_model(build_net(s), s, directory)
    return directory
