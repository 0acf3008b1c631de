"""stm-feedback: real-time analysis of H-Si(100)-2x1 STM frames (atoms, defects, terraces, safe-to-write sites)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from stm_feedback.schema import Analysis


def analyze(image, pixel_size_nm: float, bias_v: float | None = None, **kwargs) -> Analysis:  # noqa: ANN001
    """Analyse one STM frame (apparent height, nm) at ``pixel_size_nm``; give ``bias_v`` (V) to get write
    sites (without it the polarity is guessed and none are proposed).
    See :func:`stm_feedback.pipeline.analyze`."""
    from stm_feedback.pipeline import analyze as _analyze

    return _analyze(image, pixel_size_nm, bias_v=bias_v, **kwargs)


__all__ = ["analyze", "__version__"]
