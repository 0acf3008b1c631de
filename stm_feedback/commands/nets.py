"""CLI commands of the networks subsystem: ``stm-feedback train {terraces,atoms,defects}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``train`` to app."""

    @app.command("train")
    def train_cmd(
        net: Annotated[str, typer.Argument(help="terraces | atoms | defects")],
        steps: Annotated[int, typer.Option(help="optimiser steps")] = 3000,
        seed: Annotated[int, typer.Option(help="run seed (simulator frame seeds stay < 1_000_000)")] = 0,
        out: Annotated[Path, typer.Option(help="directory for <stem>.pt + <stem>.json")] = Path("models"),
        frames: Annotated[int, typer.Option(help="simulated frames in the training cache")] = 300,
        crop: Annotated[
            int, typer.Option(help="crop side (px at the net's working pixel size, multiple of 8)")
        ] = 64,
        batch: Annotated[int, typer.Option(help="crops per step")] = 8,
        lr: Annotated[float, typer.Option(help="peak learning rate (one-cycle schedule)")] = 2e-3,
        workers: Annotated[int, typer.Option(help="processes simulating the cache")] = 2,
        threads: Annotated[int, typer.Option(help="torch threads")] = 2,
        spec: Annotated[str, typer.Option(help="width preset: default (cheap) | paper")] = "default",
        check: Annotated[
            bool, typer.Option(help="atoms only: F1 self-check on held-out frames afterwards")
        ] = True,
    ) -> None:
        """Train one network on simulator frames and write its weights and JSON spec."""
        import torch

        from stm_feedback.errors import InputError
        from stm_feedback.training import TrainConfig, self_check_atoms, train

        torch.set_num_threads(max(1, threads))
        cfg = TrainConfig(
            net=net,
            steps=steps,
            seed=seed,
            batch=batch,
            crop_px=crop,
            n_frames=frames,
            lr=lr,
            workers=workers,
            spec_preset=spec,
        )
        try:
            model, net_spec, summary = train(cfg, out)
        except InputError as e:
            raise typer.BadParameter(str(e)) from e
        typer.echo(json.dumps({"version": net_spec.version, **summary}, indent=2))
        if check and net == "atoms":
            for preset in ("realistic", "hard"):
                for known in (True, False):
                    typer.echo(json.dumps(self_check_atoms(model, net_spec, preset=preset, bias_known=known)))
