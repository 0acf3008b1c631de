"""Inference backends: same outputs/detections as PyTorch eager fp32, fallback chain, per-shape caches.

The detection-level test needs trained weights: ``$STM_FEEDBACK_TEST_MODELS_DIR`` or the repo's models/
(skipped when neither holds weights — random nets give no meaningful detections). Map-level tests run on
randomly initialised nets always. No wall-clock assertions.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stm_feedback import backends
from stm_feedback.backends import INT8_DIRNAME, BackendUnavailable, int8_paths, select_backend
from stm_feedback.config import REPO_MODELS_DIR, Settings
from stm_feedback.errors import ModelError
from stm_feedback.nets import NET_NAMES, build_net, load_model, model_paths, spec_preset
from stm_feedback.runner import ModelRunner, prepare_module
from tests.random_nets import save_random_nets

torch.set_num_threads(1)

try:
    import openvino

    HAVE_OPENVINO = True
except ImportError:
    openvino = None
    HAVE_OPENVINO = False

# every backend this machine can run, with its precision forced where the CPU allows a choice
BACKENDS: list[tuple[str, bool | None]] = [("torch", False), ("torch", None)]
if HAVE_OPENVINO:
    BACKENDS += [("openvino", False), ("openvino", None)]
IDS = [f"{k}-{'fp32' if b is False else 'native'}" for k, b in BACKENDS]
# detection-level equivalence also covers the shipped INT8 IRs (models/int8, `stm-feedback quantize`)
DETECTION_BACKENDS = BACKENDS + ([("openvino-int8", None)] if HAVE_OPENVINO else [])
DETECTION_IDS = [f"{k}-{'fp32' if b is False else 'native'}" for k, b in DETECTION_BACKENDS]


def _frame(seed: int, size_px: int = 96):  # noqa: ANN202
    from simulator.frame import SimConfig, simulate_frame

    return simulate_frame(seed, size_px, 0.1, SimConfig.preset("realistic"))


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default-spec nets, randomly initialised (seeded), narrowed to keep the test fast."""
    return save_random_nets(tmp_path_factory.mktemp("models"))


def _runner(models_dir: Path, kind: str, bf16: bool | None) -> ModelRunner:
    runner = ModelRunner.from_dir(models_dir, device="cpu", backend="torch-eager")
    # swap in the backend under test with an explicit precision (select_backend's knob); "openvino-int8":
    # OpenVINO with the INT8 IRs of models_dir/int8
    int8_dir = models_dir / INT8_DIRNAME if kind == "openvino-int8" else None
    be = select_backend("openvino" if int8_dir else kind, "cpu", 1, bf16=bf16, int8_dir=int8_dir)
    runner._backend = be
    runner.engines = {n: be.engine(m, runner.specs[n].out_channels, n) for n, m in runner.modules.items()}
    return runner


@pytest.mark.parametrize("kind, bf16", BACKENDS, ids=IDS)
def test_maps_match_eager_fp32(random_models: Path, kind: str, bf16: bool | None) -> None:
    f = _frame(1_000_101)
    ref = ModelRunner.from_dir(random_models, device="cpu").predict(f.image_nm, 0.1, f.bias_v)
    runner = _runner(random_models, kind, bf16)
    out = runner.predict(f.image_nm, 0.1, f.bias_v)
    low_precision = runner.backend.endswith("bf16")
    tol = 0.03 if low_precision else 1e-4
    for field in ("step_prob", "atom_prob", "protrusion_prob", "depression_prob"):
        a, b = getattr(ref, field), getattr(out, field)
        assert a.shape == b.shape and b.dtype == np.float32
        assert float(np.abs(a - b).max()) <= tol, (field, runner.backend)
    assert out.polarity == ref.polarity


def runner_is_low_precision(pipe) -> bool:  # noqa: ANN001
    """bf16 or INT8 nets (not every borderline detection is reproduced)."""
    return not str(pipe.runner.backend).endswith("fp32")


def _trained_models_dir() -> Path | None:
    d = Path(os.environ.get("STM_FEEDBACK_TEST_MODELS_DIR", REPO_MODELS_DIR))
    try:
        for n in NET_NAMES:
            load_model(d, n)
    except ModelError:
        return None
    return d


