"""CLI commands of the networks subsystem: ``stm-feedback train {terraces,atoms,defects}``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``nets-latency`` to app."""

    @app.command("nets-check")
    def check_cmd(
        models_dir: Annotated[Path, typer.Option(help="weights + specs to check")] = Path("models"),
        frames: Annotated[int, typer.Option(help="held-out frames per preset (seeds from 950000)")] = 6,
        size: Annotated[int, typer.Option(help="frame side (px)")] = 128,
        threshold: Annotated[float, typer.Option(help="atom-map peak threshold")] = 0.25,
    ) -> None:
        """Quick atom-net self-check (F1 at 0.10 nm; the official numbers come from `evaluate`)."""
        import torch

        from stm_feedback.nets import load_model
        from stm_feedback.training import self_check_atoms

        torch.set_num_threads(2)
        net, spec = load_model(models_dir, "atoms")
        for preset in ("realistic", "hard"):
            for known in (True, False):
                r = self_check_atoms(net, spec, frames, size, preset, known, threshold)
                typer.echo(json.dumps(r))

    @app.command("nets-latency")
    def latency_cmd(
        models_dir: Annotated[Path, typer.Option(help="weights + specs to time")] = Path("models"),
        spec: Annotated[
            str, typer.Option(help="'trained' (models_dir) or an untrained preset: default | paper")
        ] = "trained",
        size: Annotated[int, typer.Option(help="frame side (px)")] = 256,
        pixel_size_nm: Annotated[float, typer.Option(help="frame pixel size (nm)")] = 0.1,
        n: Annotated[int, typer.Option(help="timed repetitions")] = 50,
        threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    ) -> None:
        """Latency (p50/p95 ms) of each network and of the whole ModelRunner.predict (PyTorch, CPU)."""
        import torch

        from stm_feedback.nets import NET_NAMES, build_net, load_model, spec_preset
        from stm_feedback.runner import ModelRunner, measure_latency

        torch.set_num_threads(max(1, threads))
        if spec == "trained":
            runner = ModelRunner.from_dir(models_dir, device="cpu", threads=threads)
        else:
            nets = {name: (build_net(spec_preset(name, spec)), spec_preset(name, spec)) for name in NET_NAMES}
            runner = ModelRunner(nets, device="cpu", threads=threads)
        res = measure_latency(runner, size, pixel_size_nm, n)
        from stm_feedback.nets import count_gflop
        from stm_feedback.preprocess import resampled_shape

        for name, s in runner.specs.items():  # machine-independent cost next to the (load-dependent) times
            h, w = resampled_shape((size, size), pixel_size_nm, s.pixel_size_nm)
            m = s.pool_multiple
            net = build_net(s).eval() if spec != "trained" else load_model(models_dir, name)[0]
            res[name]["gflop"] = round(count_gflop(net, -(-h // m) * m, -(-w // m) * m), 3)
        typer.echo(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", err=True)
        typer.echo(
            json.dumps(
                {
                    "spec": spec,
                    "threads": torch.get_num_threads(),
                    "size_px": size,
                    "pixel_size_nm": pixel_size_nm,
                    "backend": runner.backend,
                    **res,
                },
                indent=2,
            )
        )

    @app.command("quantize")
    def quantize_cmd(
        models_dir: Annotated[Path, typer.Option(help="weights + specs to quantise")] = Path("models"),
        frames: Annotated[int, typer.Option(help="calibration frames (simulator seeds 4000000+)")] = 60,
        preset: Annotated[str, typer.Option(help="NNCF preset: performance | mixed")] = "performance",
        out: Annotated[Path | None, typer.Option(help="output dir (default MODELS_DIR/int8)")] = None,
        nets: Annotated[
            str, typer.Option(help="nets to quantise, comma-separated ('' = terraces,atoms: NN-2 stays bf16)")
        ] = "",
    ) -> None:
        """INT8 OpenVINO IRs of the nets (NNCF post-training quantisation on simulator frames) in
        MODELS_DIR/int8; the OpenVINO backend runs each one that matches its weights
        (settings.models.int8)."""
        from stm_feedback.errors import ModelError
        from stm_feedback.quantize import DEFAULT_NETS, quantize_models

        names = tuple(n.strip() for n in nets.split(",") if n.strip()) or DEFAULT_NETS
        try:
            written = quantize_models(
                models_dir, n_frames=frames, out_dir=out, progress=typer.echo, nets=names, preset=preset
            )
        except ModelError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        typer.echo(json.dumps({n: str(p) for n, p in written.items()}))

    @app.command("nets-calibrate")
    def calibrate_cmd(
        models_dir: Annotated[Path, typer.Option(help="weights + specs whose maps are thresholded")] = Path(
            "models"
        ),
        frames: Annotated[int, typer.Option(help="frames per preset (seeds from 960000)")] = 6,
        size: Annotated[int, typer.Option(help="frame side (px)")] = 256,
    ) -> None:
        """Sweep the post-processing thresholds (atom, defect, step) on training-range frames; print JSON."""
        from stm_feedback.training import calibrate_thresholds

        typer.echo(json.dumps(calibrate_thresholds(models_dir, n_frames=frames, size_px=size), indent=1))

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
        widths: Annotated[str, typer.Option(help="override widths, e.g. 16,32,32,64 ('' = preset)")] = "",
        convs: Annotated[int, typer.Option(help="override convs per U-Net level (0 = preset)")] = 0,
        stem: Annotated[
            int, typer.Option(help="override the U-Net space-to-depth stem factor 1|2|4 (0 = preset)")
        ] = 0,
        init: Annotated[Path | None, typer.Option(help="start from the weights in this models dir")] = None,
        teacher: Annotated[
            Path | None,
            typer.Option(help="distil from this models dir's net of the same name (e.g. a cheaper student)"),
        ] = None,
        teacher_weight: Annotated[float, typer.Option(help="weight of the loss against the teacher")] = 1.0,
        sim_presets: Annotated[
            str, typer.Option(help="simulator presets mixed in the cache, e.g. training,realistic")
        ] = "training",
        p_axis_rows: Annotated[
            float, typer.Option(help="atoms: fraction of frames rotated so the rows run along x or y")
        ] = 0.0,
        class_weights: Annotated[
            str, typer.Option(help="defects: cross-entropy weights background,protrusion,depression")
        ] = "1,4,8",
        frame_pixel_size: Annotated[
            str,
            typer.Option(help="pixel-size range 'LO,HI' (nm) of the cache frames ('' = the net's default)"),
        ] = "",
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
            widths=tuple(int(v) for v in widths.split(",")) if widths else None,
            convs_per_level=convs or None,
            stem=stem or None,
            init_from=init,
            teacher_from=teacher,
            teacher_weight=teacher_weight,
            sim_presets=tuple(p.strip() for p in sim_presets.split(",") if p.strip()),
            p_axis_rows=p_axis_rows,
            defect_class_weights=_class_weights(class_weights),
            pixel_size_range_nm=_pixel_range(frame_pixel_size) if frame_pixel_size else None,
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


def _class_weights(text: str) -> tuple[float, float, float]:
    """'1,4,8' -> (1.0, 4.0, 8.0): three positive finite weights (background, protrusion, depression)."""
    try:
        w = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"--class-weights must be three numbers, got {text!r}") from e
    if len(w) != 3 or not all(0 < v < float("inf") for v in w):
        raise typer.BadParameter(f"--class-weights must be three positive numbers, got {text!r}")
    return w[0], w[1], w[2]


def _pixel_range(text: str) -> tuple[float, float]:
    """'0.09,0.14' -> (0.09, 0.14): a pixel-size range in nm within the 0.02-0.5 nm/px frames we accept."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"--frame-pixel-size must be 'LO,HI' in nm, got {text!r}") from e
    if not 0.02 <= lo <= hi <= 0.5:
        raise typer.BadParameter(f"--frame-pixel-size needs 0.02 <= LO <= HI <= 0.5 nm, got {text!r}")
    return lo, hi
