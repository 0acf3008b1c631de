"""Row-angle errors per terrace by where the angle came from: the lattice fit of the atoms ("fit") or, for a
terrace without one, the FFT ("fft") (docs/analysis-schema.md, session 12).

    python benchmarks/terrace_angle_sources.py SUITE N      # hard 30 in the docs

Each predicted terrace is matched to the truth terrace it overlaps most; its error is that of
``row_angle_undistorted_deg`` when given, else ``row_angle_deg`` (as the scorer does). Prints every terrace
off by more than 20 deg (seed, id, source, atoms, area nm^2, error deg), then per source the count, how many
are off by more than 20 deg and the median error.
"""

from __future__ import annotations

import sys

import numpy as np

from stm_feedback.config import load_settings
from stm_feedback.evaluation import suite_frames
from stm_feedback.metrics import angle_diff_deg
from stm_feedback.pipeline import Pipeline


def main() -> None:
    pipe = Pipeline(load_settings())
    rows = []
    for fr in suite_frames(sys.argv[1], int(sys.argv[2])):
        a = pipe.analyze(fr.image_nm, fr.pixel_size_nm, bias_v=fr.bias_v)
        truth_labels = np.asarray(fr.truth.terrace_labels)
        truth_angle = {x.id: x.row_angle_deg for x in fr.truth.terraces}
        for p in a.terraces:
            ids, counts = np.unique(truth_labels[a.terrace_labels == p.id], return_counts=True)
            if not (ids >= 0).any():
                continue
            tid = int(ids[ids >= 0][np.argmax(counts[ids >= 0])])
            angle = p.row_angle_undistorted_deg
            if angle is None:
                angle = p.row_angle_deg
            err = angle_diff_deg(angle, truth_angle[tid])
            src = "fit" if p.fit_residual_nm is not None else "fft"
            rows.append((fr.seed, p.id, src, p.n_atoms, round(p.area_nm2, 1), round(err, 1)))
            if err > 20:
                print(rows[-1], flush=True)
    for src in ("fit", "fft"):
        e = np.array([r[5] for r in rows if r[2] == src])
        med = f"{np.median(e):.2f}" if len(e) else "-"
        print(f"{src}: {len(e)} terraces, {int((e > 20).sum())} off by > 20 deg, median {med} deg")


if __name__ == "__main__":
    main()
