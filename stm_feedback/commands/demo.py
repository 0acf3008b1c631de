"""``stm-feedback demo``: the main job on the embedded default (a simulated STM session)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("demo-out"), help="Output folder for previews and summaries."),
        n: int = typer.Option(3, help="Number of frames to scan."),
        seed: int = typer.Option(7, help="Seed of the virtual sample."),
    ) -> None:
        """Scan a few frames of the simulated STM and write PNG previews plus a one-line summary per frame."""
        from stm_feedback.demo import run_demo

        run_demo(out, n_frames=n, seed=seed)
