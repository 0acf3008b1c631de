"""Defect library: add/list/filter, relabel, clusters, train + predict round trip, export, schema guard."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from stm_feedback.classify import FEATURE_NAMES
from stm_feedback.errors import InputError, ModelError
from stm_feedback.library import SCHEMA_VERSION, DefectLibrary

F = len(FEATURE_NAMES)
# three well separated synthetic classes: two depressions, one protrusion (features in FEATURE_NAMES order)
CLASSES = {
    "dv1": ("depression", [-1.5, 0.8, 0.66, 0.45, 0.65, -0.07, 0.7]),
    "etch_pit": ("depression", [-4.0, 2.5, 0.6, 1.3, 0.7, -0.11, 0.8]),
    "adatom_cluster": ("protrusion", [6.0, 5.0, 0.88, 1.4, 1.4, 0.18, 0.8]),
}


def _fill(lib: DefectLibrary, n_per_class: int = 12, seed: int = 0) -> dict[int, str]:
    """Two frames of synthetic defects; returns {defect id: true class}."""
    rng = np.random.default_rng(seed)
    truth: dict[int, str] = {}
    for frame in range(2):
        fid = lib.add_frame(f"sim-{frame}.npy", 0.1, bias_v=-2.0, meta={"seed": frame})
        names = [c for c in CLASSES for _ in range(n_per_class)]
        # peak_nm and fill (last two) scatter less: nm and fractions
        feats = np.array([rng.normal(CLASSES[c][1], [0.03] * 5 + [0.004] * 2) for c in names])
        xy = rng.uniform(0, 256, (len(names), 2))
        patches = rng.normal(0, 0.01, (len(names), 8, 8)).astype(np.float32)
        ids = lib.add_defects(fid, xy, [CLASSES[c][0] for c in names], feats, patches, true_labels=names)
        truth.update(zip(ids, names, strict=True))
    return truth


def test_add_list_filter_and_patches(tmp_path: Path) -> None:
    with DefectLibrary(tmp_path / "lib.sqlite") as lib:
        truth = _fill(lib, n_per_class=4)
        assert lib.count() == len(truth) == 24
        assert len(lib.frames()) == 2
        dep = lib.defects(kind="depression")
        assert len(dep) == 16 and all(r.kind == "depression" for r in dep)
        one = lib.defects(ids=[dep[0].id], with_patches=True)[0]
        assert one.patch is not None and one.patch.shape == (8, 8) and one.patch.dtype == np.float32
        assert one.features.shape == (F,) and one.label == "depression--1"  # unclustered, unlabelled
        assert lib.defects(frame_id=lib.frames()[0]["id"], kind="protrusion", limit=2)[1].kind == "protrusion"
        with pytest.raises(InputError):
            lib.add_defects(999, np.zeros((1, 2)), ["depression"], np.zeros((1, F)))
        with pytest.raises(InputError):
            lib.add_defects(1, np.zeros((1, 2)), ["bump"], np.zeros((1, F)))
        assert lib.integrity_check() == "ok"
    con = sqlite3.connect(tmp_path / "lib.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_fit_clusters_relabel_train_predict_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lib.sqlite"
    with DefectLibrary(path) as lib:
        truth = _fill(lib)
        model = lib.fit_clusters()
        assert model.n_clusters("depression") == 2 and model.n_clusters("protrusion") == 1
        recs = lib.defects()
        # each cluster is pure in the true class
        for kind in ("depression", "protrusion"):
            for k in range(model.n_clusters(kind)):
                assert len({truth[r.id] for r in recs if r.kind == kind and r.cluster == k}) == 1
        # the expert names whole clusters from one example each, and fixes one defect by hand
        for kind in ("depression", "protrusion"):
            for k in range(model.n_clusters(kind)):
                example = next(r for r in recs if r.kind == kind and r.cluster == k)
                assert lib.relabel(truth[example.id], cluster=k, kind=kind) >= 12
        assert lib.relabel("dv1", defect_id=recs[0].id) == 1
        with pytest.raises(InputError):
            lib.relabel("dv1", cluster=7, kind="depression")
        with pytest.raises(InputError):
            lib.relabel("dv1")
        assert all(r.expert_label == truth[r.id] for r in lib.defects())

        info = lib.train_classifier(cv_folds=3)
        assert info["version"] == 1 and info["n_train"] == len(truth)
        assert info["cv_accuracy"]["depression"] == pytest.approx(1.0)
        assert info["cv_ari"]["depression"] == pytest.approx(1.0)
        assert info["cv_accuracy"]["protrusion"] is None  # one label: a constant, nothing to validate

    # a new process (fresh handle) names new defects with the stored classifier
    with DefectLibrary(path) as lib:
        new = np.array([CLASSES["etch_pit"][1], CLASSES["dv1"][1], CLASSES["adatom_cluster"][1]])
        kinds = ["depression", "depression", "protrusion"]
        assert lib.predict_labels(new, kinds) == ["etch_pit", "dv1", "adatom_cluster"]
        assert lib.cluster_model().predict(new, kinds).tolist()[2] == 0
        assert lib.update_predictions() == len(truth)
        assert {r.predicted_label for r in lib.defects(kind="protrusion")} == {"adatom_cluster"}
        assert lib.train_classifier()["version"] == 2 and lib.classifier().version == 2
        assert lib.classifier(version=1).version == 1


def test_predict_without_classifier_and_errors(tmp_path: Path) -> None:
    with DefectLibrary(tmp_path / "lib.sqlite") as lib:
        assert lib.predict_labels(np.zeros((2, F)), ["depression", "protrusion"]) == [None, None]
        with pytest.raises(InputError):
            lib.train_classifier()  # no expert labels yet
        with pytest.raises(ModelError):
            lib.update_predictions()


def test_export_csv_json_npz(tmp_path: Path) -> None:
    with DefectLibrary(tmp_path / "lib.sqlite") as lib:
        truth = _fill(lib, n_per_class=3)
        lib.fit_clusters()
        paths = lib.export(tmp_path / "out")
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(truth)
    assert set(FEATURE_NAMES) <= set(rows[0]) and rows[0]["true_label"] == truth[int(rows[0]["id"])]
    doc = json.loads(paths["json"].read_text())
    sources = {f["id"]: f["source"] for f in doc["frames"]}
    assert all(r["frame_source"] == sources[int(r["frame_id"])] != "" for r in rows)
    assert doc["feature_names"] == list(FEATURE_NAMES) and len(doc["frames"]) == 2
    assert len(doc["defects"]) == len(truth)
    with np.load(paths["npz"]) as npz:
        assert sorted(npz.files) == sorted(f"d{i}" for i in truth)
        assert npz[f"d{rows[0]['id']}"].shape == (8, 8)


def test_rejects_newer_schema_and_non_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(InputError):
        DefectLibrary(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError):
        DefectLibrary(junk)


def test_undefined_features_are_stored_and_skipped(tmp_path: Path) -> None:
    with DefectLibrary(tmp_path / "lib.sqlite") as lib:
        truth = _fill(lib, n_per_class=4)
        fid = lib.add_frame("flat.npy", 0.1)
        f = np.array([CLASSES["dv1"][1]])
        f[0, FEATURE_NAMES.index("height_rel")] = np.nan  # flat surroundings: no height reference
        (nan_id,) = lib.add_defects(fid, [[5.0, 5.0]], ["depression"], f)
        assert np.isnan(lib.defects(ids=[nan_id])[0].features[0])
        assert len(lib.arrays()[0]) == len(truth)  # left out of clustering / training
        lib.fit_clusters()
        assert lib.defects(ids=[nan_id])[0].cluster == -1
        for r in lib.defects():
            if r.true_label:
                lib.relabel(r.true_label, defect_id=r.id)
        lib.train_classifier(cv_folds=2)
        assert lib.predict_labels(f, ["depression"]) == [None]
