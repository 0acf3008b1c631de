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
    from instrument_adapters.simulated import SimulatedAdapter
    from stm_feedback.client import Client
    from stm_feedback.schema import Site


@dataclass
class WriteVerifyResult:
    """Outcome of one cycle; positions in pixels of the first (site) / second (verify) frame."""

    ok: bool
    reason: str
    site_center_px: list[float] = field(default_factory=list)
    site_dimers_px: list[list[float]] = field(default_factory=list)
    bared_count: int = 0
    drift_px: list[float] = field(default_factory=list)  # daemon's frame-to-frame estimate
    expected_center_px: list[float] = field(default_factory=list)  # site + drift, in the verify frame
    found_patch_px: list[float] = field(default_factory=list)  # new bright defect nearest the expected place
    found_distance_nm: float = float("nan")
    truth_distance_nm: float = float(
        "nan"
    )  # truth litho patch centre vs expected (checks the drift estimate)
    touched_must_avoid: list[str] = field(default_factory=list)  # truth classes under the bared dimers
    frame_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _new_protrusions(before: Any, after: Any, shift_px: np.ndarray, radius_px: float) -> np.ndarray:
    """(N, 2) px of protrusions in ``after`` with no protrusion of ``before`` (moved by ``shift_px``)
    nearby."""
    old = (
        np.array([[d.x_px, d.y_px] for d in before.defects if d.kind == "protrusion"]).reshape(-1, 2)
        + shift_px
    )
    new = np.array([[d.x_px, d.y_px] for d in after.defects if d.kind == "protrusion"]).reshape(-1, 2)
    if len(old) == 0 or len(new) == 0:
        return new
    dist = np.hypot(new[:, None, 0] - old[None, :, 0], new[:, None, 1] - old[None, :, 1]).min(axis=1)
    return new[dist > radius_px]


def write_then_verify(
    adapter: SimulatedAdapter,
    client: Client,
    pattern: str = "3x1",
    tolerance_nm: float = SURFACE_LATTICE_NM,
    site: Site | None = None,
) -> WriteVerifyResult:
    """One cycle on ``adapter``'s current frame area. ``ok`` iff a site was proposed, all its dimers were
    bared, the daemon finds a new protrusion within ``tolerance_nm`` (+ half a patch length) of the
    drift-corrected site centre, and no bared dimer lies on a must-avoid defect in the simulator's truth."""
    iid = adapter.instrument_id
    frame1 = adapter.acquire()
    before = send_frame(client, frame1, iid)
    sites = [site] if site is not None else client.query_sites(iid, pattern=pattern, limit=1)
    res = WriteVerifyResult(ok=False, reason="", frame_ids=[str(frame1.meta["frame_id"])])
    if not sites:
        res.reason = "the daemon proposed no site on this frame"
        return res
    site = sites[0]
    dimers = np.asarray(site.dimers, np.float64).reshape(-1, 2)
    res.site_center_px = [site.center_x_px, site.center_y_px]
    res.site_dimers_px = dimers.tolist()
    bared_nm = adapter.stm.depassivate_px(dimers)
    res.bared_count = int(len(bared_nm))

    frame2 = adapter.acquire()
    after = send_frame(client, frame2, iid)
    res.frame_ids.append(str(frame2.meta["frame_id"]))
    drift = (client.last_reply.get("drift") or {}).get("drift_px") or [0.0, 0.0]
    shift = np.asarray(drift, np.float64)
    res.drift_px = shift.tolist()
    px_nm = frame2.pixel_size_nm
    expected = np.array(res.site_center_px) + shift
    res.expected_center_px = expected.tolist()

    # the daemon's view: a protrusion that was not there before, at the drift-corrected site
    fresh = _new_protrusions(before, after, shift, radius_px=2 * SURFACE_LATTICE_NM / px_nm)
    if len(fresh):
        d = np.hypot(*(fresh - expected).T) * px_nm
        k = int(np.argmin(d))
        res.found_patch_px, res.found_distance_nm = fresh[k].tolist(), float(d[k])

    # the truth's view: where the patch really is, and what lies under the bared dimers
    truth = frame2.meta["truth"]
    patches = np.array([[t.x_px, t.y_px] for t in truth.defects if t.cls == "litho_patch"]).reshape(-1, 2)
    if len(patches):
        res.truth_distance_nm = float(np.hypot(*(patches - expected).T).min() * px_nm)
    bared_px = adapter.stm.sample_to_frame_px(bared_nm) if len(bared_nm) else np.zeros((0, 2))
    by_id = {t.id: t for t in truth.defects}
    h, w = truth.defect_instances.shape
    for x, y in bared_px:
        r, c = int(round(y)), int(round(x))
        if not (0 <= r < h and 0 <= c < w):
            continue
        ids = np.unique(truth.defect_instances[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2])
        res.touched_must_avoid += [by_id[i].cls for i in ids if i in by_id and by_id[i].must_avoid]

    half_patch_nm = 0.5 * (len(dimers) - 1) * SURFACE_LATTICE_NM
    if res.bared_count != len(dimers):
        res.reason = f"only {res.bared_count}/{len(dimers)} dimers could be bared"
    elif res.touched_must_avoid:
        res.reason = f"a bared dimer touches must-avoid defects {sorted(set(res.touched_must_avoid))}"
    elif not np.isfinite(res.found_distance_nm):
        res.reason = "the daemon found no new protrusion after the write"
    elif res.found_distance_nm > tolerance_nm + half_patch_nm:
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
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
