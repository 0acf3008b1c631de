"""``stm-feedback library ...`` end to end on a small library, and features from simulated truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_feedback.classify import FEATURE_NAMES, features_from_truth
from stm_feedback.cli import app
from stm_feedback.library import DefectLibrary

runner = CliRunner()


def _run(*args: str) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def sim_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("lib") / "lib.sqlite"
    out = _run("library", "add-sim", "--db", str(db), "--n", "3", "--size-px", "128", "--first-seed", "7")
    assert "added 3 frames" in out
    return db


def test_features_from_truth_on_a_simulated_frame() -> None:
    from simulator.frame import SimConfig, simulate_frame

    f = simulate_frame(11, size_px=128, pixel_size_nm=0.1, config=SimConfig.preset("realistic"))
    rows = features_from_truth(f.image_nm, f.truth, patch_size_px=16)
    present = {int(i) for i in np.unique(f.truth.defect_instances) if i > 0}
    assert len(rows.kinds) == len(present) > 0
    by_id = {d.id: d for d in f.truth.defects}
    assert sorted(rows.classes) == sorted(by_id[i].cls for i in present)
    assert rows.features.shape == (len(present), len(FEATURE_NAMES)) and np.isfinite(rows.features).all()
    assert rows.patches.shape == (len(present), 16, 16)
    # protrusions stand above the lattice, depressions below it
    h = rows.features[:, FEATURE_NAMES.index("height_rel")]
    assert np.all(h[rows.kinds == "protrusion"] > 0) and np.all(h[rows.kinds == "depression"] < 0.5)


def test_cli_cluster_train_list_show_relabel_export_figures(sim_db: Path, tmp_path: Path) -> None:
    db = str(sim_db)
    out = _run("library", "cluster", "--db", db)
    assert "clusters, sizes" in out and "ARI vs true classes" in out
    out = _run("library", "train", "--db", db, "--from-truth", "--folds", "2")
    assert "classifier v1" in out and "predicted labels for" in out
    out = _run("library", "list", "--db", db, "--kind", "depression", "--limit", "3")
    assert "depression" in out and "protrusion " not in out
    assert "defects" in _run("library", "list", "--db", db, "--summary")
    png = tmp_path / "d1.png"
    out = _run("library", "show", "1", "--db", db, "--png", str(png))
    assert "height_rel" in out and png.stat().st_size > 1000
    _run("library", "relabel", "--db", db, "--id", "1", "--label", "my_class")
    with DefectLibrary(sim_db) as lib:
        assert lib.defects(ids=[1])[0].expert_label == "my_class"
        kind = lib.defects(ids=[1])[0].kind
    out = _run("library", "relabel", "--db", db, "--cluster", "0", "--kind", kind, "--label", "big")
    assert out.startswith("relabelled")
    bad = runner.invoke(
        app, ["library", "relabel", "--db", db, "--cluster", "99", "--kind", kind, "--label", "x"]
    )
    assert bad.exit_code == 2 and "error" in bad.output
    _run("library", "export", "--db", db, "--out", str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "defects.csv").exists() and (tmp_path / "exp" / "patches.npz").exists()
    for by in ("cluster", "true"):
        _run("library", "figures", "--db", db, "--out", str(tmp_path / by), "--by", by)
        for name in ("dendrogram.png", "counts.png", "class_means.png"):
            assert (tmp_path / by / name).stat().st_size > 5000


def test_cli_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["library", "list", "--db", str(tmp_path / "nope.sqlite")])
    assert res.exit_code == 2 and "no library" in res.output


def test_trained_library_names_classes_in_later_analyses(tmp_path: Path) -> None:
    """Issue 4 item 7's loop: library -> expert labels -> `library train` -> a later analysis with that
    library names its defects with the classifier's classes (oracle maps: no trained networks needed)."""
    from simulator.frame import SimConfig
    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline
    from tests.test_pipeline_oracle import oracle_maps, simulate

    db = tmp_path / "lib.sqlite"
    _run("library", "add-sim", "--db", str(db), "--n", "6", "--size-px", "128", "--first-seed", "21")
    _run("library", "cluster", "--db", str(db))
    _run("library", "train", "--db", str(db), "--from-truth", "--folds", "2")
    classes = {n for n in SimConfig.preset("realistic").density_per_100nm2}
    f = simulate(1_000_320, 192, 0.1, "realistic")
    maps = oracle_maps(f.image_nm, f.truth, f.bias_v)
    without = Pipeline(Settings()).analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
    assert without.defects and not {d.label for d in without.defects} & classes  # "<kind>-<cluster>" only
    with DefectLibrary(db) as lib:
        named = Pipeline(Settings(), library=lib).analyze_maps(f.image_nm, maps, 0.1, f.bias_v)
        version = lib.classifier().version
    assert named.models.get("defect_classifier") == str(version)
    defined = [d for d in named.defects if d.height_rel is not None and d.circularity is not None]
    assert defined and all(d.label in classes for d in defined), {d.label for d in named.defects}


