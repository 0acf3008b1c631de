"""The public analysis contract, schema ``stm-feedback.analysis/1`` (see docs/analysis-schema.md).

Pixel coordinates are in the *input* image: x = column, y = row, (0, 0) = centre of the top-left pixel.
Angles are degrees in the image frame (x right, y down), modulo 180. Lengths carry their unit in the name.
Plain dataclasses (no validation in the hot path); ``to_json_dict``/``from_json_dict`` are the JSON boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA = "stm-feedback.analysis/1"


@dataclass
class ImageInfo:
    height_px: int
    width_px: int
    pixel_size_nm: float
    bias_v: float | None = None
    frame_id: str | None = None


@dataclass
class Atom:
    x_px: float
    y_px: float
    terrace: int  # terrace id, -1 if on a step edge / unknown
    score: float  # network probability at the peak, 0..1


@dataclass
class Dimer:
    x_px: float
    y_px: float
    terrace: int
    row: int = -1  # row index within the terrace (by phase), -1 unknown


@dataclass
class Defect:
    x_px: float
    y_px: float
    kind: str  # "protrusion" | "depression"
    cluster: int  # mean-shift cluster id within its kind (-1 = unclustered)
    label: str  # class name (expert-trained classifier) or "<kind>-<cluster>"
    area_nm2: float
    height_rel: float  # apparent height at the centre / mean height of nearby atom centres (see postprocess)
    circularity: float  # 4 pi A / P^2
    must_avoid: bool
    terrace: int = -1
    area_cells: float = 0.0  # area in 2x1 unit cells (0.295 nm^2)
    score: float = 0.0


@dataclass
class Terrace:
    id: int
    row_angle_deg: float  # direction of the dimer rows, modulo 180
    row_phase_nm: float  # row centre lines: p . n == phase (mod 0.768 nm), n = (-sin a, cos a)
    area_nm2: float = 0.0
    n_atoms: int = 0
    fft_row_angle_deg: float | None = None  # cross-check from the Fourier transform
    fit_residual_nm: float | None = None
    # the rows' angle with the scan's drift shear removed (lattice.undistorted_row_angle_deg); None = not
    # measurable (few atoms, creep). row_angle_deg/row_phase_nm stay the image-frame rows.
    row_angle_undistorted_deg: float | None = None


@dataclass
class Site:
    center_x_px: float
    center_y_px: float
    dimers: list[list[float]]  # [[x_px, y_px], ...]
    terrace: int
    clearance_nm: float  # distance to the nearest must-avoid object (defect margin-free or step edge)
    pattern: str = "3x1"
    score: float = 0.0


@dataclass
class Quality:
    atomically_resolved: bool = True
    resolved_fraction: float = 1.0
    tip_change_lines: list[int] = field(default_factory=list)
    double_tip_suspected: bool = False
    notes: list[str] = field(default_factory=list)
    # contrast the frame was analysed in: "filled" (rows bright, bias < 0) or "empty" (rows dark, bias > 0),
    # and where that came from: "bias" (given), "estimated" (from the frame), "assumed" (no bias, no estimate)
    polarity: str = "filled"
    polarity_source: str = "assumed"
    # rms of the scan-line offsets removed before the analysis (px along x; jitter.py); 0 = not corrected
    line_jitter_rms_px: float = 0.0


@dataclass
class Analysis:
    """Everything the pipeline returns for one frame. ``terrace_labels``/``safe_mask`` are the npz maps."""

    image: ImageInfo
    atoms: list[Atom] = field(default_factory=list)
    dimers: list[Dimer] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)
    terraces: list[Terrace] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    quality: Quality = field(default_factory=Quality)
    terrace_labels: np.ndarray | None = None  # (H, W) int32, -1 = step edge or unknown
    safe_mask: np.ndarray | None = None  # (H, W) bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    # (N defects, len(classify.FEATURE_NAMES)) float64, NaN = undefined: the full feature vectors behind the
    # defects' JSON features, for the defect library; not part of the JSON contract
    defect_features: np.ndarray | None = None
    # terrace id -> image-frame row wave vectors (k1 across, k2 along the rows; cycles/nm, (2,) each) of the
    # lattice fit (lattice.row_wavevectors), reused by the scan-line jitter estimate; not part of the contract
    terrace_wavevectors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    # ---- atoms and dimers built on first access (issue 6: ~6500 instances per frame cost ~1.8 ms, and the
    # daemon only needs their JSON rows, which ``json_rows`` builds from the columns directly)

    @classmethod
    def with_lazy_rows(
        cls, atoms: tuple[Any, Any, Any, Any], dimers: tuple[Any, Any, Any, Any], **kwargs: Any
    ) -> Analysis:
        """An Analysis whose ``atoms`` / ``dimers`` are given as columns in field order (x_px, y_px,
        terrace, score / row), each a list of Python scalars or a 1-D numpy array (float columns of a float
        dtype, int columns of an integer dtype: ``tolist()`` gives the Python values), and become ``Atom`` /
        ``Dimer`` lists on first access; equal to ``Analysis(atoms=[Atom(*r) for r in
        zip(*[list(c) for c in atoms])], ...)`` with Python scalars, in every respect."""
        a = cls(**kwargs)
        del a.atoms, a.dimers
        a.__dict__["_lazy_rows"] = {"atoms": (Atom, atoms), "dimers": (Dimer, dimers)}
        return a

    def __getattr__(self, name: str) -> Any:
        # only reached when ``name`` is not an instance attribute: an unbuilt lazy list
        lazy = self.__dict__.get("_lazy_rows")
        if lazy is None or name not in lazy:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        row_cls, cols = lazy[name]
        objs = list(map(row_cls, *_python_columns(cols)))
        self.__dict__[name] = objs
        # a new dict, not ``pop``: a shallow copy of this Analysis shares the old one
        self.__dict__["_lazy_rows"] = {k: v for k, v in lazy.items() if k != name}
        return objs

    def lazy_columns(self, name: str) -> tuple[Any, Any, Any, Any] | None:
        """The columns (x_px, y_px, terrace, score / row) of "atoms" / "dimers" as given to
        ``with_lazy_rows`` (lists or numpy arrays) while their objects are not built yet, else None. They
        are shared: read them, do not change them."""
        lazy = self.__dict__.get("_lazy_rows")
        if lazy is None or name not in lazy or name in self.__dict__:
            return None
        return lazy[name][1]

    def json_rows(self, name: str) -> list[dict[str, Any]] | None:
        """``[asdict(o) for o in getattr(self, name)]`` for "atoms" / "dimers" while they are still
        columns (without building the objects), else None."""
        lazy = self.__dict__.get("_lazy_rows")
        if lazy is None or name not in lazy or name in self.__dict__:
            return None
        row_cls, cols = lazy[name]
        xs, ys, ts, vs = _python_columns(cols)
        if row_cls is Atom:
            return [
                {"x_px": x, "y_px": y, "terrace": t, "score": v}
                for x, y, t, v in zip(xs, ys, ts, vs, strict=True)
            ]
        return [
            {"x_px": x, "y_px": y, "terrace": t, "row": v} for x, y, t, v in zip(xs, ys, ts, vs, strict=True)
        ]

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict of schema ``stm-feedback.analysis/1`` (maps excluded: they go to the npz)."""
        return {
            "schema": SCHEMA,
            "image": asdict(self.image),
            "atoms": [asdict(a) for a in self.atoms],
            "dimers": [asdict(d) for d in self.dimers],
            "defects": [asdict(d) for d in self.defects],
            "terraces": [asdict(t) for t in self.terraces],
            "sites": [asdict(s) for s in self.sites],
            "quality": asdict(self.quality),
            "timings_ms": dict(self.timings_ms),
            "models": dict(self.models),
        }

    def maps(self) -> dict[str, np.ndarray]:
        """The npz payload: ``terrace_labels`` (int32) and ``safe_mask`` (bool), both (H, W)."""
        h, w = self.image.height_px, self.image.width_px
        labels = self.terrace_labels if self.terrace_labels is not None else np.full((h, w), -1, np.int32)
        safe = self.safe_mask if self.safe_mask is not None else np.zeros((h, w), bool)
        return {
            "terrace_labels": labels.astype(np.int32, copy=False),
            "safe_mask": safe.astype(bool, copy=False),
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], maps: dict[str, np.ndarray] | None = None) -> Analysis:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unsupported analysis schema {d.get('schema')!r}; expected {SCHEMA!r}")
        maps = maps or {}
        return cls(
            image=ImageInfo(**d["image"]),
            atoms=[Atom(**a) for a in d.get("atoms", [])],
            dimers=[Dimer(**x) for x in d.get("dimers", [])],
            defects=[Defect(**x) for x in d.get("defects", [])],
            terraces=[Terrace(**x) for x in d.get("terraces", [])],
            sites=[Site(**x) for x in d.get("sites", [])],
            quality=Quality(**d.get("quality", {})),
            terrace_labels=maps.get("terrace_labels"),
            safe_mask=maps.get("safe_mask"),
            timings_ms=dict(d.get("timings_ms", {})),
            models=dict(d.get("models", {})),
        )


def _python_columns(cols: tuple[Any, ...]) -> list[Any]:
    """Lazy-row columns as lists of Python scalars (numpy arrays through ``tolist``)."""
    return [c.tolist() if isinstance(c, np.ndarray) else c for c in cols]
