"""Learned space for the mean-shift defect classes: a small MLP per kind whose class probabilities are the
coordinates mean shift clusters in.

Why: on the engineered features (``classify.KIND_FEATURES``) the simulated protrusion classes overlap
(``db_single`` is a shoulder between the adatoms and ``db_pair``, not a mode), so mean shift reached ARI
~0.6 while a supervised model on the same columns reached ~0.9 (docs/defect-library.md). An MLP fitted on
labelled defects (simulator truth, or an expert's labels) maps each defect to class probabilities; there the
classes sit near the corners of a simplex, mean shift finds them as modes, and how many modes a library
holds is still its own (no number of clusters is given). Defects the MLP cannot place fall between corners
and form small clusters of their own.

* ``KindEmbedding``: one kind's network (numpy forward; weights from scikit-learn's ``MLPClassifier``).
* ``ClassEmbedding``: the per-kind networks, JSON round trip (``to_dict``/``from_dict``, ``save``/``load``).
* ``fit_embedding``: train it from feature rows and labels.

Inputs are raw feature rows in ``classify.FEATURE_NAMES`` order (units there); they are transformed as
``classify`` transforms them (log1p sizes, arcsinh relative height, tanh peak) and z-scored with the
training set's mean and standard deviation before the network.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.classify import FEATURE_NAMES, _transform
from stm_feedback.errors import InputError, ModelError

SCHEMA = "stm-feedback.class-embedding/1"
EMBEDDING_FILE = "defect_embedding.json"  # in the models directory
# mean-shift clusters fitted in the embedding on the same training rows: the daemon's classes before a
# library has its own (library.default_clusters)
CLUSTERS_FILE = "defect_clusters.json"
# classes with fewer than this fraction of a kind's labelled defects are left out of training: a pit
# matched to a protrusion detection is matching noise, not a protrusion class
MIN_CLASS_FRACTION = 0.02
# bandwidth floor of mean shift in probability units: defects whose class probabilities differ by less are
# one mode (corners of the simplex are sqrt(2) apart). Picked while looking at the realistic suite's
# exports (benchmarks/class_embedding.py --min-bandwidth): it mostly sets how many small clusters the
# in-between defects form; every floor 0.2-0.4, and none, kept the suite ARI >= 0.74 (docs/defect-library.md)
MIN_BANDWIDTH = 0.3


@dataclass(frozen=True)
class KindEmbedding:
    """The network of one kind: z = (transform(x) - mean) / scale, relu hidden layers, softmax output."""

    classes: tuple[str, ...]  # output order
    mean: np.ndarray  # (F,) of the transformed features
    scale: np.ndarray  # (F,)
    weights: tuple[np.ndarray, ...]  # layer l: (in, out)
    biases: tuple[np.ndarray, ...]  # layer l: (out,)

    def probabilities(self, x_transformed: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities of (N, F) transformed feature rows."""
        a = (x_transformed - self.mean) / self.scale
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            a = a @ w + b
            if i < last:
                a = np.maximum(a, 0.0)
        if a.shape[1] == 1:  # scikit-learn's binary case: one logistic output for classes[1]
            p1 = 1.0 / (1.0 + np.exp(-a[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        a = a - a.max(axis=1, keepdims=True)
        e = np.exp(a)
        return e / e.sum(axis=1, keepdims=True)

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": [w.tolist() for w in self.weights],
            "biases": [b.tolist() for b in self.biases],
        }

    @classmethod
    def from_dict(cls, d: dict) -> KindEmbedding:
        weights = tuple(np.asarray(w, float) for w in d["weights"])
        biases = tuple(np.asarray(b, float) for b in d["biases"])
        mean, scale = np.asarray(d["mean"], float), np.asarray(d["scale"], float)
        dims = [mean.shape[0]] + [w.shape[1] for w in weights]
        ok = (
            len(weights) == len(biases) >= 1
            and mean.shape == scale.shape
            and all(w.ndim == 2 and w.shape[0] == dims[i] for i, w in enumerate(weights))
            and all(b.shape == (w.shape[1],) for w, b in zip(weights, biases, strict=True))
            and dims[-1] in (len(d["classes"]), 1)
            and np.all(scale > 0)
        )
        if not ok:
            raise InputError("class embedding: inconsistent layer shapes")
        return cls(tuple(d["classes"]), mean, scale, weights, biases)


@dataclass
class ClassEmbedding:
    """Per-kind networks mapping feature rows (``feature_names`` order) to class probabilities."""

    kinds: dict[str, KindEmbedding]
    feature_names: tuple[str, ...] = FEATURE_NAMES
    min_bandwidth: float = MIN_BANDWIDTH
    meta: dict[str, Any] = field(default_factory=dict)

    def embed(self, features: np.ndarray, kind: str) -> np.ndarray:
        """(N, C_kind) class probabilities of (N, F) raw feature rows of defects of ``kind``."""
        if kind not in self.kinds:
            raise InputError(f"the class embedding has no {kind} network")
        x = np.asarray(features, dtype=np.float64).reshape(-1, len(self.feature_names))
        return self.kinds[kind].probabilities(_transform(x, self.feature_names))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "feature_names": list(self.feature_names),
            "min_bandwidth": self.min_bandwidth,
            "meta": self.meta,
            "kinds": {kind: ke.to_dict() for kind, ke in self.kinds.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassEmbedding:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise InputError(f"class embedding: expected schema {SCHEMA!r}, got {got!r}")
        try:
            names = tuple(d["feature_names"])
            kinds = {kind: KindEmbedding.from_dict(v) for kind, v in d["kinds"].items()}
            bw = float(d["min_bandwidth"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"class embedding: malformed ({exc!r})") from exc
        if any(ke.mean.shape[0] != len(names) for ke in kinds.values()):
            raise InputError("class embedding: input width differs from feature_names")
        return cls(kinds=kinds, feature_names=names, min_bandwidth=bw, meta=dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassEmbedding:
        """Read a saved embedding; ModelError when the file is missing or unreadable."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the class embedding {path}: {exc}") from exc
        try:
            return cls.from_dict(d)
        except InputError as exc:
            raise ModelError(f"{path}: {exc}") from exc


def fit_embedding(
    features: np.ndarray,
    kinds: Sequence[str] | np.ndarray,
    labels: Sequence[str | None] | np.ndarray,
    hidden: Sequence[int] = (32, 16),
    alpha: float = 1e-3,
    seed: int = 0,
    feature_names: Sequence[str] = FEATURE_NAMES,
    meta: dict[str, Any] | None = None,
) -> ClassEmbedding:
    """Fit one MLP per kind (scikit-learn ``MLPClassifier``: relu, adam, L2 ``alpha``, ``random_state``
    ``seed``) on the labelled rows (label not None/empty) and return the embedding.

    features (N, F) raw rows in ``feature_names`` order, all finite; kinds (N,); labels (N,). Classes with
    fewer than ``MIN_CLASS_FRACTION`` of a kind's labelled rows are dropped; a kind left with fewer than two
    classes gets no network (it is clustered on its features). InputError on bad shapes or no usable kind.
    """
    from sklearn.neural_network import MLPClassifier

    x = np.asarray(features, dtype=np.float64)
    names = tuple(feature_names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise InputError(f"features must be (N, {len(names)}), got {x.shape}")
    k = np.asarray(kinds, dtype=object).reshape(-1)
    y = np.array(["" if v is None else str(v) for v in labels], dtype=object)
    if not (len(k) == len(y) == len(x)):
        raise InputError(f"{len(x)} feature rows, {len(k)} kinds, {len(y)} labels")
    if not np.all(np.isfinite(x)):
        raise InputError("features contain NaN or inf")
    xt = _transform(x, names)
    out: dict[str, KindEmbedding] = {}
    counts: dict[str, dict[str, int]] = {}
    for kind in sorted(set(k.tolist())):
        sel = (k == kind) & (y != "")
        classes, n_per = np.unique(y[sel].astype(str), return_counts=True)
        keep = classes[n_per >= MIN_CLASS_FRACTION * n_per.sum()]
        sel &= np.isin(y, keep)
        if len(keep) < 2:
            continue
        mean = xt[sel].mean(axis=0)
        scale = np.maximum(xt[sel].std(axis=0), 1e-9)
        mlp = MLPClassifier(tuple(hidden), alpha=alpha, max_iter=2000, random_state=seed)
        mlp.fit((xt[sel] - mean) / scale, y[sel].astype(str))
        out[kind] = KindEmbedding(
            classes=tuple(str(c) for c in mlp.classes_),
            mean=mean,
            scale=scale,
            weights=tuple(np.asarray(w, float) for w in mlp.coefs_),
            biases=tuple(np.asarray(b, float) for b in mlp.intercepts_),
        )
        counts[kind] = {str(c): int(n) for c, n in zip(classes, n_per, strict=True) if c in keep}
    if not out:
        raise InputError("no kind has two or more labelled classes to learn")
    info = {"hidden": list(hidden), "alpha": alpha, "seed": seed, "n_train": counts}
    return ClassEmbedding(kinds=out, feature_names=names, meta={**info, **(meta or {})})


def embedding_for(settings: Any) -> ClassEmbedding | None:
    """The embedding the settings ask for: ``<models.models_dir>/defect_embedding.json`` when
    ``library.cluster_space`` is "embedding" (ModelError when that file is missing), else None."""
    if settings.library.cluster_space != "embedding":
        return None
    path = Path(settings.models.models_dir) / EMBEDDING_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise ModelError(f"no class embedding at {path} (library.cluster_space = 'embedding')") from exc
    return _load_cached(str(path), stamp)


def default_cluster_model(settings: Any) -> Any:
    """The shipped cluster model (``classify.ClusterModel``, with its embedding) at
    ``<models.models_dir>/defect_clusters.json`` when ``library.default_clusters`` is on and the file exists,
    else None; ModelError when the file is unreadable."""
    from stm_feedback.classify import ClusterModel

    path = Path(settings.models.models_dir) / CLUSTERS_FILE
    if not settings.library.default_clusters or not path.exists():
        return None
    try:
        return ClusterModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, InputError) as exc:
        raise ModelError(f"cannot read the cluster model {path}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> ClassEmbedding:
    # keyed by modification time: a rewritten file is read again (the model is treated as read-only)
    return ClassEmbedding.load(path)
