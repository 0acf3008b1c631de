"""Typed errors shared by the library, the CLI and the daemon (the daemon maps them to protocol error codes)."""

from __future__ import annotations


class StmFeedbackError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(StmFeedbackError, ValueError):
    """The caller's input is unusable: wrong dtype/shape, non-finite values, absurd pixel size, unknown format."""


class ModelError(StmFeedbackError, RuntimeError):
    """Model weights or specs are missing or incompatible."""
