"""Mean shift in a learned embedding: does a small MLP fitted on simulator truth make the classes modes?

Session 7 (benchmarks/class_projection.py) found that a linear projection leaves the protrusion classes
overlapping (a shoulder, not a mode, for ``db_single``) while a random forest on the same features reaches
ARI ~0.9: the information is there, but not linearly. Here a small MLP (scikit-learn ``MLPClassifier``) is
fitted per kind on the feature rows of tuning libraries (simulated frames whose network detections carry
their matched truth class), and mean shift clusters each test library's defects (all of them, labelled or
not, as ``library cluster`` does) in

* ``prob``: the MLP's class probabilities, and
* ``hidden``: its last hidden layer (z-scored),

at several ``estimate_bandwidth`` quantiles; the ARI is scored on the truth-matched defects. Also printed:
the ARI of the MLP's own argmax (a supervised ceiling for this model) and of today's mean shift on the
kind's standardised columns (``classify.ClusterModel``).

    python benchmarks/class_embedding.py --tune EXPORT [EXPORT ...] --test EXPORT [EXPORT ...]

Exports come from ``stm-feedback library add-sim ... --detections nets`` + ``library export --out DIR``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.cluster import MeanShift, estimate_bandwidth
from sklearn.metrics import adjusted_rand_score
from sklearn.neural_network import MLPClassifier

from stm_feedback.classify import FEATURE_NAMES, ClusterModel, _transform
from stm_feedback.physics import KINDS

QUANTILES = (0.1, 0.15, 0.2, 0.25, 0.3)


def load(export_dir: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) in FEATURE_NAMES order, true class or '' (N,)) of the defects of one kind whose
    features are all finite (the library leaves the others out of clustering)."""
    with open(export_dir / "defects.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == kind]
    x = np.array(
        [[float(r[c]) if r[c] not in ("", "nan", "None") else np.nan for c in FEATURE_NAMES] for r in rows]
    ).reshape(-1, len(FEATURE_NAMES))
    y = np.array([r["true_label"] or "" for r in rows], dtype=object)
    ok = np.isfinite(x).all(axis=1)
    return x[ok], y[ok]


def mean_shift(z: np.ndarray, quantile: float, min_bandwidth: float = 1e-3) -> np.ndarray:
    bw = float(estimate_bandwidth(z, quantile=quantile, n_samples=min(len(z), 2000), random_state=0))
    bw = max(bw, min_bandwidth)
    return MeanShift(bandwidth=bw, bin_seeding=len(z) > 1000).fit(z).labels_


def hidden(mlp: MLPClassifier, x: np.ndarray) -> np.ndarray:
    """Activations of the MLP's last hidden layer (relu)."""
    a = x
    for w, b in zip(mlp.coefs_[:-1], mlp.intercepts_[:-1], strict=True):
        a = np.maximum(a @ w + b, 0.0)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", nargs="+", type=Path, required=True)
    ap.add_argument("--test", nargs="+", type=Path, required=True)
    ap.add_argument("--hidden", default="32,16", help="hidden layer sizes")
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-bandwidth", type=float, default=1e-3, help="floor of the bandwidth (prob space)")
    args = ap.parse_args()
    sizes = tuple(int(v) for v in args.hidden.split(","))
    for kind in KINDS:
        parts = [load(d, kind) for d in args.tune]
        xt = np.concatenate([p[0] for p in parts])
        yt = np.concatenate([p[1] for p in parts])
        # a kind's rare foreign classes (a pit matched to a protrusion detection) are matching noise
        names, counts = np.unique(yt[yt != ""], return_counts=True)
        lab = np.isin(yt, names[counts >= 0.02 * counts.sum()])
        tt = _transform(xt, FEATURE_NAMES)
        mean, scale = tt.mean(axis=0), tt.std(axis=0) + 1e-9
        mlp = MLPClassifier(sizes, alpha=args.alpha, max_iter=2000, random_state=args.seed)
        mlp.fit((tt[lab] - mean) / scale, yt[lab])
        classes, counts = np.unique(yt[lab], return_counts=True)
        per_class = dict(zip(classes, counts.tolist(), strict=True))
        print(f"\n{kind}: tuned on {lab.sum()} labelled defects {per_class}")
        for d in args.test:
            x, y = load(d, kind)
            lab_t = y != ""
            z = (_transform(x, FEATURE_NAMES) - mean) / scale
            prob = mlp.predict_proba(z)
            hid = hidden(mlp, z)
            hid = (hid - hid.mean(axis=0)) / (hid.std(axis=0) + 1e-9)
            base = ClusterModel().fit(x, np.full(len(x), kind, dtype=object))

            def ari(c: np.ndarray, y: np.ndarray = y, lab_t: np.ndarray = lab_t) -> float:
                return float(adjusted_rand_score(y[lab_t], np.asarray(c)[lab_t]))

            print(f"  {d.name}: n={len(x)} labelled={lab_t.sum()}")
            print(f"    today's mean shift ARI {ari(base):.3f}; MLP argmax ARI {ari(prob.argmax(1)):.3f}")
            for name, emb in (("prob", prob), ("hidden", hid)):
                cells = []
                for q in QUANTILES:
                    c = mean_shift(emb, q, args.min_bandwidth if name == "prob" else 1e-3)
                    cells.append(f"{ari(c):.3f}({len(np.unique(c))})")
                print(f"    {name:6s} q={QUANTILES}: " + " ".join(cells))


if __name__ == "__main__":
    main()
