"""Figures of the defect classes (stm_feedback/figures.py): leaf labels, inputs, files written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage

from stm_feedback.errors import InputError
from stm_feedback.figures import _leaf_labels, class_means_png, dendrogram_png
from tests.test_classify import _three_clusters


def test_leaf_labels_name_the_majority_group_of_each_node() -> None:
    x = np.array([[0.0], [0.1], [0.2], [5.0], [5.1]])
    groups = np.array(["a", "a", "b", "c", "c"], dtype=object)
    link = linkage(x, method="ward")
    labels = _leaf_labels(link, groups)
    assert labels[0] == "a 1/1" and labels[3] == "c 1/1"
    assert labels[len(x) + len(link) - 1] in ("a 2/5", "c 2/5")  # the root holds all five
    merged_abc = [v for v in labels.values() if v.endswith("/3")]
    assert merged_abc == ["a 2/3"]  # 0, 1, 2 join before the far pair


def test_dendrogram_and_class_means_write_pngs(tmp_path: Path) -> None:
    x, kinds, truth = _three_clusters()
    x[0, 0] = np.nan  # an undefined feature is left out, not an error
    out = dendrogram_png(x, kinds, tmp_path / "d.png", groups=truth)
    assert out.stat().st_size > 1000
    rng = np.random.default_rng(0)
    patches = rng.normal(0, 0.01, (len(kinds), 12, 12)).astype(np.float32)
    patches[kinds == "protrusion", 6, 6] += 0.5  # a tall class must not hide the others (own colour scale)
    assert class_means_png(patches, kinds, truth, tmp_path / "m.png").stat().st_size > 1000
    with pytest.raises(InputError):
        dendrogram_png(x, kinds, tmp_path / "bad.png", groups=truth[:-1])
    with pytest.raises(InputError):
        class_means_png(patches[:-1], kinds, truth, tmp_path / "bad.png")
