"""Benchmark plumbing (stm_feedback/benchmark.py, `stm-feedback bench`): statistics, stage bookkeeping, the
JSON report. Tiny frames and nets; no assertion on any measured time."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from stm_feedback.benchmark import (
    NET_STAGE_PREFIX,
    BenchOptions,
    bench_pipeline,
    detection_agreement,
    format_report,
    run_benchmark,
    simulated_frames,
    summarize_ms,
)
from stm_feedback.config import Settings
from stm_feedback.errors import InputError
from stm_feedback.nets import NET_NAMES
from stm_feedback.pipeline import Pipeline
from stm_feedback.runner import ModelRunner
from tests.random_nets import save_random_nets

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_nets(tmp_path_factory.mktemp("models"), (4, 4, 4, 4), (4,), "tiny")


def test_summarize_ms() -> None:
    s = summarize_ms(list(range(1, 101)))
    assert s["n"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == 100 and s["mean_ms"] == pytest.approx(50.5)
    with pytest.raises(InputError):
        summarize_ms([])


def test_detection_agreement() -> None:
    def analysis(atoms_xy: list[tuple[float, float]], defects: list[tuple[float, float, str]]) -> Any:
        # only what detection_agreement reads from an Analysis
        return SimpleNamespace(
            atoms=[SimpleNamespace(x_px=x, y_px=y) for x, y in atoms_xy],
            defects=[SimpleNamespace(x_px=x, y_px=y, kind=k) for x, y, k in defects],
        )

    ref = analysis([(10, 10), (20, 20), (30, 30)], [(5, 5, "protrusion")])
    same = detection_agreement(ref, ref, 0.1)
    assert same["atoms_f1"] == 1.0 and same["protrusions_f1"] == 1.0 and same["max_offset_nm"] == 0.0
    moved = analysis([(10.3, 10), (20, 20)], [(5, 5, "depression")])  # 0.03 nm shift, one atom lost
    ag = detection_agreement(ref, moved, 0.1, tol_nm=0.05)
    assert ag["atoms_f1"] == pytest.approx(0.8) and ag["max_offset_nm"] == pytest.approx(0.03)
    assert ag["protrusions_f1"] == 0.0 and ag["depressions_f1"] == 0.0  # kind must agree
    far = analysis([(11, 10), (20, 20), (30, 30)], [(5, 5, "protrusion")])  # 0.1 nm > 0.05 nm
    assert detection_agreement(ref, far, 0.1, tol_nm=0.05)["atoms_f1"] == pytest.approx(2 * 2 / 6)


def test_bench_pipeline_stages(tiny_models: Path) -> None:
    runner = ModelRunner.from_dir(tiny_models, device="cpu", backend="torch")
    pipe = Pipeline(Settings(), runner=runner)
    frames = simulated_frames(2, 64)
    engines_before = dict(runner.engines)
    res = bench_pipeline(pipe, frames, n=3, warmup=1)
    assert runner.engines == engines_before  # timing wrappers removed again
    stages = res["stages"]
    for n in NET_NAMES:
        assert stages[NET_STAGE_PREFIX + n]["n"] == 3
    assert "preprocess" in stages and "networks" not in stages and "total" not in stages
    assert res["end_to_end"]["n"] == 3 and res["frames"] == 3
    # the parts cannot exceed the whole (same clock, same frames)
    parts = sum(s["mean_ms"] for s in stages.values())
    assert parts <= res["end_to_end"]["mean_ms"] * 1.05 + 0.5


def test_simulated_frames_are_seeded() -> None:
    a, b = simulated_frames(2, 32), simulated_frames(2, 32)
    assert np.array_equal(a[1].image_nm, b[1].image_nm) and not np.array_equal(a[0].image_nm, a[1].image_nm)
    with pytest.raises(InputError):
        simulated_frames(0, 32)


@pytest.mark.slow
def test_cli_bench_json(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command on tiny frames, with the daemon subprocess: every section present in the JSON."""
    from typer.testing import CliRunner

    from stm_feedback.cli import app

    monkeypatch.setenv("STM_FEEDBACK_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    args = ["bench", "--size", "64", "--frames", "3", "--warmup", "1", "--large-size", "96", "--large-frames",
            "2", "--archive-frames", "2", "--baseline-frames", "1", "--models-dir", str(tiny_models),
            "--backend", "torch", "--threads", "1", "--json", str(out),
            "--markdown", str(tmp_path / "b.md"), "--equivalence-frames", "0"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["models"]["weights"] == "trained" and r["models"]["backend"].startswith("torch-jit-")
    assert r["models"]["versions"] == {n: f"{n}-tiny" for n in NET_NAMES}
    assert r["inprocess"]["end_to_end"]["n"] == 3 and r["inprocess_large"]["size_px"] == 96
    assert r["daemon"]["round_trip"]["n"] == 3 and r["daemon"]["backend"] == r["models"]["backend"]
    assert r["daemon"]["rss_mb"] > 0 and r["daemon"]["cold_start_to_ready_s"] > 0
    assert r["daemon"]["cold_start_empty_cache_s"] > 0
    paper = r["paper_eager_fp32"]
    assert paper["backend"] == "torch-fp32" and paper["ratio_networks_p50"] > 0
    assert r["archive"]["frames"] == 2
    assert "END-TO-END" in res.output and "daemon over ZeroMQ" in res.output
    assert format_report(r).splitlines()[0].startswith("machine:")
    table = (tmp_path / "b.md").read_text()
    assert "| **END-TO-END** |" in table and table.index("| preprocess |") < table.index("| net:atoms |")


def test_bench_rejects_bad_options(tiny_models: Path) -> None:
    with pytest.raises(InputError):
        run_benchmark(BenchOptions(frames=0, models_dir=tiny_models))
