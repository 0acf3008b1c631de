"""Typed errors shared by the library, the CLI and the daemon (the daemon maps them to protocol error codes)."""

from __future__ import annotations


class StmFeedbackError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(StmFeedbackError, ValueError):
    """The caller's input is unusable: wrong dtype/shape, non-finite values, absurd pixel size, unknown format."""


class ModelError(StmFeedbackError, RuntimeError):
    """Model weights or specs are missing or incompatible."""


class ProtocolError(StmFeedbackError):
    """A daemon request cannot be served; ``code`` is one of ``stm_feedback.protocol.ERROR_CODES``."""

    def __init__(
        self, code: str, message: str, request_id: object = None, request_type: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.request_type = request_type


class ServerError(StmFeedbackError):
    """The daemon answered a request with a typed error reply ``{code, message}`` (client side)."""

    def __init__(self, code: str, message: str, request_id: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class ServerUnavailable(StmFeedbackError, TimeoutError):
    """No reply from the daemon within the timeout after all retries (client side, Lazy Pirate gave up)."""
