"""Package-level behaviour: the CLI is wired and the settings object reads the environment."""

from __future__ import annotations

from typer.testing import CliRunner

from stm_feedback.cli import app
from stm_feedback.config import load_settings
from stm_feedback.physics import DEFECT_CLASSES, KINDS


def test_cli_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_settings_env_override(monkeypatch) -> None:
    monkeypatch.setenv("STM_FEEDBACK_SERVER__BIND", "tcp://127.0.0.1:6001")
    assert load_settings().server.bind == "tcp://127.0.0.1:6001"
    assert load_settings(server__max_inflight=3).server.max_inflight == 3


def test_defect_taxonomy_kinds() -> None:
    assert all(c.kind in KINDS for c in DEFECT_CLASSES.values())
    assert {c.kind for c in DEFECT_CLASSES.values()} == set(KINDS)
