"""How separable are the simulator's defect classes in a library's features? Per kind: the median features of
each true class, the contingency of the stored mean-shift clusters against the true classes, their ARI, and a
supervised ceiling: the ARI of out-of-fold predictions of a random forest (5-fold, stratified, 200 trees,
balanced) on the kind's clustering columns and on every feature.

    stm-feedback library add-sim --suite realistic --n 30 --detections nets --db /tmp/nets30.sqlite
    stm-feedback library cluster --db /tmp/nets30.sqlite
    .venv/bin/python benchmarks/class_separability.py /tmp/nets30.sqlite

Only defects with a true label (simulated frames; a network detection matched to a truth defect) and all
features defined are used. Mean shift cannot beat the supervised ceiling on the same columns, so a kind whose
ceiling is near the 0.7 target needs better features, not a better bandwidth.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from stm_feedback.classify import FEATURE_NAMES, ClusterModel
from stm_feedback.library import DefectLibrary
from stm_feedback.physics import KINDS


def _oof_ari(x: np.ndarray, y: np.ndarray) -> float:
    """ARI of 5-fold out-of-fold random-forest predictions against y (folds capped by the smallest class)."""
    folds = int(min(5, np.unique(y, return_counts=True)[1].min()))
    if folds < 2:
        return float("nan")
    rf = RandomForestClassifier(200, class_weight="balanced", random_state=0)
    pred = cross_val_predict(rf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    return float(adjusted_rand_score(y, pred))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", help="library file with true labels (stm-feedback library add-sim)")
    args = ap.parse_args()
    with DefectLibrary(args.db) as lib:
        recs = [r for r in lib.defects() if r.true_label and np.all(np.isfinite(r.features))]
    cols_of = ClusterModel()
    for kind in KINDS:
        sub = [r for r in recs if r.kind == kind]
        if not sub:
            continue
        x = np.array([r.features for r in sub])
        y = np.array([r.true_label for r in sub], dtype=object)
        cl = np.array([r.cluster for r in sub])
        classes = sorted(set(y))
        print(f"\n{kind}s: {len(sub)} with a true label")
        print(f"{'class':<16}{'n':>5} " + " ".join(f"{n[:11]:>11}" for n in FEATURE_NAMES))
        for c in classes:
            m = y == c
            print(f"{c:<16}{m.sum():>5} " + " ".join(f"{v:>11.3f}" for v in np.median(x[m], axis=0)))
        ids = sorted(set(cl.tolist()))
        print(f"{'cluster':<16}" + "".join(f"{i:>6}" for i in ids))
        for c in classes:
            print(f"{c:<16}" + "".join(f"{np.sum((y == c) & (cl == i)):>6}" for i in ids))
        cols = cols_of.columns(kind)
        names = ", ".join(FEATURE_NAMES[j] for j in cols)
        print(f"mean-shift ARI (stored clusters): {adjusted_rand_score(y, cl):.3f}")
        print(f"supervised ceiling, RF out-of-fold ARI on ({names}): {_oof_ari(x[:, cols], y):.3f}")
        n_all = len(FEATURE_NAMES)
        print(f"supervised ceiling, RF out-of-fold ARI on all {n_all} features: {_oof_ari(x, y):.3f}")


if __name__ == "__main__":
    main()
