"""The daemon's reply path without per-row objects (issue 6, session 4): atoms and dimers packed and
unpacked as fixed-layout msgpack records (``protocol.pack_rows`` / ``unpack_rows``), byte-identical to
packing the dicts; the reply equal to main's code path (``to_json_dict`` + ``build_reply``) on the same
frame; the client's ``Analysis`` equal to ``Analysis.from_json_dict`` of the plain msgpack decode."""

from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest
from test_server_doubles import DeterministicTestAnalyzer

from stm_feedback.client import Client, _analysis
from stm_feedback.config import ServerSettings
from stm_feedback.protocol import (
    ROW_FIELDS,
    AnalyzeRequest,
    Rows,
    build_reply,
    pack_rows,
    packb,
    parse_reply,
    unpack_reply_header,
    unpack_rows,
)
from stm_feedback.schema import Analysis, ImageInfo
from stm_feedback.server import Server, encode_reply, pack_analysis


def _rows(name: str, cols: list[list]) -> list[dict]:
    keys = [k for k, _ in ROW_FIELDS[name]]
    return [dict(zip(keys, r, strict=True)) for r in zip(*cols, strict=True)]


def _cols(n: int, rng: np.random.Generator, lo: int = -32, hi: int = 127) -> list[list]:
    xs = np.round(rng.random(n) * 300, 3).tolist()
    ys = (rng.standard_normal(n) * 1e5).tolist()  # full-precision floats, negative too
    ints = rng.integers(lo, hi + 1, n).tolist()
    score = np.round(rng.random(n), 4).tolist()
    if n >= 4:
        xs[:4] = [0.0, -0.0, 1e300, 5e-324]
        ints[:2] = [lo, hi]
    return [xs, ys, ints, score]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])  # msgpack array headers: fix, 16-, 32-bit
@pytest.mark.parametrize("name", ["atoms", "dimers"])
def test_pack_rows_is_packb_of_the_dicts_and_unpacks_back(name: str, n: int) -> None:
    cols = _cols(n, np.random.default_rng(n))
    if name == "dimers":  # row index: an int
        cols[3] = cols[2][::-1]
    got = pack_rows(ROW_FIELDS[name], cols)
    assert got is not None and bytes(got) == packb(_rows(name, cols))
    assert msgpack.unpackb(got) == _rows(name, cols)
    header_len = len(msgpack.Packer().pack_array_header(n))
    back = unpack_rows(got, header_len, n, ROW_FIELDS[name])
    assert back == cols and all(
        type(v) is type(w) for c, d in zip(back, cols, strict=True) for v, w in zip(c, d, strict=True)
    )
    assert str(back[0][1:2]) == str(cols[0][1:2])  # -0.0 stays negative zero


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c[2].__setitem__(0, 128),  # uint8 in msgpack: 2 bytes
        lambda c: c[2].__setitem__(0, -33),  # int8: 2 bytes
        lambda c: c[2].__setitem__(0, True),  # bool packs as true/false
        lambda c: c[2].__setitem__(0, 2**70),  # too big for int64
        lambda c: c[0].__setitem__(0, 3),  # an int among the floats
        lambda c: c[1].__setitem__(0, np.float64(1.5)),  # a numpy scalar
        lambda c: c[3].pop(),  # ragged columns
    ],
)
def test_pack_rows_declines_other_layouts(change) -> None:  # noqa: ANN001 - a callable
    cols = _cols(20, np.random.default_rng(1))
    change(cols)
    assert pack_rows(ROW_FIELDS["atoms"], cols) is None


def test_unpack_rows_declines_bytes_in_another_layout() -> None:
    cols = _cols(20, np.random.default_rng(2))
    cols[2][5] = 200  # packb writes 0xcc 0xc8 for this row: the records no longer line up
    raw = packb(_rows("atoms", cols))
    assert unpack_rows(raw, 3, 20, ROW_FIELDS["atoms"]) is None
    assert unpack_rows(raw, 3, 10_000, ROW_FIELDS["atoms"]) is None  # runs past the end
    h = unpack_reply_header(packb({"v": 1, "analysis": {"atoms": _rows("atoms", cols), "dimers": []}}))
    assert type(h["analysis"]["atoms"]) is list and h["analysis"]["atoms"] == _rows("atoms", cols)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x81", b"\x90", packb([1, 2]), packb({"a": 1}) + b"\x01", packb({"analysis": 3}), b"\xc1"],
)
def test_unpack_reply_header_is_unpackb_on_anything_else(raw: bytes) -> None:
    try:
        want = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        with pytest.raises(type(exc)):
            unpack_reply_header(raw)
    else:
        assert unpack_reply_header(raw) == want


