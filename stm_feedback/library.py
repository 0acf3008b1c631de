"""The persistent defect library: one embedded SQLite file (stdlib ``sqlite3``, WAL journal).

Every analysed defect is stored with its frame, position, kind, features (``classify.FEATURE_NAMES``),
a small row-aligned patch (``.npy`` bytes), its mean-shift cluster, an expert label and the classifier's
predicted label. Experts relabel defects or whole clusters; ``train_classifier`` fits a supervised
scikit-learn model on the expert labels and stores it in the same file, so later analyses name classes
with ``predict_labels``.

Crash safety: every write is one transaction (``with self._tx()``), the journal is WAL with
``synchronous=FULL``, so a process killed mid-write loses at most the transaction in flight and never corrupts
the file (tested with SIGKILL in tests/test_library_crash.py). Schema version: ``PRAGMA user_version``.

The stored classifier is a pickle: only open library files you trust (as with any pickled sklearn model).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.classify import FEATURE_NAMES, ClusterModel
from stm_feedback.errors import InputError, ModelError
from stm_feedback.physics import KINDS

SCHEMA_VERSION = 1
CLASSIFIER_FORMAT = "stm-feedback.defect-classifier/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    pixel_size_nm REAL NOT NULL,
    time_s REAL NOT NULL,            -- unix time the frame was added
    bias_v REAL,
    meta_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS defects (
    id INTEGER PRIMARY KEY,
    frame_id INTEGER NOT NULL REFERENCES frames(id) ON DELETE CASCADE,
    x_px REAL NOT NULL,
    y_px REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('protrusion', 'depression')),
    features_json TEXT NOT NULL,     -- {feature name: value}
    patch BLOB,                      -- np.save bytes of a float32 (P, P) row-aligned patch, nm
    cluster INTEGER NOT NULL DEFAULT -1,
    expert_label TEXT,
    predicted_label TEXT,
    true_label TEXT                  -- simulator ground truth when known (evaluation only)
);
CREATE INDEX IF NOT EXISTS defects_frame ON defects(frame_id);
CREATE INDEX IF NOT EXISTS defects_kind_cluster ON defects(kind, cluster);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,              -- 'clusters' (JSON) | 'classifier' (pickle)
    version INTEGER NOT NULL,
    time_s REAL NOT NULL,
    meta_json TEXT NOT NULL,
    blob BLOB NOT NULL,
    UNIQUE (name, version)
);
"""


@dataclass
class DefectRecord:
    """One library row. ``features`` is in ``feature_names`` order; ``patch`` is None if none was stored."""

    id: int
    frame_id: int
    x_px: float
    y_px: float
    kind: str
    features: np.ndarray
    cluster: int
    expert_label: str | None
    predicted_label: str | None
    true_label: str | None
    patch: np.ndarray | None = None

    @property
    def label(self) -> str:
        """The best name available: expert label, else predicted label, else ``<kind>-<cluster>``."""
        return self.expert_label or self.predicted_label or f"{self.kind}-{self.cluster}"


