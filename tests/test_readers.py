"""Readers: every format round-trips a known image with its metadata; bad input raises InputError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stm_feedback.errors import InputError
from stm_feedback.readers import Frame, parse_sxm_header, read_frame, write_sxm


def _test_image(h: int = 24, w: int = 32) -> np.ndarray:
    """An asymmetric image (a ramp plus a bump near the top-left) so flips and transposes are caught."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.01 * x + 0.002 * y + 0.3 * np.exp(-((x - 5) ** 2 + (y - 3) ** 2) / 4.0)).astype(np.float32)


def test_npy_with_argument(tmp_path: Path) -> None:
    img = _test_image()
    np.save(tmp_path / "a.npy", img)
    frame = read_frame(tmp_path / "a.npy", pixel_size_nm=0.1, bias_v=-1.8)
    assert isinstance(frame, Frame)
    assert frame.image.dtype == np.float32 and frame.image.shape == (24, 32)
    np.testing.assert_array_equal(frame.image, img)
    assert frame.pixel_size_nm == pytest.approx(0.1) and frame.bias_v == pytest.approx(-1.8)


def test_npy_with_sidecar(tmp_path: Path) -> None:
    img = _test_image().astype(np.float64)
    np.save(tmp_path / "b.npy", img)
    (tmp_path / "b.meta.json").write_text(json.dumps({"pixel_size_nm": 0.08, "bias_v": 2.0}))
    frame = read_frame(tmp_path / "b.npy")
    assert frame.pixel_size_nm == pytest.approx(0.08) and frame.bias_v == pytest.approx(2.0)
    assert frame.image.dtype == np.float32
    # the argument wins over the sidecar
    assert read_frame(tmp_path / "b.npy", pixel_size_nm=0.2).pixel_size_nm == pytest.approx(0.2)


