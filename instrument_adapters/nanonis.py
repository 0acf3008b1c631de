"""Our own client of the Nanonis TCP programming interface and the adapter built on it.

Wire format (big-endian): request header = command name (32 bytes, NUL-padded) | body size (int32) |
send-response flag (uint16) | 2 zero bytes; response header = name (32) | body size (int32) | 4 bytes unused;
the response body ends with the error section: status (uint32) | description size (int32) | description.
Nanonis coordinates are metres with Y up; image pixels have y down (see ``frame_px_to_nanonis_m``).
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from instrument_adapters.base import InstrumentAdapter
from stm_feedback.errors import StmFeedbackError
from stm_feedback.readers import Frame

CHANNEL_Z = 14  # buffer slot of the Z signal (the simulator's and a common controller layout)


class NanonisError(StmFeedbackError):
    """The controller answered with a non-zero error status, or the connection broke mid-message."""


@dataclass(frozen=True)
class ScanFrame:
    """Scan frame as Nanonis reports it: centre and size in metres (Y up), angle in degrees (clockwise)."""

    center_x_m: float
    center_y_m: float
    width_m: float
    height_m: float
    angle_deg: float


class NanonisClient:
    """Blocking client for one TCP connection to a Nanonis controller (default port 6501)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6501, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NanonisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- transport
    def call(self, command: str, body: bytes = b"") -> bytes:
        """Send one command and return its return values (the error section stripped and checked)."""
        name = command.encode("ascii")
        if len(name) > 32:
            raise ValueError(f"command name {command!r} longer than 32 bytes")
        self.sock.sendall(name.ljust(32, b"\0") + struct.pack(">iHH", len(body), 1, 0) + body)
        header = self._recv(40)
        got = header[:32].rstrip(b"\0")
        if got != name:
            raise NanonisError(f"{command}: reply is for {got!r}")
        (size,) = struct.unpack(">i", header[32:36])
        reply = self._recv(size)
        # the error section is the tail: status (4) | size (4) | text; find it from the end
        for cut in range(len(reply) - 8, -1, -1):
            status, n = struct.unpack(">Ii", reply[cut : cut + 8])
            if cut + 8 + n == len(reply) and status in (0, 1):
                if status:
                    raise NanonisError(f"{command}: {reply[cut + 8 :].decode('utf-8', 'replace')}")
                return reply[:cut]
        raise NanonisError(f"{command}: reply without an error section")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NanonisError("connection closed by the controller")
            buf += chunk
        return bytes(buf)

    # ---------------------------------------------------------------------------------------- commands
    def bias_get(self) -> float:
        """Sample bias in V."""
        return struct.unpack(">f", self.call("Bias.Get"))[0]

    def bias_set(self, bias_v: float) -> None:
        self.call("Bias.Set", struct.pack(">f", bias_v))

    def setpoint_get_a(self) -> float:
        """Z-controller (current) setpoint in A."""
        return struct.unpack(">f", self.call("ZCtrl.SetpntGet"))[0]

    def frame_get(self) -> ScanFrame:
        return ScanFrame(*struct.unpack(">5f", self.call("Scan.FrameGet")))

    def frame_set(self, frame: ScanFrame) -> None:
        f = frame
        self.call(
            "Scan.FrameSet",
            struct.pack(">5f", f.center_x_m, f.center_y_m, f.width_m, f.height_m, f.angle_deg),
        )

    def buffer_get(self) -> tuple[list[int], int, int]:
        """(channel indexes, pixels per line, lines)."""
        raw = self.call("Scan.BufferGet")
        (n,) = struct.unpack(">i", raw[:4])
        channels = list(struct.unpack(f">{n}i", raw[4 : 4 + 4 * n]))
        pixels, lines = struct.unpack(">ii", raw[4 + 4 * n : 12 + 4 * n])
        return channels, pixels, lines

    def buffer_set(self, channels: list[int], pixels: int, lines: int) -> None:
        body = struct.pack(f">i{len(channels)}iii", len(channels), *channels, pixels, lines)
        self.call("Scan.BufferSet", body)

    def scan_action(self, action: int, direction_up: bool = False) -> None:
        """0 start, 1 stop, 2 pause, 3 resume."""
        self.call("Scan.Action", struct.pack(">HI", action, int(direction_up)))

    def scan_running(self) -> bool:
        return bool(struct.unpack(">I", self.call("Scan.StatusGet"))[0])

    def wait_end_of_scan(self, timeout_ms: int = -1) -> tuple[bool, str]:
        """(timed_out, path of the autosaved file or "")."""
        raw = self.call("Scan.WaitEndOfScan", struct.pack(">i", timeout_ms))
        timed_out, n = struct.unpack(">II", raw[:8])
        return bool(timed_out), raw[8 : 8 + n].decode("utf-8", "replace")

    def frame_data_grab(self, channel: int = CHANNEL_Z, forward: bool = True) -> tuple[str, np.ndarray, bool]:
        """(channel name, data (rows, cols) float32 in SI units, scan direction up)."""
        raw = self.call("Scan.FrameDataGrab", struct.pack(">II", channel, int(forward)))
        (n,) = struct.unpack(">i", raw[:4])
        name = raw[4 : 4 + n].decode("utf-8", "replace")
        rows, cols = struct.unpack(">ii", raw[4 + n : 12 + n])
        start = 12 + n
        data = (
            np.frombuffer(raw, ">f4", count=rows * cols, offset=start).reshape(rows, cols).astype(np.float32)
        )
        (up,) = struct.unpack(">I", raw[start + 4 * rows * cols : start + 4 * rows * cols + 4])
        return name, data, bool(up)

    def folme_xy_set(self, x_m: float, y_m: float, wait: bool = True) -> None:
        self.call("FolMe.XYPosSet", struct.pack(">ddI", x_m, y_m, int(wait)))

    def folme_xy_get(self) -> tuple[float, float]:
        return struct.unpack(">dd", self.call("FolMe.XYPosGet", struct.pack(">I", 0)))

    def bias_pulse(self, bias_v: float, width_s: float, absolute: bool = True, wait: bool = True) -> None:
        """One bias pulse; Z controller held during the pulse."""
        self.call("Bias.Pulse", struct.pack(">IffHH", int(wait), width_s, bias_v, 1, 2 if absolute else 1))


