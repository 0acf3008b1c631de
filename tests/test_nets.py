"""Networks, weight files, runner, targets and augmentations (untrained nets: shapes and plumbing only)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stm_feedback.augment import AugmentConfig, augment, flip_rot, line_jitter, zoom
from stm_feedback.errors import InputError, ModelError
from stm_feedback.maps import NetworkMaps
from stm_feedback.nets import (
    NET_NAMES,
    DefectNet,
    NetSpec,
    UNet,
    build_net,
    fuse_batchnorm,
    load_model,
    model_paths,
    save_model,
    spec_preset,
)
from stm_feedback.preprocess import resampled_shape, resize
from stm_feedback.runner import ModelRunner

torch.set_num_threads(1)


def _tiny_spec(name: str) -> NetSpec:
    s = spec_preset(name)
    return replace(s, widths=(4, 4, 4, 4) if s.arch == "unet" else (4,))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for n in NET_NAMES:
        spec = _tiny_spec(n)
        save_model(build_net(spec), replace(spec, version=f"{n}-test"), d)
    return d


@pytest.mark.parametrize("preset", ["default", "paper"])
@pytest.mark.parametrize("name", NET_NAMES)
def test_output_shapes(preset: str, name: str) -> None:
    spec = spec_preset(name, preset)
    net = build_net(spec).eval()
    with torch.no_grad():
        y = net(torch.zeros(2, 1, 40, 48))
    assert y.shape == (2, spec.out_channels, 40, 48)


@pytest.mark.parametrize("stem", [2, 4])
def test_space_to_depth_stem(stem: int, tmp_path: Path) -> None:
    """A stem-s U-Net keeps full-resolution outputs, needs sides in multiples of 8 * s, saves and loads."""
    spec = replace(_tiny_spec("atoms"), stem=stem)
    assert spec.pool_multiple == 8 * stem
    net = build_net(spec).eval()
    side = 8 * stem * 3
    x = torch.randn(1, 1, side, side)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 1, side, side)
    # each output pixel depends on its own sub-pixel position: the shuffle must not be a nearest upsampling
    assert not torch.allclose(y[..., 0::stem, 0::stem], y[..., 1::stem, 1::stem])
    save_model(net, spec, tmp_path)
    loaded, spec2 = load_model(tmp_path, "atoms")
    assert spec2.stem == stem
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)
    # specs written before the stem existed load as stem 1
    legacy = {k: v for k, v in json.loads(_tiny_spec("atoms").to_json()).items() if k != "stem"}
    assert NetSpec.from_json(json.dumps(legacy)).stem == 1
    with pytest.raises(ModelError):
        UNet((4, 4, 4, 4), 1, stem=3)


def test_runner_pads_for_a_stem_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for n in NET_NAMES:
        spec = _tiny_spec(n)
        spec = replace(spec, stem=2) if n == "atoms" else spec
        save_model(build_net(spec), replace(spec, version=f"{n}-test"), tmp_path)
    runner = ModelRunner.from_dir(tmp_path, device="cpu")
    maps = runner.predict(np.random.default_rng(0).normal(0, 0.03, (37, 53)).astype(np.float32), 0.1, -2.0)
    assert maps.atom_prob.shape == (37, 53) and np.isfinite(maps.atom_prob).all()


def test_architecture_follows_the_paper() -> None:
    u = UNet((16, 32, 64, 128), 1)
    dil = sorted({m.dilation[0] for m in u.bottleneck.modules() if isinstance(m, torch.nn.Conv2d)})
    assert dil == [2, 4, 6]
    acts = [m for m in u.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)
    d = DefectNet((25,), 3)
    convs = [m for m in d.enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.out_channels == 25 for c in convs)
    pyr = [m for m in d.pyr1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.out_channels for c in pyr} == {50} and sorted(c.dilation[0] for c in pyr) == [2, 4, 6]
    with pytest.raises(ModelError):
        UNet((8, 16), 1)


def test_fused_batchnorm_gives_same_output() -> None:
    torch.manual_seed(1)
    net = build_net(_tiny_spec("atoms"))
    net.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    net.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
        fused = fuse_batchnorm(net)(x)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_weights_round_trip_with_weights_only(tmp_path: Path) -> None:
    spec = _tiny_spec("defects")
    net = build_net(spec).eval()
    pt, js = save_model(net, spec, tmp_path)
    state = torch.load(pt, map_location="cpu", weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded, spec2 = load_model(tmp_path, "defects")
    assert spec2 == spec
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_missing_or_broken_weights_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="stm-feedback train atoms"):
        load_model(tmp_path, "atoms")
    with pytest.raises(ModelError, match="stm-feedback train"):
        ModelRunner.from_dir(tmp_path)
    save_model(build_net(_tiny_spec("atoms")), _tiny_spec("atoms"), tmp_path)
    _, js = model_paths(tmp_path, "atoms")
    js.write_text(replace(_tiny_spec("atoms"), widths=(8, 8, 8, 8)).to_json())
    with pytest.raises(ModelError, match="do not match"):
        load_model(tmp_path, "atoms")
    js.write_text("{not json")
    with pytest.raises(ModelError, match="invalid network spec"):
        load_model(tmp_path, "atoms")


@pytest.mark.parametrize("shape, px", [((37, 53), 0.1), ((64, 64), 0.05), ((50, 41), 0.2), ((128, 96), 0.13)])
def test_runner_maps_on_input_grid(tiny_models: Path, shape: tuple[int, int], px: float) -> None:
    runner = ModelRunner.from_dir(tiny_models, device="cpu")
    img = np.random.default_rng(0).normal(0, 0.03, shape).astype(np.float32)
    maps = runner.predict(img, px, bias_v=-2.0)
    assert isinstance(maps, NetworkMaps)
    for a in (maps.step_prob, maps.atom_prob, maps.protrusion_prob, maps.depression_prob, maps.image_norm):
        assert a.shape == shape and a.dtype == np.float32 and np.isfinite(a).all()
    for a in (maps.step_prob, maps.atom_prob, maps.protrusion_prob, maps.depression_prob):
        assert 0.0 <= a.min() and a.max() <= 1.0
    assert maps.pixel_size_nm == px and maps.polarity == "filled" and maps.polarity_source == "bias"
    # the atom map on NN-1's own grid is kept only for frames coarser than that grid
    net_px = runner.specs["atoms"].pixel_size_nm
    if px > net_px:
        want = resampled_shape(shape, px, net_px)
        assert maps.atom_prob_net is not None and maps.atom_prob_net.shape == want
        assert maps.atom_prob_net.dtype == np.float32 and 0.0 <= maps.atom_prob_net.min()
    else:
        assert maps.atom_prob_net is None
    assert runner.versions() == {n: f"{n}-test" for n in NET_NAMES}
    assert runner.device == "cpu" and runner.backend == "torch-fp32"


def test_runner_polarity(tiny_models: Path) -> None:
    runner = ModelRunner.from_dir(tiny_models, device="cpu")
    img = np.random.default_rng(1).normal(0, 0.03, (48, 48)).astype(np.float32)
    filled = runner.predict(img, 0.1, bias_v=-2.0)
    empty = runner.predict(img, 0.1, bias_v=1.5)
    assert empty.polarity == "empty" and empty.polarity_source == "bias"
    np.testing.assert_allclose(empty.image_norm, 1.0 - filled.image_norm, atol=1e-6)
    unknown = runner.predict(img, 0.1)
    assert unknown.polarity_source in ("estimated", "assumed")


@pytest.mark.parametrize(
    "image, px, bias",
    [
        (np.zeros((2, 32, 32)), 0.1, None),
        (np.full((32, 32), np.inf), 0.1, None),
        (np.zeros((0, 0)), 0.1, None),
        (np.zeros((32, 32)), -0.1, None),
        (np.zeros((32, 32)), 0.1, float("nan")),
    ],
)
def test_runner_rejects_bad_input(
    tiny_models: Path, image: np.ndarray, px: float, bias: float | None
) -> None:
    runner = ModelRunner.from_dir(tiny_models, device="cpu")
    with pytest.raises(InputError):
        runner.predict(image, px, bias)


def test_runner_from_settings_and_backend_check(tiny_models: Path) -> None:
    from stm_feedback.config import ModelSettings

    r = ModelRunner.from_settings(ModelSettings(models_dir=tiny_models, device="auto", threads=1))
    assert r.device in ("cpu", "cuda")
    with pytest.raises(ModelError):  # OpenVINO may be installed now (issue 6): an unknown backend must fail
        ModelRunner.from_settings(ModelSettings.model_construct(models_dir=tiny_models, backend="tpu"))


# ------------------------------------------------------------------------------------------------------------
# targets and augmentations


@pytest.fixture(scope="module")
def frame():  # noqa: ANN201
    from simulator.frame import SimConfig, simulate_frame

    return simulate_frame(7, 96, 0.1, SimConfig.preset("training"), bias_v=-2.0)


def test_targets_and_oracle_maps(frame) -> None:  # noqa: ANN001
    from stm_feedback.preprocess import map_coords
    from stm_feedback.targets import oracle_maps, truth_to_targets

    tr = frame.truth
    t = truth_to_targets(tr)
    assert t.atoms.shape == t.step.shape == t.defect_class.shape == (96, 96)
    ok = tr.atom_resolved
    if ok.any():  # the atom map peaks (1.0) on resolved atoms
        xy = np.rint(tr.atoms_xy_px[ok]).astype(int)
        inside = (xy >= 0).all(1) & (xy < 96).all(1)
        assert t.atoms[xy[inside, 1], xy[inside, 0]].min() > 0.5
    assert np.all(t.atoms[tr.unresolved_mask & (t.atoms > 0)] < 1.0) or not tr.unresolved_mask.any()
    for d in tr.defects:
        sel = tr.defect_instances == d.id
        if sel.any():
            assert np.all(t.defect_class[sel] == (1 if d.kind == "protrusion" else 2))
    half = truth_to_targets(tr, 0.2)
    assert half.atoms.shape == (48, 48)
    if ok.any():
        xy2 = map_coords(tr.atoms_xy_px[ok][:1], (96, 96), (48, 48))[0]
        assert half.atoms[int(round(xy2[1])), int(round(xy2[0]))] > 0.5
    m = oracle_maps(frame.image_nm, tr, frame.bias_v)
    assert m.atom_prob.shape == (96, 96) and m.pixel_size_nm == tr.pixel_size_nm


def test_augmentations_move_targets_with_the_image() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 40)).astype(np.float32)
    tg = {"same": img.copy(), "cls": (img > 0.5).astype(np.int64)}
    for _ in range(8):
        i2, t2 = flip_rot(img, tg, rng)
        np.testing.assert_array_equal(i2, t2["same"])
    i3, t3 = line_jitter(img, tg, 2.0, rng)
    np.testing.assert_array_equal(i3, t3["same"])
    i4, t4 = zoom(img, tg, 1.2, img.shape)
    np.testing.assert_allclose(i4, t4["same"])
    assert t4["cls"].dtype == np.int64 and set(np.unique(t4["cls"])) <= {0, 1}
    a1, _ = augment(img, tg, np.random.default_rng(5), AugmentConfig(p_gaussian=1, p_salt_pepper=1))
    a2, _ = augment(img, tg, np.random.default_rng(5), AugmentConfig(p_gaussian=1, p_salt_pepper=1))
    np.testing.assert_array_equal(a1, a2)  # seeded
    assert a1.shape == img.shape and a1.dtype == np.float32


@pytest.mark.parametrize("factor", [0.85, 0.9, 1.1, 1.15])
def test_zoom_keeps_class_maps_on_the_image_grid(factor: float) -> None:
    """A square footprint zoomed as a class map (nearest) and as an image (bilinear) keeps one centre: the
    integer map must not move by half a pixel (cv2.INTER_NEAREST does, INTER_NEAREST_EXACT does not)."""
    img = np.zeros((40, 40), np.float32)
    img[16:24, 12:20] = 1.0
    _, t = zoom(img, {"cls": (img > 0.5).astype(np.int64)}, factor, (40, 40))
    i, _ = zoom(img, {}, factor, (40, 40))
    ys, xs = np.nonzero(t["cls"])
    yy, xx = np.mgrid[0:40, 0:40]
    centre = [(xx * i).sum() / i.sum(), (yy * i).sum() / i.sum()]
    np.testing.assert_allclose([xs.mean(), ys.mean()], centre, atol=0.15)


@pytest.mark.parametrize("bias", [-2.0, 1.5, None])
def test_net_grid_atom_map_is_the_reported_one(tiny_models: Path, bias: float | None) -> None:
    """On a coarse frame ``atom_prob_net`` is the map behind ``atom_prob`` (the same pass and polarity, also
    when the polarity is estimated from two passes): resampled to the frame it gives ``atom_prob``."""
    runner = ModelRunner.from_dir(tiny_models, device="cpu")
    img = np.random.default_rng(3).normal(0, 0.03, (48, 40)).astype(np.float32)
    maps = runner.predict(img, 0.2, bias_v=bias)
    assert maps.atom_prob_net is not None
    back = resize(maps.atom_prob_net, img.shape, antialias=False)
    np.testing.assert_allclose(back, maps.atom_prob, atol=1e-6)