def test_serve_names_classes_with_the_trained_library(tmp_path: Path) -> None:
    """`stm-feedback serve` reads settings.library.path at start: its classifier names the defects in replies
    and its version is in `models` (real networks in a subprocess on 127.0.0.1)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from simulator.frame import SimConfig, simulate_frame
    from stm_feedback.client import Client

    db = tmp_path / "lib.sqlite"
    _run("library", "add-sim", "--db", str(db), "--n", "6", "--size-px", "128", "--first-seed", "21")
    _run("library", "train", "--db", str(db), "--from-truth", "--folds", "2")
    with DefectLibrary(db) as lib:
        version = str(lib.classifier().version)
    env = {k: v for k, v in os.environ.items() if k != "STM_FEEDBACK_SERVER__ANALYZER"}
    env.update(STM_FEEDBACK_LIBRARY__PATH=str(db), STM_FEEDBACK_LIBRARY__RECORD="false")
    env["STM_FEEDBACK_SERVER__WARMUP_PX"] = "64"
    cmd = [sys.executable, "-m", "stm_feedback.cli", "serve", "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        match = re.search(r"serving on (\S+)", proc.stdout.readline())
        assert match, proc.communicate(timeout=10)
        f = simulate_frame(1_000_321, size_px=192, pixel_size_nm=0.1, config=SimConfig.preset("realistic"))
        classes = set(SimConfig.preset("realistic").density_per_100nm2)
        with Client(match.group(1), timeout_ms=120_000, retries=0) as c:
            assert c.models()["versions"].get("defect_classifier") == version
            a = c.analyze(f.image_nm, 0.1, bias_v=f.bias_v, instrument_id="lib", frame_id="f1")
        assert a.models.get("defect_classifier") == version
        named = [d.label for d in a.defects if d.height_rel is not None and d.circularity is not None]
        assert named and set(named) <= classes, {d.label for d in a.defects}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_add_sim_at_a_fixed_pixel_size(tmp_path: Path) -> None:
    db = tmp_path / "px.sqlite"
    args = ("library", "add-sim", "--db", str(db), "--n", "1", "--size-px", "96", "--first-seed", "3")
    _run(*args, "--pixel-size-nm", "0.05")
    with DefectLibrary(db) as lib:
        assert [f["pixel_size_nm"] for f in lib.frames()] == [0.05]
    res = runner.invoke(app, [*args, "--suite", "realistic", "--pixel-size-nm", "0.05"])
    assert res.exit_code == 2 and "--pixel-size-nm" in res.output


def test_fit_embedding_from_expert_labels_and_cluster_in_it(tmp_path: Path) -> None:
    db = str(tmp_path / "e.sqlite")
    _run("library", "add-sim", "--db", db, "--n", "4", "--size-px", "128", "--first-seed", "21")
    with DefectLibrary(db) as lib:
        assert lib.labels_from_truth() > 0  # an "expert" who agrees with the simulator
    emb = tmp_path / "emb.json"
    clusters = tmp_path / "clusters.json"
    out = _run(
        "library", "fit-embedding", "--db", db, "--labels", "expert", "--hidden", "8",
        "--out", str(emb), "--clusters-out", str(clusters),
    )  # fmt: skip
    assert f"wrote {emb}" in out and f"wrote {clusters}" in out
    out = _run("library", "cluster", "--db", db, "--embedding", str(emb))
    assert "space: class embedding" in out and "ARI vs true classes" in out
    assert "space: features" in _run("library", "cluster", "--db", db, "--space", "features")
    assert "ARI vs true classes" in _run("library", "ari", "--db", db)
    bad = runner.invoke(app, ["library", "cluster", "--db", db, "--embedding", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "class embedding" in bad.output
