"""The learned class embedding (stm_feedback/embedding.py) and mean shift in it (classify.ClusterModel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from sklearn.neural_network import MLPClassifier

from stm_feedback.classify import FEATURE_NAMES, ClusterModel, _transform, features_from_truth
from stm_feedback.config import REPO_MODELS_DIR, load_settings
from stm_feedback.embedding import (
    EMBEDDING_FILE,
    ClassEmbedding,
    KindEmbedding,
    embedding_for,
    fit_embedding,
)
from stm_feedback.errors import InputError, ModelError
from stm_feedback.physics import DEFECT_CLASSES

PEAK, FILL = FEATURE_NAMES.index("peak_nm"), FEATURE_NAMES.index("fill")


def _xor_protrusions(n_per_blob: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Protrusion feature rows in four blobs of (peak_nm, fill); class "a" = the two diagonal blobs, "b" =
    the two off-diagonal ones. Mean shift on the features sees four modes; the classes are two."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for peak, fill, cls in ((0.05, 0.3, "a"), (0.2, 0.9, "a"), (0.05, 0.9, "b"), (0.2, 0.3, "b")):
        x = np.tile([2.0, 2.0, 0.8, 0.6, 0.6, 0.0, 0.0], (n_per_blob, 1))
        x[:, PEAK] = peak + 0.01 * rng.standard_normal(n_per_blob)
        x[:, FILL] = fill + 0.04 * rng.standard_normal(n_per_blob)
        x[:, :5] *= 1.0 + 0.05 * rng.standard_normal((n_per_blob, 5))
        rows.append(x)
        labels += [cls] * n_per_blob
    return np.concatenate(rows), np.array(labels, dtype=object)


def test_mean_shift_in_the_embedding_recovers_classes_the_features_split() -> None:
    x, y = _xor_protrusions(60, seed=1)
    kinds = np.full(len(x), "protrusion", dtype=object)
    emb = fit_embedding(x, kinds, y, hidden=(16,), seed=0)
    assert set(emb.kinds) == {"protrusion"} and emb.kinds["protrusion"].classes == ("a", "b")
    xt, yt = _xor_protrusions(40, seed=2)  # held-out rows
    kt = np.full(len(xt), "protrusion", dtype=object)
    on_features = ClusterModel().fit(xt, kt)
    on_embedding = ClusterModel(embedding=emb).fit(xt, kt)
    assert len(np.unique(on_embedding)) == 2
    assert adjusted_rand_score(yt, on_embedding) > 0.95
    assert adjusted_rand_score(yt, on_features) < 0.7  # four modes for two classes


def test_numpy_forward_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, len(FEATURE_NAMES)))
    for n_classes in (2, 3):
        y = np.array([f"c{i}" for i in rng.integers(0, n_classes, len(x))])
        mlp = MLPClassifier((8, 4), max_iter=2000, random_state=0).fit(x, y)
        ke = KindEmbedding(
            classes=tuple(mlp.classes_),
            mean=np.zeros(x.shape[1]),
            scale=np.ones(x.shape[1]),
            weights=tuple(mlp.coefs_),
            biases=tuple(mlp.intercepts_),
        )
        np.testing.assert_allclose(ke.probabilities(x), mlp.predict_proba(x), atol=1e-9)


def test_rare_classes_and_single_class_kinds_are_left_out() -> None:
    x, y = _xor_protrusions(50, seed=3)
    y = y.copy()
    y[:2] = "stray_pit"  # 1 % of the kind: matching noise
    kinds = np.full(len(x), "protrusion", dtype=object)
    kinds[-10:] = "depression"  # one class only: no network, features instead
    y[-10:] = "dv1"
    emb = fit_embedding(x, kinds, y, hidden=(8,))
    assert emb.kinds["protrusion"].classes == ("a", "b") and "depression" not in emb.kinds
    model = ClusterModel(embedding=emb)
    model.fit(x, kinds)
    assert model.embedded("protrusion") and not model.embedded("depression")
    with pytest.raises(InputError):
        fit_embedding(x[-10:], kinds[-10:], y[-10:])  # nothing to learn
    with pytest.raises(InputError):
        fit_embedding(x[:, :3], kinds, y)


def test_stored_cluster_model_keeps_its_embedding(tmp_path: Path) -> None:
    x, y = _xor_protrusions(40, seed=4)
    kinds = np.full(len(x), "protrusion", dtype=object)
    model = ClusterModel(embedding=fit_embedding(x, kinds, y, hidden=(8,)))
    ids = model.fit(x, kinds)
    back = ClusterModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back.embedded("protrusion")
    np.testing.assert_array_equal(back.predict(x, kinds), ids)
    # models stored before the embedding still load, clustered on features
    old = model.to_dict()
    del old["embedding"]
    assert not ClusterModel.from_dict(old).embedded("protrusion")


def test_bad_embedding_files_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        ClassEmbedding.load(tmp_path / "missing.json")
    p = tmp_path / "e.json"
    p.write_text("{not json")
    with pytest.raises(ModelError):
        ClassEmbedding.load(p)
    p.write_text(json.dumps({"schema": "stm-feedback.class-embedding/99"}))
    with pytest.raises(ModelError, match="schema"):
        ClassEmbedding.load(p)
    x, y = _xor_protrusions(20, seed=5)
    d = fit_embedding(x, np.full(len(x), "protrusion", dtype=object), y, hidden=(4,)).to_dict()
    d["kinds"]["protrusion"]["weights"][0] = [[0.0]]
    with pytest.raises(InputError, match="shapes"):
        ClassEmbedding.from_dict(d)
    settings = load_settings(models__models_dir=tmp_path)
    with pytest.raises(ModelError, match="class embedding"):
        embedding_for(settings)
    assert (
        embedding_for(load_settings(library__cluster_space="features", models__models_dir=tmp_path)) is None
    )


def test_shipped_embedding_names_the_simulator_classes_on_simulated_truth() -> None:
    """The shipped file loads and, on truth footprints of frames it never saw, puts most defects in their
    own class's corner (it was trained on network detections, a different footprint)."""
    from simulator.frame import SimConfig, simulate_frame

    emb = embedding_for(load_settings())
    assert emb is not None and (REPO_MODELS_DIR / EMBEDDING_FILE).exists()
    assert set(emb.kinds["protrusion"].classes) == {"adatom_cluster", "db_single", "db_pair"}
    assert set(emb.kinds["depression"].classes) <= set(DEFECT_CLASSES)
    hits = total = 0
    for seed in range(900_000, 900_004):
        f = simulate_frame(seed, size_px=128, pixel_size_nm=0.1, config=SimConfig.preset("realistic"))
        rows = features_from_truth(f.image_nm, f.truth, patch_size_px=8)
        for kind in ("protrusion", "depression"):
            sel = (rows.kinds == kind) & np.isfinite(rows.features).all(axis=1)
            ke = emb.kinds[kind]
            pred = np.array(ke.classes)[
                ke.probabilities(_transform(rows.features[sel], FEATURE_NAMES)).argmax(1)
            ]
            hits += int(np.sum(pred == rows.classes[sel]))
            total += int(sel.sum())
    assert total > 20 and hits / total > 0.7