def frame_px_to_nanonis_m(xy_px: np.ndarray, frame: ScanFrame, height_px: int, width_px: int) -> np.ndarray:
    """(N, 2) pixel positions (x right, y down, (0,0) = centre of the top-left pixel) of an image of this scan
    frame -> (N, 2) Nanonis X, Y in metres (Y up; positive angle = clockwise on screen)."""
    xy = np.atleast_2d(np.asarray(xy_px, np.float64))
    px_x_m, px_y_m = frame.width_m / width_px, frame.height_m / height_px
    dx = (xy[:, 0] - (width_px - 1) / 2.0) * px_x_m  # along the frame's x axis
    dy = (xy[:, 1] - (height_px - 1) / 2.0) * px_y_m  # downwards on screen
    a = math.radians(frame.angle_deg)
    # clockwise rotation, Y-up coordinates: frame x axis = (cos a, -sin a), screen-down = -(sin a, cos a)
    x = frame.center_x_m + dx * math.cos(a) - dy * math.sin(a)
    y = frame.center_y_m - dx * math.sin(a) - dy * math.cos(a)
    return np.stack([x, y], axis=1)


class NanonisAdapter(InstrumentAdapter):
    """Scans with a Nanonis controller (or ``simulator.nanonis_server``) and grabs each finished Z frame.

    ``frames()`` starts a scan (down), waits for its end and yields the Z channel as nm; ``write`` moves the
    tip to each dimer with FolMe and fires a bias pulse (``pulse_bias_v`` for ``pulse_width_s``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6501,
        instrument_id: str = "nanonis",
        pulse_bias_v: float = 3.5,
        pulse_width_s: float = 0.01,
        scan_timeout_ms: int = 600_000,
        max_frames: int | None = None,
    ) -> None:
        self.client = NanonisClient(host, port)
        self.instrument_id = instrument_id
        self.pulse_bias_v = pulse_bias_v
        self.pulse_width_s = pulse_width_s
        self.scan_timeout_ms = scan_timeout_ms
        self.max_frames = max_frames
        self._last: tuple[ScanFrame, int, int] | None = None
        self._count = 0

    def acquire(self) -> Frame:
        """Run one scan to its end and return the forward Z frame (nm, row 0 = top)."""
        scan_frame = self.client.frame_get()
        self.client.scan_action(0, direction_up=False)
        timed_out, path = self.client.wait_end_of_scan(self.scan_timeout_ms)
        if timed_out:
            self.client.scan_action(1)
            raise NanonisError(f"scan did not end within {self.scan_timeout_ms} ms")
        return self._grab(scan_frame, path)

    def _grab(self, scan_frame: ScanFrame, path: str = "") -> Frame:
        name, z_m, up = self.client.frame_data_grab(CHANNEL_Z, forward=True)
        if name != "Z":
            raise NanonisError(f"channel {CHANNEL_Z} is {name!r}, expected 'Z'")
        rows, cols = z_m.shape
        self._last = (scan_frame, rows, cols)
        self._count += 1
        return Frame(
            image=(z_m * 1e9).astype(np.float32),
            pixel_size_nm=scan_frame.width_m / cols * 1e9,
            bias_v=self.client.bias_get(),
            scan_angle_deg=scan_frame.angle_deg,
            setpoint_pa=self.client.setpoint_get_a() * 1e12,
            source=path or f"{self.instrument_id}:{self._count}",
            meta={
                "frame_id": f"{self.instrument_id}-{self._count:05d}",
                "scan_frame": scan_frame,
                "scan_dir_up": up,
                "time_s": time.time(),
            },
        )

    def frames(self) -> Iterator[Frame]:
        while self.max_frames is None or self._count < self.max_frames:
            yield self.acquire()

    def partial(self) -> Frame | None:
        """The frame being scanned so far (rows not yet scanned dropped), or None before the first line."""
        scan_frame = self.client.frame_get()
        _name, z_m, _up = self.client.frame_data_grab(CHANNEL_Z, forward=True)
        done = np.isfinite(z_m).all(axis=1)
        n = int(np.argmin(done)) if not done.all() else len(done)
        if n == 0:
            return None
        return Frame(
            image=z_m[:n] * 1e9,
            pixel_size_nm=scan_frame.width_m / z_m.shape[1] * 1e9,
            scan_angle_deg=scan_frame.angle_deg,
            source=f"{self.instrument_id}:partial",
            meta={"total_lines": int(z_m.shape[0])},
        )

    def write(self, dimers_xy_px: np.ndarray) -> None:
        if self._last is None:
            raise NanonisError("write before any frame: positions are in the latest frame's pixels")
        scan_frame, rows, cols = self._last
        for x_m, y_m in frame_px_to_nanonis_m(dimers_xy_px, scan_frame, rows, cols):
            self.client.folme_xy_set(float(x_m), float(y_m), wait=True)
            self.client.bias_pulse(self.pulse_bias_v, self.pulse_width_s, absolute=True, wait=True)

    def close(self) -> None:
        self.client.close()
