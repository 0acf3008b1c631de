"""Watched-folder adapter: new files become frames once, corrupt files are skipped, the watcher survives."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from instrument_adapters.base import WriteNotSupported
from instrument_adapters.files import FolderAdapter
from stm_feedback.errors import InputError
from stm_feedback.readers import write_sxm


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, (16, 16)).astype(np.float32)


def test_existing_and_new_files_once_and_corrupt_skipped(tmp_path: Path) -> None:
    write_sxm(tmp_path / "a.sxm", _img(0), 0.1)
    (tmp_path / "notes.txt").write_text("ignored")

    def producer() -> None:
        time.sleep(0.4)
        (tmp_path / "bad.sxm").write_bytes(b"not an sxm file")
        np.save(tmp_path / "b.npy", _img(1))
        time.sleep(0.3)
        tmp = tmp_path / "c.sxm.part"  # written elsewhere, then renamed into place (a "moved" event)
        write_sxm(tmp, _img(2), 0.1)
        tmp.rename(tmp_path / "c.sxm")

    adapter = FolderAdapter(tmp_path, idle_timeout_s=2.0, settle_s=0.05, pixel_size_nm=0.1)
    t = threading.Thread(target=producer)
    t.start()
    try:
        frames = list(adapter.frames())
    finally:
        adapter.close()
        t.join()
    names = [Path(f.source).name for f in frames]
    assert names == ["a.sxm", "b.npy", "c.sxm"]  # each exactly once, despite created+modified+closed events
    np.testing.assert_allclose(frames[1].image, _img(1))
    np.testing.assert_allclose(frames[2].image, _img(2), rtol=1e-5, atol=1e-7)
    assert [Path(p).name for p, _ in adapter.errors] == ["bad.sxm"]
    assert len({f.meta["frame_id"] for f in frames}) == 3


def test_rewritten_file_is_a_new_frame(tmp_path: Path) -> None:
    write_sxm(tmp_path / "live.sxm", _img(3), 0.1)
    adapter = FolderAdapter(tmp_path, idle_timeout_s=1.5, settle_s=0.05)
    it = adapter.frames()
    try:
        first = next(it)
        time.sleep(0.05)
        write_sxm(tmp_path / "live.sxm", _img(4) + 1.0, 0.1)  # same name, new content
        second = next(it)
        assert float(second.image.mean()) == pytest.approx(float(first.image.mean()) + 1.0, abs=0.05)
        assert list(it) == []  # nothing else arrives: the generator ends after the idle timeout
    finally:
        adapter.close()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        FolderAdapter(tmp_path / "missing")
    adapter = FolderAdapter(tmp_path, idle_timeout_s=0.2)
    try:
        with pytest.raises(WriteNotSupported):
            adapter.write(np.zeros((3, 2)))
        assert list(adapter.frames()) == []
    finally:
        adapter.close()
