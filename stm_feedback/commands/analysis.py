# ruff: noqa: B008  (typer declares CLI options as argument defaults)
"""``stm-feedback analyze FILE... --out DIR [--overlay]``: analyse many frames with one resident Pipeline.

Per input ``<name>.<ext>`` it writes ``DIR/<name>.json`` (schema stm-feedback.analysis/1), ``DIR/<name>.npz``
(terrace_labels int32, safe_mask bool) and with ``--overlay`` ``DIR/<name>.png``. Without a defect library the
mean-shift classes are fitted once over all defects of the call (per kind) after every frame is analysed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

SCHEMA_FEATURES = ("height_rel", "area_cells", "circularity")


def cluster_batch(analyses: list, embedding: object = None) -> None:
    """Mean shift (classify.ClusterModel, per kind) over the defects of all analyses; sets ``cluster`` and,
    where no classifier class name was given, ``label = "<kind>-<cluster>"``. Modifies the analyses in place.

    Clustered on every feature (``Analysis.defect_features``, undefined values as 0) and, when ``embedding``
    is given (``embedding.ClassEmbedding``), on its class probabilities; analyses without the full feature
    rows (built by hand) are clustered on the three schema features (height_rel, area_cells, circularity)."""
    from stm_feedback.classify import FEATURE_NAMES, ClusterModel
    from stm_feedback.physics import DEFECT_CLASSES

    owners = [(a, i) for a in analyses for i in range(len(a.defects))]
    if not owners:
        return
    full = all(
        getattr(a, "defect_features", None) is not None and len(a.defect_features) == len(a.defects)
        for a in analyses
    )
    if full:
        x = np.concatenate(
            [np.asarray(a.defect_features, float).reshape(-1, len(FEATURE_NAMES)) for a in analyses]
        )
        model = ClusterModel(embedding=embedding)
    else:
        x = np.array([[getattr(a.defects[i], n) for n in SCHEMA_FEATURES] for a, i in owners], dtype=float)
        model = ClusterModel(feature_names=SCHEMA_FEATURES)
    x = np.where(np.isfinite(x), x, 0.0)
    kinds = [a.defects[i].kind for a, i in owners]
    ids = model.fit(x, kinds)
    for (a, i), c in zip(owners, ids, strict=True):
        d = a.defects[i]
        d.cluster = int(c)
        if d.label not in DEFECT_CLASSES:
            d.label = f"{d.kind}-{int(c)}"


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` command."""

    @app.command("analyze")
    def analyze_cmd(
        files: list[Path] = typer.Argument(
            ..., help="frames: .npy (+ <name>.meta.json), .sxm, .gwy, .Z_mtrx"
        ),
        out: Path = typer.Option(..., "--out", help="output directory"),
        pixel_size_nm: float | None = typer.Option(None, help="override/supply the pixel size (nm)"),
        bias_v: float | None = typer.Option(None, help="override/supply the sample bias (V)"),
        overlay: bool = typer.Option(False, "--overlay", help="also write <name>.png overlays"),
        library: Path | None = typer.Option(None, help="defect library (SQLite) whose models name classes"),
        maps_from: str = typer.Option(
            "nets", help="'nets' (trained models) or 'baseline' (classical maps, no weights needed)"
        ),
        config: Path | None = typer.Option(None, help="settings file (TOML/JSON)"),
    ) -> None:
        """Analyse frames: atoms, dimers, defects, terraces, safe mask, write sites; JSON + NPZ per file."""
        from stm_feedback.config import load_settings
        from stm_feedback.errors import StmFeedbackError
        from stm_feedback.pipeline import Pipeline
        from stm_feedback.readers import read_frame

        settings = load_settings(config)
        lib = None
        if library is not None:
            from stm_feedback.library import DefectLibrary

            lib = DefectLibrary(library)
        runner = None
        if maps_from == "baseline":
            runner = BaselineMapsRunner()
        elif maps_from != "nets":
            raise typer.BadParameter("--maps-from must be 'nets' or 'baseline'")
        recorder = None
        if lib is not None and settings.library.record:  # every analysed defect goes into the library
            from stm_feedback.library import LibraryRecorder

            ls = settings.library
            recorder = LibraryRecorder(lib, ls.patch_size_px, ls.patch_pixel_size_nm, ls.record_queue)
        pipe = Pipeline(settings, runner=runner, library=lib, recorder=recorder)
        out.mkdir(parents=True, exist_ok=True)
        done: list[tuple[Path, object, np.ndarray]] = []
        failed = 0
        for path in files:
            try:
                frame = read_frame(path, pixel_size_nm=pixel_size_nm, bias_v=bias_v)
                a = pipe.analyze(frame.image, frame.pixel_size_nm, bias_v=frame.bias_v, frame_id=path.stem)
            except StmFeedbackError as exc:
                typer.echo(f"error: {path}: {exc}", err=True)
                failed += 1
                continue
            done.append((path, a, frame.image))
        if recorder is not None:
            recorder.close()  # written with the per-frame classes; batch clusters below are JSON-only
        if lib is None or lib.cluster_model() is None:
            from stm_feedback.embedding import embedding_for
            from stm_feedback.errors import ModelError

            try:
                embedding = embedding_for(settings)
            except ModelError as exc:  # the analyses are done: keep them, cluster on the features
                typer.echo(f"warning: {exc}; classes from the features instead", err=True)
                embedding = None
            cluster_batch([a for _, a, _ in done], embedding)
        for path, a, image in done:
            base = out / path.stem
            base.with_suffix(".json").write_text(json.dumps(a.to_json_dict(), indent=1))
            np.savez_compressed(base.with_suffix(".npz"), **a.maps())
            if overlay:
                from stm_feedback.overlay import render_overlay

                render_overlay(image, a, base.with_suffix(".png"))
            typer.echo(
                f"{path.name}: {len(a.atoms)} atoms, {len(a.dimers)} dimers, {len(a.defects)} defects, "
                f"{len(a.terraces)} terraces, {len(a.sites)} sites, post-processing "
                f"{a.timings_ms.get('total', 0.0) - a.timings_ms.get('networks', 0.0):.1f} ms, "
                f"{a.quality.polarity} state ({a.quality.polarity_source})"
                + ("" if a.quality.polarity_source == "bias" else "; no bias: no sites (give --bias-v)")
                + (
                    f"; scan-line jitter removed (rms {a.quality.line_jitter_rms_px:.2f} px, "
                    f"{a.timings_ms.get('line_jitter', 0.0):.0f} ms of it)"
                    if a.quality.line_jitter_rms_px > 0
                    else ""
                )
            )
        if failed:
            raise typer.Exit(code=1)


