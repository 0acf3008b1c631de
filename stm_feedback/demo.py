"""The ``make demo`` job: a simulated STM session through the real daemon on loopback.

The daemon starts in-process on a free loopback port with the trained pipeline (or, when the pipeline or its
weights are missing, the classical baseline analyzer, said so on stdout). The simulated STM scans
``n_frames`` frames at different places; each frame streams to the daemon (half a frame as a partial
``analyze_lines`` while scanning, then the full frame), and the demo prints one line per frame: ground truth
(terraces, defects by class) and analysis (atoms, defects, terraces, sites, latency). PNG preview and overlay
per frame go to ``out_dir``. If the analyzer proposes sites, one write-then-verify cycle follows.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.readers import Frame
from stm_feedback.schema import Analysis

log = logging.getLogger(__name__)

DEFECT_COLOURS = {
    "protrusion": "#ff3030",
    "depression": "#30a0ff",
}


def start_daemon(warmup_px: int = 64) -> tuple[Any, str]:
    """Start ``stm_feedback.server.Server`` on ``tcp://127.0.0.1:*``; returns (server, analyzer label)."""
    from stm_feedback.config import ServerSettings, load_settings
    from stm_feedback.server import BaselineAnalyzer, Server, load_analyzer

    settings = load_settings()
    try:
        analyzer: Any = load_analyzer(settings)
        label = settings.server.analyzer
    except Exception as exc:  # no pipeline module or no weights yet: the daemon still runs, classically
        analyzer = BaselineAnalyzer()
        label = f"classical baseline (pipeline unavailable: {type(exc).__name__}: {exc})"
    server_settings = ServerSettings(**{**settings.server.model_dump(), "warmup_px": warmup_px})
    server = Server(analyzer, server_settings, bind="tcp://127.0.0.1:*").start()
    return server, label


def truth_summary(truth: Any) -> str:
    """``terraces=N defects: cls=k ...`` from a simulator GroundTruth."""
    counts = Counter(d.cls for d in truth.defects)
    defects = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    return f"terraces={len(truth.terraces)} defects[{defects}] tip={truth.tip_state}"


def analysis_summary(a: Analysis) -> str:
    by_kind = Counter(d.kind for d in a.defects)
    return (
        f"atoms={len(a.atoms)} dimers={len(a.dimers)} defects={len(a.defects)}"
        f"(+{by_kind.get('protrusion', 0)}/-{by_kind.get('depression', 0)}) "
        f"terraces={len(a.terraces)} sites={len(a.sites)}"
    )


