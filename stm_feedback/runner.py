"""ModelRunner: the three networks loaded once, run on any frame, answers on the input frame's grid.

``runner = ModelRunner.from_settings(settings.models)``; ``runner.predict(image, pixel_size_nm, bias_v)``.
CPU and CUDA share all code (CUDA: same modules ``.to(device)``, fp16 autocast).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from stm_feedback.backends import INT8_DIRNAME, select_backend
from stm_feedback.errors import ModelError
from stm_feedback.jitter import shift_lines
from stm_feedback.maps import NetworkMaps, bias_polarity
from stm_feedback.nets import NET_NAMES, NetSpec, fuse_batchnorm, load_model
from stm_feedback.preprocess import (
    crop_padding,
    estimate_rows_dark,
    net_input,
    normalize_frame,
    pad_to_multiple,
    resampled_shape,
    resize,
    validate_frame,
)

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as given (ModelError when unusable)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return dev


def prepare_module(net: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, BatchNorm folded into convs, channels_last memory format, on ``device``."""
    net = fuse_batchnorm(net.eval())
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device=device, memory_format=torch.channels_last)


def atom_map_confidence(atom_prob: np.ndarray, threshold: float = 0.3) -> float:
    """Sum of the atom-map values at its local maxima (3x3) above threshold: large when the net sees a
    clean lattice of atoms (used to pick the polarity when the bias is unknown)."""
    mx = cv2.dilate(atom_prob, np.ones((3, 3), np.uint8))
    peaks = (atom_prob >= mx) & (atom_prob > threshold)
    return float(atom_prob[peaks].sum())


