"""Write-then-verify on the simulated STM (issue 5 item 6): scan -> daemon -> ``query_sites`` -> bare the
chosen dimers -> rescan -> the daemon sees a new bright patch there (within one dimer pitch after drift),
and the simulator's ground truth confirms that no must-avoid defect was touched.

Run: ``python -m instrument_adapters.demo_write_verify [--seed 7]`` (starts its own daemon on loopback).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from instrument_adapters.base import send_frame
from stm_feedback.physics import SURFACE_LATTICE_NM

if TYPE_CHECKING:
    from collections.abc import Callable

    from instrument_adapters.simulated import SimulatedAdapter
    from stm_feedback.client import Client
    from stm_feedback.readers import Frame
    from stm_feedback.schema import Analysis, Site


@dataclass
class WriteVerifyResult:
    """Outcome of one cycle; positions in pixels of the first (site) / second (verify) frame."""

    ok: bool
    reason: str
    site_center_px: list[float] = field(default_factory=list)
    site_dimers_px: list[list[float]] = field(default_factory=list)
    bared_count: int = 0
    drift_px: list[float] = field(default_factory=list)  # daemon's frame-to-frame estimate ([] = none)
    drift_method: str | None = None  # the daemon's drift method ("ambiguous": no usable estimate)
    expected_center_px: list[float] = field(default_factory=list)  # site + drift, in the verify frame
    found_patch_px: list[float] = field(default_factory=list)  # new bright defect nearest the expected place
    found_distance_nm: float = float("nan")
    found_area_cells: float = float("nan")  # its area in 2x1 cells (a 3-dimer patch: ~3)
    truth_distance_nm: float = float(
        "nan"
    )  # truth litho patch centre vs expected (checks the drift estimate)
    truth_patch_dimers: int = 0  # bare dimers of that truth patch
    touched_must_avoid: list[str] = field(default_factory=list)  # truth classes under the chosen/bared dimers
    frame_ids: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # round trips: before, query, write, after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One human-readable line."""
        if not self.site_center_px:
            return f"write-then-verify: skipped: {self.reason}"
        drift = "ambiguous" if not self.drift_px else f"({self.drift_px[0]:+.2f}, {self.drift_px[1]:+.2f}) px"
        return (
            f"write-then-verify: site ({self.site_center_px[0]:.1f}, {self.site_center_px[1]:.1f}) px, "
            f"{self.bared_count} dimers bared; drift {drift} [{self.drift_method}]; new patch "
            f"{self.found_distance_nm:.2f} nm from the expected place ({self.found_area_cells:.1f} cells), "
            f"truth patch {self.truth_distance_nm:.2f} nm ({self.truth_patch_dimers} dimers); must-avoid "
            f"touched: {sorted(set(self.touched_must_avoid)) or 'none'} -> {'OK' if self.ok else 'FAILED'}: "
            f"{self.reason}"
        )


def _new_protrusions(before: Any, after: Any, shift_px: np.ndarray, radius_px: float) -> list[Any]:
    """Protrusions of ``after`` with no protrusion of ``before`` (moved by ``shift_px``) within
    ``radius_px``."""
    old = np.array([[d.x_px, d.y_px] for d in before.defects if d.kind == "protrusion"]).reshape(-1, 2)
    new = [d for d in after.defects if d.kind == "protrusion"]
    if len(old) == 0:
        return new
    old = old + shift_px
    return [d for d in new if np.hypot(old[:, 0] - d.x_px, old[:, 1] - d.y_px).min() > radius_px]


def must_avoid_under(truth: Any, xy_px: np.ndarray) -> list[str]:
    """Classes of the truth's must-avoid defects whose footprint (``defect_instances``) covers a pixel within
    one pixel of any of ``xy_px`` (N, 2)."""
    by_id = {t.id: t for t in truth.defects}
    h, w = truth.defect_instances.shape
    out: list[str] = []
    for x, y in np.asarray(xy_px, np.float64).reshape(-1, 2):
        r, c = int(round(y)), int(round(x))
        if not (0 <= r < h and 0 <= c < w):
            continue
        ids = np.unique(truth.defect_instances[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2])
        out += [by_id[i].cls for i in ids if i in by_id and by_id[i].must_avoid]
    return out


