"""Training smoke run (a few steps on tiny simulated data) and the seed rules of the training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stm_feedback.errors import InputError
from stm_feedback.nets import load_model
from stm_feedback.training import TrainConfig, atom_peaks, frame_seeds, train

torch.set_num_threads(1)


@pytest.mark.parametrize("net", ["atoms", "defects"])
def test_training_smoke_run_writes_loadable_weights(tmp_path: Path, net: str) -> None:
    cfg = TrainConfig(net, steps=3, batch=2, crop_px=32, n_frames=2, workers=1, seed=3)
    model, spec, summary = train(cfg, tmp_path, progress=False)
    assert np.isfinite(summary["final_loss"])
    assert summary["frame_seeds"][1] <= 1_000_000 and spec.training["steps"] == 3
    loaded, spec2 = load_model(tmp_path, net)
    assert spec2.version == spec.version and spec2.version.endswith("-s3-3")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_training_seeds_stay_below_evaluation_range() -> None:
    for net in ("terraces", "atoms", "defects"):
        r = frame_seeds(TrainConfig(net, seed=10, n_frames=1000))
        assert r.stop <= 1_000_000
    with pytest.raises(InputError, match=r"--seed 0\.\.24 for the defects net"):
        frame_seeds(TrainConfig("defects", seed=30, n_frames=1000))
    assert frame_seeds(TrainConfig("defects", seed=24, n_frames=1000)).stop <= 1_000_000
    with pytest.raises(InputError):
        train(TrainConfig("nope", steps=1), None, progress=False)


def test_atom_peaks_subpixel() -> None:
    yy, xx = np.mgrid[0:20, 0:20]
    prob = np.exp(-((xx - 7.3) ** 2 + (yy - 11.6) ** 2) / (2 * 0.8**2)).astype(np.float32)
    p = atom_peaks(prob)
    assert p.shape == (1, 2)
    np.testing.assert_allclose(p[0], [7.3, 11.6], atol=0.15)
    assert atom_peaks(np.zeros((10, 10), np.float32)).shape == (0, 2)


def test_cache_mixes_simulator_presets() -> None:
    from stm_feedback.nets import spec_preset
    from stm_feedback.training import build_cache

    spec = spec_preset("atoms", "default")
    cfg = TrainConfig("atoms", crop_px=32, n_frames=2, workers=1, sim_presets=("training", "clean"))
    cache = build_cache(cfg, spec)
    assert len(cache) == 2
    # the same seed simulated under another preset gives another frame: the preset really was used
    single = build_cache(TrainConfig("atoms", crop_px=32, n_frames=2, workers=1), spec)
    assert np.array_equal(cache[0].image, single[0].image)
    assert not np.array_equal(cache[1].image, single[1].image)
    with pytest.raises(InputError):
        build_cache(TrainConfig("atoms", n_frames=1, workers=1, sim_presets=()), spec)


def test_calibration_rejects_unknown_threshold() -> None:
    from stm_feedback.training import calibrate_thresholds

    with pytest.raises(InputError):
        calibrate_thresholds(Path("models"), n_frames=1, grid={"nope": (0.5,)})


def test_defect_class_weights_steer_the_loss() -> None:
    """A missed depression costs more when depressions weigh more; background-only errors are unaffected."""
    from stm_feedback.nets import spec_preset
    from stm_feedback.training import DEFECT_CLASS_WEIGHTS, loss_fn

    spec = spec_preset("defects")
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 2.0  # the net says background everywhere
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1, 1] = 2  # one depression pixel
    base = loss_fn(spec, logits, target)
    assert torch.isclose(base, loss_fn(spec, logits, target, DEFECT_CLASS_WEIGHTS))
    assert loss_fn(spec, logits, target, (1.0, 4.0, 16.0)) > base
    bg = torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.isclose(loss_fn(spec, logits, bg), loss_fn(spec, logits, bg, (1.0, 4.0, 16.0)))


@pytest.mark.parametrize("text", ["1,4", "1,4,x", "1,0,8", "1,4,inf"])
def test_train_cli_rejects_bad_class_weights(text: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stm_feedback.cli import app

    res = CliRunner().invoke(
        app, ["train", "defects", "--steps", "1", "--class-weights", text, "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "class-weights" in res.output
    assert not list(tmp_path.iterdir())  # nothing trained or written


@pytest.mark.parametrize("text", ["0.1", "0.14,0.09", "a,b", "0.001,0.1"])
def test_train_cli_rejects_bad_frame_pixel_size(text: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stm_feedback.cli import app

    res = CliRunner().invoke(
        app, ["train", "atoms", "--steps", "1", "--frame-pixel-size", text, "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "frame-pixel-size" in res.output
    assert not list(tmp_path.iterdir())


def test_cache_frames_use_the_requested_pixel_size_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache frames are simulated at native pixel sizes drawn from ``pixel_size_range_nm``."""
    import simulator.frame
    from stm_feedback.nets import spec_preset
    from stm_feedback.training import build_cache

    seen: list[float] = []
    real = simulator.frame.simulate_frame

    def spy(seed, size_px, pixel_size_nm, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append(float(pixel_size_nm))
        return real(seed, size_px, pixel_size_nm, *a, **kw)

    monkeypatch.setattr(simulator.frame, "simulate_frame", spy)
    spec = spec_preset("atoms", "default")
    build_cache(
        TrainConfig("atoms", crop_px=32, n_frames=3, workers=1, pixel_size_range_nm=(0.12, 0.13)), spec
    )
    assert len(seen) == 3 and all(0.12 <= v <= 0.13 for v in seen)


@pytest.mark.parametrize("net", ["atoms", "defects"])
def test_distill_loss_is_stationary_at_the_teacher(net: str) -> None:
    """Distillation pulls the student's logits to the teacher's: zero gradient there, not elsewhere."""
    from stm_feedback.nets import spec_preset
    from stm_feedback.training import distill_loss

    spec = spec_preset(net)
    gen = torch.Generator().manual_seed(0)
    c = 3 if net == "defects" else 1
    t = torch.randn(2, c, 8, 8, generator=gen)
    at = t.clone().requires_grad_(True)
    distill_loss(spec, at, t).backward()
    assert float(at.grad.abs().max()) < 1e-6
    off = (t + torch.randn(t.shape, generator=gen)).requires_grad_(True)  # not a constant: softmax ignores it
    distill_loss(spec, off, t).backward()
    assert float(off.grad.abs().max()) > 1e-3


def test_training_with_a_teacher_smoke(tmp_path: Path) -> None:
    """A narrower atom net distilled from a (tiny, just trained) teacher: runs, saves, records the teacher."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    train(
        TrainConfig("atoms", steps=2, batch=2, crop_px=32, n_frames=2, workers=1, seed=4),
        teacher_dir,
        progress=False,
    )
    cfg = TrainConfig(
        "atoms",
        steps=2,
        batch=2,
        crop_px=32,
        n_frames=2,
        workers=1,
        seed=5,
        widths=(8, 16, 32, 32),
        teacher_from=teacher_dir,
        teacher_weight=0.5,
    )
    _, spec, summary = train(cfg, student_dir, progress=False)
    assert np.isfinite(summary["final_loss"])
    assert summary["teacher_from"] == str(teacher_dir) and summary["teacher_weight"] == 0.5
    assert tuple(load_model(student_dir, "atoms")[1].widths) == (8, 16, 32, 32)