def patch_to_bytes(patch: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(patch, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def patch_from_bytes(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


class DefectLibrary:
    """A defect library file. Thread-safe within a process (one connection behind a lock); several processes
    may open the same file (SQLite locking, ``busy_timeout``)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._con = sqlite3.connect(
                str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=FULL")
            self._con.execute("PRAGMA foreign_keys=ON")
            version = self._con.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a usable SQLite defect library: {exc}") from exc
        if version > SCHEMA_VERSION:
            self._con.close()
            raise InputError(
                f"{self.path} has library schema {version}; this code reads up to {SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:  # new file (v0): create the schema and stamp the version atomically
            with self._lock:
                self._con.executescript(
                    f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
                )

    # ------------------------------------------------------------------------------------------ plumbing
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One IMMEDIATE transaction: all or nothing, writers serialised across processes."""
        with self._lock:
            cur = self._con.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                if self._con.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            else:
                if self._con.in_transaction:
                    cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> DefectLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` result ("ok" when the file is sound)."""
        with self._lock:
            return str(self._con.execute("PRAGMA integrity_check").fetchone()[0])

    # ---------------------------------------------------------------------------------------------- write
    def add_frame(
        self,
        source: str,
        pixel_size_nm: float,
        bias_v: float | None = None,
        time_s: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Insert a frame; returns its id."""
        row = _frame_row(source, pixel_size_nm, bias_v, time_s, meta)
        with self._tx() as cur:
            return _insert_frame(cur, row)

    def add_frame_with_defects(
        self,
        source: str,
        pixel_size_nm: float,
        xy_px: np.ndarray,
        kinds: Sequence[str],
        features: np.ndarray,
        bias_v: float | None = None,
        meta: dict[str, Any] | None = None,
        **defect_columns: Any,
    ) -> tuple[int, list[int]]:
        """A frame and its defects in ONE transaction (both or neither survive a crash); returns
        (frame id, defect ids). ``defect_columns``: the optional arguments of ``add_defects``."""
        frow = _frame_row(source, pixel_size_nm, bias_v, None, meta)
        drows = _defect_rows(xy_px, kinds, features, **defect_columns)
        with self._tx() as cur:
            frame_id = _insert_frame(cur, frow)
            return frame_id, _insert_defects(cur, frame_id, drows)

    def add_defects(
        self,
        frame_id: int,
        xy_px: np.ndarray,
        kinds: Sequence[str],
        features: np.ndarray,
        patches: Sequence[np.ndarray | None] | np.ndarray | None = None,
        clusters: Sequence[int] | np.ndarray | None = None,
        predicted_labels: Sequence[str | None] | None = None,
        true_labels: Sequence[str | None] | None = None,
        feature_names: Sequence[str] = FEATURE_NAMES,
    ) -> list[int]:
        """Insert the defects of one frame in one transaction; returns their ids (input order).

        xy_px: (N, 2) centres (x_px, y_px); kinds: (N,); features: (N, F) in ``feature_names`` order;
        patches: N row-aligned float32 patches (or None); clusters: mean-shift ids (-1 if None).
        """
        rows = _defect_rows(
            xy_px, kinds, features, patches, clusters, predicted_labels, true_labels, feature_names
        )
        with self._tx() as cur:
            return _insert_defects(cur, int(frame_id), rows)

    # ----------------------------------------------------------------------------------------------- read
    def count(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM defects").fetchone()[0])

    def frames(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._con.execute(
                "SELECT id, source, pixel_size_nm, time_s, bias_v, meta_json FROM frames ORDER BY id"
            ).fetchall()
        return [
            {
                "id": r[0],
                "source": r[1],
                "pixel_size_nm": r[2],
                "time_s": r[3],
                "bias_v": r[4],
                "meta": json.loads(r[5]),
            }
            for r in rows
        ]

    def defects(
        self,
        kind: str | None = None,
        cluster: int | None = None,
        label: str | None = None,
        frame_id: int | None = None,
        ids: Sequence[int] | None = None,
        with_patches: bool = False,
        limit: int | None = None,
        feature_names: Sequence[str] = FEATURE_NAMES,
    ) -> list[DefectRecord]:
        """Defects matching every given filter, by id. ``label`` matches the expert label, else the predicted
        one."""
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if cluster is not None:
            where.append("cluster = ?")
            args.append(int(cluster))
        if label is not None:
            where.append("COALESCE(expert_label, predicted_label) = ?")
            args.append(label)
        if frame_id is not None:
            where.append("frame_id = ?")
            args.append(int(frame_id))
        if ids is not None:
            ids = [int(i) for i in ids]
            where.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0")
            args.extend(ids)
        cols = "id, frame_id, x_px, y_px, kind, features_json, cluster, expert_label, predicted_label, "
        cols += "true_label"
        sql = f"SELECT {cols}{', patch' if with_patches else ''} FROM defects"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._con.execute(sql, args).fetchall()
        out = []
        for r in rows:
            feats = json.loads(r[5])
            missing = [name for name in feature_names if name not in feats]
            if missing:
                raise InputError(f"defect {r[0]} lacks features {missing}")
            out.append(
                DefectRecord(
                    id=r[0],
                    frame_id=r[1],
                    x_px=r[2],
                    y_px=r[3],
                    kind=r[4],
                    features=np.array(
                        [np.nan if feats[name] is None else feats[name] for name in feature_names], float
                    ),
                    cluster=r[6],
                    expert_label=r[7],
                    predicted_label=r[8],
                    true_label=r[9],
                    patch=patch_from_bytes(r[10]) if with_patches and r[10] is not None else None,
                )
            )
        return out

    def arrays(self, **filters: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N,), features (N, F), kinds (N,)) of the matching defects whose features are all defined
        (rows with a NaN feature are left out: they can be neither clustered nor classified)."""
        recs = [r for r in self.defects(**filters) if np.all(np.isfinite(r.features))]
        feats = np.array([r.features for r in recs]).reshape(len(recs), -1)
        if not recs:
            feats = np.zeros((0, len(filters.get("feature_names", FEATURE_NAMES))))
        return np.array([r.id for r in recs], int), feats, np.array([r.kind for r in recs], dtype=object)

    # -------------------------------------------------------------------------------------------- relabel
    def relabel(
        self,
        label: str | None,
        defect_id: int | None = None,
        cluster: int | None = None,
        kind: str | None = None,
    ) -> int:
        """Set the expert label of one defect, or of every defect of ``cluster`` within ``kind``.
        ``label=None``
        clears it. Returns the number of rows changed (raises InputError if nothing matched)."""
        if (defect_id is None) == (cluster is None):
            raise InputError("give exactly one of defect_id or cluster (with kind)")
        with self._tx() as cur:
            if defect_id is not None:
                cur.execute("UPDATE defects SET expert_label = ? WHERE id = ?", (label, int(defect_id)))
            else:
                if kind not in KINDS:
                    raise InputError(f"relabelling a cluster needs kind in {list(KINDS)}, got {kind!r}")
                cur.execute(
                    "UPDATE defects SET expert_label = ? WHERE kind = ? AND cluster = ?",
                    (label, kind, int(cluster)),
                )
            n = cur.rowcount
            if n == 0:
                what = f"defect {defect_id}" if defect_id is not None else f"{kind} cluster {cluster}"
                raise InputError(f"no such {what}")
            return int(n)

    def labels_from_truth(self) -> int:
        """Copy the simulator's true labels into the expert labels (a stand-in expert, evaluation only);
        returns the number of rows changed."""
        with self._tx() as cur:
            cur.execute("UPDATE defects SET expert_label = true_label WHERE true_label IS NOT NULL")
            return int(cur.rowcount)

    # ---------------------------------------------------------------------------------------------- models
    def _save_model(self, name: str, meta: dict[str, Any], blob: bytes) -> int:
        with self._tx() as cur:
            version = int(
                cur.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?", (name,)
                ).fetchone()[0]
            )
            cur.execute(
                "INSERT INTO models (name, version, time_s, meta_json, blob) VALUES (?, ?, ?, ?, ?)",
                (name, version, time.time(), json.dumps({**meta, "version": version}), blob),
            )
            return version

    def _load_model(self, name: str, version: int | None = None) -> tuple[dict[str, Any], bytes] | None:
        sql = "SELECT meta_json, blob FROM models WHERE name = ?"
        args: list[Any] = [name]
        if version is not None:
            sql += " AND version = ?"
            args.append(int(version))
        sql += " ORDER BY version DESC LIMIT 1"
        with self._lock:
            row = self._con.execute(sql, args).fetchone()
        return None if row is None else (json.loads(row[0]), bytes(row[1]))

    def fit_clusters(self, quantile: float | None = None, embedding: Any = None) -> ClusterModel:
        """Mean shift over every defect in the library (per kind), on ``embedding``'s class probabilities
        when given (``embedding.ClassEmbedding``); writes each defect's cluster and stores the model (JSON,
        with the embedding) as a new 'clusters' version. Returns the model."""
        ids, x, k = self.arrays()
        model = ClusterModel(embedding=embedding)
        if quantile is not None:
            model.quantile = quantile
        labels = model.fit(x, k)
        with self._tx() as cur:
            cur.executemany(
                "UPDATE defects SET cluster = ? WHERE id = ?",
                zip(map(int, labels), map(int, ids), strict=True),
            )
        self._save_model("clusters", {"n_defects": len(ids)}, json.dumps(model.to_dict()).encode())
        return model

    def cluster_model(self) -> ClusterModel | None:
        """The latest stored cluster model, or None."""
        got = self._load_model("clusters")
        return None if got is None else ClusterModel.from_dict(json.loads(got[1]))

    def train_classifier(self, cv_folds: int = 5, random_state: int = 0) -> dict[str, Any]:
        """Fit one random forest per kind on the expert-labelled defects (features only), store it as a new
        'classifier' version and return ``{"version", "n_train", "cv_accuracy": {kind: float|None}, ...}``.

        The cross-validated accuracy is stratified k-fold (k = min(cv_folds, smallest class size), >= 2) of
        the same model; None when a kind has a single label or too few samples.
        """
        import sklearn
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.metrics import adjusted_rand_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        recs = [r for r in self.defects() if r.expert_label and np.all(np.isfinite(r.features))]
        if not recs:
            raise InputError("no expert-labelled defects: relabel some first")
        models: dict[str, Any] = {}
        cv: dict[str, float | None] = {}
        cv_ari: dict[str, float | None] = {}
        counts: dict[str, dict[str, int]] = {}
        for kind in KINDS:
            sub = [r for r in recs if r.kind == kind]
            if not sub:
                continue
            x = np.array([r.features for r in sub])
            y = np.array([r.expert_label for r in sub])
            labels, n_per = np.unique(y, return_counts=True)
            counts[kind] = {str(a): int(b) for a, b in zip(labels, n_per, strict=True)}
            if len(labels) == 1:
                models[kind] = str(labels[0])  # a constant: nothing to learn
                cv[kind] = cv_ari[kind] = None
                continue
            clf = RandomForestClassifier(
                n_estimators=200,
                min_samples_leaf=1,
                class_weight="balanced",
                random_state=random_state,
                n_jobs=1,
            )
            folds = min(cv_folds, int(n_per.min()))
            if folds >= 2:
                skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
                pred = cross_val_predict(clf, x, y, cv=skf)
                cv[kind] = float(np.mean(pred == y))
                cv_ari[kind] = float(adjusted_rand_score(y, pred))
            else:
                cv[kind] = cv_ari[kind] = None
            models[kind] = clf.fit(x, y)
        meta = {
            "format": CLASSIFIER_FORMAT,
            "feature_names": list(FEATURE_NAMES),
            "sklearn_version": sklearn.__version__,
            "n_train": len(recs),
            "label_counts": counts,
            "cv_accuracy": cv,
            "cv_ari": cv_ari,  # ARI of the out-of-fold predictions vs the labels (a ceiling for clustering)
        }
        version = self._save_model("classifier", meta, pickle.dumps(models, protocol=pickle.HIGHEST_PROTOCOL))
        return {**meta, "version": version}

    def classifier(self, version: int | None = None) -> DefectClassifier | None:
        """The latest (or given) stored classifier, or None if none was trained."""
        got = self._load_model("classifier", version)
        if got is None:
            return None
        meta, blob = got
        if meta.get("format") != CLASSIFIER_FORMAT:
            raise ModelError(
                f"stored classifier has format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT}"
            )
        if meta["feature_names"] != list(FEATURE_NAMES):
            raise ModelError(
                f"stored classifier uses features {meta['feature_names']}, "
                f"this code computes {list(FEATURE_NAMES)}"
            )
        try:
            models = pickle.loads(blob)  # noqa: S301 - library files are trusted local data (module docstring)
        except Exception as exc:  # an incompatible sklearn, a truncated blob
            raise ModelError(f"cannot load stored classifier v{meta.get('version')}: {exc}") from exc
        return DefectClassifier(models=models, meta=meta)

    def predict_labels(self, features: np.ndarray, kinds: Sequence[str]) -> list[str | None]:
        """Class names from the latest classifier (None per defect if no classifier is stored)."""
        clf = self.classifier()
        n = len(kinds)
        return [None] * n if clf is None else list(clf.predict(features, kinds))

    def update_predictions(self) -> int:
        """Re-predict ``predicted_label`` of every defect with the latest classifier; returns rows updated."""
        clf = self.classifier()
        if clf is None:
            raise ModelError("no classifier stored: run train first")
        ids, x, k = self.arrays()
        labels = clf.predict(x, k)
        with self._tx() as cur:
            cur.executemany(
                "UPDATE defects SET predicted_label = ? WHERE id = ?", zip(labels, map(int, ids), strict=True)
            )
        return len(ids)

    # ----------------------------------------------------------------------------------------------- export
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``defects.csv``, ``defects.json`` (rows + frames) and ``patches.npz`` (key ``d<id>``) to
        out_dir. Each defect row carries its frame's ``frame_source`` as well as the internal ``frame_id``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        recs = self.defects(with_patches=True)
        # the frame's source (file name, daemon frame_id, simulator seed) next to the internal frame id: a
        # CSV row on its own must say which image the defect came from
        source = {f["id"]: f["source"] for f in self.frames()}
        header = [
            "id",
            "frame_id",
            "frame_source",
            "x_px",
            "y_px",
            "kind",
            *FEATURE_NAMES,
            "cluster",
            "expert_label",
            "predicted_label",
            "true_label",
            "label",
        ]
        rows = [
            [
                r.id,
                r.frame_id,
                source.get(r.frame_id, ""),
                r.x_px,
                r.y_px,
                r.kind,
                *map(float, r.features),
                r.cluster,
                r.expert_label or "",
                r.predicted_label or "",
                r.true_label or "",
                r.label,
            ]
            for r in recs
        ]
        paths = {"csv": out / "defects.csv", "json": out / "defects.json", "npz": out / "patches.npz"}
        with open(paths["csv"], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        doc = {
            "format": "stm-feedback.defect-library-export/1",
            "feature_names": list(FEATURE_NAMES),
            "frames": self.frames(),
            "defects": [dict(zip(header, row, strict=True)) for row in rows],
        }
        paths["json"].write_text(json.dumps(doc, indent=1))
        np.savez_compressed(paths["npz"], **{f"d{r.id}": r.patch for r in recs if r.patch is not None})
        return paths


# ------------------------------------------------------------------------------------- background recorder
log = logging.getLogger("stm_feedback.library")

_FEATURE_FALLBACK = ("height_rel", "area_cells", "circularity")  # on the Defect records themselves


def analysis_rows(
    image: np.ndarray, analysis: Any, patch_size_px: int = 24, patch_pixel_size_nm: float = 0.125
) -> dict[str, Any]:
    """``add_frame_with_defects`` arguments for one analysed frame: positions, kinds, features
    (``analysis.defect_features`` when present, else the three JSON features and NaN), row-aligned patches,
    clusters and class labels of its defects."""
    from stm_feedback.pipeline import defect_patches  # the pipeline imports this module

    defects = list(analysis.defects)
    n = len(defects)
    feats = getattr(analysis, "defect_features", None)
    if feats is None or np.shape(feats) != (n, len(FEATURE_NAMES)):
        feats = np.full((n, len(FEATURE_NAMES)), np.nan)
        for j, name in enumerate(FEATURE_NAMES):
            if name in _FEATURE_FALLBACK:
                feats[:, j] = [
                    np.nan if getattr(d, name) is None else float(getattr(d, name)) for d in defects
                ]
    feats = np.where(np.isinf(feats), np.nan, np.asarray(feats, float))
    return {
        "xy_px": np.array([[d.x_px, d.y_px] for d in defects], float).reshape(n, 2),
        "kinds": [d.kind for d in defects],
        "features": feats,
        "patches": defect_patches(image, analysis, patch_size_px, patch_pixel_size_nm) if n else None,
        "clusters": [d.cluster for d in defects],
        # a class name from the classifier; the "<kind>-<cluster>" fallback is not a prediction
        "predicted_labels": [
            None if d.label in (d.kind, f"{d.kind}-{d.cluster}") else d.label for d in defects
        ],
    }


def matched_true_labels(analysis: Any, truth: Any, tol_nm: float = 0.40) -> list[str | None]:
    """Per detected defect of ``analysis``: the class of the simulator truth defect it matches (Hungarian
    on centres within ``tol_nm``, as the evaluation matches defects), None when unmatched."""
    from stm_feedback.metrics import match_points

    s = float(truth.pixel_size_nm)
    det = np.array([[d.x_px, d.y_px] for d in analysis.defects], float).reshape(-1, 2) * s
    tru = np.array([[d.x_px, d.y_px] for d in truth.defects], float).reshape(-1, 2) * s
    out: list[str | None] = [None] * len(det)
    if len(det) and len(tru):
        ti, pi = match_points(tru, det, tol_nm)
        for i, j in zip(ti.tolist(), pi.tolist(), strict=True):
            out[j] = truth.defects[i].cls
    return out


class LibraryRecorder:
    """Records analysed frames into a ``DefectLibrary`` on one background thread, off the caller's path.

    ``submit(image, analysis, source)`` only enqueues (patches, features and the SQLite transaction run on
    the writer thread). Accepted data is never dropped: when ``max_queue`` frames are waiting, ``submit``
    blocks until the writer catches up (back-pressure instead of loss), and ``close()`` writes everything
    still queued before it returns. Each frame is one transaction (frame + all its defects, or nothing);
    a frame the library rejects is logged and counted in ``failed`` and the writer carries on. A killed
    process loses at most the frames still queued in memory; the file itself stays consistent (WAL).

    ``idle`` (e.g. ``server.Server.idle``, set while the daemon analyses nothing): the writer waits for it
    before each frame, at most ``max_defer_s``, so that its ~2 ms of CPU per frame does not compete with the
    analysis of the next frame (daemon round trip +6 ms with back-to-back requests, docs/performance.md
    session 9). A stream with no idle moment is still written, ``max_defer_s`` late at most per frame.
    """

    def __init__(
        self,
        library: DefectLibrary,
        patch_size_px: int = 24,
        patch_pixel_size_nm: float = 0.125,
        max_queue: int = 256,
        close_library: bool = False,
        idle: threading.Event | None = None,
        max_defer_s: float = 2.0,
    ) -> None:
        self.library = library
        self._idle = idle
        self.max_defer_s = max(0.0, float(max_defer_s))
        self.patch_size_px = int(patch_size_px)
        self.patch_pixel_size_nm = float(patch_pixel_size_nm)
        self._close_library = close_library
        self._q: queue.Queue[tuple[np.ndarray, Any, str] | None] = queue.Queue(maxsize=max(1, max_queue))
        self._lock = threading.Lock()
        self._closed = False
        self.submitted = 0
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="stm-feedback-library", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Any, idle: threading.Event | None = None) -> LibraryRecorder:
        """A recorder writing to ``settings.library.path`` (owns and closes that library); ``idle``: see the
        class docstring (waits at most ``settings.library.record_defer_s``)."""
        ls = settings.library
        return cls(
            DefectLibrary(ls.path),
            ls.patch_size_px,
            ls.patch_pixel_size_nm,
            max_queue=ls.record_queue,
            close_library=True,
            idle=idle,
            max_defer_s=ls.record_defer_s,
        )

    def submit(self, image: np.ndarray, analysis: Any, source: str | None = None) -> None:
        """Queue one analysed frame (the image is not copied: do not modify it afterwards). Blocks while the
        queue is full; RuntimeError after ``close()``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("library recorder is closed")
            self.submitted += 1
        self._q.put((image, analysis, source or analysis.image.frame_id or "frame"))

    def flush(self) -> None:
        """Wait until every frame submitted so far is written (or failed)."""
        self._q.join()

    def close(self) -> None:
        """Write what is queued, stop the thread (and close the library if owned). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(None)
        self._thread.join()
        if self._close_library:
            self.library.close()

    def __enter__(self) -> LibraryRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._wait_for_idle()
                self._write(*item)
                self.written += 1
            except Exception:  # one bad frame must not stop the recording of the others
                self.failed += 1
                log.exception("library: recording a frame failed")
            finally:
                self._q.task_done()

    def _wait_for_idle(self) -> None:
        """Until ``idle`` is set, at most ``max_defer_s``; at once when closing (write what is left)."""
        if self._idle is None:
            return
        end = time.monotonic() + self.max_defer_s
        while not self._closed and not self._idle.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._idle.wait(min(left, 0.05))  # short slices: close() must not wait for a busy daemon

    def _write(self, image: np.ndarray, analysis: Any, source: str) -> None:
        rows = analysis_rows(image, analysis, self.patch_size_px, self.patch_pixel_size_nm)
        meta = {
            "frame_id": analysis.image.frame_id,
            "height_px": analysis.image.height_px,
            "width_px": analysis.image.width_px,
            "models": dict(analysis.models),
        }
        xy, kinds, feats = rows.pop("xy_px"), rows.pop("kinds"), rows.pop("features")
        self.library.add_frame_with_defects(
            source,
            analysis.image.pixel_size_nm,
            xy,
            kinds,
            feats,
            bias_v=analysis.image.bias_v,
            meta=meta,
            **rows,
        )


# ------------------------------------------------------------------------------------------ row builders
def _frame_row(
    source: str, pixel_size_nm: float, bias_v: float | None, time_s: float | None, meta: dict[str, Any] | None
) -> tuple:
    if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise InputError(f"pixel_size_nm must be positive, got {pixel_size_nm!r}")
    return (
        str(source),
        float(pixel_size_nm),
        time.time() if time_s is None else float(time_s),
        None if bias_v is None else float(bias_v),
        json.dumps(meta or {}),
    )


def _insert_frame(cur: sqlite3.Cursor, row: tuple) -> int:
    cur.execute(
        "INSERT INTO frames (source, pixel_size_nm, time_s, bias_v, meta_json) VALUES (?, ?, ?, ?, ?)", row
    )
    return int(cur.lastrowid)


def _defect_rows(
    xy_px: np.ndarray,
    kinds: Sequence[str],
    features: np.ndarray,
    patches: Sequence[np.ndarray | None] | np.ndarray | None = None,
    clusters: Sequence[int] | np.ndarray | None = None,
    predicted_labels: Sequence[str | None] | None = None,
    true_labels: Sequence[str | None] | None = None,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> list[tuple]:
    """Validated defect rows (without frame id) for ``_insert_defects``."""
    xy = np.asarray(xy_px, float).reshape(-1, 2)
    n = len(xy)
    x = np.asarray(features, float).reshape(n, -1) if n else np.zeros((0, len(feature_names)))
    kinds = [str(k) for k in kinds]
    if len(kinds) != n or x.shape[1] != len(feature_names):
        raise InputError(f"add_defects: {n} positions, {len(kinds)} kinds, features {x.shape}")
    if set(kinds) - set(KINDS):
        raise InputError(f"unknown kinds {sorted(set(kinds) - set(KINDS))}")
    if not np.all(np.isfinite(xy)) or np.isinf(x).any():
        raise InputError("add_defects: non-finite positions or infinite features (NaN = undefined is ok)")
    cl = np.full(n, -1, int) if clusters is None else np.asarray(clusters, int).reshape(n)
    pl = [None] * n if predicted_labels is None else list(predicted_labels)
    tl = [None] * n if true_labels is None else list(true_labels)
    pa = [None] * n if patches is None else list(patches)
    if not (len(pl) == len(tl) == len(pa) == n):
        raise InputError("add_defects: patches/labels must have one entry per defect")
    names = list(feature_names)
    rows = [
        (
            float(xy[i, 0]),
            float(xy[i, 1]),
            kinds[i],
            json.dumps({n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, x[i], strict=True)}),
            None if pa[i] is None else patch_to_bytes(pa[i]),
            int(cl[i]),
            pl[i],
            tl[i],
        )
        for i in range(n)
    ]
    return rows


def _insert_defects(cur: sqlite3.Cursor, frame_id: int, rows: list[tuple]) -> list[int]:
    if cur.execute("SELECT 1 FROM frames WHERE id = ?", (frame_id,)).fetchone() is None:
        raise InputError(f"no frame with id {frame_id}")
    ids = []
    for row in rows:
        cur.execute(
            "INSERT INTO defects (frame_id, x_px, y_px, kind, features_json, patch, cluster, "
            "predicted_label, true_label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (frame_id, *row),
        )
        ids.append(int(cur.lastrowid))
    return ids


@dataclass
class DefectClassifier:
    """Per-kind supervised models loaded from a library (``models[kind]`` is an sklearn classifier or a
    constant label string)."""

    models: dict[str, Any]
    meta: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    def predict(self, features: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
        """Labels (N,) object array; None where the kind had no training data or a feature is NaN."""
        k = np.asarray(list(kinds), dtype=object)
        x = np.asarray(features, float).reshape(len(k), -1)
        if x.shape[1] != len(self.meta["feature_names"]):
            raise InputError(
                f"features have {x.shape[1]} columns, the classifier wants {self.meta['feature_names']}"
            )
        ok = np.all(np.isfinite(x), axis=1)
        out = np.full(len(k), None, dtype=object)
        for kind, model in self.models.items():
            sel = (k == kind) & ok
            if not sel.any():
                continue
            out[sel] = model if isinstance(model, str) else model.predict(x[sel])
        return out
