"""Unsupervised defect classes: per-defect features and mean-shift clustering, run separately per kind.

The paper (Ziatdinov et al., Fig. 2 and 6) clusters engineered features of each detected defect with
mean shift, depressions and protrusions apart, without giving a number of clusters. This module holds

* ``FEATURE_NAMES`` / ``defect_features``: the feature vector of one defect (pure function on numpy
  arrays; the pipeline calls it from post-processing, the tests and the ARI measurement on truth);
* ``row_aligned_patch``: a small patch around a defect, rotated so the dimer rows run along x;
* ``ClusterModel`` / ``cluster_defects``: standardised mean shift per kind with deterministic cluster
  ids and nearest-centre assignment of new defects;
* ``features_from_truth``: the feature rows of a simulated frame from its ground-truth footprints.

Feature scaling (documented contract, used by ``ClusterModel``): ``area_cells`` and the extents enter as
``log1p`` (sizes are scale-like and heavy-tailed), ``height_rel`` as ``arcsinh`` (signed and heavy-tailed:
gunk is tens of corrugations high); then every column is standardised per kind to zero mean and unit
standard deviation over the defects the model is fitted on, the scale floored per feature
(``SCALE_FLOORS``). Mean shift runs in that standardised space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from stm_feedback.errors import InputError
from stm_feedback.physics import KINDS

FEATURE_NAMES: tuple[str, ...] = (
    "height_rel",  # apparent height at the centre in units of the local atom corrugation (defect_features)
    "area_cells",  # footprint area / 0.295 nm^2 (one 2x1 unit cell)
    "circularity",  # 4 pi A / P^2 of the footprint contour (OpenCV), 1 = disc
    "extent_along_nm",  # footprint extent along the dimer rows (nm)
    "extent_across_nm",  # footprint extent across the dimer rows (nm)
    "peak_nm",  # signed extreme height of the footprint above the local level (nm): max, or min if mean < 0
    "fill",  # mean footprint height above the local level / peak_nm: 1 = flat-topped, small = one sharp peak
)
# the columns each kind's mean shift uses (chosen on training seeds 0-39, docs/defect-library.md):
# protrusions differ in height and shape, not size (raised-Si islands of 1-4 dimers are one class); vacancy
# classes differ in depth, shape and length along / across the rows
KIND_FEATURES: dict[str, tuple[str, ...]] = {
    "protrusion": ("peak_nm", "fill"),
    "depression": ("peak_nm", "fill", "extent_along_nm", "extent_across_nm"),
}
# columns that enter the clustering as log1p (sizes) or arcsinh (signed, heavy-tailed heights); every
# column is then z-scored per kind
LOG_FEATURES: frozenset[str] = frozenset({"area_cells", "extent_along_nm", "extent_across_nm"})
ASINH_FEATURES: frozenset[str] = frozenset({"height_rel"})
# columns that enter as tanh(value / scale): heights saturate, so tall gunk (0.25-1 nm) and raised Si
# (0.15-0.2 nm) are one "tall" class while DBs (0.1-0.15 nm) and shallow/deep pits stay apart (scale in nm)
TANH_FEATURES: dict[str, float] = {"peak_nm": 0.1}
# floor of each column's scale (after the transform) when standardising: a kind whose defects barely
# differ in a feature (or a set of 2) must not have measurement noise blown up to unit variance.
# Units: asinh(height_rel), log1p(cells), circularity, log1p(nm). No entry: floor 1e-12.
SCALE_FLOORS: dict[str, float] = {
    "height_rel": 0.1,
    "area_cells": 0.15,
    "circularity": 0.05,
    "extent_along_nm": 0.1,
    "extent_across_nm": 0.1,
    "peak_nm": 0.05,
    "fill": 0.05,
}

DEFAULT_QUANTILE = 0.2  # estimate_bandwidth quantile; best worst-kind ARI on training seeds 0-39 (docs)
MIN_BANDWIDTH = 1.0  # floor in standardised units: tiny or degenerate sets would otherwise get bandwidth 0
BANDWIDTH_RANDOM_STATE = 0
# estimate_bandwidth subsamples above this (seeded) to stay O(n) on big libraries
BANDWIDTH_MAX_SAMPLES = 2000
# above this many defects of a kind, mean shift seeds from bandwidth-sized bins, not every point (speed)
BIN_SEEDING_ABOVE = 1000


# ---------------------------------------------------------------------------------- features
def defect_features(
    image_nm: np.ndarray,
    mask: np.ndarray,
    pixel_size_nm: float,
    atoms_xy_px: np.ndarray | None = None,
    row_angle_deg: float | None = None,
    ring_nm: float = 1.2,
) -> np.ndarray:
    """Feature vector (``FEATURE_NAMES`` order, float64) of one defect.

    image_nm: (H, W) apparent height in nm; mask: (H, W) bool footprint of this one defect (its
    largest connected component is used); pixel_size_nm: nm per pixel; atoms_xy_px: (N, 2) detected atom
    centres (x_px, y_px) of the frame, optional; row_angle_deg: dimer-row direction of the terrace in
    degrees (image frame), None = 0 (then the extents are along x / along y).

    ``height_rel`` = (z_centre - z_level) / (z_atoms - z_level): z_centre is the mean height within
    0.15 nm of the footprint's centre of mass, z_level the median of a ``ring_nm`` ring around the
    footprint (the local lattice mean, so offsets and tilt cancel), z_atoms the mean height at atom
    centres near the defect (the 90th percentile of the ring if none are given). An intact atom centre
    scores 1, the lattice mean 0; depressions go negative, protrusions well above 1; NaN when the
    surroundings are flat (no height reference).

    Computed by the pipeline's own implementation, ``postprocess.blob_features``, on this one footprint
    (``postprocess.footprint_blob``): one implementation of the definitions (see there for the details),
    which tests/test_pipeline_postprocess.py checks against a straightforward per-defect reference.
    """
    from stm_feedback import postprocess as pp  # postprocess imports this module

    image_nm = np.asarray(image_nm, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if image_nm.ndim != 2 or mask.shape != image_nm.shape:
        raise InputError(f"image {image_nm.shape} and mask {mask.shape} must be the same 2-D shape")
    if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise InputError(f"pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    blob = pp.footprint_blob(mask)
    atoms = np.empty((0, 2)) if atoms_xy_px is None else np.asarray(atoms_xy_px, float).reshape(-1, 2)
    return pp.blob_features(image_nm, blob, pixel_size_nm, atoms, ring_nm, [row_angle_deg])[0]


def row_aligned_patch(
    image_nm: np.ndarray,
    x_px: float,
    y_px: float,
    pixel_size_nm: float,
    row_angle_deg: float = 0.0,
    size_px: int = 24,
    patch_pixel_size_nm: float = 0.125,
) -> np.ndarray:
    """(size_px, size_px) float32 patch centred on (x_px, y_px), resampled to ``patch_pixel_size_nm`` per
    pixel and rotated so the dimer rows run along the patch's x axis; heights in nm minus the patch median.

    Bilinear interpolation; outside the image the nearest edge value is repeated.
    """
    image = np.asarray(image_nm, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"image must be 2-D, got shape {image.shape}")
    if size_px < 2:
        raise InputError(f"size_px must be >= 2, got {size_px}")
    a = math.radians(row_angle_deg)
    s = patch_pixel_size_nm / pixel_size_nm  # image pixels per patch pixel
    c = (size_px - 1) / 2.0
    # patch (u, v) -> image (x, y):
    # x = x0 + s*((u-c) cos a - (v-c) sin a), y = y0 + s*((u-c) sin a + (v-c) cos a)
    m = np.array(
        [
            [s * math.cos(a), -s * math.sin(a), 0.0],
            [s * math.sin(a), s * math.cos(a), 0.0],
        ]
    )
    m[:, 2] = [x_px, y_px] - m[:, :2] @ np.array([c, c])
    patch = cv2.warpAffine(
        image,
        m,
        (size_px, size_px),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return (patch - np.median(patch)).astype(np.float32)


# -------------------------------------------------------------------------------- clustering
def _check_inputs(features: np.ndarray, kinds: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    k = np.asarray(kinds, dtype=object).reshape(-1)
    if x.ndim == 1 and x.size == 0:
        x = x.reshape(0, len(FEATURE_NAMES))
    if x.ndim != 2:
        raise InputError(f"features must be (N, F), got shape {x.shape}")
    if x.shape[0] != k.shape[0]:
        raise InputError(f"{x.shape[0]} feature rows but {k.shape[0]} kinds")
    if not np.all(np.isfinite(x)):
        raise InputError("features contain NaN or inf")
    bad = sorted({str(v) for v in k} - set(KINDS))
    if bad:
        raise InputError(f"unknown defect kinds {bad}; expected {list(KINDS)}")
    return x, k


def _transform(x: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    """Per-column log1p of sizes and arcsinh of signed heights (see module docstring); a copy."""
    out = x.copy()
    for j, name in enumerate(feature_names):
        if name in LOG_FEATURES:
            out[:, j] = np.log1p(np.maximum(out[:, j], 0.0))
        elif name in ASINH_FEATURES:
            out[:, j] = np.arcsinh(out[:, j])
        elif name in TANH_FEATURES:
            out[:, j] = np.tanh(out[:, j] / TANH_FEATURES[name])
    return out


@dataclass
class KindClusters:
    """Mean-shift result of one kind, in standardised feature space."""

    mean: np.ndarray  # (F,) of the transformed features
    scale: np.ndarray  # (F,)
    centres: np.ndarray  # (K, F) standardised, row k = cluster id k
    sizes: np.ndarray  # (K,) number of fitted defects per cluster
    bandwidth: float

    def standardise(self, x_transformed: np.ndarray) -> np.ndarray:
        return (x_transformed - self.mean) / self.scale

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "centres": self.centres.tolist(),
            "sizes": self.sizes.tolist(),
            "bandwidth": self.bandwidth,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KindClusters:
        f = len(d["mean"])
        return cls(
            mean=np.asarray(d["mean"], float),
            scale=np.asarray(d["scale"], float),
            centres=np.asarray(d["centres"], float).reshape(-1, f),
            sizes=np.asarray(d["sizes"], int),
            bandwidth=float(d["bandwidth"]),
        )


def _fit_kind(
    x: np.ndarray, feature_names: Sequence[str] | None, quantile: float, min_bandwidth: float
) -> tuple[KindClusters, np.ndarray]:
    """Mean shift on one kind's transformed features (N >= 1), z-scored with floored scales; with
    ``feature_names`` None the coordinates are used as they are (class probabilities of an embedding).
    Returns the model and 0-based cluster ids."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    if feature_names is None:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    else:
        mean = x.mean(axis=0)
        floors = np.array([SCALE_FLOORS.get(name, 1e-12) for name in feature_names])
        scale = np.maximum(x.std(axis=0), floors)
    z = (x - mean) / scale
    n = len(z)
    bandwidth = 0.0
    if n >= 3:
        bandwidth = float(
            estimate_bandwidth(
                z,
                quantile=quantile,
                n_samples=min(n, BANDWIDTH_MAX_SAMPLES),
                random_state=BANDWIDTH_RANDOM_STATE,
            )
        )
    bandwidth = max(bandwidth, min_bandwidth)
    if n == 1:
        raw = np.zeros(1, int)
        centres = z.copy()
    else:
        # big libraries: seed from a grid of bandwidth-sized bins instead of every point (same modes, O(bins))
        ms = MeanShift(bandwidth=bandwidth, cluster_all=True, bin_seeding=n > BIN_SEEDING_ABOVE).fit(z)
        raw = ms.labels_.astype(int)
        centres = ms.cluster_centers_
    # deterministic numbering: biggest cluster first, ties by the centre's features (lexicographic)
    k = centres.shape[0]
    sizes = np.bincount(raw, minlength=k)
    order = sorted(range(k), key=lambda i: (-sizes[i], *np.round(centres[i], 9).tolist()))
    remap = np.empty(k, int)
    remap[order] = np.arange(k)
    model = KindClusters(
        mean=mean, scale=scale, centres=centres[order], sizes=sizes[order], bandwidth=bandwidth
    )
    return model, remap[raw]


