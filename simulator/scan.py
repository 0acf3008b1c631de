"""Scan geometry: where the tip is (sample frame, nm) when it records each pixel, and the inverse map.

Raster: lines top to bottom (slow axis = rows), trace left to right (fast axis = columns); half of each
line time
is the trace, half the retrace (not recorded). Pixel (x, y) at time t sits at
    sample = centre + R(angle) @ ((x - (W-1)/2 + jitter[y]) * s, (y - (H-1)/2) * s) + drift(t)
with s the pixel size (nm) and drift(t) a thermal velocity plus exponential piezo creep after each move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stm_feedback.jitter import FEATURE_SIGMA_NM, feature_offset_px


@dataclass
class Drift:
    """Lateral drift (nm) of the sample under the tip as a function of absolute time t (s).

    drift(t) = velocity * t + sum_k creep_k * (1 - exp(-(t - t_k) / tau_k)) for moves at t_k <= t.
    """

    velocity_nm_per_s: np.ndarray = field(default_factory=lambda: np.zeros(2))
    creep_t0_s: list[float] = field(default_factory=list)
    creep_nm: list[np.ndarray] = field(default_factory=list)
    creep_tau_s: list[float] = field(default_factory=list)

    def add_creep(self, t0_s: float, vec_nm: np.ndarray, tau_s: float) -> None:
        self.creep_t0_s.append(float(t0_s))
        self.creep_nm.append(np.asarray(vec_nm, dtype=np.float64))
        self.creep_tau_s.append(float(tau_s))

    def __call__(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dx_nm, dy_nm) arrays shaped like t_s."""
        t = np.asarray(t_s, dtype=np.float64)
        dx = self.velocity_nm_per_s[0] * t
        dy = self.velocity_nm_per_s[1] * t
        for t0, vec, tau in zip(self.creep_t0_s, self.creep_nm, self.creep_tau_s, strict=True):
            g = 1.0 - np.exp(-np.clip(t - t0, 0.0, None) / tau)
            dx = dx + vec[0] * g
            dy = dy + vec[1] * g
        return dx, dy