def test_npy_without_pixel_size_raises(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", _test_image())
    with pytest.raises(InputError, match="pixel size"):
        read_frame(tmp_path / "c.npy")


def test_npy_bad_sidecar_and_bad_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", _test_image())
    (tmp_path / "d.meta.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_frame(tmp_path / "d.npy")
    np.save(tmp_path / "e.npy", np.zeros(10, np.float32))
    with pytest.raises(InputError, match="2-D"):
        read_frame(tmp_path / "e.npy", pixel_size_nm=0.1)


@pytest.mark.parametrize("scan_dir", ["down", "up"])
def test_sxm_roundtrip(tmp_path: Path, scan_dir: str) -> None:
    img = _test_image(20, 30)
    path = write_sxm(
        tmp_path / "s.sxm", img, 0.125, bias_v=-2.1, setpoint_pa=40.0, scan_angle_deg=12.5, scan_dir=scan_dir
    )
    frame = read_frame(path)
    np.testing.assert_allclose(frame.image, img, rtol=1e-5, atol=1e-6)
    assert frame.pixel_size_nm == pytest.approx(0.125)
    assert frame.bias_v == pytest.approx(-2.1)
    assert frame.scan_angle_deg == pytest.approx(12.5)
    assert frame.setpoint_pa == pytest.approx(40.0)
    assert frame.meta["scan_dir"] == scan_dir


def test_sxm_data_layout_is_big_endian_float32_metres(tmp_path: Path) -> None:
    """Check the writer against the spec independently of our reader: header, \\x1a\\x04, >f4 in metres."""
    img = _test_image(4, 6)
    raw = write_sxm(tmp_path / "l.sxm", img, 0.1).read_bytes()
    head, _, data = raw.partition(b":SCANIT_END:")
    start = data.index(b"\x1a\x04") + 2
    z = np.frombuffer(data[start:], ">f4")
    assert z.size == 2 * 4 * 6  # forward + backward
    np.testing.assert_allclose(z[:24].reshape(4, 6), img * 1e-9, rtol=1e-6)
    np.testing.assert_allclose(z[24:].reshape(4, 6)[:, ::-1], img * 1e-9, rtol=1e-6)
    hdr = parse_sxm_header(head.decode("latin-1"))
    assert hdr["SCAN_PIXELS"].split() == ["6", "4"]


def test_sxm_with_nanonispy_header_parser(tmp_path: Path) -> None:
    """Independent peer for the header: nanonispy finds our end tag and data offset (its float parsing uses
    np.float, removed in numpy >= 1.24, so only the format-independent parts are exercised)."""
    from nanonispy.read import NanonisFile

    img = _test_image(8, 8)
    path = write_sxm(tmp_path / "n.sxm", img, 0.1)
    nf = NanonisFile(str(path))
    assert nf.filetype == "scan"
    # nanonispy.Scan skips 4 bytes after the end-tag line: "\n\n\x1a\x04", then reads >f4 to the end
    z = np.frombuffer(path.read_bytes()[nf.byte_offset + 4 :], ">f4")
    assert z.size == 2 * 64
    np.testing.assert_allclose(z[:64].reshape(8, 8), img * 1e-9, rtol=1e-6)


def test_sxm_non_square_pixels_resampled(tmp_path: Path) -> None:
    img = _test_image(10, 20)
    path = write_sxm(tmp_path / "r.sxm", img, 0.1)
    # rewrite the range so y pixels are twice as tall: the reader must resample to square 0.1 nm pixels
    raw = path.read_bytes()
    old = f"{20 * 0.1 * 1e-9:.9E}           {10 * 0.1 * 1e-9:.9E}".encode()
    new = f"{20 * 0.1 * 1e-9:.9E}           {10 * 0.2 * 1e-9:.9E}".encode()
    assert old in raw
    path.write_bytes(raw.replace(old, new))
    frame = read_frame(path)
    assert frame.image.shape == (20, 20) and frame.pixel_size_nm == pytest.approx(0.1)


def test_sxm_corrupt(tmp_path: Path) -> None:
    path = write_sxm(tmp_path / "t.sxm", _test_image(), 0.1)
    raw = path.read_bytes()
    (tmp_path / "trunc.sxm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_frame(tmp_path / "trunc.sxm")
    (tmp_path / "junk.sxm").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InputError, match="SCANIT_END"):
        read_frame(tmp_path / "junk.sxm")
    (tmp_path / "noz.sxm").write_bytes(raw.replace(b"\tZ\tm\t", b"\tX\tm\t"))
    with pytest.raises(InputError, match="no 'Z' channel"):
        read_frame(tmp_path / "noz.sxm")


def test_gwy_roundtrip(tmp_path: Path) -> None:
    from gwyfile.objects import GwyContainer, GwyDataField

    img = _test_image(16, 24).astype(np.float64)
    container = GwyContainer()
    container["/0/data/title"] = "Topo"
    container["/0/data"] = GwyDataField(
        img * 1e-9, xreal=24 * 0.09e-9, yreal=16 * 0.09e-9, si_unit_xy="m", si_unit_z="m"
    )
    container["/1/data/title"] = "Current"
    container["/1/data"] = GwyDataField(
        np.ones((4, 4)), xreal=1e-9, yreal=1e-9, si_unit_xy="m", si_unit_z="A"
    )
    path = tmp_path / "g.gwy"
    container.tofile(str(path))
    frame = read_frame(path)
    np.testing.assert_allclose(frame.image, img, rtol=1e-5, atol=1e-7)
    assert frame.pixel_size_nm == pytest.approx(0.09)
    assert frame.meta["title"] == "Topo"


def test_gwy_corrupt(tmp_path: Path) -> None:
    (tmp_path / "bad.gwy").write_bytes(b"GWYPgarbage\x00\x00\x01")
    with pytest.raises(InputError):
        read_frame(tmp_path / "bad.gwy")


def test_matrix_error_path(tmp_path: Path) -> None:
    """A valid MATRIX pair (result file + parameter chain) is impractical to write; check the typed error."""
    path = tmp_path / "default_2025Jan01-000000_STM-STM_AtomManipulation--1_1.Z_mtrx"
    path.write_bytes(b"ONTMATRX0101garbage")
    with pytest.raises(InputError, match="MATRIX"):
        read_frame(path)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.tiff").write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="unknown format"):
        read_frame(tmp_path / "x.tiff")
    with pytest.raises(InputError, match="no such file"):
        read_frame(tmp_path / "missing.sxm")
    # InputError is a ValueError for callers that catch the builtin
    assert issubclass(InputError, ValueError)
