"""Evaluation machinery: the oracle scores 1.0, aggregation micro-averages, the table marks targets, missing
nets fail with a clear message. Frames: tests/synthetic_frames.py (and the simulator when it is present)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_feedback.baseline import analyze_baseline
from stm_feedback.cli import app
from stm_feedback.errors import InputError, ModelError
from stm_feedback.evaluation import (
    SUITE_SEED_BASE,
    SUITES,
    TARGETS,
    EvalFrame,
    aggregate,
    evaluate,
    evaluate_frames,
    markdown_table,
    nets_analyzer,
    oracle_analysis,
    passes,
    suite_frames,
)
from stm_feedback.metrics import score_frame
from tests.synthetic_frames import render

HAS_SIMULATOR = importlib.util.find_spec("simulator.frame") is not None


@pytest.fixture(scope="module")
def frames() -> list[EvalFrame]:
    out = []
    for seed in range(3):
        img, truth = render(seed=seed, size_px=96, angle_deg=10.0 + 30 * seed)
        out.append(EvalFrame(seed, img, truth.pixel_size_nm, truth.bias_v, truth))
    return out


def test_suites_use_unseen_seeds() -> None:
    assert all(s.first_seed >= SUITE_SEED_BASE >= 1_000_000 for s in SUITES.values())
    ranges = sorted((s.first_seed, s.first_seed + s.n_frames) for s in SUITES.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # no overlapping seeds


def test_empty_suite_is_the_realistic_preset_at_positive_bias() -> None:
    """Suite "empty": the realistic frames imaged in empty states (rows dark); "realistic" is filled-state."""
    empty = list(suite_frames("empty", 2))
    real = list(suite_frames("realistic", 2))
    assert all(f.bias_v > 0 and f.truth.params["preset"] == "realistic_empty" for f in empty)
    assert all(f.bias_v < 0 and f.truth.params["preset"] == "realistic" for f in real)
    assert TARGETS["empty"] == TARGETS["realistic"]


def test_oracle_scores_one(frames) -> None:
    r = evaluate_frames(frames, lambda f: oracle_analysis(f.truth), "realistic", "oracle")
    m = r.metrics
    for key in ("atom_f1", "dimer_f1", "defect_f1", "kind_accuracy", "terrace_ari"):
        assert m[key] == pytest.approx(1.0), key
    assert m["atom_rmse_nm"] == pytest.approx(0.0, abs=1e-12)
    assert m["angle_err_median_deg"] == pytest.approx(0.0, abs=1e-9)
    assert r.n_frames == 3 and len(r.frames) == 3


def test_baseline_through_the_machinery(frames) -> None:
    r = evaluate_frames(
        frames, lambda f: analyze_baseline(f.image_nm, f.pixel_size_nm, f.bias_v), "hard", "baseline"
    )
    m = r.metrics
    assert 0.7 < m["atom_f1"] <= 1.0 and m["defect_f1"] > 0.6 and m["terrace_ari"] > 0.8
    # micro-averaging: the suite F1 is the F1 of the summed counts, not the mean of frame F1s
    scores = [score_frame(f.truth, analyze_baseline(f.image_nm, f.pixel_size_nm, f.bias_v)) for f in frames]
    tp = sum(s.atoms.tp for s in scores)
    fp = sum(s.atoms.fp for s in scores)
    fn = sum(s.atoms.fn for s in scores)
    assert m["atom_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert aggregate(scores)["atom_f1"] == pytest.approx(m["atom_f1"])
    json.dumps(r.to_dict(), default=float)  # JSON-serialisable for --json


@pytest.mark.skipif(not HAS_SIMULATOR, reason="needs the simulator")
def test_polarity_accuracy_scores_given_or_estimated_polarity() -> None:
    """``polarity_accuracy``: the analysis' polarity against the truth bias. The baseline takes a withheld
    bias as filled states, so on one empty-state and one filled-state frame it is right half the time."""
    both = list(suite_frames("empty", 1)) + list(suite_frames("realistic", 1))
    oracle = evaluate_frames(both, lambda f: oracle_analysis(f.truth), "empty", "oracle")
    assert oracle.metrics["polarity_accuracy"] == 1.0
    given = evaluate_frames(
        both, lambda f: analyze_baseline(f.image_nm, f.pixel_size_nm, f.bias_v), "empty", "baseline"
    )
    assert given.metrics["polarity_accuracy"] == 1.0
    assert [fr["polarity"] for fr in given.frames] == ["empty", "filled"]
    withheld = evaluate(
        "empty", lambda img, px, bias: analyze_baseline(img, px, bias), "baseline", n=1, withhold_bias=True
    )
    assert withheld.metrics["polarity_accuracy"] == 0.0  # an empty-state frame taken as filled
    assert withheld.frames[0]["polarity_source"] == "assumed"


def test_targets_and_table(frames) -> None:
    assert passes("realistic", "atom_f1", 0.96) is True
    assert passes("realistic", "atom_f1", 0.94) is False
    assert passes("realistic", "angle_err_median_deg", 0.4) is True
    assert passes("hard", "angle_err_median_deg", 5.0) is None
    assert passes("hard", "defect_f1", float("nan")) is False
    nets = evaluate_frames(frames, lambda f: oracle_analysis(f.truth), "realistic", "nets")
    base = evaluate_frames(
        frames[:1], lambda f: analyze_baseline(f.image_nm, 0.1, f.bias_v), "realistic", "baseline"
    )
    table = markdown_table([nets, base])
    assert table.splitlines()[0] == "| metric | target | nets | baseline | nets beat baseline |"
    assert "| atom F1 @0.10 nm | >= 0.95 | 1.000 pass |" in table
    with pytest.raises(InputError):
        markdown_table([])


def test_nets_missing_is_a_clear_model_error(monkeypatch) -> None:
    monkeypatch.setitem(
        sys.modules, "stm_feedback.pipeline", None
    )  # import fails like on a checkout without it
    with pytest.raises(ModelError, match="--method baseline"):
        nets_analyzer()
    result = CliRunner().invoke(app, ["evaluate", "--suite", "clean", "--method", "nets", "--n", "1"])
    assert result.exit_code == 2
    assert "--method baseline" in result.output


def test_unknown_suite_rejected() -> None:
    from stm_feedback.evaluation import suite_frames

    with pytest.raises(InputError):
        next(suite_frames("nope"))


@pytest.mark.skipif(not HAS_SIMULATOR, reason="simulator.frame not on this checkout yet")
def test_cli_oracle_on_the_simulator(tmp_path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["evaluate", "--suite", "clean", "--method", "oracle", "--n", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())[0]["metrics"]
    assert m["atom_f1"] == pytest.approx(1.0) and m["defect_f1"] == pytest.approx(1.0)
    assert m["terrace_ari"] == pytest.approx(1.0)
    assert np.isfinite(m["angle_err_median_deg"]) and m["angle_err_median_deg"] < 1e-6


def test_comparison_column_says_tie_for_equal_values() -> None:
    from stm_feedback.evaluation import SuiteResult, markdown_table

    m = {"atom_f1": 0.9, "kind_accuracy": 1.0}
    nets = SuiteResult(suite="realistic", method="nets", n_frames=1, metrics=dict(m, atom_f1=0.95))
    base = SuiteResult(suite="realistic", method="baseline", n_frames=1, metrics=m)
    table = markdown_table([nets, base]).splitlines()
    rows = {r.split("|")[1].strip(): r for r in table if r.startswith("| ")}
    assert rows["defect kind accuracy"].rstrip(" |").endswith("tie")
    assert rows["atom F1 @0.10 nm"].rstrip(" |").endswith("yes")


def test_safe_mask_rows_are_not_judged_against_the_baseline() -> None:
    """The baseline marks nothing safe: its 0 unsafe frames are no achievement, so those rows say "-"."""
    from stm_feedback.evaluation import SuiteResult, markdown_table

    nets = SuiteResult("realistic", "nets", 1, {"unsafe_mask_fraction": 0.001, "unsafe_mask_frames": 1.0})
    none = {"unsafe_mask_fraction": float("nan"), "unsafe_mask_frames": 0.0}
    base = SuiteResult("realistic", "baseline", 1, none)
    table = markdown_table([nets, base]).splitlines()
    rows = {r.split("|")[1].strip(): r for r in table if r.startswith("| ")}
    assert rows["frames whose safe mask has such pixels"].rstrip(" |").endswith("-")
    assert "0.001" in rows["safe-mask pixels breaking a truth clearance, fraction of safe pixels"]


@pytest.mark.skipif(not HAS_SIMULATOR, reason="needs the simulator")
def test_class_ari_scores_cluster_ids_against_true_classes() -> None:
    """The suite's class ARI (issue 4 item 10) pools matched defects over frames: ids that name the class
    score 1, one id per kind scores 0, unclustered reports (-1) give NaN, shown as n/a in the table."""
    import dataclasses

    frames = list(suite_frames("realistic", 2))

    def with_clusters(name_of: dict[str, int] | None):  # noqa: ANN202
        def analyze(f: EvalFrame):  # noqa: ANN202
            a = oracle_analysis(f.truth)
            # oracle defects are the truth defects in order; give each the id of its class
            cls = [d.cls for d in f.truth.defects]
            a.defects = [
                dataclasses.replace(d, cluster=-1 if name_of is None else name_of.get(c, 0))
                for d, c in zip(a.defects, cls, strict=True)
            ]
            return a

        return analyze

    classes = sorted({d.cls for f in frames for d in f.truth.defects})
    exact = evaluate_frames(frames, with_clusters({c: i for i, c in enumerate(classes)}), "realistic", "nets")
    lumped = evaluate_frames(frames, with_clusters({}), "realistic", "nets")
    none = evaluate_frames(frames, with_clusters(None), "realistic", "baseline")
    for kind in ("protrusion", "depression"):
        assert exact.metrics[f"class_ari_{kind}"] == pytest.approx(1.0)
        assert lumped.metrics[f"class_ari_{kind}"] == pytest.approx(0.0)
        assert np.isnan(none.metrics[f"class_ari_{kind}"])
    rows = {
        r.split("|")[1].strip(): r for r in markdown_table([exact, none]).splitlines() if r.startswith("| ")
    }
    row = rows["class ARI, protrusions (cluster ids vs true classes)"]
    assert "1.000 pass" in row and "n/a **FAIL**" in row and row.rstrip(" |").endswith("yes")
