"""A Nanonis-compatible TCP server in front of the simulated STM, so Nanonis scripts (the official
``nanonis_spm`` client included) and our own ``instrument_adapters.nanonis`` client can drive the simulator.

Wire format (Nanonis TCP programming interface; every number big-endian):
request  = command name (32 bytes, NUL-padded ASCII) | body size (int32) | send-response flag (uint16) |
           2 zero bytes | body;
response = command name (32 bytes) | body size (int32) | 4 zero bytes | body, where body = return values,
           then the error section: error status (uint32, 0 = ok) | description size (int32) | description.

Coordinates: Nanonis X/Y are metres with Y pointing **up**; the simulator's sample frame is nanometres with
y pointing **down** (image convention), so ``x_nm = X_m * 1e9`` and ``y_nm = -Y_m * 1e9``. The frame angle
(deg, positive = clockwise on screen) is passed to the simulator unchanged (clockwise on screen is the
positive sense in the y-down image frame). ``Scan.FrameDataGrab`` returns the frame in display order
(row 0 = top of the frame), Z in metres, lines not yet scanned as NaN; the backward direction returns the
forward data (the simulator images one direction). A ``Bias.Pulse`` whose absolute bias reaches
``depassivation_threshold_v`` bares the dimer nearest the tip (``FolMe.XYPosSet``), as a lithography pulse.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HEADER_BYTES = 40
NAME_BYTES = 32
MAX_BODY_BYTES = 1 << 20  # requests are tiny; a larger body is a protocol error and closes the connection
CHANNEL_CURRENT = 0  # buffer slot indexes (0..23 in a real controller's signal manager)
CHANNEL_Z = 14
CHANNEL_NAMES = {CHANNEL_CURRENT: "Current", CHANNEL_Z: "Z"}


class CommandError(Exception):
    """A request that is answered with a non-zero error status and this message."""


@dataclass
class ScanState:
    """Frame and buffer as the controller sees them: metres, degrees, pixels, lines."""

    center_x_m: float = 0.0
    center_y_m: float = 0.0
    width_m: float = 25.6e-9
    height_m: float = 25.6e-9
    angle_deg: float = 0.0
    pixels: int = 256
    lines: int = 256
    channels: tuple[int, ...] = (CHANNEL_Z, CHANNEL_CURRENT)
    direction_up: bool = False


def _pack_error(message: str = "") -> bytes:
    msg = message.encode("ascii", "replace")
    return struct.pack(">Ii", 1 if message else 0, len(msg)) + msg


def _pack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">i", len(raw)) + raw


class NanonisSimServer:
    """Serve ``stm`` (a ``simulator.instrument.SimulatedSTM``) on ``host:port`` (port 0 = a free port).

    ``line_period_s`` paces the scan in wall-clock time (0 = as fast as the simulator renders) so that
    clients can watch partial frames; ``autosave_dir`` makes every finished scan a Nanonis ``.sxm`` file
    there, whose path ``Scan.WaitEndOfScan`` returns.
    """

    def __init__(
        self,
        stm: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        line_period_s: float = 0.0,
        autosave_dir: str | Path | None = None,
        depassivation_threshold_v: float = 2.5,
    ) -> None:
        self.stm = stm
        self.line_period_s = float(line_period_s)
        self.autosave_dir = Path(autosave_dir) if autosave_dir else None
        self.depassivation_threshold_v = float(depassivation_threshold_v)
        self.state = ScanState()
        pixel_size_nm = float(getattr(stm, "pixel_size_nm", 0.1) or 0.1)
        self.state.width_m = self.state.height_m = self.state.pixels * pixel_size_nm * 1e-9
        self.bias_v = float(getattr(stm, "bias_v", -2.0))
        self.setpoint_a = float(getattr(stm, "setpoint_pa", 50.0)) * 1e-12
        self.tip_xy_m = (0.0, 0.0)
        self.pulses: list[dict[str, float]] = []  # every Bias.Pulse, for tests and the demo log
        self._stm_lock = threading.RLock()  # the simulator is not thread-safe
        self._scan_thread: threading.Thread | None = None
        self._stop_scan = threading.Event()
        self._scan_done = threading.Event()
        self._scan_done.set()
        self._z_m: np.ndarray | None = None  # (lines, pixels) display order, NaN = not yet scanned
        self._last_saved = ""
        self._scan_count = 0
        self._handlers: dict[str, Callable[[bytes], bytes]] = {
            "Scan.Action": self._scan_action,
            "Scan.StatusGet": self._scan_status_get,
            "Scan.WaitEndOfScan": self._scan_wait_end,
            "Scan.FrameSet": self._scan_frame_set,
            "Scan.FrameGet": self._scan_frame_get,
            "Scan.BufferSet": self._scan_buffer_set,
            "Scan.BufferGet": self._scan_buffer_get,
            "Scan.FrameDataGrab": self._scan_frame_data_grab,
            "Bias.Set": self._bias_set,
            "Bias.Get": self._bias_get,
            "Bias.Pulse": self._bias_pulse,
            "ZCtrl.SetpntSet": self._setpoint_set,
            "ZCtrl.SetpntGet": self._setpoint_get,
            "ZCtrl.OnOffGet": lambda body: struct.pack(">I", 1),
            "Current.Get": lambda body: struct.pack(">f", self.setpoint_a),
            "FolMe.XYPosSet": self._folme_set,
            "FolMe.XYPosGet": self._folme_get,
        }
        server_self = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server_self._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> NanonisSimServer:
        """Serve in a background thread; returns self (``with NanonisSimServer(stm).start() as srv``)."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="nanonis-sim", daemon=True)
        self._thread.start()
        log.info("nanonis simulator listening on %s:%d", self.host, self.port)
        return self

    def close(self) -> None:
        """Stop any scan, stop serving and release the port."""
        self._stop_scan.set()
        if self._scan_thread is not None:
            self._scan_thread.join(timeout=10)
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> NanonisSimServer:
        return self if self._thread else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport
    def _serve_connection(self, sock: socket.socket) -> None:
        while True:
            header = _recv_exact(sock, HEADER_BYTES)
            if header is None:
                return
            name = header[:NAME_BYTES].rstrip(b"\0").decode("ascii", "replace")
            body_size, send_response = struct.unpack(">iH", header[NAME_BYTES:38])
            if not 0 <= body_size <= MAX_BODY_BYTES:
                log.warning("nanonis sim: %r with body size %d; closing connection", name, body_size)
                return
            body = _recv_exact(sock, body_size) if body_size else b""
            if body is None:
                return
            reply = self.dispatch(name, body)
            if send_response:
                out = name.encode("ascii", "replace")[:NAME_BYTES].ljust(NAME_BYTES, b"\0")
                sock.sendall(out + struct.pack(">i", len(reply)) + b"\0" * 4 + reply)

    def dispatch(self, name: str, body: bytes) -> bytes:
        """The response body (return values + error section) of one command; never raises."""
        handler = self._handlers.get(name)
        if handler is None:
            return _pack_error(f"command {name!r} is not implemented by the simulated STM")
        try:
            return handler(body) + _pack_error()
        except (CommandError, struct.error) as exc:
            return _pack_error(f"{name}: {exc}")
        except Exception as exc:  # a bug in the simulator must not kill the connection
            log.exception("nanonis sim: %s failed", name)
            return _pack_error(f"{name}: internal error {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ scan
    def _scan_action(self, body: bytes) -> bytes:
        action, direction = struct.unpack(">HI", body[:6])
        if action == 0:  # start
            self.state.direction_up = bool(direction)
            self._start_scan()
        elif action == 1:  # stop
            self._stop_scan.set()
            if self._scan_thread is not None:
                self._scan_thread.join(timeout=30)
        elif action in (2, 3, 4, 5, 6):
            raise CommandError(f"scan action {action} is not simulated")
        else:
            raise CommandError(f"unknown scan action {action}")
        return b""

    def _start_scan(self) -> None:
        if not self._scan_done.is_set():
            raise CommandError("a scan is already running")
        s = self.state
        if s.pixels != s.lines or abs(s.width_m - s.height_m) > 1e-3 * s.width_m:
            raise CommandError(
                "the simulated STM scans square frames only (pixels == lines, width == height)"
            )
        with self._stm_lock:
            self.stm.bias_v = self.bias_v
            if hasattr(self.stm, "setpoint_pa"):
                self.stm.setpoint_pa = self.setpoint_a * 1e12
            self.stm.set_frame(
                center_x_nm=s.center_x_m * 1e9,
                center_y_nm=-s.center_y_m * 1e9,
                size_nm=s.width_m * 1e9,
                pixels=s.pixels,
                angle_deg=s.angle_deg,
            )
        self._z_m = np.full((s.lines, s.pixels), np.nan, np.float32)
        self._stop_scan.clear()
        self._scan_done.clear()
        self._scan_thread = threading.Thread(target=self._run_scan, name="nanonis-sim-scan", daemon=True)
        self._scan_thread.start()

    def _run_scan(self) -> None:
        try:
            with self._stm_lock:
                lines = self.stm.scan_lines()
            completed = False
            while not self._stop_scan.is_set():
                with self._stm_lock:
                    line = next(lines, None)
                if line is None:
                    completed = True
                    break
                assert self._z_m is not None
                self._z_m[int(line.index)] = np.asarray(line.z_nm, np.float32) * np.float32(1e-9)
                if self.line_period_s > 0:
                    time.sleep(self.line_period_s)
            if not completed:  # stopped by Scan.Action(1): keep the partial frame, no file
                return
            self._scan_count += 1
            if self.autosave_dir is not None:
                self._last_saved = str(self._autosave())
        except Exception:
            log.exception("nanonis sim: scan failed")
        finally:
            self._scan_done.set()

    def _autosave(self) -> Path:
        from stm_feedback.readers import write_sxm

        assert self.autosave_dir is not None and self._z_m is not None
        self.autosave_dir.mkdir(parents=True, exist_ok=True)
        s = self.state
        path = self.autosave_dir / f"sim_{self._scan_count:04d}.sxm"
        tmp = path.with_suffix(".sxm.part")  # watchers see the finished file only
        write_sxm(
            tmp,
            self._z_m * 1e9,
            s.width_m * 1e9 / s.pixels,
            bias_v=self.bias_v,
            setpoint_pa=self.setpoint_a * 1e12,
            scan_angle_deg=s.angle_deg,
            center_nm=(s.center_x_m * 1e9, s.center_y_m * 1e9),
        )
        tmp.replace(path)
        return path

    def _scan_status_get(self, body: bytes) -> bytes:
        return struct.pack(">I", 0 if self._scan_done.is_set() else 1)

    def _scan_wait_end(self, body: bytes) -> bytes:
        (timeout_ms,) = struct.unpack(">i", body[:4])
        done = self._scan_done.wait(None if timeout_ms < 0 else timeout_ms / 1000.0)
        path = self._last_saved if done else ""
        raw = path.encode("utf-8")
        return struct.pack(">II", 0 if done else 1, len(raw)) + raw

    def _scan_frame_set(self, body: bytes) -> bytes:
        cx, cy, w, h, angle = struct.unpack(">5f", body[:20])
        if not (w > 0 and h > 0 and np.isfinite([cx, cy, w, h, angle]).all()):
            raise CommandError(f"invalid frame {cx, cy, w, h, angle}")
        self.state.center_x_m, self.state.center_y_m = float(cx), float(cy)
        self.state.width_m, self.state.height_m, self.state.angle_deg = float(w), float(h), float(angle)
        return b""

    def _scan_frame_get(self, body: bytes) -> bytes:
        s = self.state
        return struct.pack(">5f", s.center_x_m, s.center_y_m, s.width_m, s.height_m, s.angle_deg)

    def _scan_buffer_set(self, body: bytes) -> bytes:
        (n,) = struct.unpack(">i", body[:4])
        if not 0 < n <= 24:
            raise CommandError(f"invalid number of channels {n}")
        channels = struct.unpack(f">{n}i", body[4 : 4 + 4 * n])
        pixels, lines = struct.unpack(">ii", body[4 + 4 * n : 12 + 4 * n])
        if any(c not in CHANNEL_NAMES for c in channels):
            raise CommandError(f"channels {channels}: the simulator records {sorted(CHANNEL_NAMES)} only")
        if pixels <= 0 or not 8 <= pixels <= 4096 or not 0 <= lines <= 4096:
            raise CommandError(f"invalid buffer {pixels} pixels x {lines} lines")
        self.state.channels = tuple(channels)
        self.state.pixels = int(pixels)
        self.state.lines = (
            int(lines) if lines > 0 else int(round(pixels * self.state.height_m / self.state.width_m))
        )
        return b""

    def _scan_buffer_get(self, body: bytes) -> bytes:
        s = self.state
        n = len(s.channels)
        return struct.pack(f">i{n}iii", n, *s.channels, s.pixels, s.lines)

    def _scan_frame_data_grab(self, body: bytes) -> bytes:
        channel, _direction = struct.unpack(">II", body[:8])
        if channel not in self.state.channels:
            raise CommandError(f"channel {channel} is not recorded (buffer: {self.state.channels})")
        if self._z_m is None:
            z = np.full((self.state.lines, self.state.pixels), np.nan, np.float32)
        else:
            z = self._z_m.copy()
        if channel == CHANNEL_Z:
            data = z
        else:  # constant-current mode: the current sits at the setpoint wherever the line was scanned
            data = np.where(np.isfinite(z), np.float32(self.setpoint_a), np.float32(np.nan)).astype(
                np.float32
            )
        rows, cols = data.shape
        return (
            _pack_string(CHANNEL_NAMES[channel])
            + struct.pack(">ii", rows, cols)
            + data.astype(">f4").tobytes()
            + struct.pack(">I", 1 if self.state.direction_up else 0)
        )

    # ------------------------------------------------------------------------------------------ bias, Z, tip
    def _bias_set(self, body: bytes) -> bytes:
        (v,) = struct.unpack(">f", body[:4])
        if not np.isfinite(v) or abs(v) > 10:
            raise CommandError(f"bias {v} V out of range (+-10 V)")
        self.bias_v = float(v)
        return b""

    def _bias_get(self, body: bytes) -> bytes:
        return struct.pack(">f", self.bias_v)

    def _setpoint_set(self, body: bytes) -> bytes:
        (a,) = struct.unpack(">f", body[:4])
        if not np.isfinite(a) or a <= 0:
            raise CommandError(f"setpoint {a} A must be positive")
        self.setpoint_a = float(a)
        return b""

    def _setpoint_get(self, body: bytes) -> bytes:
        return struct.pack(">f", self.setpoint_a)

    def _folme_set(self, body: bytes) -> bytes:
        x, y, _wait = struct.unpack(">ddI", body[:20])
        if not np.isfinite([x, y]).all():
            raise CommandError("tip position must be finite")
        self.tip_xy_m = (float(x), float(y))
        return b""

    def _folme_get(self, body: bytes) -> bytes:
        return struct.pack(">dd", *self.tip_xy_m)

    def _bias_pulse(self, body: bytes) -> bytes:
        _wait, width_s, value_v, _hold, abs_rel = struct.unpack(">IffHH", body[:16])
        pulse_v = float(value_v) + (self.bias_v if abs_rel == 1 else 0.0)
        x_nm, y_nm = self.tip_xy_m[0] * 1e9, -self.tip_xy_m[1] * 1e9
        bared = abs(pulse_v) >= self.depassivation_threshold_v and width_s > 0
        if bared:
            with self._stm_lock:
                self.stm.depassivate_nm(np.array([[x_nm, y_nm]], dtype=np.float64))
        self.pulses.append(
            {
                "x_nm": x_nm,
                "y_nm": y_nm,
                "bias_v": pulse_v,
                "width_s": float(width_s),
                "depassivated": float(bared),
            }
        )
        return b""


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None when the peer closed the connection."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> None:  # pragma: no cover - manual use: python -m simulator.nanonis_server --port 6501
    import argparse

    from simulator.frame import SimConfig
    from simulator.instrument import SimulatedSTM

    ap = argparse.ArgumentParser(description="Nanonis-compatible TCP server for the simulated STM")
    ap.add_argument("--port", type=int, default=6501)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="realistic")
    ap.add_argument("--line-period-s", type=float, default=0.0)
    ap.add_argument("--autosave-dir", default=None)
    args = ap.parse_args()
    stm = SimulatedSTM(seed=args.seed, config=SimConfig.preset(args.preset))
    srv = NanonisSimServer(
        stm, port=args.port, line_period_s=args.line_period_s, autosave_dir=args.autosave_dir
    )
    srv.start()
    print(f"simulated Nanonis on {srv.host}:{srv.port}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()


if __name__ == "__main__":  # pragma: no cover
    main()
