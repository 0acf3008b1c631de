"""``stm-feedback simulate``: write simulated H-Si(100) frames with ground truth and previews."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate(
        out: Annotated[Path, typer.Option(help="Output folder.")],
        n: Annotated[int, typer.Option(min=1, help="Number of frames.")] = 4,
        size: Annotated[int, typer.Option(min=8, help="Frame side, pixels.")] = 256,
        pixel_size_nm: Annotated[float, typer.Option(help="Pixel size, nm.")] = 0.1,
        seed: Annotated[int, typer.Option(min=0, help="Seed of the first frame (frame k: seed + k).")] = 0,
        preset: Annotated[str, typer.Option(help="clean | realistic | hard | training")] = "realistic",
        bias_v: Annotated[
            float | None, typer.Option(help="Sample bias, V (default: drawn by the preset).")
        ] = None,
    ) -> None:
        """Write <name>.npy (float32 nm), .json (truth), .npz (masks), .meta.json and .png per frame."""
        from simulator.frame import SimConfig, simulate_frame
        from simulator.io import write_frame
        from stm_feedback.errors import InputError

        try:
            cfg = SimConfig.preset(preset)
            for k in range(n):
                frame = simulate_frame(seed + k, size, pixel_size_nm, cfg, bias_v=bias_v)
                name = f"sim_{preset}_{seed + k:07d}"
                write_frame(out, name, frame)
                t = frame.truth
                typer.echo(
                    f"{name}: {len(t.atoms_xy_px)} atoms, {len(t.dimers_xy_px)} dimers, "
                    f"{len(t.defects)} defects, {len(t.terraces)} terraces, tip {t.tip_state}, "
                    f"bias {frame.bias_v:+.2f} V"
                )
        except InputError as exc:
            raise typer.BadParameter(str(exc)) from exc
