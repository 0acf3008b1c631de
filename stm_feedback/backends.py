"""Inference backends: how the loaded networks are executed (the networks themselves live in nets.py).

A backend turns a prepared ``nn.Module`` (eval, BatchNorm folded) into an *engine*: a callable mapping one
padded network input (h, w) float32 to its output probabilities (C, h, w) float32 (softmax over channels
when C > 1, else sigmoid). OpenVINO engines compile once with dynamic (h, w); traced PyTorch engines cache one
trace per input shape.

Fallback chain for ``backend="auto"`` (order chosen by measurement, docs/performance.md):
  CPU:  OpenVINO (bf16 inference precision when the CPU has native bf16 — AMX or AVX512-bf16 — else fp32;
        each net as its INT8 IR when ``stm-feedback quantize`` wrote one for the loaded weights)
        -> PyTorch traced + frozen, channels_last (bf16 autocast on AMX CPUs, else fp32: measured on an
        AVX512-bf16 CPU without AMX, PyTorch bf16 convolutions were 2-7x slower than fp32).
  CUDA: PyTorch fp16 autocast with pinned host memory (same code path as the CPU PyTorch engine).
``"torch-eager"`` is the reference: plain PyTorch fp32 eager mode, no tracing, no reduced precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stm_feedback.errors import ModelError

log = logging.getLogger(__name__)

BACKEND_CHOICES: tuple[str, ...] = ("auto", "openvino", "torch", "torch-eager")
Engine = Callable[[np.ndarray], np.ndarray]


class BackendUnavailable(ModelError):
    """The requested backend cannot run here (package missing, wrong device)."""


# ------------------------------------------------------------------------------------------ CPU features


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 tiles or AVX512-BF16 dot products)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX-BF16 tile units (PyTorch/oneDNN bf16 convolutions only pay off there)."""
    return "amx_bf16" in cpu_flags()


# ----------------------------------------------------------------------------------------------- modules


class WithActivation(nn.Module):
    """Network logits -> probabilities inside the graph (fused by the compilers): softmax over channels
    when there are several, else sigmoid."""

    def __init__(self, net: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.net = net
        self.softmax = out_channels > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.softmax(y, 1) if self.softmax else torch.sigmoid(y)


# traced PyTorch graphs kept per engine, counted in input pixels: each input shape (i.e. each frame pixel size)
# traces its own graph, and memory grows with the shape's area (with per-shape OpenVINO compiles, before
# session 6, 24 pixel sizes took a runner from 356 to 1045 MiB); beyond this budget the least recently used
# shapes are dropped (session 5, docs/performance.md)
MAX_COMPILED_PIXELS_PER_ENGINE = 24 * 256 * 256


class _ShapeCache:
    """Compiled artefacts per input shape, built once under a lock (engines may be shared by threads). The
    cached shapes' areas (h * w) add up to at most ``max_pixels``, the least recently used dropped first (the
    newest is always kept; a dropped shape is compiled again when it returns)."""

    def __init__(
        self, build: Callable[[tuple[int, int]], object], max_pixels: int = MAX_COMPILED_PIXELS_PER_ENGINE
    ) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self._build = build
        self._max = max_pixels
        self._items: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, int]) -> object:
        with self._lock:
            item = self._items.get(shape)
            if item is not None:
                self._items.move_to_end(shape)
                return item
            item = self._build(shape)
            self._items[shape] = item
            self._pixels += shape[0] * shape[1]
            while self._pixels > self._max and len(self._items) > 1:
                old, _ = self._items.popitem(last=False)
                self._pixels -= old[0] * old[1]
            return item

    def __len__(self) -> int:
        return len(self._items)


