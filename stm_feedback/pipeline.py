"""The analysis pipeline: frame -> network maps -> terraces, atoms, lattice, dimers, defects, classes, sites.

``Pipeline`` holds only state (settings, the model runner, an optional defect library and its models); the
science is in pure functions (postprocess.py, lattice.py, planner.py, quality.py). ``analyze_maps`` runs the
post-processing alone on given ``NetworkMaps`` (oracle maps in tests, or maps computed elsewhere).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stm_feedback import postprocess as pp
from stm_feedback.classify import FEATURE_NAMES
from stm_feedback.config import Settings, load_settings
from stm_feedback.embedding import default_cluster_model
from stm_feedback.errors import InputError, ModelError
from stm_feedback.jitter import estimate_line_jitter, shift_lines, unshift_map, unshift_x
from stm_feedback.lattice import (
    LatticeFit,
    bond_prior_deg,
    fft_row_angle_deg,
    fit_row_lattice,
    local_fit_tiles,
    row_index,
    row_wavevectors,
    undistorted_angle_from_wavevectors,
)
from stm_feedback.maps import NetworkMaps
from stm_feedback.planner import (
    HOLE_TOL_NM,
    clearance_maps,
    defect_rule,
    lattice_anomalies,
    lattice_holes,
    near_mask,
    orientation_band,
    propose_sites,
    step_continuations,
    suspect_dimers,
)
from stm_feedback.quality import assess, double_tip_pairs, ghost_copies
from stm_feedback.schema import Analysis, Defect, ImageInfo, Site, Terrace

FEATURE_NAMES_USED = ("height_rel", "area_cells", "circularity")
MIN_PIXEL_SIZE_NM = 0.005
MAX_PIXEL_SIZE_NM = 2.0


def check_frame(image: Any, pixel_size_nm: Any, bias_v: Any = None) -> tuple[np.ndarray, float, float | None]:
    """Validate the public inputs; return (image float32 (H, W), pixel_size_nm, bias_v). Raises InputError."""
    img = pp.check_map("image", image)
    try:
        s = float(pixel_size_nm)
    except (TypeError, ValueError) as exc:
        raise InputError(f"pixel_size_nm must be a number, got {pixel_size_nm!r}") from exc
    if not (math.isfinite(s) and MIN_PIXEL_SIZE_NM <= s <= MAX_PIXEL_SIZE_NM):
        raise InputError(f"pixel_size_nm must be in [{MIN_PIXEL_SIZE_NM}, {MAX_PIXEL_SIZE_NM}] nm, got {s!r}")
    b: float | None = None
    if bias_v is not None:
        try:
            b = float(bias_v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"bias_v must be a number or None, got {bias_v!r}") from exc
        if not math.isfinite(b):
            raise InputError(f"bias_v must be finite, got {b!r}")
    return img, s, b


class _Timer:
    """Collects wall-clock milliseconds per named stage."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.ms[name] = round(self.ms.get(name, 0.0) + (t - self._t) * 1e3, 3)
        self._t = t