@dataclass
class ClusterModel:
    """Mean-shift clusters per kind; ``fit`` on many defects (e.g. the library), ``predict`` new ones.

    Cluster ids are per kind, 0-based, 0 = the most populated cluster of that kind. ``predict`` assigns the
    nearest centre (Euclidean, in the kind's clustering space); a kind never fitted gets -1.
    ``kind_features`` names the columns each kind is clustered on (default ``KIND_FEATURES``; a kind not
    listed, or a model without the mapping, uses every column).

    With ``embedding`` (``embedding.ClassEmbedding``, same ``feature_names``), a kind it has a network for
    is clustered on that network's class probabilities instead (not z-scored; bandwidth floor
    ``embedding.min_bandwidth``); the embedding is stored with the model, so a stored model is complete.
    """

    feature_names: tuple[str, ...] = FEATURE_NAMES
    quantile: float = DEFAULT_QUANTILE
    min_bandwidth: float = MIN_BANDWIDTH
    kinds: dict[str, KindClusters] = field(default_factory=dict)
    kind_features: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(KIND_FEATURES))
    embedding: Any = None  # embedding.ClassEmbedding | None

    def __post_init__(self) -> None:
        if self.embedding is not None and tuple(self.embedding.feature_names) != tuple(self.feature_names):
            raise InputError(
                f"the class embedding takes {list(self.embedding.feature_names)}, "
                f"the model's features are {list(self.feature_names)}"
            )

    def embedded(self, kind: str) -> bool:
        """True when ``kind`` is clustered on the embedding's class probabilities."""
        return self.embedding is not None and kind in self.embedding.kinds

    def space(self, features: np.ndarray, kind: str) -> np.ndarray:
        """(N, D) coordinates of raw feature rows of ``kind`` before the fitted standardisation: the
        embedding's class probabilities, or the kind's transformed columns."""
        if self.embedded(kind):
            return self.embedding.embed(features, kind)
        return _transform(features, self.feature_names)[:, self.columns(kind)]

    def columns(self, kind: str) -> list[int]:
        """Indices into ``feature_names`` of the columns kind ``kind`` is clustered on."""
        names = self.kind_features.get(kind)
        if not names or not set(names) <= set(self.feature_names):
            return list(range(len(self.feature_names)))
        return [self.feature_names.index(n) for n in names]

    def fit(self, features: np.ndarray, kinds: Sequence[str] | np.ndarray) -> np.ndarray:
        """Fit per kind and return the cluster ids (N,) int of the fitted defects."""
        x, k = _check_inputs(features, kinds)
        self._check_width(x)
        out = np.full(len(x), -1, dtype=int)
        self.kinds = {}
        for kind in KINDS:
            sel = k == kind
            if sel.any():
                if self.embedded(kind):
                    names, floor = None, float(self.embedding.min_bandwidth)
                else:
                    names, floor = [self.feature_names[c] for c in self.columns(kind)], self.min_bandwidth
                self.kinds[kind], out[sel] = _fit_kind(self.space(x[sel], kind), names, self.quantile, floor)
        return out

    def predict(self, features: np.ndarray, kinds: Sequence[str] | np.ndarray) -> np.ndarray:
        """Cluster ids (N,) int of new defects: nearest fitted centre of their kind, -1 if the kind is
        unknown."""
        x, k = _check_inputs(features, kinds)
        self._check_width(x)
        out = np.full(len(x), -1, dtype=int)
        for kind, kc in self.kinds.items():
            sel = k == kind
            if sel.any() and len(kc.centres):
                z = kc.standardise(self.space(x[sel], kind))
                d2 = ((z[:, None, :] - kc.centres[None, :, :]) ** 2).sum(axis=2)
                out[sel] = np.argmin(d2, axis=1)
        return out

    def standardised(self, features: np.ndarray, kind: str) -> np.ndarray:
        """(N, D) coordinates of defects of ``kind`` in the space its mean shift ran in: the embedding's
        class probabilities, or the kind's columns transformed (log1p / arcsinh / tanh) and z-scored with
        the fitted mean and floored scale. ``features`` (N, F) in ``feature_names`` order. InputError if the
        kind was never fitted."""
        if kind not in self.kinds:
            raise InputError(f"no {kind} clusters fitted")
        x = np.asarray(features, dtype=np.float64).reshape(-1, len(self.feature_names))
        return self.kinds[kind].standardise(self.space(x, kind))

    def n_clusters(self, kind: str) -> int:
        return len(self.kinds[kind].centres) if kind in self.kinds else 0

    def _check_width(self, x: np.ndarray) -> None:
        if x.shape[1] != len(self.feature_names):
            raise InputError(f"features have {x.shape[1]} columns, expected {len(self.feature_names)}")

    def to_dict(self) -> dict:
        """JSON-ready dict (numbers and strings only), inverse of ``from_dict``."""
        return {
            "feature_names": list(self.feature_names),
            "quantile": self.quantile,
            "min_bandwidth": self.min_bandwidth,
            "kind_features": {kind: list(v) for kind, v in self.kind_features.items()},
            "kinds": {kind: kc.to_dict() for kind, kc in self.kinds.items()},
            "embedding": None if self.embedding is None else self.embedding.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClusterModel:
        from stm_feedback.embedding import ClassEmbedding

        emb = d.get("embedding")  # models stored before the embedding clustered on features
        return cls(
            feature_names=tuple(d["feature_names"]),
            quantile=float(d["quantile"]),
            min_bandwidth=float(d["min_bandwidth"]),
            kinds={kind: KindClusters.from_dict(v) for kind, v in d["kinds"].items()},
            # models stored before per-kind columns were clustered on every column
            kind_features={kind: tuple(v) for kind, v in d.get("kind_features", {}).items()},
            embedding=None if emb is None else ClassEmbedding.from_dict(emb),
        )


def cluster_defects(
    features: np.ndarray,
    kinds: Sequence[str] | np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    embedding: Any = None,
) -> np.ndarray:
    """Mean-shift cluster ids (N,) int per kind for the given defects (``features`` (N, F) in
    ``FEATURE_NAMES`` order, ``kinds`` (N,) of "protrusion"/"depression"), on the embedding's class
    probabilities when one is given (``ClusterModel``). Deterministic; N = 0 gives an empty array."""
    x = np.asarray(features, dtype=np.float64)
    names = (
        FEATURE_NAMES
        if x.ndim != 2 or x.shape[1] == len(FEATURE_NAMES)
        else tuple(f"f{j}" for j in range(x.shape[1]))
    )
    kind_features = dict(KIND_FEATURES) if names == FEATURE_NAMES else {}
    model = ClusterModel(
        feature_names=names, quantile=quantile, kind_features=kind_features, embedding=embedding
    )
    return model.fit(x, kinds)


# ------------------------------------------------------------------------------------------- from truth
@dataclass
class DefectRows:
    """Per-defect arrays of one frame, ready for ``DefectLibrary.add_defects`` and clustering."""

    xy_px: np.ndarray  # (N, 2) footprint centres of mass (x_px, y_px)
    kinds: np.ndarray  # (N,) object
    features: np.ndarray  # (N, F) in FEATURE_NAMES order
    patches: np.ndarray  # (N, P, P) float32 row-aligned patches (nm)
    classes: np.ndarray  # (N,) object, true class names (simulator truth) or None
    touches_border: np.ndarray  # (N,) bool, footprint touches the frame edge (area/shape clipped)


def _close_gaps(mask: np.ndarray, pixel_size_nm: float, gap_nm: float = 0.3) -> np.ndarray:
    """The footprint with gaps up to ``gap_nm`` closed: truth footprints are per-dimer rectangles 0.6 nm
    across on a 0.768 nm row period, so a pit over two rows would otherwise be two objects (and the features
    would see only the larger); a detector's blob of it is one object."""
    r = max(1, int(math.ceil(0.5 * gap_nm / pixel_size_nm)))
    closed = ndimage.binary_closing(mask, np.ones((2 * r + 1, 2 * r + 1), bool), border_value=0)
    return closed | mask


def features_from_truth(
    image_nm: np.ndarray, truth: Any, patch_size_px: int = 24, patch_pixel_size_nm: float = 0.125
) -> DefectRows:
    """Feature rows of every defect of a simulated frame, from its truth footprints (``defect_instances``),
    the truth atom centres and the truth terrace row angle, computed with the pipeline's ``defect_features``.
    Stands in for the pipeline output while the networks are untrained (the ARI measurement, tests)."""
    inst = np.asarray(truth.defect_instances)
    atoms = np.asarray(truth.atoms_xy_px, float).reshape(-1, 2)
    angles = {t.id: t.row_angle_deg for t in truth.terraces}
    h, w = inst.shape
    objs = ndimage.find_objects(inst)
    rows: dict[str, list] = {k: [] for k in ("xy", "kind", "f", "patch", "cls", "border")}
    for d in truth.defects:
        if d.id > len(objs) or objs[d.id - 1] is None:
            continue  # placed just outside the frame
        sl = objs[d.id - 1]
        # crop with a margin so the features' ring fits, then shift coordinates back
        pad = int(math.ceil(2.5 / truth.pixel_size_nm))
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        mask = _close_gaps(inst[y0:y1, x0:x1] == d.id, truth.pixel_size_nm)
        angle = angles.get(d.terrace, 0.0)
        f = defect_features(image_nm[y0:y1, x0:x1], mask, truth.pixel_size_nm, atoms - [x0, y0], angle)
        cy, cx = ndimage.center_of_mass(mask)
        x_px, y_px = cx + x0, cy + y0
        rows["xy"].append((x_px, y_px))
        rows["kind"].append(d.kind)
        rows["f"].append(f)
        rows["patch"].append(
            row_aligned_patch(
                image_nm, x_px, y_px, truth.pixel_size_nm, angle, patch_size_px, patch_pixel_size_nm
            )
        )
        rows["cls"].append(d.cls)
        rows["border"].append(sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w)
    n = len(rows["xy"])
    return DefectRows(
        xy_px=np.array(rows["xy"], float).reshape(n, 2),
        kinds=np.array(rows["kind"], dtype=object),
        features=np.array(rows["f"], float).reshape(n, len(FEATURE_NAMES)),
        patches=np.array(rows["patch"], np.float32).reshape(n, patch_size_px, patch_size_px),
        classes=np.array(rows["cls"], dtype=object),
        touches_border=np.array(rows["border"], bool),
    )
