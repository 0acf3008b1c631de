"""Automatic recording of analysed defects into the library (library.LibraryRecorder, Pipeline.recorder)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stm_feedback.classify import FEATURE_NAMES
from stm_feedback.config import Settings
from stm_feedback.errors import InputError
from stm_feedback.library import DefectLibrary, LibraryRecorder
from stm_feedback.pipeline import Pipeline
from tests.test_pipeline_oracle import oracle_maps, simulate


@pytest.fixture(scope="module")
def frames() -> list:
    return [simulate(seed, 128, 0.1, "realistic") for seed in (1_000_400, 1_000_401, 1_000_402)]


def _analyses(pipe: Pipeline, frames: list) -> list:
    return [
        pipe.analyze_maps(
            f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), f.pixel_size_nm, f.bias_v, f"frame-{i}"
        )
        for i, f in enumerate(frames)
    ]


def test_pipeline_records_every_analysed_defect(tmp_path: Path, frames: list) -> None:
    lib = DefectLibrary(tmp_path / "lib.sqlite")
    rec = LibraryRecorder(lib, patch_size_px=16)
    analyses = _analyses(Pipeline(Settings(), recorder=rec), frames)
    rec.close()
    n_def = sum(len(a.defects) for a in analyses)
    assert n_def > 0, "pick frames with defects"
    assert rec.submitted == rec.written == 3 and rec.failed == 0
    stored = lib.frames()
    assert [f["source"] for f in stored] == ["frame-0", "frame-1", "frame-2"]
    assert all(f["pixel_size_nm"] == pytest.approx(0.1) for f in stored)
    recs = lib.defects(with_patches=True)
    assert len(recs) == n_def
    first = [r for r in recs if r.frame_id == stored[0]["id"]]
    a0 = analyses[0]
    np.testing.assert_allclose([[r.x_px, r.y_px] for r in first], [[d.x_px, d.y_px] for d in a0.defects])
    assert [r.kind for r in first] == [d.kind for d in a0.defects]
    assert all(r.patch is not None and r.patch.shape == (16, 16) for r in recs)
    # the full feature vector, not only the three JSON features
    x = np.array([r.features for r in first])
    assert x.shape == (len(first), len(FEATURE_NAMES))
    np.testing.assert_allclose(x, np.where(np.isfinite(a0.defect_features), a0.defect_features, np.nan))
    lib.close()


def test_no_recorder_no_writes(tmp_path: Path, frames: list) -> None:
    _analyses(Pipeline(Settings()), frames[:1])
    assert not list(tmp_path.iterdir())


class _SlowLibrary:
    """Stand-in library whose writes take a while and can be told to fail: checks back-pressure and
    failure handling without timing assertions."""

    def __init__(self, fail_sources: set[str]) -> None:
        self.rows: list[str] = []
        self.fail_sources = fail_sources
        self.gate = threading.Event()

    def add_frame_with_defects(self, source: str, *args: object, **kw: object) -> tuple[int, list[int]]:
        self.gate.wait()
        if source in self.fail_sources:
            raise InputError("rejected")
        self.rows.append(source)
        return len(self.rows), []

    def close(self) -> None:
        pass


def test_full_queue_blocks_instead_of_dropping_and_close_drains(frames: list) -> None:
    lib = _SlowLibrary({"bad"})
    rec = LibraryRecorder(lib, max_queue=2)  # type: ignore[arg-type]
    a = _analyses(Pipeline(Settings()), frames[:1])[0]
    img = frames[0].image_nm
    sources = [f"f{i}" for i in range(6)] + ["bad", "f6"]
    done = threading.Event()

    def produce() -> None:
        for s in sources:
            rec.submit(img, a, s)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    # the writer is held at the gate: the producer must block on the full queue, not drop frames
    time.sleep(0.2)
    assert not done.is_set()
    lib.gate.set()
    t.join(10)
    assert done.is_set()
    rec.close()
    assert lib.rows == [s for s in sources if s != "bad"]  # every accepted frame, in order
    assert rec.failed == 1 and rec.written == len(sources) - 1
    with pytest.raises(RuntimeError):
        rec.submit(img, a, "late")


def test_recorder_from_settings_and_off_switch(tmp_path: Path, frames: list) -> None:
    s = Settings()
    s.library = replace_model(s.library, path=tmp_path / "daemon.sqlite")
    assert s.library.record is True  # on by default
    rec = LibraryRecorder.from_settings(s)
    pipe = Pipeline(s, recorder=rec)
    _analyses(pipe, frames[:2])
    rec.close()
    with DefectLibrary(tmp_path / "daemon.sqlite") as lib:
        assert len(lib.frames()) == 2
    off = Settings(library={"record": False})
    assert off.library.record is False


def replace_model(model, **kw):  # noqa: ANN001, ANN201
    return model.model_copy(update=kw)


def test_analysis_rows_without_feature_matrix(frames: list) -> None:
    """An Analysis from elsewhere (no defect_features) is recorded with the three JSON features."""
    from stm_feedback.library import analysis_rows

    a = _analyses(Pipeline(Settings()), frames[:1])[0]
    b = replace(a, defect_features=None)
    rows = analysis_rows(frames[0].image_nm, b, 16)
    j = FEATURE_NAMES.index("area_cells")
    np.testing.assert_allclose(rows["features"][:, j], [d.area_cells for d in a.defects])
    assert np.isnan(rows["features"][:, FEATURE_NAMES.index("fill")]).all()


def test_recorder_defers_writes_while_the_daemon_is_busy(tmp_path: Path, frames: list) -> None:
    """With ``idle`` cleared (an analysis running) the writer waits; it writes when idle is set, after
    ``max_defer_s`` at the latest, and at once on close(): nothing accepted is dropped."""
    a = _analyses(Pipeline(Settings()), frames[:1])[0]
    img = frames[0].image_nm
    idle = threading.Event()  # busy
    lib = DefectLibrary(tmp_path / "lib.sqlite")
    rec = LibraryRecorder(lib, idle=idle, max_defer_s=60.0, close_library=True)
    rec.submit(img, a, "f0")
    time.sleep(0.3)
    assert rec.written == 0  # deferred
    idle.set()
    rec.flush()
    assert rec.written == 1
    idle.clear()
    rec.max_defer_s = 0.05  # a stream with no idle moment is written anyway, late by at most this
    rec.submit(img, a, "f1")
    rec.flush()
    assert rec.written == 2
    rec.max_defer_s = 60.0
    rec.submit(img, a, "f2")
    t0 = time.monotonic()
    rec.close()  # still busy: close writes what is queued without waiting for idle
    assert rec.written == 3 and rec.failed == 0 and time.monotonic() - t0 < 30
    with DefectLibrary(tmp_path / "lib.sqlite") as lib:
        assert len(lib.frames()) == 3
