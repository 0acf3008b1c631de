"""Adapter driving the simulated STM (``simulator.instrument.SimulatedSTM``): scans frames, optionally streams
partial frames (the lines scanned so far) to the daemon while scanning, and executes writes by depassivating
dimers of the current frame."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from instrument_adapters.base import InstrumentAdapter
from stm_feedback.readers import Frame

if TYPE_CHECKING:
    from stm_feedback.client import Client
    from stm_feedback.schema import Analysis

log = logging.getLogger(__name__)


class SimulatedAdapter(InstrumentAdapter):
    """Frames from a ``SimulatedSTM`` (made from ``seed``/``preset`` unless ``stm`` is given).

    The scan frame is ``size_nm`` wide with ``pixels`` per line, centred at ``center_nm`` in sample nm.
    With a ``client`` and ``lines_every > 0`` every ``lines_every`` scanned lines go to the daemon as
    ``analyze_lines``; the last partial analysis is in ``frame.meta["partial_analysis"]``. ``max_frames``
    bounds ``frames()`` (None = endless, like a microscope).
    """

    def __init__(
        self,
        stm: Any = None,
        seed: int = 0,
        preset: str = "realistic",
        center_nm: tuple[float, float] = (0.0, 0.0),
        size_nm: float = 25.6,
        pixels: int = 256,
        angle_deg: float = 0.0,
        instrument_id: str = "sim-stm",
        client: Client | None = None,
        lines_every: int = 0,
        max_frames: int | None = None,
    ) -> None:
        if stm is None:
            from simulator.frame import SimConfig
            from simulator.instrument import SimulatedSTM

            stm = SimulatedSTM(seed=seed, config=SimConfig.preset(preset))
        self.stm = stm
        self.instrument_id = instrument_id
        self.client = client
        self.lines_every = int(lines_every)
        self.max_frames = max_frames
        self._frame_args = {
            "center_x_nm": float(center_nm[0]),
            "center_y_nm": float(center_nm[1]),
            "size_nm": float(size_nm),
            "pixels": int(pixels),
            "angle_deg": float(angle_deg),
        }
        self.stm.set_frame(**self._frame_args)
        self._count = 0

    def acquire(self) -> Frame:
        """Scan one frame line by line (streaming partial frames if configured) and return it."""
        partial: Analysis | None = None
        rows: list[np.ndarray] = []
        for line in self.stm.scan_lines():
            rows.append(np.asarray(line.z_nm, np.float32))
            n = len(rows)
            streaming = self.client is not None and self.lines_every > 0
            if streaming and n % self.lines_every == 0 and n < self._frame_args["pixels"]:
                partial = self._send_partial(np.stack(rows))
        self._count += 1
        sim = self.stm.last_frame
        return Frame(
            image=np.asarray(sim.image_nm, np.float32),
            pixel_size_nm=float(self.stm.pixel_size_nm),
            bias_v=float(sim.bias_v),
            scan_angle_deg=self._frame_args["angle_deg"],
            setpoint_pa=float(getattr(self.stm, "setpoint_pa", 0.0) or 0.0) or None,
            source=f"{self.instrument_id}:{self._count}",
            meta={
                "frame_id": f"{self.instrument_id}-{self._count:05d}",
                "truth": sim.truth,
                "partial_analysis": partial,
            },
        )

    def _send_partial(self, lines: np.ndarray) -> Analysis | None:
        from stm_feedback.errors import ServerError

        assert self.client is not None
        if lines.shape[0] < 2:
            return None
        try:
            return self.client.analyze_lines(
                lines,
                float(self.stm.pixel_size_nm),
                total_lines=self._frame_args["pixels"],
                bias_v=float(self.stm.bias_v),
                instrument_id=self.instrument_id,
                frame_id=f"{self.instrument_id}-{self._count + 1:05d}-partial",
                with_maps=False,
            )
        except ServerError as exc:  # a partial frame the daemon cannot use yet is not a failure
            log.debug("partial frame (%d lines) rejected: %s", lines.shape[0], exc)
            return None

    def frames(self) -> Iterator[Frame]:
        while self.max_frames is None or self._count < self.max_frames:
            yield self.acquire()

    def write(self, dimers_xy_px: np.ndarray) -> None:
        """Bare the dimers nearest these pixel positions of the latest frame (tip pulses in the simulator)."""
        xy = np.atleast_2d(np.asarray(dimers_xy_px, np.float64))
        if xy.shape[1] != 2:
            raise ValueError(f"dimers_xy_px must be (N, 2), got {xy.shape}")
        self.stm.depassivate_px(xy)
