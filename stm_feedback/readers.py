"""STM file readers: ``read_frame(path) -> Frame`` for ``.npy``, Nanonis ``.sxm``, Gwyddion ``.gwy`` and
Omicron MATRIX ``*.Z_mtrx`` topographs, plus ``write_sxm`` (a minimal Nanonis writer for tests and the demo).

Every reader returns the topograph as float32 (H, W) apparent height in nm with row 0 = top of the image,
square pixels (resampled along y if the file's pixels are not square) and the pixel size in nm.
Incomplete scans keep NaN in unscanned lines (``meta["nan_fraction"]``); the analysis rejects non-finite
input.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stm_feedback.errors import InputError

SUPPORTED_SUFFIXES: tuple[str, ...] = (".npy", ".sxm", ".gwy", ".z_mtrx")
_SXM_END_TAG = b":SCANIT_END:"
_SXM_DATA_MARK = b"\x1a\x04"
_LENGTH_TO_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3, "a": 0.1, "Å": 0.1}


@dataclass
class Frame:
    """One topograph: ``image`` float32 (H, W) in nm (row = y, col = x), square pixels of ``pixel_size_nm``.

    ``bias_v`` sample bias in V (negative = filled states), ``scan_angle_deg`` the scan-frame rotation in
    degrees, ``setpoint_pa`` the tunnelling-current setpoint in pA, ``source`` the file path or instrument.
    """

    image: np.ndarray
    pixel_size_nm: float
    bias_v: float | None = None
    scan_angle_deg: float = 0.0
    setpoint_pa: float | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height_px(self) -> int:
        return int(self.image.shape[0])

    @property
    def width_px(self) -> int:
        return int(self.image.shape[1])


def is_supported(path: str | Path) -> bool:
    """True if ``read_frame`` knows the file's format by its suffix (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def read_frame(path: str | Path, pixel_size_nm: float | None = None, bias_v: float | None = None) -> Frame:
    """Read one topograph. ``pixel_size_nm`` / ``bias_v`` override the file's metadata (required for a bare
    ``.npy`` without a ``<name>.meta.json`` sidecar). Raises ``InputError`` for unknown formats, missing pixel
    size and unreadable or corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            frame = _read_npy(p)
        elif suffix == ".sxm":
            frame = _read_sxm(p)
        elif suffix == ".gwy":
            frame = _read_gwy(p)
        elif suffix == ".z_mtrx":
            frame = _read_matrix(p)
        else:
            raise InputError(f"{p}: unknown format {p.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    except InputError:
        raise
    except Exception as exc:  # third-party parsers raise anything on corrupt files; give the caller one type
        raise InputError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from exc
    if pixel_size_nm is not None:
        frame.pixel_size_nm = float(pixel_size_nm)
    if bias_v is not None:
        frame.bias_v = float(bias_v)
    return _validated(frame)


def _validated(frame: Frame) -> Frame:
    img = frame.image
    if img is None or img.ndim != 2 or min(img.shape) < 2:
        shape = None if img is None else img.shape
        raise InputError(f"{frame.source}: expected a 2-D image, got shape {shape}")
    px = frame.pixel_size_nm
    if px is None or not math.isfinite(px) or not 0 < px < 1e4:
        raise InputError(
            f"{frame.source}: missing or absurd pixel size {frame.pixel_size_nm!r} nm "
            "(give pixel_size_nm or a <name>.meta.json sidecar)"
        )
    frame.image = np.ascontiguousarray(img, dtype=np.float32)
    frame.meta.setdefault("nan_fraction", float(np.mean(~np.isfinite(frame.image))))
    frame.pixel_size_nm = float(frame.pixel_size_nm)
    return frame


def _square_pixels(image: np.ndarray, pixel_x_nm: float, pixel_y_nm: float) -> np.ndarray:
    """Resample along y so that pixels are square with side ``pixel_x_nm`` (no-op within 0.1 %)."""
    if abs(pixel_y_nm / pixel_x_nm - 1.0) < 1e-3:
        return image
    import cv2

    new_h = max(2, round(image.shape[0] * pixel_y_nm / pixel_x_nm))
    return cv2.resize(image.astype(np.float32), (image.shape[1], new_h), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------------- .npy
def _read_npy(p: Path) -> Frame:
    image = np.load(p, allow_pickle=False)
    meta: dict[str, Any] = {}
    sidecar = p.with_name(p.name[: -len(p.suffix)] + ".meta.json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{sidecar}: invalid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise InputError(f"{sidecar}: expected a JSON object")
    if not np.issubdtype(image.dtype, np.number):
        raise InputError(f"{p}: non-numeric array dtype {image.dtype}")
    return Frame(
        image=image,
        pixel_size_nm=meta.get("pixel_size_nm"),  # type: ignore[arg-type]  # validated by _validated
        bias_v=meta.get("bias_v"),
        scan_angle_deg=float(meta.get("scan_angle_deg", 0.0)),
        setpoint_pa=meta.get("setpoint_pa"),
        source=str(p),
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------------- .sxm
def parse_sxm_header(text: str) -> dict[str, str]:
    """``{TAG: raw value text}`` of a Nanonis .sxm header (``:TAG:`` lines followed by value lines)."""
    out: dict[str, list[str]] = {}
    key: str | None = None
    for line in text.splitlines():
        m = re.fullmatch(r":(.+):", line.strip()) if line.startswith(":") else None
        if m:
            key = m.group(1)
            out[key] = []
        elif key is not None:
            out[key].append(line)
    return {k: "\n".join(v).strip("\n") for k, v in out.items()}


def _sxm_table(raw: str) -> list[dict[str, str]]:
    rows = [r.strip("\r").strip("\t").split("\t") for r in raw.splitlines() if r.strip()]
    if not rows:
        return []
    head = [h.strip() for h in rows[0]]
    return [dict(zip(head, (c.strip() for c in r), strict=False)) for r in rows[1:]]


def _read_sxm(p: Path) -> Frame:
    raw = p.read_bytes()
    end = raw.find(_SXM_END_TAG)
    if end < 0:
        raise InputError(f"{p}: not a Nanonis .sxm file (no :SCANIT_END: tag)")
    mark = raw.find(_SXM_DATA_MARK, end)
    if mark < 0:
        raise InputError(f"{p}: corrupt .sxm (no \\x1a\\x04 data marker after the header)")
    hdr = parse_sxm_header(raw[:end].decode("latin-1"))
    try:
        nx, ny = (int(v) for v in hdr["SCAN_PIXELS"].split())
        range_x_m, range_y_m = (float(v) for v in hdr["SCAN_RANGE"].split())
    except (KeyError, ValueError) as exc:
        raise InputError(f"{p}: .sxm header lacks a valid SCAN_PIXELS / SCAN_RANGE ({exc})") from exc
    channels = _sxm_table(hdr.get("DATA_INFO", ""))
    if not channels:
        raise InputError(f"{p}: .sxm header has no DATA_INFO channel table")
    byte_order = ">" if "MSBFIRST" in hdr.get("SCANIT_TYPE", "FLOAT MSBFIRST").upper() else "<"
    n_floats = (len(raw) - mark - 2) // 4
    data = np.frombuffer(raw, dtype=f"{byte_order}f4", count=n_floats, offset=mark + 2)
    # layout: per channel the forward image, then (if "both") the backward one, each ny*nx in scan order
    offset = 0
    z_fwd: np.ndarray | None = None
    z_unit = "m"
    for ch in channels:
        n_dir = 2 if ch.get("Direction", "both").lower() == "both" else 1
        if ch.get("Name") == "Z" and z_fwd is None:
            if (offset + 1) * nx * ny > data.size:
                raise InputError(f"{p}: truncated .sxm data ({data.size} floats for {nx}x{ny} pixels)")
            z_fwd = data[offset * nx * ny : (offset + 1) * nx * ny].reshape(ny, nx)
            z_unit = ch.get("Unit", "m")
        offset += n_dir
    if z_fwd is None:
        names = [c.get("Name") for c in channels]
        raise InputError(f"{p}: no 'Z' channel in .sxm (channels: {names})")
    if offset * nx * ny > data.size:
        raise InputError(f"{p}: truncated .sxm data ({data.size} floats, header promises {offset * nx * ny})")
    scale = _LENGTH_TO_NM.get(z_unit, None)
    if scale is None:
        raise InputError(f"{p}: Z channel unit {z_unit!r} is not a length")
    image = z_fwd.astype(np.float32) * np.float32(scale)
    if hdr.get("SCAN_DIR", "down").strip().lower() == "up":
        image = image[::-1]  # stored in scan order; an upward scan starts at the bottom line
    pixel_x_nm, pixel_y_nm = range_x_m / nx * 1e9, range_y_m / ny * 1e9
    image = _square_pixels(image, pixel_x_nm, pixel_y_nm)
    bias = _first_float(hdr.get("BIAS")) if "BIAS" in hdr else _first_float(hdr.get("Bias>Bias (V)"))
    angle = _first_float(hdr.get("SCAN_ANGLE")) or 0.0
    return Frame(
        image=image,
        pixel_size_nm=pixel_x_nm,
        bias_v=bias,
        scan_angle_deg=angle,
        setpoint_pa=_sxm_setpoint_pa(hdr),
        source=str(p),
        meta={
            "format": "sxm",
            "scan_dir": hdr.get("SCAN_DIR", "").strip(),
            "scan_offset_m": hdr.get("SCAN_OFFSET", "").split(),
            "pixel_size_y_nm": pixel_y_nm,
            "rec_date": hdr.get("REC_DATE", "").strip(),
            "rec_time": hdr.get("REC_TIME", "").strip(),
        },
    )


def _first_float(text: str | None) -> float | None:
    if not text:
        return None
    m = re.search(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text)
    return float(m.group(0)) if m else None


def _sxm_setpoint_pa(hdr: dict[str, str]) -> float | None:
    """Current setpoint in pA from ``Z-Controller>Setpoint`` or the Z-CONTROLLER table (value in A)."""
    for key in ("Z-Controller>Setpoint",):
        if key in hdr:
            v = _first_float(hdr[key])
            return None if v is None else v * 1e12
    rows = _sxm_table(hdr.get("Z-CONTROLLER", ""))
    if rows and "Setpoint" in rows[0]:
        v = _first_float(rows[0]["Setpoint"])
        return None if v is None else v * 1e12
    return None


def write_sxm(
    path: str | Path,
    image_nm: np.ndarray,
    pixel_size_nm: float,
    bias_v: float = -2.0,
    setpoint_pa: float = 50.0,
    scan_angle_deg: float = 0.0,
    scan_dir: str = "down",
    center_nm: tuple[float, float] = (0.0, 0.0),
) -> Path:
    """Write ``image_nm`` (H, W, row 0 = top) as a minimal Nanonis .sxm with one channel ``Z`` (m, forward and
    backward, big-endian float32) following the Nanonis file-format description."""
    img = np.asarray(image_nm, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"write_sxm: expected a 2-D image, got shape {img.shape}")
    ny, nx = img.shape
    stored = img[::-1] if scan_dir == "up" else img  # scan order
    z_m = (stored * 1e-9).astype(">f4")
    header = "\n".join(
        [
            ":NANONIS_VERSION:",
            "2",
            ":SCANIT_TYPE:",
            "              FLOAT            MSBFIRST",
            ":REC_DATE:",
            "01.01.2025",
            ":REC_TIME:",
            "00:00:00",
            ":ACQ_TIME:",
            "       60.0",
            ":SCAN_PIXELS:",
            f"       {nx}       {ny}",
            ":SCAN_FILE:",
            str(path),
            ":SCAN_TIME:",
            "             1.000E+0             1.000E+0",
            ":SCAN_RANGE:",
            f"           {nx * pixel_size_nm * 1e-9:.9E}           {ny * pixel_size_nm * 1e-9:.9E}",
            ":SCAN_OFFSET:",
            f"             {center_nm[0] * 1e-9:.6E}         {center_nm[1] * 1e-9:.6E}",
            ":SCAN_ANGLE:",
            f"            {scan_angle_deg:.3E}",
            ":SCAN_DIR:",
            scan_dir,
            ":BIAS:",
            f"            {bias_v:.4E}",
            ":Z-CONTROLLER:",
            "\tName\ton\tSetpoint\tP-gain\tI-gain\tT-const",
            f"\tlog Current\t1\t{setpoint_pa * 1e-12:.3E} A\t1.000E-12 m\t1.000E-9 m/s\t1.000E-3 s",
            ":COMMENT:",
            "written by stm_feedback.readers.write_sxm",
            ":DATA_INFO:",
            "\tChannel\tName\tUnit\tDirection\tCalibration\tOffset",
            "\t14\tZ\tm\tboth\t1.000E+0\t0.000E+0",
            "",
            ":SCANIT_END:",
            "",
            "",
            "",
        ]
    )
    out = Path(path)
    backward = z_m[:, ::-1]  # Nanonis stores the backward image in its own scan order (x reversed)
    out.write_bytes(header.encode("latin-1") + _SXM_DATA_MARK + z_m.tobytes() + backward.tobytes())
    return out


# ---------------------------------------------------------------------------------------------------- .gwy
def _read_gwy(p: Path) -> Frame:
    import gwyfile

    obj = gwyfile.load(str(p))
    fields = [(k, v) for k, v in obj.items() if re.fullmatch(r"/\d+/data", k)]
    if not fields:
        raise InputError(f"{p}: no data field in .gwy container")
    fields.sort(key=lambda kv: int(kv[0].split("/")[1]))
    key, dfield = fields[0]
    data = np.asarray(dfield.data, dtype=np.float64)
    xy_unit = _gwy_unit(dfield.get("si_unit_xy"))
    z_unit = _gwy_unit(dfield.get("si_unit_z"))
    xy_scale = _LENGTH_TO_NM.get(xy_unit)
    z_scale = _LENGTH_TO_NM.get(z_unit)
    if xy_scale is None or z_scale is None:
        raise InputError(f"{p}: data field units xy={xy_unit!r} z={z_unit!r} are not lengths")
    yres, xres = data.shape
    pixel_x_nm = float(dfield["xreal"]) / xres * xy_scale
    pixel_y_nm = float(dfield["yreal"]) / yres * xy_scale
    image = _square_pixels((data * z_scale).astype(np.float32), pixel_x_nm, pixel_y_nm)
    title = obj.get(f"{key}/title", "")
    return Frame(
        image=image,
        pixel_size_nm=pixel_x_nm,
        source=str(p),
        meta={"format": "gwy", "channel": key, "title": title, "pixel_size_y_nm": pixel_y_nm},
    )


def _gwy_unit(unit: Any) -> str:
    """Unit string of a GwySIUnit (Gwyddion omits empty units; a bare field means metres by convention)."""
    if unit is None:
        return "m"
    return str(unit.get("unitstr", "") or "m")


# ---------------------------------------------------------------------------------------------------- MATRIX
def _read_matrix(p: Path) -> Frame:
    """Omicron MATRIX result file ``<name>--<session>_<cycle>.Z_mtrx``; needs its ``<name>_0001.mtrx``
    parameter chain next to it (access2theMatrix reads both)."""
    import access2thematrix

    mtrx = access2thematrix.MtrxData()
    traces, message = mtrx.open(str(p))
    if not traces:
        raise InputError(f"{p}: MATRIX reader: {message}")
    im, message = mtrx.select_image(traces[0])
    data = getattr(im, "data", None)
    if data is None or not hasattr(im, "width"):
        raise InputError(f"{p}: MATRIX reader: {message}")
    data = np.asarray(data, dtype=np.float64)
    unit = (mtrx.channel_name_and_unit or ["", "m"])[1] or "m"
    z_scale = _LENGTH_TO_NM.get(unit)
    if z_scale is None:
        raise InputError(f"{p}: MATRIX channel unit {unit!r} is not a length")
    ny, nx = data.shape
    pixel_x_nm = float(im.width) / nx * 1e9
    pixel_y_nm = float(im.height) / ny * 1e9
    image = _square_pixels((data * z_scale).astype(np.float32), pixel_x_nm, pixel_y_nm)

    def param(key: str) -> float | None:
        v = mtrx.param.get(key)
        return float(v[0]) if v is not None else None

    setpoint_a = param("EEPA::Regulator.Setpoint_1")
    return Frame(
        image=image,
        pixel_size_nm=pixel_x_nm,
        bias_v=param("EEPA::GapVoltageControl.Voltage"),
        scan_angle_deg=float(getattr(im, "angle", 0.0) or 0.0),
        setpoint_pa=None if setpoint_a is None else setpoint_a * 1e12,
        source=str(p),
        meta={"format": "matrix", "trace": str(traces[0]), "pixel_size_y_nm": pixel_y_nm},
    )