@dataclass
class ScanGeometry:
    """One frame's raster in the sample frame (see module docstring)."""

    centre_nm: np.ndarray  # (2,)
    angle_deg: float  # scan rotation: image x axis at this angle in the sample frame
    pixel_size_nm: float
    height_px: int
    width_px: int
    t0_s: float
    line_time_s: float
    jitter_px: np.ndarray  # (H,) lateral offset of each line along the fast axis, pixels
    drift: Drift

    @property
    def frame_time_s(self) -> float:
        return self.height_px * self.line_time_s

    def _rot(self) -> tuple[float, float]:
        a = np.radians(self.angle_deg)
        return float(np.cos(a)), float(np.sin(a))

    def pixel_times_s(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Acquisition time (s) of every pixel of the given rows (default all), shape (len(rows), W)."""
        rows = np.arange(self.height_px) if rows is None else np.asarray(rows)
        frac = np.arange(self.width_px) / self.width_px * 0.5
        return self.t0_s + (rows[:, None] + frac[None, :]) * self.line_time_s

    def sample_coords_nm(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample-frame positions (x_nm, y_nm), each (len(rows), W), the tip visits for those rows."""
        rows = np.arange(self.height_px) if rows is None else np.asarray(rows)
        s = self.pixel_size_nm
        c, sn = self._rot()
        u = (
            np.arange(self.width_px)[None, :] - 0.5 * (self.width_px - 1) + self.jitter_px[rows][:, None]
        ) * s
        v = np.broadcast_to(((rows - 0.5 * (self.height_px - 1)) * s)[:, None], u.shape)
        dx, dy = self.drift(self.pixel_times_s(rows))
        return self.centre_nm[0] + c * u - sn * v + dx, self.centre_nm[1] + sn * u + c * v + dy

    def corners_nm(self, margin_px: float = 2.0) -> np.ndarray:
        """(4, 2) sample-frame corners of the frame (without drift) enlarged by margin_px, plus drift
        range."""
        s = self.pixel_size_nm
        hw = 0.5 * (self.width_px - 1) + margin_px
        hh = 0.5 * (self.height_px - 1) + margin_px
        c, sn = self._rot()
        uv = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]]) * s
        pts = self.centre_nm[None, :] + np.stack(
            [c * uv[:, 0] - sn * uv[:, 1], sn * uv[:, 0] + c * uv[:, 1]], 1
        )
        dx, dy = self.drift(np.array([self.t0_s, self.t0_s + self.frame_time_s]))
        return np.concatenate([pts + [dx[0], dy[0]], pts + [dx[1], dy[1]]])

    def may_be_inside(self, xy_nm: np.ndarray, margin_px: float = 3.0) -> np.ndarray:
        """(N,) bool, conservative: False only for sample points xy_nm (N, 2) that ``to_pixels`` surely maps
        outside the frame (by more than margin_px). One affine pass with the mid-frame drift, widened by the
        largest drift excursion over the frame time (+-10 %) and the largest line jitter."""
        xy = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2)
        s = self.pixel_size_nm
        c, sn = self._rot()
        t_mid = self.t0_s + 0.5 * self.frame_time_s
        t = self.t0_s + np.linspace(-0.1, 1.1, 121) * self.frame_time_s
        dx, dy = self.drift(np.append(t, t_mid))
        excursion_px = float(np.hypot(dx[:-1] - dx[-1], dy[:-1] - dy[-1]).max()) / s
        m = excursion_px + float(np.abs(self.jitter_px).max(initial=0.0)) + margin_px
        px = xy[:, 0] - self.centre_nm[0] - dx[-1]
        py = xy[:, 1] - self.centre_nm[1] - dy[-1]
        x_px = (c * px + sn * py) / s + 0.5 * (self.width_px - 1)
        y_px = (-sn * px + c * py) / s + 0.5 * (self.height_px - 1)
        return (x_px >= -0.5 - m) & (x_px <= self.width_px - 0.5 + m) & (y_px >= -0.5 - m) & (
            y_px <= self.height_px - 0.5 + m
        )

    def to_pixels(
        self, xy_nm: np.ndarray, iterations: int = 4, feature_sigma_nm: float | None = None
    ) -> np.ndarray:
        """(N, 2) pixel positions (x_px, y_px) at which the tip records sample points xy_nm (N, 2).

        Inverts the raster map by fixed-point iteration on the acquisition time (drift is slow, so it
        converges in a few steps). Jitter: the nearest line's offset (where the tip records that very
        point), or with ``feature_sigma_nm`` the offset at which a feature of that apparent radius centred
        there is recorded (``stm_feedback.jitter.feature_offset_px``; ``feature_pixels``).
        """
        xy = np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2)
        s = self.pixel_size_nm
        c, sn = self._rot()
        t = np.full(len(xy), self.t0_s + 0.5 * self.frame_time_s)
        x_px = y_px = np.zeros(len(xy))
        for _ in range(iterations):
            dx, dy = self.drift(t)
            px = xy[:, 0] - self.centre_nm[0] - dx
            py = xy[:, 1] - self.centre_nm[1] - dy
            u = (c * px + sn * py) / s
            v = (-sn * px + c * py) / s
            y_px = v + 0.5 * (self.height_px - 1)
            if feature_sigma_nm is None:
                jit = self.jitter_px[np.clip(np.round(y_px), 0, self.height_px - 1).astype(np.int64)]
            else:
                jit = feature_offset_px(self.jitter_px, y_px, self.pixel_size_nm, feature_sigma_nm)
            x_px = u + 0.5 * (self.width_px - 1) - jit
            t = self.t0_s + (y_px + np.clip(x_px, 0, self.width_px) / self.width_px * 0.5) * self.line_time_s
        return np.stack([x_px, y_px], axis=1)

    def feature_pixels(self, xy_nm: np.ndarray) -> np.ndarray:
        """(N, 2) pixel positions (x_px, y_px) of the recorded centres of features (atoms, dimers, defects)
        centred at sample points xy_nm (N, 2): ``to_pixels`` with the profile-weighted jitter of the lines
        an atom-sized feature covers. The ground truth's positions; on a jitter-free frame the same as
        ``to_pixels``."""
        return self.to_pixels(xy_nm, feature_sigma_nm=FEATURE_SIGMA_NM)
