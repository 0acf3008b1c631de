"""A virtual STM: a seeded, lazily generated ~1 um^2 H-Si(100) sample that can be scanned, drifts, and can be
written on (hydrogen lithography).

The sample is fixed by the seed: steps are drawn once, defects per 16 nm tile from a tile-specific seed, so a
rescan of the same area shows the same defects, displaced only by drift. Time advances with every scanned
line;
drift (thermal velocity + piezo creep after each move) persists across frames. Lithography bares the dimers
nearest the given positions: the next scan shows them as bright bare dimers (litho_patch truth,
dimer_bare=True).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simulator.config import SimConfig, sample_params
from simulator.defects import Defect, appearance_for, place_defects
from simulator.frame import SimFrame, jitter_lines
from simulator.imaging import acquire
from simulator.scan import Drift, ScanGeometry
from simulator.surface import Surface, make_surface
from stm_feedback.errors import InputError
from stm_feedback.physics import ROW_SPACING_NM, SURFACE_LATTICE_NM

TILE_NM = 16.0
TILE_KEEP_OUT_NM = 1.6  # defect seeds stay this far inside their tile so footprints never cross tiles
# session-wide appearance parameters (the sample and imaging mode do not change between scans)
_SESSION_KEYS = (
    "atom_amp_nm",
    "atom_sigma_along_nm",
    "atom_sigma_across_nm",
    "row_amp_nm",
    "row_sigma_empty_nm",
    "step_width_nm",
    "density_scale",
    "line_time_s",
    "drift_nm_per_min",
    "drift_angle_deg",
)


@dataclass
class ScanLine:
    """One recorded scan line: its row index, heights z_nm (W,) and pixel acquisition times t_s (W,)."""

    index: int
    z_nm: np.ndarray
    t_s: np.ndarray


class SimulatedSTM:
    """The virtual microscope. Sample coordinates are nm in the sample frame, centred on the sample."""

    def __init__(
        self,
        seed: int = 0,
        config: SimConfig | None = None,
        sample_size_nm: float = 1000.0,
        bias_v: float = -2.0,
        setpoint_pa: float = 50.0,
    ) -> None:
        self.seed = int(seed)
        self.config = config if config is not None else SimConfig.preset("realistic")
        self.sample_size_nm = float(sample_size_nm)
        rng = np.random.default_rng([self.seed, 0])
        self.session_params = {k: sample_params(rng, self.config)[k] for k in _SESSION_KEYS}
        n_steps = int(rng.integers(2, 9))  # 1 um with terraces of ~100-500 nm
        self.surface: Surface = make_surface(
            rng,
            n_steps,
            np.zeros(2),
            self.sample_size_nm / 0.45 * 0.5,
            step_width_nm=self.session_params["step_width_nm"],
        )
        v = self.session_params["drift_nm_per_min"] / 60.0
        a = math.radians(self.session_params["drift_angle_deg"])
        self.drift = Drift(velocity_nm_per_s=np.array([v * math.cos(a), v * math.sin(a)]))
        self._creep_rng = np.random.default_rng([self.seed, 1])
        self._tiles: dict[tuple[int, int], list[Defect]] = {}
        self._bare: dict[int, set[tuple[int, int]]] = {}
        self.t_s = 0.0
        self.bias_v = float(bias_v)
        self.setpoint_pa = float(setpoint_pa)
        self._n_scans = 0
        self._frame: dict = {}
        self.set_frame(0.0, 0.0, 25.6, 256, 0.0)
        self.last_frame: SimFrame | None = None
        self.last_geometry: ScanGeometry | None = None

    # ------------------------------------------------------------------ frame
    def set_frame(
        self, center_x_nm: float, center_y_nm: float, size_nm: float, pixels: int, angle_deg: float = 0.0
    ) -> None:
        """Move/zoom the scan: square frame of size_nm and pixels x pixels, rotated by angle_deg. A move
        starts
        piezo creep along it (2-5 % of the move, exponential)."""
        if not (8 <= int(pixels) <= 4096):
            raise InputError(f"pixels must be in [8, 4096], got {pixels}")
        if not (math.isfinite(size_nm) and 0.4 <= size_nm <= 2000.0):
            raise InputError(f"size_nm must be in [0.4, 2000], got {size_nm}")
        lim = 0.5 * self.sample_size_nm
        if not (abs(center_x_nm) <= lim and abs(center_y_nm) <= lim):
            raise InputError(f"frame centre ({center_x_nm}, {center_y_nm}) nm is off the +-{lim} nm sample")
        new = np.array([center_x_nm, center_y_nm], dtype=np.float64)
        if self._frame:
            move = new - self._frame["centre"]
            if np.hypot(*move) > 0:
                gamma = self._creep_rng.uniform(0.02, 0.05)
                self.drift.add_creep(self.t_s, gamma * move, self._creep_rng.uniform(5.0, 30.0))
        self._frame = {
            "centre": new,
            "size_nm": float(size_nm),
            "pixels": int(pixels),
            "angle": float(angle_deg),
        }

    @property
    def pixel_size_nm(self) -> float:
        return self._frame["size_nm"] / self._frame["pixels"]

    # ------------------------------------------------------------------ sample
    def _tile_defects(self, tx: int, ty: int) -> list[Defect]:
        key = (tx, ty)
        if key not in self._tiles:
            rng = np.random.default_rng([self.seed, 2, tx + 1_000_000, ty + 1_000_000])
            k = TILE_KEEP_OUT_NM
            x0, y0 = tx * TILE_NM, ty * TILE_NM
            inner = (TILE_NM - 2 * k) ** 2
            self._tiles[key] = place_defects(
                rng,
                self.surface,
                (x0 + k, x0 + TILE_NM - k, y0 + k, y0 + TILE_NM - k),
                self.config.density_per_100nm2,
                density_scale=self.session_params["density_scale"] * TILE_NM**2 / inner,
                nb_dispersion=self.config.nb_dispersion,
                p_cluster=self.config.p_cluster,
            )
        return self._tiles[key]

    def defects_in_box(self, box_nm: tuple[float, float, float, float]) -> list[Defect]:
        """Native defects plus lithographic patches whose seeds lie in the sample box (x0, x1, y0, y1), copies
        with fresh ids 1..N."""
        x0, x1, y0, y1 = box_nm
        out: list[Defect] = []
        taken: dict[int, set[tuple[int, int]]] = {}
        for tx in range(math.floor(x0 / TILE_NM), math.floor(x1 / TILE_NM) + 1):
            for ty in range(math.floor(y0 / TILE_NM), math.floor(y1 / TILE_NM) + 1):
                for d in self._tile_defects(tx, ty):
                    out.append(Defect(**{**d.__dict__}))
                    taken.setdefault(d.terrace, set()).update(d.dimers)
        out += self._litho_defects(box_nm, taken)
        for k, d in enumerate(out, start=1):
            d.id = k
        return out

    def _litho_defects(
        self, box_nm: tuple[float, float, float, float], taken: dict[int, set[tuple[int, int]]]
    ) -> list[Defect]:
        """Bare dimers grouped into litho_patch defects: contiguous runs along one row."""
        x0, x1, y0, y1 = box_nm
        out = []
        for n, cells in self._bare.items():
            lat = self.surface.lattice(n)
            free = sorted(c for c in cells if c not in taken.get(n, set()))
            runs: list[list[tuple[int, int]]] = []
            for i, j in sorted(free, key=lambda c: (c[1], c[0])):
                if runs and runs[-1][-1] == (i - 1, j):
                    runs[-1].append((i, j))
                else:
                    runs.append([(i, j)])
            for run in runs:
                c = lat.dimer_centres_nm(np.array([run[0][0]]), np.array([run[0][1]]))[0]
                if not (x0 <= c[0] <= x1 and y0 <= c[1] <= y1):
                    continue
                d = Defect(cls="litho_patch", terrace=n, dimers=list(run), bare=list(run))
                appearance_for(
                    np.random.default_rng([self.seed, 3, n, run[0][0] + 10**7, run[0][1] + 10**7]), d
                )
                out.append(d)
        return out

    # ------------------------------------------------------------------ scanning
    def _geometry(self, rng: np.random.Generator, jitter_lambda_px: float) -> ScanGeometry:
        f = self._frame
        return ScanGeometry(
            centre_nm=f["centre"].copy(),
            angle_deg=f["angle"],
            pixel_size_nm=self.pixel_size_nm,
            height_px=f["pixels"],
            width_px=f["pixels"],
            t0_s=self.t_s,
            line_time_s=self.session_params["line_time_s"],
            jitter_px=jitter_lines(rng, f["pixels"], jitter_lambda_px),
            drift=self.drift,
        )

    def _render(self) -> tuple[SimFrame, ScanGeometry]:
        self._n_scans += 1
        rng = np.random.default_rng([self.seed, 4, self._n_scans])
        params = sample_params(rng, self.config)
        params.update(self.session_params)
        geom = self._geometry(rng, params["jitter_lambda_px"])
        c = geom.corners_nm(margin_px=2.0 / geom.pixel_size_nm)
        defects = self.defects_in_box((c[:, 0].min(), c[:, 0].max(), c[:, 1].min(), c[:, 1].max()))
        params.update(
            seed=self.seed,
            scan_index=self._n_scans,
            pixel_size_nm=geom.pixel_size_nm,
            size_px=[geom.height_px, geom.width_px],
            bias_v=self.bias_v,
            setpoint_pa=self.setpoint_pa,
            scan_angle_deg=geom.angle_deg,
            centre_nm=[float(geom.centre_nm[0]), float(geom.centre_nm[1])],
            t0_s=geom.t0_s,
        )
        image, truth = acquire(self.surface, defects, geom, params, rng, self.bias_v)
        return SimFrame(image_nm=image, truth=truth, bias_v=self.bias_v), geom

    def scan_lines(self) -> Iterator[ScanLine]:
        """Scan the current frame line by line (top to bottom); the clock advances with every line.

        ``last_frame`` holds the whole frame being scanned as soon as the first line is yielded.
        """
        frame, geom = self._render()
        self.last_frame, self.last_geometry = frame, geom
        for y in range(geom.height_px):
            t = geom.pixel_times_s(np.array([y]))[0]
            self.t_s = geom.t0_s + (y + 1) * geom.line_time_s
            yield ScanLine(index=y, z_nm=frame.image_nm[y], t_s=t)

    def scan(self) -> SimFrame:
        """Scan the whole current frame and return it (truth in frame pixels)."""
        for _ in self.scan_lines():
            pass
        assert self.last_frame is not None
        return self.last_frame

    # ------------------------------------------------------------------ coordinates
    def _geom_for_maps(self) -> ScanGeometry:
        if self.last_geometry is not None:
            return self.last_geometry
        return self._geometry(np.random.default_rng(0), 0.0)

    def frame_to_sample_nm(self, xy_px: np.ndarray) -> np.ndarray:
        """Sample positions (N, 2) nm seen at pixels xy_px (N, 2) of the last scanned frame (drift
        included)."""
        g = self._geom_for_maps()
        xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
        s = g.pixel_size_nm
        a = math.radians(g.angle_deg)
        row = np.clip(np.round(xy[:, 1]).astype(np.int64), 0, g.height_px - 1)
        u = (xy[:, 0] - 0.5 * (g.width_px - 1) + g.jitter_px[row]) * s
        v = (xy[:, 1] - 0.5 * (g.height_px - 1)) * s
        t = g.t0_s + (xy[:, 1] + np.clip(xy[:, 0], 0, g.width_px) / g.width_px * 0.5) * g.line_time_s
        dx, dy = g.drift(t)
        return np.stack(
            [
                g.centre_nm[0] + math.cos(a) * u - math.sin(a) * v + dx,
                g.centre_nm[1] + math.sin(a) * u + math.cos(a) * v + dy,
            ],
            axis=1,
        )

    def sample_to_frame_px(self, xy_nm: np.ndarray) -> np.ndarray:
        """Pixels (N, 2) of the last scanned frame at which sample points xy_nm (N, 2) were seen."""
        return self._geom_for_maps().to_pixels(np.asarray(xy_nm, dtype=np.float64).reshape(-1, 2))

    # ------------------------------------------------------------------ lithography
    def depassivate_nm(self, sample_xy_nm: np.ndarray) -> np.ndarray:
        """Bare the dimer nearest each sample position (N, 2) nm. Returns the bared dimers' sample
        centres (K, 2);
        points over vacancies/adatoms (no dimer to bare) are skipped."""
        xy = np.asarray(sample_xy_nm, dtype=np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(xy)):
            raise InputError("depassivation positions must be finite")
        terr = self.surface.terrace_at(xy[:, 0], xy[:, 1])[0]
        done = []
        for (x, y), n in zip(xy, terr, strict=True):
            lat = self.surface.lattice(int(n))
            a, b = lat.to_lattice(np.array(x), np.array(y))
            i, j = int(np.round(a / SURFACE_LATTICE_NM)), int(np.round(b / ROW_SPACING_NM))
            tx, ty = math.floor(x / TILE_NM), math.floor(y / TILE_NM)
            blocked = any(
                (i, j) in d.dimers and d.terrace == n
                for ox in (-1, 0, 1)
                for oy in (-1, 0, 1)
                for d in self._tile_defects(tx + ox, ty + oy)
                if d.removed or d.cls == "adatom_cluster"
            )
            if blocked:
                continue
            self._bare.setdefault(int(n), set()).add((i, j))
            done.append(lat.dimer_centres_nm(np.array([i]), np.array([j]))[0])
        return np.array(done).reshape(-1, 2)

    def depassivate_px(self, frame_xy_px: np.ndarray) -> np.ndarray:
        """Bare the dimers nearest pixel positions (N, 2) of the last scanned frame; returns sample
        centres."""
        return self.depassivate_nm(self.frame_to_sample_nm(frame_xy_px))
