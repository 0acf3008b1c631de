"""Network outputs, resampled back to the input frame's pixel grid (x = column, y = row)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NetworkMaps:
    """Per-pixel probabilities from the three networks, all (H, W) float32 in the input frame.

    - ``step_prob``: NN-0 probability that a pixel is on a step edge (terraces = connected components of the rest);
    - ``atom_prob``: NN-1 atom map; its peaks are Si dimer atoms, low where the lattice is not resolved;
    - ``protrusion_prob`` / ``depression_prob``: NN-2 defect maps by kind.
    ``image_norm`` is the per-frame normalised, polarity-corrected image (rows bright) the nets saw, same grid.

    ``atom_prob_net``: the atom map on NN-1's own grid (its working pixel size), kept only when that grid is
    finer than the input's (frames coarser than the net's pixel size, e.g. 0.2 nm/px against 0.1): on the
    input grid a dimer's two atoms (0.24 nm apart) are ~1 px apart and merge into one peak, so the atoms are
    found on this map (``postprocess.find_atoms_on_net_grid``). Same field of view as the input; the grids
    share the pixel-centre convention of ``preprocess.resize``. None = find them on ``atom_prob``.
    """

    step_prob: np.ndarray
    atom_prob: np.ndarray
    protrusion_prob: np.ndarray
    depression_prob: np.ndarray
    image_norm: np.ndarray
    pixel_size_nm: float
    # polarity of the input: "filled" (rows bright) or "empty" (rows dark, image_norm inverted back), and how
    # it was decided: "bias" (from bias_v), "estimated" (from the atom map, bias unknown), "assumed" (filled)
    polarity: str = "filled"
    polarity_source: str = "assumed"
    atom_prob_net: np.ndarray | None = None


def bias_polarity(bias_v: float | None) -> tuple[str, str]:
    """(polarity, polarity_source) of a frame from its sample bias in V: positive = empty states ("empty",
    rows dark), zero or negative = filled states ("filled"), source "bias"; None = ("filled", "assumed")."""
    if bias_v is None:
        return "filled", "assumed"
    return ("empty" if float(bias_v) > 0 else "filled"), "bias"