@pytest.mark.parametrize("kind, bf16", DETECTION_BACKENDS, ids=DETECTION_IDS)
def test_same_detections_as_eager_fp32(kind: str, bf16: bool | None) -> None:
    """Issue 6: F1 against the truth within 0.005 of PyTorch eager fp32 (summed over seeded simulator frames,
    as the evaluation does), detections matched one-to-one within 0.05 nm."""
    models_dir = _trained_models_dir()
    if models_dir is None:
        pytest.skip("no trained weights (set STM_FEEDBACK_TEST_MODELS_DIR or commit models/)")
    from stm_feedback.benchmark import detection_agreement
    from stm_feedback.metrics import MatchCounts, score_frame
    from stm_feedback.pipeline import Pipeline

    ref_pipe = Pipeline(Settings(), runner=ModelRunner.from_dir(models_dir, device="cpu"))
    pipe = Pipeline(Settings(), runner=_runner(models_dir, kind, bf16))
    if kind == "openvino-int8":  # every committed IR must have been quantised from the committed weights
        shipped = {
            n
            for n in NET_NAMES
            if int8_paths(models_dir / INT8_DIRNAME, model_paths(models_dir, n)[0].stem)[0].exists()
        }
        used = {n for n, e in pipe.runner.engines.items() if getattr(e, "precision", "") == "int8"}
        assert shipped and used == shipped, "models/int8 holds IRs of other weights: `stm-feedback quantize`"
    low_precision = runner_is_low_precision(pipe)
    totals = {"ref": [MatchCounts(), MatchCounts()], "out": [MatchCounts(), MatchCounts()]}
    n_atoms = 0
    for seed in (1_000_302, 1_000_304, 1_000_305):
        f = _frame(seed, 192)
        ref = ref_pipe.analyze(f.image_nm, 0.1, f.bias_v)
        out = pipe.analyze(f.image_nm, 0.1, f.bias_v)
        for key, a in (("ref", ref), ("out", out)):
            sc = score_frame(f.truth, a)
            totals[key] = [totals[key][0] + sc.atoms, totals[key][1] + sc.defects]
        agree = detection_agreement(ref, out, 0.1, tol_nm=0.05)
        # bf16 may flip a few borderline detections, INT8 a few more (sub-pixel positions move by up to
        # ~0.05 nm: 0.972 on seed 1_000_305); fp32 backends must reproduce every one
        floor = 0.95 if kind == "openvino-int8" else 0.98 if low_precision else 0.999
        assert agree["atoms_f1"] >= floor, (seed, agree)
        if not low_precision:
            assert agree["protrusions_f1"] >= 0.999 and agree["depressions_f1"] >= 0.999, (seed, agree)
        n_atoms += int(agree["atoms_n_ref"])
    assert abs(totals["ref"][0].f1 - totals["out"][0].f1) <= 0.005, totals
    d_ref, d_out = totals["ref"][1], totals["out"][1]
    if low_precision:
        # these 3 frames hold ~27 defects: one flipped borderline detection moves F1 by ~0.017, so 0.005 is
        # not resolvable here; bf16 may flip at most one. The criterion (|dF1| <= 0.005) holds at suite
        # scale: `backend_equivalence(models, 30)` (60 realistic+hard frames) gave openvino-bf16 0.0017,
        # torch-jit-bf16 0.0025 with NN-2 s23 (docs/performance.md)
        assert abs(d_ref.tp - d_out.tp) + abs(d_ref.fp - d_out.fp) <= 1, totals
    else:
        assert abs(d_ref.f1 - d_out.f1) <= 0.005, totals
    assert n_atoms > 100 and d_ref.tp > 10  # the comparison is not vacuous


def test_fallback_chain_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    be = select_backend("auto", "cpu")
    assert be.kind == "torch" and be.name.startswith("torch-jit-")
    with pytest.raises(BackendUnavailable, match="OpenVINO is not installed"):
        select_backend("openvino", "cpu")


def test_runner_reports_fallback(monkeypatch: pytest.MonkeyPatch, random_models: Path) -> None:
    from stm_feedback.config import ModelSettings

    monkeypatch.setitem(sys.modules, "openvino", None)
    r = ModelRunner.from_settings(ModelSettings(models_dir=random_models, device="cpu", threads=1))
    assert r.backend.startswith("torch-jit-")
    assert r.predict(_frame(1_000_102, 64).image_nm, 0.1, -2.0).atom_prob.shape == (64, 64)


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed")
def test_auto_prefers_openvino_on_cpu() -> None:
    assert select_backend("auto", "cpu").kind == "openvino"


def test_precision_follows_cpu_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert select_backend("torch", "cpu").precision == "fp32"
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert select_backend("torch", "cpu").precision == "fp32"  # PyTorch bf16 pays off with AMX only
    if HAVE_OPENVINO and "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert select_backend("openvino", "cpu").precision == "bf16"
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_tile", "amx_bf16"}))
    assert select_backend("torch", "cpu").precision == "bf16"
    assert select_backend("torch", "cpu", bf16=False).precision == "fp32"
    assert select_backend("torch-eager", "cpu").name == "torch-fp32"


