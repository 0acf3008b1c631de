"""``stm-feedback library``: inspect and curate the defect library (list, show, relabel, export, cluster,
train, figures) and fill it from simulated frames (``add-sim``, with ground-truth labels for evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DbOption = Annotated[Path | None, typer.Option("--db", help="library file (default: settings.library.path)")]


def _open(db: Path | None, must_exist: bool = True):  # noqa: ANN202 - DefectLibrary
    from stm_feedback.config import load_settings
    from stm_feedback.library import DefectLibrary

    path = db if db is not None else load_settings().library.path
    if must_exist and not Path(path).exists():
        typer.echo(f"error: no library at {path}", err=True)
        raise typer.Exit(2)
    return DefectLibrary(path)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def ari_by_kind(lib) -> dict[str, float | None]:  # noqa: ANN001 - DefectLibrary
    """Adjusted Rand index of the stored clusters against the stored true labels, per kind (None if a kind
    has no defect with a true label)."""
    from sklearn.metrics import adjusted_rand_score

    from stm_feedback.physics import KINDS

    recs = [r for r in lib.defects() if r.true_label and r.cluster >= 0]
    out: dict[str, float | None] = {}
    for kind in KINDS:
        sub = [r for r in recs if r.kind == kind]
        out[kind] = (
            float(adjusted_rand_score([r.true_label for r in sub], [r.cluster for r in sub])) if sub else None
        )
    return out


def register(app: typer.Typer) -> None:
    """Add the ``library`` command group to app."""
    lib_app = typer.Typer(help="The persistent defect library (SQLite): list, show, relabel, train, figures.")
    app.add_typer(lib_app, name="library")

    @lib_app.command("list")
    def list_cmd(
        db: DbOption = None,
        kind: Annotated[str | None, typer.Option(help="protrusion | depression")] = None,
        cluster: Annotated[int | None, typer.Option(help="mean-shift cluster id")] = None,
        label: Annotated[str | None, typer.Option(help="expert (else predicted) label")] = None,
        frame: Annotated[int | None, typer.Option(help="frame id")] = None,
        limit: Annotated[int, typer.Option(help="rows to print (0 = all)")] = 50,
        summary: Annotated[bool, typer.Option(help="counts per kind/cluster/label instead of rows")] = False,
    ) -> None:
        """Table of defects (id, frame, position, kind, features, cluster, labels)."""
        from collections import Counter

        from stm_feedback.classify import FEATURE_NAMES

        with _open(db) as lib:
            recs = lib.defects(kind=kind, cluster=cluster, label=label, frame_id=frame)
            if summary:
                counts = Counter((r.kind, r.cluster, r.label) for r in recs)
                typer.echo(f"{'kind':<11} {'cluster':>7} {'label':<22} {'n':>6}")
                for (k, c, lab), n in sorted(counts.items(), key=lambda t: (t[0][0], t[0][1], -t[1])):
                    typer.echo(f"{k:<11} {c:>7} {lab:<22} {n:>6}")
                typer.echo(f"{len(recs)} defects")
                return
            short = [n[:11] for n in FEATURE_NAMES]
            typer.echo(
                f"{'id':>6} {'frame':>5} {'x_px':>7} {'y_px':>7} {'kind':<10} "
                + " ".join(f"{s:>11}" for s in short)
                + f" {'cluster':>7} {'expert':<14} {'predicted':<14}"
            )
            for r in recs[: limit or None]:
                typer.echo(
                    f"{r.id:>6} {r.frame_id:>5} {r.x_px:>7.1f} {r.y_px:>7.1f} {r.kind:<10} "
                    + " ".join(f"{v:>11.3f}" for v in r.features)
                    + f" {r.cluster:>7} {r.expert_label or '-':<14} {r.predicted_label or '-':<14}"
                )
            if limit and len(recs) > limit:
                typer.echo(f"... {len(recs) - limit} more (--limit 0 for all)")

    @lib_app.command("show")
    def show_cmd(
        defect_id: Annotated[int, typer.Argument(help="defect id")],
        db: DbOption = None,
        png: Annotated[
            Path | None, typer.Option(help="write the patch here (default defect-<id>.png)")
        ] = None,
    ) -> None:
        """One defect: all fields, features, and its row-aligned patch as a PNG."""
        from stm_feedback.classify import FEATURE_NAMES

        with _open(db) as lib:
            recs = lib.defects(ids=[defect_id], with_patches=True)
            if not recs:
                _fail(KeyError(f"no defect {defect_id}"))
            r = recs[0]
            frame = next(f for f in lib.frames() if f["id"] == r.frame_id)
        typer.echo(f"defect {r.id}  frame {r.frame_id} ({frame['source']}, {frame['pixel_size_nm']} nm/px)")
        typer.echo(f"  x_px {r.x_px:.2f}  y_px {r.y_px:.2f}  kind {r.kind}  cluster {r.cluster}")
        typer.echo(f"  expert {r.expert_label}  predicted {r.predicted_label}  true {r.true_label}")
        for name, v in zip(FEATURE_NAMES, r.features, strict=True):
            typer.echo(f"  {name:<18} {v:.4f}")
        if r.patch is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            out = png or Path(f"defect-{r.id}.png")
            fig, ax = plt.subplots(figsize=(3.2, 3))
            im = ax.imshow(r.patch, cmap="afmhot")
            fig.colorbar(im, ax=ax, label="height (nm)")
            ax.set_title(f"defect {r.id}: {r.label}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.tight_layout()
            fig.savefig(out, dpi=110)
            plt.close(fig)
            typer.echo(f"  patch -> {out}")

    @lib_app.command("relabel")
    def relabel_cmd(
        label: Annotated[str, typer.Option(help="expert class name ('' clears)")],
        db: DbOption = None,
        defect_id: Annotated[int | None, typer.Option("--id", help="one defect")] = None,
        cluster: Annotated[
            int | None, typer.Option(help="every defect of this cluster (needs --kind)")
        ] = None,
        kind: Annotated[str | None, typer.Option(help="protrusion | depression")] = None,
    ) -> None:
        """Set the expert label of one defect (--id) or of a whole cluster (--cluster K --kind KIND)."""
        from stm_feedback.errors import InputError

        with _open(db) as lib:
            try:
                n = lib.relabel(label or None, defect_id=defect_id, cluster=cluster, kind=kind)
            except InputError as exc:
                _fail(exc)
        typer.echo(f"relabelled {n} defect(s) as {label or '(none)'}")

    @lib_app.command("export")
    def export_cmd(
        out: Annotated[Path, typer.Option("--out", help="output directory")],
        db: DbOption = None,
    ) -> None:
        """Write defects.csv, defects.json and patches.npz."""
        with _open(db) as lib:
            paths = lib.export(out)
        for p in paths.values():
            typer.echo(str(p))

    @lib_app.command("cluster")
    def cluster_cmd(
        db: DbOption = None,
        quantile: Annotated[float | None, typer.Option(help="estimate_bandwidth quantile")] = None,
        space: Annotated[
            str | None,
            typer.Option(help="'embedding' | 'features' (default: settings.library.cluster_space)"),
        ] = None,
        embedding: Annotated[
            Path | None,
            typer.Option(help="class embedding JSON to cluster in (e.g. from fit-embedding --labels expert)"),
        ] = None,
    ) -> None:
        """Mean shift over the whole library (per kind); stores the model and every defect's cluster. Prints
        cluster sizes and, where true labels exist (simulated frames), the ARI per kind."""
        from stm_feedback.config import load_settings
        from stm_feedback.embedding import ClassEmbedding, embedding_for
        from stm_feedback.errors import ModelError
        from stm_feedback.physics import KINDS

        if space not in (None, "embedding", "features"):
            _fail(ValueError("--space must be 'embedding' or 'features'"))
        if embedding is not None and space == "features":
            _fail(ValueError("--embedding and --space features exclude each other"))
        try:
            if embedding is not None:
                emb = ClassEmbedding.load(embedding)
            else:
                emb = embedding_for(load_settings(**({"library__cluster_space": space} if space else {})))
        except ModelError as exc:
            _fail(exc)
        with _open(db) as lib:
            model = lib.fit_clusters(quantile=quantile, embedding=emb)
            typer.echo(f"space: {'class embedding' if emb is not None else 'features'}")
            for kind in KINDS:
                if kind in model.kinds:
                    kc = model.kinds[kind]
                    typer.echo(f"{kind}: {len(kc.sizes)} clusters, sizes {kc.sizes.tolist()}")
            for kind, ari in ari_by_kind(lib).items():
                if ari is not None:
                    typer.echo(f"ARI vs true classes ({kind}): {ari:.3f}")

    @lib_app.command("ari")
    def ari_cmd(db: DbOption = None) -> None:
        """ARI of the stored clusters against the stored true labels (simulated frames), per kind, without
        refitting: e.g. the clusters the pipeline gave while recording (``add-sim --detections nets``)."""
        with _open(db) as lib:
            for kind, ari in ari_by_kind(lib).items():
                typer.echo(f"ARI vs true classes ({kind}): " + ("n/a" if ari is None else f"{ari:.3f}"))

    @lib_app.command("train")
    def train_cmd(
        db: DbOption = None,
        folds: Annotated[int, typer.Option(help="cross-validation folds")] = 5,
        predict: Annotated[bool, typer.Option(help="then re-predict every defect's label")] = True,
        from_truth: Annotated[
            bool, typer.Option(help="use simulator true labels as the expert labels (evaluation only)")
        ] = False,
    ) -> None:
        """Fit the supervised classifier (random forest per kind) on the expert labels; print CV accuracy."""
        from stm_feedback.errors import InputError

        with _open(db) as lib:
            if from_truth:
                typer.echo(f"expert labels from simulator truth: {lib.labels_from_truth()} defects")
            try:
                info = lib.train_classifier(cv_folds=folds)
            except InputError as exc:
                _fail(exc)
            typer.echo(f"classifier v{info['version']}: {info['n_train']} labelled defects")
            for kind, acc in info["cv_accuracy"].items():
                counts = info["label_counts"].get(kind, {})
                acc_s = "n/a" if acc is None else f"{acc:.3f}"
                ari = info["cv_ari"].get(kind)
                ari_s = "n/a" if ari is None else f"{ari:.3f}"
                typer.echo(f"  {kind}: {folds}-fold CV accuracy {acc_s}, ARI {ari_s}  labels {counts}")
            if predict:
                typer.echo(f"predicted labels for {lib.update_predictions()} defects")

    @lib_app.command("fit-embedding")
    def fit_embedding_cmd(
        out: Annotated[Path, typer.Option("--out", help="embedding JSON to write")],
        db: Annotated[list[Path], typer.Option("--db", help="labelled library (repeat for several)")],
        labels: Annotated[str, typer.Option(help="'true' (simulator truth) or 'expert' labels")] = "true",
        hidden: Annotated[str, typer.Option(help="hidden layer sizes, comma-separated")] = "32,16",
        alpha: Annotated[float, typer.Option(help="L2 penalty")] = 1e-3,
        seed: Annotated[int, typer.Option(help="random_state of the MLP")] = 0,
        clusters_out: Annotated[
            Path | None,
            typer.Option(help="also write mean-shift clusters in the new space over every defect here"),
        ] = None,
    ) -> None:
        """Train the class embedding (an MLP per kind, stm_feedback/embedding.py) that mean shift clusters in,
        on the labelled defects of one or more libraries; optionally the default cluster model too (the
        daemon's classes before a library has its own: models/defect_clusters.json)."""
        import json

        import numpy as np

        from stm_feedback.classify import ClusterModel
        from stm_feedback.embedding import fit_embedding
        from stm_feedback.errors import InputError

        if labels not in ("true", "expert"):
            _fail(ValueError("--labels must be 'true' or 'expert'"))
        xs, ks, ys = [], [], []
        for path in db:
            with _open(path) as lib:
                recs = [r for r in lib.defects() if np.all(np.isfinite(r.features))]
            xs += [r.features for r in recs]
            ks += [r.kind for r in recs]
            ys += [r.true_label if labels == "true" else r.expert_label for r in recs]
        try:
            sizes = tuple(int(v) for v in hidden.split(","))
            emb = fit_embedding(
                np.array(xs, float).reshape(len(xs), -1),
                ks,
                ys,
                hidden=sizes,
                alpha=alpha,
                seed=seed,
                meta={"labels": labels, "libraries": [Path(p).name for p in db]},
            )
        except (InputError, ValueError) as exc:
            _fail(exc)
        emb.save(out)
        for kind, n in emb.meta["n_train"].items():
            typer.echo(f"{kind}: {sum(n.values())} labelled defects {n}")
        typer.echo(f"wrote {out}")
        if clusters_out is not None:
            model = ClusterModel(embedding=emb)
            model.fit(np.array(xs, float).reshape(len(xs), -1), ks)
            d = model.to_dict()
            d["meta"] = {"fitted_on": [Path(p).name for p in db], "n_defects": len(xs)}
            clusters_out.write_text(json.dumps(d) + "\n")
            for kind, kc in model.kinds.items():
                typer.echo(f"{kind}: {len(kc.sizes)} clusters, sizes {kc.sizes.tolist()}")
            typer.echo(f"wrote {clusters_out}")

    @lib_app.command("figures")
    def figures_cmd(
        out: Annotated[Path, typer.Option("--out", help="output directory")],
        db: DbOption = None,
        by: Annotated[str, typer.Option(help="group by cluster | label | true")] = "cluster",
    ) -> None:
        """Dendrogram of the features, defects per class and row-aligned class-mean images (PNG)."""
        from stm_feedback.config import load_settings
        from stm_feedback.errors import InputError
        from stm_feedback.figures import library_figures

        with _open(db) as lib:
            try:
                paths = library_figures(
                    lib, out, by=by, patch_pixel_size_nm=load_settings().library.patch_pixel_size_nm
                )
            except InputError as exc:
                _fail(exc)
        for p in paths:
            typer.echo(str(p))

    @lib_app.command("add-sim")
    def add_sim_cmd(
        db: DbOption = None,
        suite: Annotated[str | None, typer.Option(help="evaluation suite: clean | realistic | hard")] = None,
        preset: Annotated[str, typer.Option(help="simulator preset (without --suite)")] = "realistic",
        first_seed: Annotated[int, typer.Option(help="first seed (without --suite)")] = 0,
        n: Annotated[int, typer.Option(help="frames")] = 10,
        size_px: Annotated[int, typer.Option(help="frame size (without --suite)")] = 256,
        pixel_size_nm: Annotated[
            float | None, typer.Option(help="fixed pixel size in nm (without --suite; default: the preset's)")
        ] = None,
        detections: Annotated[
            str,
            typer.Option(
                help="'truth': features of the ground-truth footprints; 'nets': the pipeline's own detected "
                "defects, true label from the truth defect matched at 0.40 nm (Hungarian), none if unmatched"
            ),
        ] = "truth",
        config: Annotated[Path | None, typer.Option(help="settings file (with --detections nets)")] = None,
    ) -> None:
        """Add simulated frames with their defects' features and true labels (evaluation of the classes):
        from the ground-truth footprints, or as the networks + pipeline detect them."""
        from tqdm import tqdm

        from stm_feedback.classify import features_from_truth
        from stm_feedback.config import load_settings

        if detections not in ("truth", "nets"):
            _fail(ValueError("--detections must be 'truth' or 'nets'"))
        if suite is not None and pixel_size_nm is not None:
            _fail(ValueError("--pixel-size-nm is for simulated frames (--preset), not --suite"))
        settings = load_settings(config)
        ls = settings.library
        pipe = None
        if detections == "nets":
            from stm_feedback.errors import ModelError
            from stm_feedback.pipeline import Pipeline

            try:
                pipe = Pipeline(settings)
                _ = pipe.runner
            except ModelError as exc:
                _fail(exc)
        if suite is not None:
            from stm_feedback.evaluation import suite_frames

            frames = ((f.seed, f.image_nm, f.truth) for f in suite_frames(suite, n))
            source = f"suite:{suite}"
        else:
            from simulator.frame import SimConfig, simulate_frame

            cfg = SimConfig.preset(preset)
            frames = (
                (s, (f := simulate_frame(s, size_px, pixel_size_nm, cfg)).image_nm, f.truth)
                for s in range(first_seed, first_seed + n)
            )
            source = f"sim:{preset}"
        total = 0
        with _open(db, must_exist=False) as lib:
            for seed, image, truth in tqdm(frames, total=n, desc="frames"):
                if pipe is not None:
                    from stm_feedback.library import analysis_rows, matched_true_labels

                    a = pipe.analyze(image, truth.pixel_size_nm, bias_v=truth.bias_v, frame_id=str(seed))
                    r = analysis_rows(image, a, ls.patch_size_px, ls.patch_pixel_size_nm)
                    lib.add_frame_with_defects(
                        f"{source}:{seed}",
                        truth.pixel_size_nm,
                        r.pop("xy_px"),
                        kinds := r.pop("kinds"),
                        r.pop("features"),
                        bias_v=truth.bias_v,
                        meta={"seed": seed, "features": "network detections"},
                        true_labels=matched_true_labels(a, truth),
                        **r,
                    )
                    total += len(kinds)
                    continue
                rows = features_from_truth(image, truth, ls.patch_size_px, ls.patch_pixel_size_nm)
                lib.add_frame_with_defects(
                    f"{source}:{seed}",
                    truth.pixel_size_nm,
                    rows.xy_px,
                    rows.kinds,
                    rows.features,
                    bias_v=truth.bias_v,
                    meta={"seed": seed, "features": "truth footprints"},
                    patches=rows.patches,
                    true_labels=list(rows.classes),
                )
                total += len(rows.kinds)
        typer.echo(f"added {n} frames, {total} defects")