class ModelRunner:
    """The three resident networks. ``predict`` is thread-compatible but not re-entrant (one frame at a
    time per runner; the nets use all configured threads themselves)."""

    def __init__(
        self,
        nets: dict[str, tuple[nn.Module, NetSpec]],
        device: str = "auto",
        threads: int = 0,
        require_all: bool = True,
        backend: str = "torch-eager",
        fp32_nets: tuple[str, ...] = (),
        int8_dir: Path | None = None,
        blas_threads: int = 1,
    ) -> None:
        missing = [n for n in NET_NAMES if n not in nets]
        if missing and require_all:
            raise ModelError(f"runner needs all of {NET_NAMES}; missing {missing}")
        self._device = resolve_device(device)
        if threads > 0:
            torch.set_num_threads(int(threads))
        if blas_threads > 0:  # process-wide, like torch's threads (ModelSettings.blas_threads says why)
            threadpool_limits(limits=int(blas_threads), user_api="blas")
        self.specs: dict[str, NetSpec] = {n: s for n, (_, s) in nets.items()}
        self.modules = {n: prepare_module(m, self._device) for n, (m, _) in nets.items()}
        self._amp = self._device.type == "cuda"
        # execution backend (stm_feedback.backends): one engine per net (OpenVINO: compiled once, any shape)
        self._backend = select_backend(backend, self._device, threads, fp32_nets=fp32_nets, int8_dir=int8_dir)
        self.engines = {
            n: self._backend.engine(m, self.specs[n].out_channels, n) for n, m in self.modules.items()
        }

    @classmethod
    def from_dir(
        cls,
        models_dir: str | Path,
        device: str = "auto",
        threads: int = 0,
        backend: str = "torch-eager",
        fp32_nets: tuple[str, ...] = (),
        int8: bool = True,
        blas_threads: int = 1,
    ) -> ModelRunner:
        """Load ``nn0_terraces``, ``nn1_atoms``, ``nn2_defects`` (.pt + .json) from models_dir; ``int8``: the
        OpenVINO backend runs the INT8 IRs in ``models_dir/int8`` that match these weights."""
        d = Path(models_dir)
        nets = {n: load_model(d, n) for n in NET_NAMES}
        int8_dir = d / INT8_DIRNAME if int8 else None
        return cls(
            nets,
            device=device,
            threads=threads,
            backend=backend,
            fp32_nets=fp32_nets,
            int8_dir=int8_dir,
            blas_threads=blas_threads,
        )

    @classmethod
    def from_settings(cls, models: Any) -> ModelRunner:
        """From a ``stm_feedback.config.ModelSettings`` (models_dir, device, threads, backend: see
        stm_feedback.backends; "auto" = the fastest available)."""
        backend = getattr(models, "backend", "auto")
        keep = tuple(getattr(models, "fp32_nets", ()))
        int8 = bool(getattr(models, "int8", True))
        return cls.from_dir(
            models.models_dir,
            models.device,
            models.threads,
            backend=backend,
            fp32_nets=keep,
            int8=int8,
            blas_threads=int(getattr(models, "blas_threads", 1)),
        )

    @property
    def backend(self) -> str:
        """The backend's name, e.g. "openvino-bf16"; "openvino-int8" when every net runs its INT8 IR, and
        "<name>+int8:<nets>" when only some do."""
        int8 = sorted(n for n, e in self.engines.items() if getattr(e, "precision", None) == "int8")
        if not int8:
            return self._backend.name
        if len(int8) == len(self.engines) and not self._backend.fp32_nets:
            return "openvino-int8"
        return f"{self._backend.name}+int8:{','.join(int8)}"

    @property
    def device(self) -> str:
        return str(self._device)

    def versions(self) -> dict[str, str]:
        """Model version of each net, e.g. {"terraces": "nn0-...", ...}."""
        return {n: s.version for n, s in self.specs.items()}

    # ------------------------------------------------------------------------------------------------------
    def run_net(self, name: str, x_net: np.ndarray) -> np.ndarray:
        """Raw network output (C, h, w) float32 for one prepared input (h, w) at the net's pixel size."""
        spec = self.specs[name]
        padded, pad = pad_to_multiple(x_net, spec.pool_multiple)
        out = self.engines[name](np.ascontiguousarray(padded, np.float32))  # probabilities (C, h, w)
        return np.ascontiguousarray(crop_padding(out, pad))

    def net_on_net_grid(self, name: str, norm: np.ndarray, pixel_size_nm: float, invert: bool) -> np.ndarray:
        """Net ``name`` on the normalised frame, output (C, h, w) on the net's own grid (its pixel size)."""
        spec = self.specs[name]
        shape = resampled_shape(norm.shape, pixel_size_nm, spec.pixel_size_nm)
        x = resize(norm, shape)
        if invert:
            x = (1.0 - x).astype(np.float32)
        return self.run_net(name, net_input(x, spec.highpass_sigma_nm / spec.pixel_size_nm))

    @staticmethod
    def to_frame_grid(
        y: np.ndarray, shape: tuple[int, int], channels: tuple[int, ...] | None = None
    ) -> np.ndarray:
        """(C, h, w) net output resampled to the frame's (H, W) grid; ``channels``: only these (in order)."""
        idx = range(len(y)) if channels is None else channels
        out = np.empty((len(idx), *shape), np.float32)
        for i, c in enumerate(idx):
            out[i] = resize(y[c], shape, antialias=False)
        return out

    def net_on_frame(
        self,
        name: str,
        norm: np.ndarray,
        pixel_size_nm: float,
        invert: bool,
        channels: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Net ``name`` on the normalised frame, output (C, H, W) resampled back to the frame's grid;
        ``channels``: only these output channels (in this order), the others are not resampled."""
        y = self.net_on_net_grid(name, norm, pixel_size_nm, invert)
        return self.to_frame_grid(y, norm.shape, channels)

    def predict_moved_lines(self, maps: NetworkMaps, shift_px: np.ndarray) -> NetworkMaps:
        """The maps of the frame behind ``maps`` with its lines moved by whole pixels ``shift_px`` (H,)
        (``jitter.shift_lines``, the scan-line jitter correction): the three nets run again on the moved
        lines of the normalised frame, with the polarity of ``maps`` (no new normalisation or polarity
        estimate: the pre-processing is skipped)."""
        s = maps.pixel_size_nm
        image_norm = shift_lines(maps.image_norm, shift_px)
        # image_norm has bright rows; the nets take the normalised frame as recorded (``predict``)
        empty = maps.polarity == "empty"
        norm = (1.0 - image_norm).astype(np.float32) if empty else image_norm
        rows_bright_net = self.specs["atoms"].polarity == "rows_bright"
        nets = self._nets(norm, s, empty and rows_bright_net)
        return self._assemble(norm, s, *nets, maps.polarity, maps.polarity_source)

    def _nets(
        self, norm: np.ndarray, s: float, invert_atoms: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The three nets on a normalised frame: step map, atom map on NN-1's grid and on the frame's,
        protrusion + depression maps (2, H, W)."""
        step = self.net_on_frame("terraces", norm, s, False)[0]
        atoms_net = self.net_on_net_grid("atoms", norm, s, invert_atoms)[0]  # (h, w)
        atoms = self.to_frame_grid(atoms_net[None], norm.shape)[0]
        defects = self.net_on_frame("defects", norm, s, False, channels=(1, 2))  # protrusion, depression
        return step, atoms_net, atoms, defects

    @staticmethod
    def _assemble(
        norm: np.ndarray,
        s: float,
        step: np.ndarray,
        atoms_net: np.ndarray,
        atoms: np.ndarray,
        defects: np.ndarray,
        polarity: str,
        source: str,
    ) -> NetworkMaps:
        image_norm = (1.0 - norm).astype(np.float32) if polarity == "empty" else norm
        return NetworkMaps(
            step_prob=step,
            atom_prob=atoms,
            protrusion_prob=defects[0],
            depression_prob=defects[1],
            image_norm=image_norm,
            pixel_size_nm=s,
            polarity=polarity,
            polarity_source=source,
            # kept only where the net's grid is finer than the frame's (NetworkMaps.atom_prob_net)
            atom_prob_net=atoms_net if atoms_net.size > norm.size else None,
        )

    def predict(self, image: np.ndarray, pixel_size_nm: float, bias_v: float | None = None) -> NetworkMaps:
        """All three nets on one frame (H, W) of apparent heights (any unit; nm expected) at pixel_size_nm
        (nm/px); bias_v (V) > 0 = empty states, None = unknown (polarity estimated). InputError on bad
        input. Maps are on the input grid."""
        img = validate_frame(image, pixel_size_nm, bias_v)
        s = float(pixel_size_nm)
        norm = normalize_frame(img, s)
        empty = bias_v is not None and float(bias_v) > 0
        rows_bright_net = self.specs["atoms"].polarity == "rows_bright"
        step, atoms_net, atoms, defects = self._nets(norm, s, empty and rows_bright_net)
        if bias_v is not None:
            polarity, source = bias_polarity(bias_v)
        elif rows_bright_net:
            # bias unknown: also try the inverted frame and keep the polarity whose atom map is the more
            # confident (the net was trained mostly on rows-bright frames); costs one more atom-net pass
            net_inv = self.net_on_net_grid("atoms", norm, s, True)[0]
            atoms_inv = self.to_frame_grid(net_inv[None], norm.shape)[0]
            if atom_map_confidence(atoms_inv) > atom_map_confidence(atoms):
                atoms, atoms_net, polarity = atoms_inv, net_inv, "empty"
            else:
                polarity = "filled"
            source = "estimated"
        else:
            window_px = max(3, int(round(0.4 / s)) | 1)  # ~half a row period: atoms vs. their trough
            rows_dark = estimate_rows_dark(norm, atoms, window_px=window_px)
            if rows_dark is None:
                polarity, source = "filled", "assumed"
            else:
                polarity, source = ("empty" if rows_dark else "filled"), "estimated"
        return self._assemble(norm, s, step, atoms_net, atoms, defects, polarity, source)


def measure_latency(
    runner: ModelRunner, size_px: int = 256, pixel_size_nm: float = 0.1, n: int = 50, warmup: int = 5
) -> dict[str, dict[str, float]]:
    """Median / p95 latency (ms) of each net (prepared input -> output on its own grid) and of the whole
    ``predict`` on a simulated-like random frame of size_px^2 at pixel_size_nm."""
    import time

    rng = np.random.default_rng(0)
    img = rng.normal(0, 0.02, (size_px, size_px)).astype(np.float32)
    norm = normalize_frame(img, pixel_size_nm)
    out: dict[str, dict[str, float]] = {}

    def stats(ts: list[float]) -> dict[str, float]:
        a = np.array(ts) * 1e3
        return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95))}

    for name, spec in runner.specs.items():
        x = resize(norm, resampled_shape(norm.shape, pixel_size_nm, spec.pixel_size_nm))
        for _ in range(warmup):
            runner.run_net(name, x)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            runner.run_net(name, x)
            ts.append(time.perf_counter() - t)
        out[name] = {**stats(ts), "input_px": float(x.shape[0])}
    if all(k in runner.specs for k in NET_NAMES):
        for _ in range(warmup):
            runner.predict(img, pixel_size_nm, -2.0)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            runner.predict(img, pixel_size_nm, -2.0)
            ts.append(time.perf_counter() - t)
        out["predict"] = stats(ts)
    return out
