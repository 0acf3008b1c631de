"""TEST DOUBLE (not a test module): a small deterministic analyzer with the Pipeline's ``analyze`` signature,
plus helpers to run a daemon in-process. Used by the daemon tests while (and where) the real pipeline is not
needed: the daemon's contract does not depend on what the analysis contains.

Also loadable by a ``stm-feedback serve`` subprocess through
``STM_FEEDBACK_SERVER__ANALYZER=test_server_doubles:make_analyzer`` with ``tests/`` on ``PYTHONPATH``;
``STM_TEST_ANALYZER_DELAY_S`` makes every call sleep (to test draining and overload).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from scipy import ndimage

from stm_feedback.errors import InputError
from stm_feedback.schema import Analysis, Defect, ImageInfo, Site


class DeterministicTestAnalyzer:
    """Defects = the 4 brightest local maxima; one 3x1 site per 16x16 px block; terrace 0 everywhere."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.runner = self  # describe_models() looks for runner.versions/backend/device
        self.backend = "test-double"
        self.device = "cpu"

    def versions(self) -> dict[str, str]:
        return {"test": "double-1"}

    def analyze(
        self,
        image: np.ndarray,
        pixel_size_nm: float,
        bias_v: float | None = None,
        frame_id: str | None = None,
    ) -> Analysis:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if min(image.shape) < 8:
            raise InputError(f"frame {image.shape} too small (< 8 px)")
        if frame_id == "boom":
            raise RuntimeError("simulated analyzer bug")
        h, w = image.shape
        peaks = (image == ndimage.maximum_filter(image, size=5)) & (image > image.mean())
        ys, xs = np.nonzero(peaks)
        order = np.argsort(-image[ys, xs], kind="stable")[:4]
        defects = [
            Defect(float(xs[i]), float(ys[i]), "protrusion", 0, "protrusion-0", 1.0, 1.2, 0.9, False)
            for i in order
        ]
        sites = [
            Site(
                x + 8.0,
                y + 8.0,
                [[x + 7.0, y + 8.0], [x + 8.0, y + 8.0], [x + 9.0, y + 8.0]],
                0,
                1.0 + x / w,
                "3x1",
                float(x + y),
            )
            for y in range(0, h - 15, 16)
            for x in range(0, w - 15, 16)
        ]
        return Analysis(
            image=ImageInfo(h, w, float(pixel_size_nm), bias_v, frame_id),
            defects=defects,
            sites=sites,
            terrace_labels=np.zeros((h, w), np.int32),
            safe_mask=np.asarray(image < image.mean()),
            timings_ms={"fake": 0.01},
            models={"test": "double-1"},
        )


def make_analyzer(settings: Any) -> DeterministicTestAnalyzer:
    """Factory for ``ServerSettings.analyzer`` (called with the Settings object)."""
    return DeterministicTestAnalyzer(delay_s=float(os.environ.get("STM_TEST_ANALYZER_DELAY_S", "0")))


def test_double_is_deterministic() -> None:
    img = np.random.default_rng(1).normal(size=(40, 48)).astype(np.float32)
    a, b = DeterministicTestAnalyzer().analyze(img, 0.1), DeterministicTestAnalyzer().analyze(img, 0.1)
    assert a.to_json_dict() == b.to_json_dict()
    assert len(a.defects) == 4 and len(a.sites) == 2 * 3


class SimulatorOracleRunner:
    """TEST DOUBLE for ``stm_feedback.runner.ModelRunner`` while trained weights are missing: its "network
    maps" are the perfect maps (``stm_feedback.targets.oracle_maps``) of the simulator's ground truth for the
    frame the ``SimulatedSTM`` scanned last. Any other image (a partial frame, a frame from elsewhere) is
    rejected with ``InputError``, so it can never pass off truth for a frame it does not know."""

    backend = "oracle-test-double"
    device = "cpu"

    def __init__(self, stm: Any) -> None:
        self.stm = stm

    def versions(self) -> dict[str, str]:
        return {"oracle": "simulator-truth"}

    def predict(self, image: np.ndarray, pixel_size_nm: float, bias_v: float | None = None) -> Any:
        from stm_feedback.targets import oracle_maps

        frame = self.stm.last_frame
        if frame is None or frame.image_nm.shape != image.shape or not np.array_equal(frame.image_nm, image):
            raise InputError("oracle runner: not the frame the simulated STM scanned last")
        return oracle_maps(frame.image_nm, frame.truth, bias_v)


def oracle_pipeline(stm: Any) -> Any:
    """The real ``Pipeline`` (post-processing, planner) on ``SimulatorOracleRunner`` maps of ``stm``."""
    from stm_feedback.config import load_settings
    from stm_feedback.pipeline import Pipeline

    return Pipeline(load_settings(), runner=SimulatorOracleRunner(stm))