def _check_input(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ModelError(f"engine input must be a 2-D (h, w) array, got {getattr(x, 'shape', type(x))}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- PyTorch


class TorchEngine:
    """One net in PyTorch. ``traced``: torch.jit.trace + freeze per input shape (channels_last);
    ``dtype``: autocast precision (None = fp32; torch.bfloat16 on CPU; torch.float16 on CUDA)."""

    def __init__(
        self,
        module: nn.Module,
        out_channels: int,
        device: torch.device,
        traced: bool,
        dtype: torch.dtype | None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.traced = traced
        wrapped = WithActivation(module, out_channels).eval()
        self.module = wrapped.to(device, memory_format=torch.channels_last)
        self._cache = _ShapeCache(self._trace)
        self._pinned = device.type == "cuda"

    def _autocast(self) -> torch.autocast:
        enabled = self.dtype is not None
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=enabled)

    def _trace(self, shape: tuple[int, int]) -> nn.Module:
        example = torch.zeros((1, 1, *shape), device=self.device)
        example = example.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(False), torch.no_grad(), self._autocast():
            traced = torch.jit.trace(self.module, example, check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            for _ in range(2):  # the profiling executor specialises on the first runs: do them now
                frozen(example)
        return frozen

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        t = torch.from_numpy(x)[None, None]
        if self._pinned:  # page-locked host memory: asynchronous host -> device copy
            t = t.pin_memory().to(self.device, non_blocking=True)
        t = t.contiguous(memory_format=torch.channels_last)
        if self.traced:
            fn = self._cache.get(x.shape)
            with torch.no_grad(), self._autocast():
                y = fn(t)
        else:
            with torch.inference_mode(), self._autocast():
                y = self.module(t)
        return np.ascontiguousarray(y[0].float().cpu().numpy())


# --------------------------------------------------------------------------------------------- OpenVINO


def _import_openvino():  # noqa: ANN202 - module object
    """The openvino package, or BackendUnavailable when it cannot be imported."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(
            "OpenVINO is not installed (pip install 'stm-feedback[fast]' or `pip install openvino`)"
        ) from e
    return openvino


def cache_dir() -> Path:
    """Where converted/compiled models are cached: ``$STM_FEEDBACK_CACHE_DIR`` or ~/.cache/stm-feedback."""
    env = os.environ.get("STM_FEEDBACK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stm-feedback"


def module_fingerprint(module: nn.Module, *extra: object) -> str:
    """sha256 (hex, 24 chars) of a module's class, parameters and buffers plus ``extra`` (cache key)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()[:24]


def convert_dynamic(ov, wrapped: nn.Module):  # noqa: ANN001, ANN201 - openvino objects
    """OpenVINO model of ``wrapped`` (a ``WithActivation``) with input (1, 1, -1, -1): any (h, w)."""
    with torch.no_grad():
        return ov.convert_model(wrapped, example_input=torch.zeros(1, 1, 64, 64), input=[(1, 1, -1, -1)])


def _convert_cached(ov, wrapped: nn.Module, key: str):  # noqa: ANN001, ANN202 - openvino objects
    """OpenVINO model of ``wrapped`` with dynamic (h, w): read from the IR cache when present, else
    converted (seconds: it traces the module) and written to the cache (best effort, atomic rename)."""
    xml = cache_dir() / "openvino" / f"{key}.xml"
    if xml.exists() and xml.with_suffix(".bin").exists():
        try:
            return ov.Core().read_model(str(xml))
        except RuntimeError:
            log.warning("unreadable OpenVINO cache entry %s; converting again", xml)
    model = convert_dynamic(ov, wrapped)
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        tmp = xml.with_name(f"{key}.{os.getpid()}.tmp.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    except OSError as e:
        log.info("OpenVINO model cache not written (%s)", e)
    return model


# <models_dir>/int8: INT8 IRs written by `stm-feedback quantize` (stm_feedback.quantize)
INT8_DIRNAME = "int8"


def int8_paths(int8_dir: Path, stem: str) -> tuple[Path, Path]:
    """(IR .xml, provenance .json) of the INT8 copy of weights file ``<stem>.pt`` in ``int8_dir``."""
    d = Path(int8_dir)
    return d / f"{stem}.xml", d / f"{stem}.json"


def int8_fingerprint(module: nn.Module, out_channels: int) -> str:
    """Identity of the fp32 net an INT8 IR is quantised from: ``module_fingerprint`` of the prepared module
    (BN folded) wrapped with its output activation, independent of the OpenVINO version."""
    return module_fingerprint(WithActivation(module, out_channels).eval().float(), out_channels)


def int8_ir(int8_dir: Path | None, stem: str, module: nn.Module, out_channels: int) -> Path | None:
    """The INT8 IR for ``module`` (prepared, BN folded) in ``int8_dir``, or None when there is none or it was
    quantised from other weights (its recorded fingerprint differs): then the caller runs the module itself
    (logged, so a stale IR after retraining is visible and never used)."""
    if int8_dir is None:
        return None
    xml, meta_path = int8_paths(int8_dir, stem)
    if not (xml.exists() and xml.with_suffix(".bin").exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("INT8 IR %s ignored: unreadable %s (%s)", xml, meta_path.name, e)
        return None
    if not isinstance(meta, dict) or meta.get("fingerprint") != int8_fingerprint(module, out_channels):
        log.warning(
            "INT8 IR %s ignored: quantised from other weights (run `stm-feedback quantize` again)", xml
        )
        return None
    return xml


class OpenVINOEngine:
    """One net in OpenVINO on the CPU: the PyTorch module converted once with dynamic (h, w) (cached on
    disk, see ``cache_dir``) and compiled **once**, with dynamic (h, w), with the given inference precision
    ("bf16" or "f32"): one infer request serves every input shape. With ``int8_ir`` (an IR written by
    ``stm-feedback quantize`` for this very module, see ``int8_ir``) that INT8 model is compiled instead.

    Measured against one static compile per input shape (the engine before session 6; docs/performance.md,
    ``NSIZES=40 python benchmarks/shape_cache_memory.py``): the same latency at 256 x 256 and the same
    outputs (max difference 0.0), but no 100-200 ms compile at each new frame pixel size and no memory
    growth with the number of pixel sizes seen (40 sizes, 3 passes: 579 MiB flat instead of 923 -> 1032 MiB).
    """

    def __init__(
        self,
        module: nn.Module,
        out_channels: int,
        precision: str,
        threads: int,
        int8_ir: Path | None = None,
    ) -> None:
        ov = _import_openvino()
        self._core = ov.Core()
        self._config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": precision,  # INT8 IRs: the precision of their non-quantised ops
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if threads > 0:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._request = None
        if int8_ir is not None:  # quantised copy of this module (stm-feedback quantize; matched by int8_ir())
            try:
                self._model = self._core.read_model(str(int8_ir))
                compiled = self._core.compile_model(self._model, "CPU", self._config)
                self._request = compiled.create_infer_request()
                self.precision = "int8"
            except RuntimeError as e:  # a damaged IR must not stop the service: run the module instead
                log.warning("INT8 IR %s not usable (%s); running the %s module", int8_ir, e, precision)
        if self._request is None:
            wrapped = WithActivation(module, out_channels).eval().float()
            key = module_fingerprint(wrapped, out_channels, ov.__version__)
            self._model = _convert_cached(ov, wrapped, key)  # input (1, 1, -1, -1)
            self.precision = precision
            self._request = self._core.compile_model(self._model, "CPU", self._config).create_infer_request()
        self._lock = threading.Lock()  # one infer request: serialise its use (engines may be shared)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        with self._lock:
            self._request.infer({0: x[None, None]})
            out = self._request.get_output_tensor(0).data
            return np.array(out[0], dtype=np.float32, copy=True)


# --------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """A way to run nets: ``kind`` "openvino" / "torch" / "torch-eager", ``precision`` "fp32" / "bf16" /
    "fp16", on ``device``. ``name`` is what runner.backend reports: "openvino-bf16", "torch-jit-bf16"
    (traced + frozen), "torch-fp32" (eager reference, the name it had before backends existed), ...."""

    kind: str
    precision: str
    device: torch.device
    threads: int = 0
    fp32_nets: frozenset[str] = frozenset()  # nets run in fp32 whatever ``precision`` says
    int8_dir: Path | None = None  # OpenVINO: run the matching INT8 IRs found here (``int8_ir``) instead

    @property
    def name(self) -> str:
        prefix = {"torch": "torch-jit", "torch-eager": "torch"}.get(self.kind, self.kind)
        keep = (
            f"+fp32:{','.join(sorted(self.fp32_nets))}" if self.fp32_nets and self.precision != "fp32" else ""
        )
        return f"{prefix}-{self.precision}{keep}"

    def engine(self, module: nn.Module, out_channels: int, net_name: str = "") -> Engine:
        """An engine for one prepared module (eval, BN folded) with out_channels output channels;
        ``net_name`` in ``fp32_nets`` runs in fp32; OpenVINO runs the net's INT8 IR from ``int8_dir`` when one
        was quantised from this very module (the engine's ``precision`` is then "int8")."""
        precision = "fp32" if net_name in self.fp32_nets else self.precision
        if self.kind == "openvino":
            ov_precision = "bf16" if precision == "bf16" else "f32"
            ir = None
            if self.int8_dir is not None and net_name and net_name not in self.fp32_nets:
                from stm_feedback.nets import model_paths

                stem = model_paths(self.int8_dir, net_name)[0].stem
                ir = int8_ir(self.int8_dir, stem, module, out_channels)
            return OpenVINOEngine(module, out_channels, ov_precision, self.threads, int8_ir=ir)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return TorchEngine(module, out_channels, self.device, traced=self.kind == "torch", dtype=dtype)


def _openvino_backend(
    device: torch.device, threads: int, bf16: bool | None, keep: frozenset[str], int8_dir: Path | None
) -> Backend:
    if device.type != "cpu":
        raise BackendUnavailable(f"the OpenVINO backend runs on the CPU only, not on {device}")
    ov = _import_openvino()
    if bf16 is None:
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        bf16 = "BF16" in caps and cpu_has_native_bf16()
    return Backend("openvino", "bf16" if bf16 else "fp32", device, threads, keep, int8_dir)


def _torch_backend(device: torch.device, threads: int, bf16: bool | None, keep: frozenset[str]) -> Backend:
    if device.type == "cuda":
        return Backend("torch", "fp16", device, threads, keep)
    if bf16 is None:
        bf16 = cpu_has_amx_bf16() and torch.backends.mkldnn.is_available()
    return Backend("torch", "bf16" if bf16 else "fp32", device, threads, keep)


def select_backend(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    threads: int = 0,
    bf16: bool | None = None,
    fp32_nets: Iterable[str] = (),
    int8_dir: Path | None = None,
) -> Backend:
    """The backend for ``requested`` (one of BACKEND_CHOICES) on ``device``.

    "auto" walks the fallback chain (OpenVINO on CPU, then PyTorch) and logs why a link was skipped;
    an explicit "openvino" raises BackendUnavailable when it cannot run. ``bf16``: None = use bf16 where the
    CPU has native bf16 (OpenVINO) / AMX (PyTorch), True/False = force (CUDA always uses fp16 autocast).
    ``fp32_nets``: nets kept in fp32 (e.g. {"atoms"}: sub-pixel positions, threshold-sensitive peaks).
    ``int8_dir``: OpenVINO runs the INT8 IRs there that match the loaded weights (``Backend.engine``).
    """
    keep = frozenset(fp32_nets)
    dev = torch.device(device)
    if requested not in BACKEND_CHOICES:
        raise ModelError(f"unknown backend {requested!r}; choose one of {BACKEND_CHOICES}")
    if requested == "torch-eager":
        return Backend("torch-eager", "fp16" if dev.type == "cuda" else "fp32", dev, threads, keep)
    if requested == "openvino":
        return _openvino_backend(dev, threads, bf16, keep, int8_dir)
    if requested == "torch":
        return _torch_backend(dev, threads, bf16, keep)
    if dev.type == "cpu":
        try:
            return _openvino_backend(dev, threads, bf16, keep, int8_dir)
        except BackendUnavailable as e:
            log.info("backend auto: OpenVINO skipped (%s); using PyTorch", e)
    return _torch_backend(dev, threads, bf16, keep)