def test_embedded_cluster_ids_do_not_depend_on_input_order() -> None:
    x, y = _xor_protrusions(30, seed=6)
    kinds = np.full(len(x), "protrusion", dtype=object)
    emb = fit_embedding(x, kinds, y, hidden=(8,))
    a = ClusterModel(embedding=emb).fit(x, kinds)
    perm = np.random.default_rng(0).permutation(len(x))
    b = ClusterModel(embedding=emb).fit(x[perm], kinds[perm])
    np.testing.assert_array_equal(a[perm], b)


def test_default_cluster_model_loading(tmp_path: Path) -> None:
    from stm_feedback.embedding import CLUSTERS_FILE, default_cluster_model

    shipped = default_cluster_model(load_settings())
    assert shipped is not None and shipped.embedded("protrusion") and shipped.embedded("depression")
    assert shipped.n_clusters("protrusion") >= 2 and shipped.n_clusters("depression") >= 2
    assert default_cluster_model(load_settings(library__default_clusters=False)) is None
    assert default_cluster_model(load_settings(models__models_dir=tmp_path)) is None  # no file: no model
    (tmp_path / CLUSTERS_FILE).write_text('{"kinds": ')
    with pytest.raises(ModelError, match="cluster model"):
        default_cluster_model(load_settings(models__models_dir=tmp_path))


def test_real_time_analyses_carry_the_shipped_clusters() -> None:
    """Without a library, each frame's defects get cluster ids from models/defect_clusters.json (and the
    "<kind>-<id>" label, which the planner treats as unlabelled); switched off they stay -1."""
    from stm_feedback.pipeline import Pipeline
    from tests.test_pipeline import MapsRunner
    from tests.test_pipeline_oracle import oracle_maps, simulate

    f = simulate(1_000_003, 128)
    runner = MapsRunner(oracle_maps(f.image_nm, f.truth, f.bias_v))
    on = Pipeline(load_settings(), runner=runner).analyze(f.image_nm, f.pixel_size_nm, f.bias_v)
    assert on.defects and all(d.cluster >= 0 for d in on.defects)
    assert all(d.label == f"{d.kind}-{d.cluster}" for d in on.defects)
    assert on.models.get("defect_clusters") == "shipped"
    off = Pipeline(load_settings(library__default_clusters=False), runner=runner).analyze(
        f.image_nm, f.pixel_size_nm, f.bias_v
    )
    assert all(d.cluster == -1 for d in off.defects) and "defect_clusters" not in off.models
    # the planner's rules do not depend on the cluster ids
    assert [d.must_avoid for d in on.defects] == [d.must_avoid for d in off.defects]
    assert len(on.sites) == len(off.sites)
