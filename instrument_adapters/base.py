"""The small interface every instrument adapter implements, and the loop that feeds its frames to the daemon.

An adapter yields ``stm_feedback.readers.Frame`` objects (image in nm, pixel size, bias, scan angle, setpoint;
``meta["frame_id"]`` names the frame) and may execute a write: bare the dimers at given pixel positions of its
latest frame. ``stream`` sends every frame to the daemon with ``Client.analyze`` and hands back the analyses.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from stm_feedback.errors import StmFeedbackError
from stm_feedback.readers import Frame

if TYPE_CHECKING:
    from stm_feedback.client import Client
    from stm_feedback.schema import Analysis

log = logging.getLogger(__name__)


class WriteNotSupported(StmFeedbackError, NotImplementedError):
    """The adapter cannot write (e.g. a watched folder)."""


class InstrumentAdapter(ABC):
    """A source of frames (and optionally a lithography actuator) for one instrument."""

    instrument_id: str = "instrument"

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Frames in acquisition order; may be endless (a microscope or a watched folder)."""

    def write(self, dimers_xy_px: np.ndarray) -> None:
        """Depassivate the dimers at ``dimers_xy_px`` ((N, 2) x_px, y_px in the latest frame)."""
        raise WriteNotSupported(f"{type(self).__name__} cannot write")

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters hold nothing
        """Release sockets, threads and files."""

    def __enter__(self) -> InstrumentAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_frame(client: Client, frame: Frame, instrument_id: str, with_maps: bool = True) -> Analysis:
    """Analyse one frame on the daemon; the frame's metadata travels with it."""
    return client.analyze(
        frame.image,
        frame.pixel_size_nm,
        scan_angle_deg=frame.scan_angle_deg,
        bias_v=frame.bias_v,
        setpoint_pa=frame.setpoint_pa,
        instrument_id=instrument_id,
        frame_id=str(frame.meta.get("frame_id") or frame.source or "frame"),
        with_maps=with_maps,
    )


def stream(
    adapter: InstrumentAdapter,
    client: Client,
    max_frames: int | None = None,
    on_result: Callable[[Frame, Analysis], None] | None = None,
) -> int:
    """Send ``adapter``'s frames to the daemon until it runs dry or ``max_frames`` were analysed; returns the
    number analysed. A frame the daemon rejects (typed error reply) is logged and skipped."""
    from stm_feedback.errors import ServerError

    n = 0
    for frame in adapter.frames():
        try:
            analysis = send_frame(client, frame, adapter.instrument_id)
        except ServerError as exc:
            log.warning("daemon rejected %s: %s", frame.meta.get("frame_id") or frame.source, exc)
            continue
        n += 1
        if on_result is not None:
            on_result(frame, analysis)
        if max_frames is not None and n >= max_frames:
            break
    return n
