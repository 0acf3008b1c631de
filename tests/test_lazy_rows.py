"""``Analysis.with_lazy_rows``: atoms and dimers built on first access, and their JSON rows straight from the
columns (issue 6), indistinguishable from an Analysis built with the lists."""

from __future__ import annotations

import copy
import pickle
from dataclasses import asdict, fields, replace

import pytest

from stm_feedback.schema import Analysis, Atom, Dimer, ImageInfo
from stm_feedback.server import analysis_json

ATOMS = ([1.5, 2.25, 3.0], [4.0, 5.125, 6.5], [0, 1, -1], [0.9, 0.5, 0.31])
DIMERS = ([10.0, 11.5], [12.0, 13.25], [0, 1], [3, -1])


def _lazy() -> Analysis:
    return Analysis.with_lazy_rows(
        atoms=ATOMS, dimers=DIMERS, image=ImageInfo(8, 8, 0.1), timings_ms={"a": 1.0}
    )


def _eager() -> Analysis:
    return Analysis(
        image=ImageInfo(8, 8, 0.1),
        atoms=[Atom(*r) for r in zip(*ATOMS, strict=True)],
        dimers=[Dimer(*r) for r in zip(*DIMERS, strict=True)],
        timings_ms={"a": 1.0},
    )


def test_lazy_equals_eager() -> None:
    assert _lazy() == _eager()
    assert _lazy().to_json_dict() == _eager().to_json_dict()
    assert asdict(_lazy()).keys() == asdict(_eager()).keys()
    lazy = _lazy()
    assert lazy.atoms[1] == Atom(2.25, 5.125, 1, 0.5) and lazy.atoms is lazy.atoms  # built once
    assert lazy.dimers[1] == Dimer(11.5, 13.25, 1, -1)
    assert repr(_lazy()) == repr(_eager())


def test_json_rows_match_asdict_and_field_order() -> None:
    lazy = _lazy()
    for name, cls in (("atoms", Atom), ("dimers", Dimer)):
        rows = lazy.json_rows(name)
        assert rows == [asdict(o) for o in getattr(_eager(), name)]
        assert all(list(r) == [f.name for f in fields(cls)] for r in rows)  # key order = field order
    lazy.atoms  # noqa: B018 - built now: no more rows from the columns
    assert lazy.json_rows("atoms") is None and lazy.json_rows("dimers") is not None


def test_analysis_json_equal_with_and_without_columns() -> None:
    want = _eager().to_json_dict()
    got = analysis_json(_lazy())
    assert got == want and list(got) == list(want)
    assert analysis_json(_eager()) == want


def test_assignment_copy_pickle_replace() -> None:
    a = _lazy()
    a.atoms = [Atom(0.0, 0.0, 0, 1.0)]  # the user's list wins over the columns
    assert a.atoms == [Atom(0.0, 0.0, 0, 1.0)] and a.json_rows("atoms") is None
    assert a.to_json_dict()["atoms"] == [{"x_px": 0.0, "y_px": 0.0, "terrace": 0, "score": 1.0}]
    for b in (pickle.loads(pickle.dumps(_lazy())), copy.deepcopy(_lazy()), copy.copy(_lazy())):
        assert b == _eager()
    assert replace(_lazy(), sites=[]) == _eager()
    a = _lazy()
    b = copy.copy(a)
    assert a.atoms == _eager().atoms and b.atoms == _eager().atoms  # a shallow copy keeps its own columns
    assert b.json_rows("dimers") == a.json_rows("dimers") is not None
    with pytest.raises(AttributeError):
        _lazy().no_such_field  # noqa: B018


def test_pipeline_output_reply_bytes_equal_with_built_objects() -> None:
    """A real pipeline analysis (oracle maps of a simulated frame): the reply built from the columns is
    byte-identical to the one built from the Atom / Dimer objects."""
    from stm_feedback.config import Settings
    from stm_feedback.pipeline import Pipeline
    from stm_feedback.server import encode_reply
    from tests.test_pipeline_oracle import oracle_maps, simulate

    f = simulate(3, 128, 0.1)
    a = Pipeline(Settings()).analyze_maps(
        f.image_nm, oracle_maps(f.image_nm, f.truth, f.bias_v), 0.1, f.bias_v
    )
    assert a.json_rows("atoms") and a.json_rows("dimers")  # not built yet, and not empty
    lazy_payload = {"analysis": analysis_json(a)}
    built = copy.copy(a)
    assert len(built.atoms) == len(lazy_payload["analysis"]["atoms"]) and built.json_rows("atoms") is None
    built.dimers  # noqa: B018
    built_payload = {"analysis": analysis_json(built)}
    assert built_payload == lazy_payload == {"analysis": a.to_json_dict()}
    lazy_frames = encode_reply(1, "analyze", lazy_payload, None, lambda: {"total": 1.0})
    built_frames = encode_reply(1, "analyze", built_payload, None, lambda: {"total": 1.0})
    assert [bytes(x) for x in lazy_frames] == [bytes(x) for x in built_frames]
