"""CLI commands of this subsystem (registered by stm_feedback.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to app (none yet)."""