def _pipeline_analysis() -> Analysis:
    """A real pipeline analysis (oracle maps of a simulated frame), atoms and dimers still columns."""
    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline
    from tests.test_pipeline_oracle import oracle_maps, simulate

    f = simulate(3, 128, 0.1)
    a = Pipeline(Settings()).analyze_maps(
        f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), 0.1, f.bias_v
    )
    assert a.lazy_columns("atoms") and a.lazy_columns("dimers") and len(a.defects) > 0
    return a


def test_reply_bytes_equal_mains_code_path_and_client_analysis_equal() -> None:
    """The same frame through main's reply path (``to_json_dict`` + ``build_reply``) and this one
    (``Server._after_analysis`` with ``pack_analysis`` + ``encode_reply``): identical header bytes; the
    client gets the same ``Analysis`` as ``from_json_dict`` of the plain decode, atoms built lazily."""
    a = _pipeline_analysis()
    built = copy.copy(a)
    built.atoms, built.dimers  # noqa: B018 - the objects: json rows are no longer columns
    assert pack_analysis(a) == packb(a.to_json_dict()) == pack_analysis(built)

    srv = Server(DeterministicTestAnalyzer(), ServerSettings(warmup_px=0), warm_up=False)
    h = AnalyzeRequest.model_validate(
        {
            "v": 1,
            "type": "analyze",
            "id": "r1",
            "pixel_size_nm": 0.1,
            "instrument_id": "s",
            "frame_id": "f",
            "arrays": [{"name": "image", "dtype": "<f4", "shape": [128, 128], "frame": 0}],
        }
    )
    image = np.zeros((128, 128), np.float32)
    payload = srv._after_analysis(h, image, a)
    mains = {**payload, "analysis": a.to_json_dict()}
    timings = {"decode": 0.1, "total": 2.0}
    for arrays in (None, a.maps()):
        got = encode_reply("r1", "analyze", payload, arrays, lambda: dict(timings))
        ref = build_reply("r1", "analyze", mains, dict(timings), arrays)
        assert [bytes(x) for x in got] == [bytes(x) for x in ref]
        header, maps = parse_reply(got)
        plain = msgpack.unpackb(bytes(got[0]), raw=False, strict_map_key=False)
        assert header == plain and isinstance(header["analysis"]["atoms"], Rows)
        assert len(header["analysis"]["atoms"]) == len(plain["analysis"]["atoms"])
        assert list(header["analysis"]["dimers"]) == plain["analysis"]["dimers"]
        got_a = _analysis(header, maps)
        want_maps = (
            {"terrace_labels": maps["terrace_labels"], "safe_mask": maps["safe_mask"].astype(bool)}
            if maps
            else None
        )
        want_a = Analysis.from_json_dict(plain["analysis"], want_maps)
        assert got_a.lazy_columns("atoms") is not None  # not built by the client
        assert got_a.to_json_dict() == want_a.to_json_dict() == a.to_json_dict()
        assert got_a.atoms == want_a.atoms and got_a.dimers == want_a.dimers
        if arrays:
            assert np.array_equal(got_a.safe_mask, a.safe_mask)
            assert np.array_equal(got_a.terrace_labels, a.terrace_labels)
    srv._drift_pool.shutdown()


class _FixedAnalyzer(DeterministicTestAnalyzer):
    """Answers every frame with one fixed analysis (atoms / dimers as columns, like the pipeline's)."""

    def __init__(self, analysis: Analysis) -> None:
        super().__init__()
        self.analysis = analysis

    def analyze(self, image, pixel_size_nm, bias_v=None, frame_id=None) -> Analysis:  # noqa: ANN001
        out = copy.copy(self.analysis)
        out.image = copy.copy(out.image)
        out.image.frame_id = frame_id
        return out


