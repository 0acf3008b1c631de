"""Mean shift after a linear projection learned on simulator truth: does it make the defect classes robust?

An LDA (scikit-learn) is fitted per kind on the exported features of a tuning library (simulated frames
whose detections carry their matched truth class), the test library's features are projected with it, and
mean shift (bandwidth from ``estimate_bandwidth`` at several quantiles) clusters the projection. Prints the
ARI against the true classes per quantile (and the cluster count), and the ARI of the LDA's own predictions
(a supervised ceiling for a linear map) and of a random forest fitted on the same rows. Libraries come
from ``stm-feedback library add-sim ... --detections nets`` + ``library export``; a
``peak_mirror_offset_nm`` column (branch ``classes2``) is used when present.

    python benchmarks/class_projection.py TUNE_EXPORT_DIR TEST_EXPORT_DIR [TEST_EXPORT_DIR ...]

Results: docs/defect-library.md, session 7.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.cluster import MeanShift, estimate_bandwidth
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from stm_feedback.physics import KINDS

BASE_COLUMNS = (
    "height_rel",
    "area_cells",
    "circularity",
    "extent_along_nm",
    "extent_across_nm",
    "peak_nm",
    "fill",
)
OPTIONAL_COLUMNS = ("peak_mirror_offset_nm",)
QUANTILES = (0.1, 0.15, 0.2, 0.25, 0.3)


def load(export_dir: Path, kind: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(features (N, F), true classes (N,), column names) of the truth-matched defects of one kind."""
    with open(export_dir / "defects.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == kind and r["true_label"]]
    cols = BASE_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if rows and c in rows[0])
    x = np.array([[float(r[c]) if r[c] not in ("", "nan") else np.nan for c in cols] for r in rows])
    return x.reshape(-1, len(cols)), np.array([r["true_label"] for r in rows]), cols


def transform(x: np.ndarray, cols: tuple[str, ...]) -> np.ndarray:
    """Sizes as logs, heights saturated (as classify's scaling does), NaN -> column-neutral values."""
    out = x.copy()
    for j, c in enumerate(cols):
        if c == "height_rel":
            out[:, j] = np.tanh(out[:, j] / 3.0)
        elif c == "area_cells":
            out[:, j] = np.log1p(np.clip(out[:, j], 0.0, 50.0))
        elif c.startswith("extent"):
            out[:, j] = np.log(np.clip(out[:, j], 0.05, 10.0))
        elif c == "peak_nm":
            out[:, j] = np.tanh(out[:, j] / 0.1)
        elif c == "peak_mirror_offset_nm":
            out[:, j] = np.nan_to_num(out[:, j], nan=0.096)  # unknown -> the middle of [0, 0.192] nm
    return np.nan_to_num(out, nan=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune", type=Path)
    ap.add_argument("tests", type=Path, nargs="+")
    args = ap.parse_args()
    for kind in KINDS:
        xt, yt, cols = load(args.tune, kind)
        scaler = StandardScaler().fit(transform(xt, cols))
        lda = LinearDiscriminantAnalysis().fit(scaler.transform(transform(xt, cols)), yt)
        forest = RandomForestClassifier(300, random_state=0).fit(scaler.transform(transform(xt, cols)), yt)
        print(f"{kind}: columns {', '.join(cols)}; LDA fitted on {len(yt)} defects of {args.tune}")
        for test in [args.tune, *args.tests]:
            x, y, cols_t = load(test, kind)
            if cols_t != cols:
                raise SystemExit(f"{test} has columns {cols_t}, the tuning export {cols}")
            f = scaler.transform(transform(x, cols))
            z = lda.transform(f)
            parts = []
            for q in QUANTILES:
                bw = estimate_bandwidth(z, quantile=q, random_state=0)
                lab = MeanShift(bandwidth=bw, bin_seeding=len(z) > 1000).fit_predict(z)
                parts.append(f"q{q}: {adjusted_rand_score(y, lab):.2f} ({len(set(lab))})")
            ceiling = adjusted_rand_score(y, lda.predict(f))
            forest_ari = adjusted_rand_score(y, forest.predict(f))
            print(
                f"  {test}: n {len(y)}, LDA-predicted ARI {ceiling:.3f}, forest {forest_ari:.3f}; "
                "mean shift ARI (clusters) " + ", ".join(parts)
            )


if __name__ == "__main__":
    main()