class Pipeline:
    """Analysis of single frames. ``runner``: anything with ``predict(image, pixel_size_nm, bias_v) ->
    NetworkMaps`` (built from ``settings.models`` on first use when None); ``library``: an optional
    ``DefectLibrary`` whose stored cluster model and supervised classifier name the defects; ``recorder``:
    an optional ``library.LibraryRecorder`` that receives every analysed frame (queued, written on its own
    thread; the daemon attaches one when ``settings.library.record`` is on)."""

    def __init__(
        self,
        settings: Settings | None = None,
        runner: Any = None,
        library: Any = None,
        params: pp.PostprocessParams | None = None,
        recorder: Any = None,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        self._runner = runner
        self.library = library
        self.recorder = recorder
        self.params = params or pp.PostprocessParams.with_overrides(self.settings.postprocess)
        self._lock = threading.Lock()
        # clusters of the shipped model until a library brings its own (library.default_clusters)
        self._default_clusters = default_cluster_model(self.settings)
        self._cluster_model = self._default_clusters
        self._classifier = None
        if library is not None:
            self.use_library(library)

    def use_library(self, library: Any) -> None:
        """Name defects with ``library``'s stored cluster model and expert-trained classifier (either may be
        missing: then clusters/labels fall back as without a library, clusters to the shipped model). Read
        once, here: call again after ``stm-feedback library cluster|train`` to pick up new models."""
        self.library = library
        self._cluster_model = library.cluster_model() or self._default_clusters
        self._classifier = library.classifier()

    @property
    def runner(self) -> Any:
        """The model runner, loaded once (ModelError when weights are missing)."""
        with self._lock:
            if self._runner is None:
                try:
                    from stm_feedback.runner import ModelRunner
                except ImportError as exc:  # the networks subsystem is not installed in this tree
                    raise ModelError(f"no model runner available: {exc}") from exc
                self._runner = ModelRunner.from_settings(self.settings.models)
            return self._runner

    def models(self) -> dict[str, str]:
        """Model versions for ``Analysis.models``: runner versions, the classifier version if any, and
        ``defect_clusters`` ("shipped" / "library") when cluster ids come from a cluster model."""
        out: dict[str, str] = {}
        if self._runner is not None and hasattr(self._runner, "versions"):
            out.update({str(k): str(v) for k, v in self._runner.versions().items()})
        if self._classifier is not None:
            out["defect_classifier"] = str(self._classifier.version)
        if self._cluster_model is not None:  # whose mean-shift clusters the defects' ids are
            out["defect_clusters"] = "shipped" if self._cluster_model is self._default_clusters else "library"
        return out

    def analyze(
        self, image: Any, pixel_size_nm: float, bias_v: float | None = None, frame_id: str | None = None
    ) -> Analysis:
        """Full analysis of one frame (networks + post-processing). Positions in the input image's pixels."""
        img, s, b = check_frame(image, pixel_size_nm, bias_v)
        t0 = time.perf_counter()
        maps = self.runner.predict(img, s, bias_v=b)
        nets_ms = (time.perf_counter() - t0) * 1e3
        out = self._postprocess(img, maps, s, b, frame_id)
        out.timings_ms = {"networks": round(nets_ms, 3), **out.timings_ms}
        out.timings_ms["total"] = round(out.timings_ms["total"] + nets_ms, 3)
        if self.params.line_jitter_correction:
            out = self._correct_line_jitter(img, maps, out, s, b, frame_id)
        self._record(img, out, frame_id)
        return out

    def analyze_maps(
        self,
        image: Any,
        maps: NetworkMaps,
        pixel_size_nm: float,
        bias_v: float | None = None,
        frame_id: str | None = None,
    ) -> Analysis:
        """Post-processing only: objects and plan from ``maps`` (all on the image's grid)."""
        img, s, b = check_frame(image, pixel_size_nm, bias_v)
        out = self._postprocess(img, maps, s, b, frame_id)
        self._record(img, out, frame_id)
        return out

    def _postprocess(
        self, img: np.ndarray, maps: NetworkMaps, s: float, b: float | None, frame_id: str | None
    ) -> Analysis:
        return postprocess_maps(
            img,
            maps,
            s,
            b,
            frame_id,
            self.settings,
            self.params,
            self._cluster_model,
            self._classifier,
            self.models(),
        )

    def _record(self, img: np.ndarray, out: Analysis, frame_id: str | None) -> None:
        if self.recorder is not None:  # enqueue only: patches and SQLite run on the recorder's thread
            self.recorder.submit(img, out, frame_id)

    def _correct_line_jitter(
        self,
        img: np.ndarray,
        maps: NetworkMaps,
        out: Analysis,
        s: float,
        b: float | None,
        frame_id: str | None,
    ) -> Analysis:
        """``out``, or (``merge_jitter_corrected``) the lattice of the image with its scan-line jitter
        removed (jitter.py), moved back onto the recorded image, when the lines are measurably displaced
        (``line_jitter_min_gain``) and NN-1 then sees the atoms more clearly: mean atom score higher by
        ``line_jitter_min_score_gain`` (relative). The extra time is the ``line_jitter`` stage."""
        p = self.params
        runner = self.runner
        if not hasattr(runner, "predict_moved_lines"):  # stand-ins (tests, baseline maps): no second pass
            return out
        t0 = time.perf_counter()
        xy, ter, score = _atom_columns(out)
        est = estimate_line_jitter(
            maps.image_norm,
            out.terrace_labels if out.terrace_labels is not None else np.full(img.shape, -1, np.int32),
            xy,
            ter,
            {t.id: t.row_angle_deg for t in out.terraces},
            s,
            wavevectors_per_nm=out.terrace_wavevectors,
            max_offset_px=p.line_jitter_max_px,
            prior=p.line_jitter_prior,
            stop_below_gain=p.line_jitter_min_gain,
        )
        corrected = None
        # whole pixels: a line moved by an integer is the recorded line, exactly (no interpolation), so the
        # analysis maps back without error (positions, labels and safe mask alike); the sub-pixel rest
        # (<= 0.5 px) stays in the image as residual jitter
        shift = np.rint(est.offsets_px)
        if est.gain >= p.line_jitter_min_gain and shift.any():
            img2 = shift_lines(img, shift)
            out2 = self._postprocess(img2, runner.predict_moved_lines(maps, shift), s, b, frame_id)
            score2 = _atom_columns(out2)[2]
            mean1 = float(score.mean()) if len(score) else 0.0
            if len(score2) and float(score2.mean()) > mean1 * (1.0 + p.line_jitter_min_score_gain):
                back = unshift_analysis(out2, shift, s)
                corrected = merge_jitter_corrected(out, back, self.settings.planner)
                rms = float(np.sqrt(np.mean(shift**2)))
                corrected.quality.line_jitter_rms_px = round(rms, 3)
                corrected.quality.notes.append(
                    "scan-line jitter removed before the analysis (lines moved by whole pixels, rms "
                    f"{rms:.2f} px)"
                )
        res = corrected if corrected is not None else out
        ms = (time.perf_counter() - t0) * 1e3
        res.timings_ms["line_jitter"] = round(ms, 3)
        res.timings_ms["total"] = round(res.timings_ms["total"] + ms, 3)
        return res


def _check_maps(maps: NetworkMaps, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    if not isinstance(maps, NetworkMaps):
        raise InputError(f"maps must be NetworkMaps, got {type(maps).__name__}")
    return {
        name: pp.check_map(name, getattr(maps, name), shape)
        for name in ("step_prob", "atom_prob", "protrusion_prob", "depression_prob")
    }


def _with_partners(
    atoms_xy: np.ndarray,
    atoms_score: np.ndarray,
    atom_ter: np.ndarray,
    single_atom: np.ndarray,
    single_centre_px: np.ndarray,
    atom_prob: np.ndarray,
    min_prob: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms plus the missing partner of each dimer seen by one atom only: ``single_atom`` (K,) atom indices,
    ``single_centre_px`` (K, 2) their dimer centres (x_px, y_px); the partner is the atom mirrored through the
    centre (the dimer bond is straight across the row), kept inside the frame where ``atom_prob`` >= min_prob;
    its score is that probability."""
    h, w = atom_prob.shape
    part = 2.0 * single_centre_px - atoms_xy[single_atom]
    c = np.rint(part[:, 0]).astype(np.int64)
    r = np.rint(part[:, 1]).astype(np.int64)
    inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    prob = np.zeros(len(part))
    prob[inside] = atom_prob[r[inside], c[inside]]
    keep = inside & (prob >= min_prob)
    return (
        np.concatenate([atoms_xy, part[keep]]),
        np.concatenate([atoms_score, prob[keep]]),
        np.concatenate([atom_ter, atom_ter[single_atom[keep]]]),
    )


def _atom_terraces(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray, reach_px: float) -> np.ndarray:
    """Terrace id of each atom pixel: its own label, or for atoms in the step band (label -1) the nearest
    terrace within ``reach_px`` (pp.nearest_label), else -1."""
    ter = labels[rows, cols]
    off = ter < 0
    if off.any():
        ter[off] = pp.nearest_label(labels, rows[off], cols[off], reach_px)
    return ter


def postprocess_maps(
    img: np.ndarray,
    maps: NetworkMaps,
    s: float,
    b: float | None,
    frame_id: str | None,
    settings: Settings,
    params: pp.PostprocessParams,
    cluster_model: Any = None,
    classifier: Any = None,
    models: dict[str, str] | None = None,
) -> Analysis:
    """The post-processing chain (see module docstring); pure apart from timing."""
    tm = _Timer()
    m = _check_maps(maps, img.shape)
    h, w = img.shape
    ps = settings.planner

    # 1. terraces
    labels, step = pp.segment_terraces(
        m["step_prob"],
        s,
        params.step_threshold,
        params.min_terrace_area_nm2,
        params.step_gap_close_nm,
        params.min_border_terrace_area_nm2,
    )
    if params.defect_terrace_max_nm2 > 0:  # a defect ringed by false step pixels is not a terrace
        labels = pp.drop_defect_terraces(
            labels,
            m["protrusion_prob"],
            m["depression_prob"],
            s,
            params.defect_terrace_max_nm2,
            params.defect_terrace_min_fraction,
        )
    tm.lap("terraces")

    # 2. atoms, restricted to terraces (the paper's per-terrace sub-images)
    on_terrace = labels >= 0
    valid = on_terrace
    if params.atom_step_max_prob is not None:  # the step band is wider than the edge: atoms sit in it too
        valid = on_terrace | (step & (m["step_prob"] < params.atom_step_max_prob))
    if maps.atom_prob_net is not None and params.atoms_on_net_grid:
        # a frame coarser than NN-1's grid: on the frame's grid a dimer's atoms merge into one peak
        net_map = pp.check_map("atom_prob_net", maps.atom_prob_net)
        if net_map.shape[0] < h or net_map.shape[1] < w:
            raise InputError(f"atom_prob_net {net_map.shape} must be at least as fine as the frame {(h, w)}")
        atoms_xy, atoms_score = pp.find_atoms_on_net_grid(
            net_map, (h, w), s, valid, params.atom_threshold, params.atom_peak_radius_nm
        )
    else:
        atoms_xy, atoms_score = pp.find_atoms(
            m["atom_prob"], s, valid, params.atom_threshold, params.atom_peak_radius_nm
        )
    a_cols = np.clip(np.rint(atoms_xy[:, 0]).astype(int), 0, w - 1)
    a_rows = np.clip(np.rint(atoms_xy[:, 1]).astype(int), 0, h - 1)
    atom_ter = _atom_terraces(labels, a_rows, a_cols, params.atom_step_terrace_nm / s)
    # atoms in the step band (pp.PostprocessParams.atom_step_max_prob) are reported but kept out of the
    # lattice fits: the edge distorts them and some belong to the other terrace (a hard frame's row angle
    # moved by 4.8 deg with them in)
    in_band = ~on_terrace[a_rows, a_cols]
    tm.lap("atoms")

    # 3. lattice per terrace (the dimer pairs' bonds, computed once here, give the fit its search prior)
    atoms_nm = atoms_xy * s
    # unbalanced build: ~3x faster for these few thousand points, queries as fast
    atom_tree = cKDTree(atoms_nm, balanced_tree=False, compact_nodes=False) if len(atoms_nm) else None
    pairs = pp.pair_dimers(atoms_nm, params.dimer_tol_nm, tree=atom_tree)
    if params.orientation_split and len(pairs):
        # a step NN-0 missed entirely: the rows turn by 90 deg across it (pp.split_by_orientation)
        new_labels = pp.split_by_orientation(
            labels,
            s,
            (atoms_xy[pairs[:, 0]] + atoms_xy[pairs[:, 1]]) / 2,
            atoms_xy[pairs[:, 1]] - atoms_xy[pairs[:, 0]],
            params.min_terrace_area_nm2,
        )
        if new_labels is not labels:
            labels = new_labels
            atom_ter = _atom_terraces(labels, a_rows, a_cols, params.atom_step_terrace_nm / s)
    fit_pair = (
        (atom_ter[pairs[:, 0]] == atom_ter[pairs[:, 1]]) & ~in_band[pairs[:, 0]] & ~in_band[pairs[:, 1]]
    )
    pair_ter = np.where(fit_pair, atom_ter[pairs[:, 0]], -1)
    bonds = atoms_nm[pairs[:, 1]] - atoms_nm[pairs[:, 0]]
    n_ter = int(labels.max()) + 1 if labels.size else 0
    fits: dict[int, LatticeFit] = {}
    wavevectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # image-frame k1, k2 (cycles/nm) per terrace
    terraces: list[Terrace] = []
    area_px = np.bincount(labels.ravel() + 1, minlength=n_ter + 1)[1:]
    boxes: list[Any] | None = None  # bounding box of terrace t at [t], found when the FFT angle is needed
    order = np.argsort(atom_ter, kind="stable")
    bounds = np.searchsorted(atom_ter[order], np.arange(n_ter + 1))
    for t in range(n_ter):
        sel = order[bounds[t] : bounds[t + 1]]  # atom indices of terrace t, ascending
        sel = sel[~in_band[sel]]
        fit = fit_row_lattice(atoms_nm[sel], prior_deg=bond_prior_deg(bonds[pair_ter == t]))
        area_nm2 = float(area_px[t]) * s * s
        fft_deg = None
        if params.fft_check or fit is None:
            if boxes is None:
                boxes = ndimage.find_objects(labels + 1)
            box = boxes[t]
            fft_deg = fft_row_angle_deg(maps.image_norm[box], s, labels[box] == t)
        if fit is not None:
            fits[t] = fit
            # a weak row lattice has no coherent along-row period either (None): skip its ~1.5 ms
            kk = (
                row_wavevectors(atoms_nm[sel], fit.row_angle_deg)
                if fit.coherence >= params.undistort_min_coherence
                else None
            )
            undist = None
            if kk is not None:
                wavevectors[t] = kk
                undist = undistorted_angle_from_wavevectors(*kk)
            terraces.append(
                Terrace(
                    t,
                    round(fit.row_angle_deg, 4),
                    round(fit.row_phase_nm, 4),
                    round(area_nm2, 3),
                    len(sel),
                    None if fft_deg is None else round(fft_deg, 3),
                    round(fit.residual_nm, 4),
                    None if undist is None else round(undist, 4),
                )
            )
        else:  # too few atoms: the FFT angle alone, phase unknown (NaN is not JSON: use 0 and n_atoms tells)
            terraces.append(
                Terrace(
                    t,
                    round(fft_deg, 4) if fft_deg is not None else 0.0,
                    0.0,
                    round(area_nm2, 3),
                    len(sel),
                    None if fft_deg is None else round(fft_deg, 3),
                    None,
                )
            )
    if params.alternate_across_steps and len(terraces) > len(fits):
        # terraces with the FFT's angle only: the rows turn by 90 deg across a single step
        turned = pp.alternate_across_steps(labels, {x.id: x.row_angle_deg for x in terraces}, set(fits), s)
        terraces = [
            replace(x, row_angle_deg=round(turned[x.id], 4)) if x.id in turned else x for x in terraces
        ]
    tm.lap("lattice")

    # 4. dimers from the atoms and the row lattice at each atom (pp.lattice_dimers): the terrace's fit, or
    # where one straight lattice does not describe a terrace (drift/creep bends the rows: normalised
    # coherence < params.local_fit_below_coherence, or no fit at all) a fit of the atoms in each
    # params.local_tile_nm tile (row index -1 there unless a global fit exists); atoms with no lattice at all
    # give no dimers
    dim_xy = np.empty((0, 2))
    dim_ter = np.empty(0, int)
    dim_row = np.empty(0, int)
    dim_angle = np.empty(0)
    dim_band = np.zeros(0, bool)
    # the reported atoms and dimers: moved onto their local lattice below (params.atom_smooth_sigma_nm); the
    # planner (plan_dims: dimer xy px, terrace, row angle, in band) and the defect features keep the peaks
    rep_xy = atoms_xy
    plan_dims = (dim_xy, dim_ter, dim_angle, dim_band)
    if len(atoms_nm):
        a_angle = np.full(len(atoms_nm), np.nan)
        a_phase = np.full(len(atoms_nm), np.nan)
        for t in range(n_ter):
            a_sel = order[bounds[t] : bounds[t + 1]]
            if not len(a_sel):
                continue
            fit = fits.get(t)
            if fit is not None:
                a_angle[a_sel], a_phase[a_sel] = fit.row_angle_deg, fit.row_phase_nm
                if fit.coherence >= params.local_fit_below_coherence:
                    continue
            tile_of, _, tile_fits = local_fit_tiles(
                atoms_nm[a_sel],
                params.local_tile_nm,
                params.local_min_atoms,
                prior_deg=None if fit is None else fit.row_angle_deg,
            )
            if any(f is not None for f in tile_fits):
                # [tile] = its fit's angle / phase, NaN without a fit; [-1] (atoms of small tiles) NaN
                t_angle = np.array([np.nan if f is None else f.row_angle_deg for f in tile_fits] + [np.nan])
                t_phase = np.array([np.nan if f is None else f.row_phase_nm for f in tile_fits] + [np.nan])
                in_fit = ~np.isnan(t_angle[tile_of])  # atoms of tiles without a fit keep the terrace's
                a_angle[a_sel[in_fit]] = t_angle[tile_of[in_fit]]
                a_phase[a_sel[in_fit]] = t_phase[tile_of[in_fit]]

        def dimers_of(xy_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Dimers of the atoms at ``xy_nm``: atom index pairs (-1 = one atom), centres nm, terraces."""
            dp, c_nm = pp.lattice_dimers(
                xy_nm,
                atoms_score,
                a_angle,
                a_phase,
                params.dimer_line_tol_nm,
                params.dimer_pair_radius_nm,
                params.dimer_single_min_score,
                bond_pairs=pairs if params.dimer_bond_pairs_first else None,
            )
            t_of = atom_ter[dp[:, 0]]
            ok = (dp[:, 1] < 0) | (atom_ter[dp[:, 1]] == t_of)  # both atoms of a pair on one terrace
            return dp[ok], c_nm[ok], t_of[ok]

        def band_of(dp: np.ndarray) -> np.ndarray:
            return in_band[dp[:, 0]] | ((dp[:, 1] >= 0) & in_band[np.maximum(dp[:, 1], 0)])

        dpairs, centre_nm, pt = dimers_of(atoms_nm)
        # the planner keeps the dimers of the detected peaks (its evidence tests were tuned on them, and the
        # move below would hide a stretched dimer)
        plan_dims = (centre_nm / s, pt, a_angle[dpairs[:, 0]], band_of(dpairs))
        if params.atom_smooth_sigma_nm > 0:
            # the reported atoms and dimers sit on the local lattice. The step band's atoms move too and count
            # as neighbours (they stay out of the fits): that helps more than the edge's distortion of them
            # hurts (models/MODEL_CARD.md, session 13)
            atoms_nm = pp.lattice_smooth_atoms(
                atoms_nm, atom_ter, a_angle, params.atom_smooth_sigma_nm, params.atom_smooth_max_move_nm
            )
            dpairs, centre_nm, pt = dimers_of(atoms_nm)
        rows_idx = np.full(len(dpairs), -1, np.int64)
        for t in np.unique(pt).tolist():
            fit = fits.get(t)
            if fit is not None:  # no global fit: rows stay -1 (unknown)
                sel = pt == t
                r = row_index(centre_nm[sel], fit.row_angle_deg, fit.row_phase_nm)
                # row index within the terrace, 0 = the row with the smallest p.n among detected dimers
                rows_idx[sel] = r - r.min()
        dim_xy = centre_nm / s
        rep_xy = atoms_nm / s
        dim_ter, dim_row, dim_angle = pt, rows_idx, a_angle[dpairs[:, 0]]
        dim_band = band_of(dpairs)
    tm.lap("dimers")

    # 5. defects: blobs per kind, features, rules
    blobs = {
        "protrusion": pp.find_blobs(
            m["protrusion_prob"], s, params.defect_threshold, params.min_defect_area_nm2
        ),
        "depression": pp.find_blobs(
            m["depression_prob"],
            s,
            params.defect_threshold if params.depression_threshold is None else params.depression_threshold,
            params.min_defect_area_nm2,
        ),
    }
    kinds: list[str] = []
    feats: list[np.ndarray] = []
    recs: list[tuple[str, int]] = []
    blob_ter: dict[str, np.ndarray] = {}
    for kind, bl in blobs.items():
        if len(bl.slices):
            blob_ter[kind] = pp.blob_terraces(labels, bl)
            ang = [fits[t].row_angle_deg if t in fits else None for t in blob_ter[kind].tolist()]
            feats.append(pp.blob_features(img, bl, s, atoms_xy, params.feature_ring_nm, ang, atom_tree))
            kinds += [kind] * len(bl.slices)
            recs += [(kind, k) for k in range(len(bl.slices))]
    features = np.concatenate(feats) if feats else np.zeros((0, len(FEATURE_NAMES)))
    features_ok = np.where(np.isfinite(features), features, 0.0)  # for clustering; rules see the NaNs
    tm.lap("defects")

    # 6. classes: the library's models when present, else (optionally) mean shift on this frame's defects
    clusters = np.full(len(kinds), -1, int)
    labels_cls: list[str | None] = [None] * len(kinds)
    if len(kinds):
        if cluster_model is not None:
            clusters = np.asarray(cluster_model.predict(features_ok, kinds), int)
        elif params.frame_clustering:
            from stm_feedback.classify import cluster_defects
            from stm_feedback.embedding import embedding_for

            emb = embedding_for(settings)
            clusters = np.asarray(cluster_defects(features_ok, kinds, embedding=emb), int)
        if classifier is not None:
            labels_cls = list(classifier.predict(features_ok, kinds))
    tm.lap("classes")

    defects: list[Defect] = []
    margin_of: dict[str, np.ndarray] = {kind: np.zeros(len(bl.slices) + 1) for kind, bl in blobs.items()}
    for i, (kind, k) in enumerate(recs):
        bl = blobs[kind]
        x, y = bl.centre_xy_px[k]
        # may be NaN (no height reference): must-avoid by the rules, null in JSON
        height_rel, cells, circ = (float(features[i, FEATURE_NAMES.index(n)]) for n in FEATURE_NAMES_USED)
        label = labels_cls[i] or cluster_label(kind, int(clusters[i]))
        must, margin = defect_rule(kind, label, height_rel, cells, ps)
        if must:  # margin 0 would read as "not must-avoid" below
            margin_of[kind][k + 1] = margin if margin > 0 else -1.0
        defects.append(
            Defect(
                x_px=round(float(x), 3),
                y_px=round(float(y), 3),
                kind=kind,
                cluster=int(clusters[i]),
                label=label,
                area_nm2=round(float(bl.area_px[k]) * s * s, 4),
                height_rel=_round_or_none(height_rel, 4),
                circularity=_round_or_none(circ, 4),
                must_avoid=bool(must),
                terrace=int(blob_ter[kind][k]),
                area_cells=round(cells, 3),
                score=round(float(bl.score[k]), 4),
            )
        )
    any_defect = np.zeros((h, w), bool)
    avoid: dict[float, np.ndarray] = {}
    for kind, bl in blobs.items():
        if not len(bl.slices):
            continue
        any_defect |= bl.labels > 0
        for margin in np.unique(margin_of[kind][margin_of[kind] != 0]).tolist():
            mk = avoid.setdefault(max(margin, 0.0), np.zeros((h, w), bool))
            mk |= (margin_of[kind] == margin)[bl.labels]

    # 7. planner: resolved = near a detected atom; unresolved terrace pixels outside defects are unknown.
    # It reads the detections off the step band only: the band keeps step_margin_nm anyway, and its atoms
    # and dimers (two row orientations side by side, unpaired atoms at the edge) would widen the
    # orientation band and the anomaly marks beyond it
    plan_atoms = np.flatnonzero(~in_band)
    remap = np.full(len(atoms_xy), -1, np.int64)
    remap[plan_atoms] = np.arange(len(plan_atoms))
    p_pairs = remap[pairs]
    p_pairs = p_pairs[(p_pairs >= 0).all(axis=1)]
    p_atoms_xy, p_atom_ter = atoms_xy[plan_atoms], atom_ter[plan_atoms]
    pd_xy, pd_ter, pd_angle, pd_band = plan_dims
    p_dim_xy, p_dim_ter, p_dim_angle = pd_xy[~pd_band], pd_ter[~pd_band], pd_angle[~pd_band]
    atom_px = np.zeros((h, w), bool)
    atom_px[a_rows[~in_band], a_cols[~in_band]] = True
    resolved = near_mask(atom_px, ps.resolved_radius_nm, s, inclusive=True)
    unresolved = (labels >= 0) & ~resolved & ~any_defect
    # an empty-state frame gets no plan (PlannerSettings.withhold_on_empty_state): skip the planner's work
    withhold_empty = ps.withhold_on_empty_state and maps.polarity == "empty"
    # ... and neither does a frame whose polarity is a guess (PlannerSettings.withhold_on_unknown_polarity)
    withhold_unknown = (
        ps.withhold_on_unknown_polarity and maps.polarity_source != "bias" and not withhold_empty
    )
    # ... nor a frame too coarse to resolve a dihydride (PlannerSettings.max_plan_pixel_size_nm)
    withhold_coarse = 0 < ps.max_plan_pixel_size_nm < s and not (withhold_empty or withhold_unknown)
    if withhold_empty or withhold_unknown or withhold_coarse:
        sites, safe_mask = [], np.zeros((h, w), bool)
    else:
        # missing dimers next to detected ones: undetected defects
        if ps.hole_margin_nm >= 0 and len(p_dim_xy):
            holes = lattice_holes(p_dim_xy, p_dim_angle, p_dim_ter, labels, s, HOLE_TOL_NM)
            if holes.any():
                avoid[ps.hole_margin_nm] = avoid.get(ps.hole_margin_nm, np.zeros((h, w), bool)) | holes
        if ps.anomaly_margin_nm >= 0 and len(p_atoms_xy):  # unpaired atoms, stretched dimers: dihydride-like
            # [t] = fitted row angle of terrace t, [-1] (no terrace) NaN
            ter_angle = np.full(n_ter + 1, np.nan)
            for t, f in fits.items():
                ter_angle[t] = f.row_angle_deg
            atom_angle = ter_angle[p_atom_ter]
            odd = lattice_anomalies(
                p_atoms_xy, p_pairs, (h, w), s, ps.anomaly_max_bond_nm, atom_angle_deg=atom_angle
            )
            odd &= (labels >= 0) & ~any_defect
            if odd.any():
                avoid[ps.anomaly_margin_nm] = avoid.get(ps.anomaly_margin_nm, np.zeros((h, w), bool)) | odd
        if (ps.suspect_depression_prob >= 0 or ps.suspect_centre_z >= 0) and len(p_dim_xy):
            # dimers over a defect the nets did not report (sub-threshold depression, dark centre line)
            sus = suspect_dimers(
                p_dim_xy,
                p_dim_angle,
                p_dim_ter,
                maps.image_norm,
                m["depression_prob"],
                s,
                ps.suspect_depression_prob,
                ps.suspect_radius_nm,
                ps.suspect_centre_z,
            )
            if sus.any():
                mk = avoid.setdefault(ps.suspect_margin_nm, np.zeros((h, w), bool))
                mk[
                    np.clip(np.rint(p_dim_xy[sus, 1]).astype(int), 0, h - 1),
                    np.clip(np.rint(p_dim_xy[sus, 0]).astype(int), 0, w - 1),
                ] = True
        step_plan = step
        if ps.step_prob_plan >= 0:  # faint step evidence the segmentation threshold drops
            step_plan = step | (m["step_prob"] >= ps.step_prob_plan)
        if ps.step_continuation_min_nm >= 0:  # steps do not end on a terrace: where one does, NN-0 lost it
            # of the segmentation's steps only: faint evidence (step_prob_plan) also rims etch pits
            step_plan = step_plan | step_continuations(step, s, ps.step_continuation_min_nm)
        # two row orientations meet: a step, maybe undetected
        if ps.orientation_reach_nm > 0 and len(p_dim_xy):
            step_plan = step_plan | orientation_band(
                p_dim_xy, p_dim_angle, (h, w), s, ps.orientation_reach_nm
            )
        # topography with upper terraces higher (image_norm has rows bright, i.e. is inverted in empty state)
        height = maps.image_norm if maps.polarity != "empty" else 1.0 - maps.image_norm
        clear = clearance_maps(labels, step_plan, unresolved, avoid, s, ps, height=height)
        angles = {t: f.row_angle_deg for t, f in fits.items()}
        sites = propose_sites(p_dim_xy, p_dim_ter, angles, clear, s, ps, dimer_angle_deg=p_dim_angle)
        safe_mask = clear.safe
    tm.lap("planner")

    defect_xy = np.array([[d.x_px, d.y_px] for d in defects]).reshape(-1, 2)
    dt_pairs = double_tip_pairs(defect_xy, kinds, s)
    quality = assess(img, labels, resolved, any_defect, dt_pairs, s)
    quality.polarity, quality.polarity_source = maps.polarity, maps.polarity_source
    # detections not reported as defects; they stay in the must-avoid masks above (conservative)
    keep = np.ones(len(defects), bool)
    min_dep_score = (
        params.depression_report_min_score_coarse
        if s >= params.depression_report_coarse_px_nm
        else params.depression_report_min_score
    )
    if min_dep_score > 0:  # faint depressions: mostly false (PostprocessParams)
        faint = [d.kind == "depression" and d.score < min_dep_score for d in defects]
        keep &= ~np.array(faint, bool).reshape(-1)
    if params.drop_double_tip_ghosts and dt_pairs is not None:  # the second apex's copies are not defects
        ghosts = ghost_copies(dt_pairs, np.array([d.area_nm2 for d in defects], float))
        keep[ghosts] = False
        quality.notes.append(
            f"{len(ghosts)} ghost copies of protrusions at the double-tip offset not reported"
        )
    if not keep.all():
        defects = [d for d, k in zip(defects, keep.tolist(), strict=True) if k]
        features = features[keep]
    if ps.withhold_on_double_tip and quality.double_tip_suspected and (sites or safe_mask.any()):
        # a double tip images every feature twice and writes unreliably: nothing on this frame is safe
        sites, safe_mask = [], np.zeros_like(safe_mask)
        quality.notes.append("double tip suspected: no sites proposed, safe mask empty (condition the tip)")
    if withhold_empty:
        quality.notes.append(
            "empty-state frame: dihydrides are not resolved at positive bias, no sites proposed, safe mask "
            "empty (plan from a filled-state image, or set planner.withhold_on_empty_state = false)"
        )
    if withhold_coarse:
        quality.notes.append(
            f"pixel size {s:.3f} nm/px is coarser than planner.max_plan_pixel_size_nm "
            f"({ps.max_plan_pixel_size_nm} nm/px): dihydrides are not resolved, no sites proposed, safe mask "
            "empty (rescan finer to plan)"
        )
    if withhold_unknown:
        quality.notes.append(
            f"no bias given (polarity {maps.polarity}, {maps.polarity_source}): no sites proposed, safe mask "
            "empty; give the bias to plan (or set planner.withhold_on_unknown_polarity = false)"
        )
    tm.lap("quality")

    # round in numpy, then build the dataclasses from flat lists of floats (Python round() per field cost
    # ~10 ms; nested [x, y] lists double the number of GC-tracked containers per frame)
    out_xy, out_score, out_ter = rep_xy, atoms_score, atom_ter
    if params.partner_min_prob >= 0 and len(dim_xy):
        out_xy, out_score, out_ter = _with_partners(
            rep_xy,
            atoms_score,
            atom_ter,
            dpairs[:, 0][dpairs[:, 1] < 0],
            dim_xy[dpairs[:, 1] < 0],
            m["atom_prob"],
            params.partner_min_prob,
        )
    # the footprint test on the positions as reported (3 decimals): a reader who rounds them to pixels
    # finds no atom in a reported depression, also at x.4996 -> x.5
    out_xy = np.round(out_xy, 3)
    if params.atom_min_separation_nm > 0 and len(out_xy) > 1:
        sep = pp.keep_separated(out_xy, out_score, params.atom_min_separation_nm / s)
        if not sep.all():
            out_xy, out_score, out_ter = out_xy[sep], out_score[sep], out_ter[sep]
    if params.drop_atoms_in_depressions and len(out_xy) and len(blobs["depression"].slices):
        c = np.clip(np.rint(out_xy[:, 0]).astype(np.int64), 0, w - 1)
        r = np.clip(np.rint(out_xy[:, 1]).astype(np.int64), 0, h - 1)
        keep = blobs["depression"].labels[r, c] == 0
        out_xy, out_score, out_ter = out_xy[keep], out_score[keep], out_ter[keep]
    # ``Atom`` / ``Dimer`` objects are built on first access (Analysis.with_lazy_rows): the daemon's reply
    # needs only their JSON rows, which it packs straight from these numpy columns (protocol.pack_rows)
    axy = out_xy
    atoms = (axy[:, 0], axy[:, 1], np.asarray(out_ter), np.round(out_score, 4))
    dxy = np.round(dim_xy, 3).reshape(-1, 2)
    dimers = (dxy[:, 0], dxy[:, 1], np.asarray(dim_ter), np.asarray(dim_row))
    tm.lap("objects")
    tm.ms["total"] = round(sum(tm.ms.values()), 3)
    return Analysis.with_lazy_rows(
        image=ImageInfo(h, w, s, b, frame_id),
        atoms=atoms,
        dimers=dimers,
        defects=defects,
        terraces=terraces,
        sites=sites,
        quality=quality,
        terrace_labels=labels.astype(np.int32),
        safe_mask=safe_mask,
        timings_ms=tm.ms,
        models=dict(models or {}),
        defect_features=features,
        terrace_wavevectors=wavevectors,
    )


def _row_columns(a: Analysis, name: str) -> tuple[Any, Any, Any, Any]:
    """The four columns (x_px, y_px, terrace, score / row) of ``a``'s "atoms" or "dimers", built or not."""
    cols = a.lazy_columns(name)
    if cols is not None:
        return cols
    rows = [tuple(vars(r).values()) for r in getattr(a, name)]
    return tuple(zip(*rows, strict=True)) if rows else ((), (), (), ())  # type: ignore[return-value]


def _atom_columns(a: Analysis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms of ``a`` as arrays: positions (N, 2) x_px, y_px, terrace ids (N,), scores (N,)."""
    cols = _row_columns(a, "atoms")
    xy = np.column_stack([np.asarray(cols[0], np.float64), np.asarray(cols[1], np.float64)]).reshape(-1, 2)
    return xy, np.asarray(cols[2], np.int64), np.asarray(cols[3], np.float64)


def _pixel(x_px: float, y_px: float, h: int, w: int) -> tuple[int, int]:
    """(row, column) of the pixel nearest to (x_px, y_px), clipped into an (h, w) frame."""
    return min(max(round(y_px), 0), h - 1), min(max(round(x_px), 0), w - 1)


def unshift_analysis(a: Analysis, offsets_px: np.ndarray, pixel_size_nm: float) -> Analysis:
    """An analysis of a ``jitter.shift_lines`` image moved back onto the recorded image: every x position
    minus the offset its blob is recorded at (``jitter.unshift_x`` at ``pixel_size_nm``; rounded as the
    pipeline rounds), terrace labels and safe mask resampled per line (-1 / False where a line was shifted
    in from outside). Terraces keep their fitted angles and phases (those of the jitter-free lattice)."""
    o = np.asarray(offsets_px, np.float64)

    def cols(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        c = _row_columns(a, name)
        x, y = np.asarray(c[0], np.float64), np.asarray(c[1], np.float64)
        ux = np.round(unshift_x(x, y, o, pixel_size_nm), 3)
        return ux, np.round(y, 3), np.asarray(c[2]), np.asarray(c[3])

    # the defects', site centres' and site dimers' x in one call, consumed in the same order below
    pts = [(d.x_px, d.y_px) for d in a.defects]
    for st in a.sites:
        pts += [(st.center_x_px, st.center_y_px), *((x, y) for x, y in st.dimers)]
    p = np.array(pts, np.float64).reshape(-1, 2)
    xs = iter(np.round(unshift_x(p[:, 0], p[:, 1], o, pixel_size_nm), 3).tolist())
    defects = [Defect(**{**vars(d), "x_px": next(xs)}) for d in a.defects]
    sites = [
        Site(**{**vars(st), "center_x_px": next(xs), "dimers": [[next(xs), y] for _, y in st.dimers]})
        for st in a.sites
    ]
    quality = type(a.quality)(**{**vars(a.quality), "notes": list(a.quality.notes)})
    return Analysis.with_lazy_rows(
        image=a.image,
        atoms=cols("atoms"),
        dimers=cols("dimers"),
        defects=defects,
        terraces=a.terraces,
        sites=sites,
        quality=quality,
        terrace_labels=None if a.terrace_labels is None else unshift_map(a.terrace_labels, o, -1),
        safe_mask=None if a.safe_mask is None else unshift_map(a.safe_mask, o, False),
        timings_ms=dict(a.timings_ms),
        models=dict(a.models),
        defect_features=a.defect_features,
    )


def merge_jitter_corrected(recorded: Analysis, corrected: Analysis, planner: Any) -> Analysis:
    """One analysis from two of the same frame: ``recorded`` (of the image as recorded) and ``corrected``
    (of the image with its line jitter removed, already moved back by ``unshift_analysis``).

    Atoms, dimers, terraces and terrace labels come from ``corrected``: the lattice is what the jitter
    breaks. Defects (and their feature vectors) come from ``recorded``, with their terrace ids read from
    the corrected labels: a defect spans many lines, and a line whose offset was only found up to a lattice
    period (jitter.py) tears a defect apart but not the lattice (defect F1 on training-range hard frames
    0.718 -> 0.702 with the corrected defects; models/MODEL_CARD.md session 10). The safe mask and sites
    are the corrected analysis' (its planner avoided its own defects), minus a disc around every must-avoid
    defect of ``recorded``: radius = the defect's equivalent radius + its kind's margin (``planner``:
    adatom margin for protrusions, depression margin for depressions) + the detection pad; a site with a
    dimer on a removed pixel is dropped. So the defects reported are avoided too, whichever pass saw them.
    Double-tip suspicion from either analysis withholds every site."""
    h, w = corrected.image.height_px, corrected.image.width_px
    labels = corrected.terrace_labels
    defects = list(recorded.defects)
    if labels is not None and defects:
        defects = [
            Defect(**{**vars(d), "terrace": int(labels[_pixel(d.x_px, d.y_px, h, w)])}) for d in defects
        ]
    safe = corrected.safe_mask
    double = corrected.quality.double_tip_suspected or recorded.quality.double_tip_suspected
    if safe is not None:
        s_nm = corrected.image.pixel_size_nm
        keep = np.full((h, w), 255 if not double else 0, np.uint8)
        for d in recorded.defects:
            if not d.must_avoid:
                continue
            margin = planner.adatom_margin_nm if d.kind == "protrusion" else planner.depression_margin_nm
            r_nm = math.sqrt(max(d.area_nm2, 0.0) / math.pi) + margin + max(planner.detection_pad_nm, 0.0)
            cv2.circle(keep, (round(d.x_px), round(d.y_px)), math.ceil(r_nm / s_nm), 0, thickness=-1)
        safe = safe & (keep > 0)
    sites = corrected.sites
    if safe is not None:
        sites = [st for st in sites if all(safe[_pixel(x, y, h, w)] for x, y in st.dimers)]
    q = corrected.quality
    notes = list(q.notes) + [n for n in recorded.quality.notes if n not in q.notes]
    quality = type(q)(
        **{
            **vars(q),
            "double_tip_suspected": double,
            "notes": notes,
        }
    )
    xyts = corrected.lazy_columns("atoms")
    dims = corrected.lazy_columns("dimers")
    kwargs: dict[str, Any] = dict(
        image=corrected.image,
        defects=defects,
        terraces=corrected.terraces,
        sites=sites,
        quality=quality,
        terrace_labels=labels,
        safe_mask=safe,
        timings_ms=dict(recorded.timings_ms),
        models=dict(corrected.models),
        defect_features=recorded.defect_features,
    )
    if xyts is not None and dims is not None:
        return Analysis.with_lazy_rows(atoms=xyts, dimers=dims, **kwargs)
    return Analysis(atoms=list(corrected.atoms), dimers=list(corrected.dimers), **kwargs)


def _round_or_none(v: float, nd: int) -> float | None:
    return round(v, nd) if math.isfinite(v) else None


def cluster_label(kind: str, cluster: int) -> str:
    """Label of an unclassified defect: "<kind>-<cluster>", or just the kind when unclustered (-1)."""
    return f"{kind}-{cluster}" if cluster >= 0 else kind


def defect_patches(
    image: np.ndarray, analysis: Analysis, size_px: int = 24, patch_pixel_size_nm: float = 0.125
) -> np.ndarray:
    """Row-aligned patches (N, size_px, size_px) float32 of the analysis' defects (for the defect library),
    rotated by their terrace's row angle (0 deg when the terrace is unknown)."""
    angles = {t.id: t.row_angle_deg for t in analysis.terraces}
    s = analysis.image.pixel_size_nm
    out = [
        pp.defect_patch(image, d.x_px, d.y_px, s, angles.get(d.terrace, 0.0), size_px, patch_pixel_size_nm)
        for d in analysis.defects
    ]
    return np.array(out, np.float32).reshape(len(out), size_px, size_px)


_default: Pipeline | None = None
_default_lock = threading.Lock()


def analyze(
    image: Any, pixel_size_nm: float, bias_v: float | None = None, frame_id: str | None = None
) -> Analysis:
    """Module-level convenience: analyse with one cached default ``Pipeline`` (settings from env).
    ``bias_v``: sample bias in V (negative = filled states); None = unknown: the polarity is estimated and no
    sites are proposed (``PlannerSettings.withhold_on_unknown_polarity``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Pipeline()
    return _default.analyze(image, pixel_size_nm, bias_v=bias_v, frame_id=frame_id)