def save_preview(path: Path, image_nm: np.ndarray, title: str) -> None:
    """Grey-scale PNG of a topograph (robust 1-99 % contrast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.nanpercentile(image_nm, [1, 99])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(image_nm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_overlay(path: Path, image_nm: np.ndarray, analysis: Analysis, title: str, truth: Any = None) -> None:
    """PNG of the frame with atoms (yellow dots), defects (red protrusions, blue depressions, labelled),
    terrace boundaries (white contour of ``terrace_labels``) and proposed sites (green dimers); with a
    simulator ``truth``, its defect centres too (orange + must-avoid, violet x others), to judge by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.nanpercentile(image_nm, [1, 99])
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    ax.imshow(image_nm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if analysis.atoms:
        xy = np.array([[a.x_px, a.y_px] for a in analysis.atoms])
        ax.plot(xy[:, 0], xy[:, 1], ".", color="#ffd000", ms=1.2, alpha=0.6)
    if analysis.terrace_labels is not None and len(analysis.terraces) > 1:
        ax.contour(
            analysis.terrace_labels,
            levels=np.unique(analysis.terrace_labels)[:-1] + 0.5,
            colors="white",
            linewidths=0.6,
        )
    for d in analysis.defects:
        colour = DEFECT_COLOURS.get(d.kind, "#ff00ff")
        r = max(3.0, float(np.sqrt(max(d.area_nm2, 0.01) / np.pi)) / analysis.image.pixel_size_nm)
        ax.add_patch(plt.Circle((d.x_px, d.y_px), r, fill=False, color=colour, lw=0.9))
        ax.text(d.x_px + r, d.y_px - r, d.label, color=colour, fontsize=5)
    for s in analysis.sites:
        dx = np.array(s.dimers).reshape(-1, 2)
        ax.plot(dx[:, 0], dx[:, 1], "s", mfc="none", mec="#00ff60", ms=4, mew=0.9)
    if truth is not None:
        for avoid, marker, colour in ((True, "+", "#ff9900"), (False, "x", "#c080ff")):
            xy = np.array([[d.x_px, d.y_px] for d in truth.defects if d.must_avoid == avoid]).reshape(-1, 2)
            ax.plot(xy[:, 0], xy[:, 1], marker, color=colour, ms=6, mew=1.2)
        ax.text(
            0.01,
            -0.02,
            "analysis: red/blue circles = protrusion/depression, green squares = site dimers, yellow = "
            "atoms; truth: orange + = must-avoid, violet x = other defects",
            transform=ax.transAxes,
            fontsize=5.5,
            va="top",
        )
    ax.set_xlim(-0.5, image_nm.shape[1] - 0.5)
    ax.set_ylim(image_nm.shape[0] - 0.5, -0.5)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_write_verify(path: Path, image_nm: np.ndarray, res: Any) -> None:
    """PNG of the rescan after a write: drift-corrected site (green squares), the new protrusion the daemon
    found (red circle) and the site where it was chosen (white cross), zoomed on the site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.nanpercentile(image_nm, [1, 99])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.imshow(image_nm, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    shift = np.asarray(res.drift_px or [0.0, 0.0])
    dimers = np.asarray(res.site_dimers_px).reshape(-1, 2) + shift
    ax.plot(dimers[:, 0], dimers[:, 1], "s", mfc="none", mec="#00ff60", ms=9, mew=1.2)
    ax.plot(*res.site_center_px, "+", color="white", ms=12)
    if res.found_patch_px:
        ax.add_patch(plt.Circle(tuple(res.found_patch_px), 6, fill=False, color="#ff3030", lw=1.2))
    cx, cy = res.expected_center_px or res.site_center_px
    ax.set_xlim(cx - 30, cx + 30)
    ax.set_ylim(cy + 30, cy - 30)
    ax.set_title(
        f"after the write: {'OK' if res.ok else 'FAILED'} ({res.reason})\n"
        "green = site + drift, white + = site before drift, red = new protrusion found",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(
    out_dir: str | Path,
    n_frames: int = 3,
    seed: int = 7,
    pixels: int = 256,
    preset: str = "realistic",
    write_verify: bool = True,
) -> dict[str, Any]:
    """Run the demo session; prints per-frame lines, writes PNGs, ``summary.json`` and ``summary.txt``
    into ``out_dir`` and returns the summary dict."""
    from instrument_adapters.base import send_frame
    from instrument_adapters.simulated import SimulatedAdapter
    from stm_feedback.client import Client

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    t_start = time.perf_counter()
    server, label = start_daemon()
    summary: dict[str, Any] = {"analyzer": label, "endpoint": server.endpoint, "frames": []}
    say(f"daemon on {server.endpoint}; analyzer: {label}")
    try:
        with Client(server.endpoint, timeout_ms=120_000, retries=0) as client:
            size_nm = pixels * 0.1
            adapter = SimulatedAdapter(
                seed=seed,
                preset=preset,
                pixels=pixels,
                size_nm=size_nm,
                client=client,
                lines_every=pixels // 2,
            )
            for i in range(n_frames):
                # a new area per frame: move the stage by more than a frame width
                adapter.stm.set_frame(
                    center_x_nm=i * 1.5 * size_nm,
                    center_y_nm=0.0,
                    size_nm=size_nm,
                    pixels=pixels,
                    angle_deg=0.0,
                )
                frame = adapter.acquire()
                t0 = time.perf_counter()
                analysis = send_frame(client, frame, adapter.instrument_id)
                rtt_ms = (time.perf_counter() - t0) * 1e3
                summary["frames"].append(_report_frame(out, frame, analysis, rtt_ms, client.last_reply, say))
            if write_verify:
                summary["write_verify"] = _write_verify(out, adapter, client, say)
            summary["stats"] = client.stats()
    finally:
        server.stop()
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    say(f"done in {summary['wall_s']} s; outputs in {out}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return summary


def truth_check(truth: Any, analysis: Analysis) -> dict[str, Any]:
    """The analysis scored against the simulator's truth (``stm_feedback.metrics.score_frame``) plus the
    planner's safety in truth terms: how many proposed sites touch a must-avoid defect."""
    from instrument_adapters.demo_write_verify import must_avoid_under
    from stm_feedback.metrics import score_frame

    score = score_frame(truth, analysis)
    unsafe = sum(bool(must_avoid_under(truth, np.asarray(s.dimers))) for s in analysis.sites)
    return {
        "atoms_precision": round(score.atoms.precision, 3),
        "atoms_recall": round(score.atoms.recall, 3),
        "defects_precision": round(score.defects.precision, 3),
        "defects_recall": round(score.defects.recall, 3),
        "truth_defects": len(truth.defects),
        "truth_must_avoid": sum(d.must_avoid for d in truth.defects),
        "terrace_ari": round(score.terrace_ari, 3),
        "sites_on_must_avoid": unsafe,
    }


def drift_text(drift: dict[str, Any] | None) -> str:
    """``drift (+0.4, -1.2) px [image+defects]``, ``drift ambiguous`` or ``drift -`` (first frame)."""
    if not drift or drift.get("method") is None:
        return "drift -"
    if drift.get("drift_px") is None:
        return f"drift {drift['method']}"
    dx, dy = drift["drift_px"]
    return f"drift ({dx:+.1f}, {dy:+.1f}) px [{drift['method']}]"


def frame_line(
    fid: str,
    frame: Frame,
    analysis: Analysis,
    check: dict[str, Any] | None,
    reply: dict[str, Any],
    rtt_ms: float,
) -> str:
    """The demo's one line per frame: what was scanned, what was found (against the truth where known), the
    daemon's drift estimate, and where the time went."""
    by_kind = Counter(d.kind for d in analysis.defects)
    t = reply.get("timings_ms", {})
    nets = t.get("pipeline.networks")
    parts = [
        f"{fid}: {frame.height_px}x{frame.width_px} px @ {frame.pixel_size_nm:.3f} nm, {frame.bias_v:+.2f} V"
    ]
    if check is not None:
        c = check
        n_prot, n_depr = by_kind.get("protrusion", 0), by_kind.get("depression", 0)
        parts.append(
            f"atoms {len(analysis.atoms)} (P {c['atoms_precision']:.2f} R {c['atoms_recall']:.2f}) | "
            f"defects {len(analysis.defects)} (+{n_prot}/-{n_depr}; P {c['defects_precision']:.2f} "
            f"R {c['defects_recall']:.2f} of {c['truth_defects']}, "
            f"{check['truth_must_avoid']} must-avoid) | terraces {len(analysis.terraces)} "
            f"(ARI {check['terrace_ari']:.2f}) | sites {len(analysis.sites)} "
            f"({check['sites_on_must_avoid']} on must-avoid)"
        )
    else:
        parts.append(analysis_summary(analysis))
    parts.append(drift_text(reply.get("drift")))
    parts.append(
        f"{rtt_ms:.0f} ms round trip (server {t.get('total', float('nan')):.0f}"
        + (f", networks {nets:.0f}" if nets is not None else "")
        + f", analysis {t.get('analyze', float('nan')):.0f})"
    )
    return " | ".join(parts)


def _report_frame(
    out: Path, frame: Frame, analysis: Analysis, rtt_ms: float, reply: dict[str, Any], say: Any
) -> dict[str, Any]:
    fid = str(frame.meta["frame_id"])
    truth = frame.meta.get("truth")
    check = truth_check(truth, analysis) if truth is not None else None
    say(frame_line(fid, frame, analysis, check, reply, rtt_ms))
    partial = frame.meta.get("partial_analysis")
    if partial is not None:
        say(f"  partial frame ({partial.image.height_px} lines) while scanning: {analysis_summary(partial)}")
    if truth is not None:
        say(f"  truth: {truth_summary(truth)}")
    save_preview(out / f"{fid}.png", frame.image, f"{fid} (simulated, {frame.pixel_size_nm:.3f} nm/px)")
    save_overlay(
        out / f"{fid}_overlay.png", frame.image, analysis, f"{fid}: {analysis_summary(analysis)}", truth=truth
    )
    (out / f"{fid}.json").write_text(json.dumps(analysis.to_json_dict()))
    return {
        "frame_id": fid,
        "shape": [frame.height_px, frame.width_px],
        "pixel_size_nm": frame.pixel_size_nm,
        "truth_defects": dict(Counter(d.cls for d in truth.defects)) if truth is not None else None,
        "atoms": len(analysis.atoms),
        "defects": len(analysis.defects),
        "terraces": len(analysis.terraces),
        "sites": len(analysis.sites),
        "truth_check": check,
        "drift": reply.get("drift"),
        "round_trip_ms": round(rtt_ms, 1),
        "server_ms": float(reply.get("timings_ms", {}).get("total", float("nan"))),
    }


def _write_verify(out: Path, adapter: Any, client: Any, say: Any) -> dict[str, Any]:
    from instrument_adapters.demo_write_verify import write_then_verify

    res = write_then_verify(adapter, client)
    say(res.summary())
    if res.site_center_px and len(res.frame_ids) == 2:
        sim = adapter.stm.last_frame
        fid = res.frame_ids[1]
        save_write_verify(out / f"{fid}_write_verify.png", sim.image_nm, res)
    return res.to_dict()
