"""INT8 IRs (``stm-feedback quantize``): written with their provenance, run by the OpenVINO backend only for
the weights they were quantised from, ignored (with a warning) when stale or unreadable. The detection-level
equivalence of the shipped IRs is in tests/test_backends.py. No wall-clock assertions."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from stm_feedback.backends import int8_paths  # noqa: E402
from stm_feedback.config import ModelSettings  # noqa: E402
from stm_feedback.errors import ModelError  # noqa: E402
from stm_feedback.nets import NET_NAMES, load_model, model_paths, save_model  # noqa: E402
from stm_feedback.runner import ModelRunner  # noqa: E402
from tests.random_nets import save_random_nets  # noqa: E402

torch.set_num_threads(1)


def _frame(seed: int, size_px: int = 96):  # noqa: ANN202
    from simulator.frame import SimConfig, simulate_frame

    return simulate_frame(seed, size_px, 0.1, SimConfig.preset("realistic"))


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Narrow random nets (seeded) and their INT8 IRs from 3 small calibration frames."""
    pytest.importorskip("nncf")
    from stm_feedback.quantize import quantize_models

    d = save_random_nets(tmp_path_factory.mktemp("models"))
    written = quantize_models(d, n_frames=3, size_px=96, nets=NET_NAMES)
    assert set(written) == set(NET_NAMES)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_quantize_writes_irs_with_provenance(quantized_models: Path) -> None:
    for n in NET_NAMES:
        xml, meta_path = int8_paths(quantized_models / "int8", model_paths(quantized_models, n)[0].stem)
        assert xml.exists() and xml.with_suffix(".bin").exists()
        meta = json.loads(meta_path.read_text())
        assert meta["net_version"] == f"{n}-random"
        assert meta["calibration"]["frames"] == 3 and meta["calibration"]["inputs"] == 3
        assert len(meta["fingerprint"]) == 24


def test_openvino_runs_matching_int8_irs(quantized_models: Path) -> None:
    runner = ModelRunner.from_dir(quantized_models, device="cpu", backend="openvino", threads=1)
    assert runner.backend == "openvino-int8"
    assert {e.precision for e in runner.engines.values()} == {"int8"}
    f = _frame(1_000_101)
    ref = ModelRunner.from_dir(quantized_models, device="cpu").predict(f.image_nm, 0.1, f.bias_v)
    out = runner.predict(f.image_nm, 0.1, f.bias_v)
    for field in ("step_prob", "atom_prob", "protrusion_prob", "depression_prob"):
        a, b = getattr(ref, field), getattr(out, field)
        assert a.shape == b.shape and b.dtype == np.float32
        assert np.isfinite(b).all()
        # quantised, so not equal, but close (measured: mean |d| 1e-5 - 1.1e-4)
        assert float(np.abs(a - b).mean()) <= 0.005, field
    # these random maps vary enough to show that the INT8 maps follow the input (measured r 0.997-0.999)
    for field in ("step_prob", "atom_prob"):
        a, b = getattr(ref, field), getattr(out, field)
        assert float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) >= 0.98, field
    # other input shapes (pixel sizes) run on the same dynamic-shape IRs
    out2 = runner.predict(f.image_nm[:80, :72], 0.13, f.bias_v)
    assert out2.atom_prob.shape == (80, 72)


def test_int8_setting_off_and_other_backends_ignore_irs(quantized_models: Path) -> None:
    settings = ModelSettings(
        models_dir=quantized_models, device="cpu", backend="openvino", threads=1, int8=False
    )
    assert ModelRunner.from_settings(settings).backend in ("openvino-bf16", "openvino-fp32")
    torch_runner = ModelRunner.from_dir(quantized_models, device="cpu", backend="torch", threads=1)
    assert "int8" not in torch_runner.backend
    kept = ModelRunner.from_dir(quantized_models, device="cpu", backend="openvino", fp32_nets=("atoms",))
    assert kept.engines["atoms"].precision == "f32" and kept.engines["defects"].precision == "int8"
    assert kept.backend.endswith("+int8:defects,terraces")


def test_stale_ir_is_not_used(
    quantized_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _copy(quantized_models, tmp_path / "models")
    net, spec = load_model(d, "atoms")
    with torch.no_grad():  # "retrained" atoms net: its old INT8 copy must not run
        next(net.parameters()).add_(0.01)
    save_model(net, spec, d)
    with caplog.at_level(logging.WARNING, logger="stm_feedback.backends"):
        runner = ModelRunner.from_dir(d, device="cpu", backend="openvino", threads=1)
    assert runner.engines["atoms"].precision != "int8"
    assert runner.engines["terraces"].precision == "int8" and runner.engines["defects"].precision == "int8"
    assert runner.backend.endswith("+int8:defects,terraces")
    assert any("quantised from other weights" in r.getMessage() for r in caplog.records)


def test_unreadable_provenance_is_ignored(
    quantized_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _copy(quantized_models, tmp_path / "models")
    _, meta = int8_paths(d / "int8", model_paths(d, "defects")[0].stem)
    meta.write_text("{not json")
    _, meta_t = int8_paths(d / "int8", model_paths(d, "terraces")[0].stem)
    meta_t.unlink()  # an IR without provenance is not trusted either
    with caplog.at_level(logging.WARNING, logger="stm_feedback.backends"):
        runner = ModelRunner.from_dir(d, device="cpu", backend="openvino", threads=1)
    assert runner.engines["defects"].precision != "int8" and runner.engines["terraces"].precision != "int8"
    assert runner.engines["atoms"].precision == "int8"
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_quantize_without_nncf_is_a_clear_error(
    quantized_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stm_feedback.quantize import quantize_models

    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf -> ImportError
    with pytest.raises(ModelError, match="pip install nncf"):
        quantize_models(quantized_models, n_frames=1, out_dir=tmp_path / "int8")
    assert not (tmp_path / "int8").exists() or not any((tmp_path / "int8").iterdir())


def test_bad_quantize_arguments(quantized_models: Path, tmp_path: Path) -> None:
    from stm_feedback.quantize import quantize_models

    with pytest.raises(ModelError, match="nets to quantise"):
        quantize_models(quantized_models, n_frames=1, out_dir=tmp_path, nets=("atom",))
    with pytest.raises(ModelError, match="preset"):
        quantize_models(quantized_models, n_frames=1, out_dir=tmp_path, preset="fast")


def test_quantize_cli_reports_errors(quantized_models: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stm_feedback.cli import app

    res = CliRunner().invoke(app, ["quantize", "--models-dir", str(quantized_models), "--nets", "nope"])
    assert res.exit_code == 2 and "nets to quantise" in res.output


def test_damaged_ir_falls_back_to_the_module(
    quantized_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _copy(quantized_models, tmp_path / "models")
    xml, _ = int8_paths(d / "int8", model_paths(d, "atoms")[0].stem)
    xml.write_text("<net><broken")  # provenance still matches: the IR itself is unreadable
    with caplog.at_level(logging.WARNING, logger="stm_feedback.backends"):
        runner = ModelRunner.from_dir(d, device="cpu", backend="openvino", threads=1)
    assert runner.engines["atoms"].precision != "int8" and runner.engines["defects"].precision == "int8"
    assert any("not usable" in r.getMessage() for r in caplog.records)
    f = _frame(1_000_101)
    assert runner.predict(f.image_nm, 0.1, f.bias_v).atom_prob.shape == f.image_nm.shape