class BaselineMapsRunner:
    """Network stand-in for ``--maps-from baseline``: NetworkMaps built from the classical baseline's objects
    (stm_feedback.baseline) so the pipeline runs without trained weights. Not the networks."""

    backend = "baseline"
    device = "cpu"

    def versions(self) -> dict[str, str]:
        return {"maps": "baseline"}

    def predict(self, image: np.ndarray, pixel_size_nm: float, bias_v: float | None = None):  # noqa: ANN201
        from stm_feedback.baseline import analyze_baseline
        from stm_feedback.maps import NetworkMaps, bias_polarity

        a = analyze_baseline(image, pixel_size_nm, bias_v=bias_v)
        h, w = image.shape
        step = (a.terrace_labels < 0).astype(np.float32) if a.terrace_labels is not None else np.zeros((h, w))
        atom = np.zeros((h, w), np.float32)
        if a.atoms:
            xy = np.array([[p.x_px, p.y_px] for p in a.atoms])
            r = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
            c = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
            atom[r, c] = 1.0
        prot = np.zeros((h, w), np.float32)
        dep = np.zeros((h, w), np.float32)
        yy, xx = np.mgrid[:h, :w]
        for d in a.defects:
            r_px = max(1.0, np.sqrt(max(d.area_nm2, 0.05) / np.pi) / pixel_size_nm)
            sl = (
                slice(max(0, int(d.y_px - r_px - 1)), int(d.y_px + r_px + 2)),
                slice(max(0, int(d.x_px - r_px - 1)), int(d.x_px + r_px + 2)),
            )
            disc = (xx[sl] - d.x_px) ** 2 + (yy[sl] - d.y_px) ** 2 <= r_px**2
            (prot if d.kind == "protrusion" else dep)[sl][disc] = 1.0
        z = image * (-1.0 if (bias_v or -1.0) > 0 else 1.0)
        z = ((z - z.mean()) / (z.std() + 1e-12)).astype(np.float32)
        return NetworkMaps(step, atom, prot, dep, z, pixel_size_nm, *bias_polarity(bias_v))