def test_fp32_nets_stay_fp32(random_models: Path) -> None:
    be = select_backend("torch", "cpu", 1, bf16=True, fp32_nets=["atoms"])
    assert be.name == "torch-jit-bf16+fp32:atoms"
    assert be.engine(torch.nn.Identity(), 1, "atoms").dtype is None
    assert be.engine(torch.nn.Identity(), 1, "defects").dtype == torch.bfloat16
    from stm_feedback.config import ModelSettings

    r = ModelRunner.from_settings(
        ModelSettings(models_dir=random_models, device="cpu", backend="torch", fp32_nets=["atoms"], threads=1)
    )
    assert r.engines["atoms"].dtype is None
    assert select_backend("torch", "cpu", bf16=False, fp32_nets=["atoms"]).name == "torch-jit-fp32"


def test_bad_backend_names() -> None:
    with pytest.raises(ModelError, match="unknown backend"):
        select_backend("tensorrt", "cpu")


@pytest.mark.parametrize("kind", ["torch"] + (["openvino"] if HAVE_OPENVINO else []))
def test_engine_serves_every_shape_and_checks_input(kind: str) -> None:
    spec = replace(spec_preset("defects"), widths=(4,))
    torch.manual_seed(0)
    module = prepare_module(build_net(spec), torch.device("cpu"))
    engine = select_backend(kind, "cpu", 1, bf16=False).engine(copy.deepcopy(module), spec.out_channels)
    x = np.random.default_rng(0).random((16, 24), dtype=np.float32)
    y1 = engine(x)
    engine(x)
    engine(np.zeros((8, 8), np.float32))
    assert y1.shape == (3, 16, 24)
    assert np.allclose(y1.sum(0), 1.0, atol=1e-4)  # softmax inside the compiled graph
    if kind == "torch":
        assert len(engine._cache) == 2  # one trace per shape
    else:  # one dynamic-shape compile serves every shape: the eager module's outputs at each of them
        ref = select_backend("torch-eager", "cpu", 1).engine(copy.deepcopy(module), spec.out_channels)
        rng = np.random.default_rng(1)
        for shape in [(40, 16), (16, 24), (8, 8), (16, 24)]:
            xs = rng.random(shape, dtype=np.float32)
            assert np.allclose(engine(xs), ref(xs), atol=1e-4)
    with pytest.raises(ModelError, match="2-D"):
        engine(np.zeros((1, 8, 8), np.float32))


def test_shape_cache_keeps_the_most_recently_used_shapes() -> None:
    """Each frame pixel size traces its own PyTorch graph: the cache is bounded in input pixels (memory),
    least recently used first out, and a dropped shape is built again when it returns."""
    from stm_feedback.backends import MAX_COMPILED_PIXELS_PER_ENGINE, _ShapeCache

    built: list[tuple[int, int]] = []
    cache = _ShapeCache(lambda shape: built.append(shape) or shape, max_pixels=3 * 64)
    for shape in [(8, 8), (8, 8), (4, 16), (2, 32), (8, 8), (1, 64)]:  # (8, 8) used again: (4, 16) goes
        assert cache.get(shape) == shape
    assert len(cache) == 3
    assert built == [(8, 8), (4, 16), (2, 32), (1, 64)]
    cache.get((8, 8))
    cache.get((2, 32))
    assert len(built) == 4  # still cached
    cache.get((4, 16))
    assert built[-1] == (4, 16) and len(cache) == 3
    cache.get((16, 16))  # larger than the whole budget: kept alone
    assert len(cache) == 1
    assert MAX_COMPILED_PIXELS_PER_ENGINE >= 8 * 256 * 256  # a session's few pixel sizes stay compiled
    with pytest.raises(ValueError):
        _ShapeCache(lambda shape: shape, max_pixels=0)


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed")
def test_openvino_ir_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STM_FEEDBACK_CACHE_DIR", str(tmp_path))
    spec = replace(spec_preset("terraces"), widths=(4, 4, 4, 4))
    torch.manual_seed(1)
    module = prepare_module(build_net(spec), torch.device("cpu"))
    be = select_backend("openvino", "cpu", 1, bf16=False)
    x = np.random.default_rng(1).random((16, 16), dtype=np.float32)
    y1 = be.engine(copy.deepcopy(module), 1)(x)
    assert len(list((tmp_path / "openvino").glob("*.xml"))) == 1
    y2 = be.engine(copy.deepcopy(module), 1)(x)  # read back from the cache
    assert np.array_equal(y1, y2)
    assert len(list((tmp_path / "openvino").glob("*.xml"))) == 1