def write_then_verify(
    adapter: SimulatedAdapter,
    client: Client,
    pattern: str = "3x1",
    tolerance_nm: float = SURFACE_LATTICE_NM,
    site: Site | None = None,
    choose_site: Callable[[Frame, Analysis], Site | None] | None = None,
) -> WriteVerifyResult:
    """One cycle on ``adapter``'s current frame area: scan, analyse, ``query_sites``, bare the site's dimers
    (tip pulses in the simulator), rescan, analyse. ``ok`` iff a site was proposed, all its dimers were bared,
    the daemon's drift estimate was unambiguous, the daemon finds a new protrusion within ``tolerance_nm``
    (default one dimer pitch) of the drift-corrected site centre, and, in the simulator's truth, no chosen or
    bared dimer lies on a must-avoid defect (checked in both frames). ``site`` (pixels of the first frame) or
    ``choose_site(frame, analysis)`` replace ``query_sites`` (to exercise the loop with analyzers that propose
    none, or to test the checks)."""
    import time

    iid = adapter.instrument_id
    frame1 = adapter.acquire()
    t0 = time.perf_counter()
    before = send_frame(client, frame1, iid)
    t1 = time.perf_counter()
    if choose_site is not None:
        site = choose_site(frame1, before)
    sites = [site] if site is not None else client.query_sites(iid, pattern=pattern, limit=1)
    t2 = time.perf_counter()
    res = WriteVerifyResult(ok=False, reason="", frame_ids=[str(frame1.meta["frame_id"])])
    res.timings_ms = {"analyze_before": (t1 - t0) * 1e3, "query_sites": (t2 - t1) * 1e3}
    if not sites:
        res.reason = "the daemon proposed no site on this frame"
        return res
    site = sites[0]
    dimers = np.asarray(site.dimers, np.float64).reshape(-1, 2)
    res.site_center_px = [site.center_x_px, site.center_y_px]
    res.site_dimers_px = dimers.tolist()
    res.touched_must_avoid = must_avoid_under(frame1.meta["truth"], dimers)
    bared_nm = adapter.stm.depassivate_px(dimers)
    res.bared_count = int(len(bared_nm))

    frame2 = adapter.acquire()
    t3 = time.perf_counter()
    after = send_frame(client, frame2, iid)
    res.timings_ms["analyze_after"] = (time.perf_counter() - t3) * 1e3
    res.frame_ids.append(str(frame2.meta["frame_id"]))
    drift = client.last_reply.get("drift") or {}
    res.drift_method = drift.get("method")
    px_nm = frame2.pixel_size_nm
    truth = frame2.meta["truth"]
    bared_px = adapter.stm.sample_to_frame_px(bared_nm) if len(bared_nm) else np.zeros((0, 2))
    res.touched_must_avoid += must_avoid_under(truth, bared_px)
    if drift.get("drift_px") is not None:
        shift = np.asarray(drift["drift_px"], np.float64)
        res.drift_px = shift.tolist()
        expected = np.array(res.site_center_px) + shift
        res.expected_center_px = expected.tolist()
        # the daemon's view: a protrusion that was not there before, at the drift-corrected site
        fresh = _new_protrusions(before, after, shift, radius_px=2 * SURFACE_LATTICE_NM / px_nm)
        if fresh:
            d = np.array([np.hypot(f.x_px - expected[0], f.y_px - expected[1]) for f in fresh]) * px_nm
            k = int(np.argmin(d))
            res.found_patch_px = [fresh[k].x_px, fresh[k].y_px]
            res.found_distance_nm, res.found_area_cells = float(d[k]), float(fresh[k].area_cells)
        # the truth's view: where the patch really is
        patches = [t for t in truth.defects if t.cls == "litho_patch"]
        if patches:
            d = np.array([np.hypot(t.x_px - expected[0], t.y_px - expected[1]) for t in patches]) * px_nm
            k = int(np.argmin(d))
            res.truth_distance_nm, res.truth_patch_dimers = float(d[k]), int(patches[k].n_dimers)

    if res.touched_must_avoid:  # the worst outcome first
        res.reason = f"a chosen dimer touches must-avoid defects {sorted(set(res.touched_must_avoid))}"
    elif res.bared_count != len(dimers):
        res.reason = f"only {res.bared_count}/{len(dimers)} dimers could be bared"
    elif not res.drift_px:
        res.reason = (
            f"the daemon's drift estimate is {res.drift_method}: the site cannot be placed in the rescan"
        )
    elif not np.isfinite(res.found_distance_nm):
        res.reason = "the daemon found no new protrusion after the write"
    elif res.found_distance_nm > tolerance_nm:
        res.reason = f"nearest new protrusion is {res.found_distance_nm:.2f} nm from the drift-corrected site"
    else:
        res.ok, res.reason = True, "patch found at the site"
    return res


def main() -> None:  # pragma: no cover - manual entry point
    import argparse
    import json

    from instrument_adapters.simulated import SimulatedAdapter
    from stm_feedback.client import Client
    from stm_feedback.demo import start_daemon

    ap = argparse.ArgumentParser(description="one write-then-verify cycle on the simulated STM")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--pixels", type=int, default=256)
    args = ap.parse_args()
    server, label = start_daemon()
    try:
        with Client(server.endpoint, timeout_ms=120_000) as client:
            adapter = SimulatedAdapter(seed=args.seed, pixels=args.pixels, size_nm=args.pixels * 0.1)
            result = write_then_verify(adapter, client)
    finally:
        server.stop()
    print(f"analyzer: {label}")
    print(result.summary())
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
