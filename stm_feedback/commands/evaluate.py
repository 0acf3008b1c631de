"""``stm-feedback evaluate``: score the networks and/or the classical baseline on a fixed simulator suite."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class SuiteName(str, Enum):
    clean = "clean"
    realistic = "realistic"
    hard = "hard"
    empty = "empty"


class MethodName(str, Enum):
    nets = "nets"
    baseline = "baseline"
    both = "both"
    oracle = "oracle"  # truth copied into an Analysis: a self-test of the metrics, must score ~1.0


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the CLI."""

    @app.command("evaluate")
    def evaluate_cmd(
        suite: Annotated[SuiteName, typer.Option(help="fixed seeded simulator suite")] = SuiteName.realistic,
        n: Annotated[int, typer.Option(help="frames (0 = suite default: clean 20, others 30)")] = 0,
        method: Annotated[MethodName, typer.Option(help="what to score")] = MethodName.both,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="write all metrics and per-frame scores here")
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="settings file (TOML/JSON) for the pipeline")
        ] = None,
        no_bias: Annotated[
            bool,
            typer.Option(
                "--no-bias",
                help="withhold the frames' bias from the analysis: the polarity must come from the frame",
            ),
        ] = False,
    ) -> None:
        """Score atoms, dimers, defects, terraces and row angles against simulator truth; print a markdown
        table with the targets of issue 3 marked pass/fail."""
        from tqdm import tqdm

        from stm_feedback.config import load_settings
        from stm_feedback.errors import ModelError
        from stm_feedback.evaluation import (
            baseline_analyzer,
            evaluate_frames,
            markdown_table,
            nets_analyzer,
            oracle_analysis,
            run_analyzer,
            suite_frames,
        )

        settings = load_settings(config)
        methods = ["nets", "baseline"] if method is MethodName.both else [method.value]
        analyzers = {}
        try:
            for m in methods:
                if m == "nets":
                    analyzers[m] = nets_analyzer(settings)
                elif m == "baseline":
                    analyzers[m] = baseline_analyzer()
        except ModelError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=2) from e
        frames = list(
            tqdm(suite_frames(suite.value, n or None), desc=f"simulating {suite.value}", unit="frame")
        )
        results = []
        for m in methods:
            if m == "oracle":
                fn = lambda f: oracle_analysis(f.truth)  # noqa: E731
            else:
                an = analyzers[m]
                fn = lambda f, an=an: run_analyzer(an, f, no_bias)  # noqa: E731
            with tqdm(total=len(frames), desc=f"{m} on {suite.value}", unit="frame") as bar:
                results.append(
                    evaluate_frames(
                        frames,
                        fn,
                        suite.value,
                        m,
                        progress=lambda *_, b=bar: b.update(1),
                        planner=settings.planner,
                    )
                )
        typer.echo(markdown_table(results))
        if no_bias:
            typer.echo("(bias withheld: each method got bias_v = None)")
        if json_out:
            json_out.write_text(json.dumps([r.to_dict() for r in results], indent=1, default=float))
            typer.echo(f"wrote {json_out}")
