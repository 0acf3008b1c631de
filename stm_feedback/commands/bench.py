"""``stm-feedback bench``: speed of the whole analysis (stm_feedback/benchmark.py, docs/performance.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``bench`` to app."""

    @app.command("bench")
    def bench_cmd(
        size: Annotated[int, typer.Option(help="Frame side (px) at 0.1 nm/px.")] = 256,
        frames: Annotated[int, typer.Option(help="Timed frames (after warm-up).")] = 200,
        warmup: Annotated[int, typer.Option(help="Untimed warm-up frames.")] = 20,
        daemon: Annotated[
            bool, typer.Option("--daemon/--no-daemon", help="Also time a `serve` subprocess over ZeroMQ.")
        ] = True,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON.")] = None,
        markdown_out: Annotated[
            Path | None, typer.Option("--markdown", help="Write the tables as markdown.")
        ] = None,
        models_dir: Annotated[Path | None, typer.Option(help="Weights + specs (default: settings).")] = None,
        backend: Annotated[
            str | None, typer.Option(help="auto | openvino | torch | torch-eager (default: settings).")
        ] = None,
        threads: Annotated[int | None, typer.Option(help="Inference threads (0 = library default).")] = None,
        large_size: Annotated[int, typer.Option(help="Side (px) of the large-frame run.")] = 512,
        large_frames: Annotated[int, typer.Option(help="Timed large frames (0 = skip).")] = 50,
        archive_frames: Annotated[int, typer.Option(help="Frames of the throughput run (0 = skip).")] = 100,
        baseline_frames: Annotated[int, typer.Option(help="Frames for the paper-nets eager baseline.")] = 30,
        distinct_frames: Annotated[
            int, typer.Option(help="Simulate only this many distinct frames and cycle (0 = all distinct).")
        ] = 0,
        equivalence_frames: Annotated[
            int,
            typer.Option(
                help="Frames per suite (realistic, hard) for the backend equivalence check (30 = whole suites)."
            ),
        ] = 30,
        candidates: Annotated[
            bool, typer.Option(help="Also time candidate net widths/resolutions (random weights).")
        ] = False,
    ) -> None:
        """Per-stage and end-to-end latency (p50/p95/p99 ms) in-process and through the daemon, 512 px and
        archive throughput, and the ratio against the paper's nets in PyTorch eager fp32."""
        import json

        from stm_feedback.backends import BACKEND_CHOICES
        from stm_feedback.benchmark import BenchOptions, format_markdown, format_report, run_benchmark

        if backend is not None and backend not in BACKEND_CHOICES:
            raise typer.BadParameter(f"backend must be one of {BACKEND_CHOICES}", param_hint="--backend")
        opts = BenchOptions(
            size_px=size,
            frames=frames,
            warmup=warmup,
            daemon=daemon,
            models_dir=models_dir,
            backend=backend,
            threads=threads,
            large_size_px=large_size,
            large_frames=large_frames,
            archive_frames=archive_frames,
            baseline_frames=baseline_frames,
            distinct_frames=distinct_frames,
            candidates=candidates,
            equivalence_frames=equivalence_frames,
        )
        result = run_benchmark(opts, progress=lambda m: typer.echo(f"[bench] {m}", err=True))
        typer.echo(format_report(result))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
            typer.echo(f"wrote {json_out}")
        if markdown_out is not None:
            markdown_out.parent.mkdir(parents=True, exist_ok=True)
            markdown_out.write_text(format_markdown(result))
            typer.echo(f"wrote {markdown_out}")
