"""Scoring of proposed write sites against simulator truth: false-safe sites and the site-found rate.

Definitions (used by ``stm-feedback evaluate`` and tests/test_planner.py):

- a proposed site is **false-safe** when any of its dimers lies within the configured clearance of a truth
  must-avoid thing: a must-avoid truth defect footprint closer than that class's margin
  (``PlannerSettings``: adatom/cluster ``adatom_margin_nm``, dihydride ``dihydride_margin_nm``, other
  must-avoid depressions ``depression_margin_nm``), or a truth step edge / off-terrace pixel closer than
  ``step_margin_nm``. Distances are pixel-centre to pixel-centre (the dimer's nearest pixel), as the planner
  measures them. Zero false-safe sites is the hard requirement on every suite.
- the **safe mask** is scored pixel by pixel too: a safe pixel with negative truth slack (a dimer there would
  break one of those clearances) is an unsafe pixel. The sites sample the mask (at most ``max_sites`` per
  frame), so an unsafe patch the sites miss shows only here; a planner that queries writable areas reads it.
- a frame **has a window** when the planner, run on the *truth* (truth dimers, truth must-avoid footprints,
  truth step and unresolved masks, same rules), proposes at least one site; the **site-found rate** is the
  fraction of such frames on which the analysis proposes at least one site that is not false-safe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from simulator.truth import GroundTruth
from stm_feedback.config import PlannerSettings
from stm_feedback.planner import clearance_maps, distance_px, propose_sites
from stm_feedback.schema import Analysis, Site


def truth_margin_nm(cls: str, settings: PlannerSettings) -> float:
    """Clearance (nm) a site must keep from a must-avoid truth defect of class ``cls``."""
    if cls == "adatom_cluster":
        return settings.adatom_margin_nm
    if cls == "dihydride":
        return settings.dihydride_margin_nm
    return settings.depression_margin_nm


def truth_avoid_masks(truth: GroundTruth, settings: PlannerSettings) -> dict[float, np.ndarray]:
    """margin_nm -> (H, W) bool union of the must-avoid truth footprints with that margin."""
    inst = np.asarray(truth.defect_instances)
    ids_by_margin: dict[float, list[int]] = {}
    for d in truth.defects:
        if d.must_avoid:
            ids_by_margin.setdefault(truth_margin_nm(d.cls, settings), []).append(d.id)
    return {m: np.isin(inst, ids) for m, ids in ids_by_margin.items()}


def truth_slack_nm(truth: GroundTruth, settings: PlannerSettings) -> np.ndarray:
    """(H, W) float32: min over truth rules of (distance to the rule's mask - its margin), nm; < 0 = a
    dimer on that pixel would violate the configured clearance of a truth defect or step edge."""
    s = truth.pixel_size_nm
    off = np.asarray(truth.step_mask, bool) | (np.asarray(truth.terrace_labels) < 0)
    slack = distance_px(off) * np.float32(s) - np.float32(settings.step_margin_nm)
    for margin, mask in truth_avoid_masks(truth, settings).items():
        slack = np.minimum(slack, distance_px(mask) * np.float32(s) - np.float32(margin))
    return slack.astype(np.float32)


def false_safe_sites(sites: list[Site], slack_nm: np.ndarray) -> int:
    """Number of sites with at least one dimer on a pixel of negative truth slack (``truth_slack_nm``)."""
    h, w = slack_nm.shape
    bad = 0
    for site in sites:
        pts = np.asarray(site.dimers, float).reshape(-1, 2)
        c = np.clip(np.rint(pts[:, 0]).astype(int), 0, w - 1)
        r = np.clip(np.rint(pts[:, 1]).astype(int), 0, h - 1)
        bad += bool((slack_nm[r, c] < 0).any())
    return bad


def truth_sites(truth: GroundTruth, settings: PlannerSettings) -> list[Site]:
    """The planner run on the truth itself (truth dimers, footprints, steps, unresolved regions; truth
    footprints need no ``detection_pad_nm``)."""
    settings = settings.model_copy(update={"detection_pad_nm": 0.0})
    clear = clearance_maps(
        np.asarray(truth.terrace_labels),
        np.asarray(truth.step_mask, bool),
        np.asarray(truth.unresolved_mask, bool),
        truth_avoid_masks(truth, settings),
        truth.pixel_size_nm,
        settings,
    )
    angles = {t.id: t.row_angle_deg for t in truth.terraces}
    return propose_sites(
        truth.dimers_xy_px, truth.dimer_terrace, angles, clear, truth.pixel_size_nm, settings
    )


@dataclass
class SiteScore:
    """Planner score of one frame."""

    sites: int  # proposed sites
    false_safe: int  # proposed sites within the configured clearance of a truth defect / step edge
    has_window: bool  # the planner on the truth finds a site
    found: bool  # has_window and at least one proposed site is not false-safe
    safe_px: int = 0  # pixels of the analysis' safe mask
    unsafe_px: int = 0  # of those, pixels with negative truth slack (truth_slack_nm)

    def to_dict(self) -> dict:
        return asdict(self)


def score_sites(truth: GroundTruth, analysis: Analysis, settings: PlannerSettings | None = None) -> SiteScore:
    """Score the analysis' sites against the truth (definitions: module docstring)."""
    ps = settings or PlannerSettings()
    sites = list(analysis.sites)
    safe = analysis.safe_mask
    n_safe = int(np.count_nonzero(safe)) if safe is not None else 0
    slack = truth_slack_nm(truth, ps) if sites or n_safe else None
    fs = false_safe_sites(sites, slack) if sites else 0
    unsafe = int(np.count_nonzero(safe & (slack < 0))) if n_safe else 0
    window = bool(truth_sites(truth, ps))
    return SiteScore(len(sites), fs, window, window and len(sites) > fs, n_safe, unsafe)


def aggregate_sites(scores: list[SiteScore]) -> dict[str, float]:
    """Suite planner metrics: site-found rate over frames with a truth window, false-safe sites in total, and
    the safe mask's unsafe pixels as a fraction of all its pixels (NaN when nothing was marked safe) and the
    number of frames with any."""
    windows = sum(s.has_window for s in scores)
    safe_px = sum(s.safe_px for s in scores)
    return {
        "site_found_rate": sum(s.found for s in scores) / windows if windows else float("nan"),
        "site_window_frames": float(windows),
        "sites_found_frames": float(sum(s.found for s in scores)),
        "false_safe_sites": float(sum(s.false_safe for s in scores)),
        "false_safe_frames": float(sum(s.false_safe > 0 for s in scores)),
        "sites_per_frame": float(np.mean([s.sites for s in scores])) if scores else float("nan"),
        "unsafe_mask_fraction": sum(s.unsafe_px for s in scores) / safe_px if safe_px else float("nan"),
        "unsafe_mask_frames": float(sum(s.unsafe_px > 0 for s in scores)),
    }