def test_client_over_the_socket_gets_mains_analysis() -> None:
    a = _pipeline_analysis()
    with Server(_FixedAnalyzer(a), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*") as srv:
        with Client(srv.endpoint, timeout_ms=10_000, retries=0) as c:
            got = c.analyze(np.zeros((128, 128), np.float32), 0.1, frame_id="f7")
            assert got.lazy_columns("atoms") is not None and got.lazy_columns("dimers") is not None
            want = a.to_json_dict()
            want["image"]["frame_id"] = "f7"
            assert got.to_json_dict() == want
            assert got.atoms == a.atoms and got.dimers == a.dimers
            assert np.array_equal(got.safe_mask, a.safe_mask)
            # last_reply keeps the msgpack content: rows compare equal to the lists of dicts
            assert c.last_reply["analysis"]["atoms"] == want["atoms"]
            assert len(c.last_reply["analysis"]["dimers"]) == len(want["dimers"])


def test_state_is_recorded_before_the_reply_leaves() -> None:
    """Ordering guarantee (docs/protocol.md): the instrument state and drift of a frame are updated before
    its reply is sent, so any request sent after the reply arrived (query_sites, stats) sees that frame and
    the same drift as the reply. The collection between frames runs after the send and changes nothing."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(96, 96)).astype(np.float32)
    with Server(DeterministicTestAnalyzer(), ServerSettings(warmup_px=0), bind="tcp://127.0.0.1:*") as srv:
        with Client(srv.endpoint, timeout_ms=10_000, retries=0) as c:
            for i in range(4):
                c.analyze(np.roll(base, i, axis=1), 0.1, instrument_id="stm1", frame_id=f"f{i}")
                drift = c.last_reply["drift"]
                assert drift["frames"] == i + 1
                c.query_sites("stm1")
                assert c.last_reply["frame_id"] == f"f{i}" and c.last_reply["drift"] == drift
                assert c.stats()["instruments"]["stm1"] == drift


def test_numpy_columns_equal_list_columns_everywhere() -> None:
    """The pipeline hands its columns over as numpy arrays (float32 / float64, int32 / int64): objects,
    JSON rows and packed bytes are those of the lists ``tolist()`` gives."""
    rng = np.random.default_rng(9)
    n = 300
    arrays = (
        np.round(rng.random(n) * 256, 3),
        np.round(rng.random(n) * 256, 3).astype(np.float32),
        rng.integers(-1, 6, n).astype(np.int32),
        np.round(rng.random(n), 4).astype(np.float32),
    )
    dim_arrays = (arrays[0][:50], arrays[1][:50], rng.integers(-1, 6, 50), rng.integers(-1, 40, 50))
    lists = tuple(a.tolist() for a in arrays)
    dim_lists = tuple(a.tolist() for a in dim_arrays)
    info = {"image": ImageInfo(64, 64, 0.1)}
    from_np = Analysis.with_lazy_rows(atoms=arrays, dimers=dim_arrays, **info)
    from_lists = Analysis.with_lazy_rows(atoms=lists, dimers=dim_lists, **info)
    assert from_np.json_rows("atoms") == from_lists.json_rows("atoms") is not None
    assert from_np.json_rows("dimers") == from_lists.json_rows("dimers") is not None
    assert pack_analysis(from_np) == pack_analysis(from_lists) == packb(copy.copy(from_lists).to_json_dict())
    assert from_np.atoms == from_lists.atoms and type(from_np.atoms[0].score) is float
    assert type(from_np.atoms[0].terrace) is int and from_np.dimers == from_lists.dimers
    # arrays the fixed layout cannot hold fall back to the dicts, with the same bytes
    wide = Analysis.with_lazy_rows(atoms=arrays, dimers=(*dim_arrays[:3], dim_arrays[3] + 200), **info)
    assert pack_analysis(wide) == packb(copy.copy(wide).to_json_dict())
    assert pack_rows(ROW_FIELDS["atoms"], (*arrays[:3], arrays[3] > 0.5)) is None  # bool: not a number


def test_poisson_isf_is_scipys() -> None:
    """``drift.poisson_isf`` (the defect pairing's significance threshold, on the reply path) equals
    ``scipy.stats.poisson.isf`` over the q and mu the daemon uses, and at the edges."""
    from scipy.stats import poisson

    from stm_feedback.drift import MIN_PAIRS, poisson_isf, significant_count

    qs = [1e-3 / t for t in (1, 2, 3, 10, 57, 400, 10_000, 250_000)] + [0.5, 1e-12, 0.999999]
    mus = [0.0, 1e-12, 1e-6, 1e-3, 0.05, 0.5, 1.0, 2.5, 7.0, 33.3, 150.0, 1e4]
    mus += np.random.default_rng(4).uniform(0, 60, 200).tolist()
    for q in qs:
        for mu in mus:
            want = poisson.isf(q, mu)
            got = poisson_isf(q, mu)
            assert got == want or (np.isnan(got) and np.isnan(want)), (q, mu, got, want)
    for q, mu in ((0.0, 1.0), (1.0, 1.0), (0.5, -1.0)):  # outside: scipy itself answers
        assert np.array_equal(poisson_isf(q, mu), poisson.isf(q, mu), equal_nan=True)
    for chance, trials in ((0.0, 1), (0.2, 1), (12.5, 300), (40.0, 5000)):
        want = max(MIN_PAIRS, int(poisson.isf(1e-3 / trials, chance)) + 1)  # main's formula
        assert significant_count(chance, trials) == want
